"""Software slots do not pile up: once a switch is confirmed (the agent's own
`SelfUpdate.confirm`, or a healthy `SlotInstaller.install_and_switch`) every slot
goes but `current`, `previous` and what pending.json / outcome.json name. Nothing
goes while a switch is on trial, a rollback still finds its slot, and a removal
killed at any instant leaves whole slots or a temporary the next open sweeps."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.update.ab import (
    OUTCOME,
    PENDING,
    SLOT_TEMP_NAME,
    SOFTWARE_ROOT_ENV,
    HealthCheckFailed,
    NotifyProcessService,
    SelfUpdate,
    SlotInstaller,
    SoftwareOnTrial,
)
from tests.update.test_ab_install import write_bundle
from tests.update.test_self_update import POWER_CUT, bundle, supervise
from tests.update.test_sweep import age, kill, paused_child


def slot_names(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "slots").iterdir())


def whole(root: Path, version: str) -> bool:
    """Whether slots/<version> holds everything its bundle put there."""
    slot = root / "slots" / version
    return ((slot / "svc.py").is_file()
            and json.loads((slot / "fedge-bundle.json").read_text())["version"] == version)


def push(tmp_path: Path, root: Path, env: dict[str, str], version: str, mode: str) -> list:
    """One software update as the appliance takes it: stage, then the unit's starts
    (preflight, the slot) until one exits 0; a "good" slot confirms itself."""
    SelfUpdate(root).stage(version, bundle(tmp_path, version, mode), rollout_id=f"r-{version}")
    return supervise(root, env)


def test_after_many_confirmed_updates_only_the_current_and_previous_slots_remain(
        tmp_path, installed):
    """Before, every push left its slot for ever: six pushes, seven slots (1.4 GB
    each for a bundle that carries a venv)."""
    root, env = installed
    versions = ["1.0.0"]
    for minor in range(1, 7):
        version = f"1.{minor}.0"
        assert push(tmp_path, root, env, version, "good") == [(version, "trial", 0)]
        assert SelfUpdate(root).take_outcome()["ok"]
        assert slot_names(root) == sorted([versions[-1], version])
        versions.append(version)
    slots = SlotInstaller(root)
    assert (slots.current_version(), slots.previous_version()) == ("1.6.0", "1.5.0")
    assert whole(root, "1.6.0") and whole(root, "1.5.0")
    assert [p.name for p in (root / "slots").iterdir() if p.name.startswith(".")] == []


def test_a_rollback_after_pruning_still_returns_to_the_previous_slot(tmp_path, installed):
    root, env = installed
    for version in ("1.1.0", "1.2.0", "1.3.0"):
        push(tmp_path, root, env, version, "good")
    assert slot_names(root) == ["1.2.0", "1.3.0"]
    assert push(tmp_path, root, env, "1.4.0", "crash") == [
        ("1.4.0", "trial", 1), ("1.4.0", "trial", 1), ("1.3.0", "rolled_back", 0)]
    report = SelfUpdate(root).take_outcome()
    assert report["rolled_back"] and "rolled back to 1.3.0" in report["detail"]
    assert SlotInstaller(root).current_version() == "1.3.0" and whole(root, "1.3.0")
    # the failed slot is `previous` until the next confirmed update removes it
    assert push(tmp_path, root, env, "1.5.0", "good") == [("1.5.0", "trial", 0)]
    assert slot_names(root) == ["1.3.0", "1.5.0"]


def test_nothing_is_pruned_while_a_switch_is_on_trial(tmp_path, installed):
    """Slots an earlier release never pruned are still there when 1.3.0 is staged: a
    prune then (here called directly, as a healthy install_and_switch in the same root
    would) removes nothing, the rollback target above all. The confirm does prune."""
    root, _ = installed
    slots = SlotInstaller(root)
    for version in ("0.8.0", "0.9.0", "1.2.0"):  # left by a release that kept them all
        slots.unpack(version, bundle(tmp_path, version, "stable"))
    slots.switch("1.2.0")
    SelfUpdate(root).stage("1.3.0", bundle(tmp_path, "1.3.0", "good"), rollout_id="r1")
    assert SelfUpdate(root).pending()["previous"] == "1.2.0"
    before = slot_names(root)
    assert SlotInstaller(root).prune() == []
    assert slot_names(root) == before == ["0.8.0", "0.9.0", "1.0.0", "1.2.0", "1.3.0"]
    assert SelfUpdate(root).preflight() == "trial"
    assert SlotInstaller(root).prune() == [] and slot_names(root) == before

    assert SelfUpdate(root).confirm()
    assert slot_names(root) == ["1.2.0", "1.3.0"]


def test_a_torn_pending_record_prunes_nothing_and_an_unreported_outcome_keeps_its_version(
        tmp_path, installed):
    root, _ = installed
    slots = SlotInstaller(root)
    for version in ("0.7.0", "0.8.0", "0.9.0", "1.1.0"):
        slots.unpack(version, bundle(tmp_path, version, "stable"))
    slots.switch("1.1.0")
    (root / PENDING).write_text('{"version": "1.')  # a write torn by a power cut
    assert slots.prune() == [] and len(slot_names(root)) == 5
    (root / PENDING).unlink()
    (root / OUTCOME).write_text(json.dumps({"version": "0.8.0", "ok": False}))
    assert slots.prune() == ["0.7.0", "0.9.0"]
    assert slot_names(root) == ["0.8.0", "1.0.0", "1.1.0"]


def test_only_directories_with_a_slots_name_are_removed(tmp_path, installed):
    root, _ = installed
    slots = SlotInstaller(root)
    for version in ("0.9.0", "1.1.0"):
        slots.unpack(version, bundle(tmp_path, version, "stable"))
    slots.switch("1.1.0")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep").write_text("x")
    s = root / "slots"
    (s / "0.5.0").symlink_to(outside)  # a link with a slot's name
    (s / "0.6.0").write_text("a file")
    for name in ("notes", ".keep", "1.0.0rc1", "1.2.3.4.5", ".0.4.0.abcdefgh"):
        (s / name).mkdir()
    assert slots.prune() == ["0.9.0"]
    assert slot_names(root) == [".0.4.0.abcdefgh", ".keep", "0.5.0", "0.6.0", "1.0.0",
                                "1.0.0rc1", "1.1.0", "1.2.3.4.5", "notes"]
    assert (outside / "keep").is_file()


def test_a_slot_that_cannot_be_removed_is_logged_and_left_and_the_confirm_stands(
        tmp_path, installed, monkeypatch, caplog):
    root, _ = installed
    slots = SlotInstaller(root)
    for version in ("0.7.0", "0.8.0", "0.9.0"):
        slots.unpack(version, bundle(tmp_path, version, "stable"))
    SelfUpdate(root).stage("1.1.0", bundle(tmp_path, "1.1.0", "good"), rollout_id="r1")
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def rename(src, dst, *args, **kw):
        if Path(src).name == "0.7.0":
            raise PermissionError(13, "Permission denied", str(src))
        return real_rename(src, dst, *args, **kw)

    def rmtree(path, *args, **kw):
        if Path(path).name.startswith(".0.8.0."):
            raise PermissionError(13, "Permission denied", str(path))
        return real_rmtree(path, *args, **kw)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with caplog.at_level(logging.WARNING, logger="fedge.update.ab"):
        assert SelfUpdate(root).confirm()
    assert SelfUpdate(root).take_outcome()["ok"]
    assert "cannot remove software slot 0.7.0" in caplog.text
    assert "cannot remove software slot 0.8.0" in caplog.text
    monkeypatch.undo()
    names = slot_names(root)
    (left,) = [n for n in names if n.startswith(".0.8.0.")]
    assert SLOT_TEMP_NAME.fullmatch(left)
    assert [n for n in names if not n.startswith(".")] == ["0.7.0", "1.0.0", "1.1.0"]
    age(root / "slots" / left)
    SlotInstaller(root)  # the next open sweeps what the failed delete left
    assert slot_names(root) == ["0.7.0", "1.0.0", "1.1.0"]


PAUSED_PRUNE = r"""
import shutil, sys, time
from pathlib import Path
from fedge.update.ab import SlotInstaller
def renamed_then_stop(path, *a, **kw):
    Path(sys.argv[1]).write_text("x")  # renamed, nothing in it deleted yet: killed now
    time.sleep(3600)
shutil.rmtree = renamed_then_stop
SlotInstaller(sys.argv[2]).prune()
"""


def test_a_prune_killed_between_rename_and_delete_leaves_the_slot_to_the_sweep(
        tmp_path, installed):
    root, _ = installed
    slots = SlotInstaller(root)
    for version in ("0.9.0", "1.1.0"):
        slots.unpack(version, bundle(tmp_path, version, "stable"))
    slots.switch("1.1.0")  # previous 1.0.0; 0.9.0 goes
    child = paused_child(tmp_path, PAUSED_PRUNE, root)
    try:
        (temp,) = [p for p in (root / "slots").iterdir() if p.name.startswith(".")]
        assert SLOT_TEMP_NAME.fullmatch(temp.name) and temp.name.startswith(".0.9.0.")
        age(temp)
        SlotInstaller(root)  # opened by another process meanwhile: the removal holds it
        assert temp.is_dir()
    finally:
        kill(child)
    assert slot_names(root) == [temp.name, "1.0.0", "1.1.0"]
    assert whole(root, "1.0.0") and whole(root, "1.1.0")
    age(temp)
    SlotInstaller(root)
    assert slot_names(root) == ["1.0.0", "1.1.0"]


CONFIRMER = POWER_CUT.replace("ACTION", "SelfUpdate(sys.argv[1]).confirm()")


def test_a_power_cut_at_any_point_of_a_confirm_leaves_every_needed_slot_whole(tmp_path):
    """1.3.0 on trial over 1.2.0, with 1.0.0 and 1.1.0 left from before; the confirm
    cut at each change it makes to the disk in turn. Whatever the instant, 1.2.0 and
    1.3.0 are whole, every entry under a slot's name is a whole slot, and what a cut
    removal left is gone at the next open."""
    die_at = 1
    while True:
        # the confirm makes ~12 changes to the disk: far more means it never ends
        assert die_at <= 100, "the confirm was still being cut at its 100th change"
        root = tmp_path / f"cut-{die_at}"
        slots = SlotInstaller(root)
        for version in ("1.0.0", "1.1.0", "1.2.0"):
            slots.unpack(version, bundle(tmp_path, version, "stable"))
        slots.switch("1.2.0")
        SelfUpdate(root).stage("1.3.0", bundle(tmp_path, "1.3.0", "good"), rollout_id="r1")
        assert SelfUpdate(root).preflight() == "trial"
        done = subprocess.run([sys.executable, "-c", CONFIRMER, str(root), str(die_at)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode in (0, 137), done.stderr
        assert whole(root, "1.2.0") and whole(root, "1.3.0"), die_at
        for p in (root / "slots").iterdir():
            if not p.name.startswith("."):
                assert whole(root, p.name), (die_at, p.name)
            else:
                age(p)
        SlotInstaller(root)
        assert [n for n in slot_names(root) if n.startswith(".")] == [], die_at
        assert {"1.2.0", "1.3.0"} <= set(slot_names(root)) <= {"1.0.0", "1.1.0", "1.2.0",
                                                                "1.3.0"}
        SelfUpdate(root).confirm()  # a confirm that died before its record went, again
        if done.returncode == 0:
            assert slot_names(root) == ["1.2.0", "1.3.0"]
            break
        die_at += 1
    # the cut landed on the record (2 changes) and all through both slots' removals
    # (a rename, then at least two files and a directory deleted each)
    assert die_at > 2 + 2 * 4


@pytest.fixture
def service(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGE_TEST_RUNNING", str(tmp_path / "running.log"))
    svc = NotifyProcessService(stop_timeout_s=2.0)
    yield svc
    svc.close()


def test_healthy_installs_prune_and_an_unhealthy_one_after_them_rolls_back(tmp_path,
                                                                          service):
    """The other way slots go in: install_and_switch, health-checked by the caller."""
    slots = SlotInstaller(tmp_path / "software")
    for version in ("1.0.0", "1.1.0", "1.2.0", "1.3.0"):
        slots.install_and_switch(version, write_bundle(tmp_path, version, "good"), service,
                                 deadline_s=10)
    assert slot_names(tmp_path / "software") == ["1.2.0", "1.3.0"]
    with pytest.raises(HealthCheckFailed, match=r"rolled back to 1\.3\.0") as info:
        slots.install_and_switch("1.4.0", write_bundle(tmp_path, "1.4.0", "crash"), service,
                                 deadline_s=5)
    assert info.value.rolled_back and slots.current_version() == "1.3.0"
    assert slot_names(tmp_path / "software") == ["1.2.0", "1.3.0", "1.4.0"]
    slots.install_and_switch("1.5.0", write_bundle(tmp_path, "1.5.0", "good"), service,
                             deadline_s=10)
    assert slot_names(tmp_path / "software") == ["1.3.0", "1.5.0"]


def test_a_stage_of_the_next_version_during_a_confirm_waits_for_it(tmp_path, installed,
                                                                  monkeypatch):
    """The agent confirms its trial in a thread while its executor may stage the next
    version (an UpdateAvailable beside the first heartbeat ack): the stage runs just as
    the confirm's prune has worked out what to keep. It waits for the slot root's lock,
    so the prune never removes the slot `current` is about to name. Before, the prune
    deleted 1.2.0 and left `current` pointing at nothing (the packaged install ran)."""
    import threading

    monkeypatch.delenv(SOFTWARE_ROOT_ENV, raising=False)
    root, _ = installed
    SelfUpdate(root).stage("1.1.0", bundle(tmp_path, "1.1.0", "good"), rollout_id="r1")
    next_bundle = bundle(tmp_path, "1.2.0", "good")
    kept = SlotInstaller._kept_versions
    staged: list[threading.Thread] = []

    def stage_meanwhile(self):
        keep = kept(self)
        if not staged:
            staged.append(threading.Thread(target=lambda: SelfUpdate(root).stage(
                "1.2.0", next_bundle, rollout_id="r2")))
            staged[0].start()
            staged[0].join(1.0)  # it waits for the lock: the prune goes on
        return keep

    monkeypatch.setattr(SlotInstaller, "_kept_versions", stage_meanwhile)
    assert SelfUpdate(root).confirm()
    staged[0].join(30)
    assert (root / "current").resolve() == (root / "slots" / "1.2.0").resolve()
    assert whole(root, "1.2.0") and whole(root, "1.1.0")
    assert SelfUpdate(root).pending()["version"] == "1.2.0"
    assert SelfUpdate(root).preflight() == "trial"


def test_the_next_version_is_not_staged_while_the_running_one_is_on_trial(tmp_path,
                                                                         installed):
    """1.1.0 is current and on trial: staging 1.2.0 over it would drop 1.1.0's trial
    (a crash-looping 1.1.0 would never be rolled back). It is refused, nothing
    unpacked, and staged once 1.1.0 is confirmed."""
    root, _ = installed
    update = SelfUpdate(root)
    update.stage("1.1.0", bundle(tmp_path, "1.1.0", "good"), rollout_id="r1")
    with pytest.raises(SoftwareOnTrial, match=r"software 1\.1\.0 is on trial"):
        update.stage("1.2.0", bundle(tmp_path, "1.2.0", "good"), rollout_id="r2")
    assert not (root / "slots" / "1.2.0").exists()
    assert update.pending()["version"] == "1.1.0"
    assert update.confirm()
    update.stage("1.2.0", bundle(tmp_path, "1.2.0", "good"), rollout_id="r2")
    assert update.pending()["version"] == "1.2.0"
