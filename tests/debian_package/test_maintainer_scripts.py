"""The maintainer scripts as dpkg calls them: POSIX sh, known actions only, conffiles listed."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

DEBIAN = Path(__file__).resolve().parents[2] / "packaging" / "debian"
UNITS = DEBIAN.parent / "systemd"
SCRIPTS = ("postinst", "prerm", "postrm")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_as_posix_sh_and_stop_on_errors(script: str) -> None:
    path = DEBIAN / script
    assert path.read_text().startswith("#!/bin/sh\n")
    assert "\nset -e\n" in path.read_text()
    proc = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_action_is_refused_and_named(script: str) -> None:
    proc = subprocess.run(["sh", str(DEBIAN / script), "frobnicate"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1
    assert f"{script} called with unknown argument 'frobnicate'" in proc.stderr


def shipped_units() -> list[str]:
    return sorted(p.name for p in UNITS.glob("*.service"))


@pytest.mark.parametrize("script", ["postinst", "postrm"])
def test_scripts_act_on_every_unit_the_package_ships(script: str) -> None:
    (line,) = [line for line in (DEBIAN / script).read_text().splitlines()
               if line.startswith("UNITS=")]
    assert sorted(shlex.split(line.split("=", 1)[1])[0].split()) == shipped_units()


def test_only_purge_deletes_state() -> None:
    postrm = (DEBIAN / "postrm").read_text()
    remove = postrm.split("    remove)", 1)[1].split(";;", 1)[0]
    purge = postrm.split("    purge)", 1)[1].split(";;", 1)[0]
    assert "remove_dir" not in remove and "userdel" not in remove
    for path in ("/var/lib/fedge", "/var/lib/fedge-coordinator", "/var/lib/fedge-credentials",
                 "/var/cache/fedge-coordinator", "/var/cache/fedge-serve", "/var/log/fedge",
                 "/etc/fedge/credentials"):
        assert path in purge.split("for dir in", 1)[1].split("done", 1)[0], path
    postinst = (DEBIAN / "postinst").read_text()
    # state directories are created only when missing: an upgrade never resets them
    assert "if [ ! -d /var/lib/fedge ]; then" in postinst


def test_abort_actions_succeed_without_side_effects(tmp_path: Path) -> None:
    for script, action in (("postinst", "abort-upgrade"), ("prerm", "upgrade"),
                           ("postrm", "abort-install"), ("postrm", "upgrade")):
        proc = subprocess.run(["sh", str(DEBIAN / script), action], capture_output=True,
                              text=True, timeout=30, cwd=tmp_path)
        assert proc.returncode == 0, (script, action, proc.stderr)
        assert list(tmp_path.iterdir()) == []


def test_purge_cleans_every_units_enable_symlinks(tmp_path: Path) -> None:
    """postrm purge's unit loop, run for real against a stand-in /etc and
    deb-systemd-helper: the helper purges and unmasks each unit the package ships
    (only where it is installed, as debhelper does), and links left by `systemctl
    enable` are removed."""
    postrm = (DEBIAN / "postrm").read_text()
    purge = postrm.split("    purge)", 1)[1].split(";;", 1)[0]
    loop = purge[purge.index("for unit in"):purge.index("done") + len("done")]
    units = shipped_units()
    assert loop.split("\n", 1)[0] == "for unit in $UNITS; do"
    assert "if command -v deb-systemd-helper >/dev/null; then" in loop
    loop = f"UNITS='{' '.join(units)}'\n{loop}"
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "rm").symlink_to(shutil.which("rm"))
    helper = bin_dir / "deb-systemd-helper"
    helper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    helper.chmod(0o755)
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    for unit in units:
        (wants / unit).symlink_to(f"/lib/systemd/system/{unit}")  # dangling, as after remove
    (wants / "ssh.service").symlink_to("/lib/systemd/system/ssh.service")
    script = loop.replace("/etc/systemd/system", str(tmp_path / "etc/systemd/system"))
    env = {"PATH": str(bin_dir)}  # the stand-in helper, and no other
    proc = subprocess.run(["/bin/sh", "-ec", script], capture_output=True, text=True, timeout=30,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().split("\n")[:-1] == [
        call for u in units for call in (f"purge {u}", f"unmask {u}")]
    assert sorted(p.name for p in wants.iterdir()) == ["ssh.service"]
    helper.unlink()  # no deb-systemd-helper (init-system-helpers gone): still fine
    for unit in units:
        (wants / unit).symlink_to(f"/lib/systemd/system/{unit}")
    proc = subprocess.run(["/bin/sh", "-ec", script], capture_output=True, text=True, timeout=30,
                          env=env)
    assert proc.returncode == 0 and sorted(p.name for p in wants.iterdir()) == ["ssh.service"]


def test_make_installs_the_python_headers_the_core_and_systemd_python_build_against() -> None:
    root = DEBIAN.parents[1]
    makefile = (root / "Makefile").read_text()
    block = makefile.split("APT_PKGS :=", 1)[1].split("\n")
    pkgs: list[str] = []
    for line in block:
        pkgs += line.rstrip("\\").split()
        if not line.rstrip().endswith("\\"):
            break
    assert "Development.Module" in (root / "CMakeLists.txt").read_text()
    assert {"python3-dev", "libsystemd-dev", "python3-venv"} <= set(pkgs), pkgs


# -- the real scripts, run as dpkg runs them, in a scratch root --------------------
#
# A private mount namespace with a copy of /etc bound over /etc (adduser, userdel and
# the credentials act on the copy) and tmpfs over /var/lib, /var/cache and /var/log:
# the scripts run unchanged, and the host is untouched. With systemd=True, /run is a
# tmpfs with /run/systemd/system in it (systemd "running") and systemctl a stub on
# PATH; deb-systemd-invoke and deb-systemd-helper are the real ones.

SYSTEMCTL_STUB = """#!/bin/sh
# systemctl as the maintainer scripts and deb-systemd-invoke call it: every call
# logged; a unit is active while $ACTIVE/<unit> exists; every unit is disabled (the
# package ships them installed, not enabled).
echo "$*" >> "$LOG"
action=""
units=""
for arg in "$@"; do
    case $arg in
        -*) ;;
        *) if [ -z "$action" ]; then action=$arg; else units="$units $arg"; fi ;;
    esac
done
case $action in
    is-active) for u in $units; do [ -e "$ACTIVE/$u" ] || exit 3; done ;;
    is-enabled) echo disabled; exit 1 ;;
    stop) for u in $units; do rm -f "$ACTIVE/$u"; done ;;
    start|restart) for u in $units; do : > "$ACTIVE/$u"; done ;;
esac
exit 0
"""


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


needs_namespace = pytest.mark.skipif(not _can_unshare(),
                                     reason="needs root and unshare --mount")


def in_scratch_root(tmp_path: Path, body: str,
                    systemd: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``body`` (sh, set -e) with scratch /etc, /var/lib, /var/cache and /var/log.

    ``$P`` is packaging/debian; the maintainer scripts' stderr goes to ``$ERR``. With
    ``systemd``, ``$LOG`` collects the systemctl calls and ``$ACTIVE`` holds one
    file per active unit (`SYSTEMCTL_STUB`).
    """
    etc = tmp_path / "etc"
    subprocess.run(["cp", "-a", "/etc", str(etc)], check=True, timeout=60)
    stub = ""
    if systemd:
        bin_dir, active = tmp_path / "bin", tmp_path / "active"
        bin_dir.mkdir()
        active.mkdir()
        (bin_dir / "systemctl").write_text(SYSTEMCTL_STUB)
        (bin_dir / "systemctl").chmod(0o755)
        stub = f"""mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/systemd/system
# a container's policy-rc.d (exit 101) would keep deb-systemd-invoke from acting
if [ -e /usr/sbin/policy-rc.d ]; then mount --bind /dev/null /usr/sbin/policy-rc.d; fi
export PATH={shlex.quote(str(bin_dir))}:$PATH
export LOG={shlex.quote(str(tmp_path / "systemctl.log"))}
export ACTIVE={shlex.quote(str(active))}
"""
    script = f"""set -e
P={shlex.quote(str(DEBIAN))}
ERR={shlex.quote(str(tmp_path / "stderr"))}
# as dpkg runs them (deb-systemd-helper does nothing without it)
export DPKG_MAINTSCRIPT_PACKAGE=fedge
mount --bind {shlex.quote(str(etc))} /etc
mount -t tmpfs -o mode=0755 tmpfs /var/lib
mount -t tmpfs -o mode=0755 tmpfs /var/cache
mount -t tmpfs -o mode=0755 tmpfs /var/log
{stub}{body}
"""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120)


def script_stderr(tmp_path: Path) -> str:
    err = tmp_path / "stderr"
    return err.read_text() if err.exists() else ""


@needs_namespace
@pytest.mark.parametrize("own_file_system", [True, False], ids=["mount-point", "directory"])
def test_purge_finishes_when_the_state_directory_is_a_mount_point(
        tmp_path: Path, own_file_system: bool) -> None:
    """firmware/README.md puts /var/lib/fedge on a partition of its own: rm -rf used to
    fail there with EBUSY, so postrm exited 1 before removing the user, and every retry
    did the same. Now the mount point is emptied and kept, and the purge finishes."""
    mount = ("mount -t tmpfs -o mode=0700 tmpfs /var/lib/fedge && chown fedge:fedge /var/lib/fedge"
             if own_file_system else "true")
    proc = in_scratch_root(tmp_path, f"""
sh $P/postinst configure '' 2>>$ERR
{mount}
mkdir -p /var/lib/fedge/keys /var/lib/fedge/models/risk/1 /var/lib/fedge/.hidden
echo secret > /var/lib/fedge/keys/identity.key
echo onnx > /var/lib/fedge/models/risk/1/model.onnx
chmod 0500 /var/lib/fedge/models/risk
install -d -o fedge -g fedge -m 0700 /var/lib/fedge-coordinator
touch /var/lib/fedge-coordinator/coordinator.sqlite3 /var/log/fedge/agent.log
install -m 0600 /dev/null /var/lib/fedge-credentials/agent/curve.key
install -d -o fedge -g fedge /var/cache/fedge-coordinator/matplotlib /var/cache/fedge-serve
sh $P/postrm remove 2>>$ERR
rc=0; sh $P/postrm purge 2>>$ERR || rc=$?
echo "purge rc=$rc"
if getent passwd fedge >/dev/null; then echo "user present"; else echo "user gone"; fi
if getent group fedge >/dev/null; then echo "group present"; else echo "group gone"; fi
if mountpoint -q /var/lib/fedge; then echo "still mounted"; fi
for p in /var/lib/fedge /var/lib/fedge-coordinator /var/lib/fedge-credentials \
         /var/cache/fedge-coordinator /var/cache/fedge-serve /var/log/fedge \
         /etc/fedge/credentials; do
    if [ -e "$p" ]; then echo "left: $p $(ls -A $p | tr '\n' ' ')"; fi
done
""")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert "purge rc=0" in out, (out, script_stderr(tmp_path))
    assert "user gone" in out and "group gone" in out
    left = [line for line in out if line.startswith("left: ")]
    if own_file_system:
        assert "still mounted" in out
        assert left == ["left: /var/lib/fedge "]  # emptied, the mount point kept
    else:
        assert left == []


LEGACY_COORDINATOR = """
sh $P/postinst configure '' 2>>$ERR
{setup}
echo sqlite > /var/lib/fedge/coordinator.sqlite3
mkdir -p /var/lib/fedge/jobs/job-1 /var/lib/fedge/tuf/metadata
echo round > /var/lib/fedge/jobs/job-1/round-0.safetensors
echo '{{}}' > /var/lib/fedge/roster.json
{agent}
chown -R fedge:fedge /var/lib/fedge
echo "inode before $(stat -c %i /var/lib/fedge)"
sh $P/postinst configure 0.1.0-1 2>>$ERR
echo "--- second run"
sh $P/postinst configure 0.1.0-1 2>>$ERR
if [ -d /var/lib/fedge-coordinator ]; then
    echo "new: $(stat -c '%i %U %a' /var/lib/fedge-coordinator)"
    echo "new files: $(cd /var/lib/fedge-coordinator && find . -type f | sort | tr '\n' ' ')"
fi
echo "old: $(stat -c '%U %a' /var/lib/fedge) $(ls -A /var/lib/fedge | tr '\n' ' ')"
# what the coordinator unit's ExecStartPre= says now, with the unit's $STATE_DIRECTORY
rc=0; STATE_DIRECTORY=/var/lib/fedge-coordinator {guard} 2>>$ERR || rc=$?
echo "guard rc=$rc"
"""


def coordinator_guard() -> str:
    """The coordinator unit's ExecStartPre= as systemd runs it ($$ is a literal $)."""
    pre = [line.split("=", 1)[1] for line in
           (UNITS / "fedge-coordinator.service").read_text().splitlines()
           if line.startswith("ExecStartPre=")]
    assert len(pre) == 1, pre
    return shlex.join(shlex.split(pre[0].replace("$$", "$")))


def run_legacy(tmp_path: Path, setup: str = "", agent: str = "") -> list[str]:
    proc = in_scratch_root(tmp_path, LEGACY_COORDINATOR.format(setup=setup, agent=agent,
                                                               guard=coordinator_guard()))
    assert proc.returncode == 0, proc.stdout + proc.stderr + script_stderr(tmp_path)
    return proc.stdout.splitlines()


@needs_namespace
def test_upgrade_moves_a_coordinators_state_out_of_the_agents_directory(tmp_path: Path) -> None:
    """Earlier packages ran the coordinator in /var/lib/fedge (finding 9): on a
    coordinator-only host postinst renames it to /var/lib/fedge-coordinator, once,
    and leaves an empty /var/lib/fedge for the fedge user's home."""
    out = run_legacy(tmp_path)
    inode = next(line for line in out if line.startswith("inode before ")).split()[-1]
    assert f"new: {inode} fedge 700" in out  # one rename: nothing copied
    assert ("new files: ./coordinator.sqlite3 ./jobs/job-1/round-0.safetensors "
            "./roster.json ") in out
    assert "old: fedge 700 " in out
    assert "guard rc=0" in out
    err = script_stderr(tmp_path)
    assert err.count("moved the coordinator's state from /var/lib/fedge to "
                     "/var/lib/fedge-coordinator") == 1, err  # the second run did nothing


@needs_namespace
def test_upgrade_moves_the_state_with_the_packaged_coordinator_toml(tmp_path: Path) -> None:
    out = run_legacy(tmp_path, setup="cp $P/etc/coordinator.toml /etc/fedge/coordinator.toml")
    assert any(line.startswith("new files: ./coordinator.sqlite3") for line in out)
    assert "guard rc=0" in out


@needs_namespace
@pytest.mark.parametrize("case, setup, agent, why", [
    ("agent beside it", "",
     "mkdir -p /var/lib/fedge/keys && echo {} > /var/lib/fedge/enrolment.json",
     "the agent's state is in the same directory"),
    ("own file system", "mount -t tmpfs -o mode=0700 tmpfs /var/lib/fedge", "",
     "/var/lib/fedge is a file system of its own"),
    ("state_dir pinned", "echo 'state_dir = \"/var/lib/fedge\"' > /etc/fedge/coordinator.toml",
     "", "/etc/fedge/coordinator.toml sets its own state_dir"),
])
def test_upgrade_moves_nothing_it_cannot_move_and_the_coordinator_refuses_an_empty_start(
        tmp_path: Path, case: str, setup: str, agent: str, why: str) -> None:
    out = run_legacy(tmp_path, setup=setup, agent=agent)
    assert not any(line.startswith("new") for line in out), out
    assert any(line.startswith("old: fedge 700 coordinator.sqlite3") for line in out), out
    err = script_stderr(tmp_path)
    assert f"the coordinator's state stays in /var/lib/fedge ({why})" in err, err
    # the unit would not start a new, empty coordinator beside the old database
    assert "guard rc=1" in out
    assert ("the coordinator database is in /var/lib/fedge (where earlier packages kept it), "
            "not in /var/lib/fedge-coordinator; not starting a new, empty coordinator") in err


@needs_namespace
@pytest.mark.parametrize("active", [True, False], ids=["active", "inactive"])
def test_upgrade_leaves_the_coordinator_running_as_it_found_it(tmp_path: Path,
                                                               active: bool) -> None:
    """Moving a coordinator's state, postinst stops it and starts it again. The start
    went through deb-systemd-invoke, which starts only enabled units, and the units
    ship not enabled: a coordinator started by hand stayed down after the upgrade."""
    proc = in_scratch_root(tmp_path, f"""
sh $P/postinst configure '' 2>>$ERR
echo sqlite > /var/lib/fedge/coordinator.sqlite3
chown -R fedge:fedge /var/lib/fedge
{"touch $ACTIVE/fedge-coordinator.service" if active else "true"}
: > $LOG
sh $P/postinst configure 0.1.0-1 2>>$ERR
if [ -e $ACTIVE/fedge-coordinator.service ]; then echo "active after"
else echo "inactive after"; fi
if [ -e /var/lib/fedge-coordinator/coordinator.sqlite3 ]; then echo "moved"; fi
""", systemd=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr + script_stderr(tmp_path)
    out = proc.stdout.splitlines()
    assert "moved" in out
    assert ("active after" if active else "inactive after") in out, (
        out, (tmp_path / "systemctl.log").read_text(), script_stderr(tmp_path))
    calls = (tmp_path / "systemctl.log").read_text().splitlines()
    if active:
        stop = calls.index("stop fedge-coordinator.service")
        assert calls.index("start fedge-coordinator.service") > stop
    else:
        assert not any(c.startswith(("stop ", "start ")) for c in calls), calls


CREDENTIALS = "/var/lib/fedge-credentials/agent"


@needs_namespace
def test_install_makes_the_agents_credentials_root_only_outside_its_state(
        tmp_path: Path) -> None:
    """The unit's LoadCredential= source and every directory above it are root's and
    writable by root only: systemd reads it as root, following symlinks, so the
    fedge user (owner of /var/lib/fedge) must not be able to swap any part of it."""
    proc = in_scratch_root(tmp_path, f"""
sh $P/postinst configure '' 2>>$ERR
d={CREDENTIALS}
while [ "$d" != / ]; do stat -c '%n %U %G %a' "$d"; d=$(dirname "$d"); done
stat -c '%n %U %G %a' /var/lib/fedge
""")
    assert proc.returncode == 0, proc.stdout + proc.stderr + script_stderr(tmp_path)
    stats = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()}
    assert stats[CREDENTIALS] == ["root", "root", "700"]
    assert stats["/var/lib/fedge-credentials"] == ["root", "root", "700"]
    for path, (user, _group, mode) in stats.items():
        if path != "/var/lib/fedge":
            assert user == "root" and int(mode, 8) & 0o022 == 0, (path, user, mode)
    assert stats["/var/lib/fedge"][0] == "fedge"  # the state dir: the fedge user's
    assert not CREDENTIALS.startswith("/var/lib/fedge/")


OLD_CREDENTIALS = "/etc/fedge/credentials/agent"


@needs_namespace
def test_upgrade_moves_the_agents_credentials_out_of_etc_once(tmp_path: Path) -> None:
    """Earlier packages (and their docs) kept the keys in /etc/fedge/credentials/agent,
    on / and in the clear on an appliance. The upgrade moves them, keeps their content
    and root's 0600, removes the old copies and directory, says so once, and a second
    run does nothing."""
    proc = in_scratch_root(tmp_path, f"""
sh $P/postinst configure '' 2>>$ERR
install -d -m 0700 {OLD_CREDENTIALS}
printf curve-secret > {OLD_CREDENTIALS}/curve.key
printf identity-secret > {OLD_CREDENTIALS}/identity.key
chmod 0640 {OLD_CREDENTIALS}/curve.key {OLD_CREDENTIALS}/identity.key
sh $P/postinst configure 0.1.0-1 2>>$ERR
sh $P/postinst configure 0.1.0-1 2>>$ERR
for f in {CREDENTIALS}/* {CREDENTIALS}/.*.fedge-new; do
    [ -e "$f" ] && echo "new: $(stat -c '%n %U %a' "$f") $(cat "$f")"
done
if [ -e {OLD_CREDENTIALS} ]; then echo "old left: $(ls -A {OLD_CREDENTIALS})"; fi
if [ -d /etc/fedge/credentials/coordinator ]; then echo "coordinator's kept"; fi
""")
    assert proc.returncode == 0, proc.stdout + proc.stderr + script_stderr(tmp_path)
    out = proc.stdout.splitlines()
    assert [line for line in out if line.startswith("new: ")] == [
        f"new: {CREDENTIALS}/curve.key root 600 curve-secret",
        f"new: {CREDENTIALS}/identity.key root 600 identity-secret"]
    assert not any(line.startswith("old left") for line in out), out
    assert "coordinator's kept" in out
    err = script_stderr(tmp_path)
    assert err.count(f"moved the agent's credentials ( curve.key identity.key ) from "
                     f"{OLD_CREDENTIALS} to {CREDENTIALS}") == 1, err


@needs_namespace
def test_the_credentials_move_never_overwrites_a_key_and_finishes_an_interrupted_one(
        tmp_path: Path) -> None:
    proc = in_scratch_root(tmp_path, f"""
sh $P/postinst configure '' 2>>$ERR
install -d -m 0700 {OLD_CREDENTIALS} {OLD_CREDENTIALS}/not-a-file
echo old-curve > {OLD_CREDENTIALS}/curve.key       # another key already in the new place
echo new-curve > {CREDENTIALS}/curve.key
echo identity > {OLD_CREDENTIALS}/identity.key     # copied by a run that then stopped
echo identity > {CREDENTIALS}/identity.key
sh $P/postinst configure 0.1.0-1 2>>$ERR
echo "old: $(ls -A {OLD_CREDENTIALS} | tr '\n' ' ')$(cat {OLD_CREDENTIALS}/curve.key)"
echo "new: $(ls -A {CREDENTIALS} | tr '\n' ' ')$(cat {CREDENTIALS}/curve.key)"
""")
    assert proc.returncode == 0, proc.stdout + proc.stderr + script_stderr(tmp_path)
    out = proc.stdout.splitlines()
    assert "old: curve.key not-a-file old-curve" in out
    assert "new: curve.key identity.key new-curve" in out
    err = script_stderr(tmp_path)
    assert "moved the agent's credentials ( identity.key )" in err, err
    assert f"left in {OLD_CREDENTIALS} ( curve.key not-a-file )" in err, err


@needs_namespace
def test_keys_that_cannot_be_removed_from_etc_are_copied_and_named_not_fatal(
        tmp_path: Path) -> None:
    """The old directory read-only (shred and rm fail): the keys are copied to the new
    place, postinst still succeeds (set -e), and names what is left to remove."""
    proc = in_scratch_root(tmp_path, f"""
sh $P/postinst configure '' 2>>$ERR
install -d -m 0700 {OLD_CREDENTIALS}
printf curve-secret > {OLD_CREDENTIALS}/curve.key
mount --bind {OLD_CREDENTIALS} {OLD_CREDENTIALS}
mount -o remount,bind,ro {OLD_CREDENTIALS}
sh $P/postinst configure 0.1.0-1 2>>$ERR
echo "new: $(cat {CREDENTIALS}/curve.key)"
echo "old: $(ls -A {OLD_CREDENTIALS})"
""")
    assert proc.returncode == 0, proc.stdout + proc.stderr + script_stderr(tmp_path)
    assert "new: curve-secret" in proc.stdout.splitlines()
    assert "old: curve.key" in proc.stdout.splitlines()
    err = script_stderr(tmp_path)
    assert (f"copied the agent's credentials ( curve.key ) to {CREDENTIALS}, but could "
            f"not remove them from {OLD_CREDENTIALS}") in err, err


@needs_namespace
def test_a_symlinked_old_credentials_directory_is_named_not_skipped_silently(
        tmp_path: Path) -> None:
    proc = in_scratch_root(tmp_path, f"""
sh $P/postinst configure '' 2>>$ERR
install -d -m 0700 /etc/fedge/elsewhere
ln -s /etc/fedge/elsewhere {OLD_CREDENTIALS}
sh $P/postinst configure 0.1.0-1 2>>$ERR
""")
    assert proc.returncode == 0, proc.stdout + proc.stderr + script_stderr(tmp_path)
    assert f"{OLD_CREDENTIALS} is a symbolic link: nothing moved from it" in \
        script_stderr(tmp_path)


@needs_namespace
def test_postinst_says_when_an_appliances_keys_are_not_on_its_encrypted_volume(
        tmp_path: Path) -> None:
    """/var/lib/fedge on a volume of its own (the appliance) and the keys on /: the
    earlier firmware layout, after the upgrade moved the keys out of /etc."""
    proc = in_scratch_root(tmp_path, """
mkdir -p /var/lib/fedge /var/lib/fedge-credentials
mount -t tmpfs -o mode=0700 tmpfs /var/lib/fedge
sh $P/postinst configure '' 2>>$ERR
echo "--- both on the volume"
mount -t tmpfs -o mode=0700 tmpfs /var/lib/fedge-credentials
sh $P/postinst configure 0.1.0-1 2>>$ERR
""")
    assert proc.returncode == 0, proc.stdout + proc.stderr + script_stderr(tmp_path)
    err = script_stderr(tmp_path)
    assert err.count("/var/lib/fedge is a file system of its own, /var/lib/fedge-credentials "
                     "is not: the agent's keys are not on the appliance's encrypted "
                     "volume") == 1, err


@needs_namespace
def test_remove_masks_the_units_and_reinstall_or_purge_unmasks_only_those(
        tmp_path: Path) -> None:
    """What dh_installsystemd's snippets do: after `dpkg -r` the unit files are gone
    but a unit enabled by hand keeps its link; masked, systemd reports it masked
    instead of a link to nothing. A mask the administrator made stays."""
    units = shipped_units()
    show = "for u in " + " ".join(units) + """; do
    if [ -L /etc/systemd/system/$u ]; then echo "$u -> $(readlink /etc/systemd/system/$u)"; fi
done"""
    proc = in_scratch_root(tmp_path, f"""
sh $P/postinst configure '' 2>>$ERR
mkdir -p /etc/systemd/system/multi-user.target.wants
ln -s /lib/systemd/system/fedge-agent.service /etc/systemd/system/multi-user.target.wants/
ln -s /dev/null /etc/systemd/system/fedge-serve.service   # the administrator's own mask
echo "--- remove"
sh $P/postrm remove 2>>$ERR
{show}
echo "--- reinstall"
sh $P/postinst configure 0.1.0-1 2>>$ERR
{show}
echo "--- remove, purge"
sh $P/postrm remove 2>>$ERR
sh $P/postrm purge 2>>$ERR
{show}
""")
    assert proc.returncode == 0, proc.stdout + proc.stderr + script_stderr(tmp_path)
    out = proc.stdout.split("--- ")
    masked = [f"{u} -> /dev/null" for u in units]
    assert out[1].splitlines()[1:] == masked, out[1]
    assert out[2].splitlines()[1:] == ["fedge-serve.service -> /dev/null"], out[2]
    assert out[3].splitlines()[1:] == ["fedge-serve.service -> /dev/null"], out[3]


@needs_namespace
def test_purge_overwrites_key_files_before_deleting_them(tmp_path: Path) -> None:
    """Deleted without an overwrite, a key stays readable on the disk of an appliance
    that leaves the hospital. A second hard link to each key file, made before the
    purge, shows what the purge left in its blocks: zeros, not the key."""
    proc = in_scratch_root(tmp_path, """
sh $P/postinst configure '' 2>>$ERR
mkdir -p /var/lib/fedge/keys /var/lib/fedge-coordinator /var/lib/seen
mkdir -p /etc/fedge/credentials/coordinator
echo agent-identity-secret > /var/lib/fedge/keys/identity.key
echo agent-curve-json-secret > /var/lib/fedge/keys/curve.json
chown -R fedge:fedge /var/lib/fedge/keys  # as the agent writes them
chmod 0400 /var/lib/fedge/keys/curve.json  # an admin made it read-only
echo agent-curve-secret > /var/lib/fedge-credentials/agent/curve.key
echo coordinator-provision-secret > /var/lib/fedge-coordinator/coordinator-provision.json
echo etc-provision-secret > /etc/fedge/credentials/coordinator/coordinator-provision.json
mkdir -p /etc/seen
ln /var/lib/fedge/keys/identity.key /var/lib/seen/identity
ln /var/lib/fedge/keys/curve.json /var/lib/seen/curvejson
ln /var/lib/fedge-credentials/agent/curve.key /var/lib/seen/curve
ln /var/lib/fedge-coordinator/coordinator-provision.json /var/lib/seen/provision
ln /etc/fedge/credentials/coordinator/coordinator-provision.json /etc/seen/provision
echo model > /var/lib/fedge/model.onnx
sh $P/postrm purge 2>>$ERR
for f in /var/lib/seen/identity /var/lib/seen/curvejson /var/lib/seen/curve \
         /var/lib/seen/provision /etc/seen/provision; do
    echo "$f: $(tr -d '\\000' < $f | wc -c) non-zero bytes, $(wc -c < $f) bytes"
done
for p in /var/lib/fedge /var/lib/fedge-credentials /etc/fedge/credentials; do
    if [ -e "$p" ]; then echo "left: $p"; fi
done
""")
    assert proc.returncode == 0, proc.stdout + proc.stderr + script_stderr(tmp_path)
    lines = proc.stdout.splitlines()
    seen = [line for line in lines if "non-zero bytes" in line]
    assert len(seen) == 5, lines
    for line in seen:
        assert " 0 non-zero bytes" in line, (line, script_stderr(tmp_path))
        assert not line.endswith(" 0 bytes"), line  # overwritten in place, not truncated
    assert not [line for line in lines if line.startswith("left: ")], lines
