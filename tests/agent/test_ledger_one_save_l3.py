"""A release costs what the ledger's record needs, no more (diff review s14 L3): a
plain round's ledger is written once, by the trainer, with the coordinator's task id
already in it (the agent's release then writes nothing again), and the journal line
of a release never runs the privacy accountant: it reads the ε training already
composed, says "unbounded" for a job that released a run without DP, and is not
made at all when the logger does not take INFO. Real agents over TorchTrainer
(Fed-TCGA-BRCA), real ledger files, the real accountant."""

from __future__ import annotations

import asyncio
import logging
import os

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.trainer import ledger_path
from fedge.train import accounting
from fedge.train.accounting import PrivacyLedger
from fedge.wire import messages as m
from tests.agent.test_guard import SITES
from tests.agent.test_ledger_history import PLAIN_PLAN
from tests.agent.test_privacy_release import fleet  # noqa: F401 (fixture)


def test_a_plain_round_writes_its_ledger_once_with_the_task_id(fleet, tmp_path) -> None:  # noqa: F811
    f = fleet(PrivacyPolicy(require_secure_aggregation=False))
    site = SITES[0]
    path = ledger_path(tmp_path / site)
    asyncio.run(f.train([site], "t1", plan=PLAIN_PLAN))
    (entry,) = PrivacyLedger.load(path).entries
    assert (entry["status"], entry["task_id"]) == ("released", "t1")  # as it trained
    # a rewrite renames a new file over this one; the link keeps this inode taken
    os.link(path, tmp_path / "as-trained")
    trained = os.stat(path).st_ino

    async def aggregate() -> None:
        await f.deliver(site, m.AggregateBegin(task_id="t1", cohort=SITES,
                                               weight_scale=0.0025, secure=False,
                                               threshold=0))

    asyncio.run(aggregate())
    assert isinstance([b for s, b in f.inbox if s == site][-1], m.PlainUpdate), f.refusals()
    assert os.stat(path).st_ino == trained, "the agent's release wrote the ledger again"
    (entry,) = PrivacyLedger.load(path).entries
    assert entry["task_id"] == "t1"


def _no_accountant(monkeypatch) -> list[object]:
    """Make any run of the accountant fail the test (it is this module's own
    function: dp_accounting itself is not replaced, only asked for nothing)."""
    asked: list[object] = []

    def refuse(events, delta):  # type: ignore[no-untyped-def]
        asked.append(events)
        raise AssertionError(f"the accountant ran for {events}")

    monkeypatch.setattr(accounting, "_accounted_epsilon", refuse, raising=False)
    return asked


def test_the_release_line_reads_the_epsilon_training_composed(monkeypatch, caplog) -> None:
    ledger = PrivacyLedger()
    key = ledger.record(job="j", round=1, noise_multiplier=1.0, sampling_rate=0.02,
                        steps=50, pending=True)
    # what local_train does: the job's ε once this run is released, at the plan's delta
    composed = ledger.epsilon(1e-5, job="j", including=ledger.entry(key))
    asked = _no_accountant(monkeypatch)
    with caplog.at_level(logging.INFO, logger="fedge.train.accounting"):
        ledger.release(key)
    (line,) = [r.getMessage() for r in caplog.records if "privacy ledger" in r.getMessage()]
    assert f"the job's epsilon so far {composed:.4g} at delta 1e-05" in line
    assert asked == []


def test_the_release_line_runs_no_accountant_where_none_ran(monkeypatch, caplog) -> None:
    ledger = PrivacyLedger()
    asked = _no_accountant(monkeypatch)
    dp = ledger.record(job="j", round=1, noise_multiplier=1.0, sampling_rate=0.004,
                       steps=400, pending=True)
    plain = ledger.record(job="p", round=1, steps=3, mechanism="none", pending=True)
    with caplog.at_level(logging.INFO, logger="fedge.train.accounting"):
        ledger.release(dp)
        ledger.release(plain)
    lines = [r.getMessage() for r in caplog.records if "privacy ledger" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "not computed for this line (`fedge agent privacy` shows it)" in lines[0]
    assert "mechanism none" in lines[1] and "epsilon so far unbounded" in lines[1]
    assert asked == []
    # and with the logger above INFO no line is made at all
    caplog.clear()
    again = ledger.record(job="j", round=2, noise_multiplier=1.0, sampling_rate=0.004,
                          steps=400, pending=True)
    with caplog.at_level(logging.WARNING, logger="fedge.train.accounting"):
        ledger.release(again)
    assert [r for r in caplog.records if "privacy ledger" in r.getMessage()] == []
    assert ledger.entry(again)["status"] == "released"
