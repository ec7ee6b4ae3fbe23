"""agent.toml errors name the file, and say what a value must be (s17 L5).

``update_trial_s`` shorter than the heartbeat interval was accepted: no heartbeat ack
could confirm a software update in time, so every update was rolled back. A
hand-edited ``keys/coordinator.json`` with a number for its key or endpoint was
reported by the socket, naming no file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedge.agent.process import AgentConfigError, load_config, load_enrolled
from tests.agent.test_process_config import enrolled_state


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(("text", "says"), [
    ("colour = 1\n", "key 'colour' is unknown"),
    ("state_dir = 3\n", "state_dir = 3 must be a path"),
    ("workers = 0\n", "workers = 0 must be an integer >= 1"),
    ("health = 'yes'\n", "health = 'yes' must be true or false"),
    ("datasets = 3\n", "datasets must be [[datasets]] tables"),
    ("[heartbeat]\nperiod = 3\n", "takes interval_s, timeout_s"),
    ("eligibility = 3\n", "[eligibility] = 3 must be a table"),
])
def test_each_error_names_the_file(tmp_path, text, says):
    p = write(tmp_path, text)
    with pytest.raises(AgentConfigError) as err:
        load_config(p)
    assert says in str(err.value) and str(err.value).endswith(f"(in {p})")


@pytest.mark.parametrize("key", ["update_trial_s", "update_restart_wait_s",
                                 "stuck_task_grace_s", "data_load_s"])
def test_a_duration_that_is_not_a_number_asks_for_seconds(tmp_path, key):
    p = write(tmp_path, f'{key} = "30 min"\n')
    with pytest.raises(AgentConfigError, match=rf"{key} = '30 min' must be > 0, a number of "
                                               "seconds") as err:
        load_config(p)
    assert str(p) in str(err.value)


def test_an_update_trial_no_heartbeat_ack_could_confirm_is_refused(tmp_path):
    p = write(tmp_path, "update_trial_s = 5\n[heartbeat]\ninterval_s = 10\ntimeout_s = 30\n")
    with pytest.raises(AgentConfigError) as err:
        load_config(p)
    assert str(err.value) == (
        "agent config update_trial_s = 5 must exceed [heartbeat] interval_s = 10: a software "
        f"update in trial is confirmed by a heartbeat ack, and none could come in time (in {p})")
    cfg = load_config(write(tmp_path, "update_trial_s = 11\n[heartbeat]\ninterval_s = 10\n"
                                      "timeout_s = 30\n"))
    assert cfg.update_trial_s == 11.0


@pytest.mark.parametrize(("field", "value", "says"), [
    ("public_key", 12345, "public_key must be a Z85 str, got int"),
    ("public_key", "short", "public_key 'short' has 5 characters"),
    ("endpoint", 7700, "endpoint 7700 must be a str like tcp://HOST:PORT"),
    ("endpoint", "tcp://coordinator", "must be tcp://HOST:PORT with PORT in 1..65535"),
])
def test_a_hand_edited_coordinator_file_is_named(tmp_path, field, value, says):
    enrolled_state(tmp_path)
    path = tmp_path / "keys" / "coordinator.json"
    doc = json.loads(path.read_text())
    doc[field] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(AgentConfigError) as err:
        load_enrolled(tmp_path)
    assert str(err.value).startswith(f"{path} is corrupt:")
    assert says in str(err.value)
