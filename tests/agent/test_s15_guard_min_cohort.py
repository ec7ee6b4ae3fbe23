"""min_cohort defaults to 3 (H2, session 15).

In a sum of two inputs the other site recovers this site's update: it subtracts its
own (or sends a masked input of zero) and reads the rest from the model the
coordinator publishes. A three-site cohort can be shrunk to two survivors by one
site that makes the third drop out, so by default a site reveals into no secure
sum of fewer than three; ``min_cohort = 2`` in its agent.toml allows two.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.process import load_config
from fedge.coordinator import checkpoint
from fedge.secagg import messages as smsgs
from tests.coordinator.conftest import InProcFederation, synthetic_secure_plan

PLAN = synthetic_secure_plan(secagg_stage_s=3)


def test_the_default_min_cohort_is_three_and_two_is_allowed_explicitly(tmp_path: Path) -> None:
    assert PrivacyPolicy().min_cohort == 3
    cfg = tmp_path / "agent.toml"
    cfg.write_text("")
    assert load_config(cfg).policy.min_cohort == 3
    cfg.write_text("[privacy]\nmin_cohort = 2\n")
    assert load_config(cfg).policy.min_cohort == 2


def test_the_refusal_says_what_a_sum_of_two_gives_away_and_how_to_allow_it() -> None:
    why = PrivacyPolicy().refuse_aggregation(plan_secure=True, secure=True, cohort=2,
                                             weight_scale=0.5, client_dp_cohort=None)
    assert why == (
        "an aggregation over 2 site(s) is below this appliance's min_cohort 3: in a sum "
        "of 2, the other 1 site(s) together can recover this site's update from it; to "
        "accept that, set min_cohort = 2 in [privacy] of this appliance's agent.toml")
    assert PrivacyPolicy(min_cohort=2).refuse_aggregation(
        plan_secure=True, secure=True, cohort=2, weight_scale=0.5,
        client_dp_cohort=None) is None
    assert PrivacyPolicy().min_cohort_refusal(3) is None


def _shrunk_round(tmp_path: Path, policy: PrivacyPolicy):
    """Three sites on ``policy``; 'b' goes silent once the keys are out (as if another
    site had made it abort), so the sum is over {a, m}: the isolation of H2."""
    fed = InProcFederation(tmp_path / "coord", ["a", "b", "m"])
    for agent in fed.agents.values():
        agent.policy = policy
    fed.kill_hook = lambda site, body: site == "b" and isinstance(body, smsgs.AdvertisedKeys)

    async def go() -> str:
        await fed.heartbeats()
        job = fed.coord.submit_job(PLAN, actor="test")
        await fed.pump_alive(until=lambda: fed.coord.store.job(job).status
                             in ("completed", "failed"), max_steps=4000,
                             sites=["a", "m"])
        return job

    try:
        job = asyncio.run(go())
        return fed.coord.store.job(job), fed.coord.store.rounds(job), checkpoint.final_path(
            fed.coord.state_dir, job)
    finally:
        fed.pool.shutdown(wait=True)
        fed.coord.close()


def test_by_default_a_site_does_not_unmask_a_sum_shrunk_to_itself_and_one_other(
        tmp_path: Path) -> None:
    record, rounds, final = _shrunk_round(tmp_path, PrivacyPolicy())
    assert record.status == "failed"
    assert not final.exists()
    assert not any(r.status == "committed" for r in rounds)
    assert "a: TooFewSurvivors: a sum over 2 site(s) is below this appliance's min_cohort 3" \
        in record.error


def test_a_site_that_allows_sums_of_two_still_takes_part_in_one(tmp_path: Path) -> None:
    record, rounds, final = _shrunk_round(tmp_path, PrivacyPolicy(min_cohort=2))
    assert record.status == "completed", record.error
    assert [r.survivors for r in rounds if r.status == "committed"] == [["a", "m"]]
    assert np.isfinite(checkpoint.load_checkpoint(final).weights).all()
