"""The privacy ledger composes each distinct mechanism once, whatever the number of rounds."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from fedge.train.accounting import PrivacyLedger

DELTA = 1e-5


def entry_by_entry(ledger: PrivacyLedger, *, job: str | None = None) -> float:
    """The ledger's ε composed one entry at a time (what epsilon() did before)."""
    accountant = RdpAccountant()
    for e in ledger.entries:
        if job is not None and e["job"] != job:
            continue
        event = dp_accounting.PoissonSampledDpEvent(
            e["sampling_rate"], dp_accounting.GaussianDpEvent(e["noise_multiplier"])
        )
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, e["steps"]))
    return float(accountant.get_epsilon(DELTA))


def test_grouped_epsilon_equals_entry_by_entry_composition_per_job_and_in_total() -> None:
    ledger = PrivacyLedger()
    for r in (1, 2, 2):  # a retried round is charged twice
        ledger.record(job="a", round=r, noise_multiplier=1.1, sampling_rate=0.05, steps=10)
    ledger.record(job="b", round=1, noise_multiplier=0.9, sampling_rate=0.08, steps=7)
    ledger.record(job="b", round=2, noise_multiplier=0.9, sampling_rate=0.08, steps=5)

    assert ledger.events() == [(1.1, 0.05, 30), (0.9, 0.08, 12)]
    assert ledger.events(job="b", round=2) == [(0.9, 0.08, 5)]
    assert ledger.epsilon(DELTA) == pytest.approx(entry_by_entry(ledger), rel=0, abs=1e-9)
    for job in ("a", "b"):
        assert ledger.epsilon(DELTA, job=job) == pytest.approx(
            entry_by_entry(ledger, job=job), rel=0, abs=1e-9)
    assert 0 < ledger.epsilon(DELTA, job="a", round=1) < ledger.epsilon(DELTA, job="a")
    assert ledger.epsilon(DELTA, job="nope") == 0.0


def test_a_300_round_job_composes_one_mechanism_not_300() -> None:
    ledger = PrivacyLedger()
    for r in range(1, 301):
        ledger.record(job="long", round=r, noise_multiplier=1.3, sampling_rate=0.02, steps=10)

    assert ledger.events() == [(1.3, 0.02, 3000)]
    assert ledger.events(job="long") == [(1.3, 0.02, 3000)]
    assert ledger.events(job="long", round=150) == [(1.3, 0.02, 10)]
    one_event = PrivacyLedger()
    one_event.record(job="long", round=1, noise_multiplier=1.3, sampling_rate=0.02, steps=3000)
    assert ledger.epsilon(DELTA) == pytest.approx(entry_by_entry(one_event), rel=0, abs=1e-9)
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
from fedge.train.accounting import PrivacyLedger
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
    sigma=1), some seven lines per ε, and leaves those orders out: nothing to act on."""
    import logging

    from fedge.train.accounting import epsilon_for

    with caplog.at_level(logging.WARNING):
        eps = epsilon_for(noise_multiplier=1.0, sampling_rate=0.16, steps=10, delta=DELTA)
    assert eps > 0
    assert not [r for r in caplog.records if r.name == "absl"], caplog.text
    assert logging.getLogger("absl").level != logging.ERROR  # put back as it was
