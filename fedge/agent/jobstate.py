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

Kind ``standardisation`` (:class:`TrainedStandardisation`) holds, per data set, the
standardisation constants a job trains with (mean and scale fitted on this site's
training rows, the feature names, and the version of the source they were fitted on),
so that the job's model, pushed to this appliance after the agent restarted, is served
with them rather than with a later re-export's. They are statistics of patient data:
they stay in this file (0600, like the others) and are never sent. A state directory
written before this kind existed has none: the caller falls back as it did then.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
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

    def touch(self, job: str, kind: str) -> None:
        """Mark (job, kind)'s file as used now (its modification time), so that pruning,
        which keeps the newest ``keep`` files of a kind, keeps a job still running
        whose file was written when it began; nothing when there is none.
        Raises: OSError (other than a file that is not there)."""
        with contextlib.suppress(FileNotFoundError):  # none written, or pruned meanwhile
            os.utime(self.path(job, kind))

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


# the kind of a job's standardisation constants (module docstring)
STANDARDISATION = "standardisation"


@dataclass(frozen=True)
class TrainedStandardisation:
    """The standardisation one job trained with on one data set of this site: the mean
    and scale fitted on its training rows (``fedge.train.data.Standardiser``), one per
    feature of ``feature_names``, and ``source``, the version of the data set's source
    they were fitted on as the trainer tells versions apart (its ``SourceVersion``, as
    JSON: file or folder, inode, size, times; no path, no value).

    Statistics of patient data: kept in the job's state file on this appliance (0600)
    for the install of the job's model, and never sent anywhere."""

    dataset: str
    mean: np.ndarray
    scale: np.ndarray
    feature_names: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        """Raises: ValueError: mean, scale and feature names of different lengths,
        constants that are not finite, or a scale <= 0 (naming which)."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1)
        scale = np.asarray(self.scale, dtype=np.float32).reshape(-1)
        if not mean.size == scale.size == len(self.feature_names):
            raise ValueError(f"data set {self.dataset!r}: {mean.size} means, {scale.size} "
                             f"scales and {len(self.feature_names)} feature names")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(scale))
                and np.all(scale > 0)):
            raise ValueError(f"data set {self.dataset!r}: its constants are not all "
                             "finite with scales > 0")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "feature_names", tuple(str(n) for n in self.feature_names))


def standardisation_arrays(entries: Mapping[str, TrainedStandardisation]
                           ) -> dict[str, np.ndarray]:
    """``entries`` (data set -> its constants) as named arrays for
    :meth:`JobStateStore.save` (kind ``STANDARDISATION``): ``datasets`` lists the data
    sets, and data set i has ``d<i>_mean``, ``d<i>_scale``, ``d<i>_features`` and
    ``d<i>_source`` (array names are the archive's file names, so not the data set's)."""
    arrays: dict[str, np.ndarray] = {"datasets": np.array(list(entries), dtype=str)}
    for i, entry in enumerate(entries.values()):
        arrays[f"d{i}_mean"] = entry.mean
        arrays[f"d{i}_scale"] = entry.scale
        arrays[f"d{i}_features"] = np.array(entry.feature_names, dtype=str)
        arrays[f"d{i}_source"] = np.array(entry.source)
    return arrays


def standardisations(arrays: Mapping[str, np.ndarray]) -> dict[str, TrainedStandardisation]:
    """The data sets' constants in arrays :func:`standardisation_arrays` made (as
    :meth:`JobStateStore.load` or ``peek`` gives them); {} for none.

    Raises: ValueError: an array missing or of another shape, or constants that do not
        fit one another (naming which)."""
    if not arrays:
        return {}
    try:
        names = [str(n) for n in np.asarray(arrays["datasets"]).reshape(-1)]
        found = {}
        for i, name in enumerate(names):
            found[name] = TrainedStandardisation(
                name, arrays[f"d{i}_mean"], arrays[f"d{i}_scale"],
                tuple(np.asarray(arrays[f"d{i}_features"]).reshape(-1).tolist()),
                str(arrays[f"d{i}_source"]))
    except KeyError as exc:
        raise ValueError(f"array {exc} is missing") from None
    return found
