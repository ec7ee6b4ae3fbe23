"""The admin channel, coordinator side: operators' requests over CurveZMQ.

`AdminService` is the logic (no sockets): it maps the operator's CURVE key to a
name and role, refuses what the role may not do, calls the `Coordinator`'s
admin API, publishes console-signed updates and drives roll-outs. `serve_admin`
is the I/O: a ROUTER socket with a CURVE server key whose ZAP handler admits
only operator keys; every reply goes back to the authenticated sender.

Every request, allowed or refused, is written to the coordinator's audit log
with the operator's name.

A software update restarts the agent once staged, so a roll-out's ask of a software
target (``UpdateAvailable``) to a site in the cohort of a round in flight is held back
until that round's attempt ends (committed, failed or cancelled:
``Coordinator.on_round_ended``), then sent at once; the roll-out's status says
"waiting for round N of job J to end" meanwhile, and its deadline counts from the ask
that goes. From the ask to the site's outcome (or the roll-out's end) the site is left
out of new cohorts (``Coordinator.updating``), so its restart falls between rounds: a
round whose ``min_clients`` needs it waits for it in its cohort stage. The wait is
bounded by one round's own deadlines: an ask is never held past the attempt it waits
for, so back-to-back rounds or jobs cannot starve a roll-out. Model and app updates
restart no agent and are never held.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge import __version__
from fedge.console.protocol import (
    AUDIT_DEFAULT_LIMIT,
    AUDIT_MAX_LIMIT,
    AUDIT_SCAN_ENTRIES,
    OPS,
    AdminReply,
    AdminRequest,
)
from fedge.coordinator.service import coordinator_clocks
from fedge.coordinator.store import DISK_ERRNOS, is_locked
from fedge.text import printable
from fedge.update import tuf_repo
from fedge.update.messages import UpdateAvailable, UpdateOutcome
from fedge.update.rollout import Rollout
from fedge.wire.codec import short

log = logging.getLogger("fedge.coordinator.admin")

ADMIN_ACTOR = "operator"
ADMIN_ZAP_DOMAIN = "fedge-admin"
TIMESTAMP_CHECK_S = 60.0
# ``audit``'s details in one reply, at most: JSON may escape a byte into six, and the
# reply must stay under ADMIN_MAX_BYTES
AUDIT_REPLY_BYTES = 32 << 20
# ops that only read: not audited themselves (an operator's reads would bury the rest)
READ_OPS = frozenset({"fleet", "jobs_list", "jobs_status", "rollout_status", "whoami",
                      "update_versions", "audit"})
# what fedge.coordinator.process records of an ended job's export and report, each
# attempt (finish_job, again at a restart: job_finish_resumed); report.md comes last.
# model_export_skipped: an export given up on (export_given_up) was not tried again.
FINISH_ACTIONS = ("job_finish_resumed", "model_exported", "model_export_kept",
                  "model_export_failed", "model_export_skipped", "report_written",
                  "report_failed")
EXPORT_OUTCOMES = ("model_exported", "model_export_kept", "model_export_failed")
REPORT_FILES = ("report.json", "report.md")
# a recorded failure's reason, at most, in a fetch's note
FINISH_REASON_CHARS = 300


@dataclass(frozen=True)
class Operator:
    name: str
    role: str


@dataclass(frozen=True)
class AdminConfig:
    endpoint: str
    server_public_key: str  # z85
    server_secret_key: str = field(repr=False)  # z85
    operators: dict[str, Operator] = field(default_factory=dict)  # z85 public key -> operator
    # the console's provision data: lets serve_admin set up the TUF relay on first start
    provision: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_provision(cls, provision: Path | dict[str, Any], endpoint: str) -> AdminConfig:
        """Build from the console's coordinator-provision.json.

        Raises:
            ValueError: the file is not a provision file or lacks a field (named).
        """
        doc = provision if isinstance(provision, dict) else json.loads(Path(provision)
                                                                       .read_text())
        try:
            ops = {k: Operator(v["name"], v["role"]) for k, v in doc["operators"].items()}
            return cls(endpoint, doc["curve_public"], doc["curve_secret"], ops, dict(doc))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"provision file lacks {exc}") from exc


class AdminService:
    """Admin logic over a `fedge.coordinator.service.Coordinator`.

    ``clock`` measures the roll-outs' deadlines and re-asks and the TUF timestamp's
    check interval: it must never step, ``time.monotonic`` by default. ``wall`` dates
    a roll-out's ask in its saved state, so a restarted coordinator counts the
    downtime against the deadline (fedge.update.rollout): ``time.time`` by default,
    or ``clock`` itself when only ``clock`` is given (a test's one fake clock).
    """

    def __init__(self, coordinator: Any, operators: dict[str, Operator], *,
                 updates: Any | None = None,
                 send: Callable[[str, Any], None] | None = None,
                 clock: Callable[[], float] | None = None,
                 wall: Callable[[], float] | None = None) -> None:
        clock, wall = coordinator_clocks(clock, wall)
        self.coordinator = coordinator
        self.operators = dict(operators)
        self.updates = updates
        self.clock: Callable[[], float] = clock
        self.wall: Callable[[], float] = wall
        self._send = send or self._outbox_send
        # Roll-outs live in the coordinator's database: a restarted coordinator answers
        # for finished ones and goes on with the one in flight (an outcome reported
        # after the restart advances it; its deadline kept running meanwhile, by the
        # wall clock: the saved time of its ask is one).
        self.rollouts: dict[str, Rollout] = {}
        now, wall_now = self.clock(), self.wall()
        for saved in coordinator.store.rollouts():
            try:
                rollout = Rollout.from_state(saved, now=now, wall=wall_now)
            except ValueError as exc:
                log.error("a saved roll-out cannot be resumed: %s", exc)
                continue
            self.rollouts[rollout.rollout_id] = rollout
        self._last_refresh = float("-inf")
        # (roll-out id, site) -> (the ask held back, why): AdminService docstring
        self.held: dict[tuple[str, str], tuple[UpdateAvailable, str]] = {}
        self._sync_updating()

    # -- asks held back while a site is in a round ---------------------------------------
    def _deliver(self, rollout: Rollout, site: str, msg: UpdateAvailable) -> bool:
        """Send ``msg``, or hold it while ``site`` is in a round in flight and the update
        restarts its agent (module docstring). Returns whether it went."""
        busy = self._round_holding(site) if restarts_agent(rollout.path) else None
        if busy is None:
            self._send(site, msg)
            return True
        key = (rollout.rollout_id, site)
        if key not in self.held:
            log.info("roll-out %s: %s is in %s; its update (%s) is sent when that round "
                     "ends", rollout.rollout_id, site, busy, rollout.path)
            self._audit("coordinator", "update.held", {
                "rollout_id": rollout.rollout_id, "site": site, "path": rollout.path,
                "until": f"{busy} ends"})
        self.held[key] = (msg, busy)
        return False

    def _round_holding(self, site: str) -> str | None:
        holding = getattr(self.coordinator, "round_holding", None)
        return holding(site) if holding is not None else None

    def on_round_ended(self) -> None:
        """A round's attempt ended: send the asks held for its sites now, before the
        next round forms its cohort (which then leaves them out). Never raises."""
        try:
            self._release()
        except Exception:  # a roll-out's bookkeeping must not take the round driver down
            log.exception("sending held roll-out asks failed")

    def _release(self) -> None:
        for key, (msg, _) in list(self.held.items()):
            rid, site = key
            rollout = self.rollouts.get(rid)
            if rollout is None or rollout.done or rollout.waiting_for != site:
                del self.held[key]
                continue
            busy = self._round_holding(site)
            if busy is not None:
                self.held[key] = (msg, busy)
                continue
            del self.held[key]
            # its deadline counts from the ask that goes, not the one held back
            rebased = Rollout.from_state({**rollout.to_state(), "waiting_since": self.wall()},
                                         now=self.clock(), wall=self.wall())
            self.rollouts[rid] = rebased
            self._save(rebased)
            self._send(site, msg)
            self._audit("coordinator", "update.released", {
                "rollout_id": rid, "site": site, "path": rebased.path})
            log.info("roll-out %s: %s's round ended; its update (%s) is sent now", rid,
                     site, rebased.path)
        self._sync_updating()

    def _sync_updating(self) -> None:
        """Tell the coordinator which sites install a software update now (asked, no
        outcome yet): left out of new cohorts until then (module docstring)."""
        updating = {}
        for rollout in self.rollouts.values():
            site = rollout.waiting_for
            if site is None or not restarts_agent(rollout.path) \
                    or (rollout.rollout_id, site) in self.held:
                continue
            updating[site] = (f"installing software update {rollout.path} (roll-out "
                              f"{rollout.rollout_id}); left out of new rounds until it "
                              "reports the outcome")
        if hasattr(self.coordinator, "updating"):
            self.coordinator.updating = updating

    def rollout_view(self, rollout: Rollout) -> dict[str, Any]:
        """What ``push`` and ``rollout_status`` answer: the roll-out, and while its ask
        is held back, ``held``: "waiting for round N of job J to end before asking
        SITE"."""
        out: dict[str, Any] = dict(rollout.to_dict())
        site = rollout.waiting_for
        held = self.held.get((rollout.rollout_id, site)) if site is not None else None
        if held is not None:
            out["held"] = f"waiting for {held[1]} to end before asking {site}"
        return out

    def _outbox_send(self, site: str, body: Any) -> None:
        from fedge.coordinator.service import Outgoing

        self.coordinator.outbox.append(Outgoing(site, body))

    def _audit(self, who: Operator | str | None, action: str, detail: Any, *,
               locked_raises: bool = False) -> None:
        """`who`: an operator (actor "operator:NAME"), or a site / "coordinator" as is.

        Raises: sqlite3.OperationalError: only with `locked_raises`, when the database
            is locked by another process (the caller hands its message back)."""
        if isinstance(who, str):
            actor = who
        else:
            actor = f"{ADMIN_ACTOR}:{who.name}" if who else f"{ADMIN_ACTOR}:unknown"
        try:
            self.coordinator.store.audit(actor, action, detail)
        except sqlite3.OperationalError as exc:
            if locked_raises and is_locked(exc):
                raise
            log.exception("audit failed")
        except Exception:  # auditing must not take the channel down
            log.exception("audit failed")

    # -- requests -----------------------------------------------------------------------
    def handle(self, operator_key: str, req: Any) -> AdminReply:
        """Answer one request. Never raises: errors become replies naming the problem."""
        op = self.operators.get(operator_key)
        if op is None:
            self._audit(None, "admin.denied", {"key": operator_key, "reason": "unknown key"})
            return _error("unknown operator key")
        if not isinstance(req, AdminRequest):
            return _error(f"expected an admin request, got {type(req).__name__}")
        allowed = OPS.get(req.op)
        if allowed is None:  # the op is the operator's string, of any length: cut it
            return _error(f"unknown op {short(req.op)} (known: {', '.join(sorted(OPS))})")
        if op.role not in allowed:
            self._audit(op, "admin.denied", {"op": req.op, "role": op.role})
            return _error(f"operator {op.name!r} has role {op.role!r}; {req.op!r} needs "
                          f"role {' or '.join(sorted(allowed))}")
        try:
            args = json.loads(req.args_json or "{}")
            if not isinstance(args, dict):
                raise ValueError("args must be a JSON object")
        except (ValueError, RecursionError) as exc:
            return _error(f"{req.op}: bad arguments: {exc}")
        try:
            result, blobs = getattr(self, f"_op_{req.op}")(op, args, dict(req.blobs))
        except (KeyError, TypeError) as exc:
            return _error(f"{req.op}: missing or wrong argument: {exc}")
        except Exception as exc:  # CoordinatorError, StoreError, PlanError, ValueError ...
            self._audit(op, f"admin.{req.op}.failed", {"error": str(exc)})
            return _error(f"{req.op}: {exc}")
        if req.op not in READ_OPS and not _pending_only(req.op, result):
            self._audit(op, f"admin.{req.op}", {k: v for k, v in args.items() if k != "plan"})
        return AdminReply(True, json.dumps(result, default=str), "", blobs)

    def _op_whoami(self, op: Operator, args: dict, blobs: dict) -> tuple[Any, dict]:
        return {"name": op.name, "role": op.role}, {}

    def _op_audit(self, op: Operator, args: dict, blobs: dict) -> tuple[Any, dict]:
        """The newest ``limit`` audit entries that match, oldest first, each with its
        detail parsed when it is JSON. Arguments (all optional): ``action`` (a name, a
        comma list or a list of them), ``job``, ``site`` (its own entries and those
        about it), ``actor`` (exactly), ``since`` (a Unix time, or text
        `fedge.console.audit.parse_since` reads), ``limit`` (1..AUDIT_MAX_LIMIT).

        Only the newest AUDIT_SCAN_ENTRIES entries are looked at: the query runs on
        the event loop. The reply says whether more matched (``more``) and whether
        older entries were left unread (``older_unread``: `fedge coordinator audit` on
        the coordinator host reads them all).

        Raises: ValueError naming the argument and its value."""
        from fedge.console.audit import parse_detail, parse_since, split_actions

        actions = args.get("action")
        if actions is not None and not isinstance(actions, str) and not (
                isinstance(actions, list) and all(isinstance(a, str) for a in actions)):
            raise ValueError(f"action {short(actions)} is not a name or a list of names")
        actions = split_actions(actions)
        filters: dict[str, str | None] = {}
        for name in ("job", "site", "actor"):
            value = args.get(name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} {short(value)} is not text")
            filters[name] = value
        since = args.get("since")
        if isinstance(since, str):
            since = parse_since(since)
        elif since is not None and (isinstance(since, bool)
                                    or not isinstance(since, int | float)):
            raise ValueError(f"since {short(since)} is not a Unix time or an ISO time")
        limit = args.get("limit", AUDIT_DEFAULT_LIMIT)
        if isinstance(limit, bool) or not isinstance(limit, int) \
                or not 1 <= limit <= AUDIT_MAX_LIMIT:
            raise ValueError(f"limit {short(limit)} is not a whole number from 1 to "
                             f"{AUDIT_MAX_LIMIT}")
        store = self.coordinator.store
        rows = store.audit_log(actions=actions, since=since, limit=limit + 1,
                               scan=AUDIT_SCAN_ENTRIES, **filters)
        more = len(rows) > limit
        rows = rows[1:] if more else rows
        size = 0
        for keep in range(len(rows) - 1, -1, -1):  # the newest first, to the byte budget
            size += len(rows[keep]["detail"]) + len(rows[keep]["actor"]) + 64
            if size > AUDIT_REPLY_BYTES:
                rows, more = rows[keep + 1:], True
                break
        span = store.audit_id_span()
        older_unread = span is not None and span[0] <= span[1] - AUDIT_SCAN_ENTRIES
        return {"entries": [{**r, "detail": parse_detail(r["detail"])} for r in rows],
                "more": more, "older_unread": older_unread,
                "looked_at": AUDIT_SCAN_ENTRIES}, {}

    def _op_update_versions(self, op: Operator, args: dict, blobs: dict) -> tuple[Any, dict]:
        """The TUF metadata versions this coordinator relays (root, targets, ...)."""
        if self.updates is None:
            raise ValueError("this coordinator has no update repository (not provisioned)")
        return self.updates.versions, {}

    def _op_fleet(self, op: Operator, args: dict, blobs: dict) -> tuple[Any, dict]:
        return self.coordinator.fleet(), {}

    def _op_jobs_list(self, op: Operator, args: dict, blobs: dict) -> tuple[Any, dict]:
        return self.coordinator.list_jobs(), {}

    def _op_jobs_status(self, op: Operator, args: dict, blobs: dict) -> tuple[Any, dict]:
        """The Coordinator's job_status; for an ended job whose ONNX export failed (and
        is not there since), ``onnx_export``: ``{"failed": why, "retry": what gets it
        done}`` (the same words as ``jobs fetch``'s note)."""
        job_id = str(args["job_id"])
        status = self.coordinator.job_status(job_id)
        failure = onnx_export_failure(self.coordinator, job_id, status)
        if failure is not None:
            status = {**status, "onnx_export": failure}
        return status, {}

    def _op_jobs_submit(self, op: Operator, args: dict, blobs: dict) -> tuple[Any, dict]:
        """``{"job_id", "warnings"}``: what the operator should know about the job
        queued (Coordinator.submit_job), each a sentence; [] when nothing."""
        warnings: list[str] = []
        job_id = self.coordinator.submit_job(str(args["plan"]),
                                             actor=f"{ADMIN_ACTOR}:{op.name}",
                                             warnings=warnings)
        return {"job_id": job_id, "warnings": warnings}, {}

    def _op_jobs_cancel(self, op: Operator, args: dict, blobs: dict) -> tuple[Any, dict]:
        self.coordinator.cancel_job(str(args["job_id"]), actor=f"{ADMIN_ACTOR}:{op.name}")
        return {"job_id": args["job_id"], "status": "cancelled"}, {}

    def _op_jobs_fetch(self, op: Operator, args: dict, blobs: dict) -> tuple[Any, dict]:
        job_id = str(args["job_id"])
        status = self.coordinator.job_status(job_id)  # raises for an unknown job
        from fedge.coordinator import checkpoint as ck

        jdir = ck.job_dir(self.coordinator.state_dir, job_id)
        out = {name: (jdir / name).read_bytes()
               for name in ck.results(self.coordinator.state_dir, job_id)}
        state = status.get("status")
        committed = int(status.get("committed_round") or 0)
        planned = status.get("rounds_planned")
        ended = state in ("cancelled", "failed")
        error = f" ({status['error']})" if status.get("error") else ""
        if not out:
            if committed and not jdir.exists():  # the operator removed it (README.Debian)
                raise ValueError(
                    f"job {job_id} ({state}) has no results any more: its directory "
                    f"{jdir} was removed from the coordinator")
            if ended and committed == 0:  # nothing was ever committed: nothing to give
                raise ValueError(
                    f"job {job_id} ({state}) has no results and will not have any: it "
                    f"{'was cancelled' if state == 'cancelled' else 'failed'} before any "
                    f"round was committed{error}")
            if ended:  # the coordinator writes them when the job ends (Coordinator docs)
                raise ValueError(
                    f"job {job_id} ({state} after round {committed} of {planned}) has no "
                    "results yet: its last committed model and report are being written "
                    "(if they never come, the coordinator's audit log says why)")
            raise ValueError(f"job {job_id} ({state}) has no results yet")
        finishing = state == "completed" or (ended and committed > 0)
        report_failed = export_failed = ""
        if finishing:
            report_failed, export_failed = self._finish_failures(job_id)
        writing: list[str] = []
        if finishing and "report.md" not in out and not report_failed:
            # the coordinator exports the model and writes the report after it marks
            # the job ended (fedge.coordinator.process finish_job), report.md last
            writing = [n for n in (*(() if export_failed else ("model.onnx",)),
                                   *REPORT_FILES) if n not in out]
            if args.get("pending_ok"):  # a console that waits, then asks again
                return {"job_id": job_id, "status": state, "pending": writing}, {}
        result: dict[str, Any] = {"job_id": job_id, "files": sorted(out), "status": state,
                                  "committed_round": committed, "rounds_planned": planned}
        onnx = "" if "model.onnx" in out or "model.onnx" in writing else (
            f"; no ONNX export: it failed ({export_failed}); "
            f"{self._export_retry(job_id, export_failed)}" if export_failed
            else "; no ONNX export (not written, or not yet: fetch again later)")
        notes = []
        if ended:
            notes.append(
                f"job {job_id} {state} after {committed} of {planned} round(s){error}: "
                f"this is a {state} job's last committed model (round {committed}) and its "
                f"report, not a finished training{onnx}")
        elif finishing and (onnx or report_failed or writing):
            notes.append(f"job {job_id} completed{onnx}")
        if writing:
            result["still_writing"] = writing  # the console exits non-zero
            notes.append(
                f"its results are still being written ({', '.join(writing)} not yet): "
                f"fetch again in a few seconds (`fedge console jobs watch {job_id}` says "
                "when they are ready; if they never come, the coordinator's audit log "
                "says why)")
        if report_failed:
            notes.append(f"its report could not be written ({report_failed}); a restart "
                         "of the coordinator tries again")
        if notes:
            result["note"] = "; ".join(notes)
        return result, out

    def _export_retry(self, job_id: str, reason: str) -> str:
        return export_retry(self.coordinator, job_id, reason)

    def _finish_failures(self, job_id: str) -> tuple[str, str]:
        return finish_failures(self.coordinator, job_id)

    def _op_enrol(self, op: Operator, args: dict, blobs: dict) -> tuple[Any, dict]:
        """Put a site's CURVE key on the allow-list. An operator key alone is not
        enough: the request carries the console-signed roster naming the site with
        this identity (no older than the one in force) and the site's enrolment grant,
        signed with the same roster key, binding the CURVE key to the site and
        identity (`ConsoleStore.enrol_request`). An enrolled site is not re-keyed:
        it is revoked first (`fedge console revoke`, then `enrol`)."""
        site = str(args["site"])
        curve_public = str(args["curve_public"])
        ed25519_hex = str(args["ed25519_public"])
        known = {a["site_id"]: a for a in self.coordinator.fleet()}.get(site)
        if known and known.get("status") == "revoked" and known.get(
                "curve_public_z85") == curve_public:
            raise ValueError(f"site {site!r} was revoked with this CURVE key; a revoked "
                             "identity cannot rejoin — enrol it with a new identity")
        if known and known.get("status") == "enrolled" and known.get(
                "curve_public_z85") != curve_public:
            self._audit(op, "admin.enrol.rekey_refused", {
                "site": site, "curve_public": curve_public,
                "enrolled_curve_public": known.get("curve_public_z85")})
            raise ValueError(f"site {site!r} is enrolled with another CURVE key "
                             f"({known.get('curve_public_z85')}); a site is not re-keyed "
                             "while enrolled: revoke it first (`fedge console revoke "
                             f"{site}`, then `fedge console enrol {site}`)")
        self._check_console_vouches(site, curve_public, ed25519_hex, blobs)
        self.coordinator.enrol(site, curve_public, bytes.fromhex(ed25519_hex),
                               actor=f"{ADMIN_ACTOR}:{op.name}")
        if "roster" in blobs:
            self.coordinator.set_roster(blobs["roster"], actor=f"{ADMIN_ACTOR}:{op.name}")
        return {"site": site, "status": "enrolled"}, {}

    def _check_console_vouches(self, site: str, curve_public: str, ed25519_hex: str,
                               blobs: dict) -> None:
        """Raises: ValueError: the roster or the grant is missing, does not verify
        under the console's roster key, or does not name this site with these keys;
        or the roster is older than the one in force (an old roster that still named
        a revoked identity). A coordinator not given the roster key checks nothing."""
        from fedge.console.store import ENROL_GRANT, check_enrol_grant
        from fedge.secagg.keys import Roster

        key = self.coordinator.roster_public_key
        if not key:
            return
        missing = [b for b in ("roster", ENROL_GRANT) if b not in blobs]
        if missing:
            raise ValueError(f"site {site!r} is enrolled only with the console's signed "
                             f"roster and enrolment grant ({', '.join(missing)} missing): "
                             "an operator key alone cannot enrol a key; use `fedge console "
                             "enrol` or `fedge console sync` of this coordinator's release "
                             f"({__version__}) or later: a console of an earlier release "
                             "sends no grant (upgrade it, then `fedge console sync` sends "
                             "the sites it enrolled meanwhile)")
        roster = Roster.from_bytes(blobs["roster"], key)  # RosterSignatureError: ValueError
        if roster.entries.get(site, b"").hex() != ed25519_hex.lower():
            raise ValueError(f"the console-signed roster (serial {roster.serial}) does not "
                             f"name site {site!r} with identity {ed25519_hex[:16]}…")
        if self.coordinator.roster:
            held = Roster.from_bytes(self.coordinator.roster, key).serial
            if roster.serial < held:
                raise ValueError(f"roster serial {roster.serial} is older than the one in "
                                 f"force ({held}); refused")
        grant = check_enrol_grant(blobs[ENROL_GRANT], key)
        wanted = {"site": site, "curve_public": curve_public,
                  "ed25519_public": ed25519_hex.lower()}
        if grant != wanted:
            raise ValueError(f"the console's enrolment grant names site {grant['site']!r} "
                             f"with CURVE key {grant['curve_public']}, not site {site!r} with "
                             f"{curve_public}")

    def _op_revoke(self, op: Operator, args: dict, blobs: dict) -> tuple[Any, dict]:
        """Revoke any site the coordinator lists (the console may not have enrolled
        it: a copy of its home did), then install the roster sent with it. A roster
        older than the one in force (which a copy of the console's roster key signed)
        does not undo the revocation: the reply says it was refused, and the serial in
        force (``roster_serial``), so the console can send one numbered above it."""
        site = str(args["site"])
        self.coordinator.revoke(site, actor=f"{ADMIN_ACTOR}:{op.name}")
        result: dict[str, Any] = {"site": site, "status": "revoked"}
        if "roster" in blobs:
            try:
                self.coordinator.set_roster(blobs["roster"],
                                            actor=f"{ADMIN_ACTOR}:{op.name}")
            except ValueError as exc:
                result["roster_refused"] = str(exc)
                result["roster_serial"] = self._roster_serial()
        return result, {}

    def _op_ledger_ack(self, op: Operator, args: dict, blobs: dict) -> tuple[Any, dict]:
        """Accept the lower released-run count of a site whose privacy ledger was rolled
        back (fedge.coordinator.cohort): it may join cohorts again. Audited with the
        operator's name (``privacy_ledger_accepted``)."""
        return self.coordinator.ledger_ack(str(args["site"]),
                                           actor=f"{ADMIN_ACTOR}:{op.name}"), {}

    def _roster_serial(self) -> int | None:
        """The serial of the roster in force, if there is one and it verifies."""
        from fedge.secagg.keys import Roster

        key, held = self.coordinator.roster_public_key, self.coordinator.roster
        if not key or not held:
            return None
        try:
            return Roster.from_bytes(held, key).serial
        except ValueError:
            return None

    def _op_push(self, op: Operator, args: dict, blobs: dict) -> tuple[Any, dict]:
        if self.updates is None:
            raise ValueError("this coordinator has no update repository (not provisioned)")
        targets = blobs.pop("targets.json")
        root = blobs.pop("root.json", None)
        path = str(args["path"])
        # everything checked before anything is published
        listed = tuf_repo.load(targets, "targets").signed.targets
        if path not in listed:
            raise ValueError(f"target {path!r} is not in the signed targets")
        _check_newest(tuf_repo.TargetSpec.from_target_file(listed[path]), listed)
        fleet = {a["site_id"]: a for a in self.coordinator.fleet()}
        sites = [str(s) for s in (args.get("sites") or self._default_sites())]
        for site in sites:
            if fleet.get(site, {}).get("status") != "enrolled":
                raise ValueError(f"site {site!r} is not an enrolled appliance")
        canary = args.get("canary")
        if canary:
            if canary not in sites:
                raise ValueError(f"canary {canary!r} is not among the sites {sites}")
            sites = [canary, *[s for s in sites if s != canary]]
        if not sites:
            raise ValueError("no connected, enrolled appliance to roll out to")
        # The roll-out checks its deadline and sites as it is made: made before the
        # publish, a refused push publishes nothing. Published first, the coordinator
        # held a targets version the console (told "refused") never saved, and every
        # later push was refused as a rollback.
        try:
            deadline_s = float(args.get("deadline_s", 300.0))
        except (TypeError, ValueError):
            raise ValueError(f"deadline_s {args.get('deadline_s')!r} is not a number of "
                             "seconds") from None
        rollout = Rollout(f"rollout-{secrets.token_hex(4)}", path, list(sites),
                          deadline_s=deadline_s)
        snapshot = self.updates.publish(targets, blobs, root=root)
        self.rollouts[rollout.rollout_id] = rollout
        sends = rollout.start(self.clock(), self.wall())
        self._save(rollout)
        for site, msg in sends:
            self._deliver(rollout, site, msg)
        self._sync_updating()
        self._audit(op, "update.rollout_started", {**rollout.to_dict(), "snapshot": snapshot})
        return self.rollout_view(rollout), {}

    def _op_rotate_online_keys(self, op: Operator, args: dict, blobs: dict
                               ) -> tuple[Any, dict]:
        if self.updates is None:
            raise ValueError("this coordinator has no update repository (not provisioned)")
        from cryptography.hazmat.primitives import serialization

        keys = []
        for role in ("snapshot", "timestamp"):
            key = serialization.load_pem_private_key(blobs[f"{role}.pem"], password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"the {role} key is not Ed25519")
            keys.append(key)
        self.updates.rotate_online_keys(blobs["root.json"], keys[0], keys[1])
        return self.updates.versions, {}

    def _op_rotate_offline_keys(self, op: Operator, args: dict, blobs: dict
                                ) -> tuple[Any, dict]:
        """Root N+1 naming new offline keys, with the targets re-signed under them;
        the relay checks both as it does any rotated root (signed by root N and N+1)."""
        if self.updates is None:
            raise ValueError("this coordinator has no update repository (not provisioned)")
        self.updates.publish(blobs["targets.json"], {}, root=blobs["root.json"])
        return self.updates.versions, {}

    def _default_sites(self) -> list[str]:
        return sorted(a["site_id"] for a in self.coordinator.fleet()
                      if a.get("status") == "enrolled" and a.get("connected"))

    def _op_rollout_status(self, op: Operator, args: dict, blobs: dict) -> tuple[Any, dict]:
        rid = str(args["rollout_id"])
        if rid not in self.rollouts:
            raise ValueError(f"unknown roll-out {rid!r}")
        return self.rollout_view(self.rollouts[rid]), {}

    def _save(self, rollout: Rollout) -> None:
        try:
            self.coordinator.store.save_rollout(rollout.rollout_id, rollout.to_state())
        except Exception:  # the roll-out goes on in memory; a restart would lose it
            log.exception("cannot save roll-out %s", rollout.rollout_id)

    # -- agents' outcomes and the clock -------------------------------------------------
    def on_outcome(self, site: str, outcome: UpdateOutcome) -> None:
        """An agent reported an install outcome: record it, advance its roll-out.

        Raises: sqlite3.OperationalError: the database is locked by another process,
            before anything was done (the coordinator hands the message back, to be
            handled again: the outcome's audit row is not lost)."""
        detail = {"site": site, "path": outcome.path, "ok": outcome.ok,
                  "rolled_back": outcome.rolled_back, "detail": outcome.detail}
        self._audit(site, "update.outcome", detail, locked_raises=True)
        rollout = self.rollouts.get(outcome.rollout_id)
        if rollout is None:
            return
        was = rollout.to_state()
        sends = rollout.receive(site, outcome, self.clock(), self.wall())
        if rollout.to_state() != was:
            self._save(rollout)
        for to, msg in sends:
            self._deliver(rollout, to, msg)
        self._sync_updating()
        if rollout.done and rollout.to_state() != was:
            self._audit("coordinator", f"update.rollout_{rollout.state}", rollout.to_dict())

    def on_site_returned(self, site: str) -> None:
        """``site`` reconnected (or is first seen since this process started): ask it
        again for each roll-out waiting on it, since its outcome may have been lost."""
        for rollout in self.rollouts.values():
            self._reask(rollout, rollout.reask(site, self.clock()), "reconnected")

    def _reask(self, rollout: Rollout, sends: list[tuple[str, UpdateAvailable]],
               why: str) -> None:
        for to, msg in sends:
            if self._deliver(rollout, to, msg):
                self._audit("coordinator", "update.reasked", {
                    "rollout_id": rollout.rollout_id, "site": to, "path": msg.path,
                    "why": why})

    def tick(self) -> None:
        """Roll-out deadlines; and keep the TUF timestamp fresh (once a minute)."""
        now = self.clock()
        if self.updates is not None and now - self._last_refresh >= TIMESTAMP_CHECK_S:
            self._last_refresh = now
            try:
                if self.updates.refresh_timestamp():
                    self._audit("coordinator", "update.timestamp_resigned",
                                self.updates.versions)
            except Exception:
                log.exception("cannot re-sign the TUF timestamp")
        self._release()  # a round that ended without telling (a safety net)
        for rollout in list(self.rollouts.values()):
            if (rollout.rollout_id, rollout.waiting_for) in self.held:
                continue  # not asked yet: its deadline counts from the ask that goes
            was = rollout.state
            rollout.tick(now)
            if rollout.state != was:
                self._save(rollout)
                self._audit("coordinator", f"update.rollout_{rollout.state}",
                            rollout.to_dict())
            self._reask(rollout, rollout.due(now),
                        f"no outcome {rollout.reask_interval_s:g} s after the last ask")
        self._sync_updating()


def restarts_agent(path: str) -> bool:
    """Whether installing the target at ``path`` (fedge.update.tuf_repo.target_path:
    "KIND/NAME/VERSION/FILE") restarts the agent: a software update does."""
    return path.split("/", 1)[0] == "software"


def _provision_updates(coordinator: Any, service: AdminService, provision: dict[str, Any]
                       ) -> None:
    """First start with a provision file: create (or open) the TUF relay and route
    the agents' fetches to it."""
    from fedge.coordinator.updates import UpdateRepository

    try:
        repo = UpdateRepository.from_provision(coordinator.state_dir, provision)
    except Exception:  # a broken TUF store must not take the admin channel down
        log.exception("update relay not available")
        return
    service.updates = repo
    coordinator.updates = repo
    if getattr(coordinator, "update_handler", None) is None:
        coordinator.update_handler = repo.handle_fetch
    log.info("update relay ready: %s", repo.versions)


def _check_newest(spec: tuf_repo.TargetSpec, listed: dict[str, Any]) -> None:
    """Refuse to roll out `spec` unless it is the newest signed version of its name.

    The console signs only the newest version of each name, but targets metadata
    signed by an earlier console lists every version it signed, and a push needs
    only an admin operator key (not the offline targets key): without this, that key
    alone could roll the fleet back to an older signed version.

    Raises: ValueError naming the target, its version and the newer (or same) one.
    """
    mine = tuf_repo.version_key(spec.version)
    for other_path, tf in sorted(listed.items()):
        if other_path == spec.path:
            continue
        try:
            other = tuf_repo.TargetSpec.from_target_file(tf)
        except ValueError:
            continue  # not a fedge target: nothing to compare
        if (other.kind, other.name) != (spec.kind, spec.name):
            continue
        if tuf_repo.version_key(other.version) >= mine:
            raise ValueError(
                f"target {spec.path!r} is {spec.kind} {spec.name} {spec.version}, but the "
                f"signed targets also list {other.version} ({other_path!r}): only the newest "
                "version of a target is rolled out (an older one would roll appliances back)")


def _pending_only(op: str, result: Any) -> bool:
    """A ``jobs_fetch`` answered "still being written" to a console that waits: it gave
    nothing, and the console asks again each second, so it is not audited (as reads
    are not); the fetch that hands the files over is."""
    return op == "jobs_fetch" and isinstance(result, dict) and "pending" in result


def _error(message: str) -> AdminReply:
    return AdminReply(False, "null", message, {})


async def _answer(sock: Any, service: AdminService, frames: list[Any], codec: Any) -> None:
    """Decode one request, handle it, send the reply. Whatever fails on the way is
    logged and, where a reply can still be made, answered with an error: one
    operator's request, however odd, must not end the channel for everyone."""
    ident = frames[0].bytes
    try:
        rest = frames[1:]
        user = rest[0].get("User-Id") if rest else ""
        try:
            env = codec.decode([f.bytes for f in rest], max_bytes=256 << 20)
            reply = service.handle(user, env.body)
        except codec.WireError as exc:
            reply = _error(f"malformed request: {exc}")
        try:
            out = codec.encode(reply, sender="coordinator")
        except codec.WireError as exc:  # e.g. a reply past AdminReply's size limit
            log.error("the reply to %s cannot be encoded: %s", user, exc)
            out = codec.encode(_error(f"the reply cannot be sent: {exc}"),
                               sender="coordinator")
        await sock.send_multipart([ident, *out])
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("an admin request could not be answered; dropped")


#: What a recorded export failure (`fedge export`'s last line on stderr, or the
#: coordinator's own words) holds when its cause may pass, so that the export tried
#: again at the next start can succeed: an OSError (the disk full, over quota,
#: read-only or failing), memory (a MemoryError; the OOM killer leaves no output), the
#: time it was given.
EXPORT_PASSING_CAUSES = (
    *(os.strerror(e) for e in sorted((*DISK_ERRNOS, errno.ENOMEM))),
    "OSError", "[Errno", "MemoryError", "timed out after", "no output",
)


def export_may_pass(reason: str) -> bool:
    """Whether a recorded export failure's cause may pass (EXPORT_PASSING_CAUSES)."""
    return any(cause in reason for cause in EXPORT_PASSING_CAUSES)


def export_retry(coordinator: Any, job_id: str, reason: str) -> str:
    """What gets a failed export done: the coordinator's next start tries it again,
    which helps where the cause may pass (`export_may_pass`: the disk, memory);
    otherwise it fails the same way (a diverged model's NaN weights, which the
    parity check refuses), and `fedge export` (fedge.serve.cli: the job's final
    checkpoint to jobs/<job>/model.onnx, with the same parity check) is run by hand
    once the cause is fixed. An export that failed the same way EXPORT_GIVE_UP_AFTER
    times (`export_given_up`) is not tried again at a start: by hand only."""
    by_hand = (f"fix the cause, then run `fedge export --job {job_id} --state-dir "
               f"{coordinator.state_dir}` on the coordinator's host, which writes "
               "the job's model.onnx")
    job = coordinator.store.job(job_id)
    given_up = export_given_up(coordinator.store, job_id, job.final_digest)
    if given_up:
        return (f"it failed {given_up[1]} times the same way for this model, so the "
                f"coordinator no longer tries it at its start: {by_hand}")
    if export_may_pass(reason):
        return ("a restart of the coordinator tries it again (and writes the report "
                "again after it)")
    return ("a restart of the coordinator tries it again, which helps only where the "
            f"disk or memory was the cause: {by_hand}")


def finish_failures(coordinator: Any, job_id: str) -> tuple[str, str]:
    """Why the report and why the ONNX export of an ended job failed, as the
    coordinator recorded (fedge.coordinator.process: ``report_failed``,
    ``model_export_failed``); "" for each that has not failed since it was last
    tried (a restart tries an unfinished job again: ``job_finish_resumed``)."""
    from fedge.console.audit import parse_detail

    rows = coordinator.store.audit_log(actions=FINISH_ACTIONS, job=job_id, limit=50)
    report = export = ""
    for row in rows:  # oldest first: the last word on each stands
        action = row["action"]
        detail = parse_detail(row["detail"])
        reason = "" if action not in ("report_failed", "model_export_failed",
                                      "model_export_skipped") else (
            printable(detail.get("reason") if isinstance(detail, dict) else detail)
            or "no reason recorded")[:FINISH_REASON_CHARS]
        if action in ("report_failed", "report_written", "job_finish_resumed"):
            report = reason
        if action in ("model_export_failed", "model_export_skipped", "model_exported",
                      "model_export_kept", "job_finish_resumed"):
            export = reason
    return report, export


def onnx_export_failure(coordinator: Any, job_id: str, status: dict[str, Any]
                        ) -> dict[str, str] | None:
    """``{"failed": why, "retry": what gets it done}`` for an ended job with a model
    (``status``: its Coordinator.job_status) whose ONNX export failed and is not there
    since: ``jobs status``'s ``onnx_export`` (the same words as ``jobs fetch``'s note),
    and what the job's report says of its absent model.onnx. None otherwise.

    Raises: sqlite3.Error: the audit log cannot be read."""
    committed = int(status.get("committed_round") or 0)
    if not (status.get("status") == "completed" or (
            status.get("status") in ("failed", "cancelled") and committed > 0)):
        return None
    from fedge.coordinator import checkpoint as ck

    if "model.onnx" in ck.results(coordinator.state_dir, job_id):
        return None
    _, export_failed = finish_failures(coordinator, job_id)
    if not export_failed:
        return None
    return {"failed": export_failed, "retry": export_retry(coordinator, job_id, export_failed)}


#: How many times an ended job's ONNX export may fail the same way before the coordinator
#: stops trying it at each start (`export_given_up`): its first try, at the job's end,
#: and one more at a start. A diverged model's NaN weights fail the parity check at
#: every start, each costing a torch child and a failure in the audit log, for ever.
EXPORT_GIVE_UP_AFTER = 2


def export_given_up(store: Any, job_id: str, final_digest: str) -> tuple[str, int] | None:
    """(the reason, how many times) when ``job_id``'s ONNX export has failed
    EXPORT_GIVE_UP_AFTER times or more in a row (since its last export written or kept)
    the same way: the same reason word for word (`fedge export`'s last line), for the
    same final model (``final_digest``), under this fedge version, for a cause that does
    not pass (`export_may_pass`: not the disk, memory or time, which stay tried at each
    start). None otherwise: tried again at the next start. An upgraded fedge, or a
    failure recorded before failures named their model and version, is tried again.

    Raises: sqlite3.Error: the audit log cannot be read."""
    from fedge.console.audit import parse_detail

    rows = store.audit_log(actions=EXPORT_OUTCOMES, job=job_id, limit=50)
    last: tuple[Any, Any, Any] | None = None
    times = 0
    for row in reversed(rows):  # newest first, back to the last export written or kept
        if row["action"] != "model_export_failed":
            break
        detail = parse_detail(row["detail"])
        if not isinstance(detail, dict):
            break
        this = (detail.get("reason"), detail.get("final_digest"), detail.get("version"))
        if last is None:
            last = this
        if this != last:
            break
        times += 1
    if last is None or times < EXPORT_GIVE_UP_AFTER:
        return None
    reason, digest, version = last
    if not isinstance(reason, str) or export_may_pass(reason) or not final_digest \
            or digest != final_digest or version != __version__:
        return None
    return reason, times


async def serve_admin(coordinator: Any, config: AdminConfig, *, updates: Any | None = None,
                      service: AdminService | None = None,
                      ready: asyncio.Event | None = None,
                      tick_s: float = 0.5) -> None:
    """Serve the admin channel until cancelled.

    Raises:
        zmq.ZMQError: the endpoint cannot be bound.
    """
    import zmq
    import zmq.asyncio
    from zmq.auth.asyncio import AsyncioAuthenticator

    from fedge.wire import codec

    service = service or AdminService(coordinator, config.operators, updates=updates)
    if service.updates is None and config.provision.get("tuf_root"):
        _provision_updates(coordinator, service, config.provision)
    ctx = zmq.asyncio.Context()  # own context: its ZAP handler serves only this socket
    auth = AsyncioAuthenticator(ctx)
    auth.start()

    class _Operators:
        def callback(self, domain: str, z85_key: bytes) -> bool:  # pyzmq passes z85
            return z85_key.decode("ascii") in service.operators

    auth.configure_curve_callback(ADMIN_ZAP_DOMAIN, credentials_provider=_Operators())
    from fedge.transport._sockopts import set_ipv6

    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    set_ipv6(sock, config.endpoint, bind=True)  # tcp://* dual-stack, tcp://[ADDRESS]:P
    sock.curve_server = True
    sock.curve_publickey = config.server_public_key.encode("ascii")
    sock.curve_secretkey = config.server_secret_key.encode("ascii")
    sock.zap_domain = ADMIN_ZAP_DOMAIN.encode()
    try:
        sock.bind(config.endpoint)
        if ready is not None:
            ready.set()
        while True:
            if await sock.poll(int(tick_s * 1000)):
                frames = await sock.recv_multipart(copy=False)
                await _answer(sock, service, frames, codec)
            try:
                service.tick()
            except Exception:  # roll-out deadlines: logged; the channel keeps serving
                log.exception("admin tick failed")
    finally:
        sock.close(0)
        auth.stop()
        ctx.term()
