"""A coordinator pointed at an appliance agent's state directory is refused, naming the
directory and what it found there: it started half-configured ("update relay disabled:
no TUF repository"), its roster.json and tuf/ the agent's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedge.coordinator.config import ConfigError, load_config
from tests.coordinator.test_s17_coord_config_bom import provision

REPO = Path(__file__).resolve().parents[2]


def config(tmp_path, *agent_files):
    provision(tmp_path)
    state = tmp_path / "fedge"
    (state / "keys").mkdir(parents=True)
    for name in agent_files:
        (state / name).write_text("{}\n")
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'state_dir = "{state}"\nprovision = "prov.json"\n'
                   'bind = "tcp://127.0.0.1:0"\n')
    return cfg, state


@pytest.mark.parametrize("found", [("enrolment.json",), ("agent.lock",),
                                   ("enrolment.json", "agent.lock")])
def test_an_agents_state_directory_is_refused_naming_what_is_there(tmp_path, found):
    cfg, state = config(tmp_path, *found)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value).startswith(
        f"coordinator config {cfg}: state_dir = '{state}' is an appliance agent's state "
        f"directory (it holds {' and '.join(found)}): the coordinator needs its own"), err.value


def test_the_coordinator_does_not_start_in_an_agents_state_directory(tmp_path):
    cfg, state = config(tmp_path, "enrolment.json", "agent.lock")
    out = subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                          "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2, out.stderr
    assert "is an appliance agent's state directory" in out.stderr, out.stderr
    assert sorted(p.name for p in state.iterdir()) == ["agent.lock", "enrolment.json", "keys"]


def test_a_directory_without_an_agents_files_is_taken(tmp_path):
    cfg, state = config(tmp_path)
    assert load_config(cfg).state_dir == state
