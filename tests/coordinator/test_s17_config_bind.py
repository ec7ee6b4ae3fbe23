"""The coordinator's bind is checked when the config is read: libzmq took a port out of
range modulo 65536, so ``tcp://127.0.0.1:99999`` listened on 34463 and ``:-1`` on 65535,
where no appliance was told to connect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedge.coordinator.config import ConfigError, load_config
from tests.coordinator.test_s17_coord_config_bom import provision

REPO = Path(__file__).resolve().parents[2]


def config(tmp_path, bind):
    provision(tmp_path)
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'state_dir = "st"\nprovision = "prov.json"\nbind = {bind}\n')
    return cfg


@pytest.mark.parametrize("bind", ['"tcp://127.0.0.1:99999"', '"tcp://127.0.0.1:-1"',
                                  '"tcp://127.0.0.1:65536"', '"tcp://127.0.0.1"',
                                  '"tcp://:7700"', '"127.0.0.1:7700"', "7700"])
def test_a_bind_out_of_range_or_malformed_is_refused_naming_file_and_key(tmp_path, bind):
    cfg = config(tmp_path, bind)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value).startswith(f"coordinator config {cfg}: bind = "), err.value
    assert "PORT in 1..65535" in str(err.value)


@pytest.mark.parametrize(("bind", "says"), [
    ("tcp://[::1:7700", "host '[::1' is not an IPv6 address in brackets"),
    ("tcp://::1:7700", "the IPv6 address ::1 must be in brackets: tcp://[::1]:PORT"),
    ("tcp://https://coordinator.example:7700", "holds a '/'"),
    ("tcp://fl coordinator:7700", "is not a host name"),
])
def test_a_bind_whose_host_libzmq_cannot_take_is_refused_naming_the_rule(tmp_path, bind,
                                                                          says):
    """s17 endpoints M1: these passed, and the coordinator failed at bind (or bound an
    address nobody was told)."""
    cfg = config(tmp_path, f'"{bind}"')
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value).startswith(f"coordinator config {cfg}: bind = {bind!r} must be"), \
        err.value
    assert "; " in str(err.value) and says in str(err.value).partition("; ")[2], err.value


# an IPv6 address in brackets is bound since s17 endpoints H1 (ZMQ_IPV6 on);
# * and [::] take IPv6 and IPv4
@pytest.mark.parametrize("bind", ["tcp://127.0.0.1:7700", "tcp://0.0.0.0:65535",
                                  "tcp://127.0.0.1:0", "tcp://*:*", "tcp://*:7700",
                                  "tcp://[::1]:7700", "tcp://[::]:0",
                                  "ipc:///run/fedge/coordinator"])
def test_a_bind_in_range_or_any_free_port_is_taken(tmp_path, bind):
    assert load_config(config(tmp_path, f'"{bind}"')).bind == bind


def test_the_coordinator_does_not_start_on_a_port_out_of_range(tmp_path):
    cfg = config(tmp_path, '"tcp://127.0.0.1:99999"')
    out = subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                          "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"fedge coordinator: coordinator config {cfg}: bind = "
                                 "'tcp://127.0.0.1:99999' must be"), out.stderr
    assert not (tmp_path / "st").exists()
