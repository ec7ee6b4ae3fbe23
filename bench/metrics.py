"""Time of the evaluation metrics on a big site's split, against an anchor measured in
the same run.

  cindex: `fedge.train.metrics.concordance_index` of 1,000,000 rows (30 % events,
      integer days 1..4000, float32 risks: ties in time and in risk, as a real split
      has them), and of 100,000 rows. It was pairwise once: 129 s at 320k rows, about
      21 min at 1M, past eval_s (120 s) and the agent's stuck-worker bound. An
      O(n log n) count grows ~12-15x from 100k to 1M (caches), a quadratic one 100x.
  auc: `fedge.train.metrics.roc_auc` of 1,000,000 rows with tied scores.
  anchor: numpy's argsort of 1,000,000 float64 (the sort any rank statistic needs),
      so the ratios hold on a slower or busier machine.

Each figure is the best of 3 runs.

    python bench/metrics.py

Ends with: RESULT cindex_1m_s=... cindex_100k_s=... cindex_1m_vs_100k=...
auc_1m_s=... sort_1m_s=... cindex_vs_sort=...
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np

from fedge.train import metrics as M


def best_s(fn: Callable[[], object], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def survival(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    days = rng.integers(1, 4000, size=n).astype(np.float64)
    event = (rng.random(n) < 0.3).astype(np.float64)
    risk = rng.normal(size=n).astype(np.float32)
    return days, risk, event


def main() -> int:
    big, small = survival(1_000_000, 0), survival(100_000, 1)
    c_big = best_s(lambda: M.concordance_index(*big))
    c_small = best_s(lambda: M.concordance_index(*small))
    value = M.concordance_index(*big)
    if not 0.49 < value < 0.51:  # random risks: a miscount, not a timing, would move it
        raise SystemExit(f"metrics: C-index of random risks is {value}, not ~0.5")
    print(f"C-index: 1,000,000 rows {c_big:.2f} s, 100,000 rows {c_small:.3f} s "
          f"(value {value:.4f})")
    rng = np.random.default_rng(2)
    labels = (rng.random(1_000_000) < 0.2).astype(np.float64)
    scores = np.round(rng.normal(size=1_000_000), 3)
    auc = best_s(lambda: M.roc_auc(labels, scores))
    print(f"ROC AUC: 1,000,000 rows {auc:.2f} s")
    floats = rng.random(1_000_000)
    sort = best_s(lambda: np.argsort(floats))
    print(f"anchor: argsort of 1,000,000 float64 {sort:.3f} s")
    print(f"RESULT cindex_1m_s={c_big:.2f} cindex_100k_s={c_small:.3f} "
          f"cindex_1m_vs_100k={c_big / c_small:.1f} auc_1m_s={auc:.2f} "
          f"sort_1m_s={sort:.3f} cindex_vs_sort={c_big / sort:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
