"""`fedge agent`: run the appliance agent, or install an enrolment file.

    fedge agent [run] --config FILE [--connect-timeout S]
    fedge agent [--config FILE] enrol FILE [--state-dir DIR] [--console-key FINGERPRINT]
                [--replace]                         (fedge.agent.enrol; into the config's
                                                    state_dir when --config is given)
    fedge agent privacy --config FILE [--delta D]   the privacy budget this site spent
                                                    (every released update, with DP or
                                                    without; pending runs apart), cross-
                                                    checked with the secure aggregation
                                                    reveal log
    fedge agent privacy --config FILE --runs [--json]
                                                    every training run in the ledger: when,
                                                    job, data set, plan, round, the
                                                    coordinator's task, status, mechanism,
                                                    settings; ε per job
    fedge agent audit [--config FILE | --state-dir DIR] [--json] [--since DATE]
                                                    the appliance's own audit trail, for a
                                                    DPO or security officer: every update
                                                    outcome (updates/audit.jsonl, .1) and
                                                    every enrolment installed
                                                    (enrolment-history.jsonl), oldest first;
                                                    reads only
    fedge agent check --config FILE                 check the config and the enrolment
                                                    files as run does at start, and read
                                                    each data set as a task does, then
                                                    exit ('ok: FILE', 0; a data set
                                                    that cannot be used, 1; or why
                                                    start would fail, 2);
                                                    takes no lock, writes nothing

Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def _connect_timeout(text: str) -> float:
    """Seconds, finite and > 0: 0 or -1 gave up at once and blamed the coordinator
    (exit 3), nan waited forever."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{value} must be a finite number of seconds > 0")
    return value


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("agent", help="run the appliance agent")
    p.add_argument("--config", type=Path, help="agent config (TOML)")
    p.add_argument("--connect-timeout", type=_connect_timeout, default=None,
                   help="exit with status 3 if no connection to the coordinator within S "
                        "seconds (refused, impostor or unreachable); default: retry forever")
    p.set_defaults(func=_run)
    sub = p.add_subparsers(dest="agent_command", metavar="ACTION")
    r = sub.add_parser("run", help="run the agent (what the systemd unit starts)")
    r.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    r.add_argument("--connect-timeout", type=_connect_timeout, default=argparse.SUPPRESS)
    r.set_defaults(func=_run)
    pv = sub.add_parser("privacy", help="the privacy budget (epsilon) this site has spent, "
                                        "per job and in total",
                        description="The privacy budget (epsilon) this site has spent, per "
                                    "job and in total, from its privacy ledger, cross-checked "
                                    "with the secure aggregation reveal log. With --runs: "
                                    "every training run the ledger holds, with or without DP, "
                                    "one line each (for a data-protection officer).")
    pv.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    pv.add_argument("--delta", type=float, default=1e-5, help="delta for epsilon (1e-5)")
    pv.add_argument("--runs", action="store_true",
                    help="list every training run in the ledger: when it was recorded and "
                         "released (UTC), job, data set, plan digest, round, this site's "
                         "attempt and the coordinator's task id (and attempt), status "
                         "(released: its update left, or was about to; pending: it never "
                         "left), mechanism (dp_sgd, dp_fedavg, none) and its settings "
                         "(noise multiplier, sampling rate, steps, max_grad_norm or "
                         "clip_norm, the plan's delta), then epsilon per job at --delta. "
                         "Runs recorded by an earlier release lack the fields it did not "
                         "record ('-'); their plan digest is the job's last plan, where "
                         "the appliance kept it")
    pv.add_argument("--json", action="store_true",
                    help="with --runs (implied): the same as one JSON object: "
                         "{delta, runs: [ledger entries], jobs: [{job, rounds, epsilon "
                         "(null when unbounded), unbounded, datasets, plan_digests}], "
                         "total_epsilon, total_unbounded, not_recorded}")
    pv.set_defaults(func=_privacy)
    au = sub.add_parser(
        "audit", help="the appliance's audit trail: update outcomes and enrolments",
        description="The appliance's own audit trail, oldest first (newest last): every "
                    "signed-update outcome, installed or refused, with the roll-out, what "
                    "it was and who signed it (updates/audit.jsonl and its rotated "
                    "audit.jsonl.1), then every enrolment installed, with when, by whom, "
                    "which site, console and coordinator, and what it replaced "
                    "(enrolment-history.jsonl). Reads only: safe beside a running agent. "
                    "State dir: --state-dir, else the state_dir of --config, else "
                    "/var/lib/fedge.")
    au.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                    help="agent config (TOML): its state_dir")
    au.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                    help="agent state directory; refused if --config names another")
    au.add_argument("--since", type=_since, default=None, metavar="DATE",
                    help="only what happened from DATE on (YYYY-MM-DD, or an ISO time; "
                         "UTC unless it says otherwise). Lines that cannot be read (a write "
                         "cut short) are shown whatever their date")
    au.add_argument("--json", action="store_true",
                    help="the same as one JSON object: {state_dir, since, updates: {files, "
                         "records}, enrolments: {file, records}}; every record has every "
                         "field (null where a line written by an earlier release lacks "
                         "it), a line that cannot be read is {unreadable: why}")
    au.set_defaults(func=_audit)
    c = sub.add_parser(
        "check", help="check an agent config as `run` does at start, then exit: 0 and "
        "'ok: FILE' (warnings on stderr); 1 if a data set cannot be used; 2 and why "
        "start would fail",
        description="Check the agent configuration as `fedge agent run` does before it "
        "connects (its enrolment files read), without starting, then read each data set "
        "as a task's first load reads it (the same loader and settings): 'ok' with its "
        "rows and columns, or the loader's error; a data set that cannot be used exits 1 "
        "(the agent starts, and refuses every job on it). "
        "A large data set takes a while to read. Nothing is locked, made or written, so "
        "it may run beside the running agent. Run it as the user the service runs as: "
        "what that user cannot read, start "
        "cannot either; the secret keys in the unit's credentials source "
        "(/var/lib/fedge-credentials/agent, root's) it then says of but does not read: run "
        "it as root as well to check them too.")
    c.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    c.set_defaults(func=_check)
    try:
        from fedge.agent.enrol import register_enrol
    except ModuleNotFoundError:  # pragma: no cover - console engineer's module absent
        return
    register_enrol(sub)


def _run(args: argparse.Namespace) -> int:
    if args.config is None:
        print("fedge agent: --config FILE is required", file=sys.stderr)
        return 2
    from fedge.agent.process import AgentConfigError, load_config, run
    from fedge.systemd import setup_logging

    setup_logging("fedge-agent")
    try:
        cfg = load_config(args.config)
        return run(cfg, connect_timeout_s=args.connect_timeout)
    except AgentConfigError as exc:
        print(f"fedge agent: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a [[datasets]] table fedge.train refuses
        from fedge.train.accounting import LedgerUnreadable

        # a ledger the agent's user cannot read is the state dir's owner, not the config
        what = "" if isinstance(exc, LedgerUnreadable) else "invalid configuration: "
        print(f"fedge agent: {what}{exc}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace) -> int:
    """What `fedge agent run` refuses before it connects (fedge.agent.process.run):
    the config, $FEDGE_SIMD, the enrolment files, the secret keys where the unit
    takes them from (fedge.agent.process.check_enrolled); and what it warns of: keys
    that are not the ones enrolled last, secret keys in the unit's credentials source
    that this user cannot read, a coordinator endpoint on loopback or whose name does
    not resolve here (fedge.agent.process.coordinator_endpoint_warnings). Then each
    data set read as a task reads it (fedge.agent.process.check_data_sets): one that
    cannot be used (its path, its table, its contents) exits 1 after all are read:
    the agent would start, and refuse every job on it (2 is for what start refuses).
    The state directory as this user may write it (fedge.agent.process.
    state_dir_problems): its lock it cannot take stops start (2); the rest (the
    privacy ledger, job state, updates) fails each job (1). The agent's lock is not
    taken; nothing is written."""
    if getattr(args, "config", None) is None:
        print("fedge agent check: --config FILE is required", file=sys.stderr)
        return 2
    import logging

    from fedge.agent.process import (
        AgentConfigError,
        check_data_sets,
        check_enrolled,
        coordinator_endpoint_warnings,
        health_max_age_s,
        load_config,
        state_dir_problems,
    )
    from fedge.core import check_simd

    warned: list[str] = []

    class Collect(logging.Handler):  # what start would log as a warning
        def emit(self, record: logging.LogRecord) -> None:
            warned.append(record.getMessage())

    agent_log = logging.getLogger("fedge.agent")
    collect = Collect(logging.WARNING)
    agent_log.addHandler(collect)
    propagate, agent_log.propagate = agent_log.propagate, False
    try:
        cfg = load_config(args.config)
        check_simd()
        health_max_age_s(cfg)  # the [eligibility] table
        # the secret keys where the unit will take them from, its LoadCredential=
        # source among them (root's: said, not read, when this is not root)
        enrolled, unread = check_enrolled(cfg.state_dir)
        warnings = list(unread)
        # on loopback, or a name that does not resolve here (looked up, at most
        # RESOLVE_TIMEOUT_S): the agent would start, and never connect
        warnings += coordinator_endpoint_warnings(enrolled.coordinator_endpoint)
    except (AgentConfigError, ValueError) as exc:
        print(f"fedge agent: {exc}", file=sys.stderr)
        return 2
    finally:
        agent_log.removeHandler(collect)
        agent_log.propagate = propagate
    for warning in warnings + warned:
        print(f"warning: {warning}", file=sys.stderr)
    # the ledger, job state and updates live there: run as the service user, check
    # says what it cannot write (without writing)
    stops, unwritable = state_dir_problems(cfg.state_dir)
    for problem in stops + unwritable:
        print(f"fedge agent: {problem}", file=sys.stderr)
    if stops:
        return 2
    # each data set's contents, as a task reads them: a path that is a folder, a
    # ';'-separated or decimal-comma table, found here rather than by the first job
    failed = check_data_sets(cfg, args.config)
    if failed:
        print(f"fedge agent: {failed} of {len(cfg.datasets)} data sets in {args.config} "
              "cannot be used (said above): the agent starts, but refuses every job on "
              "them until that is fixed", file=sys.stderr)
        return 1
    if unwritable:
        return 1
    print(f"ok: {args.config}")
    return 0


def _since(text: str) -> datetime:
    """--since: a date (midnight UTC) or an ISO time (UTC unless it names its zone)."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD) or an ISO "
                                         "time (YYYY-MM-DDTHH:MM[:SS][+HH:MM])") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _audit(args: argparse.Namespace) -> int:
    from fedge.agent.enrol import _state_dir

    try:
        state_dir = _state_dir(args)
    except ValueError as exc:  # AgentConfigError is one
        print(f"fedge agent audit: {exc}", file=sys.stderr)
        return 2
    where = (f" (from {args.config})" if getattr(args, "config", None) is not None
             and args.state_dir is None else "")
    from fedge.agent.updates import AuditUnreadable

    try:
        trail = read_audit_trail(state_dir, since=args.since)
    except AuditUnreadable as exc:
        print(f"fedge agent audit: {exc}", file=sys.stderr)
        return 2
    if trail is None:
        print(f"fedge agent audit: {state_dir}{where} holds no appliance's records: no "
              "enrolment.json, enrolment history or update audit there; check the state "
              "dir (an appliance is enrolled with `fedge agent enrol FILE`)", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(trail, indent=1, sort_keys=True))
    else:
        print_audit(trail)
    return 0


def _records(data: bytes, name: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """The JSON lines of `data`, each with every field of `fields` (None where a line
    an earlier release wrote lacks it); a line that is no JSON object (a write cut
    short by a crash or a power cut, or one being written now) is ``{"unreadable":
    why}``, its fields None."""
    from fedge.agent.updates import json_lines

    records: list[dict[str, Any]] = []
    for number, parsed in json_lines(data):
        record = parsed if isinstance(parsed, dict) else {
            "unreadable": f"{name} line {number} is not a record (a write cut short, or "
                          f"being written): {parsed}"}
        records.append({field: record.get(field) for field in fields}
                       | {k: v for k, v in record.items() if k not in fields})
    return records


def _at(record: dict[str, Any]) -> datetime | None:
    try:
        when = datetime.fromisoformat(str(record["time"]))
    except (KeyError, TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def read_audit_trail(state_dir: Path, *, since: datetime | None = None
                     ) -> dict[str, Any] | None:
    """What ``fedge agent audit`` shows, as plain data (its ``--json``): the update
    outcomes (``updates/audit.jsonl.1`` then ``audit.jsonl``, fields
    fedge.agent.updates.AUDIT_FIELDS) and the enrolments installed
    (``enrolment-history.jsonl``, fields fedge.agent.enrol.HISTORY_FIELDS), each in
    the order written (oldest first), from `since` on (a line without a readable time
    is kept). Reads only, never creates or rotates anything; None when `state_dir`
    holds none of these files nor an ``enrolment.json``.

    Raises: fedge.agent.updates.AuditUnreadable: a file exists but cannot be read
        (names it)."""
    from fedge.agent.enrol import HISTORY, HISTORY_FIELDS
    from fedge.agent.updates import AUDIT, AUDIT_FIELDS, read_snapshot

    current = state_dir / "updates" / AUDIT
    rotated = current.with_name(AUDIT + ".1")
    history = state_dir / HISTORY
    # the current audit file first: renamed to .1 by the agent after it is opened, it
    # is the same file as the .1 opened next, and read once (read_snapshot)
    now, older, enrolments = read_snapshot([current, rotated, history])
    if (now, older, enrolments) == (None, None, None) \
            and not (state_dir / "enrolment.json").exists():
        return None

    def kept(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if since is None:
            return records
        return [r for r in records if (when := _at(r)) is None or when >= since]

    updates: list[dict[str, Any]] = []
    files = []
    for path, data in ((rotated, older), (current, now)):
        if data is not None:
            files.append(str(path))
            updates += _records(data, path.name, AUDIT_FIELDS)
    return {"state_dir": str(state_dir), "since": since.isoformat() if since else None,
            "updates": {"files": files, "records": kept(updates)},
            "enrolments": {"file": str(history) if enrolments is not None else None,
                           "records": kept(_records(enrolments or b"", history.name,
                                                    HISTORY_FIELDS))}}


def _shown(value: Any) -> str:
    return "-" if value is None or value == "" or value == [] else str(value)


def _time(record: dict[str, Any]) -> str:
    when = _at(record)
    if when is None:
        return _shown(record.get("time"))
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def print_audit(trail: dict[str, Any]) -> None:
    """``fedge agent audit``: :func:`read_audit_trail` as two tables, a record a line,
    oldest first; '-' for what a line does not hold (written by an earlier release)."""
    since = f" since {trail['since']}" if trail["since"] else ""
    updates = trail["updates"]
    if not updates["files"]:
        print(f"update outcomes: none recorded ({trail['state_dir']}/updates/audit.jsonl "
              "does not exist: no update was offered to this appliance, or only before "
              "they were audited)")
    else:
        print(f"update outcomes{since} ({', '.join(updates['files'])}), oldest first:")
        print(f"  {'time (UTC)':<19} {'roll-out':<16} {'update':<32} {'outcome':<11} "
              f"{'signed by (targets version, key ids)':<40} detail")
        for r in updates["records"]:
            if "unreadable" in r:
                print(f"  {'-':<19} {'-':<16} {'-':<32} {'unreadable':<11} {'-':<40} "
                      f"{r['unreadable']}")
                continue
            what = " ".join(str(r[k]) for k in ("kind", "name", "version") if r[k]) \
                or _shown(r["path"])
            outcome = ("rolled back" if r["rolled_back"] else "ok" if r["ok"] is True
                       else "refused" if r["ok"] is False else "-")
            signed = "-"
            if r["targets_version"] is not None or r["targets_signed_by"]:
                keys = ",".join(str(k)[:16] for k in r["targets_signed_by"] or []) or "-"
                signed = (f"targets v{_shown(r['targets_version'])} root "
                          f"v{_shown(r['root_version'])} {keys}")
            print(f"  {_time(r):<19} {_shown(r['rollout_id']):<16} {what:<32} "
                  f"{outcome:<11} {signed:<40} {_shown(r['detail'])}")
        if not updates["records"]:
            print("  (none)")
    enrolments = trail["enrolments"]
    if enrolments["file"] is None:
        print(f"enrolments: none recorded ({trail['state_dir']}/enrolment-history.jsonl "
              "does not exist: enrolled by a release before it was kept, or never)")
        return
    print(f"enrolments{since} ({enrolments['file']}), oldest first:")
    print(f"  {'time (UTC)':<19} {'by':<20} {'site':<16} {'console key':<20} "
          f"{'coordinator':<28} {'file valid (UTC)':<35} replaced")
    for r in enrolments["records"]:
        if "unreadable" in r:
            print(f"  {'-':<19} {'-':<20} {'-':<16} {'-':<20} {'-':<28} {'-':<35} "
                  f"{r['unreadable']}")
            continue
        by = _shown(r["user"] if r["user"] is not None else r["uid"])
        if r["sudo_user"]:
            by += f" (sudo {r['sudo_user']})"
        valid = f"{_time({'time': r['issued']})} to {_time({'time': r['expires']})}"
        if r["issued"] is None and r["expires"] is None:
            valid = "-"
        replaced = (_shown(r["replaced_enrolment"]) if r["replaced"]
                    else "no" if r["replaced"] is False else "-")
        print(f"  {_time(r):<19} {by:<20} {_shown(r['site']):<16} "
              f"{_shown(r['console_fingerprint']):<20} {_shown(r['coordinator_endpoint']):<28}"
              f" {valid:<35} {replaced}")
    if not enrolments["records"]:
        print("  (none)")


def _privacy(args: argparse.Namespace) -> int:
    if args.config is None:
        print("fedge agent privacy: --config FILE is required", file=sys.stderr)
        return 2
    from fedge.agent.process import AgentConfigError, load_config
    from fedge.agent.trainer import ledger_path
    from fedge.train.accounting import PrivacyLedger

    try:
        cfg = load_config(args.config)
        refused = _not_an_appliance(Path(cfg.state_dir), args.config)
        if refused:
            print(f"fedge agent privacy: {refused}", file=sys.stderr)
            return 2
        ledger = PrivacyLedger.load(ledger_path(cfg.state_dir))
    except (AgentConfigError, ValueError) as exc:
        print(f"fedge agent privacy: {exc}", file=sys.stderr)
        return 2
    if not 0 < args.delta < 1:
        print(f"fedge agent privacy: --delta {args.delta} must lie in (0, 1)", file=sys.stderr)
        return 2
    reveals = read_reveals(Path(cfg.state_dir))
    if getattr(args, "json", False) or getattr(args, "runs", False):
        history = run_history(ledger, args.delta, reveals=reveals,
                              state_dir=Path(cfg.state_dir))
        if args.json:
            print(json.dumps(history, indent=1, sort_keys=True))
        else:
            print_runs(history)
        return 0
    print_privacy(ledger, args.delta, reveals=reveals)
    return 0


def run_history(ledger: Any, delta: float, *, reveals: Reveals | None = None,
                state_dir: Path | None = None) -> dict[str, Any]:
    """What ``fedge agent privacy --runs`` shows, as plain data (its ``--json``).

    ``runs``: every ledger entry in the order recorded, as saved (fields an earlier
    release did not record are absent). An entry without ``plan_digest`` gets its job's
    last plan digest from ``state_dir``'s job state where it is kept there, with
    ``plan_digest_source`` "job state" (the entry's own is "ledger"). ``jobs``: per job,
    its released rounds, ε at ``delta`` as the privacy table gives it (None and
    ``unbounded`` when no ε bounds it: an update left without DP, or the reveal log
    shows one the ledger did not record), its data sets and plan digests. ``total``:
    every job composed, likewise."""
    from fedge.agent.jobstate import JobStateStore

    reveals = reveals if reveals is not None else Reveals(Path())
    unrecorded = _unrecorded(ledger, reveals)
    named = {str(r.job) for r in unrecorded.named}
    store = JobStateStore(state_dir / "jobs") if state_dir is not None else None
    kept: dict[str, str | None] = {}

    def job_plan(job: str) -> str | None:
        if job not in kept:
            saved = store.peek(job, "plan").get("digest") if store is not None else None
            kept[job] = (saved.tobytes().hex() if saved is not None and saved.size == 32
                         and saved.dtype.itemsize == 1 else None)
        return kept[job]

    runs = []
    for entry in ledger.entries:
        run = dict(entry)
        if "plan_digest" in run:
            run["plan_digest_source"] = "ledger"
        elif job_plan(run["job"]) is not None:
            run["plan_digest"], run["plan_digest_source"] = job_plan(run["job"]), "job state"
        runs.append(run)

    def bounded(eps: float) -> float | None:
        return None if eps == math.inf else eps

    jobs = []
    for job in sorted({e["job"] for e in ledger.entries}):
        eps = math.inf if job in named else ledger.epsilon(delta, job=job)
        mine = [r for r in runs if r["job"] == job]
        jobs.append({"job": job,
                     "rounds": len({e["round"] for e in ledger.released(job=job)}),
                     "epsilon": bounded(eps), "unbounded": eps == math.inf,
                     "datasets": sorted({r["dataset"] for r in mine if "dataset" in r}),
                     "plan_digests": sorted({r["plan_digest"] for r in mine
                                             if "plan_digest" in r})})
    total = math.inf if unrecorded.count else ledger.epsilon(delta)
    return {"delta": delta, "runs": runs, "jobs": jobs, "total_epsilon": bounded(total),
            "total_unbounded": total == math.inf, "not_recorded": unrecorded.count}


def _settings(run: dict[str, Any]) -> str:
    """A run's mechanism settings, as ε depends on them, in a few words."""
    from fedge.train.accounting import DP_FEDAVG, DP_SGD, NO_DP

    kind = run.get("mechanism", DP_SGD)
    if kind == NO_DP:
        return f"exact update, {run.get('steps', '-')} steps"
    said = [f"z={run['noise_multiplier']:g}"]
    if kind == DP_SGD:
        said += [f"q={run['sampling_rate']:g}", f"steps={run['steps']}"]
        if "max_grad_norm" in run:
            said.append(f"C={run['max_grad_norm']:g}")
    elif kind == DP_FEDAVG:
        if run.get("clip_norm") is not None:
            said.append(f"S={run['clip_norm']:g}")
        if run.get("cohort_size") is not None:
            said.append(f"cohort={run['cohort_size']}")
    if "delta" in run:
        said.append(f"delta={run['delta']:g}")
    if "bound" in run:
        said.append("per loss term")
    return " ".join(said)


def print_runs(history: dict[str, Any]) -> None:
    """``fedge agent privacy --runs``: :func:`run_history` as a table, a run a line,
    then ε per job and in total."""
    print(f"{'recorded (UTC)':<20} {'released (UTC)':<20} {'job':<24} {'data set':<16} "
          f"{'plan':<12} {'round':>5} {'att':>3} {'task (coordinator)':<24} "
          f"{'status':<8} {'mechanism':<9} settings")
    from_job_state = False
    for run in history["runs"]:
        task = run.get("task_id", "-")
        if "task_attempt" in run:
            task = f"{task} attempt {run['task_attempt']}"
        plan = run.get("plan_digest", "-")[:12]
        if run.get("plan_digest_source") == "job state":
            plan, from_job_state = plan[:11] + "*", True
        print(f"{run.get('at', '-'):<20} {run.get('released_at', '-'):<20} "
              f"{run['job']:<24} {run.get('dataset', '-'):<16} {plan:<12} "
              f"{run['round']:>5} {run['attempt']:>3} {task:<24} {run['status']:<8} "
              f"{run.get('mechanism', '-'):<9} {_settings(run)}")
    if from_job_state:
        print("* plan digest not in the ledger entry (recorded by an earlier release): the "
              "job's last plan, from this appliance's job state")
    print(f"epsilon per job at delta {history['delta']:g} (released runs only; "
          "unbounded: an update left without DP, or one the ledger did not record):")
    for job in history["jobs"]:
        eps = "unbounded" if job["unbounded"] else f"{job['epsilon']:.4f}"
        print(f"  {job['job']:<38} {job['rounds']:>4} rounds  epsilon {eps:>10}  "
              f"data set {', '.join(job['datasets']) or '-'}")
    total = ("unbounded" if history["total_unbounded"]
             else f"{history['total_epsilon']:.4f}")
    print(f"  {'total (all jobs composed)':<38} {'':>4}         epsilon {total:>10}")
    if history["not_recorded"]:
        print(f"  {history['not_recorded']} update(s) revealed under secure aggregation are "
              "not in this ledger: see `fedge agent privacy`")


def _not_an_appliance(state_dir: Path, config: Path) -> str | None:
    """Why `state_dir` is no appliance's whose privacy can be told, or None.

    A missing ledger reads as an empty one (nothing released), so a mistyped or
    never-enrolled state_dir would get epsilon 0 and "every run counted". An enrolled
    appliance that has not trained yet has an empty ledger truthfully; a state dir with
    a ledger or a reveal log has records to show, enrolment file or not."""
    from fedge.agent.trainer import ledger_path

    if not state_dir.is_dir():
        return (f"state_dir {state_dir} (from {config}) is not a directory: no appliance "
                "state is there; check state_dir in the config")
    records = (state_dir / "enrolment.json", ledger_path(state_dir),
               state_dir / "secagg" / "revealed.jsonl", state_dir / "secagg" / "revealed.json")
    if not any(path.exists() for path in records):
        return (f"state_dir {state_dir} (from {config}) is not an enrolled appliance's: no "
                f"enrolment.json, privacy ledger or reveal log there; check state_dir in "
                "the config (an appliance is enrolled with `fedge agent enrol FILE`)")
    return None


@dataclass(frozen=True)
class Reveal:
    """One update this site revealed: when (``at``, 0 where an old log kept none), and
    the ``job`` and ``round`` it was trained for where the row records them (rows
    written before they were recorded have neither)."""

    at: float
    job: str | None = None
    round: int | None = None


@dataclass
class Reveals:
    """What the secure aggregation reveal log says this site revealed: ``rows``, one
    per update summed, oldest first, or ``error``: why the log could not be read (then
    nothing can be cross-checked)."""

    path: Path
    rows: list[Reveal] = field(default_factory=list)
    error: str | None = None

    @property
    def times(self) -> list[float]:
        """Each reveal's ``at``, in order."""
        return [r.at for r in self.rows]


def read_reveals(state_dir: Path) -> Reveals:
    """Read, never write, the reveal log (``fedge.agent.guard.RevealLog``): the JSON
    Lines file ``<state_dir>/secagg/revealed.jsonl`` (a header line, then one line per
    update whose unmasking shares this site revealed: its digest, survivors, time
    ``at`` and, where recorded, ``job`` and ``round``; lines without a digest are
    sketches of a compacted log), or, where an agent
    has not yet taken it over, the whole-file ``revealed.json`` of earlier releases.
    Not through ``RevealLog``: opening one may compact or migrate the file, under a
    running agent. A torn last line (a crash mid-append) is dropped as the agent does.
    """
    from fedge.agent.guard import RevealLog, reveal_run_fields

    path = state_dir / "secagg" / "revealed.jsonl"
    old = state_dir / "secagg" / "revealed.json"
    found: dict[str, Reveal] = {}
    try:
        if path.exists():
            data = path.read_bytes()
            lines = data[:data.rfind(b"\n") + 1].decode("utf-8").splitlines()
            if not lines:
                raise ValueError("no header line")
            head = json.loads(lines[0])
            if not isinstance(head, dict) or head.get("format") != RevealLog.FORMAT \
                    or head.get("version") != RevealLog.VERSION:
                raise ValueError(f"line 1 is not a {RevealLog.FORMAT} version "
                                 f"{RevealLog.VERSION} header")
            rows = [json.loads(line) for line in lines[1:]]
        elif old.exists():
            doc = json.loads(old.read_bytes())
            if isinstance(doc, dict) and "moved_to" in doc:
                raise ValueError(f"the log is missing: {old} says it was moved there")
            path, rows = old, doc["entries"]
        else:
            return Reveals(path)
        for number, row in enumerate(rows, start=2):
            if isinstance(row.get("digest"), str):
                try:  # the reveal log's own rule for these fields
                    run = reveal_run_fields(row.get("job"), row.get("round"))
                except ValueError as exc:
                    raise ValueError(f"line {number}: {exc}") from None
                found[row["digest"]] = Reveal(float(row.get("at", 0.0)), run.get("job"),
                                              run.get("round"))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError,
            AttributeError) as exc:
        return Reveals(path, error=f"{exc}")
    return Reveals(path, sorted(found.values(), key=lambda r: r.at))


@dataclass
class Unrecorded:
    """What :func:`_unrecorded` found: ``named``, the reveals that record their job and
    have no released entry of it (and of their round, where recorded); ``unnamed``,
    how many more, at least, among reveals that record no job, and ``among``, the times
    of the reveals those are among."""

    named: list[Reveal] = field(default_factory=list)
    unnamed: int = 0
    among: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.named) + self.unnamed

    @property
    def times(self) -> list[float]:
        """The times of the reveals the unrecorded updates are among."""
        return sorted([r.at for r in self.named] + self.among)


def _unrecorded(ledger: Any, reveals: Reveals) -> Unrecorded:
    """The updates this site revealed under secure aggregation that ``ledger`` did not
    record.

    A released run has one update and so at most one reveal (its digest; the same
    update is summed over one survivor set only), and a release that records every run
    marks the run released before its masked input leaves, so each reveal has a
    released entry of its own. A reveal whose row records its job (and round) takes a
    released entry of that job (and round): one without is named. The other reveals
    (rows of releases that recorded no job) are counted against the released entries
    left, in two periods: before ``complete_since`` against the entries an earlier
    release recorded (``legacy_entries``: DP-SGD runs only), from then on against the
    later ones. Where a period holds more reveals than entries, the excess left
    unrecorded. A lower bound: a released entry whose update was not summed under
    secure aggregation (a plain update, or a site gone before the reveal) hides one
    unrecorded reveal of its period; a plain update without an entry leaves no trace.
    """
    from fedge.train.accounting import RELEASED

    found = Unrecorded()
    if reveals.error is not None or not reveals.rows:
        return found
    entries = list(enumerate(ledger.entries))
    free = {i for i, e in entries if e.get("status", RELEASED) == RELEASED}
    for reveal in reveals.rows:
        if reveal.job is None:
            continue
        match = next((i for i, e in entries if i in free and e["job"] == reveal.job and (
            reveal.round is None or e["round"] == reveal.round)), None)
        if match is None:
            found.named.append(reveal)
        else:
            free.discard(match)
    unnamed = [r.at for r in reveals.rows if r.job is None]
    since = ledger.complete_since
    legacy = ledger.legacy_entries
    periods = ([(unnamed, free)] if since is None else
               [([t for t in unnamed if t < since], {i for i in free if i < legacy}),
                ([t for t in unnamed if t >= since], {i for i in free if i >= legacy})])
    for times, entries_left in periods:
        excess = len(times) - len(entries_left)
        if excess > 0:
            found.unnamed += excess
            found.among += times
    return found


def _runs(reveals: list[Reveal]) -> str:
    """``reveals``' rounds: "round 2", "rounds 1, 3", "round not recorded"."""
    rounds = sorted({r.round for r in reveals if r.round is not None})
    if not rounds:
        return "round not recorded"
    said = f"round{'s' if len(rounds) > 1 else ''} {', '.join(map(str, rounds))}"
    unknown = sum(r.round is None for r in reveals)
    if unknown:
        said += f" and {unknown} whose round was not recorded"
    return said


def _day(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def _when(times: list[float]) -> str:
    known = [t for t in times if t > 0]
    if not known:
        return "at times the log did not keep"
    first, last = _day(min(known)), _day(max(known))
    return f"at {first}" if first == last else f"from {first} to {last}"


def print_privacy(ledger: Any, delta: float, *, reveals: Reveals | None = None) -> None:
    """``fedge agent privacy``'s table: per job and in total, the ε of the released runs
    at ``delta``; pending runs apart; then what the numbers bound.

    A job whose update left without DP has an unbounded ε, and so has the total: said
    plainly, naming the jobs. ε is for replacing one record (DP-SGD, "per record") or
    the site's data (DP-FedAvg, "client-level"), the site's record count being released
    with its updates (fedge.train.accounting's docstring).

    ``reveals``: the reveal log (:func:`read_reveals`). Updates it shows this site
    revealed that the ledger did not record (:func:`_unrecorded`: on an appliance
    upgraded from a release that recorded DP-SGD runs only) get a row of their own,
    unbounded, and make the total unbounded; those whose log rows record their job are
    named with their rounds (a job of the ledger with such a reveal is unbounded too),
    the others counted ("job not recorded in this row"). A ledger started by such a
    release (``legacy``), or reveals older than the ledger (before its
    ``complete_since``, or with no ledger file), gets the plain word
    that runs before the upgrade were recorded only if they used DP-SGD and that plain
    updates sent then cannot be known here, and no claim that every run is counted.
    Without ``reveals`` nothing is cross-checked."""
    from fedge.train.accounting import DP_FEDAVG, DP_SGD, NO_DP

    reveals = reveals if reveals is not None else Reveals(Path())
    jobs = sorted({e["job"] for e in ledger.entries})
    without_dp = ledger.without_dp()
    unrecorded = _unrecorded(ledger, reveals)
    missing = unrecorded.count
    named: dict[str, list[Reveal]] = {}
    for reveal in unrecorded.named:
        named.setdefault(str(reveal.job), []).append(reveal)
    since = ledger.complete_since
    # reveals older than this ledger's complete record: from a release before it
    older = [t for t in reveals.times if since is None or t < since]
    upgraded = ledger.legacy or bool(older)
    legacy_jobs = sorted({e["job"] for e in ledger.entries[:ledger.legacy_entries]})

    def bound(job: str | None = None) -> str:
        released = {e.get("mechanism", DP_SGD) for e in ledger.released(job=job)}
        kinds = released or set(ledger.mechanisms(job=job))
        if job is None and (NO_DP in released or missing):
            said = []
            if without_dp:
                said.append(f"job{'s' if len(without_dp) > 1 else ''} "
                            f"{', '.join(without_dp)} released updates without DP")
            if missing:
                said.append(f"{missing} update{'s' if missing > 1 else ''} of jobs this "
                            "ledger did not record")
            return "; ".join(said)
        if NO_DP in released:
            return "none: exact updates released without DP"
        if kinds == {NO_DP}:
            return "none (nothing released)"
        if not kinds:
            return "nothing released"
        if kinds <= {DP_FEDAVG}:
            kind = "client-level"
        else:
            kind = "per loss term" if ledger.per_loss_term(job=job) else "per record"
        return f"{kind}, recorded before the upgrade" if job in legacy_jobs else kind

    def number(eps: float) -> str:
        return f"{eps:>10.4f}" if eps != float("inf") else f"{'unbounded':>10}"

    # rounds and epsilon count released runs only: an update that left this site (or
    # was about to: the ledger is marked first); a run whose update never left is pending
    print(f"{'job':<40} {'rounds':>6} {'epsilon':>10}  bound")
    for job in jobs:
        rounds = len({e["round"] for e in ledger.released(job=job)})
        eps, said = ledger.epsilon(delta, job=job), bound(job)
        if job in named:  # an update of it left unrecorded: no epsilon bounds the job
            eps, said = math.inf, f"{said}; {_runs(named[job])} revealed, not recorded"
        print(f"{job:<40} {rounds:>6} {number(eps)}  {said}")
    if missing:
        which = "job not known here"
        if named:
            which = f"job{'s' if len(named) > 1 else ''} {', '.join(sorted(named))}"
            if unrecorded.unnamed:
                which += f"; {unrecorded.unnamed} with no job recorded"
        print(f"{'(not recorded in this ledger)':<40} {missing:>6} {number(math.inf)}  "
              f"updates revealed under secure aggregation; {which}")
    total = math.inf if missing else ledger.epsilon(delta)
    print(f"{'total (all jobs composed)':<40} {'':>6} {number(total)}  {bound()}")
    pending = ledger.pending()
    if pending:
        print("pending (trained, never released; not counted in epsilon):")
        for job in sorted({e["job"] for e in pending}):
            runs = ", ".join(f"round {e['round']} attempt {e['attempt']}"
                             for e in sorted(ledger.pending(job=job),
                                             key=lambda e: (e["round"], e["attempt"])))
            print(f"  {job:<38} {runs}")
    if ledger.per_loss_term():
        print("per loss term: DP-SGD on a Cox model (privacy.dp.cox_per_term); a record also "
              "sits in other events' risk sets, so this epsilon is not a record-level bound")
    if DP_FEDAVG in ledger.mechanisms():
        print("client-level: DP-FedAvg (privacy.client_dp); epsilon bounds replacing this "
              "site's whole data in each round's sum (the cohort is public: sensitivity "
              "2 x clip_norm against noise noise_multiplier x clip_norm), so every record "
              "of it too; the total composes it with the record-level runs")
    if without_dp:
        print(f"without DP: {', '.join(without_dp)} released exact updates computed from "
              "this site's records; no epsilon bounds them, so the total is unbounded")
    if missing:
        names = ("The log names no job (the coordinator's jobs of those dates do). "
                 if not named else "")
        print(f"not recorded: this site's secure aggregation reveal log ({reveals.path}) "
              f"shows {len(reveals.times)} updates it revealed, and at least {missing} of "
              f"them, revealed {_when(unrecorded.times)}, have no released run in this "
              "ledger: updates computed from this site's records left it unrecorded. "
              f"{names}No epsilon bounds them, so the total is unbounded"
              + ("; by job, where the log records it:" if named else ""))
        for job in sorted(named):
            print(f"  {job:<38} {_runs(named[job])}, revealed "
                  f"{_when([r.at for r in named[job]])}")
        if named and unrecorded.unnamed:
            n = unrecorded.unnamed
            print(f"  {'(job not recorded in this row)':<38} {n} update{'s' if n > 1 else ''}"
                  f", at least, among the reveals {_when(unrecorded.among)} (the "
                  "coordinator's jobs of those dates name them)")
    if reveals.error is not None:
        print(f"reveal log: {reveals.path} cannot be read ({reveals.error}); updates "
              "this ledger did not record cannot be looked for there")
    if upgraded:
        began = "" if since is None else f"; this ledger records every run since {_day(since)}"
        if ledger.legacy:
            who = ("before the upgrade: this ledger was started by a fedge release that "
                   "recorded a training run only if it used DP-SGD" + began)
        else:
            who = (f"before this ledger: this site revealed {len(older)} update"
                   f"{'s' if len(older) > 1 else ''} under secure aggregation before this "
                   "ledger began (an earlier fedge release recorded a training run only if "
                   "it used DP-SGD, and here it recorded none)" + began)
        print(who + ". Runs before the upgrade without DP-SGD (exact updates, DP-FedAvg) "
              "are not in it: those summed under secure aggregation are counted from the "
              "reveal log above; plain (non-secure) updates sent before the upgrade cannot "
              "be known from this appliance")
    if ledger.legacy_entries:
        print(f"recomputed: epsilon of the {ledger.legacy_entries} entries recorded before "
              "the upgrade is recomputed here for replacing one record (the earlier release "
              "computed it for adding or removing one, with an RDP accountant): the numbers "
              "differ from what it showed:")
        for job in legacy_jobs:
            now, then = ledger.legacy_epsilon(delta, job=job)
            print(f"  {job:<38} {now:.4f} now, {then:.4f} as the earlier release showed")
    claim = ("" if upgraded or reveals.error is not None else
             ". Every training run whose update left this site is counted, with DP or "
             "without")
    print(f"delta = {delta:g}; epsilon is for replacing one record with another (or, "
          "client-level, this site's data), not for adding or removing one: this site's "
          f"record count leaves with its updates{claim}")
