"""A cohort site that a committed round summed without (its update late, or refused)
is sent no EvalTask; the coordinator tells it with a RoundAbort "not summed in round N
of job J", so that the agent stops holding the round (a staged software update
restarts it at once instead of after update_restart_wait_s). The survivors' flow is
unchanged: an EvalTask each and no RoundAbort.

Real coordinator and agents in memory (conftest.InProcFederation)."""

from __future__ import annotations

import asyncio

from fedge.wire import messages as m
from tests.coordinator.test_federation_inproc import plan


def test_a_site_whose_update_was_not_summed_is_told_and_holds_no_round(federation):
    fed = federation(["a", "b", "c"])
    told: dict[str, list] = {s: [] for s in fed.agents}

    def record(site, body):  # what each agent is sent (none dies)
        told[site].append(body)
        return False

    fed.kill_hook = record
    held: list = []
    send_c = fed.agents["c"].send_frames

    async def late_update(frames):  # c's plain update is lost on the way
        from fedge.wire import codec

        body = codec.decode([bytes(f) for f in frames], max_bytes=1 << 24).body
        if isinstance(body, m.PlainUpdate):
            held.append(body)
            return
        await send_c(frames)

    fed.agents["c"].send_frames = late_update

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan(rounds=1, secure="false"), actor="test")
        await fed.pump(until=lambda: fed.coord.store.job(job).status
                       in ("completed", "failed"))
        return job

    job = asyncio.run(go())
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    assert held, "c never sent its plain update"
    [r] = st.rounds(job)
    assert r.survivors == ["a", "b"] and r.dropped == ["c"]
    [abort] = [b for b in told["c"] if isinstance(b, m.RoundAbort)]
    assert abort.reason.startswith(f"not summed in round 1 of job {job}: "), abort.reason
    assert "aggregation deadline" in abort.reason
    assert not [b for b in told["c"] if isinstance(b, m.EvalTask)]
    assert fed.agents["c"].held_round() is None
    for s in ("a", "b"):  # the survivors: evaluated, never aborted
        assert [type(b) for b in told[s] if isinstance(b, m.EvalTask | m.RoundAbort)] \
            == [m.EvalTask], s
        assert fed.agents[s].held_round() is None
