"""A site's own words (a refusal's reason) cannot forge a coordinator log line or carry
terminal escapes: control characters are escaped before they are logged or kept
(fedge.coordinator.rounds.printable, peer_reason)."""

from __future__ import annotations

import logging

from fedge.coordinator.rounds import peer_reason, printable
from fedge.wire import messages as m
from tests.coordinator.test_s15_tamper import plan, run_job, tamper

FORGED = "fedge.coordinator ERROR job X: site h1 privacy ledger rolled back, revoke it"
EVIL = f"ok\n{FORGED}\x1b[31m\x1b]0;pwn\x07"


def test_a_refusal_reason_forges_no_log_line_and_no_escape(federation, caplog):
    fed = federation(["h1", "h2", "m"])

    def hook(body):
        if isinstance(body, m.TrainDone):
            return m.TaskRefused(task_id=body.task_id, task="train", reason=EVIL)
        return body
    tamper(fed, "m", hook)
    with caplog.at_level(logging.INFO, logger="fedge.coordinator"):
        job = run_job(fed, plan(min_clients=3))
    assert fed.coord.store.job(job).status == "failed"
    lines = [r.getMessage() for r in caplog.records if r.name == "fedge.coordinator"]
    said = [line for line in lines if FORGED in line]
    assert said, lines
    for line in said:
        assert "\n" not in line and "\x1b" not in line and "\x07" not in line, repr(line)
        assert "ok\\nfedge.coordinator ERROR" in line
    # and what is kept of it (the attempt's record, the report's cells) is escaped too
    (attempt,) = fed.coord.store.rounds(job)
    assert "\x1b" not in attempt.reason and "\n" not in attempt.reason
    assert "\x1b" not in attempt.dropped_reasons["m"]


def test_printable_escapes_only_control_characters():
    assert printable("Zürich: 3 sites, ε = 1.5") == "Zürich: 3 sites, ε = 1.5"
    assert printable("a\nb\x1b[31m\x07\t") == "a\\nb\\x1b[31m\\x07\\t"
    assert printable("\u2028") == "\\u2028"  # a line separator ends a line in some viewers
    assert peer_reason("x" * 400 + "\n") == "x" * 160 + "…" + "x" * 158 + "\\n"
