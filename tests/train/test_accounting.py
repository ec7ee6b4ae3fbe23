"""The privacy ledger composes each distinct mechanism once, whatever the number of
rounds, and charges a run only once its output is released; every run is recorded,
with DP or without; ε is for replacing one record (or one site's data)."""

from __future__ import annotations

import json
import os
import stat

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant

from fedge.train.accounting import (
    DP_SGD,
    PENDING,
    RELEASED,
    PrivacyLedger,
    epsilon_for,
)

DELTA = 1e-5
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def entry_by_entry(ledger: PrivacyLedger, *, job: str | None = None) -> float:
    """The ledger's ε composed one entry at a time by dp_accounting's PLD accountant
    for replacing one record, on its default (finest) grid."""
    accountant = PLDAccountant(neighboring_relation=REPLACE_ONE)
    for e in ledger.entries:
        if job is not None and e["job"] != job:
            continue
        event = dp_accounting.PoissonSampledDpEvent(
            e["sampling_rate"], dp_accounting.GaussianDpEvent(e["noise_multiplier"])
        )
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, e["steps"]))
    return float(accountant.get_epsilon(DELTA))


def upper_and_close(ours: float, reference: float, rel: float = 3e-3) -> bool:
    """The PLD estimate is pessimistic: ours, on a coarser grid, is never below the
    default grid's, and within ``rel`` of it."""
    return reference <= ours <= reference * (1 + rel)


def test_grouped_epsilon_equals_entry_by_entry_composition_per_job_and_in_total() -> None:
    ledger = PrivacyLedger()
    for r in (1, 2, 2):  # a round whose two attempts were both released
        ledger.record(job="a", round=r, noise_multiplier=1.1, sampling_rate=0.05, steps=10)
    ledger.record(job="b", round=1, noise_multiplier=0.9, sampling_rate=0.08, steps=7)
    ledger.record(job="b", round=2, noise_multiplier=0.9, sampling_rate=0.08, steps=5)

    assert ledger.events() == [(DP_SGD, 1.1, 0.05, 30), (DP_SGD, 0.9, 0.08, 12)]
    assert ledger.events(job="b", round=2) == [(DP_SGD, 0.9, 0.08, 5)]
    assert upper_and_close(ledger.epsilon(DELTA), entry_by_entry(ledger))
    for job in ("a", "b"):
        assert upper_and_close(ledger.epsilon(DELTA, job=job), entry_by_entry(ledger, job=job))
    assert 0 < ledger.epsilon(DELTA, job="a", round=1) < ledger.epsilon(DELTA, job="a")
    assert ledger.epsilon(DELTA, job="nope") == 0.0


def test_a_300_round_job_composes_one_mechanism_not_300() -> None:
    ledger = PrivacyLedger()
    for r in range(1, 301):
        ledger.record(job="long", round=r, noise_multiplier=1.3, sampling_rate=0.02, steps=10)

    assert ledger.events() == [(DP_SGD, 1.3, 0.02, 3000)]
    assert ledger.events(job="long") == [(DP_SGD, 1.3, 0.02, 3000)]
    assert ledger.events(job="long", round=150) == [(DP_SGD, 1.3, 0.02, 10)]
    one_event = PrivacyLedger()
    one_event.record(job="long", round=1, noise_multiplier=1.3, sampling_rate=0.02, steps=3000)
    assert ledger.epsilon(DELTA) == one_event.epsilon(DELTA)
    assert upper_and_close(ledger.epsilon(DELTA), entry_by_entry(one_event))
    # the saved ledger keeps every round's row: only the composition is grouped
    assert len(PrivacyLedger.from_dict(ledger.to_dict()).entries) == 300


def test_a_save_that_runs_out_of_room_leaves_the_old_ledger_and_no_temp_file(tmp_path) -> None:
    """A real short write: the child's file size limit stops the new ledger part way."""
    import subprocess
    import sys

    path = tmp_path / "privacy" / "ledger.json"
    small = PrivacyLedger()
    small.record(job="j", round=1, noise_multiplier=1.0, sampling_rate=0.1, steps=5)
    small.save(path)
    before = path.read_bytes()
    child = f"""
import resource, signal, sys
from fedge.train.accounting import PENDING, RELEASED, PrivacyLedger, epsilon_for
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 64}, {len(before) + 64}))
ledger = PrivacyLedger.load({str(path)!r})
for r in range(2, 200):
    ledger.record(job="j", round=r, noise_multiplier=1.0, sampling_rate=0.1, steps=5)
try:
    ledger.save({str(path)!r})
except OSError as exc:
    print("refused", exc.errno)
    sys.exit(0)
sys.exit(3)
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("refused"), out.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]


@pytest.mark.parametrize(("target", "rounds", "steps", "q", "z"), [
    (3.0, 40, 25, 0.02, 0.9),  # rounded to nearest, 1.216 spent 3.0013 and was refused
    (8.0, 100, 10, 0.05, 1.0),
    (2.5, 60, 8, 0.03, 1.1),
])
def test_the_noise_a_refusal_advises_is_accepted_when_resubmitted(
        target: float, rounds: int, steps: int, q: float, z: float) -> None:
    import re

    from fedge.train.accounting import PrivacyBudgetError, check_dp_plan, epsilon_for

    plan = {"target_epsilon": target, "delta": DELTA, "rounds": rounds,
            "steps_per_round": steps, "sampling_rate": q}
    with pytest.raises(PrivacyBudgetError) as err:
        check_dp_plan(noise_multiplier=z, **plan)
    advised = float(re.search(r"raise noise_multiplier to ([\d.]+)$", str(err.value))[1])
    assert check_dp_plan(noise_multiplier=advised, **plan) <= target
    # and it is the smallest such value at the printed precision
    assert epsilon_for(noise_multiplier=advised - 0.001, sampling_rate=q,
                       steps=rounds * steps, delta=DELTA) > target


def test_the_accountant_s_convergence_warnings_stay_out_of_the_journal(
        caplog: pytest.LogCaptureFixture) -> None:
    """dp_accounting logs "failed to converge" (absl) at a few orders for (q=0.16,
    sigma=1), some seven lines per ε, and leaves those orders out: nothing to act on
    (the RDP estimate that sizes the PLD grid still computes at those orders)."""
    import logging

    from fedge.train.accounting import epsilon_for

    with caplog.at_level(logging.WARNING):
        eps = epsilon_for(noise_multiplier=1.0, sampling_rate=0.16, steps=10, delta=DELTA)
    assert eps > 0
    assert not [r for r in caplog.records if r.name == "absl"], caplog.text
    assert logging.getLogger("absl").level != logging.ERROR  # put back as it was


def one_run(steps: int = 10) -> float:
    return epsilon_for(noise_multiplier=1.1, sampling_rate=0.05, steps=steps, delta=DELTA)


def test_a_pending_run_counts_only_once_released_and_only_once() -> None:
    """Training records its run pending: the update is still at the site, so nothing is
    spent until it is released; releasing it again charges nothing more."""
    ledger = PrivacyLedger()
    key = ledger.record(job="j", round=1, noise_multiplier=1.1, sampling_rate=0.05, steps=10,
                        pending=True)
    assert key == ("j", 1, 1)
    assert ledger.epsilon(DELTA) == 0.0 and ledger.events() == []
    assert [e["status"] for e in ledger.pending(job="j")] == [PENDING]
    ledger.release(key)
    ledger.release(key)
    assert ledger.pending() == [] and [e["status"] for e in ledger.released()] == [RELEASED]
    assert ledger.epsilon(DELTA, job="j") == pytest.approx(one_run())
    with pytest.raises(KeyError, match="round 1 attempt 2"):
        ledger.release(("j", 1, 2))


def test_a_retried_round_is_a_run_of_its_own_keyed_by_attempt() -> None:
    """Fresh noise each time: a retry is a new run. Only the attempts released count,
    so a first attempt that failed before its update was unmasked spends nothing."""
    ledger = PrivacyLedger()
    keys = [ledger.record(job="j", round=3, noise_multiplier=1.1, sampling_rate=0.05,
                          steps=10, pending=True) for _ in range(2)]
    other = ledger.record(job="k", round=3, noise_multiplier=1.1, sampling_rate=0.05,
                          steps=10, pending=True)
    assert keys == [("j", 3, 1), ("j", 3, 2)] and other == ("k", 3, 1)
    ledger.release(keys[1])
    assert ledger.epsilon(DELTA, job="j") == pytest.approx(one_run())
    assert ledger.epsilon(DELTA, job="j", round=3) == pytest.approx(one_run())
    assert [(e["round"], e["attempt"]) for e in ledger.pending(job="j")] == [(3, 1)]
    assert ledger.epsilon(DELTA, job="k") == 0.0
    # the budget check: the released runs plus the round about to be trained
    assert ledger.epsilon(DELTA, job="j", including={
        "job": "j", "round": 4, "noise_multiplier": 1.1, "sampling_rate": 0.05,
        "steps": 10}) == pytest.approx(one_run(20))
    # a run already counted is not counted twice when named again
    assert ledger.epsilon(DELTA, job="j", including=ledger.entry(keys[1])) == pytest.approx(
        one_run())
    again = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert again.entries == ledger.entries
    assert again.record(job="j", round=3, noise_multiplier=1.1, sampling_rate=0.05,
                        steps=10) == ("j", 3, 3)


def test_a_ledger_saved_before_statuses_loads_with_every_entry_charged(tmp_path) -> None:
    """The previous release charged a run when it trained and saved no status: its
    entries load released (an upgrade never lowers a site's recorded spend), a round it
    retried numbered attempt 1 and 2."""
    path = tmp_path / "privacy" / "ledger.json"
    path.parent.mkdir()
    old = [{"job": "j", "round": r, "noise_multiplier": 1.1, "sampling_rate": 0.05,
            "steps": 10} for r in (1, 2, 3, 3)]
    path.write_text(json.dumps({"entries": old}))
    ledger = PrivacyLedger.load(path)
    assert [(e["round"], e["attempt"], e["status"]) for e in ledger.entries] == [
        (1, 1, RELEASED), (2, 1, RELEASED), (3, 1, RELEASED), (3, 2, RELEASED)]
    assert ledger.epsilon(DELTA, job="j") == pytest.approx(one_run(40))
    assert ledger.pending() == []
    ledger.save(path)
    assert PrivacyLedger.load(path).entries == ledger.entries


@pytest.mark.parametrize(("entry", "why"), [
    ({"status": "spent"}, "status 'spent' is not one of"),
    ({"attempt": 0}, "attempt 0 is not an integer >= 1"),
    ({"attempt": "1"}, "attempt '1' is not an integer >= 1"),
])
def test_a_ledger_entry_with_a_bad_status_or_attempt_is_refused_naming_it(
        tmp_path, entry, why) -> None:
    path = tmp_path / "ledger.json"
    base = {"job": "j", "round": 1, "noise_multiplier": 1.1, "sampling_rate": 0.05, "steps": 1}
    path.write_text(json.dumps({"entries": [base, {**base, "round": 2, **entry}]}))
    with pytest.raises(ValueError, match=f"ledger {path}: not a valid ledger: entry 1: {why}"):
        PrivacyLedger.load(path)
    path.write_text(json.dumps({"entries": [{**base, "attempt": 1}, {**base, "attempt": 1}]}))
    with pytest.raises(ValueError, match="entry 1 repeats job 'j' round 1 attempt 1"):
        PrivacyLedger.load(path)


def test_a_release_that_cannot_be_saved_leaves_the_run_pending(tmp_path) -> None:
    """The mark must be on disk before the update leaves: a save that fails raises (the
    agent then reveals nothing) and the run stays pending, in memory and on disk."""
    path = tmp_path / "privacy" / "ledger.json"
    ledger = PrivacyLedger()
    key = ledger.record(job="j", round=1, noise_multiplier=1.1, sampling_rate=0.05, steps=10,
                        pending=True)
    ledger.save(path)
    blocked = tmp_path / "elsewhere"
    blocked.write_text("a file where the ledger's directory belongs\n")
    with pytest.raises(OSError):
        ledger.release(key, path=blocked / "ledger.json")
    assert [e["status"] for e in ledger.entries] == [PENDING]
    assert PrivacyLedger.load(path).pending() and ledger.epsilon(DELTA) == 0.0
    ledger.release(key, path=path)
    assert PrivacyLedger.load(path).epsilon(DELTA) == pytest.approx(one_run())


def test_save_syncs_the_file_before_the_rename_and_the_directory_after(
        tmp_path, monkeypatch) -> None:
    """A power cut after save returns finds the new ledger under its name: the data is
    synced before the rename makes it visible, and the directory after, so the rename
    itself (a release's mark) survives."""
    path = tmp_path / "privacy" / "ledger.json"
    ledger = PrivacyLedger()
    ledger.record(job="j", round=1, noise_multiplier=1.1, sampling_rate=0.05, steps=10)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        size = st.st_size if stat.S_ISREG(st.st_mode) else None
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ledger.save(path)
    (tmp,) = [e[1] for e in events if e[0] == "replace"]  # a temp file beside the ledger
    assert os.path.dirname(tmp) == str(path.parent) and tmp != str(path)
    size = path.stat().st_size
    assert events == [("fsync", tmp, size), ("replace", tmp, str(path)),
                      ("fsync", str(path.parent), None)]
    assert PrivacyLedger.load(path).entries == ledger.entries
