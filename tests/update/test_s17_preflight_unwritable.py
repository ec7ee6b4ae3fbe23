"""The agent unit's ExecStartPre (``python -m fedge.update.ab preflight``) and ExecStart
(``... exec``) on a slot root that cannot be written: a read-only file system (Debian's
errors=remount-ro), a full disk, files of another user.

With no software update pending there is nothing to record: preflight says so in one
line and exits 0, so the agent starts (and reports itself not eligible); it once
took the slot lock with O_RDWR|O_CREAT, exited 2 and systemd gave up after
StartLimitBurst. With an update on trial the start cannot be counted, so the trial's
version is not run uncounted (a broken one would crash-loop the unit for ever):
preflight says "deferred", exec runs the version before it, and the trial goes on at
the first start that can count it.

The disk is made unwritable three ways, all real: a directory the (unprivileged)
process may not write (as root, run with CAP_DAC_OVERRIDE dropped by setpriv), a
file-size limit (RLIMIT_FSIZE: writes fail as on a full disk), and a read-only tmpfs
in a user and mount namespace (skipped where unshare is not permitted)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from fedge.update.ab import SelfUpdate

DEFERRED_ENV = "FEDGE_SOFTWARE_TRIAL_DEFERRED"  # fedge.update.ab.DEFERRED_ENV

PREVIOUS, TRIAL = "98.0.0", "99.0.0"  # both newer than the packaged install
PACKAGED = [sys.executable, "-c",
            f"import os; print('packaged', os.environ.get({DEFERRED_ENV!r}))"]
NODAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
         "--inh-caps", "-dac_override,-dac_read_search", "--"]


def make_slot(root: Path, version: str) -> None:
    slot = root / "slots" / version
    slot.mkdir(parents=True)
    (slot / "fedge-bundle.json").write_text(json.dumps({"version": version, "exec": [
        "{python}", "-c", f"import os; print('slot', {version!r}, "
        f"os.environ.get({DEFERRED_ENV!r}))"]}))


def on_trial(root: Path, *, previous: str | None = PREVIOUS, attempts: int = 1) -> None:
    """TRIAL switched in and on trial (started `attempts` times), PREVIOUS before it."""
    if previous is not None:
        make_slot(root, previous)
        (root / "previous").symlink_to(Path("slots") / previous)
    make_slot(root, TRIAL)
    (root / "current").symlink_to(Path("slots") / TRIAL)
    (root / "pending.json").write_text(json.dumps(
        {"version": TRIAL, "previous": previous, "attempts": attempts, "rollout_id": "r1",
         "path": "fedge.tar.gz", "name": "fedge"}))


def ab(*argv: str, prefix: list[str] | None = None,
       preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FEDGE_SOFTWARE_ROOT", "FEDGE_SOFTWARE_SLOT", DEFERRED_ENV)}
    return subprocess.run([*(prefix or []), sys.executable, "-m", "fedge.update.ab", *argv],
                          capture_output=True, text=True, timeout=60, env=env,
                          preexec_fn=preexec, cwd="/")


def unit_start(root: Path, **kw: object) -> tuple[subprocess.CompletedProcess[str],
                                                   subprocess.CompletedProcess[str]]:
    """One start of the unit: ExecStartPre, then ExecStart (which runs the slot)."""
    pre = ab("preflight", "--root", str(root), **kw)  # type: ignore[arg-type]
    run = ab("exec", "--root", str(root), "--", *PACKAGED, **kw)  # type: ignore[arg-type]
    return pre, run


def snapshot(root: Path) -> tuple[str, str, str]:
    """The trial's record, `current`, and what is in the slot root (no temporaries)."""
    return ((root / "pending.json").read_text(), os.readlink(root / "current"),
            str(sorted(p.name for p in root.iterdir() if p.name != ".lock")))


@pytest.fixture
def unwritable(tmp_path: Path):
    """A directory `dir` the processes `prefix` starts may not write (mode 0555)."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop CAP_DAC_OVERRIDE")
    prefix = NODAC if os.geteuid() == 0 else []
    state = tmp_path / "state"
    state.mkdir()

    class Unwritable:
        dir = state

        def lock(self) -> None:
            for p in [state, *state.rglob("*")]:
                if p.is_dir() and not p.is_symlink():
                    p.chmod(0o555)

        def unlock(self) -> None:
            for p in [state, *state.rglob("*")]:
                if p.is_dir() and not p.is_symlink():
                    p.chmod(0o755)

    u = Unwritable()
    u.prefix = prefix  # type: ignore[attr-defined]
    yield u
    u.unlock()


def small_files_only() -> None:
    """In the child: every write past 16 bytes fails (EFBIG), as on a full disk;
    Python ignores SIGXFSZ."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_nothing_pending_on_an_unwritable_state_dir_starts(unwritable) -> None:
    """Fresh (software/ never made) and after an earlier start (software/.lock there)."""
    root = unwritable.dir / "software"
    unwritable.lock()
    pre = ab("preflight", "--root", str(root), prefix=unwritable.prefix)
    assert pre.returncode == 0, pre.stderr
    assert pre.stdout == "none\n"
    assert "Traceback" not in pre.stderr
    assert (f"no software update pending; {root} cannot be written (Permission denied: "
            in pre.stderr)
    assert not root.exists()
    unwritable.unlock()
    assert ab("preflight", "--root", str(root)).stdout == "none\n"
    assert (root / ".lock").exists()
    unwritable.lock()
    (root / ".lock").chmod(0o400)
    pre = ab("preflight", "--root", str(root), prefix=unwritable.prefix)
    assert (pre.returncode, pre.stdout) == (0, "none\n"), pre.stderr
    assert f"{root} cannot be written (Permission denied: {root / '.lock'})" in pre.stderr


def test_a_trial_that_cannot_be_counted_runs_the_previous_version(unwritable) -> None:
    """More starts than StartLimitBurst (10): each exits 0 and runs the previous slot,
    none runs the trial, nothing changes on disk. Writable again, the trial goes on."""
    root = unwritable.dir / "software"
    on_trial(root)
    before = snapshot(root)
    unwritable.lock()
    for _ in range(3):  # each start is the same; StartLimitBurst never comes into it
        pre, run = unit_start(root, prefix=unwritable.prefix)
        assert (pre.returncode, pre.stdout) == (0, "deferred\n"), pre.stderr
        assert (f"software {TRIAL} is on trial, but this start cannot be counted: {root} "
                "cannot be written (Permission denied: " in pre.stderr)
        assert f"software slot {PREVIOUS} runs instead" in pre.stderr
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["slot", PREVIOUS, TRIAL]  # with DEFERRED_ENV set
        assert f"software slot {PREVIOUS} runs instead" in run.stderr
        assert snapshot(root) == before
    unwritable.unlock()
    pre, run = unit_start(root)
    assert pre.stdout == "trial\n" and run.stdout.split() == ["slot", TRIAL, "None"]
    assert json.loads((root / "pending.json").read_text())["attempts"] == 2


def test_a_trial_past_its_attempts_that_cannot_roll_back_runs_the_previous_version(
        unwritable) -> None:
    """The roll-back itself cannot be written: the previous version runs all the same."""
    root = unwritable.dir / "software"
    on_trial(root, attempts=3)
    before = snapshot(root)
    unwritable.lock()
    pre, run = unit_start(root, prefix=unwritable.prefix)
    assert (pre.returncode, pre.stdout) == (0, "deferred\n"), pre.stderr
    assert run.stdout.split() == ["slot", PREVIOUS, TRIAL], run.stderr
    assert snapshot(root) == before
    unwritable.unlock()
    pre, run = unit_start(root)
    assert pre.stdout == "rolled_back\n" and run.stdout.split() == ["slot", PREVIOUS, "None"]


def test_a_trial_on_a_full_disk_runs_the_previous_version(tmp_path: Path) -> None:
    """Writes fail as on a full disk (RLIMIT_FSIZE); a first update of a packaged
    install (no previous slot) falls back to the packaged install."""
    root = tmp_path / "software"
    on_trial(root)
    before = snapshot(root)
    pre, run = unit_start(root, preexec=small_files_only)
    assert (pre.returncode, pre.stdout) == (0, "deferred\n"), pre.stderr
    assert "File too large" in pre.stderr
    assert run.stdout.split() == ["slot", PREVIOUS, TRIAL], run.stderr
    assert snapshot(root) == before
    assert not [p for p in root.iterdir() if p.name.startswith(".pending.json.")]

    first = tmp_path / "first"
    on_trial(first, previous=None)
    pre, run = unit_start(first, preexec=small_files_only)
    assert pre.stdout == "deferred\n", pre.stderr
    assert "the packaged install" in pre.stderr
    assert run.stdout.split() == ["packaged", TRIAL], run.stderr
    pre, run = unit_start(first)
    assert pre.stdout == "trial\n" and run.stdout.split() == ["slot", TRIAL, "None"]


def test_a_deferred_trial_is_not_confirmed_by_the_version_that_ran(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """The previous version, run while the trial was deferred, gets its heartbeat ack:
    the trial is not its to confirm, nor to drop."""
    root = tmp_path / "software"
    on_trial(root)
    monkeypatch.setenv("FEDGE_SOFTWARE_ROOT", str(root))
    monkeypatch.setenv("FEDGE_SOFTWARE_SLOT", PREVIOUS)
    monkeypatch.setenv(DEFERRED_ENV, TRIAL)
    assert SelfUpdate(root).confirm() is False
    assert SelfUpdate(root).pending() == json.loads((root / "pending.json").read_text())
    assert not (root / "outcome.json").exists()


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-rm", "sh", "-c", 'd=$(mktemp -d) && mount -t tmpfs -o size=64k '
             'tmpfs "$d" && mount -o remount,ro "$d"; rc=$?; umount "$d"; rmdir "$d"; exit $rc']
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="unprivileged mount namespaces not permitted")
def test_on_a_read_only_file_system(tmp_path: Path) -> None:
    """The reviewer's case, EROFS for real: a tmpfs remounted read-only, first with
    no software/ at all, then holding a trial."""
    seed = tmp_path / "seed"
    on_trial(seed / "software")
    mnt, out = tmp_path / "state", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    ab_cmd = f"{sys.executable} -m fedge.update.ab"
    packaged = " ".join(f"'{a}'" for a in PACKAGED)
    script = f"""
set -e
mount -t tmpfs -o size=1m tmpfs {mnt}
mount -o remount,ro {mnt}
{ab_cmd} preflight --root {mnt}/software >{out}/fresh 2>&1 || echo rc=$? >>{out}/fresh
mount -o remount,rw {mnt}
cp -a {seed}/software {mnt}/
mount -o remount,ro {mnt}
{ab_cmd} preflight --root {mnt}/software >{out}/trial 2>&1 || echo rc=$? >>{out}/trial
{ab_cmd} exec --root {mnt}/software -- {packaged} >{out}/exec 2>&1 || echo rc=$? >>{out}/exec
"""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FEDGE_SOFTWARE_ROOT", "FEDGE_SOFTWARE_SLOT", DEFERRED_ENV)}
    done = subprocess.run(["unshare", "-rm", "bash", "-c", script], capture_output=True,
                          text=True, timeout=120, env=env, cwd="/")
    assert done.returncode == 0, done.stderr
    fresh = (out / "fresh").read_text()
    assert fresh.endswith("none\n") and "Read-only file system" in fresh, fresh
    trial = (out / "trial").read_text()
    assert trial.endswith("deferred\n") and "Read-only file system" in trial, trial
    ran = (out / "exec").read_text()
    assert ran.endswith(f"slot {PREVIOUS} {TRIAL}\n"), ran
