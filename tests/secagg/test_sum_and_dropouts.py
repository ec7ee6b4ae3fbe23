"""The unmasked sum is exactly the plain quantised sum, or the round fails cleanly."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.secagg import ReconstructionFailed, TooFewInputs, TooFewSurvivors

from .harness import STAGES, Federation


@pytest.mark.parametrize(
    ("n", "d", "degree"),
    [
        (2, 17, None),
        (3, 1, None),
        (5, 1000, None),
        (10, 4099, None),
        (50, 64, None),
        (10, 333, 4),  # sparse Harary graph
        (50, 200, 8),
        (80, 128, None),  # n > 64: sparse by default, k = 20
    ],
)
def test_unmasked_sum_equals_plain_quantised_sum(n: int, d: int, degree: int | None) -> None:
    fed = Federation(n, d, degree=degree, seed=n * 7 + d)
    server = fed.run()
    assert server.failure is None and fed.client_errors == {}
    assert server.result is not None
    assert server.result.survivors == fed.ids
    assert server.result.total.dtype == np.float64
    np.testing.assert_array_equal(server.result.total, fed.expected_sum(fed.ids))
    # and the quantised sum is the true sum of the clipped inputs, to quantisation error
    plain = sum(np.clip(fed.inputs[c], -1, 1).astype(np.float64) for c in fed.ids)
    step = 2 * fed.clip / (2 ** fed.config.bits - 1)
    assert np.abs(server.result.total - plain).max() <= n * step


def test_default_graph_is_sparse_above_64_clients() -> None:
    fed = Federation(80, 8)  # sized for 20 % dropouts (config.dropout_degree)
    assert fed.config.degree == 56 and fed.config.neighbourhood_size == 57
    assert all(len(v) == 56 for v in fed.server.neighbours.values())


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("n_dropped", ["none", "n-t", "n-t+1"])
def test_dropouts_give_exact_sum_or_named_abort(stage: str, n_dropped: str) -> None:
    fed = Federation(10, 257, alpha=0.1, seed=hash((stage, n_dropped)) % 1000)
    t = fed.config.threshold
    assert t == 6
    k = {"none": 0, "n-t": 10 - t, "n-t+1": 10 - t + 1}[n_dropped]
    dropped = set(fed.ids[1 : 1 + k])
    server = fed.run({stage: dropped})
    assert fed.client_errors == {}
    if k <= 10 - t:
        assert server.failure is None and server.result is not None
        survivors = server.result.survivors
        if stage in ("advertise", "share", "masked_input"):
            assert set(survivors) == set(fed.ids) - dropped
        else:  # inputs already in: they stay in the sum, their masks are removed
            assert survivors == fed.ids
        assert server.result.dropped == sorted(set(fed.ids) - set(survivors))
        np.testing.assert_array_equal(server.result.total, fed.expected_sum(survivors))
    else:
        assert server.result is None
        expected = {
            "advertise": TooFewSurvivors,
            "share": TooFewSurvivors,
            "masked_input": TooFewInputs,
            "consistency": TooFewSurvivors,
            "unmasking": ReconstructionFailed,
        }[stage]
        assert type(server.failure) is expected
        assert server._total is None  # no still-masked vector left behind


def test_round_with_fewer_inputs_than_min_clients_fails_without_a_sum() -> None:
    fed = Federation(10, 31, alpha=0.1, min_clients=8)
    server = fed.run({"masked_input": set(fed.ids[:3])})
    assert server.result is None
    assert isinstance(server.failure, TooFewInputs)
    assert "7 masked inputs arrived, min_clients is 8" in str(server.failure)


def test_failed_round_tells_every_live_client() -> None:
    fed = Federation(5, 3, alpha=0.0, threshold=4, delta=0.2)
    fed.run({"share": set(fed.ids[:2])})
    live = [c for c in fed.ids[2:]]
    for cid in live:
        assert fed.clients[cid].state == "Aborted"
        assert type(fed.clients[cid].failure).__name__ == "ServerAborted"


@pytest.mark.parametrize("stage", ["share", "masked_input", "consistency", "unmasking"])
def test_sparse_graph_survives_dropouts_with_the_exact_sum(stage: str) -> None:
    fed = Federation(30, 101, alpha=0.1, delta=0.3, degree=8, seed=11)
    assert fed.config.threshold == 5 and fed.config.neighbourhood_size == 9
    dropped = {"site-003", "site-017", "site-025"}  # at most 3 of any 9-neighbourhood
    server = fed.run({stage: dropped})
    assert server.failure is None and fed.client_errors == {}
    assert server.result is not None
    survivors = server.result.survivors
    expected_survivors = (
        sorted(set(fed.ids) - dropped) if stage in ("share", "masked_input") else fed.ids
    )
    assert survivors == expected_survivors
    np.testing.assert_array_equal(server.result.total, fed.expected_sum(survivors))
