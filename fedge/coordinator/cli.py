"""`fedge coordinator`: run the coordinator, or act on its state directory.

    fedge coordinator [run] --config FILE            run (until SIGTERM)
    fedge coordinator submit --config FILE PLAN      queue a job plan (TOML)
    fedge coordinator enrol --config FILE --site S --curve-public 'Z85' --ed25519-public HEX
    fedge coordinator status --config FILE [JOB]     fleet and jobs as JSON
    fedge coordinator audit --config FILE [filters]  the audit log, read-only
    fedge coordinator check --config FILE [--user U] check the config as run does at
                                                     start, then exit ('ok: FILE', 0; or
                                                     why: 2 where run stops, 1 where its
                                                     jobs would fail); locks and writes
                                                     nothing

Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("coordinator", help="run the federation coordinator")
    p.add_argument("--config", type=Path, help="coordinator config (TOML)")
    p.set_defaults(func=_run)
    sub = p.add_subparsers(dest="coordinator_command", metavar="ACTION")
    r = sub.add_parser("run", help="run the coordinator (what the systemd unit starts)")
    r.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    r.set_defaults(func=_run)
    s = sub.add_parser("submit", help="queue a job plan")
    s.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    s.add_argument("plan", type=Path, help="job plan (TOML)")
    s.add_argument("--actor", default="cli")
    s.set_defaults(func=_submit)
    e = sub.add_parser("enrol", help="enrol an appliance directly in the registry",
                       allow_abbrev=False)  # see fedge.cli.join_key_values
    e.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    e.add_argument("--site", required=True)
    e.add_argument("--curve-public", required=True,
                   help="the appliance's CURVE key (z85; quote it: it may hold $, &, (, ...)")
    e.add_argument("--ed25519-public", required=True, help="its Ed25519 identity key (hex)")
    e.add_argument("--actor", default="cli")
    e.set_defaults(func=_enrol)
    st = sub.add_parser("status", help="print fleet and jobs as JSON")
    st.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    st.add_argument("job", nargs="?")
    st.set_defaults(func=_status)
    from fedge.console.cli import add_audit_filters

    a = sub.add_parser("audit", help="read the audit log (read-only: safe while the "
                       "coordinator runs)")
    a.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    add_audit_filters(a)
    a.set_defaults(func=_audit)
    c = sub.add_parser(
        "check", help="check a coordinator config as `run` does at start, then exit: 0 "
        "and 'ok: FILE' (warnings on stderr), 2 and why run would stop, or 1 and why its "
        "jobs would fail",
        description="Check the coordinator configuration as `fedge coordinator run` does "
        "before it listens, and what run then meets: the ports it listens at (free, or "
        "held by the running coordinator of this state directory), the addresses (this "
        "host's), the state directory (writable by this user). Without starting: nothing "
        "is locked, made or written, no port is listened at, so it may run beside the "
        "running coordinator. What the service's user cannot read or write, run cannot "
        "either: run it as that user, or as root (the provision file is root's) with "
        "--user and that user's name.")
    c.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    c.add_argument("--user", metavar="NAME",
                   help="as root: load the configuration, and look at the state directory, "
                   "as user NAME (the one the service runs as, fedge as packaged) would; "
                   "the provision file in credentials/coordinator/ beside the config, "
                   "root's, is handed to it as the unit hands it to the service "
                   "(LoadCredential=); root may read and write anywhere")
    c.set_defaults(func=_check)


def _config(args: argparse.Namespace, *, admin: bool = False) -> Any:
    """The configuration, or None after saying why on stderr. Only ``admin`` (run, which
    serves the admin channel) looks up where the channel can listen (up to
    NAME_LOOKUP_S of DNS); status, audit, submit and enrol do not use it."""
    from fedge.coordinator.config import ConfigError, load_config

    if getattr(args, "config", None) is None:
        print("fedge coordinator: --config FILE is required", file=sys.stderr)
        return None
    try:
        return load_config(args.config, admin_lookup=admin)
    except ConfigError as exc:
        print(f"fedge coordinator: {exc}", file=sys.stderr)
        return None


def _check(args: argparse.Namespace) -> int:
    """What `fedge coordinator run` refuses before it listens: the config
    (fedge.coordinator.config.load_config) and $FEDGE_SIMD (_run); its warnings
    (CoordinatorConfig.warnings), and an admin channel run leaves off (admin_off). Then
    what run meets at start that the file does not say (config.start_check): a port
    another process holds, a bind host that is no address of this host, a state
    directory this user cannot write (run stops: exit 2, each said); a jobs/ it cannot
    write (run starts, each job fails: exit 1); an admin channel that cannot listen
    (run serves without it: a warning); a port held by the running coordinator of
    this state directory (what a restart frees: a note). A restart was the only full
    check, and it abandons a round in flight.

    With ``--user NAME`` (as root, for the service's user) the configuration is loaded
    as NAME too, from a child dropped to it (`_load_as`), and the provision file is
    taken as the unit hands it over (config.unit_credential): a provision file NAME
    cannot read, where the service does not get it as a credential either, made run
    stop with a PermissionError at every start while this said ok. Both children
    hold NAME's supplementary groups, as the unit's User= gives them to the service:
    without them a state directory NAME writes through a group was said unwritable."""
    if getattr(args, "config", None) is None:
        print("fedge coordinator check: --config FILE is required", file=sys.stderr)
        return 2
    from fedge.coordinator.config import ConfigError, load_config, start_check, unit_credential
    from fedge.core import check_simd

    owner = None
    name = None
    credential = None
    if getattr(args, "user", None):
        import os
        import pwd

        try:
            entry = pwd.getpwnam(args.user)
        except KeyError:
            print(f"fedge coordinator check: --user {args.user}: no such user",
                  file=sys.stderr)
            return 2
        if entry.pw_uid != os.geteuid():
            if os.geteuid() != 0:
                print(f"fedge coordinator check: --user {args.user} needs root (or run "
                      f"check as {args.user})", file=sys.stderr)
                return 2
            owner = (entry.pw_uid, entry.pw_gid)
            name = entry.pw_name
        # outside the unit: the provision file as LoadCredential= hands it over
        credential = unit_credential(args.config)
    try:
        if owner is not None:  # before anything here may start a thread (run_as forks)
            _load_as(owner, args.config, credential, groups_of=name)
        cfg = load_config(args.config, credential=credential)
        check_simd()
    except (ConfigError, ValueError) as exc:
        print(f"fedge coordinator: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the child dropped to --user's (named)
        print(f"fedge coordinator check: {exc}", file=sys.stderr)
        return 2
    if credential is not None and cfg.provision_file is not None \
            and cfg.provision_file.absolute() == credential.source.absolute():
        print(f"note: provision file {credential.source}: the service gets it as "
              "$CREDENTIALS_DIRECTORY/fedge_coordinator-provision.json (the unit's "
              "LoadCredential=); checked as that", file=sys.stderr)
    # nothing bound but for an instant, never listening; nothing locked or written
    try:
        found = start_check(cfg, owner=owner, groups_of=name)
    except OSError as exc:  # the child dropped to --user's (named)
        print(f"fedge coordinator check: {exc}", file=sys.stderr)
        return 2
    for problem in (*found.refused, *found.jobs):
        print(f"fedge coordinator: {problem}", file=sys.stderr)
    for warning in (*cfg.warnings, *found.warnings):
        print(f"warning: {warning}", file=sys.stderr)
    if cfg.admin_off:  # run goes on without the channel, as it is told here
        print(f"warning: {cfg.admin_off}", file=sys.stderr)
    for note in found.notes:
        print(f"note: {note}", file=sys.stderr)
    if found.refused:
        return 2
    if found.jobs:
        return 1
    print(f"ok: {args.config}")
    return 0


def _load_as(owner: tuple[int, int], config: Path, credential: Any, *,
             groups_of: str | None = None) -> None:
    """Load the configuration (config.load_config) as ``owner``, from a child dropped
    to it (fedge.as_owner.run_as; this process is root) with the supplementary groups
    of user ``groups_of`` (as systemd's User= gives them), with ``credential``
    (config.unit_credential) as the unit's: what the service's user cannot read, run
    cannot either. The admin channel's name look-up is left to the caller's own load.

    Raises: ConfigError: as load_config, as that user. OSError: the child could not be
        run as ``owner`` (named)."""
    import importlib

    from fedge.as_owner import run_as
    from fedge.coordinator.config import ConfigError, load_config

    # here: the child may not read the modules (utf_8_sig: the config's codec)
    for module in ("pwd", "stat", "encodings.utf_8_sig", "fedge.text", "fedge.transport",
                   "fedge.transport._sockopts"):
        importlib.import_module(module)

    def load() -> None:
        load_config(config, admin_lookup=False, credential=credential)

    run_as(owner, load, what=f"loading {config}", raises=(ConfigError,), umask=None,
           groups_of=groups_of)


def _run(args: argparse.Namespace) -> int:
    cfg = _config(args, admin=True)
    if cfg is None:
        return 2
    from fedge.core import check_simd

    try:
        # a $FEDGE_SIMD naming no usable path: every secure round's unmasking would fail
        # ("FEDGE_SIMD='avx9' is not a PRG path") while the coordinator ran on, as the
        # agent refuses to start for it. Checked before anything is locked or made.
        check_simd()
    except ValueError as exc:
        print(f"fedge coordinator: {exc}", file=sys.stderr)
        return 2
    from fedge.coordinator import process
    from fedge.coordinator.store import StoreError, database_error
    from fedge.systemd import setup_logging

    setup_logging("fedge-coordinator")
    try:
        # one coordinator per state directory, held before the database opens: a
        # second one resumed the first's job and went on with it after a cancel
        process.hold_state_dir(cfg)
        # the database opens here, before the loop: a corrupt or locked one is one line
        coord = process.build_coordinator(cfg)
    except (StoreError, process.InstanceLocked) as exc:
        print(f"fedge coordinator: {exc}", file=sys.stderr)
        return 2
    try:
        return process.run(cfg, coordinator=coord)
    except sqlite3.DatabaseError as exc:  # damaged while running: one line, as at start
        print(f"fedge coordinator: {database_error(coord.store.path, exc)}", file=sys.stderr)
        return 2


def _open_store(cfg: Any, command: str, *, existing: bool = False,
                read_only: bool = False) -> Any:
    """The coordinator's database, or None after printing why it cannot be opened
    (corrupt, locked by a running coordinator; StoreError names the file). With
    `existing`, a state directory without one is refused rather than given a new,
    empty database: a mistyped state_dir showed an empty fleet (status), or printed
    the id of a job no coordinator would run (submit). With `read_only` (a command
    that only reads), it is opened read-only (Store's read_only: on a full or
    read-only disk too), read-write only where it must first be brought up to date."""
    from fedge.coordinator.store import DB_NAME, Store, StoreError, StoreNeedsWrite

    db = Path(cfg.state_dir) / DB_NAME
    if existing and not db.exists():
        print(f"fedge coordinator {command}: no coordinator database at {db}: is state_dir "
              "right? (`fedge coordinator run` creates it)", file=sys.stderr)
        return None
    try:
        if read_only:
            try:
                return Store(cfg.state_dir, read_only=True)
            except StoreNeedsWrite:
                pass  # an older release's database: migrated as before
        return Store(cfg.state_dir)
    except StoreError as exc:
        print(f"fedge coordinator {command}: {exc}", file=sys.stderr)
        return None


def _submit(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return 2
    from fedge.coordinator.plan import PlanError, read_plan_file, with_seed
    from fedge.coordinator.service import CoordinatorError

    try:
        text = with_seed(read_plan_file(args.plan))  # parsed; a seed if none is named
    except (OSError, PlanError) as exc:
        print(f"fedge coordinator submit: {exc}", file=sys.stderr)
        return 2
    import secrets
    import time

    job_id = f"job-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
    from fedge.coordinator.store import database_error

    store = _open_store(cfg, "submit", existing=True)
    if store is None:
        return 2
    try:
        warnings = _submission_warnings(store, text)
        store.create_job(job_id, text, actor=args.actor)
    except sqlite3.DatabaseError as exc:
        print(f"fedge coordinator submit: {database_error(store.path, exc)}", file=sys.stderr)
        return 2
    except (CoordinatorError, PlanError) as exc:  # nothing was submitted
        print(f"fedge coordinator submit: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(job_id)  # alone on stdout: scripts read the id from it
    for warning in warnings:  # queued all the same, as `fedge console jobs submit` says
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _submission_warnings(store: Any, plan_text: str) -> list[str]:
    """The console's submission checks (fedge.coordinator.service.submission_warnings:
    a job.name already queued or running, a data set no site declares, a model that
    does not fit the data sets' declared task or input shape ...), from the database:
    each enrolled site heard from with the data sets its last recorded heartbeat
    declared, and what it declared of their tasks and shapes (``declared_inputs``).

    Raises: CoordinatorError: the plan's data set is declared by none, or every site
        holding it would refuse the model (nothing must be submitted). PlanError: the
        plan does not parse, or its model leaves out a parameter that has no default
        (plan.check_required_model_params). sqlite3.DatabaseError."""
    from fedge.coordinator.plan import check_required_model_params, parse_plan
    from fedge.coordinator.service import DeclaredInputs, submission_warnings

    plan = parse_plan(plan_text)
    # the coordinator process builds the job's starting model from the plan
    # (torch_initial_weights): a parameter the model has no default for is refused now
    check_required_model_params(plan)
    declared = {a.site_id: tuple(a.datasets) for a in store.appliances()
                if a.status == "enrolled" and a.last_seen is not None}
    recorded = store.declared_inputs()
    inputs = {s: DeclaredInputs.from_record(recorded[s]) for s in declared if s in recorded}
    return submission_warnings(store, plan, declared, inputs)


def _enrol(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return 2
    from fedge.coordinator.store import StoreError, database_error

    store = _open_store(cfg, "enrol")
    if store is None:
        return 2
    try:
        store.enrol(args.site, args.curve_public, bytes.fromhex(args.ed25519_public),
                    actor=args.actor)
    except sqlite3.DatabaseError as exc:
        print(f"fedge coordinator enrol: {database_error(store.path, exc)}", file=sys.stderr)
        return 2
    except (StoreError, ValueError) as exc:
        print(f"fedge coordinator enrol: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(f"enrolled {args.site}")
    return 0


def _status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return 2
    from fedge.coordinator.store import StoreError, database_error

    store = _open_store(cfg, "status", existing=True, read_only=True)
    if store is None:
        return 2
    try:
        if args.job:
            job = store.job(args.job)
            out: Any = {**job.to_dict(), "rounds": [r.__dict__ for r in store.rounds(args.job)],
                        "metrics": store.metrics(args.job)}
        else:
            out = {"fleet": [a.to_dict() for a in store.appliances()],
                   "jobs": [j.to_dict() for j in store.jobs()]}
    except StoreError as exc:
        print(f"fedge coordinator status: {exc}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:
        print(f"fedge coordinator status: {database_error(store.path, exc)}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(json.dumps(out, indent=2, default=str))
    return 0


def _audit(args: argparse.Namespace) -> int:
    """Print the audit log from the database, opened read-only (store.open_read_only:
    SQLite ``mode=ro``, or ``immutable=1`` where a full or read-only disk cannot take
    the -shm file and no coordinator runs): nothing is created, migrated or locked, and
    a running coordinator's writes (WAL) go on meanwhile. Unlike `fedge console audit`,
    the whole log is looked at."""
    cfg = _config(args)
    if cfg is None:
        return 2
    from fedge.console.audit import parse_detail, split_actions
    from fedge.console.cli import print_audit
    from fedge.coordinator.store import DB_NAME, database_error, open_read_only, read_audit

    db = Path(cfg.state_dir) / DB_NAME
    if not db.is_file():
        print(f"fedge coordinator audit: no coordinator database at {db}: is state_dir "
              "right? (`fedge coordinator run` creates it)", file=sys.stderr)
        return 2
    try:
        conn = open_read_only(db)
    except sqlite3.Error as exc:
        print(f"fedge coordinator audit: {database_error(db, exc)}", file=sys.stderr)
        return 2
    try:
        rows = read_audit(conn, actions=split_actions(args.action), job=args.job,
                          site=args.site, actor=args.actor, since=args.since,
                          limit=args.limit + 1)
    except sqlite3.Error as exc:
        print(f"fedge coordinator audit: {database_error(db, exc)}", file=sys.stderr)
        return 2
    finally:
        conn.close()
    more = len(rows) > args.limit
    entries = [{**r, "detail": parse_detail(r["detail"])} for r in rows[int(more):]]
    print_audit(entries, args.json)
    if more:
        print(f"note: more entries match; these are the newest {len(entries)} (narrow "
              "with --since/--action, or raise --limit)", file=sys.stderr)
    return 0
