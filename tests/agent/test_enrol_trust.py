"""An enrolment file of the console an appliance is already enrolled with never
moves the appliance's trust backwards or sideways: the TUF root it trusts goes
only forward, to a root it vouches for, and its coordinator pin changes only with
--replace. Files are the console's own (`create_enrolment`), or made the way a
holder of the roster key alone would make them."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.agent.enrol import install_enrolment, load_enrolled
from fedge.console.enrolment import EnrolmentError, create_enrolment
from fedge.console.store import ConsoleStore
from fedge.update import tuf_repo
from fedge.update.files import write_json


def fedge(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *argv], capture_output=True,
                          text=True, timeout=120)


def trusted_root(state: Path) -> dict:
    return json.loads((state / "tuf" / "metadata" / "root.json").read_text())["signed"]


def tree(state: Path) -> dict[str, bytes]:
    return {p.relative_to(state).as_posix(): p.read_bytes()
            for p in sorted(state.rglob("*")) if p.is_file()}


@pytest.fixture
def console(tmp_path: Path) -> ConsoleStore:
    return ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://127.0.0.1:7000")


def renew(console: ConsoleStore, site: str, out: Path) -> Path:
    """The console's revoke + enrol: a new identity and file for `site`."""
    console.revoke_site(site)
    path, _ = create_enrolment(console, site, valid_for=timedelta(days=1), out=out)
    return path


def forged(console: ConsoleStore, file: Path, out: Path, **changes: str) -> Path:
    """`file` with `changes` to its payload, signed with the roster key alone."""
    payload = json.loads(base64.b64decode(json.loads(file.read_text())["payload"]))
    raw = json.dumps({**payload, **changes}, sort_keys=True).encode()
    write_json(out, {"format": "fedge-enrolment/1", "payload": base64.b64encode(raw).decode(),
                     "signature": console.roster_identity().sign(raw).hex()})
    return out


def someone_elses_root(version: int) -> str:
    keys = [Ed25519PrivateKey.generate() for _ in range(4)]
    return tuf_repo.to_bytes(tuf_repo.create_root(*keys, now=tuf_repo.utcnow(),
                                                  version=version)).decode()


def test_an_old_file_run_again_after_a_key_rotation_does_not_roll_the_root_back(
        console, tmp_path):
    """The site's first file (root v1), run again after the console rotated its root
    and targets keys and the site was enrolled anew (root v2), is refused naming both
    versions; the appliance keeps trusting v2 (before: v1 again, the retired keys)."""
    state = tmp_path / "state"
    first, _ = create_enrolment(console, "h1", valid_for=timedelta(days=7),
                                out=tmp_path / "h1-first.fedge-enrol")
    r = fedge("agent", "enrol", "--state-dir", str(state), str(first))
    assert r.returncode == 0, r.stderr
    assert trusted_root(state)["version"] == 1
    console.rotate_offline_keys(["root", "targets"])
    renewed = renew(console, "h1", tmp_path / "h1-renewed.fedge-enrol")
    r = fedge("agent", "enrol", "--state-dir", str(state), str(renewed))
    assert r.returncode == 0, r.stderr  # v2 is signed by v1's root key too: it chains
    assert trusted_root(state)["version"] == 2
    before = tree(state)
    r = fedge("agent", "enrol", "--state-dir", str(state), str(first))
    assert r.returncode == 2
    assert "TUF root v1, older than the root v2 this appliance trusts" in r.stderr
    assert tree(state) == before
    r = fedge("agent", "enrol", "--state-dir", str(state), "--replace", str(first))
    assert r.returncode == 2, "a rollback is refused even with --replace"
    assert tree(state) == before


def test_the_same_file_twice_keeps_the_root_the_appliance_followed_since(console, tmp_path):
    """Run again, a file carrying the root the appliance trusts changes nothing in its
    trust, and says to destroy the file (it holds the appliance's secret keys)."""
    state = tmp_path / "state"
    file, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                               out=tmp_path / "h1.fedge-enrol")
    for _ in range(2):
        r = fedge("agent", "enrol", "--state-dir", str(state), str(file))
        assert r.returncode == 0, r.stderr
        assert f"now destroy {file}" in r.stdout and "secret keys" in r.stdout
    assert file.exists(), "the operator destroys it: the command does not delete it"
    assert trusted_root(state)["version"] == 1


def test_a_file_signed_with_the_roster_key_alone_cannot_re_root_the_appliance(
        console, tmp_path):
    """The roster key signs enrolment files, but it does not make a TUF root: a
    same-site file naming another root (a later version, or the same one) and another
    coordinator is refused and nothing changes (before: installed without --replace)."""
    state = tmp_path / "state"
    file, _ = create_enrolment(console, "h2", valid_for=timedelta(days=1),
                               out=tmp_path / "h2.fedge-enrol")
    install_enrolment(file, state)
    before = tree(state)
    for version in (5, 1):
        evil = forged(console, file, tmp_path / f"evil-{version}.fedge-enrol",
                      tuf_root=someone_elses_root(version),
                      coordinator_endpoint="tcp://203.0.113.9:7700")
        with pytest.raises(EnrolmentError, match=f"TUF root v{version}"):
            install_enrolment(evil, state)
        assert tree(state) == before
    evil = forged(console, file, tmp_path / "evil-5.fedge-enrol",
                  tuf_root=someone_elses_root(5))
    r = fedge("agent", "enrol", "--state-dir", str(state), str(evil))
    assert r.returncode == 2
    assert "does not vouch for" in r.stderr and "root v1" in r.stderr
    assert tree(state) == before


def test_a_root_the_held_one_cannot_vouch_for_needs_replace(console, tmp_path):
    """Two root-key rotations the appliance never saw (v1 -> v2 -> v3): v3 is signed by
    v2's key, which v1 does not name, so it does not verify against v1: refused, and
    installed with --replace."""
    state = tmp_path / "state"
    first, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                                out=tmp_path / "h1.fedge-enrol")
    install_enrolment(first, state)
    console.rotate_offline_keys(["root"])
    console.rotate_offline_keys(["root"])
    renewed = renew(console, "h1", tmp_path / "h1-renewed.fedge-enrol")
    with pytest.raises(EnrolmentError, match="root v3, which the root v1 this appliance "
                                             "trusts does not vouch for"):
        install_enrolment(renewed, state)
    assert trusted_root(state)["version"] == 1
    install_enrolment(renewed, state, replace=True)
    assert trusted_root(state)["version"] == 3


def test_a_changed_coordinator_pin_needs_replace(console, tmp_path):
    """A same-site file of the same console naming another coordinator endpoint or key
    is refused without --replace (naming old and new), and installed with it."""
    state = tmp_path / "state"
    file, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                               out=tmp_path / "h1.fedge-enrol")
    install_enrolment(file, state)
    moved = forged(console, file, tmp_path / "moved.fedge-enrol",
                   coordinator_endpoint="tcp://127.0.0.1:7100")
    before = tree(state)
    r = fedge("agent", "enrol", "--state-dir", str(state), str(moved))
    assert r.returncode == 2
    assert "endpoint tcp://127.0.0.1:7000 to tcp://127.0.0.1:7100" in r.stderr
    assert tree(state) == before
    r = fedge("agent", "enrol", "--state-dir", str(state), "--replace", str(moved))
    assert r.returncode == 0, r.stderr
    assert load_enrolled(state).coordinator_endpoint == "tcp://127.0.0.1:7100"
