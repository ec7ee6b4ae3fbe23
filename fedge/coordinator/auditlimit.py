"""Audit rows for events a peer can repeat at will, without one fsync'd row each.

A key the transport refuses again and again (an unenrolled or revoked appliance
reconnecting every few milliseconds), or an enrolled appliance sending malformed
messages in a loop, must not grow the audit log and stall the coordinator's loop
with a SQLite transaction per event. Per key the first event is audited in full;
the rest are counted and summarised in at most one row per ``every_s`` ("refused
12 more times since ..."), written by the next event once that time is up, by
:meth:`AuditThrottle.flush` (the coordinator's tick) once the key has gone quiet,
or by :meth:`AuditThrottle.close`. At most ``max_keys`` keys are remembered, least
recently seen dropped first (its count audited as it goes). And at most
``max_new_keys`` new keys a window are audited in full: past that (a flood of fresh
keys, each new by construction) events are counted under one overflow key per
action, whose summary row says how many there were.

Two times: the ``now`` each call is given measures the intervals (``every_s``, the
window of new keys) and must never step (the coordinator passes ``time.monotonic``
readings); the "since" a summary row writes is a time of day, read from ``wall``
(``time.time`` in the coordinator) when the first event it counts happens. A step of
the wall clock then moves neither an interval nor a row's due time, and "since" says
what the wall clock said. Without ``wall``, ``now`` serves for both (a test's one
fake clock).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

Audit = Callable[[str, str, Any], None]  # (actor, action, detail)
OVERFLOW = "<many keys>"


def _is_overflow(key: Hashable) -> bool:
    return isinstance(key, tuple) and len(key) == 2 and key[0] == OVERFLOW


@dataclass
class _Pending:
    actor: str
    action: str
    detail: Any  # the last event's, for the summary row (a dict, or a reason string)
    audited_at: float
    count: int = 0  # events not yet in the audit log
    since: float = 0.0  # the first of them, by the wall clock


class AuditThrottle:
    """``event(key, actor, action, detail, now)`` audits or counts one event.

    ``wall``: the wall clock "since" is read from (module docstring); None: ``now``."""

    def __init__(self, audit: Audit, *, verb: str, every_s: float = 60.0,
                 max_keys: int = 1024, max_new_keys: int = 60,
                 wall: Callable[[], float] | None = None) -> None:
        self.audit = audit
        self.wall = wall
        self.verb = verb  # "refused", "rejected": the summary says "<verb> N more times"
        self.every_s = every_s
        self.max_keys = max_keys
        self.max_new_keys = max_new_keys
        self._keys: collections.OrderedDict[Hashable, _Pending] = collections.OrderedDict()
        self._pending: dict[Hashable, None] = {}  # insertion-ordered: rows in a stable order
        self._window = (float("-inf"), 0)  # (start, new keys audited in full since)

    def event(self, key: Hashable, actor: str, action: str, detail: Any,
              now: float) -> bool:
        """Returns whether this event was audited in full (the first for its key)."""
        entry = self._keys.get(key)
        if entry is None and not _is_overflow(key):
            start, new = self._window
            if now - start >= self.every_s:
                start, new = now, 0
            if new >= self.max_new_keys:  # a flood of fresh keys: count them together
                self._window = (start, new)
                self.event((OVERFLOW, action), actor, action,
                           {"overflow": f"more than {self.max_new_keys} new keys in "
                                        f"{self.every_s:g} s; counted together",
                            "last": detail}, now)
                return False  # this key's own event was counted, not audited
            self._window = (start, new + 1)
        if entry is None:
            self.audit(actor, action, detail)
            self._keys[key] = _Pending(actor, action, detail, audited_at=now)
            while len(self._keys) > self.max_keys:  # forget the least recent key
                old_key, old = self._keys.popitem(last=False)
                self._summarise(old_key, old, now)
            return True
        self._keys.move_to_end(key)
        if entry.count == 0:
            entry.since = now if self.wall is None else self.wall()
        entry.count += 1
        entry.detail = detail
        self._pending[key] = None
        if now - entry.audited_at >= self.every_s:
            self._summarise(key, entry, now)
        return False

    def _summarise(self, key: Hashable, entry: _Pending, now: float) -> None:
        """One audit row for the events of ``key`` counted since its last row."""
        self._pending.pop(key, None)
        if entry.count == 0:
            return
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.since))
        n = entry.count
        last = entry.detail if isinstance(entry.detail, dict) else {"reason": entry.detail}
        self.audit(entry.actor, entry.action,
                   {**last, "repeated": n, "since": entry.since,
                    "summary": f"{self.verb} {n} more time{'s' if n > 1 else ''} "
                               f"since {since}"})
        entry.count = 0
        entry.audited_at = now

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def flush(self, now: float) -> None:
        """Summaries now due for keys that went quiet."""
        for key in list(self._pending):
            entry = self._keys[key]
            if now - entry.audited_at >= self.every_s:
                self._summarise(key, entry, now)

    def close(self, now: float) -> None:
        """Every count not yet audited."""
        for key in list(self._pending):
            self._summarise(key, self._keys[key], now)

    def __len__(self) -> int:
        return len(self._keys)
