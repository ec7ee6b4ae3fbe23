"""The reveal-time min_cohort refusal says why and how to allow it (session 15).

A site that agreed to a secure aggregation of three can find, when asked to unmask,
that the sum holds two (a peer dropped out, or was made to). It refuses then too,
and its reason, which reaches the job's error, says what a sum of two gives away
and what its hospital sets to accept it, as the AggregateBegin refusal does
(``PrivacyPolicy.min_cohort_refusal``).
"""

from __future__ import annotations

from pathlib import Path

from fedge.agent.guard import PrivacyPolicy
from tests.agent.test_s15_guard_min_cohort import _shrunk_round


def test_a_site_refusing_to_unmask_a_sum_of_two_says_how_to_allow_it(tmp_path: Path) -> None:
    record, rounds, final = _shrunk_round(tmp_path, PrivacyPolicy())
    assert record.status == "failed"
    assert not final.exists()
    assert not any(r.status == "committed" for r in rounds)
    assert (
        "a: TooFewSurvivors: a sum over 2 site(s) is below this appliance's min_cohort 3: "
        "in a sum of 2, the other 1 site(s) together can recover this site's update from "
        "it; to accept that, set min_cohort = 2 in [privacy] of this appliance's "
        "agent.toml") in record.error
