"""A plain (unmasked) round is not summed over fewer sites than the plan's min_clients.

The secure path refuses such a sum (tests/coordinator/test_secure_sum_min_clients.py);
the plain one summed a single update after the others were lost."""

from __future__ import annotations

import numpy as np

from fedge.coordinator.rounds import PlainAggregation
from fedge.wire import messages as m


def _update(v: float, dim: int = 4) -> m.PlainUpdate:
    return m.PlainUpdate(task_id="t", vector=np.full(dim, v, dtype=np.float32))


def test_a_plain_sum_needs_min_clients_updates() -> None:
    agg = PlainAggregation(["a", "b", "c"], 4, 10.0, min_clients=3)
    agg.start(0.0)
    agg.receive("a", _update(1.0), 0.1)
    agg.receive("b", _update(2.0), 0.2)
    agg.tick(11.0)  # c never answers
    assert agg.result is None
    assert agg.failure is not None and "fewer than the plan's min_clients 3" in agg.failure


def test_a_refusal_below_min_clients_fails_and_enough_updates_are_summed() -> None:
    agg = PlainAggregation(["a", "b", "c"], 4, 10.0, min_clients=2)
    agg.start(0.0)
    agg.receive("a", _update(1.0), 0.1)
    agg.refused("b", 0.2)
    agg.refused("c", 0.3)
    assert agg.result is None and agg.failure is not None
    assert "1 plain update(s), fewer than the plan's min_clients 2" in agg.failure

    ok = PlainAggregation(["a", "b", "c"], 4, 10.0, min_clients=2)
    ok.start(0.0)
    ok.receive("a", _update(1.0), 0.1)
    ok.receive("c", _update(2.0), 0.2)
    ok.tick(11.0)
    assert ok.failure is None and ok.result is not None
    np.testing.assert_array_equal(ok.result.total, np.full(4, 3.0))


def test_min_clients_is_capped_at_a_smaller_cohort() -> None:
    """A round pinned to an older survivor set smaller than min_clients still closes."""
    agg = PlainAggregation(["a", "b"], 4, 10.0, min_clients=3)
    agg.start(0.0)
    agg.receive("a", _update(1.0), 0.1)
    agg.receive("b", _update(1.0), 0.2)
    assert agg.result is not None
