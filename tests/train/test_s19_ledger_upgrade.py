"""A privacy ledger saved without a version is read as the release that wrote it wrote
it: 0.2.0 (8a53b51) recorded every run, with or without DP, and computed ε for
replacing one record, as today; releases before 0.2 recorded a run only if it used
DP-SGD and computed ε for adding or removing one (RDP). Neither saved a version, so the
entries tell them apart. A 0.2.0 ledger is not legacy (`fedge agent privacy` says what
0.2.0 said of it, no 'before the upgrade' claim), one a release before 0.2 began keeps
today's legacy wording, and the site's ε caps compute the same either way.

The fixtures under tests/fixtures/ were written by the releases' own code (each commit
checked out, its PrivacyLedger run with this venv), never by hand:

- s19_ledger_0.1_before_statuses.json: 4c7482f (before entry statuses): two DP-SGD
  rounds of job-dp and a Cox DP-SGD round of job-cox;
- s19_ledger_0.1.json: 3585ce8 (the last commit before mechanisms): two released
  DP-SGD rounds of job-dp and a third pending;
- s19_ledger_0.2.0.json: 8a53b51 (0.2.0): job-dp's two DP-SGD rounds, job-plain's run
  without DP, job-fedavg's DP-FedAvg round, all released, and job-dp round 3 pending;
- s19_ledger_0.1_then_0.2.0.json: s19_ledger_0.1.json loaded by 8a53b51, which then
  recorded job-plain (no DP) and job-dp2 (DP-SGD) and saved it;
- s19_revealed_0.2.0.jsonl: 8a53b51's RevealLog after the four released runs of
  s19_ledger_0.2.0.json were summed under secure aggregation;
- s19_*_privacy.txt: `fedge agent privacy` of the release that wrote the ledger (of
  8a53b51 for the 0.2.0 ones; with the reveal log for s19_ledger_0.2.0_privacy.txt).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.trainer import ledger_path
from fedge.train.accounting import DP_SGD, PrivacyLedger, epsilon_for

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DELTA = 1e-5
JOB_DP_3_ROUNDS = epsilon_for(noise_multiplier=1.1, sampling_rate=0.05, steps=300,
                              delta=DELTA)


def _site(tmp_path: Path, ledger: str, reveals: str | None = None) -> Path:
    """An agent state directory holding the fixture ``ledger`` (and reveal log)."""
    state = tmp_path / "state"
    ledger_path(state).parent.mkdir(parents=True)
    shutil.copyfile(FIXTURES / ledger, ledger_path(state))
    if reveals is not None:
        (state / "secagg").mkdir()
        shutil.copyfile(FIXTURES / reveals, state / "secagg" / "revealed.jsonl")
    return state


def _privacy_cli(tmp_path: Path, state: Path) -> list[str]:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{state}"\n')
    out = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "privacy",
                          "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def _table(lines: list[str]) -> list[str]:
    """The job rows, the total and the pending runs: up to the first footer line."""
    return [line for line in lines[:next(i for i, line in enumerate(lines)
                                         if line.startswith(("per loss term:", "client-level:",
                                                             "without DP:", "before ",
                                                             "recomputed:", "delta ")))]]


def test_a_ledger_020_saved_loads_with_no_legacy_claim_and_its_epsilon_as_020_showed(
        tmp_path: Path) -> None:
    """0.2.0 recorded every run (here one without DP and one DP-FedAvg) and computed ε
    for replacing one record: nothing in its ledger is 'before the upgrade', and with
    its reveal log (each reveal a released run of it) `fedge agent privacy` prints what
    0.2.0 printed, word for word. The old reading took it for a ledger of a release
    before 0.2: 'recorded a training run only if it used DP-SGD', 'plain updates sent
    before the upgrade cannot be known', and job-dp '6.1849 now, 4.4436 as the earlier
    release showed' (0.2.0 showed 6.1849)."""
    state = _site(tmp_path, "s19_ledger_0.2.0.json", "s19_revealed_0.2.0.jsonl")
    ledger = PrivacyLedger.load(ledger_path(state))
    assert (ledger.legacy, ledger.legacy_entries) == (False, 0)
    assert ledger.legacy_epsilon(DELTA) == (0.0, 0.0)
    # complete from its start (0.2.0 kept no time of it): no reveal predates it
    assert ledger.complete_since == 0.0

    lines = _privacy_cli(tmp_path, state)
    shown = (FIXTURES / "s19_ledger_0.2.0_privacy.txt").read_text().splitlines()
    assert lines == shown
    text = "\n".join(lines)
    assert "6.1849" in lines[1] and "recorded before the upgrade" not in text
    for claim in ("only if it used DP-SGD", "cannot be known", "recomputed:",
                  "as the earlier release showed", "not recorded"):
        assert claim not in text
    assert text.endswith("Every training run whose update left this site is counted, "
                         "with DP or without")

    # today's agent charges a run and saves: still not legacy, still complete from the
    # start (a reveal of 0.2.0's time never reads as one before this ledger)
    key = ledger.record(job="job-new", round=1, mechanism=DP_SGD, noise_multiplier=1.1,
                        sampling_rate=0.05, steps=100, pending=True)
    ledger.release(key, path=ledger_path(state))
    saved = json.loads(ledger_path(state).read_text())
    assert (saved["version"], saved["legacy"], saved["legacy_entries"],
            saved["complete_since"]) == (2, False, 0, 0.0)
    again = PrivacyLedger.load(ledger_path(state))
    assert (again.legacy, again.legacy_entries, again.complete_since) == (False, 0, 0.0)
    text = "\n".join(_privacy_cli(tmp_path, state))
    assert "before the upgrade" not in text and "before this ledger" not in text
    assert "not recorded" not in text  # the 4 reveals against 5 released runs


@pytest.mark.parametrize("name", ["s19_ledger_0.1.json",
                                  "s19_ledger_0.1_before_statuses.json"])
def test_a_ledger_of_a_release_before_020_keeps_the_legacy_wording(
        tmp_path: Path, name: str) -> None:
    """A release before 0.2 recorded DP-SGD runs only: its ledger (entries without a
    mechanism) is legacy, every entry of it, and `fedge agent privacy` says so, with ε
    beside what that release printed for it (its own `fedge agent privacy`)."""
    state = _site(tmp_path, name)
    ledger = PrivacyLedger.load(ledger_path(state))
    assert (ledger.legacy, ledger.legacy_entries, ledger.complete_since) == (
        True, len(ledger.entries), None)
    lines = _privacy_cli(tmp_path, state)
    text = "\n".join(lines)
    assert "before the upgrade: this ledger was started by a fedge release that recorded " \
           "a training run only if it used DP-SGD" in text
    assert "plain (non-secure) updates sent before the upgrade cannot be known" in text
    assert "Every training run" not in text
    # what that release showed, per job, is what today's 'as the earlier release showed'
    old = {line.split()[0]: line.split()[2] for line in
           _table((FIXTURES / name.replace(".json", "_privacy.txt")).read_text()
                  .splitlines())[1:] if line.startswith("job-")}
    recomputed = lines[next(i for i, line in enumerate(lines)
                            if line.startswith("recomputed:")) + 1:]
    for job, then in old.items():
        now = ledger.epsilon(DELTA, job=job)
        assert f"  {job:<38} {now:.4f} now, {then} as the earlier release showed" \
            in recomputed


def test_a_ledger_a_release_before_020_began_and_020_carried_on_is_legacy_for_its_entries(
        tmp_path: Path) -> None:
    """0.2.0 loaded a ledger of a release before 0.2 (adding each entry's mechanism
    after its own keys) and recorded two runs of its own: the first three entries are
    legacy, 0.2.0's are not (job-dp2 is not 'recorded before the upgrade')."""
    state = _site(tmp_path, "s19_ledger_0.1_then_0.2.0.json")
    ledger = PrivacyLedger.load(ledger_path(state))
    assert (ledger.legacy, ledger.legacy_entries, ledger.complete_since) == (True, 3, None)
    lines = _privacy_cli(tmp_path, state)
    rows = {line.split()[0]: line for line in _table(lines) if line.startswith("job-")}
    assert rows["job-dp"].endswith("per record, recorded before the upgrade")
    assert rows["job-dp2"].endswith("per record")
    recomputed = "\n".join(lines).split("recomputed:")[1]
    assert "epsilon of the 3 entries" in recomputed
    assert "job-dp " in recomputed and "job-dp2" not in recomputed and \
        "job-plain" not in recomputed
    # the table is what 0.2.0 showed, bar the legacy marks
    shown = _table((FIXTURES / "s19_ledger_0.1_then_0.2.0_privacy.txt").read_text()
                   .splitlines())
    assert [line.replace(", recorded before the upgrade", "") for line in _table(lines)] \
        == shown


@pytest.mark.parametrize(("name", "total"), [
    ("s19_ledger_0.2.0.json", math.inf),  # job-plain released without DP
    ("s19_ledger_0.1.json", JOB_DP_3_ROUNDS),
])
def test_the_sites_epsilon_caps_compute_as_before_for_either_ledger(
        name: str, total: float, tmp_path: Path) -> None:
    """max_epsilon and max_epsilon_total are checked as the agent checks them before a
    run is charged (the run's ledger, epsilon_if_released, refuse_release): job-dp's
    fourth DP-SGD round would take it to ε(z 1.1, q 0.05, 300 steps), whichever
    release began the ledger; and the spent budget as the heartbeats compute it."""
    state = _site(tmp_path, name)
    ledger = PrivacyLedger.load(ledger_path(state))
    key = ledger.record(job="job-dp", round=4, noise_multiplier=1.1, sampling_rate=0.05,
                        steps=100, pending=True)
    job_epsilon, total_epsilon = ledger.epsilon_if_released(key, DELTA)
    assert job_epsilon == pytest.approx(JOB_DP_3_ROUNDS, rel=1e-9)
    assert total_epsilon == pytest.approx(total, rel=1e-9)
    assert PrivacyPolicy(max_epsilon=round(JOB_DP_3_ROUNDS + 0.01, 2)).refuse_release(
        job="job-dp", job_epsilon=job_epsilon, total_epsilon=total_epsilon) is None
    refused = PrivacyPolicy(max_epsilon=7.0).refuse_release(
        job="job-dp", job_epsilon=job_epsilon, total_epsilon=total_epsilon)
    assert refused is not None and f"to {JOB_DP_3_ROUNDS:.4g} (delta 1e-05)" in refused
    capped = PrivacyPolicy(max_epsilon_total=100.0)
    refused = capped.refuse_release(job="job-dp", job_epsilon=job_epsilon,
                                    total_epsilon=total_epsilon)
    assert (refused is not None) == math.isinf(total)
    spent = capped.budget_spent(ledger.epsilon(DELTA), ledger.without_dp())
    assert bool(spent) == math.isinf(total)
