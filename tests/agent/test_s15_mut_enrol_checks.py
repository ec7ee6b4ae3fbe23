"""A console-signed enrolment file is still checked for what the console vouches for
inside it: its roster must hold this site with this file's identity, and its TUF root
must be signed by its own root key. A file that fails either (a console bug, such as a
roster made before the identity existed) is refused as corrupt, and nothing is written
into the state dir.

The files are the console's own (`create_enrolment`), rewritten and signed again with
the console's roster key, as the console itself would sign them. Kills mutations M04
(the roster check ``if False``), M05 (enrol.py's root self-signature check deleted)
and M55 (it and install_trusted_root's deleted together; install_trusted_root's alone,
M03, is caught by enrol.py's check first)."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import pytest

from fedge.agent.enrol import install_enrolment
from fedge.console.enrolment import EnrolmentError, create_enrolment
from fedge.console.store import ConsoleStore
from fedge.secagg.keys import Identity, Roster
from fedge.update.files import write_json


@pytest.fixture
def console(tmp_path: Path) -> ConsoleStore:
    return ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://127.0.0.1:7000")


@pytest.fixture
def enrolment(console: ConsoleStore, tmp_path: Path) -> Path:
    """The console's file for site h1 (h2 enrolled too, so the roster holds another)."""
    create_enrolment(console, "h2", valid_for=timedelta(days=1), out=tmp_path / "h2.fe")
    path, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                               out=tmp_path / "h1.fe")
    return path


def payload_of(file: Path) -> dict:
    return json.loads(base64.b64decode(json.loads(file.read_text())["payload"]))


def signed_by_console(console: ConsoleStore, out: Path, payload: dict) -> Path:
    """An enrolment file of `payload`, signed with the console's roster key."""
    raw = json.dumps(payload, sort_keys=True).encode()
    write_json(out, {"format": "fedge-enrolment/1", "payload": base64.b64encode(raw).decode(),
                     "signature": console.roster_identity().sign(raw).hex()})
    return out


def files_under(state: Path) -> list[str]:
    return sorted(p.relative_to(state).as_posix() for p in state.rglob("*")) \
        if state.exists() else []


def test_the_console_file_itself_is_installed(enrolment: Path, tmp_path: Path) -> None:
    """The unaltered file goes in: the refusals below are the alterations'."""
    state = tmp_path / "state"
    install_enrolment(enrolment, state)
    assert (state / "enrolment.json").is_file()
    assert (state / "tuf" / "metadata" / "root.json").is_file()


@pytest.mark.parametrize("roster_entry", ["omitted", "another key"])
def test_a_roster_that_does_not_hold_this_site_with_this_identity_is_refused(
    console: ConsoleStore, enrolment: Path, tmp_path: Path, roster_entry: str,
) -> None:
    payload = payload_of(enrolment)
    held = Roster.from_bytes(payload["roster"].encode(), console.roster_public_key())
    entries = dict(held.entries)
    assert entries["h1"] == Identity.from_private_bytes(
        bytes.fromhex(payload["identity_private"])).public_bytes()
    if roster_entry == "omitted":
        del entries["h1"]
    else:
        entries["h1"] = Identity.generate().public_bytes()
    roster = Roster.build(entries, console.roster_identity(), serial=held.serial)
    file = signed_by_console(console, tmp_path / "inconsistent.fe",
                             {**payload, "roster": roster.to_bytes().decode()})
    state = tmp_path / "state"
    with pytest.raises(EnrolmentError, match=r"is corrupt: the roster does not hold site "
                                             r"'h1' with this identity"):
        install_enrolment(file, state)
    assert files_under(state) == []


def test_a_tuf_root_not_signed_by_its_own_root_key_is_refused(
    console: ConsoleStore, enrolment: Path, tmp_path: Path,
) -> None:
    payload = payload_of(enrolment)
    root = json.loads(payload["tuf_root"])
    assert root["signatures"], "the console's root carries its root key's signature"
    for signature in root["signatures"]:
        sig = signature["sig"]
        signature["sig"] = sig[:-2] + ("00" if sig[-2:] != "00" else "01")
    file = signed_by_console(console, tmp_path / "bad-root.fe",
                             {**payload, "tuf_root": json.dumps(root)})
    state = tmp_path / "state"
    with pytest.raises(EnrolmentError, match=r"is corrupt: root metadata is not signed by "
                                             r"the root key in root v1"):
        install_enrolment(file, state)
    assert files_under(state) == []
