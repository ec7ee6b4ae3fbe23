"""`fedge console …`: the operator's commands.

init, enrol SITE, revoke SITE, ledger-ack SITE, fleet [--json], audit [filters],
jobs submit/list/status/watch/cancel/fetch, push (sign a model/app/software target,
publish, roll out: canary first).
Heavy modules (zmq, the codec) load inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from fedge.console.fleet import printable
from fedge.text import by_reason

HOME_ENV = "FEDGE_CONSOLE_HOME"
HOME_FOLDER = ".fedge-console"  # under the operator's home directory


def console_home(given: Path | None) -> Path:
    """The console's key store: ``--home``, else $FEDGE_CONSOLE_HOME, else
    ~/.fedge-console.

    Resolved only when a console command runs, never at import: `fedge.cli` imports
    this module to build every subcommand's parser, and a container run as a uid with
    no passwd entry and no HOME (`docker run --user N`, Kubernetes' runAsUser) has no
    home directory, which must not stop `fedge agent` or `fedge coordinator`.

    Raises:
        ConsoleError: none of the three is there.
    """
    if given is not None:
        return given
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV])
    try:
        return Path.home() / HOME_FOLDER
    except (RuntimeError, KeyError):  # no HOME, and the uid has no passwd entry
        from fedge.console.store import ConsoleError

        raise ConsoleError(f"cannot tell where the console's key store is: HOME is not set "
                           f"and uid {os.getuid()} has no home directory in the password "
                           f"database; set --home or {HOME_ENV}") from None


# zmq takes a poll's timeout in int milliseconds; and a day is longer than any admin call
MAX_TIMEOUT_S = 86400.0


def _seconds(what: str, *, at_most: float = float("inf"), zero: bool = False) -> Any:
    """An argparse type: a finite number of seconds > 0 (>= 0 with ``zero``; and <=
    ``at_most``). NaN compares False both ways, so it passed a `<= 0` check and reached
    a sleep or a deadline that failed at once."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not a number of seconds"
                                             ) from None
        low_ok = value >= 0 if zero else value > 0  # False for NaN
        if not low_ok or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{what} {text} must be a finite number of "
                                             f"seconds {'>=' if zero else '>'} 0")
        if value > at_most:
            raise argparse.ArgumentTypeError(f"{what} {text} must be at most {at_most:g} "
                                             "seconds")
        return value

    return parse


def _endpoint(text: str) -> str:
    """An argparse type: ipc://PATH or tcp://HOST:PORT with PORT in 1..65535."""
    if text.startswith("ipc://"):
        return text
    if not text.startswith("tcp://"):
        raise argparse.ArgumentTypeError(f"endpoint {text!r} must look like tcp://HOST:PORT")
    host, _, port = text[len("tcp://"):].rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"endpoint {text!r} must look like tcp://HOST:PORT")
    if not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"endpoint {text!r}: port {int(port)} is outside "
                                         "1..65535")
    # the host as agents and the console can dial it (ad59ba1): a non-ASCII name, a URL,
    # a space or an unbracketed IPv6 address were taken here, written into every
    # enrolment file, and refused only by libzmq at the appliance's connect
    from fedge.transport._sockopts import check_endpoint

    try:
        return check_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("console", help="operator console: enrol, fleet, jobs, updates")
    p.add_argument("--home", type=Path, default=None,
                   help=f"console key store (default ${HOME_ENV}, else ~/{HOME_FOLDER})")
    p.add_argument("--operator", default="admin", help="operator key to use (default admin)")
    p.add_argument("--timeout", type=_seconds("--timeout", at_most=MAX_TIMEOUT_S),
                   default=30.0, help="admin call timeout, seconds")
    sub = p.add_subparsers(dest="console_command", metavar="COMMAND", required=True)

    s = sub.add_parser("init", help="create the console's keys and TUF root")
    s.add_argument("--coordinator", required=True, type=_endpoint,
                   help="agents' endpoint, tcp://HOST:PORT")
    s.add_argument("--admin-endpoint", default=None, type=_endpoint,
                   help="admin channel endpoint (default: coordinator port + 1)")
    s.add_argument("--operator-key", action="append", default=None, metavar="NAME:ROLE",
                   help="operator key to create (repeatable; default admin:admin, "
                        "viewer:viewer)")
    s.set_defaults(func=_cmd_init)

    s = sub.add_parser("enrol", help="create a site's identity and enrolment file")
    s.add_argument("site")
    s.add_argument("--valid-days", type=float, default=7.0,
                   help="days the file can be installed in (default 7); it holds the "
                        "site's secret keys whatever its age")
    s.add_argument("--out", type=Path, default=None, help="where to write the file")
    s.add_argument("--offline", action="store_true",
                   help="do not tell the coordinator now (tell it later with `sync`)")
    s.set_defaults(func=_cmd_enrol)

    s = sub.add_parser("revoke", help="revoke a site: its connection drops, it cannot rejoin")
    s.add_argument("site")
    s.set_defaults(func=_cmd_revoke)

    s = sub.add_parser("ledger-ack",
                       help="accept the lower count of a site whose privacy ledger was "
                            "rolled back (restored from a backup): it may join jobs again")
    s.add_argument("site")
    s.set_defaults(func=_cmd_ledger_ack)

    s = sub.add_parser("sync", help="tell the coordinator every enrolment, revocation and "
                       "the current roster (after --offline enrolments)")
    s.set_defaults(func=_cmd_sync)

    abandon_help = ("drop an unfinished rotation that the coordinator never took (checked "
                    "with the coordinator first); without it, an unfinished rotation is "
                    "finished before anything new")
    s = sub.add_parser("rotate-online-keys",
                       help="new TUF snapshot/timestamp keys for the coordinator (root v+1)")
    s.add_argument("--abandon", action="store_true", help=abandon_help)
    s.set_defaults(func=_cmd_rotate)

    s = sub.add_parser("rotate-keys",
                       help="new offline TUF keys (targets, root) after a loss or exposure: "
                       "root v+1 and the targets re-signed; retired keys are refused")
    s.add_argument("--role", action="append", choices=("root", "targets"),
                   help="a role to rotate (repeat for both)")
    s.add_argument("--abandon", action="store_true", help=abandon_help)
    s.set_defaults(func=_cmd_rotate_offline)

    s = sub.add_parser("fleet", help="the appliances, their health and eligibility")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_fleet)

    s = sub.add_parser("audit", help="the coordinator's audit log: security events, "
                       "operators' actions, update outcomes (newest --limit, oldest first)")
    add_audit_filters(s)
    s.set_defaults(func=_cmd_audit)

    jobs = sub.add_parser("jobs", help="federation jobs").add_subparsers(
        dest="jobs_command", metavar="COMMAND", required=True)
    s = jobs.add_parser("submit", help="submit a plan (TOML): prints the job id, and on "
                        "stderr a warning for a job queued that may not run as planned")
    s.add_argument("plan", type=Path)
    s.set_defaults(func=_cmd_jobs_submit)
    s = jobs.add_parser("list", help="all jobs")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_jobs_list)
    s = jobs.add_parser("status", help="a job with per-round metrics (JSON)")
    s.add_argument("job_id")
    s.add_argument("--json", action="store_true",
                   help="accepted for scripts written as for `jobs list --json`: the "
                        "status is always JSON")
    s.set_defaults(func=_cmd_jobs_status)
    s = jobs.add_parser("watch", help="follow a job round by round until it ends (exit 0 "
                        "when it completes, 1 when it fails or is cancelled, "
                        f"{WATCH_UNKNOWN_JOB} for an unknown job, {WATCH_GAVE_UP} when "
                        f"--max-wait passes first, {WATCH_NO_ANSWER} when the coordinator "
                        "could not be asked)",
                        epilog=WATCH_EXIT_STATUSES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("job_id")
    s.add_argument("--timestamps", action="store_true",
                   help="begin each line with the UTC time it was printed (HH:MM:SSZ)")
    s.add_argument("--interval", type=_seconds("--interval", at_most=MAX_TIMEOUT_S),
                   default=2.0, help="seconds between polls")
    s.add_argument("--max-wait", type=_seconds("--max-wait"), default=None,
                   help="give up after this many seconds (default: wait for the end, "
                        "through any time the coordinator does not answer)")
    s.set_defaults(func=_cmd_jobs_watch)
    s = jobs.add_parser("cancel", help="cancel a queued or running job")
    s.add_argument("job_id")
    s.set_defaults(func=_cmd_jobs_cancel)
    s = jobs.add_parser("fetch", help="download a job's results (final model, ONNX, report)")
    s.add_argument("job_id")
    s.add_argument("--out", type=Path, default=Path("."))
    s.add_argument("--wait", type=_seconds("--wait", at_most=MAX_TIMEOUT_S, zero=True),
                   default=RESULTS_WAIT_S,
                   help="seconds to wait for an ended job's ONNX export and report, "
                   "written after the job is marked ended (0: do not wait); if they are "
                   "not all written by then, what there is is fetched and the exit "
                   f"status is {FETCH_NOT_READY}")
    s.set_defaults(func=_cmd_jobs_fetch)

    s = sub.add_parser("push", help="sign and roll out an update: canary first, then the rest")
    s.add_argument("file", type=Path, help="the bundle: .onnx, app .tar.gz, .deb/.whl/.tar.gz")
    s.add_argument("--kind", required=True, choices=("model", "app", "software"))
    s.add_argument("--name", required=True)
    s.add_argument("--version", required=True, help="dotted integers, e.g. 3 or 1.2.0")
    s.add_argument("--canary", default=None, help="site updated first (default: first site)")
    s.add_argument("--sites", default=None, help="comma-separated sites (default: connected)")
    s.add_argument("--deadline", type=_seconds("--deadline"), default=300.0,
                   help="per-site seconds")
    s.add_argument("--no-wait", action="store_true", help="return once the roll-out starts")
    s.set_defaults(func=_cmd_push)


def add_audit_filters(s: argparse.ArgumentParser) -> None:
    """The audit commands' filters (`fedge console audit`, `fedge coordinator audit`)."""
    from fedge.console.protocol import AUDIT_DEFAULT_LIMIT, AUDIT_MAX_LIMIT

    def limit(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = 0
        if not 1 <= n <= AUDIT_MAX_LIMIT:
            raise argparse.ArgumentTypeError(
                f"--limit {text!r} is not a whole number from 1 to {AUDIT_MAX_LIMIT}")
        return n

    def since(text: str) -> float:
        from fedge.console.audit import parse_since

        try:
            return parse_since(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    s.add_argument("--action", action="append", default=None, metavar="ACTION",
                   help="only this action, exactly (repeatable, or a comma list), e.g. "
                        "revoke, share_accusation, admin.denied")
    s.add_argument("--job", default=None, help="only entries about this job")
    s.add_argument("--site", default=None,
                   help="only what this site did and what was found about it")
    s.add_argument("--actor", default=None,
                   help="only this actor, exactly (operator:NAME, coordinator, a site)")
    s.add_argument("--since", type=since, default=None, metavar="DATE|TIME",
                   help="from this UTC date (YYYY-MM-DD) or ISO time on")
    s.add_argument("--limit", type=limit, default=AUDIT_DEFAULT_LIMIT,
                   help=f"the newest N entries that match (default {AUDIT_DEFAULT_LIMIT}, "
                        f"at most {AUDIT_MAX_LIMIT})")
    s.add_argument("--json", action="store_true",
                   help="one JSON object a line, detail parsed, for scripts")


def print_audit(entries: list[dict[str, Any]], as_json: bool) -> None:
    """The audit commands' output: a table (control characters escaped) or JSON lines."""
    from fedge.console.audit import COLUMNS, audit_rows, json_line
    from fedge.console.fleet import format_table

    if as_json:
        for entry in entries:
            print(json_line(entry))
    else:
        print(format_table(audit_rows(entries), COLUMNS))


def _cmd_audit(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        from fedge.console.client import AdminError

        query: dict[str, Any] = {"limit": args.limit}
        for name in ("action", "job", "site", "actor", "since"):
            if getattr(args, name) is not None:
                query[name] = getattr(args, name)
        try:
            result, _ = _call(args, "audit", query)
        except AdminError as exc:
            if not str(exc).startswith("unknown op 'audit'"):
                raise
            return _fail("the coordinator predates `audit` (it answered: unknown op "
                         "'audit'): upgrade it, or read its audit log on the coordinator "
                         "host with `fedge coordinator audit --config FILE`")
        entries = result.get("entries") or []
        print_audit(entries, args.json)
        if result.get("more"):
            print(f"note: more entries match; these are the newest {len(entries)} "
                  "(narrow with --since/--action, or raise --limit)", file=sys.stderr)
        elif result.get("older_unread"):
            print(f"note: only the newest {result.get('looked_at')} audit entries were "
                  "looked at; for older ones run `fedge coordinator audit` on the "
                  "coordinator host", file=sys.stderr)
        return 0

    return _run(go, args)


def _fail(msg: str, code: int = 1) -> int:
    print(f"fedge console: {msg}", file=sys.stderr)
    return code


def _store(args: argparse.Namespace) -> Any:
    from fedge.console.store import ConsoleStore

    return ConsoleStore(console_home(args.home))


def _call(args: argparse.Namespace, op: str, a: dict[str, Any] | None = None,
          blobs: dict[str, bytes] | None = None) -> tuple[Any, dict[str, bytes]]:
    from fedge.console.client import AdminClient

    client = AdminClient.from_store(_store(args), args.operator, timeout_s=args.timeout)
    return client.call(op, a, blobs)


def _errors() -> tuple[type[BaseException], ...]:
    from fedge.console.client import AdminError
    from fedge.console.enrolment import EnrolmentError
    from fedge.console.store import ConsoleError

    return (AdminError, ConsoleError, EnrolmentError, TimeoutError, FileNotFoundError, OSError)


def _run(func: Any, args: argparse.Namespace) -> int:
    try:
        return int(func(args) or 0)
    except BrokenPipeError:
        raise  # the reader stopped reading (`| head`): fedge.cli.main exits quietly
    except _errors() as exc:
        return _fail(str(exc))


def _cmd_init(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        from fedge.console.store import DEFAULT_OPERATORS, ConsoleError, ConsoleStore

        if args.admin_endpoint is None and args.coordinator.endswith(":65535"):
            return _fail(f"--coordinator {args.coordinator}: the admin channel defaults to "
                         "the next port, and 65535 is the last; give --admin-endpoint", 2)
        ops = DEFAULT_OPERATORS
        if args.operator_key:
            try:
                ops = tuple(tuple(o.split(":", 1)) for o in args.operator_key)  # type: ignore
                if any(len(o) != 2 for o in ops):
                    raise ValueError
            except ValueError:
                raise ConsoleError(f"--operator-key {args.operator_key} must be NAME:ROLE")\
                    from None
        store = ConsoleStore.init(console_home(args.home),
                                  coordinator_endpoint=args.coordinator,
                                  admin_endpoint=args.admin_endpoint, operators=ops)
        print(f"console created in {store.home} (console id {store.console_id})")
        print(f"console key fingerprint: {store.roster_public_key().hex()[:16]} (give it to "
              "`fedge agent enrol --console-key` on each appliance)")
        print(f"coordinator provisioning file: {store.home / 'coordinator-provision.json'}")
        print(_root_expiry_line(store))
        from fedge.transport._sockopts import is_loopback_host

        if args.coordinator.startswith("tcp://") and is_loopback_host(
                args.coordinator[len("tcp://"):].rpartition(":")[0]):
            print(f"fedge console init: warning: --coordinator {args.coordinator} is a "
                  "loopback address: every enrolment file this console issues tells the "
                  "appliance to dial itself; unless the coordinator and the appliances "
                  "share this machine, run init again (in a new --home) with the address "
                  "the appliances reach the coordinator at", file=sys.stderr)
        return 0

    return _run(go, args)


def _root_expiry_line(store: Any) -> str:
    from fedge.console.store import ROOT_RENEW_BEFORE

    return (f"TUF root v{store.state['root_version']} expires "
            f"{store.root_expires().isoformat()} (a push renews it once it expires within "
            f"{ROOT_RENEW_BEFORE.days} days)")


def _cmd_enrol(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        from fedge.console.enrolment import create_enrolment
        from fedge.console.store import validity

        store = _store(args)
        path, e = create_enrolment(store, args.site, valid_for=validity(args.valid_days),
                                   out=args.out)
        print(f"enrolment file for {e.site}: {path} (expires {e.expires.isoformat()})")
        print(f"console key fingerprint: {e.fingerprint()} (give it to `fedge agent enrol "
              "--console-key` on site, apart from the file)")
        print(f"{path} holds {e.site}'s secret keys, and this console keeps no other copy: "
              "carry it to the site and destroy it once `fedge agent enrol` has installed "
              "it (shred -u). Whoever has it, expired or not, can connect as "
              f"{e.site} until `fedge console revoke {e.site}`")
        if args.offline:
            return 0
        from fedge.console.client import AdminError
        from fedge.console.store import ConsoleError

        try:
            _call(args, "enrol", *store.enrol_request(args.site))
        except (AdminError, TimeoutError) as exc:
            # The identity exists and its file may already be on its way to the site:
            # keep both, and say how the coordinator gets to know it.
            raise ConsoleError(
                f"{exc}\n{args.site} is enrolled in this console and its enrolment file is "
                f"written ({path}), but the coordinator does not know it yet: run `fedge "
                "console sync` once the coordinator is reachable (or `fedge console revoke "
                f"{args.site}` to withdraw it)") from exc
        print(f"coordinator accepts {args.site}")
        return 0

    return _run(go, args)


def _not_revoked_there(site: str, exc: BaseException) -> Exception:
    """What `revoke` raises when the coordinator did not take a revocation this console
    has already recorded: the console's own record says revoked from then on, so say
    plainly that the coordinator, which is what lets the key in, was not told."""
    from fedge.console.store import ConsoleError

    return ConsoleError(
        f"{exc}\n{site} is revoked in this console but NOT on the coordinator: its key "
        f"is still accepted there; run `fedge console revoke {site}` (or `fedge console "
        "sync`) again once the coordinator answers")


def _cmd_revoke(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        from fedge.console.client import AdminError
        from fedge.console.enrolment import ENROLMENTS

        store = _store(args)
        site = args.site
        if site in store.sites():
            store.revoke_site(site)  # a site already revoked here stays as it was
        else:
            _revoke_unknown(args, store, site)
        # the site's file, if `enrol` wrote it here, holds keys that are dead from now on
        (store.home / ENROLMENTS / f"{site}.fedge-enrol").unlink(missing_ok=True)
        try:
            result = _send_revoke(args, store, site)
        except AdminError as exc:
            if "unknown site" not in str(exc):
                raise _not_revoked_there(site, exc) from exc
            # enrolled --offline and never sent: the coordinator never let its key in
            print(f"revoked {site} in this console; the coordinator never had it (it was "
                  "not sent: enrolled --offline and never synced), so no key of it is "
                  "accepted there")
            return 0
        except TimeoutError as exc:
            raise _not_revoked_there(site, exc) from exc
        print(f"revoked {site}: connection dropped, key refused from now on")
        if result.get("roster_refused"):
            print(f"fedge console: warning: the coordinator kept its roster, which still "
                  f"names {site}: {printable(result['roster_refused'])}; the revocation "
                  "stands (its key is refused)", file=sys.stderr)
        return 0

    return _run(go, args)


def _cmd_ledger_ack(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        result, _ = _call(args, "ledger_ack", {"site": args.site})
        print(printable(
            f"accepted {result['site']}'s privacy ledger at {result['now']} released runs "
            f"(it had reported {result['was']}): it may join jobs again. The runs it no "
            "longer lists were spent all the same: its max_epsilon_total no longer "
            "bounds what it has released"))
        return 0

    return _run(go, args)


def _revoke_unknown(args: argparse.Namespace, store: Any, site: str) -> None:
    """Record in this console the revocation of `site`, which it did not enrol, once
    the coordinator lists it (else there is nothing to revoke anywhere).

    Raises: ConsoleError: neither this console nor the coordinator has it, or the
    coordinator did not answer to say."""
    from fedge.console.store import ConsoleError

    ours = ", ".join(sorted(store.sites())) or "none"
    try:
        fleet, _ = _call(args, "fleet")
    except TimeoutError as exc:
        raise ConsoleError(f"{exc}\nsite {site!r} is not enrolled in this console "
                           f"(enrolled: {ours}), and the coordinator did not answer to say "
                           "whether it has it: nothing was revoked") from exc
    have = {a["site_id"]: a for a in fleet}.get(site)
    if have is None:
        raise ConsoleError(f"site {site!r} is not enrolled in this console (enrolled: "
                           f"{ours}) nor on the coordinator")
    print(f"{site} was not enrolled by this console: the coordinator has it "
          f"({printable(have.get('status'))}) with {_keys_of(have)}; revoking it there")
    store.revoke_unknown_site(site, str(have.get("curve_public_z85", "")),
                              str(have.get("ed25519_public", "")))


def _keys_of(appliance: dict[str, Any]) -> str:
    """A coordinator fleet record's keys as an operator compares them: the CURVE key
    the coordinator lets in (z85, as its audit log names it) and the identity's
    fingerprint (the Ed25519 key's first 16 hex digits)."""
    return (f"CURVE key {printable(appliance.get('curve_public_z85'))}, identity "
            f"{printable(str(appliance.get('ed25519_public', ''))[:16])}")


def _send_revoke(args: argparse.Namespace, store: Any, site: str) -> dict[str, Any]:
    """The admin ``revoke`` of `site`, with this console's roster. A coordinator
    holding a roster of a higher serial (signed by a copy of this console's roster key
    that enrolled sites) keeps it and says its serial: the roster is sent once more
    numbered above it, so that the roster in force no longer names the site.

    Raises: AdminError, TimeoutError (from the call)."""
    result, _ = _call(args, "revoke", {"site": site}, {"roster": store.roster().to_bytes()})
    held = result.get("roster_serial") if isinstance(result, dict) else None
    if isinstance(result, dict) and result.get("roster_refused") and isinstance(held, int):
        store.raise_roster_serial(held + 1)
        result, _ = _call(args, "revoke", {"site": site},
                          {"roster": store.roster().to_bytes()})
    return result if isinstance(result, dict) else {}


def _cmd_sync(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        from fedge.console.client import AdminError
        from fedge.secagg.errors import SecAggConfigError
        from fedge.secagg.keys import check_client_id

        store = _store(args)
        fleet, _ = _call(args, "fleet")
        known = {a["site_id"]: a for a in fleet}
        roster = {"roster": store.roster().to_bytes()}
        refused: list[str] = []
        for site, info in sorted(store.sites().items()):
            have = known.get(site, {})
            if info.get("revoked"):
                if have and have.get("status") != "revoked":
                    _call(args, "revoke", {"site": site}, roster)
                    print(f"revoked {site}")
                continue
            if (have.get("status") == "enrolled"
                    and have.get("curve_public_z85") == info["curve_public"]):
                continue
            try:
                # a name an older console took that the coordinator never will: say so
                # and go on, so the sites after it are still sent
                check_client_id(site, what="site")
                if have.get("status") == "enrolled":
                    # revoked and enrolled anew here while the coordinator was away: it
                    # still lets the old key in, and re-keys a site only once revoked
                    _call(args, "revoke", {"site": site}, roster)
                    print(f"revoked {site}'s previous key")
                _call(args, "enrol", *store.enrol_request(site))
                print(f"enrolled {site}")
            except (AdminError, SecAggConfigError) as exc:
                refused.append(site)
                print(f"fedge console sync: {site!r} not sent: {exc} (`fedge console "
                      f"revoke {site}` drops it from this console)", file=sys.stderr)
        # Sites the coordinator lets in that this console never enrolled (a copy of its
        # home did, another console, the coordinator's host command): named with their
        # keys for the operator to judge, never revoked here unasked.
        unknown = [a for a in fleet if a["site_id"] not in store.sites()
                   and a.get("status") == "enrolled"]
        for a in unknown:
            print(f"fedge console sync: warning: the coordinator has site "
                  f"{printable(a['site_id'])} enrolled, which this console did not enrol "
                  f"({_keys_of(a)}); if nobody here expected it, revoke it: `fedge console "
                  f"revoke {printable(a['site_id'])}`", file=sys.stderr)
        active = len(store.active_sites()) - len(refused)
        if unknown:
            print(f"coordinator NOT in sync: it has this console's {active} active site(s) "
                  f"and {len(unknown)} this console did not enrol: "
                  f"{', '.join(printable(a['site_id']) for a in unknown)}"
                  + (f"; {len(refused)} refused: {', '.join(map(repr, refused))}"
                     if refused else ""))
        else:
            print(f"coordinator in sync: {active} active site(s)"
                  + (f"; {len(refused)} refused: {', '.join(map(repr, refused))}"
                     if refused else ""))
        return 1 if refused else 0

    return _run(go, args)


# Fault injection for the crash tests: "before:OP" or "after:OP" (OP a rotation op);
# the console SIGKILLs itself just before sending, or just after the coordinator's
# reply and before storing anything.
CONSOLE_KILL_ENV = "FEDGE_TEST_CONSOLE_KILL"


def _maybe_die(point: str) -> None:
    if os.environ.get(CONSOLE_KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _rotate(args: argparse.Namespace, op: str, make: Any) -> Any:
    """Send a key rotation and store it once the coordinator took it. It is kept on
    disk from before sending until stored, so a console that dies or loses the reply
    finishes it on the next run (the coordinator takes the same documents once).
    `make(store)` builds a new one: (blobs for the coordinator, new key PEMs by role).
    Returns (the coordinator's TUF versions, the rotation now in force), or None when
    ``args.abandon`` dropped the unfinished one."""
    from fedge.console.client import AdminError
    from fedge.console.store import ConsoleError

    store = _store(args)
    pending = store.pending_rotation()
    if args.abandon:
        versions, _ = _call(args, "update_versions")
        dropped = store.abandon_rotation(int(versions["root"]))
        print(f"dropped the unfinished rotation of {' and '.join(dropped.roles)} key(s) to "
              f"root v{dropped.root_version}; the coordinator is at root v{versions['root']}")
        return None
    fresh = pending is None
    if pending is None:
        blobs, pems = make(store)
        pending = store.begin_rotation(op, blobs, pems)
    elif pending.op != op:
        other = "rotate-online-keys" if pending.op == "rotate_online_keys" else "rotate-keys"
        raise ConsoleError(f"a rotation of {' and '.join(pending.roles)} key(s) to root "
                           f"v{pending.root_version} (begun {pending.created}) is unfinished: "
                           f"run `fedge console {other}` to finish it first")
    else:
        print(f"finishing the rotation of {' and '.join(pending.roles)} key(s) to root "
              f"v{pending.root_version} begun {pending.created}")
    _maybe_die(f"before:{op}")
    try:
        versions, _ = _call(args, op, {"roles": pending.roles}, pending.blobs)
    except (AdminError, TimeoutError) as exc:
        if fresh and isinstance(exc, AdminError):
            # refused, and never sent before: the coordinator holds none of it
            store.pending_rotation_path.unlink()
            raise
        raise ConsoleError(
            f"{exc}; the rotation to root v{pending.root_version} is kept in "
            f"{store.pending_rotation_path}: run this command again to finish it, or with "
            "--abandon to drop it if the coordinator never took it") from exc
    _maybe_die(f"after:{op}")
    store.finish_rotation(pending)  # the coordinator holds it: keep it
    return versions, pending


def _cmd_rotate(args: argparse.Namespace) -> int:
    def make(store: Any) -> tuple[dict[str, bytes], dict[str, bytes]]:
        root, snapshot, timestamp = store.rotate_online_keys(persist=False)
        return ({"root.json": root, "snapshot.pem": snapshot, "timestamp.pem": timestamp},
                {"snapshot": snapshot, "timestamp": timestamp})

    def go(args: argparse.Namespace) -> int:
        done = _rotate(args, "rotate_online_keys", make)
        if done is not None:
            print(f"coordinator now signs with the new online keys: {done[0]}")
        return 0

    return _run(go, args)


def _cmd_rotate_offline(args: argparse.Namespace) -> int:
    def make(store: Any) -> tuple[dict[str, bytes], dict[str, bytes]]:
        from fedge.console.store import ConsoleError

        if not args.role:
            raise ConsoleError("name the key(s) to rotate: --role targets and/or --role root")
        root, targets, pems = store.rotate_offline_keys(args.role, persist=False)
        return {"root.json": root, "targets.json": targets}, pems

    def go(args: argparse.Namespace) -> int:
        done = _rotate(args, "rotate_offline_keys", make)
        if done is not None:
            versions, pending = done
            print(f"new {' and '.join(pending.roles)} key(s) in force; the retired ones are "
                  f"refused by every appliance from its next refresh: {versions}")
            # signing keys only: a copy of this console's home still holds the roster
            # and operator keys, and whatever it enrolled stays enrolled
            print("this does not undo what a copy of the retired keys did: sites enrolled "
                  "meanwhile by a copy of this console's home stay enrolled (the roster "
                  "and operator keys are not rotated, so a copy can still enrol more). "
                  "Check `fedge console sync` (it names sites this console did not enrol) "
                  "or `fedge console fleet`, and revoke each one: `fedge console revoke "
                  "SITE`")
        return 0

    return _run(go, args)


def _cmd_fleet(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        from fedge.console.fleet import fleet_rows, format_table, reference_time

        fleet, _ = _call(args, "fleet")
        if args.json:
            print(json.dumps(fleet, indent=2, sort_keys=True, default=str))
        else:
            now = time.time()
            print(format_table(fleet_rows(fleet, now=now)))
            _, off = reference_time(fleet, now)
            if off is not None:
                print(clock_off_note(now, off), file=sys.stderr)
        return 0

    return _run(go, args)


def clock_off_note(now: float, off: float) -> str:
    """What `fedge console fleet` says when this console's clock (`now`) is `off`
    seconds off the coordinator's (`fedge.console.fleet.reference_time`)."""
    from datetime import UTC, datetime

    stamp = datetime.fromtimestamp(now, UTC).replace(microsecond=0).isoformat()
    how = "ahead of" if off > 0 else "behind"
    return (f"note: this console's clock reads {stamp}, about {_duration(abs(off))} {how} "
            "the coordinator's (by the newest heartbeat it reports); LAST SEEN is counted "
            "from the coordinator's time. Fix the clock that is wrong (NTP/RTC): signed "
            "updates expire by these clocks")


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _cmd_jobs_submit(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        from fedge.coordinator.plan import PlanError, read_plan_file

        try:
            text = read_plan_file(args.plan)
        except PlanError as exc:  # not text: refused here, nothing sent
            return _fail(str(exc), 2)
        result, _ = _call(args, "jobs_submit", {"plan": text})
        print(result["job_id"])  # alone on stdout: scripts read the id from it
        for warning in result.get("warnings") or []:  # queued all the same
            print(f"warning: {printable(warning)}", file=sys.stderr)
        return 0

    return _run(go, args)


def _cmd_jobs_list(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        from fedge.console.fleet import format_table

        jobs, _ = _call(args, "jobs_list")
        if args.json:
            print(json.dumps(jobs, indent=2, sort_keys=True, default=str))
            return 0
        # jobs_list's records do not say what blocks a running job (they are the
        # database's); its jobs_status does: asked of each running job (one, mostly)
        blocked: dict[str, str] = {}
        for j in jobs:
            if isinstance(j, dict) and j.get("status") == "running":
                status, _ = _call(args, "jobs_status", {"job_id": j.get("job_id")})
                why = blocked_reason(status)
                if why:
                    blocked[str(j.get("job_id"))] = _shorten(why, LIST_BLOCKED_CHARS)
        print(format_table(job_rows(jobs, blocked), JOB_COLUMNS))
        return 0

    return _run(go, args)


JOB_COLUMNS = ("job", "name", "status", "round", "data set", "model", "submitted by")
LIST_BLOCKED_CHARS = 70  # `jobs list`'s "blocked: …" note; `jobs status` has it whole


def job_rows(jobs: list[dict[str, Any]],
             blocked: dict[str, str] | None = None) -> list[list[str]]:
    """`jobs list`'s table rows (JOB_COLUMNS) from ``jobs_list``'s records; a job
    without a name (or a coordinator too old to send one) shows "–"; a job named in
    ``blocked`` shows its status as "running (blocked: why)"; a queued job whose record
    has ``start_wait`` (its starting model waits for the disk) as "queued (waiting:
    why)"."""
    def cell(value: Any) -> str:
        return printable(value) if value not in (None, "") else "–"

    def state(j: dict[str, Any]) -> str:
        why = (blocked or {}).get(str(j.get("job_id")))
        if why:
            return cell(j.get("status")) + f" (blocked: {printable(why)})"
        waits = j.get("start_wait")
        if waits:
            return cell(j.get("status")) + \
                f" (waiting: {printable(_shorten(str(waits), LIST_BLOCKED_CHARS))})"
        return cell(j.get("status"))

    return [[cell(j.get("job_id")), cell(j.get("name")), state(j),
             cell(j.get("committed_round")), cell(j.get("dataset")), cell(j.get("model")),
             cell(j.get("submitted_by", j.get("actor")))] for j in jobs]


def _shorten(text: str, at_most: int) -> str:
    return text if len(text) <= at_most else text[:at_most - 1] + "…"


def _cmd_jobs_status(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        status, _ = _call(args, "jobs_status", {"job_id": args.job_id})
        print(json.dumps(status, indent=2, sort_keys=True, default=str))
        return 0

    return _run(go, args)


JOB_ENDS = ("completed", "failed", "cancelled")
RESULTS_WAIT_S = 180.0  # for the ONNX export and the report after the last round
FETCH_POLL_S = 1.0  # `jobs fetch`'s poll (jobs_fetch, pending_ok) while they are written
# how often `jobs watch` of a queued job asks where it stands in the queue (jobs_list:
# the coordinator reads every job's plan for it, 0.18 s with 1,000 jobs on its loop)
QUEUE_POLL_S = 15.0
FETCH_NOT_READY = 3  # `jobs fetch` exit status: results still being written after --wait
# `jobs watch` exit statuses besides 0 (completed), 1 (failed or cancelled) and 130
WATCH_UNKNOWN_JOB = 2  # the coordinator has no such job: a wrong id, as argparse's 2
WATCH_GAVE_UP = 3  # --max-wait passed with the job going on
WATCH_NO_ANSWER = 4  # the coordinator could not be asked: it says nothing of the job
WATCH_EXIT_STATUSES = f"""exit status:
  0    the job completed (and its results were written, or the wait for them ended)
  1    the job failed or was cancelled
  {WATCH_UNKNOWN_JOB}    the coordinator has no job of that id (or the command line is wrong)
  {WATCH_GAVE_UP}    --max-wait passed with the job still queued or running: it goes on
  {WATCH_NO_ANSWER}    the coordinator could not be asked: it did not answer before
       --max-wait passed, or refused the request (operator key or role), or this
       console's key store could not be read; nothing is known of the job
  130  Ctrl-C: the job goes on

A coordinator that does not answer within --timeout (restarting, a network outage)
does not end the watch: it says "coordinator unreachable since TIME: why" once, asks
again every --interval, and says "coordinator reachable again" when it answers; it
gives up only when --max-wait passes ({WATCH_NO_ANSWER})."""
# what keeps a job from going on, in jobs_status (the coordinator retries each)
BLOCKERS = (("resume_error", "cannot resume"),
            ("commit_error", "round done but not committed"),
            ("finish_error", "final checkpoint not written"),
            ("start_wait", "waiting for the disk"))


class WatchGaveUp(TimeoutError):
    """`watch_job`'s max_wait_s passed before the job ended (it goes on)."""


class WatchUnreachable(Exception):
    """`watch_job`'s max_wait_s passed while the coordinator did not answer."""


def blocked_reason(status: dict[str, Any]) -> str:
    """What jobs_status says keeps a job from going on, in a few words and the
    coordinator's error ("cannot resume: checkpoint … is not valid safetensors"); ""
    when nothing does."""
    return "; ".join(f"{what}: {printable(status[key])}" for key, what in BLOCKERS
                     if status.get(key))


def _utc(t: float, fmt: str = "%Y-%m-%dT%H:%M:%SZ") -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).strftime(fmt)


def watch_job(call: Any, job_id: str, *, interval_s: float = 2.0,
              max_wait_s: float | None = None, out: Any = print,
              results_wait_s: float = RESULTS_WAIT_S) -> dict[str, Any]:
    """Poll ``jobs_status`` and print each round as it commits (or an attempt as it
    fails) with its federated evaluation, and each phase of the round in progress,
    until the job ends; for a completed job, then until its results (ONNX, report)
    are written. Also printed as they appear or change: while queued, how many jobs
    are ahead (and whether the one ahead is blocked), then "started"; each site whose
    connection is contested (two machines holding its keys: dropped from the round in
    flight, or kept out of new ones, with why) or that is sidelined (left out after it
    failed an attempt); the pause before the next attempt at a round; and what blocks
    the job (resume_error, commit_error, finish_error, start_wait: BLOCKERS). A
    coordinator that does not answer is asked again every `interval_s` (said once, and
    when it answers again). `call(op, args)` is an AdminClient's call. Returns the last
    status.

    Raises:
        WatchGaveUp: the job had not ended after `max_wait_s` (its state named).
        WatchUnreachable: `max_wait_s` passed with the coordinator not answering.
        AdminError: the coordinator refused, e.g. an unknown job.
    """
    started = time.monotonic()
    unreachable: list[tuple[float, str]] = []  # since when (time.time()), and why

    def ask(op: str, a: dict[str, Any], until: float | None = None) -> Any:
        """``call(op, a)``, asked again every interval_s while no reply comes. Returns
        None once `until` (monotonic) passes without one.

        Raises: WatchUnreachable: no `until`, and max_wait_s passed without a reply."""
        while True:
            asked_at = time.time()
            try:
                reply = call(op, a)
            except TimeoutError as exc:
                if not unreachable:
                    unreachable.append((asked_at, printable(exc)))
                    out(f"coordinator unreachable since {_utc(asked_at)}: {printable(exc)}")
                now = time.monotonic()
                if until is not None and now >= until:
                    return None
                if until is None and max_wait_s is not None and now - started > max_wait_s:
                    since, why = unreachable[0]
                    raise WatchUnreachable(
                        f"job {job_id}: the coordinator has not answered since "
                        f"{_utc(since)} ({why}); gave up after --max-wait {max_wait_s:g} s "
                        "(the job's state is not known)") from None
                time.sleep(interval_s)
                continue
            if unreachable:
                since, _ = unreachable.pop()
                out(f"coordinator reachable again (unreachable since {_utc(since)}, "
                    f"{time.time() - since:.0f} s)")
            return reply

    seen: set[tuple[int, int]] = set()
    phase = None
    said_queued: str | None = None  # the queue line last printed
    queue_next = 0.0  # when to ask the queue again (monotonic)
    said_test = False
    left_out: dict[str, str] = {}  # the last committed round's, as printed
    contested: dict[str, str] = {}  # jobs_status's, as last printed
    sidelined: dict[str, str] = {}  # jobs_status's, as last printed
    blockers: dict[str, str] = {}  # jobs_status's BLOCKERS, as last printed
    retry: tuple[Any, ...] | None = None  # (round, attempt) of the pause last printed
    while True:
        status, _ = ask("jobs_status", {"job_id": job_id})
        planned = status.get("rounds_planned")
        eval_split = status.get("eval_split")
        going_on = status.get("status") not in JOB_ENDS  # an ended job's lists are empty
        if status.get("status") == "queued" and (
                said_queued is None or time.monotonic() >= queue_next):
            # jobs run one at a time: say what it waits for, again when that changes;
            # asked every QUEUE_POLL_S only (jobs_list reads every job's plan)
            line = _queue_line(ask, job_id, status)
            queue_next = time.monotonic() + QUEUE_POLL_S
            if line != said_queued:
                out(line)
            said_queued = line
        elif said_queued is not None and status.get("status") == "running":
            out(f"job {job_id} started")
            said_queued = None
        for a in status.get("rounds", []):
            if (a["round"], a["attempt"]) in seen:
                continue
            seen.add((a["round"], a["attempt"]))
            secs = a["ended_at"] - a["started_at"]
            if a["status"] != "committed":
                # failed; or cut short: cancelled, interrupted (a coordinator restart)
                ended = "failed" if a["status"] == "failed" else f"was {a['status']}"
                out(f"round {a['round']} attempt {a['attempt']} {ended} after {secs:.1f} s: "
                    f"{a['reason']}")
                continue
            agg = ", ".join(f"{m['split']} {m['name']} {m['value']:.4f}"
                            for m in status.get("metrics", [])
                            if m["round"] == a["round"] and m["site"] == "*"
                            and eval_split in (None, m["split"]))
            out(f"round {a['round']}/{planned} committed in {secs:.1f} s: "
                f"{len(a['survivors'])} of {len(a['cohort'])} site(s)"
                + (f"; {agg}" if agg else ""))
            for sites, why in by_reason(dict(a.get("dropped_reasons") or {})):
                out(f"  dropped {', '.join(printable(s) for s in sites)}: {printable(why)}")
            now_out = dict(a.get("left_out") or {})
            for site, why in sorted(now_out.items()):
                if left_out.get(site) != why:  # said once, until it changes
                    out(f"  left out {printable(site)}: {printable(why)}")
            left_out = now_out
        wait = status.get("cohort_wait") or {}
        now_phase = (status.get("current_round"), status.get("phase"), wait.get("summary"),
                     progress_key(status))
        pause = status.get("retry") if isinstance(status.get("retry"), dict) else None
        if pause is not None:  # between attempts: said by the pause's own line
            now_retry = (status.get("current_round"), pause.get("attempt"))
            if now_retry != retry:
                in_s = pause.get("in_s")
                out(f"round {now_retry[0]}/{planned}: {pause.get('attempt')} failed "
                    f"attempt(s) of at most {pause.get('max_failed_attempts')}; the next "
                    "opens" + (f" in {in_s:.0f} s" if isinstance(in_s, int | float)
                               else " soon"))
            retry = now_retry
        elif status.get("phase") and now_phase != phase:
            why = f" ({printable(wait['summary'])})" if wait.get("summary") else ""
            out(f"round {now_phase[0]}/{planned}: {printable(now_phase[1])}{why}"
                + progress_text(status))
        phase = now_phase
        contested = _say_changes(out, "contested", dict(status.get("contested") or {}),
                                 contested, going_on)
        sidelined = _say_changes(out, "sidelined", dict(status.get("sidelined") or {}),
                                 sidelined, going_on)
        now_blockers = {k: str(status[k]) for k, _ in BLOCKERS if status.get(k)}
        for key, what in BLOCKERS:
            if key in now_blockers and blockers.get(key) != now_blockers[key]:
                out(f"job {job_id} blocked: {what}: {printable(now_blockers[key])} (the "
                    "coordinator tries again; jobs queued behind it wait)")
            elif key in blockers and key not in now_blockers and going_on:
                out(f"job {job_id} no longer blocked ({what}: cleared)")
        blockers = now_blockers
        test = status.get("final_test")
        if test and test.get("metrics") and not said_test:
            said_test = True
            out(final_test_line(test))
        if not going_on:
            out(end_line(job_id, status))
            break
        if max_wait_s is not None and time.monotonic() - started > max_wait_s:
            raise WatchGaveUp(f"job {job_id} is still {status.get('status')} (round "
                              f"{status.get('committed_round')} of {planned} committed) "
                              f"after {max_wait_s:g} s"
                              + (f"; blocked: {blocked_reason(status)}"
                                 if blocked_reason(status) else ""))
        time.sleep(interval_s)
    committed = int(status.get("committed_round") or 0)
    if status["status"] != "completed" and committed == 0:
        return status  # nothing was committed: there will be no results
    # the coordinator exports the model and writes the report after the last commit
    # (a failed or cancelled job's: of its last committed round); the report comes last
    end = time.monotonic() + results_wait_s
    while "report.md" not in status.get("results", []) and time.monotonic() < end:
        time.sleep(interval_s)
        reply = ask("jobs_status", {"job_id": job_id}, until=end)
        if reply is not None:
            status = reply[0]
    results = status.get("results", [])
    partial = "" if status["status"] == "completed" else (
        f"; a {status['status']} job's last committed model, round {committed} of {planned}")
    if "report.md" in results:
        out(f"results ready: {', '.join(results)} (fedge console jobs fetch {job_id})"
            + partial)
    else:
        out(f"no report after {results_wait_s:g} s (the coordinator's audit log says why); "
            f"results so far: {', '.join(results) or 'none'}")
    return status


def progress_key(status: dict[str, Any]) -> tuple[Any, ...]:
    """What of the round in flight's progress (``jobs_status``: stage, reported,
    waiting_for) makes `jobs watch` say its phase again when it changes."""
    return (status.get("stage") or "", tuple(status.get("reported") or ()),
            tuple(status.get("waiting_for") or ()),
            tuple(sorted(dict(status.get("dropped_out") or {}))))


def progress_text(status: dict[str, Any], now: float | None = None) -> str:
    """"; 2 of 3 in, waiting for hospital-c (deadline in 563 s); out: hospital-d"
    for a round in training, aggregation or evaluation (a coordinator before these
    fields: ""). The sites out of the round (``dropped_out``) are named only: why is
    said once the attempt ends (and at once for a contested site)."""
    waiting = [str(s) for s in status.get("waiting_for") or ()]
    reported = [str(s) for s in status.get("reported") or ()]
    gone = sorted(str(s) for s in dict(status.get("dropped_out") or {}))
    if not waiting and not reported:
        return ""

    def names(sites: list[str]) -> str:
        more = f" and {len(sites) - 5} more" if len(sites) > 5 else ""
        return ", ".join(printable(s) for s in sites[:5]) + more

    stage = f" {printable(status['stage'])}" if status.get("stage") else ""
    text = f";{stage} {len(reported)} of {len(reported) + len(waiting)} in"
    if waiting:
        text += f", waiting for {names(waiting)}"
    deadline = status.get("phase_deadline_at")
    if isinstance(deadline, int | float) and waiting:
        left = deadline - (time.time() if now is None else now)
        text += f" (deadline in {max(0.0, left):.0f} s)"
    if gone:
        text += f"; out: {names(gone)}"
    return text


def _say_changes(out: Any, what: str, now: dict[str, str], said: dict[str, str],
                 going_on: bool) -> dict[str, str]:
    """`watch_job`'s lines for a jobs_status list of sites with why ("contested",
    "sidelined"): each site once, until its why changes; and a site gone from it while
    the job goes on (an ended job's status lists none). Returns `now`."""
    for site, why in sorted(now.items()):
        if said.get(site) != why:
            out(f"  {what} {printable(site)}: {printable(why)}")
    if going_on:
        for site in sorted(set(said) - set(now)):
            out(f"  {printable(site)} no longer {what}")
    return now


def _queue_line(ask: Any, job_id: str, status: dict[str, Any]) -> str:
    """A queued job's place: how many queued or running jobs were submitted before it,
    the running one, and what blocks the one ahead (BLOCKERS) when something does."""
    jobs, _ = ask("jobs_list", {})
    ahead = [j for j in jobs if isinstance(j, dict) and j.get("job_id") != job_id
             and j.get("status") in ("queued", "running")
             and j.get("submitted_at", 0) <= status.get("submitted_at", 0)]
    running = [str(j["job_id"]) for j in ahead if j.get("status") == "running"]
    line = f"job {job_id} queued: {len(ahead)} job(s) ahead of it"
    # the coordinator starts the running job, else the first queued: that one's
    # blocker holds this one too
    head = running[:1] or [str(j["job_id"]) for j in sorted(
        (j for j in ahead if j.get("status") == "queued"),
        key=lambda j: j.get("submitted_at", 0))][:1]
    why = ""
    if head:
        head_status, _ = ask("jobs_status", {"job_id": head[0]})
        why = blocked_reason(head_status)
    if running:
        line += f" (running: {', '.join(running)}"
        line += f"; {running[0]} is blocked: {why})" if why else ")"
    elif why:
        line += f" ({head[0]} is blocked: {why})"
    return line


def end_line(job_id: str, status: dict[str, Any]) -> str:
    """How `jobs watch` says a job ended: "job J completed", "job J failed: why", "job J
    cancelled by operator:alice at 2026-11-30T05:53:19Z" (the coordinator's record of
    who cancelled it; an older coordinator's: "job J cancelled")."""
    state, error = str(status.get("status")), printable(status.get("error") or "")
    if state == "cancelled" and error.startswith("cancelled by "):
        return f"job {job_id} {error}"
    return f"job {job_id} {state}" + (f": {error}" if error else "")


def final_test_line(test: dict[str, Any]) -> str:
    """`jobs_status`'s ``final_test`` in one line: the final model on the sites' test
    split, the size-weighted aggregate of each metric and how many sites answered."""
    metrics = test.get("metrics") or {}
    agg = ", ".join(f"{name} {m['aggregate']:.4f}" for name, m in sorted(metrics.items())
                    if isinstance(m.get("aggregate"), int | float))
    sites = sorted({s for m in metrics.values() for s in m.get("sites", {})})
    line = (f"final test (round {test.get('round')}'s model, test split): "
            f"{agg or 'no aggregate'} over {len(sites)} site(s)")
    missing = test.get("missing") or {}
    if missing:
        line += "; not evaluated: " + "; ".join(
            f"{printable(s)}: {printable(w)}" for s, w in sorted(missing.items()))
    return line


def _cmd_jobs_watch(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        from fedge.console.client import AdminClient, AdminError

        def out(line: str) -> None:
            stamp = _utc(time.time(), "%H:%M:%SZ ") if args.timestamps else ""
            print(stamp + line, flush=True)

        try:
            client = AdminClient.from_store(_store(args), args.operator,
                                            timeout_s=args.timeout)
            status = watch_job(lambda op, a: client.call(op, a), args.job_id,
                               interval_s=args.interval, max_wait_s=args.max_wait, out=out)
        except WatchGaveUp as exc:  # the job goes on: not a failed job's 1
            return _fail(str(exc), WATCH_GAVE_UP)
        except WatchUnreachable as exc:
            return _fail(str(exc), WATCH_NO_ANSWER)
        except AdminError as exc:
            if "unknown job" in str(exc):
                return _fail(f"{exc} (`fedge console jobs list` lists the jobs it has)",
                             WATCH_UNKNOWN_JOB)
            return _fail(f"{exc} (nothing is known of job {args.job_id})", WATCH_NO_ANSWER)
        except BrokenPipeError:
            raise  # the reader stopped reading (`| head`): fedge.cli.main exits quietly
        except _errors() as exc:  # the key store: no console here, unknown operator
            return _fail(str(exc), WATCH_NO_ANSWER)
        return 0 if status.get("status") == "completed" else 1

    return _run(go, args)


def _cmd_jobs_cancel(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        _call(args, "jobs_cancel", {"job_id": args.job_id})
        print(f"cancelled {args.job_id}")
        return 0

    return _run(go, args)


def _cmd_jobs_fetch(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        from fedge.update.files import write_atomic

        result, blobs = _fetch_when_written(args)
        out = args.out / args.job_id
        # the operator's umask decides who else may read them (models trained on
        # patient data, per-site metrics and epsilon): as `cp` or a new file would
        mask = os.umask(0o077)
        os.umask(mask)
        for i, (name, data) in enumerate(blobs.items()):
            path = out / Path(name).name
            try:
                write_atomic(path, data, mode=0o666 & ~mask)
            except OSError as exc:  # a full disk's error names no file
                return _fail(f"job {args.job_id}: cannot write {path}: "
                             f"{exc.strerror or exc} ({i} of {len(blobs)} result file(s) "
                             f"written to {out})")
            print(path)
        if isinstance(result, dict) and result.get("note"):  # a failed/cancelled job's,
            print(f"note: {printable(result['note'])}")  # or a failed export or report
        if isinstance(result, dict) and result.get("still_writing"):
            return _fail(f"job {args.job_id}: only part of its results fetched "
                         f"({', '.join(map(printable, result['still_writing']))} still "
                         "being written); fetch again in a few seconds", FETCH_NOT_READY)
        return 0

    return _run(go, args)


def _fetch_when_written(args: argparse.Namespace) -> tuple[Any, dict[str, bytes]]:
    """`jobs_fetch`, once the job's results are all written: the coordinator exports
    the model and writes the report after it marks the job ended, so a fetch right
    after `jobs status` says completed finds them still being written. Waits up to
    ``args.wait`` seconds for report.md (written last), asking `jobs_fetch` with
    ``pending_ok`` again each FETCH_POLL_S: it answers "pending" (and nothing else)
    until report.md is there or the coordinator records that the report failed, so
    a failure recorded during the wait ends it at once (`jobs_status` says nothing of
    one: polling it, the console sat out the whole wait). Then fetches what there
    is: the reply's ``still_writing`` names what is not there yet, its note says so,
    or names the export's or report's failure the coordinator recorded. Only the
    last ask, which hands the files over, is an `admin.jobs_fetch` line in the audit
    log (a "pending" answer is not audited).

    Raises: AdminError: the coordinator refused (unknown job, no results).
    TimeoutError: no answer."""
    from fedge.console.client import AdminClient

    client = AdminClient.from_store(_store(args), args.operator, timeout_s=args.timeout)
    end = time.monotonic() + args.wait
    result, blobs = client.call("jobs_fetch", {"job_id": args.job_id,
                                               "pending_ok": args.wait > 0})
    if not (isinstance(result, dict) and result.get("pending")):
        return result, blobs
    print(f"job {args.job_id} {printable(result.get('status'))}: its results are still "
          f"being written ({', '.join(map(printable, result['pending']))} not yet); "
          f"waiting up to {args.wait:g} s (--wait)", file=sys.stderr, flush=True)
    while time.monotonic() < end:
        time.sleep(min(FETCH_POLL_S, max(0.0, end - time.monotonic())))
        result, blobs = client.call("jobs_fetch", {"job_id": args.job_id,
                                                   "pending_ok": True})
        if not (isinstance(result, dict) and result.get("pending")):
            return result, blobs
    return client.call("jobs_fetch", {"job_id": args.job_id})


def push(store: Any, client: Any, file: Path, *, kind: str, name: str, version: str,
         canary: str | None = None, sites: list[str] | None = None, deadline_s: float = 300.0,
         wait: bool = True, poll_s: float = 0.5,
         out: Any = None) -> dict[str, Any]:
    """Sign `file` as a target, publish it and roll it out; wait for the end if asked,
    passing `out` (if given) each new line of what the roll-out waits for meanwhile
    (:func:`rollout_line`: its state, and the ask it holds back while the site is in a
    round).

    Raises:
        ConsoleError: bad target fields, or software named other than "fedge".
        AdminError: the coordinator refused (for expired metadata, with what this
        console's clock reads: `ConsoleStore.clock_note`). TimeoutError: no answer
        from the coordinator.
    """
    from fedge.console.client import AdminError
    from fedge.console.store import ConsoleError
    from fedge.update.tuf_repo import SOFTWARE_NAME

    if kind == "software" and name != SOFTWARE_NAME:
        # One software lineage: under a second name, an old version would not be
        # older than anything installed under that name, and would roll sites back.
        raise ConsoleError(f"--name {name!r} for --kind software: the appliance runs one "
                           f"software, so its updates are all named {SOFTWARE_NAME!r} "
                           f"(push it with --name {SOFTWARE_NAME})")
    data = Path(file).read_bytes()
    targets, files = store.sign_targets([(kind, name, version, Path(file).name, data)],
                                        persist=False)
    [path] = files
    args: dict[str, Any] = {"path": path, "deadline_s": deadline_s}
    if canary:
        args["canary"] = canary
    if sites:
        args["sites"] = sites
    blobs = {"targets.json": targets, **files}
    root = store.renewed_root()  # root expires within 30 days: the same keys, a new year
    if root is not None:
        blobs["root.json"] = root
    try:
        rollout, _ = client.call("push", args, blobs)
    except AdminError as exc:
        if "expired" not in str(exc):
            raise
        # root not renewed, or targets signed already expired: this clock may be slow
        raise AdminError(f"{exc}; {store.clock_note()}") from exc
    if root is not None:
        store.save_root(root)
    store.save_targets(targets)  # published: the next signing builds on this version
    said = rollout_line(rollout)
    if wait and out is not None:
        out(said)
    while wait and rollout["state"] not in ("succeeded", "failed"):
        time.sleep(poll_s)
        rollout, _ = client.call("rollout_status", {"rollout_id": rollout["rollout_id"]})
        line = rollout_line(rollout)
        if out is not None and line != said and rollout["state"] not in ("succeeded",
                                                                          "failed"):
            out(line)
        said = line
    return rollout


def rollout_line(r: dict[str, Any]) -> str:
    """A roll-out in one line: its state, why it failed, and the ask it holds back
    while a site is in a round ("held": "waiting for round N of job J to end before
    asking SITE")."""
    return (f"roll-out {r['rollout_id']} of {r['path']}: {r['state']}"
            + (f" — {printable(r['failure'])}" if r.get("failure") else "")
            + (f" — {printable(r['held'])}" if r.get("held") else ""))


def _cmd_push(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        from fedge.console.client import AdminClient

        store = _store(args)
        client = AdminClient.from_store(store, args.operator, timeout_s=args.timeout)
        sites = [s for s in args.sites.split(",") if s] if args.sites else None
        r = push(store, client, args.file, kind=args.kind, name=args.name,
                 version=args.version, canary=args.canary, sites=sites,
                 deadline_s=args.deadline, wait=not args.no_wait,
                 out=lambda line: print(line, flush=True))
        for site, res in r["results"].items():
            print(f"{site}: {'ok' if res['ok'] else 'FAILED'} {res['detail']}")
        print(rollout_line(r))
        print(_root_expiry_line(store))
        return 0 if r["state"] in ("succeeded", "canary", "rest") else 1

    return _run(go, args)
