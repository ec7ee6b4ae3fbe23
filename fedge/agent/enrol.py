"""`fedge agent enrol FILE`: install an enrolment file into the agent state dir.

Written under ``<state_dir>`` (files 0600, directories 0700)::

    keys/curve.json          the appliance's CURVE key pair {"public", "secret"} (z85)
    keys/identity.key        Ed25519 identity (secagg Identity, 32 raw bytes)
    keys/coordinator.json    {"endpoint", "public_key"} — the pinned coordinator key
    roster.json              the console-signed roster at enrolment time
    tuf/metadata/root.json   trusted TUF root for signed updates
    enrolment.json           site, console id and fingerprint, roster public key (last)

A file signed by another console than the one this appliance already trusts is
refused, as are corrupt and expired files; nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path("/var/lib/fedge")


@dataclass(frozen=True)
class EnrolledSite:
    site: str
    console_id: str
    console_fingerprint: str
    coordinator_endpoint: str
    coordinator_public_key: str
    curve_public: str
    curve_secret: str
    roster_public_key: bytes
    state_dir: Path


def install_enrolment(file: Path, state_dir: Path, *, now: datetime | None = None,
                      expected_console: bytes | str | None = None) -> EnrolledSite:
    """Check `file` and install it into `state_dir`.

    `expected_console`: the console's roster key, or the fingerprint the operator
    read out (16+ hex digits); by default the console of a previous enrolment.

    Raises:
        EnrolmentError: corrupt, expired or foreign file (nothing written).
        OSError: the state dir cannot be written.
    """
    from fedge.agent.updates import install_trusted_root
    from fedge.console.enrolment import EnrolmentError, read_enrolment
    from fedge.secagg.keys import Identity, Roster
    from fedge.update import tuf_repo
    from fedge.update.files import write_atomic, write_json

    state_dir = Path(state_dir)
    trusted = expected_console
    existing = state_dir / "enrolment.json"
    if trusted is None and existing.exists():
        try:
            trusted = bytes.fromhex(json.loads(existing.read_text())["roster_public_key"])
        except (ValueError, KeyError, TypeError) as exc:
            raise EnrolmentError(f"existing enrolment state {existing} is corrupt ({exc}); "
                                 "pass --console-key to say which console to trust") from exc
    e = read_enrolment(Path(file), now=now, expected_console=trusted)
    try:
        roster = Roster.from_bytes(e.roster, e.roster_public_key)
        identity = Identity.from_private_bytes(e.identity_private)
        if roster.entries.get(e.site) != identity.public_bytes():
            raise ValueError(f"the roster does not hold site {e.site!r} with this identity")
        root = tuf_repo.load(e.tuf_root, "root")
        tuf_repo.verify_by(root, "root", root)
    except ValueError as exc:
        raise EnrolmentError(f"enrolment file {file} is corrupt: {exc}") from exc
    for d in (state_dir, state_dir / "keys"):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
    write_json(state_dir / "keys" / "curve.json",
               {"public": e.curve_public, "secret": e.curve_secret})
    identity.save(state_dir / "keys" / "identity.key")
    write_json(state_dir / "keys" / "coordinator.json",
               {"endpoint": e.coordinator_endpoint, "public_key": e.coordinator_public_key})
    write_atomic(state_dir / "roster.json", e.roster)
    install_trusted_root(state_dir, e.tuf_root)
    write_json(existing, {
        "site": e.site, "console_id": e.console_id, "console_fingerprint": e.fingerprint(),
        "roster_public_key": e.roster_public_key.hex(), "issued": e.issued.isoformat(),
        "expires": e.expires.isoformat(),
    })
    _give_to_owner(state_dir)
    return EnrolledSite(e.site, e.console_id, e.fingerprint(), e.coordinator_endpoint,
                        e.coordinator_public_key, e.curve_public, e.curve_secret,
                        e.roster_public_key, state_dir)


def _give_to_owner(state_dir: Path) -> None:
    """Run as root (as hospital IT does, with sudo) into a state directory the service
    user owns (the package's /var/lib/fedge, owned by fedge): hand what root wrote
    there to that user, or the agent, running as fedge, could not read its own keys.
    (systemd's StateDirectory= does not re-own files inside a directory whose top is
    already owned by the right user.) Modes stay as written (0600/0700)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    top = state_dir.stat()
    if top.st_uid == 0:
        return
    for root, dirs, files in os.walk(state_dir):
        for name in [*dirs, *files]:
            path = os.path.join(root, name)
            if os.lstat(path).st_uid == 0:
                os.chown(path, top.st_uid, top.st_gid, follow_symlinks=False)


def load_enrolled(state_dir: Path) -> EnrolledSite:
    """Read what `install_enrolment` wrote (for the agent process).

    Raises:
        FileNotFoundError: the appliance is not enrolled (says how to enrol).
        ValueError: a file is corrupt (names it).
    """
    state_dir = Path(state_dir)
    path = state_dir / "enrolment.json"
    if not path.exists():
        raise FileNotFoundError(f"appliance not enrolled: no {path}; run "
                                "`fedge agent enrol FILE`")
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
        curve = json.loads((state_dir / "keys" / "curve.json").read_text())
        coord = json.loads((state_dir / "keys" / "coordinator.json").read_text())
        return EnrolledSite(meta["site"], meta["console_id"], meta["console_fingerprint"],
                            coord["endpoint"], coord["public_key"], curve["public"],
                            curve["secret"], bytes.fromhex(meta["roster_public_key"]),
                            state_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"enrolment state under {state_dir} is corrupt: {exc}") from exc


def register_enrol(subparsers: Any) -> None:
    """Add `enrol FILE [--state-dir DIR] [--console-key FINGERPRINT]` to the agent's
    subcommands (called from fedge/agent/cli.py)."""
    p = subparsers.add_parser("enrol", help="install an enrolment file from the console")
    p.add_argument("file", type=Path, help="the .fedge-enrol file")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                   help=f"agent state directory (default {DEFAULT_STATE_DIR})")
    p.add_argument("--console-key", default=None,
                   help="the console to trust (refuse others): the fingerprint `fedge "
                        "console enrol` printed (16 or more hex digits) or its full "
                        "roster key (64)")
    p.set_defaults(func=_cmd_enrol)


def _cmd_enrol(args: argparse.Namespace) -> int:
    from fedge.console.enrolment import EnrolmentError

    expected: bytes | str | None = None
    if args.console_key:
        key = args.console_key.strip().lower()
        try:
            bytes.fromhex(key if len(key) % 2 == 0 else key + "0")
        except ValueError:
            key = ""
        if len(key) < 16 or len(key) > 64:
            print(f"fedge agent enrol: --console-key {args.console_key!r} is neither a "
                  "console fingerprint (16 or more hex digits) nor a roster key (64)",
                  file=sys.stderr)
            return 2
        expected = bytes.fromhex(key) if len(key) == 64 else key
    try:
        site = install_enrolment(args.file, args.state_dir, expected_console=expected)
    except (EnrolmentError, OSError) as exc:
        print(f"fedge agent enrol: {exc}", file=sys.stderr)
        return 2
    print(f"enrolled site {site.site} with console {site.console_fingerprint}; coordinator "
          f"{site.coordinator_endpoint}; state in {site.state_dir}")
    return 0
