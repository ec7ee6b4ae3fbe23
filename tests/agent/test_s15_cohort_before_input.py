"""min_cohort is checked before the masked input leaves, not only at reveal (M2,
session 15).

With min_cohort 3 (the default since this release), a 3-site federation where one
site drops while keys are shared left the other two each charging its DP run in the
privacy ledger and sending its masked input, then refusing to unmask a sum of two:
ε spent for a round that could not commit. Now a site refuses before anything is
charged when the sites that shared keys cannot make up a sum it may join.
"""

from __future__ import annotations

import asyncio
import dataclasses

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.trainer import LocalResult, SyntheticTrainer
from fedge.secagg.messages import EncryptedShares, MaskedInput
from fedge.wire import codec
from tests.coordinator.conftest import InProcFederation, synthetic_secure_plan
from tests.secagg.harness import Federation

PLAN = synthetic_secure_plan(secagg_stage_s=5)


class ChargedTrainer(SyntheticTrainer):
    """The synthetic trainer with a DP run to charge: ``charges`` counts the runs the
    agent released (``LocalResult.release_privacy``, called before the input leaves)."""

    def __init__(self, site: str, n_examples: int) -> None:
        super().__init__(site, n_examples=n_examples)
        self.charges = 0

    def train(self, *args, **kwargs) -> LocalResult:  # type: ignore[no-untyped-def]
        return dataclasses.replace(super().train(*args, **kwargs),
                                   release_privacy=self._charge)

    def _charge(self) -> None:
        self.charges += 1


def _run(tmp_path, min_cohort: int, plan: str = PLAN):
    """Three sites on ``PrivacyPolicy(min_cohort=...)``; s2 stays connected but its
    EncryptedShares never leaves. Returns (job status, its round's reason, DP runs
    charged per site, masked inputs sent per site)."""
    sites = {"s0": 100, "s1": 120, "s2": 90}
    fed = InProcFederation(tmp_path / f"coord{min_cohort}", list(sites), n_examples=sites)
    masked = dict.fromkeys(sites, 0)
    for site, agent in fed.agents.items():
        agent.policy = PrivacyPolicy(min_cohort=min_cohort)
        agent.trainer = ChargedTrainer(site, sites[site])

        async def send_frames(frames, site=site) -> None:
            body = codec.decode([bytes(f) for f in frames], max_bytes=1 << 30).body
            if site == "s2" and isinstance(body, EncryptedShares):
                return
            if isinstance(body, MaskedInput):
                masked[site] += 1
            fed.inbox.append((site, [bytes(f) for f in frames]))

        agent.send_frames = send_frames

    async def go() -> str:
        await fed.heartbeats()
        job = fed.coord.submit_job(plan, actor="test")
        await fed.pump_alive(until=lambda: fed.coord.store.job(job).status
                             in ("completed", "failed"), max_steps=1000)
        return job

    try:
        job = asyncio.run(go())
        st = fed.coord.store
        reason = " | ".join(r.reason for r in st.rounds(job))
        charges = {s: a.trainer.charges for s, a in fed.agents.items()}
        return st.job(job).status, reason, charges, masked
    finally:
        fed.pool.shutdown(wait=True)
        fed.coord.close()


def test_a_site_dropping_at_key_sharing_costs_the_other_two_no_epsilon_under_min_cohort_3(
        tmp_path) -> None:
    status, reason, charges, masked = _run(tmp_path, min_cohort=3)
    assert status == "failed"
    assert charges == {"s0": 0, "s1": 0, "s2": 0}, reason
    assert masked == {"s0": 0, "s1": 0, "s2": 0}, reason
    # the round fails at the first refusal (one site left, below min_clients 2); the
    # coordinator shortens a long reason in its middle
    assert "TooFewSurvivors: a sum over 2 site(s) is below this appliance's min_cohort 3" \
        in reason
    assert ("set min_cohort = 2 in [privacy] of this appliance's agent.toml; at most 2 "
            "sites shared keys: masked input withheld, privacy spend not charged") in reason


def test_the_same_round_commits_where_min_cohort_allows_a_sum_of_two(tmp_path) -> None:
    status, reason, charges, masked = _run(tmp_path, min_cohort=2)
    assert status == "completed", reason
    assert charges == {"s0": 1, "s1": 1, "s2": 0}
    assert masked == {"s0": 1, "s1": 1, "s2": 0}


def test_under_dp_fedavg_a_sum_below_the_noise_cohort_is_refused_before_the_charge(
        tmp_path) -> None:
    """The other reveal-time rule, checked at the same point: noise drawn for a cohort
    of 3 cannot go into a sum of 2, so nobody pays for it."""
    dp = PLAN.replace("clip = 1.0", "clip = 3.0") + (
        "[privacy]\nclient_dp = { clip_norm = 1.0, noise_multiplier = 0.5, cohort_size = 3 }\n")
    status, reason, charges, masked = _run(tmp_path, min_cohort=2, plan=dp)
    assert status == "failed"
    assert charges == {"s0": 0, "s1": 0, "s2": 0}, reason
    assert masked == {"s0": 0, "s1": 0, "s2": 0}, reason
    assert ("TooFewSurvivors: DP-FedAvg noise was drawn for a cohort of 3 but a sum can "
            "hold at most 2 sites") in reason


def test_max_summed_counts_the_cohort_outside_the_neighbourhood_as_possible() -> None:
    """The count handed to before_masked_input: on a complete graph, the sites that
    shared keys; on a sparse one, those plus every member this site cannot see."""
    for n, degree, dropped in ((5, None, {"site-004"}), (12, 4, set())):
        fed = Federation(n, 8, alpha=0.0, delta=0.0, degree=degree)
        seen: dict[str, int] = {}
        for cid, client in fed.clients.items():
            client.before_masked_input = lambda m, cid=cid, seen=seen: seen.__setitem__(cid, m)
        fed.run({"share": dropped})
        want = n - len(dropped)
        assert seen and all(m == want for m in seen.values()), (n, seen)
        if degree is not None:
            assert all(len(c.neighbours) + 1 < n for c in fed.clients.values())
