"""What an agent keeps for a running job across its own restarts.

A job's rounds carry state that lives on the appliance: SCAFFOLD's client control
variate c_i (the agent's) and the place in the stream of shuffled epochs (the
trainer's). Both are written here after they change, so an agent that is killed
or upgraded between rounds resumes the job where it stood instead of from c_i = 0
and a fresh epoch. The privacy ledger has its own file (``privacy/ledger.json``).

Layout, under the agent's state directory::

    jobs/<sha256(job)[:24]>.<kind>.npz    0600, written atomically

Each file is a NumPy archive (no pickles) of named arrays plus the job's name.
Only the newest ``keep`` files of a kind stay: jobs end without telling the
agent, and a finished job's state is never read again. The exception is
``KEPT_FOR_GOOD``: a job's plan digest (a few hundred bytes) is what this site can
show of the plan it trained under, long after the job ended (``fedge agent privacy
--runs``, for entries of a ledger saved before entries carried it). A file that cannot be
read is moved aside (``.corrupt`` suffix, nothing deleted), the error names it
in the log, and the job goes on from fresh state, as before this store existed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedge.update.files import set_aside, write_atomic

log = logging.getLogger("fedge.agent")

_JOB_KEY = "__job__"

# kinds never pruned: the record of what the site trained under (see the docstring)
KEPT_FOR_GOOD = frozenset({"plan"})


class JobStateStore:
    """Named arrays per (job, kind) on disk. Not thread-safe across one (job, kind):
    each kind has one writer (the agent's event loop, or the training thread)."""

    def __init__(self, root: Path, *, keep: int = 32) -> None:
        if keep < 1:
            raise ValueError(f"JobStateStore keep={keep} must be at least 1")
        self.root = Path(root)
        self.keep = keep

    def path(self, job: str, kind: str) -> Path:
        if not kind.isidentifier():
            raise ValueError(f"job state kind {kind!r} must be an identifier")
        digest = hashlib.sha256(job.encode()).hexdigest()[:24]
        return self.root / f"{digest}.{kind}.npz"

    def load(self, job: str, kind: str) -> dict[str, np.ndarray]:
        """The arrays last saved for (job, kind); {} when none were, or when the file
        is unreadable (then moved aside, and logged with its path and the problem)."""
        path = self.path(job, kind)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
            owner = arrays.pop(_JOB_KEY, None)
            if owner is None or str(owner) != job:
                raise ValueError(f"it belongs to job {None if owner is None else str(owner)!r}")
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            aside = set_aside(path, log)
            log.error("job %s: %s state in %s is unreadable (%s); moved to %s, the job "
                      "goes on from fresh %s state", job, kind, path, exc, aside.name, kind)
            return {}
        return arrays

    def peek(self, job: str, kind: str) -> dict[str, np.ndarray]:
        """As :meth:`load`, but never writes: a file that cannot be read gives {} and
        stays where it is (for a reader beside a running agent, such as ``fedge agent
        privacy``)."""
        try:
            with np.load(io.BytesIO(self.path(job, kind).read_bytes()),
                         allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile):
            return {}
        owner = arrays.pop(_JOB_KEY, None)
        return arrays if owner is not None and str(owner) == job else {}

    def save(self, job: str, kind: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Write the arrays for (job, kind), replacing the last save. Raises: OSError."""
        if _JOB_KEY in arrays:
            raise ValueError(f"job state array name {_JOB_KEY!r} is reserved")
        buf = io.BytesIO()
        np.savez(buf, **{_JOB_KEY: np.array(job)}, **arrays)
        path = self.path(job, kind)
        write_atomic(path, buf.getvalue())
        if kind not in KEPT_FOR_GOOD:
            self._prune(kind, path)

    def _prune(self, kind: str, current: Path) -> None:
        dated = []
        for p in self.root.glob(f"*.{kind}.npz"):
            try:
                dated.append((p.stat().st_mtime_ns, p))
            except FileNotFoundError:  # pruned by another thread meanwhile
                continue
        others = [p for _, p in sorted(dated, reverse=True) if p != current]
        for old in others[self.keep - 1:]:
            old.unlink(missing_ok=True)
