"""A software update on trial whose first heartbeat ack comes while the disk is full:
`SelfUpdate.confirm` cannot write outcome.json. It once raised out of the ack (an
"internal error handling" traceback), and as the first ack had already marked the
client acked, no later ack tried again: the healthy update stayed on trial until a
restart, and every push meanwhile was refused as on trial. Now the failure is one
ERROR line naming the slot root, logged once however many acks find the disk still
full, and the first ack after space comes back confirms it and reports the outcome.

The full disk is a file-size limit (RLIMIT_FSIZE: every write past 16 bytes fails,
as on a full disk), set and lifted inside a real agent update client in a subprocess,
so that it needs no mount and no root and cannot touch pytest's own files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import asyncio, json, logging, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from fedge.agent.updates import AgentUpdateClient, AgentUpdater
from fedge.update.ab import SelfUpdate
from tests.update.conftest import Fleet
from tests.update.test_self_update import bundle

logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(levelname)s %(name)s: %(message)s")
tmp = Path(sys.argv[1])
fleet = Fleet(tmp)
root = tmp / "software"
SelfUpdate(root).stage("2.0.0", bundle(tmp, "2.0.0", "good"), rollout_id="r1")
sent = []


async def send(body):
    sent.append(body)


client = AgentUpdateClient(AgentUpdater(fleet.agent_dir, clock=fleet.clock), send,
                           self_update=SelfUpdate(root), restart=lambda: None)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
report = {}


async def main():
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, hard))  # the disk is full
    for i in (1, 2, 3):
        try:
            await client.on_heartbeat_ack()
        except Exception as exc:
            report[f"ack {i}"] = f"raised {type(exc).__name__}: {exc}"
    report["on trial while full"] = (root / "pending.json").exists()
    report["sent while full"] = len(sent)
    report["confirmed"] = client.confirmed
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space comes back
    print("--- space back", file=sys.stderr, flush=True)
    await client.on_heartbeat_ack()
    report["on trial after"] = (root / "pending.json").exists()
    report["sent"] = [(o.rollout_id, o.ok, o.detail) for o in sent]
    await client.on_heartbeat_ack()  # done: nothing more is sent
    report["sent at the end"] = len(sent)


asyncio.run(main())
print(json.dumps(report))
'''


def test_a_confirm_the_full_disk_refused_is_retried_at_a_later_ack(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(REPO)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert not report["on trial after"], report  # the later ack confirmed it
    assert not any(k.startswith("ack ") for k in report), report  # nothing raised
    assert report["on trial while full"] and report["sent while full"] == 0
    assert report["confirmed"]  # the ack came: the unit's trial timer is satisfied
    assert report["sent"] == [["r1", True, "software 2.0.0 healthy after 0 start(s)"]]
    assert report["sent at the end"] == 1
    full, back = done.stderr.split("--- space back")
    root = tmp_path / "software"
    errors = [line for line in full.splitlines() if line.startswith("ERROR")]
    assert errors == [
        f"ERROR fedge.agent.updates: software update: cannot record this start's "
        f"confirmation or take the last update's outcome in {root} (File too large: "
        f"{root}); tried again at the next heartbeat ack"], full
    assert "Traceback" not in done.stderr
    assert f"INFO fedge.agent.updates: software update: recorded in {root} after all" in back
