"""An update outcome whose audit line the disk has no room for is still the outcome:
a model that installed is reported installed, and a software update's outcome after
its restart is reported, whatever ``updates/audit.jsonl`` could hold. The failed line
is logged at ERROR, naming the file and the outcome it lacks.

The agent's state dir is a real 1 MiB tmpfs, filled by "another writer" (a file
written until the disk refuses more) at the moment the install is done; the model
repository and the software slots are on another file system, as a real appliance's
may be. Needs root (mount); skipped where mounting is not permitted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

from fedge.agent.updates import AgentUpdateClient, AgentUpdater
from fedge.serve.repository import ModelRepository
from fedge.update.ab import SelfUpdate
from fedge.update.messages import UpdateAvailable
from tests.update.conftest import Fleet
from tests.update.test_agent_update_client import linked
from tests.update.test_self_update import bundle


@contextlib.contextmanager
def small_disk(path: Path, size: str = "1m"):
    """`path` as its own tmpfs of `size`; skips the test where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (a real full disk)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Take every free block of `disk` (another writer: a journal, a checkpoint)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)
    return filler


class FillsTheDiskAfterInstall:
    """A real model repository; once a model is in it, the agent's disk fills."""

    def __init__(self, repo: ModelRepository, disk: Path) -> None:
        self.repo, self.disk = repo, disk

    def install(self, name, onnx):
        served = self.repo.install(name, onnx)
        fill(self.disk)
        return served

    def __getattr__(self, name):
        return getattr(self.repo, name)


def audit_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "fedge.agent.updates" and r.levelno == logging.ERROR]


def test_a_model_that_installed_is_reported_installed_when_its_audit_line_finds_no_room(
        tmp_path, make_onnx, caplog):
    with small_disk(tmp_path / "agent") as disk:
        fleet = Fleet(tmp_path)
        path = fleet.publish("model", "risk", "4", "model.onnx", make_onnx(4.0))
        repo = ModelRepository(tmp_path / "models")  # another file system
        with caplog.at_level(logging.INFO, logger="fedge.agent.updates"):
            out, = linked(fleet, FillsTheDiskAfterInstall(repo, disk), [],
                          asks=[UpdateAvailable("r1", path)])
        # what the coordinator is told is what happened: the model is served
        assert out.ok, out.detail
        assert out.detail.startswith("model risk 4 installed")
        assert repo.versions("risk") == [1]
        audit = disk / "updates" / "audit.jsonl"
        assert not audit.exists() or audit.read_text() == ""
        [lost] = [m for m in audit_errors(caplog) if str(audit) in m]
        assert "lacks the outcome of roll-out r1, model risk 4 installed" in lost
        assert "No space left on device" in lost

        # room again: the next outcome is audited as ever
        (disk / "filler").unlink()
        path5 = fleet.publish("model", "risk", "5", "model.onnx", make_onnx(5.0))
        again, = linked(fleet, repo, [], asks=[UpdateAvailable("r2", path5)])
        assert again.ok, again.detail
        [line] = [json.loads(x) for x in audit.read_text().splitlines()]
        assert (line["rollout_id"], line["version"], line["ok"]) == ("r2", "5", True)


def test_a_software_outcome_after_its_restart_is_reported_when_its_audit_line_finds_no_room(
        tmp_path, caplog):
    """The outcome file is taken (removed) at the first heartbeat ack after the
    restart: an audit line that cannot be written must not keep it from the
    coordinator, nor lose it."""
    with small_disk(tmp_path / "agent") as disk:
        fleet = Fleet(tmp_path)
        root = tmp_path / "software"  # the slots: another file system
        path = fleet.publish("software", "fedge", "2.0.0", "fedge-2.0.0.tar.gz",
                             bundle(tmp_path, "2.0.0", "good").read_bytes())
        assert linked(fleet, None, [], self_update=SelfUpdate(root), restart=lambda: None,
                      asks=[UpdateAvailable("r1", path)]) == []  # staged
        fill(disk)
        sent: list[object] = []

        async def first_ack() -> list:
            async def send(body: object) -> None:
                sent.append(body)

            client = AgentUpdateClient(AgentUpdater(fleet.agent_dir, clock=fleet.clock),
                                       send, self_update=SelfUpdate(root),
                                       restart=lambda: None)
            await client.on_heartbeat_ack()
            return client.outcomes

        with caplog.at_level(logging.INFO, logger="fedge.agent.updates"):
            confirmed = asyncio.run(first_ack())
        assert [(o.rollout_id, o.ok) for o in confirmed] == [("r1", True)]
        assert sent == confirmed
        audit = disk / "updates" / "audit.jsonl"
        [lost] = [m for m in audit_errors(caplog) if str(audit) in m]
        assert "lacks the outcome of roll-out r1, software fedge 2.0.0 installed" in lost
