"""The plan's min_clients bounds every sum the coordinator unmasks, not only the cohort
that trains (docs/security.md: "the coordinator can unmask only the sum of at least
min_clients inputs").

Before: a site that died at round 2's key stage was dropped at the stage deadline and
the round committed over the 2 others although the plan's min_clients was 3 (SecAgg+
applied its own t = 2).

Real coordinator, agents, codec and SecAgg+; the pump of tests/coordinator/conftest
moves the messages (a site in ``fed.dead`` gets nothing and its messages are lost)."""

from __future__ import annotations

import asyncio

from fedge.secagg.messages import AdvertiseRequest
from tests.coordinator.test_federation_inproc import plan


def plan_min3(stage_s=3):
    return (plan(rounds=1, secure="true").replace("min_clients = 2", "min_clients = 3")
            .replace("secagg_stage_s = 3", f"secagg_stage_s = {stage_s}"))


def test_site_lost_at_key_stage_fails_the_attempt_below_min_clients_then_it_is_retried(
        federation):
    fed = federation(["a", "b", "c"])
    fed.kill_hook = lambda site, body: site == "c" and isinstance(body, AdvertiseRequest)

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan_min3(), actor="test")
        st = fed.coord.store
        await fed.pump(until=lambda: any(r.status == "failed" for r in st.rounds(job))
                       or st.job(job).status in ("completed", "failed"), max_steps=400)
        # c comes back (restarted): the retried attempt has all three
        fed.kill_hook = None
        fed.dead.discard("c")
        await fed.heartbeats()
        await fed.pump(until=lambda: st.job(job).status in ("completed", "failed"),
                       max_steps=600)
        return job

    job = asyncio.run(go())
    st = fed.coord.store
    rows = st.rounds(job)
    assert [r.status for r in rows] == ["failed", "committed"], [
        (r.status, r.survivors, r.reason) for r in rows]
    first, second = rows
    assert "2 site(s) left in secure aggregation, fewer than the plan's min_clients 3" in (
        first.reason), first.reason
    assert "c in its AdvertiseKeys stage" in first.reason
    assert second.survivors == ["a", "b", "c"]
    assert st.job(job).status == "completed"
    # no committed round anywhere was summed over fewer than min_clients sites
    assert all(len(r.survivors) >= 3 for r in rows if r.status == "committed")
