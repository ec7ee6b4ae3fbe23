"""A zero-padded column is seen as one however few of its cells lie from 1.01 to 9.12
(session 19, mend of review r5's second finding).

The day.month check (fedge.train.data._DayMonth) looked, in a block of at most 256
cells valued from 1.01 to 9.12, at those cells only: a column written '%05.2f' whose
00.50 shows its padding had one '01.02' refused as a date, while 300 of them beside the
same cells loaded (a block of more was searched whole). Both now load; a column of
dates is refused at both sizes. Real CSV files through load_site_data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.train.data import DataError
from tests.train.test_s19_table_dates import DATES, _load, _write


@pytest.mark.parametrize("n", [1, 300], ids=["one", "many"])
@pytest.mark.parametrize("padding", ["00.50", "09.50", "012.5"],
                         ids=["below", "above", "three_digits"])
def test_padding_outside_the_dates_range_shows_at_any_count(tmp_path: Path, n: int,
                                                            padding: str) -> None:
    values = [padding, "12.50"] + ["01.02"] * n
    got = _load(_write(tmp_path / "pad.csv", values))
    np.testing.assert_allclose(got, [float(v) for v in values], rtol=1e-6)


@pytest.mark.parametrize("n", [1, 300], ids=["one", "many"])
def test_dates_beside_decimals_are_refused_at_any_count(tmp_path: Path, n: int) -> None:
    values = ["0.50", "12.50"] + ["01.02"] * n
    with pytest.raises(DataError) as err:
        _load(_write(tmp_path / "de.csv", values))
    assert (err.value.line, err.value.column, err.value.problem) == (4, "kalium", DATES)
