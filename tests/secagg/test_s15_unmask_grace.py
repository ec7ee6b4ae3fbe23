"""The unmasking waits a short grace, not its stage deadline, for a silent site (L1,
session 15).

Since the server checks every unmasking share (a false one is exposed by the shares
beyond t), it waited for every site asked until the stage deadline: a site still
connected but wedged held each round the whole deadline (60 s by default). Now, once
every secret has t shares, the server waits ``UNMASK_GRACE_S`` more for the others
and then closes with what it has; shares that arrive within the grace are still
checked.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np

from fedge.secagg import messages as msgs
from fedge.secagg.server import UNMASK_GRACE_S
from fedge.wire import codec
from tests.coordinator.conftest import InProcFederation, synthetic_secure_plan

from .harness import Federation
from .test_s15_false_unmask_shares import VICTIM, _shifted


def _to_unmasking(fed: Federation, held: set[str]) -> list[tuple[str, object]]:
    """Run ``fed`` at now = 0 until the unmasking; every UnmaskShares is delivered
    except those of ``held``, which are returned (sender, message) unsent."""
    queue = list(fed.server.start(0.0))
    kept: list[tuple[str, object]] = []
    for _ in range(200):
        if not queue:
            break
        recipient, message = queue.pop(0)
        for reply in fed.clients[recipient].receive(message, 0.0):
            if recipient in held and isinstance(reply, msgs.UnmaskShares):
                kept.append((recipient, reply))
            else:
                queue += fed.server.receive(recipient, reply, 0.0)
    assert fed.server.stage == "Unmasking" and not queue
    assert {s for s, _ in kept} == held
    return kept


def test_a_silent_site_holds_the_unmasking_only_the_grace_after_t_shares() -> None:
    fed = Federation(5, 16, alpha=0.0, threshold=3, delta=0.2, stage_timeout=30.0)
    _to_unmasking(fed, held={"site-004"})
    assert not fed.server.done
    assert fed.server.tick(UNMASK_GRACE_S - 0.1) == [] and not fed.server.done
    fed.server.tick(UNMASK_GRACE_S)
    assert fed.server.result is not None, fed.server.failure
    assert fed.server.result.survivors == fed.ids
    np.testing.assert_array_equal(fed.server.result.total, fed.expected_sum(fed.ids))


def test_the_grace_starts_only_once_every_secret_has_t_shares() -> None:
    """Two of five silent, t = 3: three answers bring every secret to t, but with only
    two in the grace has not started, and the stage deadline still holds."""
    fed = Federation(5, 16, alpha=0.0, threshold=3, delta=0.2, stage_timeout=30.0)
    late = _to_unmasking(fed, held={"site-002", "site-003", "site-004"})
    fed.server.receive(*late[0], 0.0)  # three answers of five: every secret at t
    assert fed.server.deadline == UNMASK_GRACE_S
    fed2 = Federation(5, 16, alpha=0.0, threshold=3, delta=0.2, stage_timeout=30.0)
    _to_unmasking(fed2, held={"site-002", "site-003", "site-004"})
    assert fed2.server.tick(UNMASK_GRACE_S + 1) == [] and not fed2.server.done
    assert fed2.server.deadline == 30.0


def test_a_false_share_arriving_within_the_grace_is_still_found_and_left_out() -> None:
    """The liar answers last, 1 s after the other four brought every secret to t: its
    shifted share of the victim's seed is checked against the four true ones."""
    fed = Federation(5, 16, alpha=0.0, threshold=3, delta=0.4, stage_timeout=30.0)
    liar = "site-000"
    ((_, reply),) = _to_unmasking(fed, held={liar})
    base = tuple(range(1, 4))
    seeds = dict(reply.seed_shares)
    seeds[VICTIM] = _shifted(seeds[VICTIM], base)
    fed.server.receive(liar, dataclasses.replace(reply, seed_shares=seeds), UNMASK_GRACE_S / 2)
    assert fed.server.result is not None, fed.server.failure
    np.testing.assert_array_equal(fed.server.result.total, fed.expected_sum(fed.ids))
    assert fed.server.result.false_shares == {liar: [f"{VICTIM}'s self-mask seed"]}


PLAN = synthetic_secure_plan(secagg_stage_s=30)


def test_a_connected_site_that_never_unmasks_holds_the_round_seconds_not_the_deadline(
        tmp_path) -> None:
    """Five real agents; s4 keeps heartbeating but its UnmaskShares never leaves. The
    round commits with every site a survivor, within a few seconds of the coordinator's
    clock after the unmask requests went out, not the 30 s stage deadline."""
    sites = {f"s{i}": 100 for i in range(5)}
    fed = InProcFederation(tmp_path / "coord", list(sites), n_examples=sites)
    asked_at: list[float] = []

    async def wedged(frames) -> None:
        env = codec.decode([bytes(f) for f in frames], max_bytes=1 << 30)
        if isinstance(env.body, msgs.UnmaskShares):
            asked_at.append(fed.clock.t)
            return
        fed.inbox.append(("s4", [bytes(f) for f in frames]))

    fed.agents["s4"].send_frames = wedged

    async def go() -> str:
        await fed.heartbeats()
        job = fed.coord.submit_job(PLAN, actor="test")
        await fed.pump_alive(until=lambda: fed.coord.store.job(job).status
                             in ("completed", "failed"), max_steps=400)
        return job

    try:
        job = asyncio.run(go())
        done_at = fed.clock.t
        (rnd,) = fed.coord.store.rounds(job)
        assert fed.coord.store.job(job).status == "completed", rnd.reason
        assert rnd.status == "committed"
        assert sorted(rnd.survivors) == sorted(sites)
        assert asked_at, "s4 was never asked to unmask"
        assert done_at - asked_at[0] < 10.0
    finally:
        fed.pool.shutdown(wait=True)
        fed.coord.close()
