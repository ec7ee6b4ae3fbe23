"""FLamby's per-seed Fed-TCGA-BRCA results, as transcribed, reproduce its published means."""

from __future__ import annotations

import pytest

from fedge.demo.flamby_results import FLAMBY_PER_CLIENT, flamby_spread, spread
from fedge.demo.tcga import FLAMBY_PUBLISHED


@pytest.mark.parametrize("method", sorted(FLAMBY_PUBLISHED))
def test_seed_means_average_to_flambys_published_number(method: str) -> None:
    assert flamby_spread(method).mean == pytest.approx(FLAMBY_PUBLISHED[method], abs=6e-4)


def test_every_method_has_six_centres_for_seeds_42_to_46() -> None:
    for method, seeds in FLAMBY_PER_CLIENT.items():
        assert sorted(seeds) == [42, 43, 44, 45, 46], method
        assert all(len(v) == 6 and all(0 <= c <= 1 for c in v) for v in seeds.values()), method


def test_spread_is_one_sample_sd_around_the_mean() -> None:
    s = spread([0.7, 0.8, 0.9])
    assert (s.mean, s.low, s.high) == pytest.approx((0.8, 0.7, 0.9))
    assert s.sd == pytest.approx(0.1)
    assert s.holds(0.89) and not s.holds(0.91)


def test_bad_requests_are_named() -> None:
    with pytest.raises(ValueError, match="at least 2 seeds, got 1"):
        spread([0.7])
    with pytest.raises(KeyError, match=r"no FLamby results for .fedfoo.; known: .*fedavg"):
        flamby_spread("fedfoo")
