"""A software update's trial deferred on a slot root that cannot be written (2087c5d:
preflight says "deferred", the launcher runs the version before it with
FEDGE_SOFTWARE_TRIAL_DEFERRED) is resumed once the slot root can be written again,
while the agent runs: it was not. Every heartbeat ack's confirm leaves a deferred trial
(by design), so nothing restarted the agent, and every push was refused as "on trial
... push it again once it is confirmed" until someone restarted it by hand. And the
old version, no ack ever confirming the deferred trial, exited 75 every update_trial_s
for nothing.

Now the agent looks at the slot root every DEFERRED_CHECK_S (off the event loop: the
trial's record written back as it is, as preflight will), and once it can be written
restarts as after a staged update: at once when idle, else when the round in hand is
over, exiting 75 (the unit's RestartForceExitStatus); the next start counts the trial.
While deferred, no trial timer runs.

Real processes: the unit's preflight and launcher, the agent (coordinator down) on an
enrolled state dir whose software/ it may not write (as root, run with CAP_DAC_OVERRIDE
dropped by setpriv), then made writable; and a real AgentUpdateClient on a slot root
under a file-size limit (RLIMIT_FSIZE, as a full disk) for the round boundary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedge.update.ab import SelfUpdate
from tests.agent.test_agent_systemd import appliance_in_trial
from tests.sdnotify import notify_socket

REPO = Path(__file__).resolve().parents[2]
NODAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
         "--inh-caps", "-dac_override,-dac_read_search", "--"]
# the packaged install's agent (what the launcher runs while the trial is deferred),
# looking at the slot root every 0.3 s instead of every minute
AGENT = r'''
import sys
import fedge.agent.updates
fedge.agent.updates.DEFERRED_CHECK_S = 0.3
from fedge.cli import main
sys.exit(main(["agent", "run", "--config", sys.argv[1]]))
'''


def set_writable(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755 if writable else 0o555)


def test_a_deferred_trial_is_resumed_once_the_slot_root_can_be_written(tmp_path) -> None:
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop CAP_DAC_OVERRIDE")
    prefix = NODAC if os.geteuid() == 0 else []
    # update_trial_s = 1: the old version exited 75 after it, the trial still deferred
    _, software = appliance_in_trial(tmp_path, "update_trial_s = 1.0\n")
    config = tmp_path / "agent.toml"
    env = {k: v for k, v in os.environ.items() if k not in (
        "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "FEDGE_SOFTWARE_ROOT",
        "FEDGE_SOFTWARE_SLOT", "FEDGE_SOFTWARE_TRIAL_DEFERRED")}
    before = (software / "pending.json").read_text()
    set_writable(software, False)
    try:
        pre = subprocess.run([*prefix, sys.executable, "-m", "fedge.update.ab", "preflight",
                              "--root", str(software)], capture_output=True, text=True,
                             timeout=60, env=env, cwd=REPO)
        assert pre.stdout == "deferred\n", pre.stderr
        with notify_socket() as notify:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "fedge.update.ab", "exec", "--root",
                 str(software), "--", sys.executable, "-c", AGENT, str(config)],
                env={**env, "NOTIFY_SOCKET": notify.getsockname()}, cwd=REPO,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                notify.settimeout(90)
                while "READY=1" not in notify.recv(4096).decode().splitlines():
                    pass
                time.sleep(3.0)  # the trial timer (1 s) would have fired by now
                assert proc.poll() is None, proc.communicate()
                assert (software / "pending.json").read_text() == before
                set_writable(software, True)  # space freed, the disk remounted rw
                _, err = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    finally:
        set_writable(software, True)
    assert proc.returncode == 75, err  # RestartForceExitStatus: systemd starts it again
    assert "no heartbeat ack" not in err
    assert (f"software 90.0.0's trial, deferred while {software} could not be written, "
            "can go on: it can be written again; restarting into it") in err, err
    # systemd's next start: the trial is counted, and the launcher runs it
    pre = subprocess.run([sys.executable, "-m", "fedge.update.ab", "preflight", "--root",
                          str(software)], capture_output=True, text=True, timeout=60,
                         env=env, cwd=REPO)
    assert pre.stdout == "trial\n", pre.stderr
    assert json.loads((software / "pending.json").read_text())["attempts"] == 1


ROUND = r'''
import asyncio, json, logging, os, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from fedge.agent.updates import AgentUpdateClient, AgentUpdater
from fedge.update.ab import SelfUpdate
from tests.update.conftest import Fleet
from tests.update.test_s17_preflight_unwritable import TRIAL, on_trial

logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(levelname)s %(name)s: %(message)s")
tmp = Path(sys.argv[1])
fleet = Fleet(tmp)
root = tmp / "software"
on_trial(root)
os.environ.update({"FEDGE_SOFTWARE_ROOT": str(root), "FEDGE_SOFTWARE_SLOT": "98.0.0",
                   "FEDGE_SOFTWARE_TRIAL_DEFERRED": TRIAL})
held = [("job1", 3)]
restarts = []


async def send(body):
    pass


client = AgentUpdateClient(AgentUpdater(fleet.agent_dir, clock=fleet.clock), send,
                           self_update=SelfUpdate(root), restart=lambda: restarts.append(1),
                           held_round=lambda: held[0])
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
report = {"deferred": client.self_update.deferred_trial()}


async def main():
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, hard))  # the disk is full
    watch = asyncio.ensure_future(client.resume_deferred_trial(TRIAL, every_s=0.05))
    await asyncio.sleep(0.5)
    report["restarted while full"] = len(restarts)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space comes back
    print("--- space back", file=sys.stderr, flush=True)
    await asyncio.sleep(0.5)
    report["restarted in the round"] = len(restarts)
    held[0] = None  # the round is over
    client.agent_idle()
    await asyncio.wait_for(watch, 10)
    report["restarted"] = len(restarts)
    report["attempts"] = json.loads((root / "pending.json").read_text())["attempts"]


asyncio.run(main())
print(json.dumps(report))
'''


def test_the_restart_waits_for_the_round_in_hand(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", ROUND, str(tmp_path), str(REPO)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == {"deferred": "99.0.0", "restarted while full": 0,
                      "restarted in the round": 0, "restarted": 1, "attempts": 1}
    full, back = done.stderr.split("--- space back")
    root = tmp_path / "software"
    said = [line for line in full.splitlines() if "stays deferred" in line]
    assert said == [f"INFO fedge.agent.updates: software 99.0.0's trial stays deferred: "
                    f"{root} cannot be written (File too large: {root}); looked at again "
                    "every 0.05 s"], full  # once, however many looks
    what = (f"software 99.0.0's trial, deferred while {root} could not be written, can go "
            "on: it can be written again")
    assert f"{what}; restarting after round 3 of job job1 ends" in back
    assert f"{what}; round 3 of job job1 is over: restarting into it" in back


def test_a_trial_no_longer_pending_is_not_resumed(tmp_path: Path, monkeypatch) -> None:
    """Rolled back or confirmed by another hand meanwhile: nothing to restart for."""
    import asyncio

    from fedge.agent.updates import AgentUpdateClient, AgentUpdater
    from tests.update.conftest import Fleet
    from tests.update.test_s17_preflight_unwritable import TRIAL, on_trial

    fleet = Fleet(tmp_path)
    root = tmp_path / "software"
    on_trial(root)
    monkeypatch.setenv("FEDGE_SOFTWARE_TRIAL_DEFERRED", TRIAL)
    restarts: list[int] = []

    async def send(body: object) -> None:
        pass

    client = AgentUpdateClient(AgentUpdater(fleet.agent_dir, clock=fleet.clock), send,
                               self_update=SelfUpdate(root),
                               restart=lambda: restarts.append(1))
    assert client.self_update is not None and client.self_update.deferred_trial() == TRIAL
    (root / "pending.json").unlink()
    assert client.self_update.deferred_trial() is None
    asyncio.run(asyncio.wait_for(client.resume_deferred_trial(TRIAL, every_s=0.01), 10))
    assert restarts == []
