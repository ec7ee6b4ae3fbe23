"""A site's privacy floor (its [privacy] min_cohort) travels in its heartbeats, and the
coordinator invites it only to rounds it would accept: a site never trains for a
secure sum it will then refuse (fedge.coordinator.cohort, "Privacy floors").

Real in-process federations (tests/coordinator/conftest.py): real Coordinator, real
SQLite, real agents with their own PrivacyPolicy, messages through the real codec.
"""

from __future__ import annotations

import asyncio
import json

from fedge.agent.guard import PrivacyPolicy
from fedge.coordinator.cohort import select_cohort
from fedge.coordinator.service import SECAGG_PROTOCOL
from fedge.wire import codec
from fedge.wire import messages as m
from fedge.wire.messages import HEALTH_MIN_COHORT

PLAN = """
[job]
dataset = "synthetic"
rounds = 1
min_clients = {min_clients}
max_failed_attempts = 2
seed = 11
[model]
name = "linear"
[train]
epochs = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "fedavg"
[secagg]
enabled = {secure}
alpha = 0.1
delta = 0.0
clip = 1.0
[deadlines]
cohort_s = 5
train_s = 5
secagg_stage_s = 3
eval_s = 3
"""


def plan(*, min_clients=2, secure=True):
    return PLAN.format(min_clients=min_clients, secure="true" if secure else "false")


def with_floors(fed, floors):
    """Give each site the policy of an untouched agent.toml but for its min_cohort
    (None: that too untouched), and count the local trainings each runs."""
    trained = {s: 0 for s in fed.agents}
    for site, agent in fed.agents.items():
        floor = floors[site]
        agent.policy = PrivacyPolicy() if floor is None else PrivacyPolicy(min_cohort=floor)
        train = agent.trainer.train

        def counted(*args, _train=train, _site=site, **kw):
            trained[_site] += 1
            return _train(*args, **kw)
        agent.trainer.train = counted
    return trained


async def heard(fed):
    """A heartbeat from every site, handled by the coordinator."""
    await fed.heartbeats()
    await fed.pump(until=lambda: not fed.inbox)


def cohort(fed, **kw):
    """The coordinator's selection for a secure job on its fleet now."""
    coord = fed.coord
    return select_cohort(coord.store.appliances(), connected=coord.connected_sites(),
                         dataset="synthetic", secure_protocol=SECAGG_PROTOCOL,
                         protocols={s: c.secagg_protocol for s, c in coord.conns.items()},
                         **kw)


def beat(fed, site, health):
    """A heartbeat from ``site`` with this health report (an agent of another release)."""
    fed.coord.handle_frames(site, [bytes(f) for f in codec.encode(m.Heartbeat(
        site=site, version=fed.coord.store.appliance(site).version,
        health_json=json.dumps(health), eligible=True, reason="", datasets=["synthetic"],
        current_task="", secagg_protocol=SECAGG_PROTOCOL), sender=site)])


def run(fed, text):
    """Submit ``text`` after a heartbeat from every site; pump until the job ends.
    Returns (job id, the submission's warnings)."""
    warnings: list[str] = []

    async def go():
        await heard(fed)
        job = fed.coord.submit_job(text, actor="test", warnings=warnings)
        await fed.pump_alive(
            until=lambda: fed.coord.store.job(job).status in ("completed", "failed"),
            max_steps=3000)
        return job
    return asyncio.run(go()), warnings


def test_two_sites_at_the_default_min_cohort_never_train_and_the_job_fails_naming_it(
        federation):
    """After an upgrade with agent.toml untouched: min_cohort 3, this release's default."""
    fed = federation(["a", "b"])
    trained = with_floors(fed, {"a": None, "b": None})
    job, warnings = run(fed, plan())

    store = fed.coord.store
    assert store.job(job).status == "failed"
    assert trained == {"a": 0, "b": 0}  # nobody trained for a sum it would refuse
    attempts = store.rounds(job)
    assert attempts and all(r.status == "failed" for r in attempts)
    for r in attempts:
        assert "its privacy floor min_cohort 3 exceeds this round's 2 site(s)" in r.reason
        assert not r.cohort

    floor_warnings = [w for w in warnings if "min_cohort" in w]
    assert len(floor_warnings) == 1, warnings
    assert "a (min_cohort 3, in a sum of at most 2)" in floor_warnings[0]
    assert "b (min_cohort 3, in a sum of at most 2)" in floor_warnings[0]
    assert "fewer than job.min_clients = 2" in floor_warnings[0]


def test_two_sites_at_min_cohort_2_commit(federation):
    fed = federation(["a", "b"])
    trained = with_floors(fed, {"a": 2, "b": 2})
    job, warnings = run(fed, plan())
    assert not [w for w in warnings if "min_cohort" in w], warnings
    assert fed.coord.store.job(job).status == "completed"
    assert trained == {"a": 1, "b": 1}


def test_a_site_whose_floor_the_round_cannot_meet_is_left_out_and_the_others_commit(
        federation):
    fed = federation(["a", "b", "c"])
    trained = with_floors(fed, {"a": 4, "b": 2, "c": 2})
    job, warnings = run(fed, plan())
    (warning,) = [w for w in warnings if "min_cohort" in w]
    assert "a (min_cohort 4, in a sum of at most 3)" in warning
    assert "leaving 2 site(s)" in warning and "b (" not in warning
    assert fed.coord.store.job(job).status == "completed"
    assert trained == {"a": 0, "b": 1, "c": 1}
    (committed,) = fed.coord.store.rounds(job)
    assert sorted(committed.cohort) == ["b", "c"]


def test_floors_that_three_sites_all_meet_take_all_three(federation):
    fed = federation(["a", "b", "c"])
    trained = with_floors(fed, {"a": 3, "b": 3, "c": 2})
    job, warnings = run(fed, plan())
    assert not [w for w in warnings if "min_cohort" in w], warnings
    assert fed.coord.store.job(job).status == "completed"
    assert trained == {"a": 1, "b": 1, "c": 1}


def test_a_plain_job_is_not_held_to_the_floor(federation):
    """The floor guards secure sums; a plain update is seen alone anyway, and the agent
    does not check it there."""
    fed = federation(["a", "b"])
    for agent in fed.agents.values():
        agent.policy = PrivacyPolicy(require_secure_aggregation=False, min_cohort=3)
    job, warnings = run(fed, plan(secure=False))
    assert not [w for w in warnings if "min_cohort" in w], warnings
    assert fed.coord.store.job(job).status == "completed"


def test_each_heartbeat_reports_the_floor_and_one_without_it_assumes_none(federation):
    fed = federation(["a", "b"])
    with_floors(fed, {"a": 5, "b": 2})
    sent: list[m.Heartbeat] = []
    agent = fed.agents["a"]
    send = agent.send_frames

    async def keep(frames):
        env = codec.decode([bytes(f) for f in frames], max_bytes=1 << 24)
        if isinstance(env.body, m.Heartbeat):
            sent.append(env.body)
        await send(frames)
    agent.send_frames = keep
    asyncio.run(heard(fed))
    (hb,) = sent
    assert json.loads(hb.health_json)[HEALTH_MIN_COHORT] == 5

    assert fed.coord.store.appliance("a").health[HEALTH_MIN_COHORT] == 5
    sel = cohort(fed)
    assert sel.candidates == [] and "min_cohort 5 exceeds this round's 2" in sel.excluded["a"]
    assert "min_cohort 2 exceeds this round's 1" in sel.excluded["b"]
    # an older agent at "a" (no key in its report): no floor is assumed
    beat(fed, "a", {})
    assert cohort(fed).candidates == ["a", "b"]


def test_leaving_out_repeats_until_every_floor_left_is_met():
    from fedge.coordinator.cohort import over_floor

    assert over_floor({"a": 3, "b": 2}, ["a", "b"]) == {"a": (3, 2), "b": (2, 1)}
    assert over_floor({"a": 3, "b": 3, "c": 2}, ["a", "b", "c"]) == {}
    assert over_floor({"a": 5, "b": 3, "c": 3, "d": None}, "abcd") == {"a": (5, 4)}
    # sites not heard from yet may join the sum: their floors are not known
    assert over_floor({"a": 3}, ["a"], others=2) == {}


def test_floors_are_judged_once_the_candidates_make_min_clients(federation):
    """Until then the round waits for more sites anyway (one may be reconnecting), and
    the waiting round's explanation names what it waits for, not a floor."""
    fed = federation(["a", "b"])
    with_floors(fed, {"a": 5, "b": 2})
    asyncio.run(heard(fed))
    assert cohort(fed, min_clients=3).candidates == ["a", "b"]
    assert cohort(fed, min_clients=2).candidates == []


def test_a_pinned_retry_is_held_to_its_own_sites(federation):
    fed = federation(["a", "b", "c"])
    with_floors(fed, {"a": 3, "b": 2, "c": 2})
    asyncio.run(heard(fed))
    sel = cohort(fed, pinned=["a", "b"])
    assert sel.candidates == ["b", "c"]
    assert "min_cohort 3 exceeds this round's 2 site(s)" in sel.excluded["a"]


def test_a_floor_that_is_not_an_integer_is_no_floor(federation):
    fed = federation(["a", "b"])
    with_floors(fed, {"a": 2, "b": 2})
    asyncio.run(heard(fed))
    for bad in (True, "9", 9.0, None):
        beat(fed, "a", {HEALTH_MIN_COHORT: bad})
        assert cohort(fed).candidates == ["a", "b"], bad

