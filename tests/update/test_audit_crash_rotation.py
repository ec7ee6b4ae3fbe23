"""The update audit while it rotates (``audit.jsonl`` renamed to ``audit.jsonl.1``):
two writers in one agent (an install thread, and the event loop reporting a
software outcome after a restart) rotate it once between them, and
`AgentUpdater.audit_log` read during rotations by another process neither crashes
nor misses or repeats a record. Real files, a real writer process."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedge.agent import updates as agent_updates
from fedge.agent.updates import AgentUpdater, InstallOutcome

ROTATE = 2000


def updater(state: Path) -> AgentUpdater:
    (state / "tuf" / "metadata").mkdir(parents=True, exist_ok=True)
    (state / "tuf" / "metadata" / "root.json").write_text("{}")  # enrolled (not refreshed)
    return AgentUpdater(state)


def outcome(n: int) -> InstallOutcome:
    return InstallOutcome("model", "risk", str(n), False, False, f"seq={n} " + "x" * 100)


def race_once(state: Path, monkeypatch) -> tuple[set, set, list, int]:
    """Fill the audit to its bound, then have two threads each write a line, both
    held at the rotation until the other comes (or 0.5 s: a writer holding the lock
    waits for none). Returns the versions audited before and after, what the threads
    raised, and the size of ``audit.jsonl.1``."""
    real_rotate = AgentUpdater._rotate_audit
    up = updater(state)
    audit = state / "updates" / "audit.jsonl"
    n = 0
    while not audit.exists() or audit.stat().st_size < ROTATE:
        n += 1
        up.record(outcome(n))
    before = {r["version"] for r in up.audit_log()}
    together = threading.Barrier(2, timeout=0.5)

    def rotate_together(path: Path) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            together.wait()
        real_rotate(path)

    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            up.record(outcome(k))
        except BaseException as exc:
            errors.append(exc)

    monkeypatch.setattr(AgentUpdater, "_rotate_audit", staticmethod(rotate_together))
    threads = [threading.Thread(target=write, args=(k,)) for k in (1001, 1002)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    monkeypatch.setattr(AgentUpdater, "_rotate_audit", staticmethod(real_rotate))
    after = {r["version"] for r in up.audit_log()}
    return before, after, errors, audit.with_name("audit.jsonl.1").stat().st_size


def test_two_writers_that_both_find_the_audit_full_rotate_it_once(tmp_path, monkeypatch):
    """The rotated file keeps every line written before, and both new lines are in
    the new file: none is lost (a second rename of a file already renamed), and the
    older file is not replaced by a new one of a line or two."""
    monkeypatch.setattr(agent_updates, "AUDIT_ROTATE_BYTES", ROTATE)
    for attempt in range(5):
        before, after, errors, rotated_size = race_once(tmp_path / f"s{attempt}",
                                                        monkeypatch)
        assert before and errors == []
        assert rotated_size >= ROTATE, f"attempt {attempt}: audit.jsonl.1 was replaced"
        assert after == before | {"1001", "1002"}, f"attempt {attempt}"


WRITER = """
import sys
from pathlib import Path
from fedge.agent import updates
from fedge.agent.updates import AgentUpdater, InstallOutcome
updates.AUDIT_ROTATE_BYTES = 1  # every line starts a new file: a rotation each time
up = AgentUpdater(Path(sys.argv[1]))
for i in range(1, 1_000_000):
    up.record(InstallOutcome("model", "risk", str(i), False, False, f"seq={i}"))
"""


def test_audit_log_read_while_the_agent_rotates_never_crashes_nor_misses_a_record(
        tmp_path):
    """Another process rotates on every line. Each read returns consecutive records
    (the rotated file, then the current one): none missed between the two files, none
    twice, and a file renamed away between two looks is no FileNotFoundError."""
    state = tmp_path / "state"
    updater(state)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(state)])
    try:
        reader = AgentUpdater(state)
        deadline = time.monotonic() + 10
        while not (state / "updates" / "audit.jsonl.1").exists():
            assert time.monotonic() < deadline and writer.poll() is None
            time.sleep(0.01)
        reads = 0
        end = time.monotonic() + 3
        while time.monotonic() < end:
            seqs = [int(re.match(r"seq=(\d+)", str(r["detail"])).group(1))
                    for r in reader.audit_log()]
            reads += 1
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        assert writer.poll() is None, "the writer stopped"
        assert reads > 100
    finally:
        writer.kill()
        writer.wait(10)
