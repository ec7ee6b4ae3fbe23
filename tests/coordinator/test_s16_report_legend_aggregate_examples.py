"""The aggregate row's "examples" cell counts the examples of the sites the aggregate
covers (diff review s16 L4): a site without a finite value is left out of the
aggregate, and its examples were still summed into the cell ("covers 2 of 3 sites",
and 33 examples of the 3). Where the metrics' aggregates cover different sites, no one
number is right for the row: the cell says "–" and a note gives each metric's.
(In a test_s16_report_legend* file only because that is the name this fix may use.)"""

from __future__ import annotations

from fedge.coordinator.report import write_job_report
from tests.coordinator.test_report_contents import PLAN, _row, _status


def _report_md(tmp_path, value):
    """Sites a, b, c with 10, 11, 12 val examples; ``value(site, metric)``."""
    status = _status(rounds=1, committed=1, test=False)
    status["metrics"] = [_row(1, s, "val", m, value(s, m), n)
                         for s, n in (("a", 10), ("b", 11), ("c", 12))
                         for m in ("c_index", "loss")]
    status["metrics"] += [_row(1, "*", "val", m, 0.5, 22) for m in ("c_index", "loss")]
    write_job_report(tmp_path, status, PLAN.format(rounds=1))
    md = (tmp_path / "report.md").read_text()
    return md[md.index("## Final round"):]


def test_the_aggregate_row_counts_only_the_examples_of_the_sites_it_covers(tmp_path):
    md = _report_md(tmp_path, lambda s, m: float("nan") if s == "b" else 0.6)
    assert "| b | – | – | 11 |" in md
    assert "| **aggregate** | 0.5000 | 0.5000 | 22 |" in md  # a and c: 10 + 12
    assert "c_index: the aggregate and the mean of sites cover 2 of 3 sites" in md
    assert "differ by metric" not in md


def test_every_site_covered_counts_them_all(tmp_path):
    md = _report_md(tmp_path, lambda s, m: 0.6)
    assert "| **aggregate** | 0.5000 | 0.5000 | 33 |" in md


def test_aggregates_over_different_sites_say_each_metrics_examples(tmp_path):
    md = _report_md(tmp_path, lambda s, m: float("nan") if (s, m) == ("b", "c_index")
                    else 0.6)
    assert "| **aggregate** | 0.5000 | 0.5000 | – |" in md
    assert ("- the aggregates cover different sites, so their examples differ by "
            "metric: c_index: 22; loss: 33.") in md
