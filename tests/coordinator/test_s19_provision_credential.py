"""The coordinator started as its service user with the provision file where the docs put
it (s19, r4): /etc/fedge/credentials/coordinator/coordinator-provision.json, the
directories root's 0700 (postinst), no ``provision`` line in coordinator.toml, the unit
handing it over with LoadCredential= as $CREDENTIALS_DIRECTORY/fedge_coordinator-
provision.json. It stopped at every start with a PermissionError traceback (exit 1, a
crash loop under Restart=on-failure): every candidate for the provision file was looked
at, the root-only one too, though the credential came first. And the documented
`sudo fedge coordinator check --config ... --user fedge` said ok: it loaded the
configuration as root.

Now the candidates are taken in order, the first usable one wins, one this user cannot
look at is passed over and named in a one-line error only where none is usable; and
check --user loads the configuration as that user too, with the provision file handed
over as the unit hands it: its exit agrees with whether the service starts.

Real processes: root (tests run as root) lays out the files; a throwaway unprivileged
user (useradd -M, removed after) stands in for fedge and runs the unit's command, its
$CREDENTIALS_DIRECTORY a directory of its own holding the credential's copy, as systemd
makes it; a real `fedge coordinator run` up to listening, stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedge.secagg.keys import Identity
from fedge.transport import CurveKeyPair

REPO = Path(__file__).resolve().parents[2]
CRED = "fedge_coordinator-provision.json"

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("useradd") is None
    or shutil.which("setpriv") is None,
    reason="needs root, useradd and setpriv: the service runs as another user")


@dataclass
class Site:
    """The packaged layout under ``etc`` (/etc/fedge), for user ``name``."""

    name: str
    uid: int
    gid: int
    etc: Path
    config: Path
    source: Path  # etc/credentials/coordinator/coordinator-provision.json, root's
    creds: Path  # the unit's $CREDENTIALS_DIRECTORY
    state: Path
    provision: str  # its text
    port: int

    def hand_over(self) -> None:
        """What systemd does at start: copy the source's provision file into
        $CREDENTIALS_DIRECTORY, readable by the service user alone."""
        cred = self.creds / CRED
        shutil.copyfile(self.source, cred)
        os.chown(cred, self.uid, self.gid)
        os.chmod(cred, 0o400)

    def fedge(self, *argv: str, user: bool = True, credentials: bool = True
              ) -> subprocess.CompletedProcess[str]:
        """`fedge coordinator ARGV`: as the service user (with the unit's
        $CREDENTIALS_DIRECTORY unless not ``credentials``), or as root."""
        return subprocess.run([*self.prefix(user, credentials), sys.executable, "-m",
                               "fedge.cli", "coordinator", *argv], capture_output=True,
                              text=True, timeout=120, cwd=REPO, env=self.env(credentials))

    def prefix(self, user: bool, credentials: bool) -> list[str]:
        if not user:
            return []
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                "--"]

    def env(self, credentials: bool) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")}
        if credentials:
            env["CREDENTIALS_DIRECTORY"] = str(self.creds)
        return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def site() -> Iterator[Site]:
    """A throwaway user standing in for fedge, and /etc/fedge as the package and the
    docs leave it: coordinator.toml without ``provision``, the provision file in
    credentials/coordinator/ (root's, 0600, in directories root's 0700), the state
    directory the user's (StateDirectory=), its credentials directory (systemd's)."""
    import pwd

    name = f"fc{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "-M", "-s", "/bin/sh", name], check=True, timeout=60)
    base = Path(tempfile.mkdtemp(prefix="s19-provision-"))
    try:
        pw = pwd.getpwnam(name)
        base.chmod(0o755)  # the user reaches etc/ and state/, as /etc and /var/lib
        etc = base / "etc"
        etc.mkdir(mode=0o755)
        source = etc / "credentials" / "coordinator" / "coordinator-provision.json"
        source.parent.mkdir(parents=True)
        for d in (source.parent.parent, source.parent):
            d.chmod(0o700)  # root's: postinst
        port = free_port()
        kp = CurveKeyPair.generate()
        text = json.dumps({"curve_public": kp.public, "curve_secret": kp.secret,
                           "roster": "", "operators": {},
                           "roster_public_key": Identity.generate().public_bytes().hex(),
                           "endpoint": f"tcp://127.0.0.1:{port}"})
        source.write_text(text)
        source.chmod(0o600)
        state = base / "state"
        state.mkdir(mode=0o700)
        os.chown(state, pw.pw_uid, pw.pw_gid)
        creds = base / "credentials"  # systemd's /run/credentials/fedge-coordinator.service
        creds.mkdir(mode=0o500)
        os.chown(creds, pw.pw_uid, pw.pw_gid)
        config = etc / "coordinator.toml"
        config.write_text(f'state_dir = "{state}"\nbind = "tcp://127.0.0.1:{port}"\n')
        config.chmod(0o644)
        yield Site(name, pw.pw_uid, pw.pw_gid, etc, config, source, creds, state, text,
                   port)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run(["userdel", name], timeout=60, check=False)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line of a refusal: exit 2, nothing on stdout, no traceback."""
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.splitlines()
    return line


def test_the_service_user_starts_with_the_credential(site: Site) -> None:
    """The documented setup: the unit's start command, as the service user, loads the
    configuration and listens; check as that user and check --user as root say ok."""
    site.hand_over()
    done = site.fedge("check", "--config", str(site.config))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ok: {site.config}\n", "")
    proc = subprocess.Popen(
        [*site.prefix(True, True), sys.executable, "-m", "fedge.cli", "coordinator", "run",
         "--config", str(site.config)], cwd=REPO, env=site.env(True),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # up to 60 s: it writes the endpoint once it listens
            if (site.state / "endpoint").exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        if proc.poll() is not None:
            pytest.fail(f"the coordinator did not start: {proc.communicate()[1]}")
        assert (site.state / "endpoint").read_text().strip() == \
            f"tcp://127.0.0.1:{site.port}"
        with socket.create_connection(("127.0.0.1", site.port), timeout=5):
            pass
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    # root, for the service user: the provision file read where the unit takes it from
    done = site.fedge("check", "--config", str(site.config), "--user", site.name,
                      user=False, credentials=False)
    assert (done.returncode, done.stdout) == (0, f"ok: {site.config}\n"), done.stderr
    assert done.stderr == (
        f"note: provision file {site.source}: the service gets it as "
        "$CREDENTIALS_DIRECTORY/fedge_coordinator-provision.json (the unit's "
        "LoadCredential=); checked as that\n")


def test_without_the_credential_the_service_user_gets_one_line(site: Site) -> None:
    """The unit's source holds no provision file (it is nowhere): one line naming every
    place looked at, the root-only one as not readable by this user, exit 2; and
    check --user as root, for the service user, refuses as well."""
    site.source.unlink()
    done = site.fedge("run", "--config", str(site.config))
    line = one_line(done)
    assert line == (
        f"fedge coordinator: coordinator config {site.config} needs 'curve_key' (or a "
        f"'provision' file); no provision file at {site.creds / CRED}, "
        f"{site.state / 'coordinator-provision.json'}; {site.source} cannot be read as "
        f"user {site.name} (permission denied): the service takes the provision file from "
        f"$CREDENTIALS_DIRECTORY ({CRED}, the unit's LoadCredential=fedge:"
        f"{site.source.parent}), which holds no {CRED} (the unit's LoadCredential= source "
        "holds no provision file, or is another directory)")
    assert one_line(site.fedge("check", "--config", str(site.config))) == line
    done = site.fedge("check", "--config", str(site.config), "--user", site.name,
                      user=False, credentials=False)
    assert one_line(done) == (
        f"fedge coordinator: coordinator config {site.config} needs 'curve_key' (or a "
        f"'provision' file); no provision file at {site.source}, "
        f"{site.state / 'coordinator-provision.json'}")
    assert list(site.state.iterdir()) == []


def test_outside_the_unit_the_service_user_is_told_to_check_as_root(site: Site) -> None:
    """`fedge coordinator run` by hand as the service user, without the unit's
    $CREDENTIALS_DIRECTORY: the root-only provision file cannot be read, said in one
    line with the check to run instead."""
    done = site.fedge("check", "--config", str(site.config), credentials=False)
    assert one_line(done) == (
        f"fedge coordinator: coordinator config {site.config} needs 'curve_key' (or a "
        f"'provision' file); no provision file at "
        f"{site.state / 'coordinator-provision.json'}; {site.source} cannot be read as "
        f"user {site.name} (permission denied): the service takes the provision file from "
        f"$CREDENTIALS_DIRECTORY ({CRED}, the unit's LoadCredential=fedge:"
        f"{site.source.parent}), which is not set here (not under the unit): check it as "
        f"root, as the service user: `sudo fedge coordinator check --config {site.config} "
        f"--user {site.name}`")


def test_a_provision_file_in_the_state_dir_is_used_past_the_root_only_one(
        site: Site) -> None:
    """An older layout: the provision file in the state directory, the unit's source
    empty (postinst made it). The service starts on it; check --user agrees."""
    os.rename(site.source, site.state / "coordinator-provision.json")
    os.chown(site.state / "coordinator-provision.json", site.uid, site.gid)
    done = site.fedge("check", "--config", str(site.config))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ok: {site.config}\n", "")
    done = site.fedge("check", "--config", str(site.config), "--user", site.name,
                      user=False, credentials=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ok: {site.config}\n", "")
    # outside the unit, the user cannot tell whether the root-only one holds it: said
    done = site.fedge("check", "--config", str(site.config), credentials=False)
    assert (done.returncode, done.stdout) == (0, f"ok: {site.config}\n"), done.stderr
    assert done.stderr == (
        f"warning: provision file {site.state / 'coordinator-provision.json'} is used, but "
        f"{site.source} cannot be read as user {site.name} (permission denied), and comes "
        "first: where it holds one, root (and the service, as its credential) would use "
        "that one instead\n")


@pytest.mark.parametrize("setup", ["provision-line-to-root-file", "config-root-only"])
def test_check_user_as_root_refuses_what_the_service_user_cannot_read(
        site: Site, setup: str) -> None:
    """What root reads and the service user cannot: check --user as root said ok while
    the service stopped at every start. Now it says what the service meets, exit 2."""
    site.hand_over()
    if setup == "provision-line-to-root-file":
        site.config.write_text(site.config.read_text() + f'provision = "{site.source}"\n')
        said = (f"fedge coordinator: coordinator config {site.config}: provision file "
                f"{site.source} is unreadable or lacks a field: [Errno 13] Permission "
                f"denied: '{site.source}'")
    else:
        site.config.chmod(0o600)
        said = (f"fedge coordinator: cannot read coordinator config {site.config}: "
                f"[Errno 13] Permission denied: '{site.config}'")
    service = site.fedge("run", "--config", str(site.config))
    assert one_line(service) == said
    done = site.fedge("check", "--config", str(site.config), "--user", site.name,
                      user=False, credentials=False)
    assert one_line(done) == said
    assert list(site.state.iterdir()) == []
    # root itself reads both
    done = site.fedge("check", "--config", str(site.config), user=False, credentials=False)
    assert (done.returncode, done.stdout) == (0, f"ok: {site.config}\n"), done.stderr
