"""A site whose part in a round ends without an evaluation no longer holds the round:
once it has refused the round's aggregation itself (its own floor), or the coordinator
tells it the sum went without it (RoundAbort "not summed in round N"), `held_round()`
is None, and a software update staged meanwhile restarts it at once instead of waiting
its whole `update_restart_wait_s` (1800 s in production, while a roll-out's deadline is
300 s).

Real agent, update client, TUF relay and slots (tests/update/test_restart_after_round);
only the restart itself (os._exit(75)) is recorded."""

from __future__ import annotations

import asyncio
import time

from fedge.wire import messages as m
from tests.agent.test_runtime import task
from tests.update.conftest import fleet, installed  # noqa: F401 (fixtures)
from tests.update.test_restart_after_round import Site, push, until

WAIT_S = 60.0  # the site's update_restart_wait_s: a prompt restart comes far sooner


def _restart_after(site: Site, ask, then) -> float:
    async def go() -> float:
        await site.deliver(task())
        assert site.agent.held_round() == ("job1", 1)
        await then()
        t0 = time.monotonic()
        await site.deliver(ask, job="", rnd=0)
        await until(lambda: site.restarted, timeout=WAIT_S / 2)
        return time.monotonic() - t0

    return asyncio.run(go())


def test_a_site_that_refused_the_rounds_aggregation_no_longer_holds_the_round(
        fleet, tmp_path, installed):  # noqa: F811
    root, _ = installed
    site = Site(fleet, root, restart_wait_s=WAIT_S)
    site.trainer.gate.set()
    ask = push(fleet, tmp_path)

    async def refuse() -> None:
        # a cohort without this site: its own floor refuses to send its update
        await site.deliver(m.AggregateBegin(task_id="t1", cohort=["site-b", "site-c"],
                                            weight_scale=1 / 100, secure=False,
                                            threshold=1))
        [refused] = site.sent(m.TaskRefused)
        assert refused.task == "aggregate"
        assert site.agent.held_round() is None

    waited = _restart_after(site, ask, refuse)
    assert waited < 10, f"restart came {waited:.1f} s after the push"
    assert not site.sent(m.PlainUpdate)
    site.pool.shutdown()


def test_a_site_told_its_update_was_not_summed_no_longer_holds_the_round(
        fleet, tmp_path, installed):  # noqa: F811
    root, _ = installed
    site = Site(fleet, root, restart_wait_s=WAIT_S)
    site.trainer.gate.set()
    ask = push(fleet, tmp_path)

    async def left_out() -> None:
        await site.deliver(m.AggregateBegin(task_id="t1", cohort=["site-a", "site-b"],
                                            weight_scale=1 / 100, secure=False,
                                            threshold=1))
        assert site.sent(m.PlainUpdate)
        assert site.agent.held_round() == ("job1", 1)  # its evaluation may still come
        # the coordinator's aggregation deadline passed before the update counted
        await site.deliver(m.RoundAbort("not summed in round 1 of job job1: sent no "
                                        "plain update before the aggregation deadline"))
        assert site.agent.held_round() is None

    waited = _restart_after(site, ask, left_out)
    assert waited < 10, f"restart came {waited:.1f} s after the push"
    site.pool.shutdown()


def test_a_superseded_task_whose_successor_was_refused_is_not_held(
        fleet, tmp_path, installed):  # noqa: F811
    """A new TrainTask abandons the task held; refused (here: a plan this site cannot
    parse), it leaves nothing held either."""
    root, _ = installed
    site = Site(fleet, root, restart_wait_s=WAIT_S)
    site.trainer.gate.set()

    async def go() -> None:
        await site.deliver(task())
        assert site.agent.held_round() == ("job1", 1)
        await site.deliver(task(plan="not a plan", task_id="t2"), rnd=2)
        assert [r.task for r in site.sent(m.TaskRefused)] == [m.TASK_TRAIN]
        assert site.agent.held_round() is None

    asyncio.run(go())
    site.pool.shutdown()
