"""The fleet table: one line per appliance, for operators and for scripts."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from fedge.text import printable

COLUMNS = ("site", "version", "connected", "last seen", "health", "eligible", "task")
# TASK is what the site's last heartbeat said it was doing. The registry keeps that
# text after the site goes (killed, powered off, its link down), and shown beside "no"
# it read as work in progress; a site not connected shows "-" there (``--json`` keeps
# the last heartbeat's ``current_task``, with "last seen" saying how old it is).
# How far the coordinator's clock may be past the newest "last seen" of a connected
# appliance: the coordinator writes each heartbeat to its store at most 5 s late
# (batched: fedge.coordinator.store.HEARTBEAT_FLUSH_S) and counts a site connected
# for its heartbeat timeout (10 s by default) after the last.
# A console clock outside [newest, newest + this] is not the coordinator's time.
CLOCK_SLACK_S = 120.0


def _number(value: Any) -> float | None:
    """A finite number from an appliance's report, or None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def health_summary(health: Any) -> str:
    """A few words from a `fedge.health` report dict: GPUs, hottest GPU, disk, XIDs.

    The report comes from the appliance: a field of the wrong shape (a GPU count
    where a list is due, a temperature as text) is left out, never fatal to the
    table for the whole fleet."""
    if not isinstance(health, dict) or not health:
        return "no report"
    parts = []
    gpus = health.get("gpus")
    gpus = gpus if isinstance(gpus, list) else []
    if gpus:
        temps = [t for g in gpus if isinstance(g, dict)
                 and (t := _number(g.get("temperature_c"))) is not None]
        parts.append(f"{len(gpus)} GPU" + (f" max {max(temps):.0f}C" if temps else ""))
    else:
        parts.append("no GPU")
    host = health.get("host")
    if isinstance(host, dict):
        total, free = _number(host.get("disk_total_bytes")), _number(host.get("disk_free_bytes"))
        if total and free is not None:
            parts.append(f"disk {100.0 * free / total:.0f}% free")
    xids = health.get("xid_events")
    if isinstance(xids, list) and xids:
        parts.append(f"{len(xids)} XID")
    return ", ".join(parts)


def _ago(ts: Any, now: float) -> str:
    if not isinstance(ts, int | float):
        return "never"
    s = max(0.0, now - float(ts))
    if s < 120:
        return f"{s:.0f}s ago"
    if s < 7200:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def _connected(a: dict[str, Any]) -> str:
    text = "yes" if a.get("connected") else "no"
    contested = a.get("contested")
    if isinstance(contested, dict):  # its key keeps replacing its own connection
        addresses = contested.get("addresses")
        where = ", ".join(str(x) for x in addresses) if isinstance(addresses, list) else "?"
        text += f" (CONTESTED: {contested.get('times', '?')} reconnects from {where})"
    return text


def reference_time(fleet: Sequence[dict[str, Any]], now: float | None = None
                   ) -> tuple[float, float | None]:
    """The time to count "last seen" from, and how far this console's clock (`now`)
    is off the coordinator's, or None when it is not found off.

    "last seen" is the coordinator's time; the fleet reply carries no reading of its
    clock, but a connected appliance was seen within `CLOCK_SLACK_S` of it. So with
    one connected, a console clock before the newest such "last seen" or more than
    `CLOCK_SLACK_S` after it is off (slow or fast), and ages are counted from that
    newest "last seen" instead (each under-counted by at most the slack). With none
    connected, this console's clock is all there is."""
    now = time.time() if now is None else now
    seen = [float(a["last_seen"]) for a in fleet
            if a.get("connected") and (_number(a.get("last_seen")) is not None)]
    if not seen:
        return now, None
    newest = max(seen)
    if newest <= now <= newest + CLOCK_SLACK_S:
        return now, None
    return newest, now - newest


def fleet_rows(fleet: Sequence[dict[str, Any]], *, now: float | None = None) -> list[list[str]]:
    """One row of `COLUMNS` per appliance; "last seen" counted from `reference_time`
    (this console's clock, `now`, unless that is found off the coordinator's); TASK
    "-" for a site not connected (its last heartbeat's task is not what it does now)."""
    now, _ = reference_time(fleet, now)
    rows = []
    for a in fleet:
        status = a.get("status", "")
        eligible = "yes" if a.get("eligible") else "no"
        reason = a.get("eligibility_reason") or ""
        ledger = a.get("privacy_ledger")
        if isinstance(ledger, dict) and ledger.get("rolled_back") is True:
            # the coordinator's full reason is in --json and `jobs watch`
            eligible, reason = "no", (
                f"PRIVACY LEDGER ROLLED BACK ({ledger.get('released_now', '?')} released "
                f"runs, {ledger.get('released_mark', '?')} before): `fedge console "
                f"ledger-ack {a.get('site_id', '?')}` or restore the newer ledger")
        rows.append([printable(cell) for cell in (
            str(a.get("site_id", "?")) + (" (revoked)" if status == "revoked" else ""),
            str(a.get("version") or "-"),
            _connected(a),
            _ago(a.get("last_seen"), now),
            health_summary(a.get("health")),
            f"{eligible}: {reason}" if reason else eligible,
            str(a.get("current_task") or "-") if a.get("connected") else "-",
        )])
    return rows


def format_table(rows: Sequence[Sequence[str]], columns: Sequence[str] = COLUMNS) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
