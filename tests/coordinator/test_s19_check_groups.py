"""`sudo fedge coordinator check --user NAME` looks as the service does, supplementary
groups included (s19, r5 #1). Its child dropped every supplementary group, while the
unit's User=NAME runs the service with NAME's (systemd's initgroups): a state directory
NAME writes through a group (root:GROUP, mode 2770) was said unwritable, "run would
stop at start", exit 2, though the service started on it; and a provision file NAME
reads through a group was said unreadable by the configuration's load as NAME.

Now both children (the configuration's load, the state directory's look) hold NAME's
supplementary groups: a user in the group is told ok, one outside it is refused as
before. What the service user really may do is shown first, by the user itself with
its groups (setpriv --init-groups, as systemd starts it), so the expected answers are
the kernel's, not this test's.

Real processes: root (tests run as root) lays out the files; a throwaway group and two
throwaway users (useradd -M, removed after), one in the group as a supplementary group
(its own primary group another), one not."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.coordinator.test_s17_coord_config_bom import provision
from tests.coordinator.test_s19_check_start import free_port

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("useradd") is None
    or shutil.which("groupadd") is None or shutil.which("setpriv") is None,
    reason="needs root, useradd, groupadd and setpriv: --user looks as another user")


@dataclass
class Site:
    member: str  # in ``group``, as a supplementary group
    outsider: str  # not in it
    group: str
    gid: int
    base: Path
    config: Path
    prov: Path
    state: Path


@pytest.fixture
def site() -> Iterator[Site]:
    """A group, a user in it and one not, and a coordinator configuration under a
    directory both users reach (0755, as /etc and /var/lib): config and provision file
    root's and readable by all, the state directory (with jobs/) the member's own."""
    import grp
    import pwd

    tag = uuid.uuid4().hex[:8]
    group, member, outsider = f"fg{tag}", f"fm{tag}", f"fo{tag}"
    made: list[list[str]] = []
    base = Path(tempfile.mkdtemp(prefix="s19-check-groups-"))
    try:
        subprocess.run(["groupadd", group], check=True, timeout=60)
        made.append(["groupdel", group])
        for name, extra in ((member, ["-G", group]), (outsider, [])):
            subprocess.run(["useradd", "-M", "-s", "/bin/sh", *extra, name], check=True,
                           timeout=60)
            made.insert(0, ["userdel", name])
        gid = grp.getgrnam(group).gr_gid
        assert pwd.getpwnam(member).pw_gid != gid  # a supplementary group, not its own
        base.chmod(0o755)
        prov = provision(base)
        port = free_port()
        prov.write_text(json.dumps(json.loads(prov.read_text())
                                   | {"endpoint": f"tcp://127.0.0.1:{port}"}))
        prov.chmod(0o644)
        config = base / "coordinator.toml"
        config.write_text('state_dir = "st"\nprovision = "prov.json"\n'
                          f'bind = "tcp://127.0.0.1:{port}"\n')
        config.chmod(0o644)
        state = base / "st"
        (state / "jobs").mkdir(parents=True)
        entry = pwd.getpwnam(member)
        for path in (state, state / "jobs"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
            path.chmod(0o700)
        yield Site(member, outsider, group, gid, base, config, prov, state)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        for argv in made:
            subprocess.run(argv, timeout=60, check=False)


def check(site: Site, user: str) -> subprocess.CompletedProcess[str]:
    """`fedge coordinator check --user USER`, as root."""
    return subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", "check",
                           "--config", str(site.config), "--user", user],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def may(user: str, *argv: str) -> bool:
    """Whether ``argv`` succeeds run by ``user`` with its groups, as systemd's User=
    runs the service (initgroups)."""
    import pwd

    entry = pwd.getpwnam(user)
    return subprocess.run(["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                           "--init-groups", "--", *argv], capture_output=True,
                          timeout=60).returncode == 0


def test_a_state_dir_written_through_a_supplementary_group_is_ok(site: Site) -> None:
    """root:GROUP 2770, the member in GROUP: the service may write it, and check --user
    says ok; the outsider may not, and check --user refuses, naming it."""
    for path in (site.state, site.state / "jobs"):
        os.chown(path, 0, site.gid)
        path.chmod(0o2770)
    probe = str(site.state / "probe")
    assert may(site.member, "touch", probe)
    os.unlink(probe)
    assert not may(site.outsider, "touch", probe)
    done = check(site, site.member)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ok: {site.config}\n", "")
    done = check(site, site.outsider)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr == (
        f"fedge coordinator: state_dir {site.state} (mode 2770, owner root) cannot be "
        f"written as user {site.outsider}: `fedge coordinator run` as user {site.outsider} "
        "would stop at start; give the service user the directory (chown -R), or point "
        "state_dir at one it owns\n")


def test_a_jobs_dir_written_through_a_supplementary_group_is_ok(site: Site) -> None:
    """Only jobs/ is the group's: the member is told ok (was exit 1, each job said to
    fail)."""
    jobs = site.state / "jobs"
    os.chown(jobs, 0, site.gid)
    jobs.chmod(0o2770)
    assert may(site.member, "test", "-w", str(jobs))
    done = check(site, site.member)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ok: {site.config}\n", "")


def test_a_provision_file_read_through_a_supplementary_group_is_ok(site: Site) -> None:
    """The provision file root:GROUP 0640: the configuration's load as the member reads
    it; as the outsider it cannot (the state directory the outsider's own, so that is
    what stops it)."""
    import pwd

    os.chown(site.prov, 0, site.gid)
    site.prov.chmod(0o640)
    assert may(site.member, "cat", str(site.prov))
    assert not may(site.outsider, "cat", str(site.prov))
    done = check(site, site.member)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ok: {site.config}\n", "")
    entry = pwd.getpwnam(site.outsider)
    for path in (site.state, site.state / "jobs"):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    done = check(site, site.outsider)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr == (
        f"fedge coordinator: coordinator config {site.config}: provision file "
        f"{site.prov} is unreadable or lacks a field: [Errno 13] Permission denied: "
        f"'{site.prov}'\n")


def test_run_as_takes_the_named_users_groups_only_when_told(site: Site) -> None:
    """fedge.as_owner.run_as: with ``groups_of`` the child holds that user's groups (its
    primary and GROUP); without, none (the writers acting for a directory's owner). In a
    fresh process: run_as forks only without other threads."""
    import pwd

    entry = pwd.getpwnam(site.member)
    probe = (
        "import json, os\n"
        "from fedge.as_owner import run_as\n"
        f"owner = ({entry.pw_uid}, {entry.pw_gid})\n"
        "print(json.dumps([run_as(owner, os.getgroups, what='probe', "
        f"groups_of={site.member!r}), run_as(owner, os.getgroups, what='probe')]))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    told, untold = json.loads(done.stdout)
    assert sorted(set(told)) == sorted({entry.pw_gid, site.gid})
    assert untold == []
