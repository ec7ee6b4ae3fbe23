"""SCAFFOLD (Karimireddy et al. 2020, option II) as a plan strategy: the server rule,
the plan checks, and whole in-memory federations against a numpy reference."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from test_federation_inproc import PLAN, run

from fedge.agent.trainer import SyntheticTrainer, TaskRefusal
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.plan import PlanError, StrategySettings, parse_plan
from fedge.coordinator.strategies import Strategy, StrategyError

LR = np.float32(0.3)  # train.learning_rate of the plans below
K = 3  # train.steps: SyntheticTrainer takes K gradient steps (with one, SCAFFOLD is FedAvg)


def local_plan(text):
    return text.replace("epochs = 1", f"steps = {K}").replace("learning_rate = 0.5",
                                                             f"learning_rate = {LR}")


def scaffold_plan(rounds=2, secure="true", eta=None):
    text = local_plan(PLAN.format(rounds=rounds, strategy="scaffold", secure=secure))
    if eta is not None:
        text = text.replace('name = "scaffold"', f'name = "scaffold"\nserver_learning_rate = {eta}')
    return text


# -- server rule ------------------------------------------------------------------------

def test_server_rule_keeps_c_the_example_weighted_mean_of_the_sites_c_i():
    """c is checked against the invariant itself, computed from the sites' c_i (as each
    moves by its own Δc_i when summed), not against the update rule restated: sites of
    10, 20 and 30 examples, the 30-example one left out of the second sum (n_S/N = 1/2,
    where |S|/N = 2/3 would give c 17% off) and a site seen only in the third round."""
    rng = np.random.default_rng(3)
    d = 6
    x0 = rng.normal(size=d).astype(np.float32)
    n = {"a": 10, "b": 20, "c": 30, "late": 40}
    rounds = [  # (sites that trained, those whose update was summed)
        ({"a", "b", "c"}, {"a", "b", "c"}),
        ({"a", "b", "c"}, {"a", "b"}),  # c trained, then dropped out of the sum
        ({"a", "c", "late"}, {"a", "c", "late"}),
    ]
    s = Strategy(StrategySettings("scaffold", {"server_learning_rate": 0.7}))
    np.testing.assert_array_equal(s.server_control(d), np.zeros(d, np.float32))
    x, ci, seen = x0, {}, set()
    expect_x = x0.astype(np.float64)
    for r, (trained, summed) in enumerate(rounds, 1):
        dy = rng.normal(size=d)
        dcs = {site: rng.normal(size=d) for site in summed}
        mean_dc = sum(n[t] * dcs[t] for t in summed) / sum(n[t] for t in summed)
        before = s.state.get("c", np.zeros(d)).copy()
        x = s.step(x, dy, mean_control=mean_dc, examples={t: n[t] for t in trained},
                   survivors=sorted(summed), round=r)
        for t in summed:
            ci[t] = ci.get(t, np.zeros(d)) + dcs[t]
        seen |= trained
        expect_x = (expect_x + 0.7 * dy).astype(np.float32).astype(np.float64)
        invariant = sum(n[t] * ci.get(t, np.zeros(d)) for t in seen) / sum(n[t] for t in seen)
        np.testing.assert_allclose(x, expect_x, rtol=1e-6)
        np.testing.assert_allclose(s.state["c"], invariant, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(s.server_control(d), s.state["c"].astype(np.float32))
        if r == 2:  # c + (|S|/N)·Δc̄ would miss the invariant by far
            unweighted = before + len(summed) / len(seen) * mean_dc
            assert np.abs(unweighted - invariant).max() > 0.1 * np.abs(invariant).max()
    # each site's last summed round, for its ControlCommit
    assert s.sites() == {"a": (10, 3), "b": (20, 2), "c": (30, 3), "late": (40, 3)}
    assert [s.summed_round(t) for t in ("a", "b", "c", "late", "never")] == [3, 2, 3, 3, 0]


def test_server_rule_without_site_counts_is_full_participation():
    s = Strategy(StrategySettings("scaffold", {}))
    x = np.zeros(3, np.float32)
    s.step(x, np.ones(3), mean_control=np.full(3, 0.5))
    s.step(x, np.ones(3), mean_control=np.full(3, 0.25))
    np.testing.assert_array_equal(s.state["c"], np.full(3, 0.75))
    assert s.sites() == {}


def test_server_rule_refuses_inconsistent_inputs():
    x = np.zeros(3, np.float32)
    scaffold = Strategy(StrategySettings("scaffold", {}))
    with pytest.raises(StrategyError, match="scaffold needs mean control"):
        scaffold.step(x, np.ones(3))
    with pytest.raises(StrategyError, match=r"control update shape \(2,\)"):
        scaffold.step(x, np.ones(3), mean_control=np.ones(2))
    with pytest.raises(StrategyError, match="NaN"):
        scaffold.step(x, np.ones(3), mean_control=np.array([0.0, np.nan, 0.0]))
    with pytest.raises(StrategyError, match=r"survivors \['b'\] have no example count"):
        scaffold.step(x, np.ones(3), mean_control=np.ones(3), examples={"a": 1},
                      survivors=["a", "b"], round=1)
    with pytest.raises(StrategyError, match=r"example counts \{'a': 0\}"):
        scaffold.step(x, np.ones(3), mean_control=np.ones(3), examples={"a": 0},
                      survivors=["a"], round=1)
    with pytest.raises(StrategyError, match="no survivor"):
        scaffold.step(x, np.ones(3), mean_control=np.ones(3), examples={"a": 1}, round=1)
    with pytest.raises(StrategyError, match="round 0 is not"):
        scaffold.step(x, np.ones(3), mean_control=np.ones(3), examples={"a": 1},
                      survivors=["a"], round=0)
    assert scaffold.state == {}  # nothing moved on a refused step
    with pytest.raises(StrategyError, match="fedavg takes no mean control"):
        Strategy(StrategySettings("fedavg", {})).step(x, np.ones(3), mean_control=np.ones(3))
    with pytest.raises(StrategyError, match=r"state 'c' has shape \(3,\), expected \(4,\)"):
        Strategy(StrategySettings("scaffold", {}), {"c": np.zeros(3)}).server_control(4)


# -- plan --------------------------------------------------------------------------------

def test_scaffold_plan_parses_with_default_server_learning_rate():
    p = parse_plan(scaffold_plan())
    assert p.scaffold and p.strategy.get("server_learning_rate") == 1.0
    assert parse_plan(scaffold_plan(eta=0.3)).strategy.get("server_learning_rate") == 0.3
    assert not parse_plan(PLAN.format(rounds=1, strategy="fedavg", secure="true")).scaffold


@pytest.mark.parametrize("old,new,field,rule", [
    ('name = "scaffold"', 'name = "scaffold"\nmu = 0.1', "strategy.mu",
     "not a parameter of scaffold"),
    ("batch_size = 1", 'batch_size = 1\noptimizer = "adam"', "train.optimizer",
     "needs plain sgd"),
    ("batch_size = 1", "batch_size = 1\nmomentum = 0.9", "train.momentum",
     "needs momentum = 0"),
    ("[deadlines]", "[privacy]\nclient_dp = { noise_multiplier = 1.0, clip = 1.0 }\n[deadlines]",
     "privacy.client_dp", "not supported with strategy scaffold"),
    ("[deadlines]", "[privacy]\ndp = { noise_multiplier = 1.0, max_grad_norm = 1.0 }\n"
     "[deadlines]", "privacy.dp", "not supported with strategy scaffold"),
])
def test_scaffold_plan_refuses_what_its_control_variates_do_not_hold_for(old, new, field, rule):
    with pytest.raises(PlanError, match=rule) as err:
        parse_plan(scaffold_plan().replace(old, new))
    assert err.value.field == field


# -- whole federations ------------------------------------------------------------------

def reference(fed, rounds, *, eta=1.0, absent=None):
    """SCAFFOLD written out directly: each site K corrected gradient steps on
    ½‖w − target‖² (SyntheticTrainer), c_i⁺ = c_i − c + (w − y_i)/(K·lr), clipped
    example-weighted means, w ← w + η·Δȳ, and c the paper's invariant, computed from
    the sites' c_i: c = Σ n_i·c_i / Σ n_i over every site that has trained (the
    others hold c_i = 0 and no known n_i)."""
    sites = sorted(fed.agents)
    d = fed.dim
    w = np.zeros(d, np.float32)
    c = np.zeros(d)
    ci = {s: np.zeros(d, np.float32) for s in sites}
    seen: set[str] = set()
    for r in range(1, rounds + 1):
        part = [s for s in sites if s not in (absent or {}).get(r, ())]
        seen |= set(part)
        c32 = c.astype(np.float32)
        dys, dcs, ns = [], [], []
        for s in part:
            target = fed.agents[s].trainer.target(d)
            y = w
            for _ in range(K):
                y = (y - LR * ((y - target) - ci[s] + c32)).astype(np.float32)
            new_ci = ci[s] - c32 + (w - y) / (K * LR)
            dys.append(np.clip(y.astype(np.float64) - w, -1, 1))
            dcs.append(np.clip((new_ci - ci[s]).astype(np.float64), -1, 1))
            ns.append(fed.agents[s].trainer.n_examples)
            ci[s] = (ci[s] + dcs[-1]).astype(np.float32)  # c_i moves by what was summed
        mean_dy = sum(n * u for n, u in zip(ns, dys, strict=True)) / sum(ns)
        w = (w.astype(np.float64) + eta * mean_dy).astype(np.float32)
        n = {s: fed.agents[s].trainer.n_examples for s in seen}
        c = sum(n[s] * ci[s].astype(np.float64) for s in seen) / sum(n.values())
    return w, c, ci


@pytest.mark.parametrize("secure", ["true", "false"])
def test_three_rounds_three_sites_match_the_reference(federation, secure):
    fed = federation(["a", "b", "c"])
    job = run(fed, scaffold_plan(rounds=3, secure=secure, eta=0.8))
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    final = ck.load_checkpoint(ck.final_path(fed.coord.state_dir, job))
    w, c, ci = reference(fed, 3, eta=0.8)
    np.testing.assert_allclose(final.weights, w, atol=1e-5)
    # c is checkpointed with the last round's weights (final.safetensors: weights only)
    last = ck.load_checkpoint(ck.round_path(fed.coord.state_dir, job, 3))
    assert last.weights.tobytes() == final.weights.tobytes() and final.strategy_state == {}
    np.testing.assert_allclose(last.strategy_state["c"], c, atol=1e-5)
    for s, agent in fed.agents.items():
        # each agent holds c_i as committed rounds moved it, and the last round's Δc_i
        # pending: no ControlCommit follows the last round
        at, dc = agent.pending_control(job)
        assert at == 3
        np.testing.assert_allclose(agent.client_control(job, 4) + dc, ci[s], atol=1e-6)
    # the control variates are live (every f_i here has Hessian I, so the corrections
    # cancel in the mean and the global iterate equals FedAvg's: the weights alone
    # would not tell SCAFFOLD's wiring from FedAvg's, c and c_i do)
    assert np.abs(c).max() > 1e-2 and min(np.abs(v).max() for v in ci.values()) > 1e-2


class RefusesRound(SyntheticTrainer):
    """A site that cannot train in the given rounds (so it sits them out)."""

    def __init__(self, site, n_examples, rounds):
        super().__init__(site, n_examples=n_examples)
        self.rounds = rounds

    def train(self, site, job, plan, weights, *, round, seed, **kw):
        if round in self.rounds:
            raise TaskRefusal(f"{site} sits out round {round}")
        return super().train(site, job, plan, weights, round=round, seed=seed, **kw)


def test_site_sitting_out_the_first_round_joins_the_mean_when_it_first_trains(federation):
    fed = federation(["a", "b", "c"])
    fed.agents["c"].trainer = RefusesRound("c", 30, {1})
    job = run(fed, scaffold_plan(rounds=2, secure="false"))
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    assert [r.survivors for r in st.rounds(job)] == [["a", "b"], ["a", "b", "c"]]
    final = ck.load_checkpoint(ck.final_path(fed.coord.state_dir, job))
    w, c, _ = reference(fed, 2, absent={1: {"c"}})
    np.testing.assert_allclose(final.weights, w, atol=1e-6)
    last = ck.load_checkpoint(ck.round_path(fed.coord.state_dir, job, 2))
    np.testing.assert_allclose(last.strategy_state["c"], c, atol=1e-6)
    # the same numbers with full participation in round 1 are not these
    w_full, _, _ = reference(fed, 2)
    assert np.abs(w_full - w).max() > 1e-3


@pytest.mark.parametrize("phase", ["aggregating", "evaluating"])
def test_coordinator_replaced_mid_round_resumes_scaffold_bit_for_bit(federation, phase):
    from fedge.coordinator.rounds import Phase
    from fedge.coordinator.service import Coordinator

    reference_fed = federation(["a", "b", "c"])
    ref_job = run(reference_fed, scaffold_plan(rounds=3))
    ref = ck.load_checkpoint(ck.round_path(reference_fed.coord.state_dir, ref_job, 3))

    fed = federation(["a", "b", "c"])

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(scaffold_plan(rounds=3), actor="test")

        def in_round_2():
            r = fed.coord.runner
            return r is not None and r.round is not None and r.round.round == 2 \
                and r.round.phase is Phase(phase)
        await fed.pump(until=in_round_2)
        old = fed.coord
        fed.inbox.clear()
        fed.coord = Coordinator(old.state_dir, roster=old.roster,
                                roster_public_key=old.roster_public_key,
                                heartbeat_timeout_s=30.0, initial_weights=old.initial_weights,
                                clock=fed.clock)
        old.close()
        await fed.heartbeats()
        await fed.pump(until=lambda: fed.coord.store.job(job).status == "completed")
        return job

    job = asyncio.run(go())
    final = ck.load_checkpoint(ck.final_path(fed.coord.state_dir, job))
    last = ck.load_checkpoint(ck.round_path(fed.coord.state_dir, job, 3))
    assert final.weights.tobytes() == last.weights.tobytes() == ref.weights.tobytes()
    assert last.strategy_state["c"].tobytes() == ref.strategy_state["c"].tobytes()
