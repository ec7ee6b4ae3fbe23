"""The shipped example plans and configs are valid."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedge.agent.process import load_config as load_agent_config
from fedge.coordinator.plan import check_submission, parse_plan, with_seed

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


PLANS = [*sorted((EXAMPLES / "plans").glob("*.toml")), EXAMPLES / "demo" / "plan.toml"]


@pytest.mark.parametrize("path", PLANS, ids=str)
def test_example_plans_are_accepted_at_submission(path):
    """As `fedge coordinator submit` checks them (model parameters included)."""
    plan = check_submission(path.read_text())
    assert plan.dataset == "fed_tcga_brca" and plan.rounds >= 1


@pytest.mark.parametrize("path", sorted((EXAMPLES / "plans").glob("*.toml")), ids=str)
def test_example_plans_leave_the_seed_to_submission_so_they_can_be_rerun_over_other_sites(path):
    """A fixed seed makes a re-run train the same update as the first run, which the
    sites refuse to reveal summed over another set of survivors; the coordinator
    writes a fresh seed into a plan that names none."""
    text = path.read_text()
    raw = tomllib.loads(text)
    assert "seed" not in raw["job"] and "seed" not in raw["model"].get("params", {})
    first, rerun = parse_plan(with_seed(text)), parse_plan(with_seed(text))
    assert first.seed != rerun.seed  # 1 chance in 2**31 to be equal


def test_example_agent_config_parses():
    cfg = load_agent_config(EXAMPLES / "agent.toml")
    assert cfg.datasets[0]["kind"] == "fed_tcga_brca"


@pytest.mark.parametrize("path", PLANS, ids=str)
def test_example_plans_score_rounds_on_validation_and_their_commented_options_are_accepted(
        path):
    """No example picks rounds on the test split, and every setting an example shows
    commented out (`# key = value`, such as its DP line) is accepted once uncommented."""
    import re

    text = path.read_text()
    assert parse_plan(text).eval_split == "val"
    uncommented = re.sub(r"(?m)^# (\w+ = .*)$", r"\1", text)
    shown = len(re.findall(r"(?m)^# \w+ = ", text))
    plan = check_submission(uncommented)
    if shown:
        assert uncommented != text and plan.privacy  # the DP example lines


def test_the_example_agent_configs_commented_image_data_set_parses_uncommented():
    import re

    from fedge.train.data import DatasetSpec

    text = (EXAMPLES / "agent.toml").read_text()
    block = text[text.index("# [[datasets]]"):]
    cfg = tomllib.loads(re.sub(r"(?m)^# ", "", block))
    spec = DatasetSpec.from_config(cfg["datasets"][0])
    assert spec.kind == "images" and spec.classes == ("benign", "malignant")
