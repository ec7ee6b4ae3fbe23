"""What the agent runs for a task: local training and evaluation on its own data.

:class:`TorchTrainer` is the real one (``fedge.train.api`` over the data sets
of the agent config). :class:`SyntheticTrainer` is the "trivial local training"
of the scale benchmark: a deterministic pseudo-update of any size, no data set
files, so hundreds of agents fit in one process. Both return flat float32
weights, counts and metrics — never rows.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import linecache
import logging
import os
import re
import stat
import sys
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedge.agent.jobstate import (
    STANDARDISATION,
    JobStateStore,
    TrainedStandardisation,
    standardisation_arrays,
    standardisations,
)
from fedge.coordinator.plan import Plan
from fedge.update.files import remove_stale_temps

if TYPE_CHECKING:  # fedge.train loads only once a TorchTrainer is made
    from fedge.train.data import DatasetSpec

log = logging.getLogger("fedge.agent")

# Jobs whose per-job state (the agent's SCAFFOLD c_i, the trainer's ClientState) stays
# in memory, the ones used last. A job ends without telling the agent, so a bound on
# jobs is what frees a finished one; a job dropped here and used again reloads its
# state from the agent's JobStateStore, which keeps the newest 32 on disk.
HELD_JOBS = 8


class RecentJobs(OrderedDict[str, Any]):
    """Per-job state for the ``held`` jobs used last (``HELD_JOBS``), oldest first.

    Raises (on construction): ValueError: ``held`` below 1."""

    def __init__(self, held: int = HELD_JOBS) -> None:
        if held < 1:
            raise ValueError(f"held_jobs={held!r} must be at least 1")
        super().__init__()
        self.held = held

    def touch(self, job: str) -> Any:
        """``job``'s state, now the newest; None when it is not held."""
        state = self.get(job)
        if state is not None:
            self.move_to_end(job)
        return state

    def hold(self, job: str, state: Any) -> Any:
        """Hold ``state`` for ``job`` unless one is held already; returns the one held,
        now the newest. The oldest beyond ``held`` go (on disk, if anywhere)."""
        state = self.setdefault(job, state)
        self.move_to_end(job)
        while len(self) > self.held:
            self.popitem(last=False)
        return state


# How deep a data set's folder is read, so how deep its version is taken:
# <root>/<split>/<class>/<image> (fedge.train.data's image layout).
SOURCE_DEPTH = 3


@dataclass(frozen=True)
class SourceVersion:
    """Which version of a data set's source the agent holds, told apart without
    reading it (:func:`source_version`). Two versions that compare equal are taken
    as the same data."""

    kind: str  # "file", "folder" or "missing"
    inode: tuple[int, int] = (0, 0)  # a file's (st_dev, st_ino)
    size: int = 0  # a file's bytes; a folder's entries
    modified_ns: int = 0  # st_mtime_ns; a folder's newest file's
    changed_ns: int = 0  # st_ctime_ns (status change); a folder's newest file's
    digest: str = ""  # a folder: every file's name, inode, size and both times

    def differences(self, earlier: SourceVersion) -> str:
        """What differs from ``earlier``, in words, without a value or a path."""
        if self.kind != earlier.kind:
            return f"it was a {earlier.kind}, it is now a {self.kind}"
        if self.kind == "file":
            words = [("another file at its path", self.inode != earlier.inode),
                     ("size", self.size != earlier.size),
                     ("modification time", self.modified_ns != earlier.modified_ns),
                     ("status-change time", self.changed_ns != earlier.changed_ns)]
        else:
            words = [("number of entries", self.size != earlier.size),
                     ("newest modification time", self.modified_ns != earlier.modified_ns),
                     ("newest status-change time", self.changed_ns != earlier.changed_ns),
                     ("which files it holds or their inode, size or times",
                      self.digest != earlier.digest)]
        return ", ".join(word for word, differs in words if differs)


def source_version(path: str | Path) -> SourceVersion:
    """The version of the data set source at ``path``, from ``stat`` alone (a file's
    content is never read here).

    A file: its device and inode, size, modification time and status-change time
    (``st_ctime_ns``), following a link as the loader does. The kernel sets the
    status-change time on every write and ``os.utime`` cannot set it back, so a
    re-export in place that keeps the size and restores the modification time is
    still a new version. What this misses: a rewrite that keeps the inode, the size
    and both times, which takes a file system without a status-change time of its
    own (some network and FUSE mounts report the modification time for it) or one
    whose timestamps are coarser than the time between the load and the rewrite
    (FAT's 2 s); also a system clock set back.

    A folder (an image set, Fed-TCGA-BRCA's folder): the same for every visible
    file down to ``SOURCE_DEPTH`` levels, and the names of the folders on the way (a
    dot-entry, which the loader skips, is skipped; so are the folders' own times,
    which a dot-file moves), one ``stat`` each: about 30 ms for 5,000 images,
    measured on ext4 with a warm page cache on a busy 2-core machine, the ``stat``
    calls most of it; taken when a job's first task loads the data set (or a task of a
    job no longer held, or a task of no job), never during a held job's later rounds.
    Kept as their count, the newest times and a digest of them all: an image replaced,
    added, removed or renamed is a new version. "missing": nothing at ``path``
    (loading it then says why)."""
    try:
        top = os.stat(path)
    except OSError:
        return SourceVersion("missing")
    if not stat.S_ISDIR(top.st_mode):
        return SourceVersion("file", (top.st_dev, top.st_ino), top.st_size,
                             top.st_mtime_ns, top.st_ctime_ns)
    from fedge.train.data import _SYSTEM_LITTER  # what the loader ignores, as it says

    digest = hashlib.blake2b(digest_size=16)
    entries, modified, changed = 0, 0, 0
    pending = [(os.fspath(path), "", 1)]
    while pending:
        folder, relative, depth = pending.pop()
        try:
            with os.scandir(folder) as found:
                # what the loader ignores (dot-files, Thumbs.db, desktop.ini,
                # __MACOSX) is no change: Explorer's thumbnail view is no new export
                listing = sorted((e for e in found if not e.name.startswith(".")
                                  and e.name.casefold() not in _SYSTEM_LITTER),
                                 key=lambda e: e.name)
        except OSError as exc:  # the loader says what; a new error is a new version
            digest.update(f"{relative}\0unreadable {exc.errno}\n".encode(errors="replace"))
            continue
        for entry in listing:
            name = f"{relative}/{entry.name}"
            try:
                st = entry.stat()  # following a link, as the loader does
            except OSError as exc:
                digest.update(f"{name}\0gone {exc.errno}\n".encode(errors="replace"))
                continue
            entries += 1
            if stat.S_ISDIR(st.st_mode):
                # a folder by its name alone: its own times move with a dot-file's
                # comings and goings, and what it holds is listed entry by entry
                digest.update(f"{name}/\n".encode(errors="replace"))
                if depth < SOURCE_DEPTH:
                    pending.append((entry.path, name, depth + 1))
                continue
            modified, changed = max(modified, st.st_mtime_ns), max(changed, st.st_ctime_ns)
            digest.update(f"{name}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0"
                          f"{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode(errors="replace"))
    return SourceVersion("folder", size=entries, modified_ns=modified, changed_ns=changed,
                         digest=digest.hexdigest())


def describe_size(data: Any) -> str:
    """How much a loaded data set (``fedge.train.data.SiteData``) holds, in words: its
    examples (images or rows) and their splits; no value, no path."""
    splits = [(part, len(split)) for part in ("train", "val", "test")
              if (split := getattr(data, part, None)) is not None]
    unit = "images" if getattr(data, "info", {}).get("kind") == "images" else "rows"
    return (f"{sum(n for _, n in splits)} {unit} ("
            + ", ".join(f"{part} {n}" for part, n in splits) + ")")


@dataclass
class DataVersion:
    """A data set as loaded (``fedge.train.data.SiteData``) and the version of its
    source it was read from."""

    source: SourceVersion
    data: Any


# A source whose newest modification is younger than this when a read of it begins
# may be an export still being written (read_source).
RECENT_WRITE_S = 2.0
# What a reason says of a source that was being written while it was read.
EXPORT_ADVICE = ("an export must be written under a temporary name and renamed into place "
                 "once it is complete")


class SourceChanging(Exception):
    """A data set's source changed while it was read, on each read tried: an export
    being written in place (:func:`read_source`). ``error``: the last read's error, None
    when each read loaded but the source changed meanwhile. Its text names no path and
    no value, so a refusal may send it."""

    def __init__(self, text: str, error: BaseException | None = None) -> None:
        super().__init__(text)
        self.error = error


def _recent(source: SourceVersion, began_ns: int) -> float:
    """How long after ``began_ns`` (a read's start, ``time.time_ns``) ``source``'s
    newest modification is RECENT_WRITE_S old, in seconds, at most RECENT_WRITE_S; 0
    when it was that old already, or when it lies more than that in the future (a
    clock set apart, not a write)."""
    if source.kind == "missing":
        return 0.0
    age = (began_ns - source.modified_ns) / 1e9
    if not -RECENT_WRITE_S < age < RECENT_WRITE_S:
        return 0.0
    return min(RECENT_WRITE_S, RECENT_WRITE_S - age)


def read_source(spec: DatasetSpec, tries: int = 2, *,
                source: SourceVersion | None = None) -> DataVersion:
    """Load data set ``spec`` with fedge.train's loader (``load_site_data``), as a
    task's first load of it does, and the version of its source read
    (:func:`source_version`, taken before the read and after it; ``source``: the one
    taken just before, if any). What a task loads and what ``fedge agent check`` reads
    alike.

    A source that changed during a read (an export still being written) is read again,
    up to ``tries`` reads in all, whether that read loaded or failed: a file written in
    place fails ("truncated row") while its last row is half written. A read that
    fails on a source unchanged by it, but modified under RECENT_WRITE_S before the
    read began, is looked at again once that modification is RECENT_WRITE_S old (a
    pause of at most that): changed by then, it was being written, and is read again;
    unchanged, the loader's error is the source's. A read that loads from a source so
    recently modified, and unchanged after it, is kept, and said at WARNING (the data
    set named, as the trainer's other load lines name it; not its path, nor a value):
    a writer between two writes leaves a file that reads as whole (a row cut inside its
    last field), and a job keeps the version it began on for all its rounds.

    Raises:
        SourceChanging: the source changed during each read (``error``: the last
            read's, where it failed).
        OSError, ValueError: the loader's error (``DataError`` among them) on a source
            that did not change.
    """
    from fedge.train.data import load_site_data

    source = source_version(spec.path) if source is None else source
    error: BaseException | None = None
    for attempt in range(1, tries + 1):
        again = "; read again" if attempt < tries else ""
        began = time.time_ns()
        try:
            data = load_site_data(spec)
        except (OSError, ValueError) as exc:
            after = source_version(spec.path)
            pause = _recent(source, began)
            if after == source and pause > 0:  # a writer between two writes?
                time.sleep(pause)
                after = source_version(spec.path)
            if after == source:
                raise
            log.warning("data set %r changed while it was read (%s), and the read failed "
                        "(%s)%s", spec.name, after.differences(source), type(exc).__name__,
                        again)
            source, error = after, exc
            continue
        after = source_version(spec.path)
        if after == source:
            if _recent(source, began) > 0:
                log.warning("data set %r: its %s was modified %.1f s "
                            "before it was read: if it was still being written, what was "
                            "read is part of it, and a job that begins on it keeps it for "
                            "all its rounds (%s)", spec.name, source.kind,
                            max(0.0, (began - source.modified_ns) / 1e9), EXPORT_ADVICE)
            return DataVersion(source, data)
        log.warning("data set %r changed while it was read (%s)%s", spec.name,
                    after.differences(source), again)
        source, error = after, None
    what = f"its {source.kind}" if source.kind != "missing" else "its source"
    if error is None:
        raise SourceChanging(f"{what} changed while it was read, each time: it is being "
                             f"written now ({EXPORT_ADVICE}); a later task reads it again")
    raise SourceChanging(f"{what} was being written while it was read (it changed during "
                         f"the read{', each time' if tries > 1 else ''}): {EXPORT_ADVICE}; "
                         "a later task reads it again", error)


@dataclass
class HeldJob:
    """What the trainer holds for one job: its ``ClientState`` (made when it first
    trains) and, per data set, the version it began on, which it keeps for all its
    rounds (its rows, their standardiser, its data cursor and its DP sampling rate
    hold for that version only)."""

    state: Any = None
    data: dict[str, DataVersion] = field(default_factory=dict)


class TaskRefusal(Exception):
    """This site cannot run the task; the message is the reason sent to the coordinator.

    The coordinator keeps that reason for good (its database, audit table and the
    job's report), so it never carries what a data file holds or where it lies: a
    data error goes as its public form (``DataError.public``: the data set, file in
    words, line, column and kind of problem), an unforeseen error as its type alone
    (:func:`public_reason`); the details go to this site's journal."""


# What an outbound reason says in place of an error's own text.
SEE_JOURNAL = "details in this appliance's journal"

# What training and evaluation may raise that is the plan's or the data's, not a bug
# here: refused with a reason (public_reason). MemoryError and IndexError (a label
# outside the model's classes) included: the agent's catch-all sends an unforeseen
# error's type alone.
TRAINING_ERRORS = (LookupError, ValueError, TypeError, RuntimeError, MemoryError)


def _raised_by_fedge(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a ``raise`` statement of fedge's own (its text made
    from the plan, agent.toml, counts and shapes), not from a library fedge called:
    numpy's "could not convert string to float: 'DOE^JANE'" quotes the cell it choked
    on, and an OSError names a path. Decided on the innermost frame of its traceback
    (a library's error raised from a line of fedge's that is not a ``raise`` is the
    library's)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    if module != "fedge" and not module.startswith("fedge."):
        return False
    return linecache.getline(tb.tb_frame.f_code.co_filename,
                             tb.tb_lineno).lstrip().startswith("raise ")


def without_paths(text: str, paths: Sequence[str]) -> str:
    """``text`` less the data set paths ``paths`` (agent.toml ``path``): a config
    error names its data set's path for the site's own people ("dataset 'x'
    (/srv/data/x.csv): ..."), which the coordinator is not told."""
    for path in paths:
        if isinstance(path, str) and path:
            text = text.replace(f" ({path})", "")
            if "/" in path or "\\" in path:
                text = text.replace(path, "(its path)")
    return text


# A library's errors that training meets most, told in fedge's words: only the sizes
# its text holds are taken from it (a shape is the plan's and the schema's, never a
# value of the data), rebuilt from the digits matched; nothing else of it is sent.
_MATMUL_SHAPES = re.compile(r"mat1 and mat2 shapes cannot be multiplied "
                            r"\((\d+)x(\d+) and (\d+)x(\d+)\)")
_TENSOR_SIZES = re.compile(r"The size of tensor a \((\d+)\) must match the size of "
                           r"tensor b \((\d+)\) at non-singleton dimension (\d+)")
_CHANNELS = re.compile(r"to have (\d+) channels, but got (\d+) channels")
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")
_SMALLER = ("lower the plan's train.batch_size, or use a smaller model, or free memory "
            "on this appliance")


def library_error_kind(exc: BaseException) -> str:
    """What a library's error means for the plan, in words the ML engineer acts on,
    or "" when it is not one of the common kinds: out of memory (GPU or host), a
    layer whose width does not fit its input, tensors whose sizes differ, an image's
    channels, a label outside the model's classes. Sizes only, rebuilt from digits;
    never a value or a path from the error's text."""
    text = str(exc)
    lowered = text.lower()
    torch_oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)
    if (isinstance(exc, MemoryError) or (torch_oom is not None and isinstance(exc, torch_oom))
            or any(words in lowered for words in _OUT_OF_MEMORY)):
        where = ("GPU memory" if "cuda" in lowered or "gpu" in lowered else
                 "host memory")
        return f"out of memory ({where}) while training: {_SMALLER}"
    if (found := _MATMUL_SHAPES.search(text)) is not None:
        rows, given, takes, width = (int(g) for g in found.groups())
        return (f"a layer of the plan's model takes {takes} inputs but is given {given} "
                f"(tensor shapes {rows}x{given} and {takes}x{width}): the model's widths "
                "(model.params) do not fit this site's data")
    if (found := _TENSOR_SIZES.search(text)) is not None:
        a, b, dim = (int(g) for g in found.groups())
        return (f"tensor sizes {a} and {b} differ at dimension {dim}: the plan's model "
                "output does not fit this site's labels (model.params)")
    if (found := _CHANNELS.search(text)) is not None:
        takes, given = (int(g) for g in found.groups())
        return (f"the plan's model takes {takes}-channel images but is given {given} "
                "channels (model.params.in_channels)")
    if isinstance(exc, IndexError) and "out of bounds" in lowered:
        return ("a label is outside the plan's model's classes (model.params.classes or "
                "out_features)")
    return ""


# An OSError's text names its file after the error ("[Errno 28] No space left on
# device: '/var/lib/fedge/privacy/ledger.json'", and "-> 'dst'" for a rename); an
# absolute path stands anywhere in a text fedge made (a reveal log's "... {path} ...").
_OS_ERROR_FILES = re.compile(r"(\[Errno -?\d+\] [^:'\"\[\]]+?): (['\"]).*?\2"
                             r"(?: -> (['\"]).*?\3)?")
_ABSOLUTE_PATH = re.compile(r"(?<![\w/.~)\]-])/(?=[\w.~-])[^\s'\"(),;]*")
A_PATH = "(a path on this appliance)"


def without_appliance_paths(text: str, paths: Sequence[str | Path] = ()) -> str:
    """``text`` less the appliance's paths, for a reason the coordinator keeps (a
    secure-aggregation abort, a health probe's failure): ``paths`` and any absolute
    path become ``A_PATH``, the file an OSError's text names is dropped (its
    ``[Errno N] strerror`` stays). The whole text is for this site's journal."""
    for path in sorted((str(q) for q in paths if str(q) not in ("", ".")),
                       key=len, reverse=True):
        text = text.replace(path, A_PATH)
    text = _OS_ERROR_FILES.sub(r"\1", text)
    return _ABSOLUTE_PATH.sub(A_PATH, text)


def public_reason(exc: BaseException, paths: Sequence[str] = ()) -> str:
    """``exc`` as a refusal may say it to the coordinator: a ``DataError``'s public
    form; an error of fedge's own checks with its text (less the data set ``paths``);
    an OSError's kind (``strerror``, not the file it names); a library's error of a
    common kind in fedge's words (:func:`library_error_kind`: out of memory, sizes
    that do not fit); anything else as its type alone, the rest in this site's
    journal."""
    from fedge.train.data import DataError

    if isinstance(exc, DataError):
        return f"{exc.public} ({SEE_JOURNAL})"
    kind = type(exc).__name__
    if isinstance(exc, OSError):
        return f"{kind}: {exc.strerror or 'error'} ({SEE_JOURNAL})"
    if _raised_by_fedge(exc):
        return f"{kind}: {without_paths(str(exc), paths)}"
    known = library_error_kind(exc)
    if known:
        return f"{known} ({kind}; {SEE_JOURNAL})"
    return f"{kind} ({SEE_JOURNAL})"


def journal_error(what: str, exc: BaseException) -> None:
    """Log why ``what`` failed in this site's journal, at WARNING without the text
    of a cell (a ``DataError``'s ``journal`` form; a library's error by its type, as
    its text may quote a value), the rest at DEBUG."""
    from fedge.train.data import DataError

    if isinstance(exc, DataError):
        log.warning("%s: %s", what, exc.journal)
        if exc.holds_value:
            log.debug("%s: %s", what, exc)
    elif isinstance(exc, OSError) or _raised_by_fedge(exc):
        log.warning("%s: %s: %s", what, type(exc).__name__, exc)
    else:
        known = library_error_kind(exc)
        log.warning("%s: %s%s (its text, which may quote a value of the data, is logged "
                    "at DEBUG level)", what, type(exc).__name__, f": {known}" if known else "")
        log.debug("%s: %s: %s", what, type(exc).__name__, exc, exc_info=exc)


def _check_cancel(cancel: threading.Event | None, when: str) -> None:
    """Raises: TrainingCancelled: ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        from fedge.train.api import TrainingCancelled

        raise TrainingCancelled(f"training cancelled {when}")


@dataclass
class LocalResult:
    weights: np.ndarray
    n_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    # DP-SGD: this job's ε at this site once this update is released
    epsilon: float = 0.0
    # SCAFFOLD: Δc_i = c_i⁺ − c_i (float32[d]); None for other strategies
    delta_control: np.ndarray | None = None
    # Charges this run in the site's privacy ledger, on disk (fsynced) when it returns;
    # set for every run TorchTrainer trains, with or without DP (a run without DP is
    # charged as it trains already: its exact metrics leave in TrainDone; calling it
    # again charges nothing more). The agent calls it before anything that can reveal
    # the update leaves (the masked input, or a plain update), and sends nothing if it
    # raises OSError (the run then stays pending, uncounted). None: nothing to charge.
    release_privacy: Callable[[], None] | None = None


class Trainer(Protocol):
    # data sets declared in agent.toml whose table is refused, and why: not held
    unusable: Mapping[str, str]

    def datasets(self) -> list[str]: ...

    def train(self, site: str, job: str, plan: Plan, weights: np.ndarray, *, round: int,
              seed: int, server_control: np.ndarray | None = None,
              client_control: np.ndarray | None = None,
              cancel: threading.Event | None = None,
              task_id: str | None = None) -> LocalResult:
        """``cancel``: set when the task's round is aborted or superseded; training
        checks it every step and raises ``TrainingCancelled``. ``task_id``: the
        coordinator's task, for the privacy ledger's entry of a run charged as it
        trains (one without DP), so that the round's one save records it."""
        ...

    def evaluate(self, plan: Plan, weights: np.ndarray, split: str, *,
                 job: str | None = None) -> tuple[int, dict[str, float]]:
        """``job``: the job whose model this is; it is evaluated on the version of the
        data that job trains on (a re-export read since is not), as TorchTrainer does."""
        ...


def declared_but_refused(name: str, why: str) -> str:
    """The refusal of a task naming a data set whose agent.toml table is refused
    (``why``: ``TorchTrainer.unusable``'s, which names no path)."""
    return f"data set {name!r} is declared in this appliance's agent.toml but refused: {why}"


def check_data_fits_model(plan: Plan, data: Any) -> None:
    """Where the site's data meets the plan: an image data set's size must be the
    model's ``image_size``. The network pools over any size, so a mismatch would train
    without error on images of another scale than the exported model takes (and than
    the other sites use).

    Raises: TaskRefusal: the sizes differ (naming both and where each is set)."""
    from fedge.train.models import ModelSpec, input_shape

    try:
        want = input_shape(ModelSpec(plan.model_name, dict(plan.model_params)))
    except (KeyError, ValueError, TypeError):
        return  # training or evaluation names what is wrong with the model
    x = data.train.x
    if x.ndim == 4 and len(want) == 3 and tuple(x.shape[2:]) != tuple(want[1:]):
        raise TaskRefusal(
            f"data set {data.name!r} is loaded at {x.shape[2]}x{x.shape[3]} pixels at this "
            f"site (agent.toml datasets.image_size = {x.shape[2]}) but the plan's model "
            f"takes {want[1]}x{want[2]} (model.params.image_size = {want[1]}, what the "
            "exported model expects): set the same image_size in the plan and in every "
            "site's agent.toml")


def refuse_fitted_standardisation(plan: Plan, spec: Any, data: Any) -> None:
    """Record-level DP-SGD (the plan's ``privacy.dp``) on a data set standardised
    with constants fitted on its training rows (``standardise`` = "continuous", the
    default, or "all"): replacing one record moves the mean and scale, and so every
    other record's features and gradients, and the ε DP-SGD reports (one record
    moves one clipped gradient) does not hold. ``"bounds"`` (public constants) and
    ``"none"`` are fine, as are images (not standardised). DP-FedAvg alone is not
    affected (its neighbour is a whole site's data), nor is evaluation (ε covers
    training only).

    Raises: TaskRefusal: naming the data set, the setting, why, and the fix."""
    from fedge.train.data import (
        DP_FITTED_STANDARDISE_FIX,
        DP_FITTED_STANDARDISE_WHY,
        FITTED_STANDARDISE_MODES,
    )

    if plan.privacy.get("dp") is None or data.standardiser is None:
        return
    if spec.standardise in FITTED_STANDARDISE_MODES:
        default = ", the default" if spec.standardise == "continuous" else ""
        raise TaskRefusal(
            f"data set {spec.name!r} is standardised at this site with constants fitted "
            f"on its own training rows (agent.toml datasets.standardise = "
            f"{spec.standardise!r}{default}): {DP_FITTED_STANDARDISE_WHY}. "
            f"Declare public constants instead: {DP_FITTED_STANDARDISE_FIX}")


def train_config_dict(plan: Plan, seed: int) -> dict[str, Any]:
    """The plan's training recipe in ``fedge.train.api.TrainConfig`` terms.

    The plan's ``[privacy]`` table may hold ``dp`` and ``client_dp`` sub-tables;
    they are passed through unchanged.
    """
    t = plan.train
    cfg: dict[str, Any] = {
        "epochs": t.epochs or 1,
        "batch_size": t.batch_size,
        "optimizer": t.optimizer,
        "lr": t.learning_rate,
        "momentum": t.momentum,
        "weight_decay": t.weight_decay,
        "prox_mu": plan.prox_mu,
        "scaffold": plan.scaffold,
        "seed": seed,
        "device": "cpu",
    }
    if t.steps is not None:
        cfg["steps"] = t.steps
    for key in ("dp", "client_dp"):
        if key in plan.privacy:
            cfg[key] = plan.privacy[key]
    return cfg


def check_dataset_tables(tables: Sequence[Mapping[str, Any]]) -> None:
    """What agent.toml's ``[[datasets]]`` tables must get right for the agent to start:
    each value's type and range (``DatasetSpec.check_values``) and a name of its own.
    A table that breaks a rule between keys is not refused here: ``TorchTrainer`` leaves
    it out and refuses its tasks, naming why.

    Raises:
        ValueError: naming the table (its place in the file and its name) and the key,
            or the two tables that share a name.
    """
    from fedge.train.data import DatasetSpec

    for i, table in enumerate(tables):
        try:
            DatasetSpec.check_values(table)
        except ValueError as exc:
            raise ValueError(f"{_dataset_table(i, table)}: {exc}") from None
    _check_dataset_names_unique(tables)


def _dataset_table(i: int, table: Mapping[str, Any]) -> str:
    named = f" (name = {table['name']!r})" if "name" in table else ""
    return f"[[datasets]] table {i + 1}{named}"


def _check_dataset_names_unique(tables: Sequence[Mapping[str, Any]]) -> None:
    """Raises: ValueError: two tables whose names are one (NFC, as plans' names are
    read), naming both: one of them would be trained on, unsaid which."""
    first: dict[str, int] = {}
    for i, table in enumerate(tables):
        name = table.get("name")
        if not isinstance(name, str):
            continue
        name = unicodedata.normalize("NFC", name)
        if name in first:
            j = first[name]
            raise ValueError(
                f"{_dataset_table(j, tables[j])} and {_dataset_table(i, table)} have one "
                "name; each data set needs a name of its own, the name a plan's "
                "job.dataset gives")
        first[name] = i


def ledger_path(state_dir: Path) -> Path:
    """Where an agent keeps its privacy ledger (``fedge agent privacy`` reads it)."""
    return Path(state_dir) / "privacy" / "ledger.json"


class TorchTrainer:
    """Local training with ``fedge.train.api`` on the agent's ``[[datasets]]``.

    A data set table this release refuses (an invalid key or value; after an upgrade,
    a rule the older release did not have, such as tabular ``features``) is left out,
    not fatal: it is logged at start, not offered in heartbeats, and a task naming it
    is refused with the reason. The appliance stays up, its other data sets, its
    health reports and its signed updates with it, while someone fixes agent.toml.

    A data set is read when a task first needs it and kept in memory; a job keeps
    the version it began on for all its rounds (while it is among the ``held_jobs``
    used last), and a job that begins later gets the newest: when its file or
    folder changed since it was read (:func:`source_version`; a data manager's
    corrected re-export, say), it is read again, and the journal says so once.
    """

    def __init__(self, dataset_tables: Sequence[Mapping[str, Any]], *,
                 state_dir: Path | None = None, held_jobs: int = HELD_JOBS,
                 max_colluders: int = 0) -> None:
        """``max_colluders``: the site's agent.toml ``[privacy] max_colluders``, the
        sites it assumes could collude with the coordinator; its DP-FedAvg noise share
        is sized for the cohort less them (``fedge.train.privacy``).

        Raises: ValueError: ``held_jobs`` below 1, ``max_colluders`` below 0, two
            tables of one name (naming both; agent.toml's loader refuses them first)."""
        _check_dataset_names_unique(dataset_tables)
        if isinstance(max_colluders, bool) or not isinstance(max_colluders, int) \
                or max_colluders < 0:
            raise ValueError(f"max_colluders={max_colluders!r} must be an integer >= 0")
        self.max_colluders = max_colluders
        from fedge.train.accounting import PrivacyLedger
        from fedge.train.api import DatasetSpec

        # One privacy ledger for every job this site runs, kept on disk so the
        # budget spent survives a restart (per job and in total).
        self._ledger_path = ledger_path(state_dir) if state_dir is not None else None
        if state_dir is not None:  # what a write killed mid-way (SIGKILL, power cut) left
            for written in (Path(state_dir) / "jobs", ledger_path(state_dir).parent):
                remove_stale_temps(written)
        self._ledger = (PrivacyLedger.load(self._ledger_path) if self._ledger_path
                        else PrivacyLedger())
        # Each job's place in its stream of shuffled epochs, kept on disk too, so a
        # restarted agent trains on the rows an uninterrupted one would; and the
        # standardisation it trains with, so its model installed after a restart is
        # served with it (statistics of the site's rows: kept here, never sent).
        self._job_state = (JobStateStore(Path(state_dir) / "jobs") if state_dir is not None
                           else None)
        self._specs: dict[str, DatasetSpec] = {}
        # data set name -> why its table is refused, as the coordinator may be told it
        # (no path; the journal has the whole message)
        self.unusable: dict[str, str] = {}
        for i, table in enumerate(dataset_tables):
            try:
                spec = DatasetSpec.from_config(table)
            except (ValueError, TypeError) as exc:
                name = table.get("name")
                name = (unicodedata.normalize("NFC", name) if isinstance(name, str) and name
                        else f"[[datasets]] #{i + 1}")
                self.unusable[name] = without_paths(str(exc), [table.get("path")])
                log.error("data set %r in agent.toml left out, its tasks refused until the "
                          "table is fixed: %s", name, exc)
                continue
            self._specs[spec.name] = spec
        # Each data set's newest version, as its source held it when last looked at:
        # what a job that has not begun on the data set gets (a re-export is read then)
        self._data: dict[str, DataVersion] = {}
        # Each job's HeldJob (its ClientState, and the version of each data set it began
        # on), for the ``held_jobs`` jobs used last: a job dropped here and trained again
        # restores its data cursor from the job state on disk and takes the data sets'
        # newest versions, as after a restart (c_i comes from the agent with every task;
        # the ledger is one for all jobs). An earlier version of a data set stays in
        # memory while a job held here began on it, no longer.
        self._states = RecentJobs(held_jobs)
        self._lock = threading.Lock()

    def datasets(self) -> list[str]:
        return sorted(self._specs)

    @property
    def privacy_ledger(self) -> Any:
        """This site's privacy ledger (``fedge.train.accounting.PrivacyLedger``), every
        job's runs: what the agent checks its ε caps against before a task trains."""
        return self._ledger

    def _refuse_unusable(self, name: str) -> None:
        """Raises: TaskRefusal: ``name`` is declared in agent.toml but its table is
        refused (the reason names the rule), so a task naming it says what to fix."""
        name = unicodedata.normalize("NFC", name)
        if name in self.unusable:
            raise TaskRefusal(declared_but_refused(name, self.unusable[name]))

    def standardisation(self, name: str, *, job: str | None = None
                        ) -> tuple[Any, Any, list[str]] | None:
        """This site's standardiser for data set ``name`` (mean, scale, feature names),
        fitted on its training split exactly as training uses it: as job ``job`` trained
        with it: from the version of the data set it holds while that job is held (one
        of the ``held_jobs`` used last); after an agent restart or the job's eviction
        from memory, from the job's state on disk (kind ``standardisation``, written when
        the job took its version of the data set, :meth:`_keep_standardisation`);
        otherwise, and for no job, as the data set's newest version does. None when the
        site does not hold the data set or it is not tabular.

        A model pushed to the appliance asks with its ``job_id`` (SiteModels): a
        re-export of the data set since the job began would otherwise scale the served
        rows with other constants than training's. Asking holds no job: the install of
        a finished job's model must not push a running job's state out of memory. A job
        whose constants are neither held nor on disk (a trainer without a state
        directory; a job whose state was pruned, being older than the newest 32 trained,
        or written by a release before these were kept) gets the newest version's,
        logged. The constants on disk are read, never written here (an unreadable file
        is logged and left where it is).

        Raises:
            TaskRefusal: the data set is declared but cannot be loaded (names why).
        """
        name = unicodedata.normalize("NFC", name)  # as agent.toml names were read
        self._refuse_unusable(name)
        if name not in self._specs:
            return None
        held_version: DataVersion | None = None
        saved: TrainedStandardisation | None = None
        if job is not None:
            with self._lock:
                held = self._states.get(job)
                held_version = held.data.get(name) if held is not None else None
                saved = (self._saved_standardisation(name, job) if held_version is None
                         else None)
            if saved is not None:
                return saved.mean, saved.scale, list(saved.feature_names)
            if held_version is None:
                log.info("data set %r: job %s's version of it is not held here (the job "
                         "is not one of the %d used last since the agent started); its "
                         "newest version's standardisation is used", name, job,
                         self._states.held)
        data = held_version.data if held_version is not None else self._site_data(name)
        if data.standardiser is None:
            return None
        return data.standardiser.mean, data.standardiser.scale, list(data.feature_names)

    def _saved_standardisation(self, name: str, job: str) -> TrainedStandardisation | None:
        """The constants job ``job`` trained with on data set ``name`` as its state on
        disk keeps them (:meth:`_keep_standardisation`); None when there are none or
        they cannot be read (then logged, the file left as it is). Called with
        ``self._lock`` held, so that no write of the job's state is under way."""
        if self._job_state is None:
            return None
        path = self._job_state.path(job, STANDARDISATION)
        arrays = self._job_state.peek(job, STANDARDISATION)
        if not arrays:
            if path.exists():
                log.error("job %s: its standardisation constants in %s cannot be read (or "
                          "belong to another job); the file is left as it is", job, path)
            return None
        try:
            saved = standardisations(arrays).get(name)
        except ValueError as exc:
            log.error("job %s: its standardisation constants in %s cannot be used: %s; "
                      "the file is left as it is", job, path, exc)
            return None
        if saved is None:
            return None
        now = source_version(self._specs[name].path)
        try:
            fields = json.loads(saved.source)
            then = SourceVersion(**{**fields, "inode": tuple(fields.get("inode", (0, 0)))})
            since = (f"; the data set's {now.kind} has changed since ("
                     f"{now.differences(then)})" if now != then else
                     "; the data set's source has not changed since")
        except (ValueError, TypeError):
            since = ""
        log.info("data set %r: job %s is not held here (not one of the %d used last since "
                 "the agent started); the standardisation it trained with, kept in its job "
                 "state on disk, is used%s", name, job, self._states.held, since)
        return saved

    def _keep_standardisation(self, name: str, job: str, version: DataVersion) -> None:
        """Keep on disk the standardisation job ``job`` now trains with on data set
        ``name`` (``version``'s, the version it just took), for the install of its model
        after a restart (:meth:`standardisation`). Written when the job takes a version,
        the point from which its constants are final: it keeps that version for all its
        rounds while held, and one it takes again (after a restart, or its eviction
        from memory) replaces them, as its later rounds train with the new ones.
        Nothing for a data set without a standardiser (images). Kept at this site only,
        never sent (statistics of its patients' rows): the job state's file mode (0600).
        A failed write is logged; the task goes on (only a model installed after a
        restart would get the newest version's constants, logged then). Called with
        ``self._lock`` held."""
        std = version.data.standardiser
        if self._job_state is None or std is None:
            return
        try:
            kept = TrainedStandardisation(
                name, std.mean, std.scale, tuple(version.data.feature_names),
                json.dumps(dataclasses.asdict(version.source)))
            try:
                entries = standardisations(self._job_state.peek(job, STANDARDISATION))
            except ValueError:  # replaced whole: what could not be read is of no use
                entries = {}
            entries.pop(name, None)
            self._job_state.save(job, STANDARDISATION,
                                 standardisation_arrays({**entries, name: kept}))
        except (OSError, ValueError) as exc:
            log.error("job %s: the standardisation of data set %r it trains with is not "
                      "kept on disk (%s); a model of this job installed after an agent "
                      "restart gets the data set's newest version's", job, name, exc)

    def dataset_spec(self, name: str) -> DatasetSpec | None:
        """Data set ``name``'s agent.toml table as this release parsed it (no data is
        read); None when the site does not hold it or its table was refused
        (``unusable`` says why). ``name`` is NFC-normalised, as agent.toml names were."""
        return self._specs.get(unicodedata.normalize("NFC", name))

    def class_names(self, name: str) -> tuple[str, ...] | None:
        """The classes this site declares for data set ``name`` in label order (an
        image data set's ``classes``); None when it does not hold it or names none."""
        spec = self.dataset_spec(name)
        return (spec.classes or None) if spec is not None else None

    def load_data(self, name: str, job: str | None = None) -> None:
        """Load data set ``name`` as job ``job`` uses it (:meth:`_site_data`) now, kept in
        memory: the agent does it before a task's training or evaluation, so that a slow
        first load (a large image set, or its re-export) is not counted against the
        plan's deadline for the task. A job that holds its version already costs
        nothing here: its source is neither looked at (a folder's walk, one ``stat`` per
        image) nor read again, whatever happened to it; so a re-export that lands
        mid-job is read by the first task of a job that begins later, not by the
        running job's next round, which would not use it. Without ``job``: the
        newest version.

        Raises: TaskRefusal: as :meth:`_site_data`."""
        self._site_data(name, job)

    def _site_data(self, name: str, job: str | None = None) -> Any:
        """Data set ``name`` as job ``job`` uses it: the version it began on while the
        job is held (its source is not looked at again, whatever happened to it);
        otherwise, and for no job, the newest version (:meth:`_newest`), which a job
        then keeps for all its rounds.

        Raises: TaskRefusal: the data set is refused, not held here, or cannot be
        loaded (the reason names no cell and no path)."""
        name = unicodedata.normalize("NFC", name)
        with self._lock:
            self._refuse_unusable(name)
            if name not in self._specs:
                raise TaskRefusal(f"data set {name!r} is not held here (held: "
                                  f"{', '.join(sorted(self._specs)) or 'none'})")
            held = self._states.touch(job) if job is not None else None
            if held is not None and name in held.data:
                return held.data[name].data
            version = self._newest(name)
            if job is not None:
                self._states.hold(job, held if held is not None else HeldJob()).data[name] = version
                self._keep_standardisation(name, job, version)
            return version.data

    # A load during which the source changed (an export still being written) is
    # tried again this many times in all, then refused.
    LOAD_TRIES = 2

    def _newest(self, name: str) -> DataVersion:
        """Data set ``name`` as its source holds it now: the version in memory when its
        source is unchanged (:func:`source_version`), else read again, logged at INFO
        once. Called with ``self._lock`` held.

        Raises: TaskRefusal: it cannot be loaded, or kept changing while it was read."""
        spec = self._specs[name]
        source = source_version(spec.path)
        earlier = self._data.get(name)
        if earlier is not None and earlier.source == source:
            return earlier
        self._data.pop(name, None)  # held on by the jobs that began on it, if any
        started = time.monotonic()
        try:
            version = read_source(spec, self.LOAD_TRIES, source=source)
        except SourceChanging as exc:
            # being written: said so (no path), and the read's error, if any, as above
            if exc.error is None:
                raise TaskRefusal(f"data set {name!r} cannot be loaded: {exc}") from exc
            journal_error(f"data set {name!r} cannot be loaded", exc.error)
            raise TaskRefusal(f"data set {name!r} cannot be loaded: "
                              f"{public_reason(exc.error, self._paths())}; {exc}") from exc.error
        except (OSError, ValueError) as exc:
            # the coordinator keeps the reason for good: no cell, no path
            journal_error(f"data set {name!r} cannot be loaded", exc)
            raise TaskRefusal(f"data set {name!r} cannot be loaded: "
                              f"{public_reason(exc, self._paths())}") from exc
        source, data = version.source, version.data
        # how long a load takes, so that IT can size agent.toml's data_load_s (the
        # agent counts itself stuck past it and systemd restarts it, the load lost)
        log.info("data set %r loaded in %.1f s: %s", name, time.monotonic() - started,
                 describe_size(data))
        if earlier is not None:
            log.info("data set %r re-read: its %s changed since it was loaded (%s); jobs "
                     "that began on the earlier version keep it for their remaining rounds",
                     name, source.kind if source.kind != "missing" else "source",
                     source.differences(earlier.source))
        self._data[name] = version
        return version

    def _paths(self) -> list[str]:
        """The data sets' paths, which no outbound reason names."""
        return [spec.path for spec in self._specs.values()]

    def train(self, site: str, job: str, plan: Plan, weights: np.ndarray, *, round: int,
              seed: int, server_control: np.ndarray | None = None,
              client_control: np.ndarray | None = None,
              cancel: threading.Event | None = None,
              task_id: str | None = None) -> LocalResult:
        """SCAFFOLD plans need ``server_control`` (c); ``client_control`` is this site's
        c_i at the start of the round (None: zeros). The agent owns c_i, so a retried
        round starts from the same c_i.

        ``cancel`` (the round was aborted or superseded) is checked before the data
        set is loaded, before every step and once more when training returns: a
        cancelled run raises ``TrainingCancelled`` and releases nothing (a run that
        finished training stays pending in the ledger, uncounted; its cursor is
        not saved).

        The job trains on the version of the data set it began on (class docstring).

        Every run is recorded in the privacy ledger, with its mechanism (DP-SGD,
        DP-FedAvg or none), and saved: a DP run pending, charged by the result's
        ``release_privacy`` (the agent calls it before the update can leave); a run
        without DP charged at once, since its exact ``train_loss`` leaves in the
        TrainDone that follows (its ``release_privacy`` then charges nothing more);
        that entry gets ``task_id`` now, so the agent's release saves nothing again.

        Raises: TaskRefusal: missing data set, a plan this site cannot run (an image
        size other than the model's, say; DP-SGD on a data set standardised with
        constants fitted on its rows, `refuse_fitted_standardisation`; a DP-FedAvg
        cohort_size not above ``max_colluders``), or a round
        whose privacy ledger cannot be saved (the update is withheld; the reason
        gives the error's kind, the journal the ledger's path too).
        TrainingCancelled: ``cancel`` was set.
        """
        from fedge.train.api import ModelSpec, TrainConfig, local_train

        _check_cancel(cancel, "before training")
        data = self._site_data(plan.dataset, job)
        check_data_fits_model(plan, data)
        refuse_fitted_standardisation(plan, self.dataset_spec(plan.dataset), data)
        try:
            spec = ModelSpec(plan.model_name, dict(plan.model_params))
            cfg = TrainConfig.from_dict(train_config_dict(plan, seed))
        except (KeyError, ValueError, TypeError) as exc:
            raise TaskRefusal(f"plan cannot run here: {exc}") from exc
        if cfg.client_dp is not None:
            from fedge.train.privacy import honest_sites

            try:  # DP-FedAvg noise sized for the honest sites: some must be left
                honest_sites(cfg.client_dp, self.max_colluders)
            except ValueError as exc:
                raise TaskRefusal(str(exc)) from exc
        state = self._job_client_state(job)
        state.scaffold_ci = (None if client_control is None
                             else np.array(client_control, dtype=np.float32))
        try:
            out = local_train(spec, np.asarray(weights, dtype=np.float32), data, cfg,
                              round=round, state=state, server_control=server_control,
                              rounds=plan.rounds,
                              min_site_examples=plan.privacy.get("min_site_examples"),
                              cancel=cancel, max_colluders=self.max_colluders)
        except TRAINING_ERRORS as exc:
            journal_error(f"job {job} round {round}: local training failed", exc)
            raise TaskRefusal("local training failed: "
                              f"{public_reason(exc, self._paths())}") from exc
        # cancelled as it ended: the run is in the ledger pending (never released) and
        # the agent sends nothing
        _check_cancel(cancel, "when training ended")
        if self._job_state is not None and state.cursors:
            try:
                self._job_state.save(job, "cursors", state.cursor_arrays())
            except OSError as exc:  # the update stands; only a restart would lose it
                log.error("job %s: data cursor not saved: %s", job, exc)
        if self._job_state is not None:
            try:  # pruned as the jobs trained last, as the cursors are
                self._job_state.touch(job, STANDARDISATION)
            except OSError as exc:
                log.warning("job %s: its kept standardisation not marked as used: %s",
                            job, exc)
        if out.local_metrics:  # for this hospital's journal only; never sent
            log.info("job %s round %d: %s (kept at this site)", job, round,
                     ", ".join(f"{k}={v:.4g}" for k, v in sorted(out.local_metrics.items())))
        release: Callable[[], None] | None = None
        if out.ledger_key is not None:
            from fedge.train.accounting import NO_DP

            # the run is on disk pending (so `fedge agent privacy` shows a run that
            # trained and never left, even after a crash); it is charged on release.
            # Without DP its exact train_loss leaves in TrainDone: charged now.
            exact = self._ledger.entry(out.ledger_key).get("mechanism") == NO_DP
            from fedge.agent.guard import plan_digest

            # what a data-protection officer asks of the run (fedge agent privacy --runs)
            self._ledger.describe(
                out.ledger_key, dataset=plan.dataset, plan_digest=plan_digest(plan.text),
                max_grad_norm=None if cfg.dp is None else cfg.dp.max_grad_norm,
                delta=None if cfg.dp is None else cfg.dp.delta)
            with self._lock:
                try:
                    if exact:  # with the task id: the round's only save of the ledger
                        self._ledger.release(out.ledger_key, path=self._ledger_path,
                                             task_id=task_id or None)
                    elif self._ledger_path is not None:
                        self._ledger.save(self._ledger_path)
                except OSError as exc:  # disk full: no update leaves without its record
                    log.error("job %s round %d: privacy ledger %s cannot be saved: %s; the "
                              "update is withheld", job, round, self._ledger_path, exc)
                    # the coordinator keeps the reason: the kind of error, not the path
                    kind = (f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None
                            and exc.strerror else without_appliance_paths(
                                str(exc) or type(exc).__name__, [self._ledger_path or ""]))
                    raise TaskRefusal(f"the privacy ledger cannot be saved: {kind} "
                                      f"({SEE_JOURNAL}); the update is withheld") from exc
            release = functools.partial(self._ledger.release, out.ledger_key,
                                        path=self._ledger_path)
        return LocalResult(np.ascontiguousarray(out.weights, dtype=np.float32), out.n_examples,
                           {k: float(v) for k, v in out.metrics.items()},
                           float(out.epsilon or 0.0), out.extra.get("scaffold_delta_c"),
                           release)

    def _job_client_state(self, job: str) -> Any:
        """``job``'s ClientState, made (its data cursor restored from disk) when it is
        not held; holding it makes it the newest, and the oldest beyond ``held_jobs``
        goes. A state dropped while a round of its job trains is the round's still."""
        from fedge.train.api import ClientState

        with self._lock:
            held = self._states.touch(job)
        if held is not None and held.state is not None:
            return held.state
        state = ClientState(job=job, ledger=self._ledger)
        if self._job_state is not None:
            try:
                state.restore_cursors(self._job_state.load(job, "cursors"))
            except ValueError as exc:
                log.error("job %s: saved data cursor ignored: %s", job, exc)
        with self._lock:
            held = self._states.hold(job, HeldJob())
            if held.state is None:  # else one made meanwhile by another thread
                held.state = state
            return held.state

    def evaluate(self, plan: Plan, weights: np.ndarray, split: str, *,
                 job: str | None = None) -> tuple[int, dict[str, float]]:
        """On the version of the data set job ``job`` began on, while it is held (as its
        training); otherwise, and for no job, on the newest.

        Raises: TaskRefusal: missing data set or a model that does not fit it (an
        image size other than the model's, say)."""
        from fedge.train.api import ModelSpec, evaluate

        data = self._site_data(plan.dataset, job)
        check_data_fits_model(plan, data)
        try:
            out = evaluate(ModelSpec(plan.model_name, dict(plan.model_params)),
                           np.asarray(weights, dtype=np.float32), data, split)
        except TRAINING_ERRORS as exc:
            journal_error(f"evaluation of data set {plan.dataset!r} failed", exc)
            raise TaskRefusal("evaluation failed: "
                              f"{public_reason(exc, self._paths())}") from exc
        return out.n_examples, {k: float(v) for k, v in out.metrics.items()}


class SyntheticTrainer:
    """Trivial local training for benchmarks and protocol tests.

    The "local model" is the global one moved towards a per-site target:
    w ← w + lr·(target_site − w), target drawn from a generator seeded by the
    site name, so the federated optimum is the count-weighted mean of the
    targets. ``n_examples`` is fixed per site. That is K gradient steps
    (K = plan ``train.steps``, 1 with ``train.epochs``) on ½‖w − target‖²; under
    SCAFFOLD each step is corrected, y ← y − lr·((y − target) − c_i + c), and
    Δc_i = c_i⁺ − c_i with option II's c_i⁺ = c_i − c + (w − y)/(K·lr).
    """

    unusable: Mapping[str, str] = MappingProxyType({})  # every table is its own

    def __init__(self, site: str, *, dataset: str = "synthetic", n_examples: int = 100,
                 scale: float = 0.1) -> None:
        self.site = site
        self.dataset = unicodedata.normalize("NFC", dataset)  # as a plan's job.dataset
        self.n_examples = n_examples
        self.scale = scale
        self._seed = int.from_bytes(hashlib.sha256(site.encode()).digest()[:8], "little")
        self._target: np.ndarray | None = None

    def datasets(self) -> list[str]:
        return [self.dataset]

    def target(self, d: int) -> np.ndarray:
        if self._target is None or self._target.size != d:
            rng = np.random.default_rng(self._seed)
            self._target = (rng.standard_normal(d) * self.scale).astype(np.float32)
        return self._target

    def train(self, site: str, job: str, plan: Plan, weights: np.ndarray, *, round: int,
              seed: int, server_control: np.ndarray | None = None,
              client_control: np.ndarray | None = None,
              cancel: threading.Event | None = None,
              task_id: str | None = None) -> LocalResult:
        """Raises: TaskRefusal: the plan asks for another data set, or SCAFFOLD
        without a server control variate of length d. TrainingCancelled: ``cancel``
        was set."""
        _check_cancel(cancel, "before training")
        if plan.dataset != self.dataset:
            raise TaskRefusal(f"data set {plan.dataset!r} is not held here")
        w = np.asarray(weights, dtype=np.float32)
        lr = np.float32(min(1.0, plan.train.learning_rate))
        k = plan.train.steps or 1
        target = self.target(w.size)
        loss = float(np.mean((w - target) ** 2))
        if not plan.scaffold:
            new = w
            for _ in range(k):
                new = (new + lr * (target - new)).astype(np.float32)
            return LocalResult(new, self.n_examples, {"loss": loss})
        if server_control is None or np.asarray(server_control).shape != w.shape:
            raise TaskRefusal(f"scaffold needs a server control variate of length {w.size}")
        c = np.asarray(server_control, dtype=np.float32)
        ci = (np.zeros_like(w) if client_control is None
              else np.asarray(client_control, dtype=np.float32))
        new = w
        for _ in range(k):
            new = (new - lr * ((new - target) - ci + c)).astype(np.float32)
        ci_new = ci - c + (w - new) / (np.float32(k) * lr)
        return LocalResult(new, self.n_examples, {"loss": loss},
                           delta_control=(ci_new - ci).astype(np.float32))

    def evaluate(self, plan: Plan, weights: np.ndarray, split: str, *,
                 job: str | None = None) -> tuple[int, dict[str, float]]:
        w = np.asarray(weights, dtype=np.float32)
        return self.n_examples, {"loss": float(np.mean((w - self.target(w.size)) ** 2))}
