"""The shipped example plans and configs are valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.agent.process import load_config as load_agent_config
from fedge.coordinator.plan import check_submission

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


PLANS = [*sorted((EXAMPLES / "plans").glob("*.toml")), EXAMPLES / "demo" / "plan.toml"]


@pytest.mark.parametrize("path", PLANS, ids=str)
def test_example_plans_are_accepted_at_submission(path):
    """As `fedge coordinator submit` checks them (model parameters included)."""
    plan = check_submission(path.read_text())
    assert plan.dataset == "fed_tcga_brca" and plan.rounds >= 1


def test_example_agent_config_parses():
    cfg = load_agent_config(EXAMPLES / "agent.toml")
    assert cfg.datasets[0]["kind"] == "fed_tcga_brca"
