"""agent.toml's [heartbeat] holds only what ZeroMQ's sockets take (s17 F2, L5).

``timeout_s = 7000`` (above libzmq's heartbeat TTL cap) used to load; the socket then
failed inside the client's task, unseen, and the agent never connected while systemd
said ready. ``interval_s = "30s"`` was told "must be > 0".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.agent.process import AgentConfigError, load_config
from fedge.transport._sockopts import HEARTBEAT_TTL_MAX_S


def write(tmp_path: Path, heartbeat: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(f'state_dir = "st"\n[heartbeat]\n{heartbeat}')
    return p


def test_a_timeout_above_zeromqs_ttl_cap_is_refused_naming_file_section_and_key(tmp_path):
    p = write(tmp_path, "interval_s = 1\ntimeout_s = 7000\n")
    with pytest.raises(AgentConfigError) as err:
        load_config(p)
    assert str(err.value) == (
        "agent config [heartbeat] timeout_s = 7000 is above 6553.599 s, the most ZeroMQ's "
        f"heartbeat TTL holds (in {p})")


def test_the_largest_timeout_zeromq_takes_loads(tmp_path):
    cfg = load_config(write(tmp_path, f"interval_s = 1\ntimeout_s = {HEARTBEAT_TTL_MAX_S}\n"))
    assert cfg.heartbeat_timeout_s == HEARTBEAT_TTL_MAX_S


def test_an_interval_above_a_c_int_of_milliseconds_is_refused(tmp_path):
    with pytest.raises(AgentConfigError, match=r"\[heartbeat\] interval_s = 1000000000\.0 is "
                                               r"above 2147483\.647 s"):
        load_config(write(tmp_path, "interval_s = 1e9\ntimeout_s = 2e9\n"))


@pytest.mark.parametrize("value", ['"30s"', "true", "inf", "nan"])
def test_an_interval_that_is_not_a_number_of_seconds_says_so(tmp_path, value):
    with pytest.raises(AgentConfigError, match=r"\[heartbeat\] interval_s = .* must be a "
                                               r"number of seconds") as err:
        load_config(write(tmp_path, f"interval_s = {value}\n"))
    assert str(tmp_path / "agent.toml") in str(err.value)


def test_a_timeout_not_above_the_interval_names_the_file(tmp_path):
    p = write(tmp_path, "interval_s = 10\ntimeout_s = 5\n")
    with pytest.raises(AgentConfigError, match=r"timeout_s = 5 must exceed interval_s = 10") \
            as err:
        load_config(p)
    assert str(p) in str(err.value)
