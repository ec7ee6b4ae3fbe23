"""What a DP plan releases stays inside its ε: the rules check_submission adds
(fedge.coordinator.plan._check_dp_release), each refused naming the field and the
numbers. A job stored before a rule existed still parses (its status stays readable);
its sites hold their side of the rule (tests/agent/test_guard.py)."""

from __future__ import annotations

import math

import pytest

from fedge.coordinator.plan import PlanError, check_submission, parse_plan

BASE = """
[job]
dataset = "fed_tcga_brca"
rounds = 2
min_clients = 3
seed = 5
{job}
[model]
name = "cox_linear"
params = {{ in_features = 39 }}
[train]
steps = 10
batch_size = 8
learning_rate = 0.1
[strategy]
name = "fedavg"
[secagg]
enabled = {secure}
clip = {clip}
[privacy]
{privacy}
"""
DP = "dp = { noise_multiplier = 1.5, max_grad_norm = 1.0, cox_per_term = true }"


def client_dp(z: float = 1.0, s: float = 1.0, k: int = 3) -> str:
    return f"client_dp = {{ clip_norm = {s}, noise_multiplier = {z}, cohort_size = {k} }}"


def plan(*, job: str = "", secure: str = "true", clip: float = 10.0, privacy: str = "") -> str:
    return BASE.format(job=job, secure=secure, clip=clip, privacy=privacy)


def refused(text: str) -> PlanError:
    with pytest.raises(PlanError) as info:
        check_submission(text)
    return info.value


@pytest.mark.parametrize("privacy", [DP, client_dp()])
def test_the_training_split_is_not_evaluated_under_dp(privacy: str) -> None:
    """Evaluation metrics leave the sites without noise; on the training split they
    are about the records ε protects (on any weights the coordinator sends)."""
    text = plan(job='eval_split = "train"', privacy=privacy)
    err = refused(text)
    assert err.field == "job.eval_split" and err.value == "train"
    assert "privacy.dp or privacy.client_dp" in err.rule and "without noise" in err.rule
    assert parse_plan(text).eval_split == "train"  # a stored job stays readable
    for split in ("val", "test"):
        assert check_submission(plan(job=f'eval_split = "{split}"', privacy=privacy)) \
            .eval_split == split
    assert check_submission(plan(job='eval_split = "train"')).eval_split == "train"  # no DP


def test_dp_fedavg_without_noise_is_refused() -> None:
    text = plan(privacy=client_dp(z=0.0, k=1))
    err = refused(text)
    assert err.field == "privacy.client_dp.noise_multiplier" and err.value == 0.0
    assert "must be > 0" in err.rule and "only clips" in err.rule
    assert parse_plan(text).privacy["client_dp"]["noise_multiplier"] == 0.0  # stored: readable
    assert check_submission(plan(privacy=client_dp(z=0.1, k=1)))


def test_dp_fedavg_over_a_cohort_needs_secure_aggregation() -> None:
    """Each site's share N(0, (zS)²/K) is sized for the sum of K: alone it carries
    z/√K. A plain plan is refused for K > 1 and taken for K = 1."""
    err = refused(plan(secure="false", privacy=client_dp(k=3)))
    assert err.field == "secagg.enabled" and err.value is False
    assert "cohort_size = 3 needs secure aggregation" in err.rule and "1/√3" in err.rule
    assert check_submission(plan(secure="false", privacy=client_dp(k=1)))
    assert check_submission(plan(secure="true", privacy=client_dp(k=3)))


@pytest.mark.parametrize(("z", "s", "k"), [(1.0, 1.0, 3), (0.5, 0.5, 3), (2.0, 0.1, 1),
                                           (1.1, 2.0, 10)])
def test_secagg_clip_must_leave_the_dp_fedavg_noise_whole(z: float, s: float, k: int) -> None:
    """Each noised update is clipped elementwise to ±secagg.clip before it is summed:
    the clip must be at least 6 standard deviations of the site's noise share."""
    need = 6 * z * s / math.sqrt(k)
    err = refused(plan(clip=need * 0.99, privacy=client_dp(z, s, k)))
    assert err.field == "secagg.clip"
    assert f"std z·S/√K = {z:g}·{s:g}/√{k} = {z * s / math.sqrt(k):.4g}" in err.rule
    smallest = float(err.rule.rsplit("Set secagg.clip >= ", 1)[1])
    assert need * (1 - 1e-9) <= smallest <= need * 1.001
    assert check_submission(plan(clip=smallest, privacy=client_dp(z, s, k)))  # as it says
    assert check_submission(plan(clip=need, privacy=client_dp(z, s, k)))


def test_the_default_clip_is_refused_for_the_commented_example_in_the_plan_docs() -> None:
    err = refused(plan(clip=1.0, privacy=client_dp(1.0, 1.0, 3)))
    assert err.rule.endswith("Set secagg.clip >= 3.465")


@pytest.mark.parametrize("delta", [0.1, 0.025, 1.0 / 40])
def test_dp_delta_must_be_well_below_one_over_the_smallest_sites_rows(delta: float) -> None:
    """δ of 1/n allows a mechanism that releases one record of n outright."""
    err = refused(plan(privacy=DP.replace("max_grad_norm", f"delta = {delta}, max_grad_norm")
                       + "\nmin_site_examples = 40"))
    assert err.field == "privacy.dp.delta" and err.value == delta
    assert "well below 1/min_site_examples = 1/40 = 0.025" in err.rule
    assert "delta <= 0.0025" in err.rule


def test_a_small_delta_is_taken_and_without_min_site_examples_the_sites_judge() -> None:
    with_n = DP.replace("max_grad_norm", "delta = 1e-3, max_grad_norm") + \
        "\nmin_site_examples = 40"
    assert check_submission(plan(privacy=with_n)).privacy["dp"]["delta"] == 1e-3
    assert check_submission(plan(privacy=DP + "\nmin_site_examples = 40"))  # default 1e-5
    without_n = DP.replace("max_grad_norm", "delta = 0.1, max_grad_norm")
    assert check_submission(plan(privacy=without_n)).privacy["dp"]["delta"] == 0.1
