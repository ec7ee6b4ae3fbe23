"""Thresholds follow the published bounds; bad configurations are refused by name."""

from __future__ import annotations

import hashlib
import re

import pytest

from fedge import core
from fedge.secagg import RoundContext, SecAggConfig, SecAggConfigError, neighbours
from fedge.secagg.config import check_cohort, default_degree, graph_seed

DIGEST = hashlib.sha256(b"m").digest()


def cfg(**kw: object) -> SecAggConfig:
    base: dict[str, object] = {"n": 10, "threshold": 6, "clip": 1.0, "vector_length": 4}
    base.update(kw)
    return SecAggConfig(**base)  # type: ignore[arg-type]


def test_threshold_below_semi_malicious_bound_is_refused_naming_the_bound() -> None:
    with pytest.raises(SecAggConfigError) as err:
        cfg(threshold=4, alpha=0.1)
    assert str(err.value) == (
        "threshold 4 is below the semi-malicious bound ceil((n + alpha*n)/2) = 6 "
        "for n=10, alpha=0.1"
    )


def test_threshold_equal_to_an_integral_bound_is_refused_because_the_bound_is_strict() -> None:
    # (10 + 0.2*10)/2 = 6 exactly: t > 6 means t >= 7
    with pytest.raises(SecAggConfigError, match=r"t > \(n \+ alpha\*n\)/2, i.e. t >= 7"):
        cfg(threshold=6, alpha=0.2)
    assert cfg(threshold=7, alpha=0.2).threshold == 7


def test_threshold_below_curious_server_bound_is_refused() -> None:
    with pytest.raises(SecAggConfigError, match=r"curious-server bound ceil\(alpha\*n\) = 4"):
        cfg(threshold=3, alpha=0.35, semi_malicious=False)
    assert cfg(threshold=4, alpha=0.35, semi_malicious=False).threshold == 4


def test_threshold_above_dropout_bound_is_refused() -> None:
    with pytest.raises(
        SecAggConfigError, match=re.escape("above the dropout bound floor((1 - delta)*n) = 7")
    ):
        cfg(threshold=8, delta=0.3)


def test_sparse_bound_is_taken_over_the_neighbourhood() -> None:
    with pytest.raises(SecAggConfigError) as err:
        SecAggConfig(n=100, threshold=11, clip=1.0, vector_length=3, alpha=0.1)
    assert "ceil((m + alpha*m)/2) = 33 for neighbourhood size m=59 (n=100, degree k=58)" in str(
        err.value
    )


@pytest.mark.parametrize(
    ("n", "alpha", "delta", "threshold", "degree"),
    [(2, 0.0, 0.0, 2, 1), (10, 0.1, 0.3, 6, 9), (64, 0.1, 0.3, 36, 63),
     # above 64 the degree is sized for max(delta, 0.2) dropouts (config.dropout_degree)
     (100, 0.1, 0.0, 33, 58), (200, 0.1, 0.0, 34, 60), (500, 0.1, 0.0, 36, 64),
     (100, 0.1, 0.3, 56, 99), (500, 0.1, 0.3, 115, 208), (100, 0.0, 0.0, 21, 40)],
)
def test_derive_picks_the_smallest_threshold_the_bounds_allow(
    n: int, alpha: float, delta: float, threshold: int, degree: int
) -> None:
    c = SecAggConfig.derive(n, alpha=alpha, delta=delta, clip=2.0, vector_length=5)
    assert (c.threshold, c.degree) == (threshold, degree)
    assert c.min_clients == threshold
    with pytest.raises(SecAggConfigError):
        SecAggConfig(
            n=n, threshold=threshold - 1, clip=2.0, vector_length=5, alpha=alpha, delta=delta
        )


def test_derive_refuses_when_dropouts_leave_fewer_than_the_security_bound() -> None:
    with pytest.raises(SecAggConfigError, match="dropout bound floor"):
        SecAggConfig.derive(10, alpha=0.1, delta=0.5, clip=1.0, vector_length=5)


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"n": 1}, "cohort size n=1"),
        ({"clip": 0.0}, "clip=0.0 must be a finite number > 0"),
        ({"clip": float("inf")}, "clip=inf"),
        ({"vector_length": 0}, "vector_length=0"),
        ({"alpha": 1.0}, "alpha=1.0 must lie in [0, 1)"),
        ({"delta": -0.1}, "delta=-0.1 must lie in [0, 1)"),
        ({"min_clients": 11}, "min_clients=11 must be an integer in 1..n=10"),
        ({"degree": 3, "threshold": 3}, "degree k=3 of a sparse graph must be even"),
        ({"degree": 10}, "degree k=10 must be an integer in 1..n-1=9"),
        ({"stage_timeout": 0}, "stage_timeout=0"),
        ({"threshold": 11}, "threshold 11 must be an integer in 1..10"),
    ],
)
def test_bad_configuration_names_parameter_and_rule(kw: dict[str, object], fragment: str) -> None:
    with pytest.raises(SecAggConfigError, match=re.escape(fragment)):
        cfg(**kw)


def test_quantisation_bits_follow_the_cohort_size_so_the_sum_cannot_wrap() -> None:
    for n in (2, 10, 100):
        c = SecAggConfig.derive(n, alpha=0.0, delta=0.0, clip=1.0, vector_length=1)
        assert c.bits == core.quant_bits(n)
        assert n * (2**c.bits - 1) <= 2**32 - 1


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"job_id": ""}, "job_id=''"),
        ({"round": -1}, "round=-1"),
        ({"model_digest": b"short"}, "model_digest must be 16-64 bytes"),
    ],
)
def test_round_context_is_validated(kw: dict[str, object], fragment: str) -> None:
    base: dict[str, object] = {"job_id": "j", "round": 0, "model_digest": DIGEST}
    base.update(kw)
    with pytest.raises(SecAggConfigError, match=re.escape(fragment)):
        RoundContext(**base)  # type: ignore[arg-type]


def test_cohort_must_be_n_distinct_valid_ids() -> None:
    with pytest.raises(SecAggConfigError, match="twice"):
        check_cohort(["a", "a", "b"], 3)
    with pytest.raises(SecAggConfigError, match="cohort has 2 clients, the configuration says n=3"):
        check_cohort(["a", "b"], 3)
    with pytest.raises(SecAggConfigError, match="not a client id"):
        check_cohort(["a", "b c", "d"], 3)


def test_default_degree_is_complete_up_to_64_then_logarithmic() -> None:
    assert default_degree(64) == 63
    assert default_degree(65) == 20
    assert default_degree(100) == 20
    assert default_degree(1000) == 30


def test_sparse_graph_is_k_regular_symmetric_and_recomputable_by_every_client() -> None:
    ids = [f"c{i:03d}" for i in range(100)]
    ctx = RoundContext("job", 4, DIGEST)
    seed = graph_seed(ctx, ids)
    graph = neighbours(ids, 20, seed)
    assert all(len(v) == 20 and c not in v for c, v in graph.items())
    assert all(c in graph[p] for c, v in graph.items() for p in v)
    assert neighbours(list(reversed(ids)), 20, graph_seed(ctx, list(reversed(ids)))) == graph
    # another round draws another graph: the coordinator cannot keep a favourable one
    other = neighbours(ids, 20, graph_seed(RoundContext("job", 5, DIGEST), ids))
    assert other != graph
