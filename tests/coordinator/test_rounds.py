"""The round state machine, driven by hand: no sockets, no clock, no files."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.coordinator.plan import parse_plan
from fedge.coordinator.rounds import (
    TRANSITIONS,
    Phase,
    Round,
    derive_seed,
    train_seed,
    weight_scale,
)
from fedge.coordinator.strategies import Strategy
from fedge.wire import messages as m

PLAN = """
[job]
dataset = "toy"
rounds = 2
min_clients = 2
seed = 3
[model]
name = "linear"
[train]
epochs = 1
batch_size = 4
learning_rate = 0.1
[strategy]
name = "fedavg"
[secagg]
enabled = false
clip = 2.0
[deadlines]
cohort_s = 5
train_s = 10
secagg_stage_s = 10
eval_s = 10
"""

W0 = np.array([0.5, -1.0, 2.0], dtype=np.float32)


def new_round(plan_text=PLAN, t=0.0):
    plan = parse_plan(plan_text)
    return Round("job1", 1, plan, W0, Strategy(plan.strategy), started_at=t)


def by_type(out, cls):
    return [(s, b) for s, b in out if isinstance(b, cls)]


def send_plain(rnd, sends, deltas, counts, now=1.0):
    """Answer AggregateBegin the way an agent does: concat(w_i*delta_i, [w_i])."""
    out = []
    for site, begin in by_type(sends, m.AggregateBegin):
        w = begin.weight_scale * counts[site]
        vec = np.concatenate([w * deltas[site], [w]]).astype(np.float32)
        out += rnd.receive(site, m.PlainUpdate(rnd.task_id, vec), now)
    return out


def test_transition_table_covers_every_phase():
    assert set(TRANSITIONS) == set(Phase)
    assert TRANSITIONS[Phase.DONE] == {} and TRANSITIONS[Phase.FAILED] == {}


def test_seeds_depend_on_job_round_site_only():
    assert derive_seed(1, 2, "a", "quantise") == derive_seed(1, 2, "a", "quantise")
    assert len({derive_seed(1, 2, "a", "q"), derive_seed(1, 3, "a", "q"),
                derive_seed(1, 2, "b", "q"), derive_seed(2, 2, "a", "q")}) == 4
    assert 0 <= train_seed(1, 2, "a") < 2**63


def test_full_round_weighted_average_and_eval():
    rnd = new_round()
    out = rnd.offer(["b", "a", "c"], now=0.0)
    tasks = by_type(out, m.TrainTask)
    assert [s for s, _ in tasks] == ["a", "b", "c"] and rnd.phase is Phase.TRAINING
    assert tasks[0][1].train_seed == train_seed(3, 1, "a")
    assert tasks[0][1].quant_seed == derive_seed(3, 1, "a", "quantise")
    counts = {"a": 10, "b": 30, "c": 20}
    deltas = {s: np.full(3, i + 1.0) * 0.1 for i, s in enumerate("abc")}
    sends = []
    for s in "abc":
        sends += rnd.receive(s, m.TrainDone(rnd.task_id, counts[s], {"loss": 1.0},
                                            epsilon=0.5 if s == "a" else 0.0), 1.0)
    assert rnd.phase is Phase.AGGREGATING
    begins = by_type(sends, m.AggregateBegin)
    assert begins[0][1].weight_scale == pytest.approx(weight_scale(2.0, 30)) == 1 / 30
    evals = send_plain(rnd, sends, deltas, counts)
    assert rnd.phase is Phase.EVALUATING
    expect = W0 + sum(counts[s] * deltas[s] for s in "abc") / 60
    np.testing.assert_allclose(rnd.new_weights, expect, rtol=1e-6)
    assert [s for s, _ in by_type(evals, m.EvalTask)] == ["a", "b", "c"]
    for s in "abc":
        rnd.receive(s, m.EvalResult(rnd.task_id, 5, {"cindex": 0.5 + 0.1 * "abc".index(s)}), 2.0)
    assert rnd.phase is Phase.DONE
    rows = rnd.metric_rows()
    assert ("*", "test", "cindex", pytest.approx(0.6), 15) in rows
    assert ("b", "train", "loss", 1.0, 30) in rows
    # each DP site's privacy spend is recorded per round; sites without DP spend nothing
    assert [r for r in rows if r[1] == "privacy"] == [("a", "privacy", "epsilon_job", 0.5, 10)]


def test_cohort_below_min_waits_then_fails_without_touching_model():
    rnd = new_round()
    assert rnd.offer(["a"], now=1.0) == []
    assert rnd.phase is Phase.WAITING_COHORT
    rnd.offer(["a"], now=5.0)
    assert rnd.phase is Phase.FAILED
    assert "below min_clients 2" in rnd.failure
    assert rnd.new_weights is None
    np.testing.assert_array_equal(rnd.weights, W0)


def test_cohort_arriving_before_deadline_starts_round():
    rnd = new_round()
    rnd.offer(["a"], now=1.0)
    out = rnd.offer(["a", "b"], now=2.0)
    assert len(by_type(out, m.TrainTask)) == 2


def test_refusals_and_train_deadline():
    rnd = new_round()
    rnd.offer(["a", "b", "c"], 0.0)
    rnd.receive("a", m.TaskRefused(rnd.task_id, "train", "dataset toy not held"), 1.0)
    rnd.receive("b", m.TrainDone(rnd.task_id, 5), 1.0)
    assert rnd.phase is Phase.TRAINING
    out = rnd.tick(10.0)  # c never answers
    assert rnd.phase is Phase.FAILED
    assert "1 of 3 sites trained" in rnd.failure and "dataset toy not held" in rnd.failure
    assert {s for s, _ in by_type(out, m.RoundAbort)} == {"a", "b", "c"}


def test_lost_connection_during_training_proceeds_with_the_rest():
    rnd = new_round()
    rnd.offer(["a", "b", "c"], 0.0)
    rnd.receive("a", m.TrainDone(rnd.task_id, 5), 1.0)
    rnd.receive("b", m.TrainDone(rnd.task_id, 5), 1.0)
    out = rnd.lost("c", 2.0)
    assert rnd.phase is Phase.AGGREGATING
    assert [s for s, _ in by_type(out, m.AggregateBegin)] == ["a", "b"]
    assert [s for s, _ in by_type(out, m.RoundAbort)] == ["c"]
    send_plain(rnd, out, {"a": np.ones(3), "b": np.ones(3)}, {"a": 5, "b": 5})
    rnd.tick(30.0)
    assert rnd.phase is Phase.DONE
    assert rnd.dropped == ["c"] and rnd.survivors == ["a", "b"]
    # when, and how big the model was: a link too slow for the model drops every round
    # at the same point, which "connection lost" alone does not tell IT
    assert rnd.dropped_reasons()["c"] == (
        f"connection lost during training, 2 s after its TrainTask "
        f"({rnd.weights.nbytes / 1e6:.1f} MB of weights) was sent")


def test_outsiders_duplicates_and_wrong_phase_are_rejected_and_round_goes_on():
    rnd = new_round()
    rnd.offer(["a", "b"], 0.0)
    assert by_type(rnd.receive("x", m.TrainDone(rnd.task_id, 5), 1.0), m.Rejected)
    rnd.receive("a", m.TrainDone(rnd.task_id, 5), 1.0)
    assert by_type(rnd.receive("a", m.TrainDone(rnd.task_id, 7), 1.0), m.Rejected)
    assert by_type(rnd.receive("a", m.EvalResult(rnd.task_id, 1, {}), 1.0), m.Rejected)
    # a zero count cannot even be built (nor decoded): the site refuses instead
    with pytest.raises(ValueError, match="n_examples 0 is not in 1"):
        m.TrainDone(rnd.task_id, 0)
    assert rnd.receive("b", m.TaskRefused(rnd.task_id, "train", "no examples"), 1.0) == [
        ("a", m.RoundAbort("1 of 2 sites trained, below min_clients 2 (b: no examples)")),
        ("b", m.RoundAbort("1 of 2 sites trained, below min_clients 2 (b: no examples)"))]
    assert [r[0] for r in rnd.rejected] == ["x", "a", "a"]
    assert rnd.phase is Phase.FAILED  # b's refusal leaves 1 < min_clients


def test_training_waits_for_an_honest_site_when_another_refuses_after_training():
    """A site that sends TrainDone and then TaskRefused counts once, as trained: its
    refusal is rejected as a duplicate answer, and training goes on until the honest
    site still at work answers (counted twice, it ended training without it)."""
    rnd = new_round()  # min_clients 2 of 3
    rnd.offer(["a", "b", "honest"], 0.0)
    rnd.receive("a", m.TrainDone(rnd.task_id, 10), 1.0)
    out = rnd.receive("a", m.TaskRefused(rnd.task_id, "train", "changed my mind"), 1.1)
    assert [type(b) for _, b in out] == [m.Rejected] and "train result stands" in out[0][1].reason
    assert rnd.receive("b", m.TrainDone(rnd.task_id, 10), 1.2) == []
    assert rnd.phase is Phase.TRAINING  # honest has not answered yet
    out = rnd.receive("honest", m.TrainDone(rnd.task_id, 10), 5.0)
    assert rnd.phase is Phase.AGGREGATING
    assert [s for s, _ in by_type(out, m.AggregateBegin)] == ["a", "b", "honest"]


def test_a_refusal_after_training_does_not_fail_a_round_of_two():
    rnd = new_round()
    rnd.offer(["a", "honest"], 0.0)
    rnd.receive("a", m.TrainDone(rnd.task_id, 10), 1.0)
    rnd.receive("a", m.TaskRefused(rnd.task_id, "train", "x"), 1.1)
    assert rnd.phase is Phase.TRAINING and not rnd.failure
    rnd.receive("honest", m.TrainDone(rnd.task_id, 10), 2.0)
    assert rnd.phase is Phase.AGGREGATING


def test_a_refusal_reason_of_any_length_is_cut_before_it_reaches_the_round_failure():
    """Each site's TaskRefused.reason is joined into the failure that every cohort site is
    sent as RoundAbort (1 MiB limit): three sites refusing with 900 KB each must not make
    that message unsendable."""
    from fedge.wire import codec

    rnd = new_round(PLAN.replace("min_clients = 2", "min_clients = 3"))
    rnd.offer(["a", "b", "c"], 0.0)
    out = []
    for s in ("a", "b", "c"):
        out += rnd.receive(s, m.TaskRefused(rnd.task_id, "train", "\x00" * 900_000), 1.0)
    assert rnd.phase is Phase.FAILED and len(rnd.failure) <= m.MAX_REASON_CHARS
    for _site, body in out:
        codec.encode(body, sender="coordinator")  # raised OversizeMessage before


def test_a_task_id_of_any_length_is_quoted_short_in_the_rejection():
    from fedge.wire import codec

    rnd = new_round()
    rnd.offer(["a", "b"], 0.0)
    [(_, rejected)] = rnd.receive("a", m.TrainDone("\x00" * 300_000, 5), 1.0)
    assert len(rejected.reason) < 300
    codec.encode(rejected, sender="coordinator")


def test_bad_plain_update_shape_is_rejected():
    rnd = new_round()
    rnd.offer(["a", "b"], 0.0)
    rnd.receive("a", m.TrainDone(rnd.task_id, 5), 1.0)
    rnd.receive("b", m.TrainDone(rnd.task_id, 5), 1.0)
    out = rnd.receive("a", m.PlainUpdate(rnd.task_id, np.zeros(2, np.float32)), 1.0)
    assert by_type(out, m.Rejected)
    assert rnd.phase is Phase.AGGREGATING


def test_abort_tells_the_cohort():
    rnd = new_round()
    rnd.offer(["a", "b"], 0.0)
    out = rnd.abort("job cancelled")
    assert rnd.phase is Phase.FAILED and len(by_type(out, m.RoundAbort)) == 2
    assert rnd.abort("again") == []


def test_reply_to_an_abandoned_attempt_is_stale():
    old = new_round()
    rnd = new_round()
    rnd.offer(["a", "b"], 0.0)
    out = rnd.receive("a", m.TaskRefused(old.task_id, "train", "late refusal"), 1.0)
    assert by_type(out, m.Rejected) and "not the current attempt" in rnd.rejected[0][1]
    assert rnd.refused == {}


@pytest.mark.parametrize("metrics, epsilon, why", [
    ({"loss": float("nan")}, 0.0, "loss = nan is not a finite number"),
    ({"loss": float("inf")}, 0.0, "loss = inf is not a finite number"),
    ({"bad name!": 1.0}, 0.0, "metric name 'bad name!'"),
    ({f"m{i}": 1.0 for i in range(65)}, 0.0, "65 metrics"),
    ({"loss": 1.0}, float("nan"), "epsilon = nan"),
    ({"loss": 1.0}, -1.0, "epsilon = -1.0"),
])
def test_train_result_with_unstorable_metrics_is_refused_and_the_round_goes_on(
        metrics, epsilon, why):
    rnd = new_round()
    rnd.offer(["a", "b", "c"], 0.0)
    out = rnd.receive("c", m.TrainDone(rnd.task_id, 5, metrics, epsilon=epsilon), 1.0)
    assert [s for s, _ in by_type(out, m.Rejected)] == ["c"]
    assert why in by_type(out, m.Rejected)[0][1].reason and why in rnd.refused["c"]
    rnd.receive("a", m.TrainDone(rnd.task_id, 5, {"loss": 1.0}), 1.0)
    out = rnd.receive("b", m.TrainDone(rnd.task_id, 5, {"loss": 2.0}), 1.0)
    assert rnd.phase is Phase.AGGREGATING  # with a and b; c is not aggregated
    assert [s for s, _ in by_type(out, m.AggregateBegin)] == ["a", "b"]


def test_an_unbounded_epsilon_is_taken_with_its_update_not_refused():
    """A site whose accountant calls its spend unbounded (+inf: noise too small to bound
    anything) has already charged the run: its update is aggregated, its ε kept as
    it is; -inf or NaN is still refused."""
    rnd = new_round()
    rnd.offer(["a", "b", "c"], 0.0)
    inf = float("inf")
    out = rnd.receive("a", m.TrainDone(rnd.task_id, 5, {"loss": 1.0, "epsilon": inf},
                                       epsilon=inf), 1.0)
    assert not by_type(out, m.Rejected) and "a" not in rnd.refused
    out = rnd.receive("c", m.TrainDone(rnd.task_id, 5, {"epsilon_round": -inf}), 1.0)
    assert "epsilon_round = -inf is not a finite number" in rnd.refused["c"]
    out = rnd.receive("b", m.TrainDone(rnd.task_id, 5, {"loss": 2.0}), 1.0)
    assert rnd.phase is Phase.AGGREGATING
    assert [s for s, _ in by_type(out, m.AggregateBegin)] == ["a", "b"]


def test_eval_result_with_nan_is_refused_and_not_stored():
    rnd = new_round()
    rnd.offer(["a", "b"], 0.0)
    sends = []
    for s in "ab":
        sends += rnd.receive(s, m.TrainDone(rnd.task_id, 5), 1.0)
    send_plain(rnd, sends, {"a": np.ones(3), "b": np.ones(3)}, {"a": 5, "b": 5})
    assert rnd.phase is Phase.EVALUATING
    out = rnd.receive("a", m.EvalResult(rnd.task_id, 5, {"cindex": float("nan")}), 2.0)
    assert "cindex = nan" in by_type(out, m.Rejected)[0][1].reason
    rnd.receive("b", m.EvalResult(rnd.task_id, 5, {"cindex": 0.7}), 2.0)
    assert rnd.phase is Phase.DONE
    rows = [r for r in rnd.metric_rows() if r[1] == "test"]
    assert ("a", "test", "cindex") not in {r[:3] for r in rows}
    assert ("*", "test", "cindex", pytest.approx(0.7), 5) in rows


def test_a_site_dropped_before_aggregation_neither_ends_nor_joins_the_evaluation():
    """c was lost while training; the driver calls lost("c") on every tick. Evaluation
    still waits for both survivors, and nothing from c takes a survivor's place."""
    rnd = new_round()
    rnd.offer(["a", "b", "c"], 0.0)
    rnd.lost("c", 0.5)
    sends = []
    for s in "ab":
        sends += rnd.receive(s, m.TrainDone(rnd.task_id, 5 * (s == "a") + 15 * (s == "b")),
                             1.0)
    send_plain(rnd, sends, {"a": np.ones(3), "b": np.ones(3)}, {"a": 5, "b": 15})
    assert rnd.phase is Phase.EVALUATING and rnd.survivors == ["a", "b"]
    rnd.lost("c", 1.5)
    out = rnd.receive("c", m.EvalResult(rnd.task_id, 100, {"cindex": 0.0}), 1.5)
    assert "not in the evaluation cohort" in by_type(out, m.Rejected)[0][1].reason
    assert rnd.receive("c", m.TaskRefused(rnd.task_id, "eval", "gone"), 1.5) == []
    rnd.receive("a", m.EvalResult(rnd.task_id, 5, {"cindex": 0.5}), 2.0)
    assert rnd.phase is Phase.EVALUATING  # b has not answered yet
    rnd.receive("b", m.EvalResult(rnd.task_id, 15, {"cindex": 0.9}), 2.0)
    assert rnd.phase is Phase.DONE and sorted(rnd.evals) == ["a", "b"]
    assert ("*", "test", "cindex", pytest.approx(0.8), 20) in rnd.metric_rows()


class _ScriptedAggregation:
    """An aggregation that sends what the test scripts, when the test says."""

    def __init__(self):
        self.pending = []
        self.refusals = []

    def start(self, now):
        return []

    def receive(self, sender, body, now):
        out, self.pending = self.pending, []
        return out

    def tick(self, now):
        out, self.pending = self.pending, []
        return out

    def postpone(self, seconds):
        pass

    @property
    def left_out(self):
        return {}

    threshold = 2

    def refused(self, sender, now):
        self.refusals.append(sender)
        return []

    result = None
    failure = None


def _aggregating(pinned=None, sites=("a", "b", "c")):
    agg = _ScriptedAggregation()
    plan = parse_plan(PLAN)
    rnd = Round("job1", 2, plan, W0, Strategy(plan.strategy), started_at=0.0,
                aggregation_factory=lambda *a: agg, pinned_cohort=pinned)
    rnd.offer(list(sites), 0.0)
    for s in rnd.cohort:
        rnd.receive(s, m.TrainDone(rnd.task_id, 10), 0.5)
    assert rnd.phase is Phase.AGGREGATING
    return rnd, agg


def _secagg(kind, survivors):
    from fedge.secagg.messages import ConsistencyRequest, UnmaskRequest

    if kind == "consistency":
        return ConsistencyRequest(job_id="job1", round=2, survivors=survivors)
    return UnmaskRequest(job_id="job1", round=2, survivors=survivors, dropped=[],
                         signatures={})


@pytest.mark.parametrize("kind", ["consistency", "unmask"])
def test_a_pinned_round_never_asks_for_a_sum_over_other_survivors(kind):
    """Round 2 was unmasked over a, b, c before; c drops out of this attempt's secure
    aggregation. Asking a and b to sign or unmask a sum over {a, b} would give the
    coordinator c's update as the difference of the two sums: the attempt fails
    instead, and none of those requests goes out."""
    rnd, agg = _aggregating(pinned=["a", "b", "c"])
    agg.pending = [(s, _secagg(kind, ["a", "b"])) for s in ("a", "b")]
    out = rnd.tick(1.0)
    assert rnd.phase is Phase.FAILED
    assert not [b for _, b in out if type(b).__name__.endswith("Request")]
    assert {s for s, b in out if isinstance(b, m.RoundAbort)} == {"a", "b", "c"}
    assert "round 2's update was already unmasked over ['a', 'b', 'c']" in rnd.failure
    assert "c dropped out of secure aggregation" in rnd.failure


def test_unmask_requests_wait_until_their_survivor_set_is_recorded():
    """The driver must make the survivor set durable before any site is asked to
    reveal: the round holds the requests (unmask_pending) until unmask_recorded()."""
    rnd, agg = _aggregating()
    agg.pending = [(s, _secagg("unmask", ["a", "b", "c"])) for s in ("a", "b", "c")]
    assert rnd.tick(1.0) == []
    assert rnd.unmask_pending == ["a", "b", "c"]
    rnd.unmask_not_recorded("database locked")
    assert rnd.unmask_pending == ["a", "b", "c"]
    released = rnd.unmask_recorded()
    assert [s for s, _ in released] == ["a", "b", "c"] and rnd.unmask_pending is None
    agg.pending = [("a", _secagg("unmask", ["a", "b", "c"]))]  # later ones go at once
    assert len(rnd.tick(1.5)) == 1


def test_a_pinned_round_starts_with_exactly_its_survivors_whatever_else_is_there():
    """Pinned to a, b: a, b, c, d connected start it with a and b alone; a and c (two,
    min_clients) do not start it at all."""
    plan = parse_plan(PLAN)
    rnd = Round("job1", 2, plan, W0, Strategy(plan.strategy), started_at=0.0,
                pinned_cohort=["b", "a"])
    assert rnd.offer(["a", "c"], 0.0, why="b (not connected)") == []
    assert rnd.phase is Phase.WAITING_COHORT
    assert rnd.waiting_for.endswith("; waiting for b (not connected)")
    out = rnd.offer(["a", "b", "c", "d"], 1.0)
    assert rnd.cohort == ["a", "b"]
    assert sorted(s for s, _ in by_type(out, m.TrainTask)) == ["a", "b"]


def test_a_pinned_round_fails_as_soon_as_a_site_of_its_survivors_will_not_train():
    plan = parse_plan(PLAN)
    rnd = Round("job1", 2, plan, W0, Strategy(plan.strategy), started_at=0.0,
                pinned_cohort=["a", "b", "c"])
    rnd.offer(["a", "b", "c"], 0.0)
    rnd.receive("a", m.TrainDone(rnd.task_id, 10), 0.5)
    rnd.receive("c", m.TaskRefused(rnd.task_id, "train", "disk full"), 0.6)
    assert rnd.phase is Phase.FAILED  # b need not be waited for
    assert "without c it cannot be summed again (c: disk full)" in rnd.failure


def test_a_refusal_during_aggregation_is_passed_to_the_aggregation_at_once():
    rnd, agg = _aggregating()
    rnd.receive("b", m.TaskRefused(rnd.task_id, "aggregate", "SecAggAbort: no"), 1.0)
    assert agg.refusals == ["b"] and rnd.refused["b"] == "SecAggAbort: no"


# -- why sites are left out, in their own words ------------------------------------

REMEDY = "a job re-run over other sites needs another seed"


def _train(rnd, sites, now=1.0, counts=None):
    out = []
    for s in sites:
        out += rnd.receive(s, m.TrainDone(rnd.task_id, (counts or {}).get(s, 10),
                                          {"loss": 1.0}), now)
    return out


def test_a_long_refusal_keeps_its_start_and_the_remedy_at_its_end():
    from fedge.coordinator.rounds import PEER_REASON_CHARS

    rnd = new_round(PLAN.replace("min_clients = 2", "min_clients = 3"))
    rnd.offer(["a", "b", "c"], 0.0)
    why = "UpdateAlreadySummed: this update was revealed over " + "x" * 400 + "; " + REMEDY
    rnd.receive("c", m.TaskRefused(rnd.task_id, "train", why), 1.0)
    kept = rnd.refused["c"]
    assert len(kept) <= PEER_REASON_CHARS < len(why)
    assert kept.startswith("UpdateAlreadySummed: this update") and kept.endswith(REMEDY)
    _train(rnd, "ab")
    assert rnd.phase is Phase.FAILED and REMEDY in rnd.failure


def test_an_aggregation_failure_names_the_sites_that_refused_to_train_too():
    rnd = new_round()
    rnd.offer(["a", "b", "c"], 0.0)
    rnd.receive("c", m.TaskRefused(rnd.task_id, "train", "column 'sbp': missing column"), 1.0)
    _train(rnd, "ab")
    assert rnd.phase is Phase.AGGREGATING
    for s in "ab":
        rnd.receive(s, m.TaskRefused(rnd.task_id, "aggregate", f"{s} gave up"), 2.0)
    assert rnd.phase is Phase.FAILED
    assert "a: a gave up; b: b gave up" in rnd.failure
    assert "had refused to train: c: column 'sbp': missing column" in rnd.failure
    assert rnd.dropped_reasons() == {"a": "a gave up", "b": "b gave up",
                                     "c": "column 'sbp': missing column"}


def test_a_committed_rounds_dropped_sites_each_have_a_reason():
    rnd = new_round(PLAN.replace("min_clients = 2", "min_clients = 1"))
    rnd.offer(["a", "b", "c", "d"], 0.0)
    rnd.receive("c", m.TaskRefused(rnd.task_id, "train", "bin_missing.csv: missing column"),
                1.0)
    _train(rnd, "ab")
    begins = rnd.tick(20.0)  # d never answers: the train deadline passes
    assert rnd.phase is Phase.AGGREGATING
    rnd.receive("b", m.TaskRefused(rnd.task_id, "aggregate", "disk full"), 21.0)
    send_plain(rnd, [x for x in begins if x[0] == "a"], {"a": np.ones(3) * 0.1}, {"a": 10})
    assert rnd.phase is Phase.EVALUATING and rnd.survivors == ["a"]
    assert rnd.dropped_reasons() == {
        "b": "disk full", "c": "bin_missing.csv: missing column",
        "d": "did not answer before the train deadline"}


# -- the final test: the last round's model on the sites' test split ----------------

def _evaluating_last_round(split="val"):
    plan = parse_plan(PLAN.replace("seed = 3", f'seed = 3\neval_split = "{split}"'))
    rnd = Round("job1", plan.rounds, plan, W0, Strategy(plan.strategy), started_at=0.0)
    rnd.offer(["a", "b", "c"], 0.0)
    counts = {"a": 10, "b": 30, "c": 20}
    sends = _train(rnd, "abc", counts=counts)
    out = send_plain(rnd, sends, {s: np.full(3, 0.1) for s in "abc"}, counts)
    assert rnd.phase is Phase.EVALUATING
    return rnd, out


def test_the_last_round_evaluates_on_the_plans_split_and_once_on_test():
    rnd, out = _evaluating_last_round("val")
    tasks = by_type(out, m.EvalTask)
    assert [(s, t.split, t.task_id) for s, t in tasks] == \
        [(s, "val", rnd.task_id) for s in "abc"] + \
        [(s, "test", rnd.test_task_id) for s in "abc"]
    for s in "abc":
        rnd.receive(s, m.EvalResult(rnd.task_id, 5, {"auc": 0.6}), 2.0)
    assert rnd.phase is Phase.EVALUATING  # the final test is not in yet
    rnd.receive("a", m.EvalResult(rnd.test_task_id, 4, {"auc": 0.7}), 2.0)
    rnd.receive("b", m.EvalResult(rnd.test_task_id, 12, {"auc": 0.8}), 2.0)
    rnd.receive("c", m.TaskRefused(rnd.test_task_id, "eval",
                                   "evaluation failed: ValueError: no 'test' split"), 2.0)
    assert rnd.phase is Phase.DONE
    assert rnd.test_missing == {"c": "evaluation failed: ValueError: no 'test' split"}
    rows = rnd.metric_rows()
    assert ("*", "val", "auc", pytest.approx(0.6), 15) in rows
    assert [r for r in rows if r[1] == "test"] == [
        ("a", "test", "auc", 0.7, 4), ("b", "test", "auc", 0.8, 12),
        ("*", "test", "auc", pytest.approx(0.775), 16)]


def test_a_final_test_site_that_stays_silent_is_named_at_the_eval_deadline():
    rnd, _ = _evaluating_last_round("val")
    for s in "abc":
        rnd.receive(s, m.EvalResult(rnd.task_id, 5, {"auc": 0.6}), 2.0)
    rnd.receive("a", m.EvalResult(rnd.test_task_id, 4, {"auc": 0.7}), 2.0)
    rnd.tick(100.0)
    assert rnd.phase is Phase.DONE
    assert set(rnd.test_missing) == {"b", "c"}


def test_a_plan_evaluating_on_test_has_no_second_evaluation():
    rnd, out = _evaluating_last_round("test")
    assert [t.split for _, t in by_type(out, m.EvalTask)] == ["test"] * 3
    for s in "abc":
        rnd.receive(s, m.EvalResult(rnd.task_id, 5, {"auc": 0.6}), 2.0)
    assert rnd.phase is Phase.DONE and not rnd.final_test


def test_an_earlier_round_has_no_final_test():
    rnd = new_round(PLAN.replace("seed = 3", 'seed = 3\neval_split = "val"'))
    assert rnd.round < rnd.plan.rounds and not rnd.final_test


def test_a_plain_aggregation_names_who_it_went_without():
    from fedge.coordinator.rounds import PlainAggregation

    agg = PlainAggregation(["a", "b", "c"], 3, deadline_s=5.0)
    agg.start(0.0)
    agg.refused("c", 1.0)
    assert agg.left_out == {"c": "refused to send its plain update"}  # b may still send
    agg.postpone(10.0)
    agg.tick(14.0)
    assert agg.failure is None  # the deadline moved to 15
    agg.tick(15.0)
    assert agg.failure is not None
    assert agg.left_out == {"a": "sent no plain update before the aggregation deadline",
                            "b": "sent no plain update before the aggregation deadline",
                            "c": "refused to send its plain update"}
