"""The coordinator's audit log as the security officer reads it: the filters' edge
checks and the table, shared by `fedge console audit` (over the admin channel) and
`fedge coordinator audit` (the database on the coordinator host, read-only).

An entry's detail holds text sites sent (a refusal's reason, an accusation's): every
cell is shown with its control characters escaped (`printable`), never obeyed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from fedge.console.fleet import printable

COLUMNS = ("time", "actor", "action", "detail")
# a table's detail cell: its first characters, on one line (--json has it whole)
DETAIL_CHARS = 240


def parse_since(text: str) -> float:
    """``--since``: a UTC date (YYYY-MM-DD: from its midnight) or an ISO time (UTC
    unless it names its offset), as a Unix time.

    Raises: ValueError naming the value and the forms taken."""
    value = text.strip()
    try:
        when = datetime.fromisoformat(value)  # a date alone: its midnight
    except ValueError:
        raise ValueError(f"--since {text!r} is neither a UTC date (YYYY-MM-DD) nor an ISO "
                         "time (YYYY-MM-DDTHH:MM[:SS], UTC unless it ends in Z or "
                         "+HH:MM)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def split_actions(given: Iterable[str] | str | None) -> list[str]:
    """``--action`` given several times, each maybe a comma list: the actions, in
    order, each once."""
    if given is None:
        return []
    items = [given] if isinstance(given, str) else list(given)
    out: list[str] = []
    for item in items:
        for action in str(item).split(","):
            if action.strip() and action.strip() not in out:
                out.append(action.strip())
    return out


def parse_detail(text: Any) -> Any:
    """An audit row's detail: the JSON it holds, or the text as is."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def utc(ts: Any) -> str:
    """A Unix time as "YYYY-MM-DDTHH:MM:SSZ" ("?" for anything else)."""
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return "?"
    try:
        return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        return "?"


def detail_line(detail: Any) -> str:
    """A detail on one line: JSON compact, text as is; control characters escaped
    and cut at DETAIL_CHARS."""
    text = detail if isinstance(detail, str) else json.dumps(
        detail, sort_keys=True, ensure_ascii=False, separators=(", ", ": "), default=str)
    text = printable(text)
    return text if len(text) <= DETAIL_CHARS else text[:DETAIL_CHARS - 1] + "…"


def audit_rows(entries: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row of COLUMNS per entry (a dict with time, actor, action, detail)."""
    return [[utc(e.get("time")), printable(e.get("actor", "?")),
             printable(e.get("action", "?")), detail_line(e.get("detail", ""))]
            for e in entries]


def json_line(entry: dict[str, Any]) -> str:
    """One entry as a JSON line for scripts (ASCII: control characters escaped),
    with its time also as UTC text ("utc")."""
    return json.dumps({**entry, "utc": utc(entry.get("time"))}, sort_keys=True,
                      default=str)
