"""A slow disk does not stall the agent's event loop: the privacy ledger, the reveal
log and the job state are fsynced on the agent's durable-writes thread, still before
what they guard leaves. Real Agents over TorchTrainer (Fed-TCGA-BRCA, DP-SGD), the
real SecAgg+ ServerSession played by the test (tests/agent/test_guard.py's Fleet),
files on disk; ``os.fsync`` is slowed as a degraded disk would be (the real fsync
still runs)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.jobstate import JobStateStore
from fedge.agent.trainer import TorchTrainer, ledger_path
from fedge.secagg.messages import MaskedInput, UnmaskShares
from fedge.train.accounting import PrivacyLedger
from fedge.wire import codec
from fedge.wire import messages as m
from tests.agent.test_guard import SITES, Fleet
from tests.agent.test_privacy_release import BOUNDED, DATA, DP_PLAN, D, statuses

FSYNC_DELAY_S = 0.5  # one write_atomic fsyncs twice (file, directory): 1 s on this disk
MAX_LOOP_LAG_S = 0.4  # below one slowed fsync: none of them may run on the loop


@pytest.fixture
def slow_fsync(monkeypatch):
    """os.fsync takes FSYNC_DELAY_S longer; returns the names of the threads that
    called it."""
    real = os.fsync
    callers: list[str] = []

    def slow(fd):
        callers.append(threading.current_thread().name)
        time.sleep(FSYNC_DELAY_S)
        return real(fd)

    monkeypatch.setattr(os, "fsync", slow)
    return callers


def dp_fleet(tmp_path: Path) -> Fleet:
    """Three agents under DP-SGD with their ledgers, reveal logs and job state on disk;
    ``fleet.sent``: (site, message, the statuses of its ledger on disk as it left, the
    lines of its reveal log on disk as it left)."""
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")
    fleet = Fleet(tmp=tmp_path)
    fleet.weights = np.zeros(D, np.float32)
    fleet.sent = []
    for i, (site, agent) in enumerate(fleet.agents.items()):
        agent.trainer = TorchTrainer(
            [{"name": "brca", "kind": "fed_tcga_brca", "path": str(DATA), "site": i,
              **BOUNDED}], state_dir=tmp_path / site)
        agent.job_state = JobStateStore(tmp_path / site / "agent-jobs")

        async def send(frames, site=site):
            body = codec.decode([bytes(f) for f in frames], max_bytes=1 << 24).body
            reveals = tmp_path / site / "revealed.jsonl"
            fleet.sent.append((site, body, statuses(
                PrivacyLedger.load(ledger_path(tmp_path / site))),
                reveals.read_text().count("\n") if reveals.exists() else 0))
            fleet.inbox.append((site, body))

        agent.send_frames = send
    return fleet


async def with_lag_probe(work):
    """(work's result, the longest the loop was late to wake a 50 ms sleeper)."""
    lags = [0.0]

    async def probe():
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.05)
            lags.append(loop.time() - t - 0.05)

    p = asyncio.ensure_future(probe())
    try:
        return await work, max(lags)
    finally:
        p.cancel()


def test_a_slow_disk_does_not_stall_the_loop_and_the_ledger_still_leads_the_input(
        tmp_path, slow_fsync):
    """A DP + secure-aggregation round with every fsync 0.5 s slow: the event loop
    (heartbeats, the watchdog) is never late by as much as one fsync; each site's
    ledger says released on disk before its masked input leaves, and its reveal log
    holds the sum before its shares leave; the plan digest and ledger were fsynced,
    but never on the loop's thread."""
    f = dp_fleet(tmp_path)

    async def round_():
        await f.train(SITES, "t1", plan=DP_PLAN)
        assert {s for s, b in f.inbox if isinstance(b, m.TrainDone)} == set(SITES), \
            f.refusals()
        return await f.aggregate(SITES, "t1")

    total, lag = asyncio.run(with_lag_probe(round_()))
    assert total is not None, f.refusals()
    assert lag < MAX_LOOP_LAG_S, f"the event loop stalled {lag:.2f} s on a slow fsync"
    assert slow_fsync and threading.main_thread().name not in slow_fsync, slow_fsync
    for site in SITES:
        (before_input,) = [st for s, b, st, _ in f.sent
                           if s == site and isinstance(b, MaskedInput)]
        assert before_input == ["released"]
        (recorded,) = [n for s, b, _, n in f.sent if s == site and isinstance(b, UnmaskShares)]
        assert recorded >= 1  # the sum's survivors were on disk before the shares left
        assert f.agents[site].job_plan("job1") is not None
        assert JobStateStore(tmp_path / site / "agent-jobs").load("job1", "plan")
