"""`fedge agent enrol FILE`: install an enrolment file into the agent state dir.

Written under ``<state_dir>`` (files 0600, directories 0700)::

    keys/curve.json          the appliance's CURVE key pair {"public", "secret"} (z85)
    keys/identity.key        Ed25519 identity (secagg Identity, 32 raw bytes)
    keys/coordinator.json    {"endpoint", "public_key"} — the pinned coordinator key
    roster.json              the console-signed roster at enrolment time
    tuf/metadata/root.json   trusted TUF root for signed updates
    enrolment.json           site, console id and console key fingerprint, roster public
                             key, the file's issue and expiry dates, the CURVE public key
                             (last)
    enrolment-history.jsonl  one line per enrolment installed, never rewritten: when, by
                             which user, the site, console and coordinator it made this
                             appliance, and the enrolment it replaced (`HISTORY`)

A file signed by another console than the one this appliance already trusts is
refused, as are corrupt and expired files; nothing is written then.

A state dir enrolled as one site takes a file for another site (or for a site of
another console: site names are a console's own) only with ``replace``
(``--replace``): the operator's slip, a file carried to the wrong appliance or
enrolled into the wrong state dir, would otherwise turn this appliance silently
into another site. Replacing replaces the files above and nothing else: the
privacy ledger (``privacy/ledger.json``) and the secure-aggregation reveal log
(``secagg/revealed.jsonl``) describe this appliance's data, not its name, so they
stay: the privacy budget its data has spent stays spent, and no update revealed
under the old site can be unmasked over another survivor set under the new one.
The same site enrolled again (the command run twice, or a renewed file after the
console revoked and re-enrolled the site) needs no ``replace``, as before.

A file of the console this appliance is enrolled with never moves its trust
backwards or sideways: the TUF root it trusts is kept unless the file's root is a
later version that root vouches for (an old file run again after a key rotation
would trust the retired keys again; a file signed with the roster key alone could
name anyone's root), and a change of the pinned coordinator (endpoint or key)
needs ``replace``. Nor does it take a roster older (by serial) than the one in
force here, which may no longer name a revoked site, even with ``replace``; and a
file of the same site issued before the enrolment installed here (its keys may have
been revoked since) needs ``replace`` (`_check_not_older`).

Run as root into a state dir another user owns (the documented ``sudo fedge agent
enrol`` into /var/lib/fedge, the fedge user's), everything read from or written into
it is done by a child dropped to that user (`fedge.as_owner`): a symlink that user
planted there (``keys``, ``enrolment-history.jsonl``) reaches nothing it could not
write itself, and the files are its own with no chown afterwards. Root reads only the
enrolment file and the credentials. Nor is a missing ``keys/coordinator.json`` in an
enrolled state dir taken as "no pinned coordinator" (``replace`` needed), and what the
history line copies from the old enrolment (``previous``) must look like what enrolment
writes (`_enrolled_before`).

The agent loads its two secrets from the systemd credentials first (README.Debian,
Credentials): where those hold other keys than the ones installed, the command says
so and prints the commands that move the new ones into place
(`credentials_not_enrolled`), or the agent would keep connecting with the old keys.

Where: ``--state-dir DIR``, else the ``state_dir`` of the agent config given with
``--config`` (``fedge agent --config FILE enrol ...``, as the agent reads it),
else /var/lib/fedge; a ``--state-dir`` and a ``--config`` naming two directories
are refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shlex
import stat
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path("/var/lib/fedge")
# Appended (fsynced) on every enrolment installed: `enrolment.json` holds only the
# last, so this is what says which site, console and coordinator this appliance was
# before a `--replace`, and when. A few lines a year: not rotated.
HISTORY = "enrolment-history.jsonl"
# The fields of a history line (`install_enrolment`), as `fedge agent audit` shows them
HISTORY_FIELDS = ("time", "uid", "user", "sudo_user", "site", "console_id",
                  "console_fingerprint", "coordinator_endpoint", "coordinator_public_key",
                  "issued", "expires", "tuf_root_version", "replaced", "replaced_enrolment",
                  "previous")

log = logging.getLogger("fedge.agent.enrol")


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
    # what this install replaced: another site's enrolment ("site 'h1' of console
    # key …") or an unreadable one, installed over with `replace`; None when there was
    # none or the same site
    replaced: str | None = None
    # the Ed25519 identity's public key, when known (`install_enrolment`): compared with
    # the credentials without reading the state dir again as root
    identity_public: bytes | None = None


def _site_of(site: str, roster_public_key: bytes) -> str:
    return f"site {site!r} of console key {roster_public_key.hex()[:16]}"


def install_enrolment(file: Path, state_dir: Path, *, now: datetime | None = None,
                      expected_console: bytes | str | None = None,
                      replace: bool = False) -> EnrolledSite:
    """Check `file` and install it into `state_dir`.

    `expected_console`: the console's roster key, or the console key fingerprint the
    operator read out (16+ hex digits); by default the console of a previous enrolment.
    `replace`: install over an enrolment of another site, or of a site of another
    console (the privacy ledger and reveal log stay; module docstring).

    Raises:
        EnrolmentError: corrupt, expired (the message names this appliance's clock:
            a fast one expires files early) or foreign file; or `state_dir` is enrolled
            as another site (or its enrolment state is corrupt) and not `replace`; or
            the file's TUF root does not chain from the one this appliance trusts
            (`_check_root_chains`), or it would change the pinned coordinator and not
            `replace`, or it names a coordinator endpoint that cannot be dialled
            (`fedge.transport._sockopts.check_endpoint`). Nothing is written then.
        OSError: the state dir cannot be written.
    """
    from fedge.agent.updates import install_trusted_root
    from fedge.as_owner import owner_to_act_as, run_as
    from fedge.console.enrolment import EnrolmentError, EnrolmentExpired, read_enrolment
    from fedge.secagg.keys import Identity, Roster
    from fedge.update import tuf_repo
    from fedge.update.files import remove_stale_temps, write_atomic, write_json

    state_dir = Path(state_dir)
    now = now or datetime.now(UTC)
    existing = state_dir / "enrolment.json"
    # Run as root into a state dir the service user owns (the package's /var/lib/fedge):
    # everything read from or written into it is done as that user (fedge.as_owner),
    # so a symlink it planted there gains it nothing. The enrolment file, which may be
    # root's alone, is read here.
    owner = owner_to_act_as(state_dir)
    held = run_as(owner, lambda: _held_enrolment(existing), what="reading " + str(existing))
    previous: tuple[str, bytes] | None = None
    if held["previous"] is not None:
        previous = str(held["previous"][0]), bytes.fromhex(held["previous"][1])
    elif held["corrupt"] is not None:
        if expected_console is None:
            raise EnrolmentError(
                f"existing enrolment state {existing} is corrupt ({held['corrupt']}); pass "
                "--console-key to say which console to trust, and --replace to enrol "
                "over it")
        if not replace:
            raise EnrolmentError(
                f"existing enrolment state {existing} is corrupt ({held['corrupt']}): which "
                "site this appliance is cannot be told; nothing changed. Pass --replace to "
                f"enrol {file} over it")
    try:
        if expected_console is None and previous is not None:
            e = read_enrolment(Path(file), now=now, expected_console=previous[1],
                               trusted_from=existing)
        else:
            e = read_enrolment(Path(file), now=now, expected_console=expected_console)
    except EnrolmentExpired as exc:
        # a fresh file reads as expired on an appliance whose clock is fast
        raise EnrolmentError(f"{exc}, or check this appliance's clock (it reads "
                             f"{now.replace(microsecond=0).isoformat()}): one that is fast "
                             "makes a file expire early") from exc
    from fedge.transport._sockopts import check_endpoint

    try:  # here, not as an agent that can never connect (libzmq refuses it at start)
        check_endpoint(e.coordinator_endpoint)
    except ValueError as exc:
        raise EnrolmentError(
            f"enrolment file {file} names a coordinator this appliance cannot dial: {exc}; "
            "nothing changed. The console was initialised with it (fedge console init "
            "--coordinator): it must issue the file for a valid endpoint") from None
    replaced = None
    if previous is not None and previous != (e.site, e.roster_public_key):
        replaced = _site_of(*previous)
        if not replace:
            raise EnrolmentError(
                f"{state_dir} already holds the enrolment of {replaced}; {file} is for "
                f"{_site_of(e.site, e.roster_public_key)}; nothing changed. To enrol "
                "another appliance, give its state dir (--state-dir, or --config with its "
                f"agent config); to make this appliance site {e.site!r} instead, pass "
                "--replace (its privacy ledger and reveal log stay)")
    try:
        roster = Roster.from_bytes(e.roster, e.roster_public_key)
        identity = Identity.from_private_bytes(e.identity_private)
        if roster.entries.get(e.site) != identity.public_bytes():
            raise ValueError(f"the roster does not hold site {e.site!r} with this identity")
        root = tuf_repo.load(e.tuf_root, "root")
        tuf_repo.verify_by(root, "root", root)
    except ValueError as exc:
        raise EnrolmentError(f"enrolment file {file} is corrupt: {exc}") from exc
    if previous is None and held["exists"]:  # corrupt, enrolled over with `replace`
        replaced = f"an unreadable enrolment state ({existing})"
    who = _who()  # here: the child's uid is the owner's

    def write() -> None:
        same_console = previous is not None and previous[1] == e.roster_public_key
        keep_root = False
        if same_console:
            keep_root = _check_root_chains(state_dir, root, file, replace=replace)
            _check_coordinator_pin(state_dir, e.site, e.coordinator_endpoint,
                                   e.coordinator_public_key, file, replace=replace)
            _check_not_older(state_dir, file, roster, e.roster_public_key, e.site,
                             e.issued, same_site=previous is not None
                             and previous[0] == e.site, replace=replace)
        # what this appliance was, for the history line: read before anything is written
        before = _enrolled_before(state_dir) if held["exists"] else None
        for d in (state_dir, state_dir / "keys"):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        # what an enrolment killed mid-write left: secret keys in keys/ first
        remove_stale_key_temps(state_dir / "keys")
        remove_stale_temps(state_dir)
        with _writing(state_dir / "keys" / "curve.json"):
            write_json(state_dir / "keys" / "curve.json",
                       {"public": e.curve_public, "secret": e.curve_secret})
        with _writing(state_dir / "keys" / "identity.key"):
            identity.save(state_dir / "keys" / "identity.key")
        with _writing(state_dir / "keys" / "coordinator.json"):
            write_json(state_dir / "keys" / "coordinator.json",
                       {"endpoint": e.coordinator_endpoint,
                        "public_key": e.coordinator_public_key})
        with _writing(state_dir / "roster.json"):
            write_atomic(state_dir / "roster.json", e.roster)
        if not keep_root:
            with _writing(state_dir / "tuf" / "metadata" / "root.json"):
                install_trusted_root(state_dir, e.tuf_root)
        with _writing(existing):
            write_json(existing, {
                "site": e.site, "console_id": e.console_id,
                "console_fingerprint": e.fingerprint(),
                "roster_public_key": e.roster_public_key.hex(), "issued": e.issued.isoformat(),
                "expires": e.expires.isoformat(),
                # what the agent checks the key it loads against: keys/curve.json is
                # shredded once moved into the credentials directory (README.Debian,
                # Credentials)
                "curve_public": e.curve_public,
            })
        _note_enrolment(state_dir, {
            "time": now.isoformat(), **who, "site": e.site, "console_id": e.console_id,
            "console_fingerprint": e.fingerprint(),
            "coordinator_endpoint": e.coordinator_endpoint,
            "coordinator_public_key": e.coordinator_public_key,
            "issued": e.issued.isoformat(), "expires": e.expires.isoformat(),
            "tuf_root_version": root.signed.version,  # kept only when the same root
            "replaced": replaced is not None, "replaced_enrolment": replaced,
            "previous": before,
        })

    try:
        run_as(owner, write, what=f"enrolling into {state_dir}", raises=(EnrolmentError,))
    except OSError as exc:
        if exc.errno is not None:  # a write that failed (names its file: _writing)
            raise
        # the child ended without an answer (killed): perhaps after it wrote it all
        raise OSError(f"{exc}; the enrolment may have been installed before it ended: "
                      f"`fedge agent audit --state-dir {state_dir}` lists the enrolments "
                      "installed (this one last, if it was), and running this enrolment "
                      "again is safe") from exc
    return EnrolledSite(e.site, e.console_id, e.fingerprint(), e.coordinator_endpoint,
                        e.coordinator_public_key, e.curve_public, e.curve_secret,
                        e.roster_public_key, state_dir, replaced, identity.public_bytes())


@contextlib.contextmanager
def _writing(path: Path) -> Any:
    """Name `path` in an OSError raised while it is written (a full disk's ENOSPC
    names no file), and say what that leaves.

    Raises: OSError: the same errno, its text naming `path`."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, f"{exc.strerror or exc}: writing {path}; this enrolment "
                      "is not complete (what it wrote before stays): once the cause is "
                      "put right, run it again") from exc


# The identity key's temporary as an older release's Identity.save wrote it (before
# 60f211d; it holds the identity's private key), still swept. Identity.save now writes
# through write_atomic, whose temporaries are fedge.update.files.ATOMIC_TEMP_NAME
# (".identity.key.XXXXXXXX"; ".curve.json.XXXXXXXX" holds the CURVE secret)
IDENTITY_TEMP = "identity.key.tmp"


def remove_stale_key_temps(keys_dir: Path) -> list[Path]:
    """Overwrite with zeros, then remove, the temporaries that an enrolment killed
    mid-write (SIGKILL, power cut) left in `keys_dir`: write_atomic's that no live
    writer holds (``.curve.json.XXXXXXXX`` holds the CURVE secret key,
    ``.identity.key.XXXXXXXX`` Identity.save's identity key, ``.coordinator.json.*``)
    and ``identity.key.tmp``, an older release's Identity.save temporary. Overwritten
    first because they hold secrets: once the keys are moved into the credentials
    directory and shredded (README.Debian), no copy must stay behind, nor be carried
    by a backup of the state dir.

    Called by an enrolment before it writes (in the child that writes as the state
    dir's owner) and at agent start. No grace period, unlike
    `fedge.update.files.remove_stale_temps`: only an enrolment writes here, and one
    running at the same moment would lose its temporary and fail, saying so, never
    install half a key. Not a symlink, not another name. Never raises: what cannot be
    removed is logged. Returns the paths removed."""
    import fcntl

    from fedge.update.files import ATOMIC_TEMP_NAME

    try:
        names = [e.name for e in os.scandir(keys_dir)
                 if e.name == IDENTITY_TEMP or ATOMIC_TEMP_NAME.fullmatch(e.name)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        log.warning("cannot look for stale key temporaries in %s: %s", keys_dir, exc)
        return []
    removed: list[Path] = []
    for name in names:
        path = Path(keys_dir) / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:  # renamed into place meanwhile
            continue
        except OSError as exc:  # a symlink (ELOOP), a directory: not ours to remove
            log.warning("cannot check stale key temporary %s: %s", path, exc)
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # O_NONBLOCK: a FIFO did not hang the open
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its writer is alive
                continue
            if st.st_ino != os.lstat(path).st_ino:  # renamed into place and replaced
                continue
            zeros = b"\0" * st.st_size
            while zeros:
                zeros = zeros[os.pwrite(fd, zeros, st.st_size - len(zeros)):]
            os.fsync(fd)
            path.unlink()
            removed.append(path)
            log.info("overwrote and removed %s, left by an enrolment that did not finish",
                     path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove stale key temporary %s: %s", path, exc)
        finally:
            os.close(fd)
    return removed


def _held_enrolment(existing: Path) -> dict[str, Any]:
    """What `existing` (enrolment.json) says this appliance is, as JSON for `run_as`:
    "exists", "previous" ([site, roster public key hex] or None) and "corrupt" (why it
    cannot be read, or None)."""
    if not existing.exists():
        return {"exists": False, "previous": None, "corrupt": None}
    try:
        meta = json.loads(existing.read_text())
        previous = [str(meta["site"]), bytes.fromhex(meta["roster_public_key"]).hex()]
    except (ValueError, KeyError, TypeError) as exc:
        return {"exists": True, "previous": None, "corrupt": str(exc)}
    return {"exists": True, "previous": previous, "corrupt": None}


def credentials_not_enrolled(site: EnrolledSite, *,
                             places: list[tuple[Path, str]] | None = None) -> list[str]:
    """The systemd credentials the agent loads before the state dir's keys
    (fedge.agent.process.load_enrolled) that are not the keys `site` just installed:
    one line each, naming the file and what it holds (or why it cannot be read). Empty
    when there are none, or they are the enrolled keys.

    `places`: (directory, name prefix) pairs to look in; by default
    ``$CREDENTIALS_DIRECTORY`` (``fedge_curve.key``, ``fedge_identity.key``) where set,
    and the unit's source, CREDENTIALS_SOURCE (``curve.key``, ``identity.key``)."""
    from fedge.agent.process import CREDENTIALS_SOURCE, SECRETS, _curve_key
    from fedge.secagg.keys import Identity

    if places is None:
        places = []
        if os.environ.get("CREDENTIALS_DIRECTORY"):
            places.append((Path(os.environ["CREDENTIALS_DIRECTORY"]), "fedge_"))
        places.append((Path(CREDENTIALS_SOURCE), ""))
    enrolled_identity = (site.identity_public if site.identity_public is not None else
                         Identity.load(site.state_dir / SECRETS["identity"][0]).public_bytes())
    found = []
    for directory, prefix in places:
        for which, (_, name) in SECRETS.items():
            path = directory / f"{prefix}{name}"
            try:
                if not path.exists():
                    continue
                if which == "curve":
                    held = _curve_key(path)[0]
                    if held != site.curve_public:
                        found.append(f"{path}: CURVE key {held}, not the enrolled "
                                     f"{site.curve_public}")
                elif Identity.load(path).public_bytes() != enrolled_identity:
                    found.append(f"{path}: another identity key than the enrolled one")
            except OSError as exc:
                found.append(f"{path}: cannot be read to compare "
                             f"({exc.strerror or exc}); run this as root")
            except ValueError as exc:  # AgentConfigError is one
                found.append(f"{path}: not a key ({exc})")
    return found


def _enrolled_before(state_dir: Path) -> dict[str, object] | None:
    """What this appliance was enrolled as before this install (read before it is
    overwritten), for its history line: site, console fingerprint, coordinator; None
    if unreadable (a corrupt state replaced with ``replace``).

    These files are the service user's to write: a value that is not what enrolment
    writes there (a site name, a hex fingerprint, an endpoint, a Z85 key; `_PREVIOUS`)
    is recorded as None, not copied into the history line."""
    try:
        meta = json.loads((state_dir / "enrolment.json").read_text())
        doc: dict[str, object] = {"site": meta.get("site"),
                                  "console_fingerprint": meta.get("console_fingerprint")}
    except (OSError, ValueError, AttributeError):
        return None
    try:
        coord = json.loads((state_dir / "keys" / "coordinator.json").read_text())
        doc["coordinator_endpoint"] = coord.get("endpoint")
        doc["coordinator_public_key"] = coord.get("public_key")
    except (OSError, ValueError, AttributeError):
        pass
    return {k: v if isinstance(v, str) and _PREVIOUS[k].fullmatch(v) else None
            for k, v in doc.items()}


# What a history line's "previous" may hold, read back from the state dir
_PREVIOUS = {
    "site": re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}"),  # secagg.keys, legacy too
    "console_fingerprint": re.compile(r"[0-9a-f]{16,64}"),
    "coordinator_endpoint": re.compile(r"[a-z]{2,8}://[A-Za-z0-9._:\[\]*%-]{1,253}"),
    # Z85 (zmq's alphabet), 40 characters: a CURVE key
    "coordinator_public_key": re.compile(r"[0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40}"),
}


def _who() -> dict[str, object]:
    """Who runs this enrolment: the user id and name, and the user sudo ran it for."""
    uid = os.getuid()
    try:
        import pwd

        user: str | None = pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        user = None
    return {"uid": uid, "user": user, "sudo_user": os.environ.get("SUDO_USER")}


def _note_enrolment(state_dir: Path, record: dict[str, object]) -> None:
    """Append `record` to ``enrolment-history.jsonl`` (0600, fsynced; a line a crash
    cut short is ended first) and log it at INFO. The enrolment is installed by then:
    a line that cannot be written is logged as an error, not raised."""
    path = state_dir / HISTORY
    line = json.dumps(record, sort_keys=True) + "\n"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "r+b") as f:
            end = f.seek(0, os.SEEK_END)
            if end > 0:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        log.error("enrolment of site %r installed, but %s cannot be appended: %s",
                  record["site"], path, exc)
        return
    log.info("enrolled site %r (console key %s, coordinator %s) by uid %s%s%s; history "
             "in %s", record["site"], record["console_fingerprint"],
             record["coordinator_endpoint"], record["uid"],
             f" (sudo by {record['sudo_user']})" if record.get("sudo_user") else "",
             f"; replaced {record['replaced_enrolment']}" if record["replaced"] else "",
             path)


def _check_not_older(state_dir: Path, file: Path, roster: Any, roster_key: bytes, site: str,
                     issued: datetime, *, same_site: bool, replace: bool) -> None:
    """Refuse a file of the console this appliance is enrolled with that is older than
    what it holds, before anything is written.

    Its roster must not be older (a lower serial) than the roster in force here, which
    the coordinator's RosterUpdates keep current: the console bumps the serial on every
    enrolment and revocation, so an older one can name a revoked site (a site's own
    file run again after another site was revoked would trust that site's identity
    again). Refused even with ``replace``: the console never goes back to an older
    roster. A held roster that is missing or does not verify is not compared (the
    file's replaces it).

    A file of the same site issued before the enrolment installed here (a copy from
    before the console revoked and re-enrolled the site) would put back keys the
    coordinator refuses: refused unless ``replace``.

    Raises:
        EnrolmentError: refused (names both serials, both issue dates).
    """
    from fedge.console.enrolment import EnrolmentError
    from fedge.secagg.keys import Roster

    held_serial: int | None = None
    path = state_dir / "roster.json"
    with contextlib.suppress(OSError, ValueError):  # missing, or does not verify
        held_serial = Roster.from_bytes(path.read_bytes(), roster_key).serial
    held_issued: datetime | None = None
    try:
        held_issued = datetime.fromisoformat(
            json.loads((state_dir / "enrolment.json").read_text())["issued"])
        older = same_site and issued < held_issued
    except (OSError, ValueError, KeyError, TypeError):  # an enrolment.json without it
        older = False
    dates = (f"{file} was issued {issued.isoformat()}, before the enrolment of site "
             f"{site!r} installed here (issued {held_issued.isoformat()})"
             if older and held_issued is not None else "")
    if held_serial is not None and roster.serial < held_serial:
        raise EnrolmentError(
            f"{file} carries roster serial {roster.serial}, older than the roster serial "
            f"{held_serial} this appliance holds ({path}): the console has enrolled or "
            "revoked sites since the file was made, and an older roster can trust a "
            f"revoked site again{'; ' + dates if dates else ''}; nothing changed. The "
            "enrolment installed here is the newer one; if its keys are lost, ask the "
            "console for a new enrolment file (`fedge console enrol`)")
    if older and not replace:
        raise EnrolmentError(
            f"{dates}: it would put back keys the console may have revoked since; nothing "
            "changed. Pass --replace only to go back to this file's keys on purpose")


def _check_root_chains(state_dir: Path, new: Any, file: Path, *, replace: bool) -> bool:
    """Whether to keep the TUF root this appliance trusts rather than install `new`,
    the root in an enrolment file of the console it is already enrolled with.

    The trusted root moves only forward, as the update channel moves it: `new` is
    installed when it is a later version signed by the held root's root key(s) and by
    its own (a rotation, fedge.coordinator.updates does the same); the same root is
    kept. An older one (the site's old file run again after a key rotation: it would
    trust the retired keys again), another root of the same version, or a later one
    the held root does not vouch for (a file signed with the roster key alone: it
    would make this appliance install updates signed by whoever made that root) is
    refused. A later version whose rotation went through versions in between that
    this appliance never saw does not verify against the held one: the update channel
    brings them; ``replace`` installs it anyway (the operator vouches for the file).

    Raises:
        EnrolmentError: refused (names both versions); nothing is written then.
    """
    from fedge.console.enrolment import EnrolmentError
    from fedge.update import tuf_repo

    path = state_dir / "tuf" / "metadata" / "root.json"
    try:
        held_bytes = path.read_bytes()
    except FileNotFoundError:
        return False
    try:
        held = tuf_repo.load(held_bytes, "root")
    except ValueError as exc:
        if replace:
            return False
        raise EnrolmentError(f"the trusted TUF root {path} is corrupt ({exc}); nothing "
                             f"changed. Pass --replace to install the root of {file}") from exc
    have, got = held.signed.version, new.signed.version
    if got == have:
        if held.signed_bytes == new.signed_bytes:
            return True
        raise EnrolmentError(
            f"{file} carries TUF root v{got}, which is not the root v{have} this appliance "
            "trusts (same version, other content): it is not the console's; nothing changed")
    if got < have:
        raise EnrolmentError(
            f"{file} carries TUF root v{got}, older than the root v{have} this appliance "
            "trusts (the console has rotated its keys since the file was made: an old file "
            "would make the retired keys trusted again); nothing changed. Ask the console "
            "for a new enrolment file (`fedge console enrol`)")
    try:
        tuf_repo.verify_by(held, "root", new)
        tuf_repo.verify_by(new, "root", new)
    except ValueError as exc:
        if replace:
            return False
        raise EnrolmentError(
            f"{file} carries TUF root v{got}, which the root v{have} this appliance trusts "
            f"does not vouch for ({exc}); nothing changed. If the console rotated its root "
            "key more than once since, the appliance follows on its own once connected; "
            "pass --replace only if you are sure this file comes from your console") from exc
    return False


def _check_coordinator_pin(state_dir: Path, site: str, endpoint: str, public_key: str,
                           file: Path, *, replace: bool) -> None:
    """Refuse, without ``replace``, a file that would change the coordinator this
    appliance is pinned to (its endpoint or CURVE key): a file signed with the roster
    key alone could otherwise send the appliance to a coordinator of someone else's.

    Raises:
        EnrolmentError: the pin would change and not ``replace`` (names both).
    """
    from fedge.console.enrolment import EnrolmentError

    path = state_dir / "keys" / "coordinator.json"
    try:
        held = json.loads(path.read_text())
        pinned = (str(held["endpoint"]), str(held["public_key"]))
    except FileNotFoundError:
        # enrolled (enrolment.json read), so it was written: removing it must not be a
        # way round the pin
        if replace:
            return
        raise EnrolmentError(
            f"{path} is missing, but {state_dir} is enrolled as site {site!r}: the "
            f"coordinator it is pinned to cannot be compared with the one {file} names "
            f"({endpoint}); nothing changed. Pass --replace to pin that one") from None
    except (OSError, ValueError, KeyError, TypeError):
        pinned = ("?", "?")  # unreadable: a change all the same
    if pinned == (endpoint, public_key) or replace:
        return
    changes = []
    if pinned[0] != endpoint:
        changes.append(f"endpoint {pinned[0]} to {endpoint}")
    if pinned[1] != public_key:
        changes.append(f"CURVE key {pinned[1]} to {public_key}")
    raise EnrolmentError(
        f"{file} would change the coordinator site {site!r} is pinned to ("
        f"{'; '.join(changes)}); nothing changed. Pass --replace if the console moved its "
        "coordinator")


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
    """Add `enrol FILE [--state-dir DIR | --config FILE] [--console-key FINGERPRINT]
    [--replace]` to the agent's subcommands (called from fedge/agent/cli.py)."""
    p = subparsers.add_parser(
        "enrol", help="install an enrolment file from the console",
        description="Install an enrolment file from `fedge console enrol` into the agent "
                    "state directory: --state-dir, else the state_dir of the agent config "
                    f"(--config), else {DEFAULT_STATE_DIR}.")
    p.add_argument("file", type=Path, help="the .fedge-enrol file")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="agent state directory (default: the state_dir of --config, else "
                        f"{DEFAULT_STATE_DIR}); refused if --config names another")
    # default SUPPRESS: `fedge agent --config FILE enrol ...` sets it before the action
    p.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                   help="agent config (TOML): enrol into its state_dir")
    p.add_argument("--console-key", default=None, metavar="FINGERPRINT",
                   help="the console to trust (refuse others): the console key fingerprint "
                        "that `fedge console init` and `fedge console enrol` print (16 or "
                        "more hex digits), or the full console key (64)")
    p.add_argument("--replace", action="store_true",
                   help="install over the enrolment of another site (or of another "
                        "console's site) in this state directory; refused otherwise. Only "
                        "the enrolment is replaced (keys, coordinator, roster, TUF root): "
                        "the appliance keeps its privacy ledger, so the privacy budget its "
                        "data has spent stays spent, and its reveal log, so no update "
                        "revealed under the old site is unmasked again under the new one")
    p.set_defaults(func=_cmd_enrol)


def _state_dir(args: argparse.Namespace) -> Path:
    """--state-dir, else the config's state_dir, else the default.

    Raises:
        ValueError: the config cannot be read, or it and --state-dir differ (both named).
    """
    config = getattr(args, "config", None)
    if config is None:
        return args.state_dir or DEFAULT_STATE_DIR
    from fedge.agent.process import load_config

    configured = load_config(config).state_dir  # AgentConfigError is a ValueError
    if args.state_dir is not None and args.state_dir.resolve() != configured.resolve():
        raise ValueError(f"--state-dir {args.state_dir} is not the state_dir {configured} "
                         f"of --config {config}; give one of them")
    return configured


def _cmd_enrol(args: argparse.Namespace) -> int:
    from fedge.console.enrolment import EnrolmentError
    from fedge.systemd import setup_logging

    # as `fedge agent run` does: the enrolment's INFO line (`_note_enrolment`) goes to
    # the journal under systemd, else to stderr; without a handler it went nowhere
    setup_logging("fedge-agent")
    try:
        state_dir = _state_dir(args)
    except ValueError as exc:
        print(f"fedge agent enrol: {exc}", file=sys.stderr)
        return 2
    expected: bytes | str | None = None
    if args.console_key:
        key = args.console_key.strip().lower()
        try:
            bytes.fromhex(key if len(key) % 2 == 0 else key + "0")
        except ValueError:
            key = ""
        if len(key) < 16 or len(key) > 64:
            print(f"fedge agent enrol: --console-key {args.console_key!r} is neither a "
                  "console key fingerprint (16 or more hex digits) nor a console key (64)",
                  file=sys.stderr)
            return 2
        expected = bytes.fromhex(key) if len(key) == 64 else key
    try:
        site = install_enrolment(args.file, state_dir, expected_console=expected,
                                 replace=args.replace)
    except (EnrolmentError, OSError) as exc:
        print(f"fedge agent enrol: {exc}", file=sys.stderr)
        return 2
    if site.replaced:
        print(f"replaced {site.replaced}; kept this appliance's privacy ledger and reveal "
              "log (the budget its data has spent stays spent)")
    print(f"enrolled site {site.site} with console key {site.console_fingerprint}; "
          f"coordinator {site.coordinator_endpoint}; state in {site.state_dir} (this "
          f"enrolment is kept in {site.state_dir / HISTORY})")
    loopback = loopback_coordinator(site.coordinator_endpoint)
    if loopback is not None:
        print(f"fedge agent enrol: warning: {loopback}", file=sys.stderr)
    stale = credentials_not_enrolled(site)
    if stale:
        _warn_credentials(site, stale)
    print(f"now destroy {args.file} (e.g. `shred -u {shell_quoted(args.file)}`, and any "
          "copy of it): it holds this appliance's secret keys, and whoever has it can "
          f"connect as site {site.site} until the console revokes it, expired or not")
    return 0


def loopback_coordinator(endpoint: str) -> str | None:
    """Why a coordinator endpoint on loopback (``tcp://localhost:P``, 127.x, ::1: what
    ``fedge console init --coordinator`` was given on the console's own machine) is
    probably wrong for this appliance, or None. Nothing is resolved."""
    from fedge.transport._sockopts import is_loopback_host

    if not endpoint.startswith("tcp://"):
        return None
    host = endpoint[len("tcp://"):].rpartition(":")[0]
    if not is_loopback_host(host):
        return None
    return (f"the coordinator endpoint {endpoint} is a loopback address: the agent will "
            "dial this machine itself. Unless the coordinator runs here, the console must "
            "be initialised with the address the appliances reach the coordinator at "
            "(fedge console init --coordinator tcp://HOST:PORT) and issue this "
            "appliance's enrolment file again")


def shell_quoted(path: Path | str) -> str:
    """`path` as one shell word, for a command printed to be pasted: a state dir or an
    enrolment file's name may hold a space or '$'."""
    return shlex.quote(str(path))


def _warn_credentials(site: EnrolledSite, stale: list[str]) -> None:
    """Say on stderr that the agent would go on loading other keys than those just
    enrolled, and how to move these into place (README.Debian, Credentials)."""
    from fedge.agent.process import CREDENTIALS_SOURCE, SECRETS

    curve, identity = (site.state_dir / SECRETS[w][0] for w in ("curve", "identity"))
    q = shell_quoted
    curve_to, identity_to = (f"{CREDENTIALS_SOURCE}/{SECRETS[w][1]}"
                             for w in ("curve", "identity"))
    lines = [
        "fedge agent enrol: WARNING: the agent loads its keys from the systemd credentials "
        "before the state dir's, and these are not the keys just enrolled:",
        *(f"  {line}" for line in stale),
        f"so it would keep connecting with them (refused by the coordinator once the "
        f"console revoked them). As root, move the enrolled keys into {CREDENTIALS_SOURCE}"
        " and restart the agent:",
        f"  install -o root -g root -m 0600 {q(curve)} {q(curve_to)}",
        f"  install -o root -g root -m 0600 {q(identity)} {q(identity_to)}",
        f"  shred -u {q(curve)} {q(identity)}",
        "  systemctl restart fedge-agent",
    ]
    print("\n".join(lines), file=sys.stderr)
