"""The recipe's refit keeps the CV schedule's passes over the data (rounds x K/(K-1))."""

from __future__ import annotations

import pytest

from fedge.demo.recipe import refit_rounds


def test_refit_makes_as_many_passes_over_the_whole_split_as_cv_made_over_its_part() -> None:
    assert refit_rounds(10, 3) == 15  # 10 rounds on 2/3 of the rows = 15 on all of them
    assert refit_rounds(5, 2) == 10
    assert refit_rounds(20, 5) == 25
    assert refit_rounds(1, 10) == 1


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"cv_rounds=0 must be >= 1 and folds=3 >= 2"):
        refit_rounds(0, 3)
    with pytest.raises(ValueError, match=r"folds=1 >= 2"):
        refit_rounds(5, 1)
