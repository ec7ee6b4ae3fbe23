"""Class order across sites, through the real coordinator and agents: sites send their
class lists (DatasetClasses) before each heartbeat, and no cohort ever sums two orders
of one data set's labels (fedge.coordinator.cohort, "Class order")."""

from __future__ import annotations

import asyncio

import pytest

from fedge.agent.trainer import SyntheticTrainer
from fedge.wire import codec
from fedge.wire import messages as m

PLAN = """
[job]
dataset = "synthetic"
rounds = 1
min_clients = 2
max_failed_attempts = 1
seed = 3
{classes}
[model]
name = "linear"
[train]
steps = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "fedavg"
[secagg]
enabled = false
[deadlines]
cohort_s = 3
train_s = 5
secagg_stage_s = 3
eval_s = 3
"""

ORDER = ["blob", "ring"]
FLIPPED = ["ring", "blob"]


class ImageLikeTrainer(SyntheticTrainer):
    """SyntheticTrainer whose data set declares classes, as an image data set does."""

    def __init__(self, site: str, classes: list[str]) -> None:
        super().__init__(site)
        self.classes = tuple(classes)

    def class_names(self, name: str) -> tuple[str, ...] | None:
        return self.classes if name == self.dataset else None


def _federation(federation, orders):  # type: ignore[no-untyped-def]
    fed = federation(sorted(orders))
    for site, classes in orders.items():
        fed.agents[site].trainer = ImageLikeTrainer(site, classes)
    return fed


def _watch(fed) -> list:  # type: ignore[no-untyped-def]
    """The cohort selections the coordinator makes from now on, one a tick."""
    seen = []
    tick = fed.coord.tick

    def watched() -> None:
        tick()
        if fed.coord.runner is not None and fed.coord.runner.selection is not None:
            seen.append(fed.coord.runner.selection)
    fed.coord.tick = watched
    return seen


def _run(fed, plan: str) -> str:  # type: ignore[no-untyped-def]
    async def go() -> str:
        await fed.heartbeats()
        job = fed.coord.submit_job(plan, actor="test")
        await fed.pump(until=lambda: fed.coord.store.job(job).status
                       in ("completed", "failed"))
        return job
    return asyncio.run(go())


def test_sites_that_disagree_on_the_class_order_make_no_cohort_and_are_told_why(federation):
    """h3 lists the classes flipped: without job.classes the coordinator cannot tell
    which order is meant, so no round sums any of them; the failure names each site's
    list and says to set job.classes (before: the job completed, its labels mixed)."""
    fed = _federation(federation, {"h1": ORDER, "h2": ORDER, "h3": FLIPPED})
    job = _run(fed, PLAN.format(classes=""))
    st = fed.coord.store
    assert st.job(job).status == "failed"
    assert not [r for r in st.rounds(job) if r.status == "committed"]
    error = st.job(job).error
    assert "['blob', 'ring'] at h1, h2" in error and "['ring', 'blob'] at h3" in error
    assert "set job.classes in the plan" in error


def test_with_job_classes_a_site_declaring_another_order_is_left_out(federation):
    fed = _federation(federation, {"h1": ORDER, "h2": ORDER, "h3": FLIPPED})
    sel = _watch(fed)
    job = _run(fed, PLAN.format(classes='classes = ["blob", "ring"]'))
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    (rnd,) = st.rounds(job)
    assert rnd.survivors == ["h1", "h2"] and "h3" not in rnd.cohort
    reasons = {s.excluded.get("h3") for s in sel} - {"not connected"}
    assert reasons == {"declares ['ring', 'blob'] for data set 'synthetic', the plan's "
                       "job.classes is ['blob', 'ring']: fix the order in this site's "
                       "agent.toml (datasets.classes) or in the plan"}


def test_a_site_that_sends_no_class_lists_is_left_out_when_the_others_declare_one(federation):
    """An agent from before DatasetClasses (its lists never arrive): its order cannot be
    checked against the others', so it is not summed with them."""
    fed = _federation(federation, {"h1": ORDER, "h2": ORDER, "h3": ORDER})
    send = fed.agents["h3"].send_frames

    async def without_classes(frames):  # type: ignore[no-untyped-def]
        if codec.decode([bytes(f) for f in frames], max_bytes=1 << 24).header.type \
                != m.DatasetClasses.__wire_type__:
            await send(frames)

    fed.agents["h3"].send_frames = without_classes
    sel = _watch(fed)
    job = _run(fed, PLAN.format(classes=""))
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    assert st.rounds(job)[0].survivors == ["h1", "h2"]
    reasons = {s.excluded.get("h3") for s in sel} - {"not connected"}
    assert reasons == {"sent no class lists (none declared there, or an agent before "
                       "DatasetClasses): its class order for data set 'synthetic' cannot be "
                       "checked against the ['blob', 'ring'] the other sites declare; declare "
                       "them in its agent.toml (datasets.classes) or update the appliance"}


def test_a_coordinator_of_the_previous_release_still_takes_the_heartbeats(federation,
                                                                          monkeypatch):
    """A coordinator that does not know DatasetClasses refuses that message alone: the
    heartbeats that follow are taken, the sites join cohorts, and each agent stops
    sending the class lists after the refusal (until the coordinator's version changes)."""
    monkeypatch.delitem(codec._BY_NAME, m.DatasetClasses.__wire_type__)
    fed = _federation(federation, {"h1": ORDER, "h2": ORDER})
    sent: dict[str, list[str]] = {"h1": [], "h2": []}
    for site, agent in fed.agents.items():
        send = agent.send

        async def counting(body, *, site=site, send=send, **kw):  # type: ignore[no-untyped-def]
            sent[site].append(codec.type_name_of(body))
            await send(body, **kw)
        agent.send = counting  # type: ignore[method-assign]

    async def go() -> str:
        for _ in range(3):
            await fed.heartbeats()
            await fed.pump(until=lambda: not fed.inbox, max_steps=5)
        job = fed.coord.submit_job(PLAN.format(classes=""), actor="test")
        await fed.pump(until=lambda: fed.coord.store.job(job).status
                       in ("completed", "failed"))
        return job

    job = asyncio.run(go())
    assert fed.coord.store.job(job).status == "completed", fed.coord.store.job(job).error
    for site in ("h1", "h2"):
        assert sent[site].count("heartbeat") == 3
        # the first is refused; the HeartbeatAck then names the version, and the
        # second (sent before that version was known) is refused under it
        assert sent[site].count(m.DatasetClasses.__wire_type__) <= 2


@pytest.mark.parametrize("value, rule", [
    (["a"], "2 or more"), (["a", "a"], "appear more than once"), (["a", ""], "empty"),
    ("a,b", "must be a list"),
])
def test_job_classes_must_be_distinct_non_empty_names(value, rule):
    from fedge.coordinator.plan import PlanError, parse_plan

    with pytest.raises(PlanError, match=rule):
        parse_plan(PLAN.format(classes=f"classes = {value!r}".replace("'", '"')))
    assert parse_plan(PLAN.format(classes='classes = ["b", "a"]')).classes == ("b", "a")
