"""The agent updating the software it runs: stage, restart, preflight before each
start (the unit's ExecStartPre), confirm after a good heartbeat — or, after N
starts that never confirm, back to the previous slot by itself.

A small supervisor plays systemd (ExecStartPre, then ExecStart from `current`,
Restart=on-failure); every start is a real process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import fedge
from fedge.update.ab import SelfUpdate, SlotInstaller, slot_command


def _next_minor() -> str:
    """A version newer than the packaged install (an OTA update it would take)."""
    from packaging.version import Version

    v = Version(fedge.__version__)
    return f"{v.major}.{v.minor + 1}.0"


NEXT = _next_minor()

SERVICE = r'''
import json, os, sys
from fedge.update.ab import SelfUpdate
mode, root = sys.argv[1], os.environ["FEDGE_TEST_ROOT"]
if mode == "crash":
    sys.exit(1)                      # dies before READY
if mode == "good":
    SelfUpdate(root).confirm()       # READY and a good heartbeat: keep me
    sys.exit(0)
out = SelfUpdate(root).take_outcome()  # the stable version reports what happened
with open(os.environ["FEDGE_TEST_REPORT"], "w") as f:
    json.dump(out, f)
'''


def bundle(tmp_path: Path, version: str, mode: str) -> Path:
    files = {"fedge-bundle.json": json.dumps({"version": version,
                                              "exec": ["{python}", "svc.py", mode]}).encode(),
             "svc.py": SERVICE.encode()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / f"fedge-{version}-{mode}.tar.gz"
    path.write_bytes(buf.getvalue())
    return path


def supervise(root: Path, env: dict[str, str], max_starts: int = 8) -> list[tuple]:
    """systemd, reduced: preflight, start `current`, restart while it fails."""
    runs = []
    for _ in range(max_starts):
        pre = subprocess.run([sys.executable, "-m", "fedge.update.ab", "preflight", "--root",
                              str(root), "--max-attempts", "2"], capture_output=True,
                             text=True, timeout=60, check=True).stdout.strip()
        argv, extra = slot_command(root / "current")
        rc = subprocess.run(argv, cwd=root / "current", env={**env, **extra},
                            timeout=60).returncode
        runs.append((Path(os.readlink(root / "current")).name, pre, rc))
        if rc == 0:
            break
    return runs


def test_new_version_that_confirms_is_kept(tmp_path, installed):
    root, env = installed
    SelfUpdate(root).stage("1.1.0", bundle(tmp_path, "1.1.0", "good"), rollout_id="r1",
                           path="software/fedge/1.1.0/x.tar.gz")
    assert supervise(root, env) == [("1.1.0", "trial", 0)]
    out = SelfUpdate(root).take_outcome()
    assert out["ok"] and out["rollout_id"] == "r1" and out["version"] == "1.1.0"
    assert SelfUpdate(root).pending() is None
    assert SlotInstaller(root).previous_version() == "1.0.0"


def test_new_version_that_never_confirms_is_rolled_back_by_preflight(tmp_path, installed):
    root, env = installed
    SelfUpdate(root).stage("1.1.0", bundle(tmp_path, "1.1.0", "crash"), rollout_id="r2")
    runs = supervise(root, env)
    assert runs == [("1.1.0", "trial", 1), ("1.1.0", "trial", 1),
                    ("1.0.0", "rolled_back", 0)]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False and report["rolled_back"] is True
    assert "rolled back to 1.0.0" in report["detail"] and report["rollout_id"] == "r2"
    assert SlotInstaller(root).current_version() == "1.0.0"


def test_a_first_update_that_never_confirms_goes_back_to_the_packaged_install(tmp_path):
    """No previous slot to go back to: preflight removes `current`, so the unit's
    ExecStart runs the packaged install again, and the outcome says so."""
    root = tmp_path / "software"
    SelfUpdate(root).stage(NEXT, bundle(tmp_path, NEXT, "crash"), rollout_id="r1")
    runs = []
    for _ in range(4):
        pre = subprocess.run([sys.executable, "-m", "fedge.update.ab", "preflight", "--root",
                              str(root), "--max-attempts", "2"], capture_output=True,
                             text=True, timeout=60, check=True).stdout.strip()
        out = run_unit_exec(root, [sys.executable, "-c", "print('packaged')"],
                            env={"FEDGE_TEST_ROOT": str(root)})
        runs.append((pre, out.returncode, out.stdout.strip()))
        if out.returncode == 0:
            break
    assert runs == [("trial", 1, ""), ("trial", 1, ""), ("rolled_back", 0, "packaged")]
    assert SlotInstaller(root).current_version() is None
    report = SelfUpdate(root).take_outcome()
    assert report["ok"] is False and report["rolled_back"] is True
    assert "rolled back to the packaged install" in report["detail"]
    assert SelfUpdate(root).preflight() == "none"


# A child process running ACTION (with sys.argv) that loses power before the die_at-th
# (its last argument) change it makes to the file system; it prints how many it made.
POWER_CUT = r'''
import os, sys
from fedge.update.ab import SelfUpdate
die_at = int(sys.argv[-1])
calls = 0

def power_cut(frame, event, arg):  # dies before the die_at-th change to the file system
    global calls
    if event == "c_call" and getattr(arg, "__module__", None) == "posix" and arg.__name__ in (
            "mkdir", "rename", "replace", "symlink", "unlink", "rmdir"):
        calls += 1
        if calls == die_at:
            os._exit(137)

sys.setprofile(power_cut)
ACTION
sys.setprofile(None)
print(calls)
'''
STAGER = POWER_CUT.replace(
    "ACTION", 'SelfUpdate(sys.argv[1]).stage("1.1.0", sys.argv[2], rollout_id="r1")')


def test_a_power_cut_at_any_point_of_staging_leaves_the_old_slot_or_a_trial_that_rolls_back(
        tmp_path, monkeypatch):
    """Staging a broken 1.1.0 over a running 1.0.0, cut at every change it makes to
    the disk in turn: whatever the instant, the unit (preflight, then exec) ends up
    running 1.0.0 again. Before, a cut between the switch of `current` and the write
    of pending.json left 1.1.0 current with no record: never rolled back, it
    crash-looped for ever."""
    from fedge.update.ab import SLOT_ENV, SOFTWARE_ROOT_ENV, exec_current

    monkeypatch.setenv(SOFTWARE_ROOT_ENV, "")  # exec_current sets both; undone afterwards
    monkeypatch.setenv(SLOT_ENV, "")
    broken = bundle(tmp_path, "1.1.0", "crash")
    stable = bundle(tmp_path, "1.0.0", "stable")
    die_at, ends = 1, []
    while True:
        # staging makes ~12 changes to the disk: far more means it never ends
        assert die_at <= 100, f"staging was still being cut at its 100th change: {ends[-5:]}"
        root = tmp_path / f"cut-{die_at}"
        SlotInstaller(root).unpack("1.0.0", stable)
        SlotInstaller(root).switch("1.0.0")
        staged = subprocess.run([sys.executable, "-c", STAGER, str(root), str(broken),
                                 str(die_at)], capture_output=True, text=True, timeout=60)
        assert staged.returncode in (0, 137), staged.stderr
        runs = []
        for _ in range(4):  # systemd: ExecStartPre, ExecStart, Restart=on-failure
            pre = SelfUpdate(root, max_attempts=2).preflight()
            exec_current(root, ["packaged"])
            runs.append((pre, os.environ.get(SLOT_ENV)))
            if os.environ.get(SLOT_ENV) == "1.0.0":  # 1.1.0 dies at start
                break
        ends.append((die_at, runs[-1][1]))
        assert runs[-1][1] == "1.0.0", (die_at, runs)
        assert SelfUpdate(root).pending() is None
        if staged.returncode == 0:  # staging ran to the end: it was the real trial
            assert runs == [("trial", "1.1.0"), ("trial", "1.1.0"), ("rolled_back", "1.0.0")]
            break
        die_at += 1
    assert die_at >= 5, ends  # the cut landed inside unpack, the record and the switch


def test_a_stage_that_cannot_write_its_record_or_switch_leaves_the_running_slot_current(
        tmp_path):
    """A disk that refuses a write (here: something in the way of pending.json, then
    of the new link) fails the stage with OSError, which the agent reports as
    "nothing switched", and that is true: `current`, `previous` and the next start
    are as before, and no record is left. Before, `current` had already moved to
    the new slot when the record failed, so the next start ran it untried."""
    from fedge.update.ab import PENDING

    root = tmp_path / "software"
    slots = SlotInstaller(root)
    for version in ("0.9.0", "1.0.0"):
        slots.unpack(version, bundle(tmp_path, version, "stable"))
        slots.switch(version)
    (root / PENDING).mkdir()
    (root / PENDING / "in-the-way").write_text("x")
    with pytest.raises(IsADirectoryError):
        SelfUpdate(root).stage("1.1.0", bundle(tmp_path, "1.1.0", "good"), rollout_id="r1")
    assert (slots.current_version(), slots.previous_version()) == ("1.0.0", "0.9.0")

    (root / PENDING / "in-the-way").unlink()
    (root / PENDING).rmdir()
    (root / ".current.tmp").mkdir()  # the new `current` link cannot be made
    (root / ".current.tmp" / "in-the-way").write_text("x")
    with pytest.raises(OSError):
        SelfUpdate(root).stage("1.1.0", bundle(tmp_path, "1.1.0", "good"), rollout_id="r2")
    assert (slots.current_version(), slots.previous_version()) == ("1.0.0", "0.9.0")
    assert SelfUpdate(root).pending() is None and SelfUpdate(root).preflight() == "none"


def test_a_pending_record_whose_switch_never_happened_is_dropped_by_preflight(installed):
    """pending.json names 1.1.0 but `current` is still 1.0.0 (staging died between the
    two): there is nothing on trial, so preflight drops the record and says none."""
    from fedge.update.ab import PENDING

    root, _ = installed
    (root / PENDING).write_text(json.dumps({"version": "1.1.0", "previous": "1.0.0",
                                            "attempts": 0, "rollout_id": "r1"}))
    assert SelfUpdate(root).preflight() == "none"
    assert SelfUpdate(root).pending() is None
    assert SlotInstaller(root).current_version() == "1.0.0"
    assert SelfUpdate(root).take_outcome() is None


def test_preflight_without_an_update_does_nothing_and_bad_settings_are_refused(installed):
    root, _ = installed
    assert SelfUpdate(root).preflight() == "none"
    assert SlotInstaller(root).current_version() == "1.0.0"
    with pytest.raises(ValueError, match="max_attempts 0"):
        SelfUpdate(root, max_attempts=0)


def test_agent_stages_signed_software_restarts_and_reports_after_first_ack(tmp_path, fleet,
                                                                           installed):
    import asyncio

    from fedge.agent.updates import AgentUpdateClient, AgentUpdater
    from fedge.update.messages import UpdateAvailable, UpdateFetchRequest, UpdateOutcome
    from fedge.wire import codec
    from fedge.wire import messages as _registered  # noqa: F401

    root, _ = installed
    fleet.publish("software", "fedge", "1.1.0", "fedge-1.1.0.tar.gz",
                  bundle(tmp_path, "1.1.0", "good").read_bytes())
    path = next(iter(fleet.repo.current_targets().signed.targets))
    sent: list[object] = []
    restarts: list[str] = []

    def new_client() -> AgentUpdateClient:
        client: AgentUpdateClient

        async def send(body: object) -> None:  # the connection, through the wire codec
            body = codec.decode(codec.encode(body, sender="h1"), max_bytes=1 << 21).body
            sent.append(body)
            if isinstance(body, UpdateFetchRequest):
                reply = codec.decode(codec.encode(fleet.repo.handle_fetch(body),
                                                  sender="coordinator"), max_bytes=1 << 21)
                asyncio.get_running_loop().call_soon(
                    lambda: asyncio.ensure_future(client.handle(reply.body)))

        client = AgentUpdateClient(AgentUpdater(fleet.agent_dir, clock=fleet.clock), send,
                                   self_update=SelfUpdate(root),
                                   restart=lambda: restarts.append("restart"))
        return client

    async def before_restart() -> None:
        client = new_client()
        await client.handle(UpdateAvailable("r9", path))
        await asyncio.wait_for(asyncio.gather(*client.tasks), 30)

    asyncio.run(before_restart())
    assert restarts == ["restart"]
    assert not any(isinstance(b, UpdateOutcome) for b in sent)  # not before the restart
    assert SlotInstaller(root).current_version() == "1.1.0"
    assert SelfUpdate(root).preflight() == "trial"  # ExecStartPre of the new start

    async def after_restart() -> None:
        client = new_client()
        await client.on_heartbeat_ack()
        await client.on_heartbeat_ack()  # reported once

    asyncio.run(after_restart())
    outcomes = [b for b in sent if isinstance(b, UpdateOutcome)]
    assert [(o.rollout_id, o.path, o.ok) for o in outcomes] == [("r9", path, True)]
    assert AgentUpdater(fleet.agent_dir).installed() == {"software/fedge": "1.1.0"}


def test_agent_refuses_to_stage_an_older_or_the_running_software_version(tmp_path, fleet,
                                                                         publisher):
    """Naming an older software target (no longer listed, or still listed by an earlier
    console) must not roll the appliance back, and naming the running version must not
    unpack over its own slot."""
    from fedge.agent.updates import AgentUpdater, InstallOutcome
    from fedge.update.messages import UpdateAvailable
    from tests.update.test_agent_update_client import linked

    root = tmp_path / "software"
    slots = SlotInstaller(root)
    slots.unpack("2.0.0", bundle(tmp_path, "2.0.0", "stable"))
    slots.switch("2.0.0")
    running = root / "slots" / "2.0.0" / "open-by-the-running-agent"
    running.write_text("x")
    AgentUpdater(fleet.agent_dir).record(InstallOutcome("software", "fedge", "2.0.0", True,
                                                        False, "installed"))
    paths = {version: publisher(fleet, "software", "fedge", version, f"fedge-{version}.tar.gz",
                                bundle(tmp_path, version, "good").read_bytes())
             for version in ("1.0.0", "2.0.0")}
    restarts: list[str] = []
    outcomes = linked(fleet, None, [], self_update=SelfUpdate(root),
                      restart=lambda: restarts.append("restart"),
                      asks=[UpdateAvailable("r-old", paths["1.0.0"]),
                            UpdateAvailable("r-same", paths["2.0.0"])])
    assert [(o.rollout_id, o.ok, o.rolled_back) for o in outcomes] == [
        ("r-old", False, False), ("r-same", True, False)]
    assert ("software fedge 1.0.0 is not the newest signed version: "
            f"{paths['2.0.0']!r} is") in outcomes[0].detail
    assert "software 2.0.0 is the installed software/fedge already" in outcomes[1].detail
    assert restarts == [] and SelfUpdate(root).pending() is None
    assert slots.current_version() == "2.0.0" and running.exists()


def test_a_coordinator_naming_an_older_signed_software_version_is_refused_on_a_fresh_appliance(
        tmp_path, fleet, publisher):
    """Nothing installed yet (a packaged install): 1.0.0 and 2.0.0 were signed, both
    newer than what runs, and the coordinator names 1.0.0 (no longer listed, or still
    listed by an earlier console). The agent refuses it (only the newest signed
    version of its software may go in), stages nothing and does not restart; the unit
    keeps running the packaged install."""
    from fedge.update.messages import UpdateAvailable
    from tests.update.test_agent_update_client import linked

    root = tmp_path / "software"
    paths = {version: publisher(fleet, "software", "fedge", version, f"fedge-{version}.tar.gz",
                                bundle(tmp_path, version, "good").read_bytes())
             for version in ("1.0.0", "2.0.0")}
    restarts: list[str] = []
    outcome, = linked(fleet, None, [], self_update=SelfUpdate(root),
                      restart=lambda: restarts.append("restart"),
                      asks=[UpdateAvailable("evil", paths["1.0.0"])])
    assert not outcome.ok and not outcome.rolled_back
    assert (f"software fedge 1.0.0 is not the newest signed version: {paths['2.0.0']!r}"
            in outcome.detail)
    assert restarts == [] and SelfUpdate(root).pending() is None
    assert SlotInstaller(root).current_version() is None
    assert run_unit_exec(root, [sys.executable, "-c", "print('packaged')"]).stdout == (
        "packaged\n")


def test_software_not_newer_than_the_running_slot_is_refused_though_nothing_is_recorded(
        tmp_path, fleet, monkeypatch):
    """installed.json is not the only witness: the launcher says which slot runs
    (FEDGE_SOFTWARE_SLOT). With 3.0.0 running and no record of it (a state directory
    restored from a backup, say), signed 2.0.0 is refused, and 3.0.0 is nothing to do."""
    from fedge.update.ab import SLOT_ENV
    from fedge.update.messages import UpdateAvailable
    from tests.update.test_agent_update_client import linked

    root = tmp_path / "software"
    fleet.publish("software", "fedge", "2.0.0", "fedge-2.0.0.tar.gz",
                  bundle(tmp_path, "2.0.0", "good").read_bytes())
    [path] = fleet.repo.current_targets().signed.targets
    monkeypatch.setenv(SLOT_ENV, "3.0.0")
    restarts: list[str] = []
    outcome, = linked(fleet, None, [], self_update=SelfUpdate(root),
                      restart=lambda: restarts.append("restart"),
                      asks=[UpdateAvailable("r-old", path)])
    assert not outcome.ok
    assert "software fedge 2.0.0 is older than the running software 3.0.0" in outcome.detail
    assert restarts == [] and SlotInstaller(root).current_version() is None
    monkeypatch.setenv(SLOT_ENV, "2.0.0")
    outcome, = linked(fleet, None, [], self_update=SelfUpdate(root),
                      restart=lambda: restarts.append("restart"),
                      asks=[UpdateAvailable("r-same", path)])
    assert outcome.ok and "software 2.0.0 is the running software already" in outcome.detail
    assert restarts == []


def test_software_is_one_lineage_whatever_its_target_name(tmp_path, fleet, monkeypatch):
    """A software target named other than "fedge" (a console before names were
    checked) is recorded under its own name when it confirms, and software under any
    name is compared with every installed software version: an older "fedge" after a
    newer "fedge-agent" is a rollback, refused."""
    import asyncio

    from fedge.agent.updates import AgentUpdateClient, AgentUpdater, InstallOutcome
    from fedge.update.ab import SLOT_ENV, SOFTWARE_ROOT_ENV
    from fedge.update.messages import UpdateAvailable
    from tests.update.test_agent_update_client import linked

    root = tmp_path / "software"
    fleet.publish("software", "fedge-agent", "2.0.0", "fedge-2.0.0.tar.gz",
                  bundle(tmp_path, "2.0.0", "good").read_bytes())
    [path] = fleet.repo.current_targets().signed.targets
    assert linked(fleet, None, [], self_update=SelfUpdate(root), restart=lambda: None,
                  asks=[UpdateAvailable("r1", path)]) == []  # staged; reports after restart
    assert SelfUpdate(root).pending()["name"] == "fedge-agent"
    monkeypatch.setenv(SOFTWARE_ROOT_ENV, str(root))  # the launcher ran the new slot
    monkeypatch.setenv(SLOT_ENV, "2.0.0")
    import fedge

    # and imported the slot's fedge (its site-packages on the path)
    monkeypatch.setattr(fedge, "__file__", str(root / "slots" / "2.0.0" / "site-packages"
                                               / "fedge" / "__init__.py"))

    async def first_ack() -> list:
        async def send(body: object) -> None:
            pass

        client = AgentUpdateClient(AgentUpdater(fleet.agent_dir, clock=fleet.clock), send,
                                   self_update=SelfUpdate(root), restart=lambda: None)
        await client.on_heartbeat_ack()
        return client.outcomes

    [confirmed] = asyncio.run(first_ack())
    assert confirmed.ok and confirmed.rollout_id == "r1"
    assert AgentUpdater(fleet.agent_dir).installed() == {"software/fedge-agent": "2.0.0"}

    # Another appliance of that fleet, whose newest signed "fedge" is 1.5.0: its
    # installed fedge-agent 2.0.0 is the same software, so 1.5.0 is a rollback.
    monkeypatch.delenv(SOFTWARE_ROOT_ENV)
    monkeypatch.delenv(SLOT_ENV)
    other = type(fleet)(tmp_path / "other")
    AgentUpdater(other.agent_dir).record(InstallOutcome("software", "fedge-agent", "2.0.0",
                                                        True, False, "installed"))
    other.publish("software", "fedge", "1.5.0", "fedge-1.5.0.tar.gz",
                  bundle(tmp_path, "1.5.0", "good").read_bytes())
    [old] = other.repo.current_targets().signed.targets
    restarts: list[str] = []
    outcome, = linked(other, None, [], self_update=SelfUpdate(tmp_path / "other-software"),
                      restart=lambda: restarts.append("restart"),
                      asks=[UpdateAvailable("evil", old)])
    assert not outcome.ok and restarts == []
    assert ("software fedge 1.5.0 is older than the installed software/fedge-agent 2.0.0"
            in outcome.detail)


def run_unit_exec(root: Path, fallback: list[str], env: dict[str, str] | None = None):
    """The unit's ExecStart: `python -m fedge.update.ab exec --root ROOT -- FALLBACK`."""
    return subprocess.run([sys.executable, "-m", "fedge.update.ab", "exec", "--root", str(root),
                           "--", *fallback], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_unit_exec_runs_the_packaged_install_until_an_update_is_staged(tmp_path):
    root = tmp_path / "software"
    out = run_unit_exec(root, [sys.executable, "-c", "import os; print('packaged', os.getpid())"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("packaged")


def test_a_fresh_appliance_under_the_unit_launcher_takes_its_first_software_update(
        tmp_path, fleet, monkeypatch):
    """A packaged install has no `current` slot yet; started by the unit's ExecStart
    it still updates itself (no service= needed), staging the first slot."""
    import asyncio

    from fedge.agent.updates import attach_update_client
    from fedge.update.ab import SOFTWARE_ROOT_ENV
    from fedge.update.messages import UpdateAvailable, UpdateFetchRequest, UpdateOutcome

    root = tmp_path / "software"
    packaged = ("import asyncio\n"
                "from fedge.agent.updates import attach_update_client\n"
                "class Agent:\n"
                "    async def send(self, body): pass\n"
                "    async def handle(self, env): pass\n"
                f"c = attach_update_client(Agent(), {str(fleet.agent_dir)!r})\n"
                "print(c.self_update.root if c.self_update else None)\n")
    out = run_unit_exec(root, [sys.executable, "-c", packaged])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(root)  # the packaged agent has self-update on

    fleet.publish("software", "fedge", NEXT, f"fedge-{NEXT}.tar.gz",
                  bundle(tmp_path, NEXT, "good").read_bytes())
    path = next(iter(fleet.repo.current_targets().signed.targets))
    restarts: list[str] = []
    sent: list[object] = []

    class Agent:
        async def send(self, body: object) -> None:
            sent.append(body)
            if isinstance(body, UpdateFetchRequest):
                reply = fleet.repo.handle_fetch(body)
                asyncio.get_running_loop().call_soon(
                    lambda: asyncio.ensure_future(client.handle(reply)))

        async def handle(self, env: object) -> None:
            pass

    monkeypatch.setenv(SOFTWARE_ROOT_ENV, str(root))  # as the launcher leaves it
    client = attach_update_client(Agent(), fleet.agent_dir,
                                  restart=lambda: restarts.append("restart"))
    client.updater.clock = fleet.clock

    async def first_update() -> None:
        await client.handle(UpdateAvailable("r1", path))
        await asyncio.wait_for(asyncio.gather(*client.tasks), 30)

    asyncio.run(first_update())
    assert not [b for b in sent if isinstance(b, UpdateOutcome)], sent
    assert restarts == ["restart"]
    assert SlotInstaller(root).current_version() == NEXT
    assert SelfUpdate(root).pending()["previous"] is None


def test_unit_exec_replaces_itself_with_the_current_slot(tmp_path):
    """After `stage`, the next start runs the new slot's entry point, in the same
    process (the unit's main PID is the agent: NotifyAccess=main)."""
    root = tmp_path / "software"
    report = tmp_path / "report.json"
    SelfUpdate(root).stage("1.1.0", bundle(tmp_path, "1.1.0", "report"))
    out = run_unit_exec(root, [sys.executable, "-c", "print('packaged')"],
                        env={"FEDGE_TEST_ROOT": str(root), "FEDGE_TEST_REPORT": str(report)})
    assert out.returncode == 0, out.stderr
    assert "packaged" not in out.stdout
    assert report.exists()  # the slot's svc.py ran (it reports the outcome, None here)
    assert json.loads(report.read_text()) is None


def test_unit_exec_with_a_broken_slot_fails_so_preflight_can_roll_back(tmp_path):
    root = tmp_path / "software"
    SelfUpdate(root).stage("1.1.0", bundle(tmp_path, "1.1.0", "good"))
    (root / "current" / "fedge-bundle.json").write_text("{not json")
    out = run_unit_exec(root, [sys.executable, "-c", "print('packaged')"])
    assert out.returncode == 2 and "bad fedge-bundle.json" in out.stderr


def test_unit_exec_without_a_fallback_is_a_usage_error(tmp_path):
    out = run_unit_exec(tmp_path, [])
    assert out.returncode == 2 and "fallback" in out.stderr


def test_agent_restarts_into_a_staged_update_by_leaving_with_status_75():
    """Unprivileged under systemd, the agent cannot `systemctl restart` itself: it
    leaves with 75, which the unit's Restart=on-failure / RestartForceExitStatus=75
    turn into a start (preflight, then the `current` slot)."""
    out = subprocess.run([sys.executable, "-c",
                          "from fedge.agent.updates import _systemd_restart\n"
                          "print('staged', flush=True)\n_systemd_restart()\nprint('not reached')"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 75 and out.stdout == "staged\n"
    unit = (Path(__file__).resolve().parents[2] / "packaging/systemd/fedge-agent.service")
    settings = [line.strip() for line in unit.read_text().splitlines()]
    assert "RestartForceExitStatus=75" in settings and "Restart=on-failure" in settings


def make_slot(root: Path, version: str) -> None:
    """A slot whose entry point says which version ran and what the launcher left it."""
    slot = root / "slots" / version
    slot.mkdir(parents=True)
    (slot / "fedge-bundle.json").write_text(json.dumps({"version": version, "exec": [
        "{python}", "-c", "import os; print('slot', os.environ['FEDGE_SOFTWARE_SLOT'], "
        "os.environ['FEDGE_SOFTWARE_ROOT'])"]}))
    (root / "current").unlink(missing_ok=True)
    (root / "current").symlink_to(Path("slots") / version)


PACKAGED = [sys.executable, "-c", "import os; print('packaged', os.environ['FEDGE_SOFTWARE_ROOT'])"]


def test_a_deb_upgrade_past_an_old_ota_slot_runs_the_packaged_install(tmp_path):
    """The appliance once took OTA update 0.0.1; the .deb since installed a newer
    fedge (postinst never touches the slot root). The launcher must run the .deb."""
    from packaging.version import Version

    import fedge

    assert Version(fedge.__version__) > Version("0.0.1")
    root = tmp_path / "software"
    make_slot(root, "0.0.1")
    out = run_unit_exec(root, PACKAGED)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["packaged", str(root)]
    assert (f"software slot 0.0.1 is not newer than the packaged install {fedge.__version__}"
            in out.stderr)

    make_slot(root, fedge.__version__)  # the same version: the packaged install wins
    out = run_unit_exec(root, PACKAGED)
    assert out.stdout.split() == ["packaged", str(root)], out.stderr


def test_an_ota_slot_newer_than_the_packaged_install_is_what_runs(tmp_path):
    """Versions compare as versions, not strings; unparseable ones never win."""
    from packaging.version import Version

    from fedge.update.ab import slot_is_newer

    assert slot_is_newer("0.10.0", "0.9.0") and not slot_is_newer("0.2.0rc1", "0.2.0")
    assert not slot_is_newer("0.2.0", "0.2.0") and not slot_is_newer("latest", "0.1.0")

    import fedge

    newer = f"{Version(fedge.__version__).major + 10}.0.0"
    root = tmp_path / "software"
    make_slot(root, newer)
    out = run_unit_exec(root, PACKAGED)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["slot", newer, str(root)]
    assert f"running software slot {newer}" in out.stderr


def test_a_trial_the_launcher_did_not_run_is_dropped_not_confirmed(tmp_path, monkeypatch):
    """Software 0.0.2 was staged, then a newer .deb landed before the restart: the
    launcher runs the packaged install, whose first heartbeat ack must not mark the
    unrun 0.0.2 healthy. The update is dropped and reported as superseded; a trial the
    launcher did run is confirmed as before."""
    import fedge
    from fedge.update.ab import exec_current

    root = tmp_path / "software"
    SelfUpdate(root).stage("0.0.2", bundle(tmp_path, "0.0.2", "good"), rollout_id="r9")
    # registered with monkeypatch so that what exec_current writes is undone afterwards
    monkeypatch.setenv("FEDGE_SOFTWARE_ROOT", "")
    monkeypatch.setenv("FEDGE_SOFTWARE_SLOT", "0.0.2")  # left over: the launcher resets it
    assert exec_current(root, ["/usr/bin/fedge", "agent"]) == ["/usr/bin/fedge", "agent"]
    assert "FEDGE_SOFTWARE_SLOT" not in os.environ
    assert not SelfUpdate(root).confirm()
    assert SelfUpdate(root).pending() is None
    out = SelfUpdate(root).take_outcome()
    assert out["rollout_id"] == "r9" and not out["ok"] and not out["rolled_back"]
    assert (f"software 0.0.2 not run: the packaged install {fedge.__version__} is newer"
            in out["detail"])
    # a staged version the launcher does run is confirmed
    newer = "99.0.0"
    SelfUpdate(root).stage(newer, bundle(tmp_path, newer, "good"), rollout_id="r10")
    exec_current(root, ["/usr/bin/fedge", "agent"])
    assert os.environ["FEDGE_SOFTWARE_SLOT"] == newer
    # the slot's process imports its own fedge
    monkeypatch.setattr(fedge, "__file__", str(root / "slots" / newer / "site-packages"
                                               / "fedge" / "__init__.py"))
    assert SelfUpdate(root).confirm() and SelfUpdate(root).take_outcome()["ok"]


def test_a_slot_that_runs_the_packaged_fedge_is_rolled_back_not_confirmed(
        tmp_path, monkeypatch):
    """A bundle whose command does not put its own fedge on the path (no PYTHONPATH to
    its site-packages) runs the packaged code under the slot's name: its first
    heartbeat ack must not report the update healthy. It is rolled back, saying what
    ran, and an update that does import its own fedge is still confirmed."""
    import fedge
    from fedge.update.ab import exec_current

    root = tmp_path / "software"
    SelfUpdate(root).stage("99.0.0", bundle(tmp_path, "99.0.0", "good"), rollout_id="r1")
    monkeypatch.setenv("FEDGE_SOFTWARE_ROOT", "")
    monkeypatch.setenv("FEDGE_SOFTWARE_SLOT", "")
    exec_current(root, ["/usr/bin/fedge", "agent"])
    assert os.environ["FEDGE_SOFTWARE_SLOT"] == "99.0.0"  # the slot runs, fedge is 0.2
    assert not SelfUpdate(root).confirm()
    out = SelfUpdate(root).take_outcome()
    assert out["rollout_id"] == "r1" and not out["ok"] and out["rolled_back"]
    assert (f"software 99.0.0's slot ran, but the fedge it imported is "
            f"{Path(fedge.__file__).resolve().parent}, not the slot's "
            f"{(root / 'slots' / '99.0.0').resolve()}" in out["detail"])
    assert "PYTHONPATH" in out["detail"]
    assert SelfUpdate(root).pending() is None
    assert SlotInstaller(root).current_version() is None  # back to the packaged install
    # the bundle's own code runs: confirmed, whatever version its metadata (or the
    # packaged install's, when the bundle carries none) gives fedge.__version__
    SelfUpdate(root).stage("99.1", bundle(tmp_path, "99.1", "good"), rollout_id="r2")
    exec_current(root, ["/usr/bin/fedge", "agent"])
    monkeypatch.setattr(fedge, "__file__", str(root / "current" / "site-packages"
                                               / "fedge" / "__init__.py"))
    assert fedge.__version__ != "99.1"
    assert SelfUpdate(root).confirm() and SelfUpdate(root).take_outcome()["ok"]


def test_the_launcher_environment_did_not_leak_into_later_tests():
    assert "FEDGE_SOFTWARE_ROOT" not in os.environ and "FEDGE_SOFTWARE_SLOT" not in os.environ
