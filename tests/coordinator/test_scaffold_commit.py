"""SCAFFOLD's invariant in whole in-memory federations: the server's c stays the
example-weighted mean of the sites' c_i, when sites drop out after training, after
their masked input was summed, or when an attempt fails after its EvalTasks went
out. Each site's c_i is read from the agent itself (what it has committed, plus the
Δc_i it holds pending where the coordinator's checkpoint says c holds it: the
ControlCommit of its next task would add it)."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
from test_federation_inproc import run
from test_scaffold import RefusesRound, reference, scaffold_plan

from fedge.coordinator import checkpoint as ck
from fedge.secagg.messages import UnmaskRequest
from fedge.wire import codec
from fedge.wire import messages as m


def summed_rounds(state):
    """{site: the last round whose sum held its Δc_i}, from a checkpoint's strategy state."""
    return {k[len("sites/"):]: int(v[1]) for k, v in state.items() if k.startswith("sites/")}


def site_controls(fed, job, rounds, summed):
    """Each site's c_i as the server's c counts it: committed, plus its pending Δc_i when
    c holds that round's (``summed``)."""
    out = {}
    for s, a in fed.agents.items():
        ci = a.client_control(job, rounds + 1)
        ci = np.zeros(fed.dim) if ci is None else ci.astype(np.float64)
        pending = getattr(a, "pending_control", lambda job: None)(job)
        if pending is not None and summed.get(s) == pending[0]:
            ci = ci + pending[1]
        out[s] = ci
    return out


def assert_invariant(fed, job, rounds, seen):
    """c = Σ n_i·c_i / Σ n_i over the sites ``seen`` (those that trained); the others
    hold c_i = 0."""
    state = ck.load_checkpoint(ck.round_path(fed.coord.state_dir, job, rounds)).strategy_state
    c = state["c"]
    ci = site_controls(fed, job, rounds, summed_rounds(state))
    n = {s: fed.agents[s].trainer.n_examples for s in seen}
    mean = sum(n[s] * ci[s] for s in seen) / sum(n.values())
    assert np.abs(c).max() > 1e-2  # live
    np.testing.assert_allclose(c, mean, atol=1e-6)
    for s in set(fed.agents) - set(seen):
        np.testing.assert_array_equal(ci[s], np.zeros(fed.dim))
    return c, ci


def test_a_site_left_out_after_training_once_weighs_its_examples(federation):
    """n = 10, 20, 30; the 30-example site refuses round 2 after training round 1: c
    moves by n_S/N = 30/60 of Δc̄ in round 2, not |S|/N = 2/3 (17% off)."""
    fed = federation(["a", "b", "c"])
    fed.agents["c"].trainer = RefusesRound("c", 30, {2})
    job = run(fed, scaffold_plan(rounds=3, secure="false"))
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    assert [r.survivors for r in st.rounds(job)] == [["a", "b", "c"], ["a", "b"],
                                                    ["a", "b", "c"]]
    w, c, ci = reference(fed, 3, absent={2: {"c"}})
    final = ck.load_checkpoint(ck.final_path(fed.coord.state_dir, job))
    np.testing.assert_allclose(final.weights, w, atol=1e-5)
    got, sites = assert_invariant(fed, job, 3, {"a", "b", "c"})
    np.testing.assert_allclose(got, c, atol=1e-5)
    for s in "abc":
        np.testing.assert_allclose(sites[s], ci[s], atol=1e-5)


class Deaf:
    """Makes ``site`` hear nothing from the first message ``start(body, round)`` picks
    until the first that ``stop(body, round)`` picks (which it hears): an appliance that
    lost its link and came back."""

    def __init__(self, agent, start, stop):
        self.agent, self.start, self.stop = agent, start, stop
        self.deaf = False
        self.missed: list[str] = []
        self.inner = agent.handle_frames
        agent.handle_frames = self.handle

    async def handle(self, frames):
        env = codec.decode(frames, max_bytes=1 << 30)
        body, rnd = env.body, env.header.round
        if not self.deaf and self.start(body, rnd):
            self.deaf = True
        elif self.deaf and self.stop(body, rnd):
            self.deaf = False
        if self.deaf:
            self.missed.append(type(body).__name__)
            return
        await self.inner(frames)


def test_a_site_gone_after_its_masked_input_gets_its_summed_dc_when_it_comes_back(federation):
    """Secure aggregation: d leaves when asked to unmask round 1, so its masked input is
    summed (and its Δc_i in c) but it never gets round 1's EvalTask. Back for round 2, it
    trains from c_i + Δc_i, and c stays the mean of the c_i."""
    fed = federation(["a", "b", "c", "d"])
    deaf = Deaf(fed.agents["d"], lambda body, rnd: isinstance(body, UnmaskRequest) and rnd == 1,
                lambda body, rnd: rnd == 2)
    job = run(fed, scaffold_plan(rounds=2, secure="true"))
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    assert [r.survivors for r in st.rounds(job)] == [["a", "b", "c", "d"]] * 2
    assert "EvalTask" in deaf.missed
    w, c, ci = reference(fed, 2)
    np.testing.assert_allclose(
        ck.load_checkpoint(ck.final_path(fed.coord.state_dir, job)).weights, w, atol=1e-5)
    got, sites = assert_invariant(fed, job, 2, set("abcd"))
    np.testing.assert_allclose(got, c, atol=1e-5)
    np.testing.assert_allclose(sites["d"], ci["d"], atol=1e-5)


def test_an_attempt_failed_after_its_eval_tasks_moves_no_c_i(federation):
    """Round 1's first attempt fails after its EvalTasks reached the sites; the retry
    goes without c (away), which is back for round 2. The Δc_i of the failed attempt
    is in nobody's c_i: c trains round 2 from c_i = 0, and c stays the mean over the
    sites its sums held."""
    fed = federation(["a", "b", "c"])
    state = {"failed": False, "trains": 0}

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(scaffold_plan(rounds=2, secure="false"), actor="test")
        for _ in range(3000):
            if fed.coord.store.job(job).status in ("completed", "failed"):
                return job
            await asyncio.sleep(0.001)
            fed.coord.tick()
            while fed.inbox:
                site, frames = fed.inbox.pop(0)
                fed.coord.handle_frames(site, frames)
            outbox, fed.coord.outbox = fed.coord.outbox, []
            evals = False
            for out in outbox:
                if out.site == "c" and isinstance(out.body, m.TrainTask):
                    state["trains"] += 1
                # c hears nothing of the retry (its second task) of round 1
                if out.site == "c" and out.round == 1 and state["failed"]:
                    continue
                evals |= isinstance(out.body, m.EvalTask)
                frames = [bytes(f) for f in codec.encode(out.body, sender="coordinator",
                                                         job=out.job, round=out.round)]
                await fed.agents[out.site].handle_frames(frames)
            if evals and not state["failed"]:
                state["failed"] = True
                assert fed.coord.fail_round_in_flight("injected after the EvalTasks")
            if not fed.inbox and not outbox:
                await asyncio.sleep(0.005)
                fed.clock.t += 0.5
        raise AssertionError("job did not end")

    job = asyncio.run(go())
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    rounds = st.rounds(job)
    # the failed attempt's sum had been formed (its EvalTasks left): its row keeps the
    # sum's survivors, a release each (report.client_privacy)
    assert [(r.round, r.status, r.survivors) for r in rounds] == [
        (1, "failed", ["a", "b", "c"]), (1, "committed", ["a", "b"]),
        (2, "committed", ["a", "b", "c"])]
    # c's round-1 update of the failed attempt was dropped at round 2's ControlCommit
    w, c, ci = reference(fed, 2, absent={1: {"c"}})
    np.testing.assert_allclose(
        ck.load_checkpoint(ck.final_path(fed.coord.state_dir, job)).weights, w, atol=1e-5)
    got, sites = assert_invariant(fed, job, 2, set("abc"))
    np.testing.assert_allclose(got, c, atol=1e-5)
    np.testing.assert_allclose(sites["c"], ci["c"], atol=1e-5)


def test_a_job_checkpointed_by_an_earlier_fedge_keeps_c_and_its_sites_c_i(federation, caplog):
    """A SCAFFOLD job two rounds in when the coordinator is upgraded from fedge < 0.2,
    whose round checkpoint holds c and no table of sites: the coordinator rebuilds the
    table from its database (n_i from the train metrics, the last committed round whose
    survivors hold each site), so c is not rescaled to 0, each site's ControlCommit names
    the last round that summed it (c sat round 2 out: 1), no site drops its c_i, and c
    stays Σ n_i·c_i / Σ n_i through round 3, as in a job never interrupted."""

    fed = federation(["a", "b", "c"])
    fed.agents["c"].trainer = RefusesRound("c", 30, {2})
    commits: dict[str, list[tuple[int, int]]] = {s: [] for s in fed.agents}
    for s, agent in fed.agents.items():
        inner = agent.handle_frames

        async def handle(frames, s=s, inner=inner):
            env = codec.decode(frames, max_bytes=1 << 30)
            if isinstance(env.body, m.ControlCommit):
                commits[s].append((env.header.round, env.body.summed_round))
            await inner(frames)
        agent.handle_frames = handle
    job = fed.coord.submit_job(scaffold_plan(rounds=3, secure="false"), actor="test")

    async def two_rounds():
        await fed.heartbeats()
        await fed.pump(until=lambda: fed.coord.store.job(job).committed_round == 2)
    asyncio.run(two_rounds())
    path = ck.round_path(fed.coord.state_dir, job, 2)
    head = ck.load_checkpoint(path)
    assert summed_rounds(head.strategy_state) == {"a": 2, "b": 2, "c": 1}
    c2 = head.strategy_state["c"]
    assert np.abs(c2).max() > 1e-2
    # what fedge 0.1 wrote: the weights and c, no table of sites
    ck.save_checkpoint(path, ck.Checkpoint(weights=head.weights, round=2, plan=head.plan,
                                           strategy_state={"c": c2}, metrics=head.metrics))
    fed.restart()
    for log in commits.values():
        log.clear()
    with caplog.at_level(logging.WARNING, logger="fedge.coordinator"):
        fed.coord.tick()  # resumes the job from round 2
        runner = fed.coord.runner
        assert runner is not None and runner.committed == 2
        np.testing.assert_array_equal(runner.strategy.state["c"], c2)
        assert runner.strategy.sites() == {"a": (10, 2), "b": (20, 2), "c": (30, 1)}

        async def rest():
            await fed.heartbeats()
            await fed.pump(until=lambda: fed.coord.store.job(job).status in
                           ("completed", "failed"))
        asyncio.run(rest())
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    rebuilt = [r.getMessage() for r in caplog.records if "earlier fedge" in r.getMessage()]
    assert len(rebuilt) == 1 and job in rebuilt[0]
    assert [json.loads(a["detail"])["sites"] for a in st.audit_log(
        action="scaffold_sites_rebuilt")] == [{"a": [10, 2], "b": [20, 2], "c": [30, 1]}]
    assert {s: log[:1] for s, log in commits.items()} == {"a": [(3, 2)], "b": [(3, 2)],
                                                          "c": [(3, 1)]}
    dropped = [r.getMessage() for r in caplog.records if "back to round" in r.getMessage()]
    assert dropped == []
    # as if never interrupted: the reference, and the invariant from the sites' own c_i
    w, c, ci = reference(fed, 3, absent={2: {"c"}})
    np.testing.assert_allclose(
        ck.load_checkpoint(ck.final_path(fed.coord.state_dir, job)).weights, w, atol=1e-5)
    got, sites = assert_invariant(fed, job, 3, set("abc"))
    np.testing.assert_allclose(got, c, atol=1e-5)
    for s in "abc":
        np.testing.assert_allclose(sites[s], ci[s], atol=1e-5)
