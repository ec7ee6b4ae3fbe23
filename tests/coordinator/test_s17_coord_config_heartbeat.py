"""Heartbeat settings libzmq cannot hold are refused when the config is read, naming the
file and key: ``timeout_s = 7000`` (above the 6553.599 s its heartbeat TTL holds) ended
the coordinator at bind with ``zmq.error.ZMQError: Invalid argument``, and a huge
interval_s with an OverflowError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedge.coordinator.config import ConfigError, load_config
from tests.coordinator.test_s17_coord_config_bom import provision

REPO = Path(__file__).resolve().parents[2]


def config(tmp_path, heartbeat):
    provision(tmp_path)
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text('state_dir = "st"\nprovision = "prov.json"\nbind = "tcp://127.0.0.1:0"\n'
                   f"[heartbeat]\n{heartbeat}\n")
    return cfg


@pytest.mark.parametrize(("heartbeat", "key"), [
    ("interval_s = 1\ntimeout_s = 7000", "timeout_s = 7000 is above 6553.599 s"),
    ("interval_s = 3e9\ntimeout_s = 4e9", "interval_s = 3000000000.0 is above"),
    ("interval_s = 1\ntimeout_s = inf", "timeout_s = inf must be"),
    ("interval_s = nan\ntimeout_s = 5", "interval_s = nan must be"),
])
def test_heartbeat_settings_zeromq_cannot_hold_are_refused_naming_the_key(
        tmp_path, heartbeat, key):
    cfg = config(tmp_path, heartbeat)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value).startswith(f"coordinator config {cfg}: [heartbeat] {key}"), err.value


def test_the_longest_timeout_zeromq_holds_is_taken(tmp_path):
    cfg = load_config(config(tmp_path, "interval_s = 1\ntimeout_s = 6553"))
    assert cfg.heartbeat_timeout_s == 6553.0


def test_the_coordinator_refuses_a_heartbeat_timeout_of_7000_s_in_one_line(tmp_path):
    cfg = config(tmp_path, "interval_s = 1\ntimeout_s = 7000")
    out = subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                          "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (f"fedge coordinator: coordinator config {cfg}: [heartbeat] "
                                  "timeout_s = 7000 is above 6553.599 s, the most ZeroMQ's "
                                  "heartbeat TTL holds"), out.stderr
