"""The starting model is built in a child process, identical to the in-process build."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.coordinator.initmodel import initial_weights_subprocess, main
from fedge.coordinator.plan import PlanError, parse_plan
from fedge.coordinator.service import torch_initial_weights

PLAN = """
[job]
dataset = "d"
rounds = 1
seed = 3
[model]
name = "{model}"
params = {{ in_features = 5 }}
[train]
steps = 1
batch_size = 1
learning_rate = 0.1
[strategy]
name = "fedavg"
"""


def test_child_process_builds_the_seeded_model():
    plan = parse_plan(PLAN.format(model="cox_linear"))
    w = initial_weights_subprocess(plan)
    assert w.dtype == np.float32 and w.ndim == 1 and w.size >= 5
    assert w.tobytes() == torch_initial_weights(plan).tobytes()


def test_the_jobs_seed_chooses_the_starting_model_unless_the_model_names_one():
    one = torch_initial_weights(parse_plan(PLAN.format(model="mlp").replace("seed = 3",
                                                                            "seed = 1")))
    again = torch_initial_weights(parse_plan(PLAN.format(model="mlp").replace("seed = 3",
                                                                              "seed = 1")))
    other = torch_initial_weights(parse_plan(PLAN.format(model="mlp").replace("seed = 3",
                                                                              "seed = 999")))
    assert one.tobytes() == again.tobytes() and not np.array_equal(one, other)
    pinned = PLAN.format(model="mlp").replace("in_features = 5", "in_features = 5, seed = 7")
    assert torch_initial_weights(parse_plan(pinned)).tobytes() == torch_initial_weights(
        parse_plan(pinned.replace("seed = 3", "seed = 999"))).tobytes()


def test_unknown_model_exits_2_with_the_reason(tmp_path, capsys):
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.format(model="no_such_model"))
    assert main([str(plan), str(tmp_path / "w.npy")]) == 2
    assert "no_such_model" in capsys.readouterr().err
    assert not (tmp_path / "w.npy").exists()


def test_a_model_that_cannot_be_built_is_named_once_not_wrapped_twice():
    plan = parse_plan(PLAN.format(model="mlp").replace("params = { in_features = 5 }", ""))
    with pytest.raises(PlanError) as info:
        initial_weights_subprocess(plan)
    message = str(info.value)
    assert info.value.field == "model" and info.value.value == "mlp"
    assert message.count("plan field") == 1 and message.count("cannot be built") == 1, message
    assert "missing required parameter 'in_features'" in message


def test_the_command_says_in_one_line_what_it_cannot_read_or_write(tmp_path, capsys):
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.format(model="cox_linear"), encoding="utf-16")
    assert main([str(plan), str(tmp_path / "w.npy")]) == 2
    assert f"initmodel: cannot read plan {plan}: " in capsys.readouterr().err
    plan.write_text(PLAN.format(model="cox_linear"))
    missing = tmp_path / "no" / "such" / "w.npy"
    assert main([str(plan), str(missing)]) == 2
    assert f"initmodel: cannot write {missing}: " in capsys.readouterr().err
    out = tmp_path / "w.npy"
    assert main([str(plan), str(out)]) == 0
    assert np.load(out).tobytes() == torch_initial_weights(parse_plan(plan.read_text())).tobytes()
