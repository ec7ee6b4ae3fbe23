"""`fedge coordinator check --config FILE` and `fedge agent check --config FILE`: the
configuration checked as `run` checks it at start, without starting: 'ok: FILE' and exit
0 (warnings on stderr), or the refusal start would give and exit 2. A restart was the
only full check, and it abandons a round in flight. The real CLI, in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.agent.test_process_config import enrolled_state
from tests.coordinator.test_s17_coord_config_bom import provision

REPO = Path(__file__).resolve().parents[1]


def fedge(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *argv], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=os.environ | (env or {}))


def coordinator_config(tmp_path, text='bind = "tcp://127.0.0.1:7700"\n'):
    provision(tmp_path)
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'state_dir = "st"\nprovision = "prov.json"\n{text}')
    return cfg


def test_coordinator_check_of_a_good_config_says_ok_and_starts_nothing(tmp_path):
    cfg = coordinator_config(tmp_path)
    out = fedge("coordinator", "check", "--config", str(cfg))
    assert (out.returncode, out.stdout, out.stderr) == (0, f"ok: {cfg}\n", "")
    assert not (tmp_path / "st").exists()  # no state dir, no database, no lock


def test_coordinator_check_prints_the_warnings_start_would_log(tmp_path):
    cfg = coordinator_config(tmp_path, 'bind = "tcp://127.0.0.1:7800"\n')
    out = fedge("coordinator", "check", "--config", str(cfg))
    assert out.returncode == 0 and out.stdout == f"ok: {cfg}\n", out.stderr
    (warning,) = out.stderr.splitlines()
    assert warning.startswith(f"warning: bind = 'tcp://127.0.0.1:7800' in {cfg}, port 7800; "
                              "but tcp://127.0.0.1:7700, the endpoint the appliances were "
                              "enrolled to connect to"), warning


@pytest.mark.parametrize(("text", "env", "error"), [
    ('bind = "tcp://127.0.0.1:99999"\n', {}, "bind = 'tcp://127.0.0.1:99999' must be"),
    ('bind = "tcp://127.0.0.1:7700"\n[admin]\nendpiont = "tcp://127.0.0.1:7799"\n', {},
     "[admin] key 'endpiont' is unknown"),
    ('bind = "tcp://127.0.0.1:7700"\n', {"FEDGE_SIMD": "avx9"},
     "FEDGE_SIMD='avx9' names no usable path"),
])
def test_coordinator_check_refuses_what_start_refuses_with_exit_2(tmp_path, text, env, error):
    cfg = coordinator_config(tmp_path, text)
    out = fedge("coordinator", "check", "--config", str(cfg), env=env)
    assert out.returncode == 2 and out.stdout == "", out
    (line,) = out.stderr.splitlines()
    assert line.startswith("fedge coordinator: ") and error in line, line


def agent_config(tmp_path, text="", coordinator="tcp://192.0.2.7:7000"):
    """An enrolled state dir "st" (its coordinator `coordinator`: enrolled_state's
    tcp://127.0.0.1:1 is loopback, which check warns of) and its agent.toml."""
    enrolled_state(tmp_path / "st")
    coord = tmp_path / "st" / "keys" / "coordinator.json"
    coord.write_text(json.dumps(json.loads(coord.read_text()) | {"endpoint": coordinator}))
    data = tmp_path / "data.npz"  # check reads it as a task does: a real one, a minute old
    np.savez(data, x=np.arange(20, dtype=np.float32).reshape(10, 2),
             event=np.array([0, 1] * 5), time=np.arange(1.0, 11.0))
    old = time.time() - 60
    os.utime(data, (old, old))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "st"\nhealth = false\n[[datasets]]\nname = "x"\n'
                   f'kind = "numpy"\npath = "data.npz"\n{text}')
    return cfg


def test_agent_check_of_a_good_config_says_ok_and_takes_no_lock(tmp_path):
    cfg = agent_config(tmp_path)
    before = sorted(p.name for p in (tmp_path / "st").rglob("*"))
    out = fedge("agent", "check", "--config", str(cfg))
    assert (out.returncode, out.stderr) == (0, f"reading data set 'x' ({tmp_path / 'data.npz'})…\n")
    assert re.fullmatch(r"data set 'x': ok: 10 rows \(train 8, val 2\), 2 feature columns; "
                        rf"read in \d+\.\d s\nok: {re.escape(str(cfg))}\n", out.stdout), out.stdout
    assert sorted(p.name for p in (tmp_path / "st").rglob("*")) == before  # no agent.lock


def test_agent_check_refuses_a_data_set_it_cannot_find(tmp_path):
    cfg = agent_config(tmp_path)
    (tmp_path / "data.npz").unlink()
    out = fedge("agent", "check", "--config", str(cfg))
    assert out.returncode == 1 and out.stdout == "", out.stderr
    assert out.stderr.splitlines() == [
        f"error: data set 'x': its path {tmp_path / 'data.npz'} does not exist; every job "
        "on it is refused until that is fixed",
        f"fedge agent: 1 of 1 data sets in {cfg} cannot be used (said above): the agent "
        "starts, but refuses every job on them until that is fixed"], out.stderr


def test_agent_check_refuses_an_appliance_not_enrolled(tmp_path):
    cfg = agent_config(tmp_path)
    (tmp_path / "st" / "enrolment.json").unlink()
    out = fedge("agent", "check", "--config", str(cfg))
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.startswith(f"fedge agent: appliance not enrolled: no "
                                 f"{tmp_path / 'st' / 'enrolment.json'}"), out.stderr


@pytest.mark.parametrize(("text", "env", "error"), [
    ("[heartbeat]\ninterval_s = 3\ntimeout_s = 2\n", {}, "must exceed"),
    ("", {"FEDGE_SIMD": "avx9"}, "FEDGE_SIMD='avx9' names no usable path"),
])
def test_agent_check_refuses_what_start_refuses_with_exit_2(tmp_path, text, env, error):
    cfg = agent_config(tmp_path, text)
    out = fedge("agent", "check", "--config", str(cfg), env=env)
    assert out.returncode == 2 and out.stdout == "", out
    (line,) = out.stderr.splitlines()
    assert line.startswith("fedge agent: ") and error in line, line


def test_check_without_a_config_is_refused(tmp_path):
    for role in ("coordinator", "agent"):
        out = fedge(role, "check")
        assert out.returncode == 2 and f"fedge {role} check: --config FILE is required" in \
            out.stderr, out


def test_agent_check_names_the_keys_not_enrolled_last(tmp_path):
    cfg = agent_config(tmp_path)
    meta = tmp_path / "st" / "enrolment.json"
    from fedge.transport import CurveKeyPair

    meta.write_text(json.dumps(json.loads(meta.read_text())
                               | {"curve_public": CurveKeyPair.generate().public}))
    out = fedge("agent", "check", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    (warning,) = [x for x in out.stderr.splitlines() if x.startswith("warning: ")]
    assert warning.startswith("warning: using the CURVE key ") and \
        "which is not the key enrolled last" in warning, warning


def test_agent_check_warns_of_a_coordinator_name_that_does_not_resolve(tmp_path):
    """The agent would start and never connect, libzmq retrying the name in silence
    (s17 endpoints M3): check says so at once."""
    cfg = agent_config(tmp_path, coordinator="tcp://fl-coordinator.invalid:7000")
    out = fedge("agent", "check", "--config", str(cfg))
    assert (out.returncode, out.stdout.splitlines()[-1]) == (0, f"ok: {cfg}"), out.stderr
    (warning,) = [x for x in out.stderr.splitlines() if x.startswith("warning: ")]
    assert warning.startswith(
        "warning: the coordinator's name fl-coordinator.invalid (from "
        "tcp://fl-coordinator.invalid:7000, the enrolled coordinator endpoint) does not "
        "resolve here ("), warning
    assert warning.endswith("): the agent cannot connect until it does (DNS, or /etc/hosts)")


@pytest.mark.parametrize("coordinator", ["tcp://127.0.0.1:7000", "tcp://localhost:7000"])
def test_agent_check_warns_of_a_coordinator_on_loopback(tmp_path, coordinator):
    """An enrolment file made by `fedge console init --coordinator tcp://localhost:P`
    on the console's machine: every appliance dials itself (s17 endpoints L3)."""
    cfg = agent_config(tmp_path, coordinator=coordinator)
    out = fedge("agent", "check", "--config", str(cfg))
    assert (out.returncode, out.stdout.splitlines()[-1]) == (0, f"ok: {cfg}"), out.stderr
    (warning,) = [x for x in out.stderr.splitlines() if x.startswith("warning: ")]
    assert warning == (
        f"warning: the coordinator endpoint {coordinator} is a loopback address: the agent "
        "will dial this machine itself. Unless the coordinator runs here, the console must "
        "be initialised with the address the appliances reach the coordinator at (fedge "
        "console init --coordinator tcp://HOST:PORT) and issue this appliance's enrolment "
        "file again"), warning
