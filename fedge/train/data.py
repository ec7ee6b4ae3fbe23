"""Data adapters: what a hospital declares in its agent config, loaded and checked.

An agent config lists its data sets as ``[[datasets]]`` tables; each becomes a
``DatasetSpec``. ``load_site_data`` reads the file(s), validates every row,
splits off a local validation set with a fixed seed, and standardises the
features: by default with a standardiser fitted on the site's own training rows
only (never validation or test rows, never another site's data).

``standardise`` says how (tabular and numpy data; images are not standardised):

- ``"continuous"`` (default): z-score each column that is not all 0/1, with the
  mean and standard deviation of the training rows;
- ``"all"``: z-score every column likewise;
- ``"none"``: every column as it is;
- ``"bounds"``: public constants only. ``feature_bounds`` declares, for some
  columns, a range [lo, hi] the hospital may publish (``age_at_index = [0, 120]``);
  each such column is clamped to it and mapped by (x - mid) / half_width, mid =
  (lo + hi) / 2, half_width = (hi - lo) / 2, into [-1, 1]; the other columns are
  used as they are.

Record-level DP-SGD needs ``"bounds"`` or ``"none"``: with constants fitted on the
training rows, replacing one record moves every other record's features, so the
sensitivity DP-SGD's ε assumes (one record moves one clipped gradient) does not
hold. The agent refuses a DP-SGD task on a data set standardised from its data
(``fedge.agent.trainer``). In ``"bounds"`` mode no statistic of the data is used:
a record's features depend on that record alone.

Kinds:

- ``tabular``: CSV or Parquet with a header; declared ``features`` (required:
  the model's inputs in order, the same list at every site, so that a weight
  reads the same column everywhere whatever order a site's header has), and
  ``target`` or ``event`` + ``time`` for survival; an optional
  ``split_column`` (train / val / test) and an optional site filter
  (``site_column`` = ``site``).
- ``fed_tcga_brca``: FLamby's Fed-TCGA-BRCA directory (brca.csv,
  train_test_split.csv, centers.csv); ``site`` is the centre 0..5; the features
  are FLamby's 39 columns in FLamby's order (``FED_TCGA_BRCA_FEATURES``) unless
  ``features`` says otherwise.
- ``images``: a folder of class sub-folders of PNG/JPEG/BMP/TIFF files
  (optionally under ``train/``, ``test/`` and a validation folder ``val/``,
  ``valid/`` or ``validation/``), converted to single-channel ``image_size``
  squares. With ``train/``, a validation folder is the site's validation split
  (``val_fraction`` then holds nothing out), and any other visible folder next to
  ``train/`` is refused by name (a class folder there would otherwise be ignored).
  Without ``train/`` (``<root>/<class>/``) there is no test split: evaluating on
  ``test`` needs a ``test/`` folder, or ``cv_folds``. Other files in a class
  folder (DICOM ``.dcm``, ``.webp``, no extension) are skipped with one warning
  per load naming the count and a few of them; a class folder that holds files
  but not one supported image is refused (convert them to PNG).
  ``classes`` is required: the class folder names in label order, the same list
  at every site, so that a class has one label across the federation whatever
  folders a site holds. A visible folder not in the list is refused by name;
  folders and files whose names start with a dot (``.ipynb_checkpoints``, macOS's
  ``._x.png``) are ignored, and so are Windows' ``Thumbs.db`` and ``desktop.ini``
  and the ``__MACOSX`` folder of a zip made on a Mac. 8-bit images are scaled by
  1/255; 16-bit greyscale (Pillow's ``I;16`` modes, and ``I`` with values in
  0..65535, as some readers give 16-bit files) by 1/65535; 32-bit float images
  (``F``) and ``I`` images beyond 16 bits have no fixed range and are refused.
- ``numpy``: an ``.npz`` with ``x`` and ``y`` (or ``event`` and ``time``), and an
  optional ``split`` array of strings.

Every problem in a file raises ``DataError`` naming the file, the line (1-based,
the header is line 1) and the column.  A ``.npz`` has no lines, so its errors
name the row instead (1-based, the first row of the arrays is row 1) and the
array.  CSV must be UTF-8 text; a leading byte-order mark (as Excel writes) is
ignored.  A CSV cell TRUE or FALSE (any case, as spreadsheets write booleans) reads
as 1 or 0, as a Parquet boolean does.  Numbers have a decimal point and no thousands
separator: a text column whose cells with a dot all look like thousands grouped by one
('1.234', '2.071') beside whole numbers under 1000 is refused, as a German or Swiss
export converted to commas has it (read as decimals, each would be 1000 times too
small).  So is a column holding a day.month date with the day's leading zero ('01.02',
1 February, as a spreadsheet whose decimal mark is a comma writes a number typed '1.2'),
unless a cell of another zero-padded shape ('01.50', '007') shows it written zero-padded;
a whole date ('01.02.2024') is no number, and said to look like a date.  A cell of a
record that a quoted line break spans several lines of is named by the line it starts
on.  A path that does not exist, where its folder holds a name that differs from it only
in Unicode normalisation (macOS writes names decomposed, NFD), is refused saying so: it
is not opened by the other spelling.  The message quotes the bad cell, for this
site's own people; what may leave the appliance is ``DataError.public``, which names
neither a value nor a path (a task refusal's reason: the coordinator keeps it for
good).
"""

from __future__ import annotations

import array
import codecs
import collections
import csv
import io
import logging
import math
import operator
import os
import re
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "KINDS",
    "TASKS",
    "DataError",
    "DatasetSpec",
    "SiteData",
    "Split",
    "Standardiser",
    "load_site_data",
]

KINDS = ("tabular", "fed_tcga_brca", "images", "numpy")
TASKS = ("survival", "binary", "multiclass", "regression")
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

log = logging.getLogger("fedge.train")


# Files whose name is fixed by their format (FLamby's Fed-TCGA-BRCA), so naming them
# says nothing about a patient or about where this site keeps its data.
_PUBLIC_FILE_NAMES = frozenset({"brca.csv", "train_test_split.csv"})

# The public form of an error whose raise gave no ``problem``.
UNSAID_PROBLEM = "unusable"


class DataError(ValueError):
    """A data file is unusable; ``file``, ``line`` and ``column`` say where.

    It has three forms, for three readers:

    - ``str(error)``, the full account for this site's own people: the path, and for
      a bad cell the text it holds (a name typed into a numeric column, say);
    - :attr:`journal`, the same less any text read from a cell, for this site's
      journal at WARNING (the cell's text goes at DEBUG only);
    - :attr:`public`, what may leave the appliance (a task refusal the coordinator
      stores for good): which file in words that name no path ("the data file",
      "an image file", a format's fixed file name), line or row, the column, and
      the kind of problem. Never a value, a path or a file or folder name the site
      chose (an image's often carries an MRN).

    ``problem``: the kind of problem for :attr:`public`, text of the code's own (no
    value, path or library message in it). ``part``: what the file is, for
    :attr:`public`; default "the data file" (or the file's name where a format fixes
    it). ``holds_value``: ``message`` quotes text read from a cell. ``column_public``:
    False where the column name was read from the file's own header rather than
    declared in agent.toml (a file without a header has a patient's row there).
    """

    def __init__(
        self,
        file: str | Path,
        message: str,
        *,
        line: int | None = None,
        column: str | None = None,
        row: int | None = None,
        problem: str = UNSAID_PROBLEM,
        part: str | None = None,
        holds_value: bool = False,
        column_public: bool = True,
    ) -> None:
        self.file = str(file)
        self.line = line
        self.row = row  # for .npz arrays, which have rows but no lines
        self.column = column
        self.problem = problem
        self.holds_value = holds_value
        if part is None:
            name = Path(self.file).name
            part = name if name in _PUBLIC_FILE_NAMES else "the data file"
        self.part = part
        self._column_public = column_public
        super().__init__(f"{self._where(self.file, column)}: {message}")

    def _where(self, what: str, column: str | None) -> str:
        if self.line is not None:
            what += f", line {self.line}"
        if self.row is not None:
            what += f", row {self.row}"
        if column is not None:
            what += f", column {column!r}"
        return what

    @property
    def public(self) -> str:
        """This error as it may leave the appliance: no value, path or file name."""
        column = self.column if self._column_public else None
        where = self._where(self.part, None)
        if column is not None:
            where += f", column {_shown(column)}"
        return f"{where}: {self.problem}"

    @property
    def journal(self) -> str:
        """This error for the site's journal: ``str()`` less any text read from a cell."""
        if not self.holds_value:
            return str(self)
        return f"{self._where(self.file, self.column)}: {self.problem}"


# The [[datasets]] keys that name a column of the data file (besides features).
_COLUMN_KEYS = ("target", "event", "time", "split_column", "site_column", "id_column")


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _is_names(v: Any) -> bool:
    return isinstance(v, list | tuple) and all(isinstance(x, str) for x in v)


# The [[datasets]] keys whose default, None, says "not given".
_UNSET_BY_NONE = frozenset((*_COLUMN_KEYS, "site"))

# [[datasets]] key -> (accepts the value, the rule it says when not): DatasetSpec.check_values
_VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (_is_text, "a non-empty string, the name a plan's job.dataset gives"),
    "kind": (lambda v: isinstance(v, str), f"a string, one of {KINDS}"),
    "path": (_is_text, "a non-empty string, the data's file or folder"),
    "task": (lambda v: isinstance(v, str), f"a string, one of {TASKS}"),
    "features": (_is_names, "a list of column names"),
    **{k: (lambda v: isinstance(v, str), "a string, a column name") for k in _COLUMN_KEYS},
    "site": (lambda v: _is_int(v) or isinstance(v, str),
             "an integer (a fed_tcga_brca centre) or a string (a site_column value)"),
    "val_fraction": (lambda v: isinstance(v, int | float) and not isinstance(v, bool)
                     and 0 <= v < 1, "a number in [0, 1), like 0.2"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "standardise": (lambda v: isinstance(v, str), "a string, like \"continuous\""),
    "image_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1, in pixels"),
    "classes": (_is_names, "a list of folder names"),
    "cv_folds": (lambda v: _is_int(v) and (v == 0 or v >= 2),
                 "an integer >= 2 (or 0 for no cross-validation)"),
    "cv_fold": (lambda v: _is_int(v) and v >= 0, "an integer >= 0, below cv_folds"),
}


@dataclass(frozen=True)
class DatasetSpec:
    """One ``[[datasets]]`` table of an agent config."""

    name: str
    kind: str
    path: str
    task: str = "survival"
    features: tuple[str, ...] = ()
    target: str | None = None
    event: str | None = None
    time: str | None = None
    split_column: str | None = None
    site_column: str | None = None
    site: str | int | None = None
    id_column: str | None = None
    val_fraction: float = 0.2
    seed: int = 0
    # "continuous" (non-binary columns) | "all" | "none" | "bounds" (module docstring)
    standardise: str = "continuous"
    # standardise = "bounds": public per-column ranges, column -> (lo, hi), kept as
    # ((column, lo, hi), ...) in declared order
    feature_bounds: tuple[tuple[str, float, float], ...] = ()
    image_size: int = 64
    # images: the class folder names in label order (label = position in the list)
    classes: tuple[str, ...] = ()
    # Federated cross-validation: with cv_folds >= 2 the site's test rows are
    # dropped, its training rows are cut into cv_folds folds (permutation fixed
    # by seed) and fold cv_fold becomes the evaluated "test" split.
    cv_folds: int = 0
    cv_fold: int = 0

    def __post_init__(self) -> None:
        """``feature_bounds`` given as a mapping (agent.toml's inline table) becomes
        ((column, lo, hi), ...).

        Raises: ValueError: a bound that is not a pair of numbers (named)."""
        object.__setattr__(self, "feature_bounds", _bounds_triples(self.feature_bounds))

    def bounds(self) -> dict[str, tuple[float, float]]:
        """``feature_bounds`` as column -> (lo, hi)."""
        return {col: (lo, hi) for col, lo, hi in self.feature_bounds}

    @classmethod
    def from_config(cls, table: Mapping[str, Any]) -> DatasetSpec:
        """Build and validate from an agent-config ``[[datasets]]`` table.

        Raises:
            ValueError: a missing key, an unknown key, or a value breaking its rule (named).
        """
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"datasets: unknown key(s) {unknown}; known: {sorted(known)}")
        for key in ("name", "kind", "path"):
            if key not in table:
                raise ValueError(f"datasets: missing required key {key!r}")
        cls.check_values(table)
        values = dict(table)
        if "features" in values:
            values["features"] = tuple(_nfc(f) for f in values["features"])
        # NFC, as headers are read and a plan's job.dataset is parsed: one spelling of
        # 'é' whether the editor that wrote agent.toml composed it or not
        for key in ("name", *_COLUMN_KEYS):
            if isinstance(values.get(key), str):
                values[key] = _nfc(values[key])
        if "classes" in values:
            values["classes"] = tuple(values["classes"])
        spec = cls(**values)
        spec.validate()
        return spec

    @classmethod
    def check_values(cls, table: Mapping[str, Any]) -> None:
        """The type and range of each value a ``[[datasets]]`` table gives, before
        anything is made of them. Checked when agent.toml is loaded (the agent refuses
        to start), because a value of the wrong type otherwise fails far from the file:
        ``name = 7`` broke every heartbeat (names are sorted and normalised),
        ``seed = "abc"`` or ``image_size = "64"`` the first task, ``path = ""`` read the
        config's own folder. Unknown keys, missing ones and the rules between keys
        (kind, task, columns, classes) are ``from_config``'s and ``validate``'s: a table
        they refuse is left out and its tasks refused, so that a key or rule of another
        release (after an upgrade or a rollback) does not stop the appliance.

        Raises:
            ValueError: ``datasets.KEY = VALUE must be RULE``, for the first key broken.
        """
        for key, value in table.items():
            rule = _VALUE_RULES.get(key)
            if value is None and key in _UNSET_BY_NONE:
                continue  # from code (TOML has no null): the default, unset
            if rule is not None and not rule[0](value):
                raise ValueError(f"datasets.{key} = {value!r} must be {rule[1]}")
        if "feature_bounds" in table:
            _bounds_triples(table["feature_bounds"])  # names the column and the pair

    def validate(self) -> None:
        """Check the declared schema is coherent.

        Raises:
            ValueError: naming the field, its value and the rule it breaks.
        """
        if self.kind not in KINDS:
            raise ValueError(f"datasets.kind={self.kind!r} must be one of {KINDS}")
        if self.task not in TASKS:
            raise ValueError(f"datasets.task={self.task!r} must be one of {TASKS}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"datasets.val_fraction={self.val_fraction!r} must lie in [0, 1)")
        if self.cv_folds and not (self.cv_folds >= 2 and 0 <= self.cv_fold < self.cv_folds):
            raise ValueError(
                f"datasets.cv_fold={self.cv_fold!r} must lie in 0..cv_folds-1 and "
                f"cv_folds={self.cv_folds!r} must be >= 2 (or 0 for no cross-validation)"
            )
        if self.standardise not in STANDARDISE_MODES:
            raise ValueError(
                f"datasets.standardise={self.standardise!r} must be one of {STANDARDISE_MODES}"
            )
        self._validate_bounds()
        if len(set(self.features)) != len(self.features):
            repeated = sorted({f for f in self.features if self.features.count(f) > 1})
            raise ValueError(
                f"dataset {self.name!r} ({self.path}): datasets.features lists {repeated} twice"
            )
        for role, col in self._role_columns().items():
            if col in self.features:
                raise ValueError(
                    f"dataset {self.name!r} ({self.path}): feature column {col!r} is also the "
                    f"{role!r} column; a model must not be given its own label or bookkeeping"
                )
        if self.kind == "tabular":
            if self.task == "survival" and (not self.event or not self.time):
                raise ValueError(
                    f"dataset {self.name!r}: task 'survival' needs both 'event' and 'time' columns"
                )
            if self.task != "survival" and not self.target:
                raise ValueError(f"dataset {self.name!r}: task {self.task!r} needs a 'target'")
            if not self.features:
                raise ValueError(
                    f"dataset {self.name!r} ({self.path}): kind 'tabular' needs "
                    "datasets.features, the feature columns in model-input order, the same "
                    "list at every site: without it each site's own header order decides "
                    "which weight reads which column, and FedAvg would average different "
                    "features across sites"
                )
            if (self.site_column is None) != (self.site is None):
                raise ValueError(
                    f"dataset {self.name!r}: 'site_column' and 'site' go together "
                    f"(got site_column={self.site_column!r}, site={self.site!r})"
                )
        if self.kind == "fed_tcga_brca":
            if self.task != "survival":
                raise ValueError(f"dataset {self.name!r}: fed_tcga_brca is a survival task")
            if not isinstance(self.site, int) or isinstance(self.site, bool):
                raise ValueError(f"dataset {self.name!r}: site={self.site!r} must be a centre 0..5")
            if not 0 <= self.site <= 5:
                raise ValueError(f"dataset {self.name!r}: site={self.site} must lie in 0..5")
        if self.classes and self.kind != "images":
            raise ValueError(
                f"dataset {self.name!r}: datasets.classes names image class folders; "
                f"kind {self.kind!r} takes none"
            )
        if self.kind == "images":
            self._validate_classes()

    def _validate_bounds(self) -> None:
        """``feature_bounds`` goes with ``standardise = "bounds"`` (and that mode needs
        it), names feature columns once each (checked again against the file's columns
        for numpy data, whose names x0, x1, ... are known only when loaded), with
        finite lo < hi.

        Raises:
            ValueError: naming the data set, the column, its bounds and the rule.
        """
        where = f"dataset {self.name!r}"
        if self.feature_bounds and self.kind == "images":
            raise ValueError(f"{where}: datasets.feature_bounds bounds table columns; images "
                             "are not standardised and take none")
        if self.feature_bounds and self.standardise != "bounds":
            raise ValueError(
                f"{where}: datasets.feature_bounds is used only with standardise = "
                f"\"bounds\" (got standardise = {self.standardise!r}): set both, or "
                "leave feature_bounds out")
        if self.standardise == "bounds" and self.kind != "images" and not self.feature_bounds:
            raise ValueError(
                f"{where}: standardise = \"bounds\" needs datasets.feature_bounds, the "
                "public range of each continuous column, e.g. feature_bounds = "
                "{ age_at_index = [0, 120] } (or standardise = \"none\" to use every "
                "column as it is)")
        names = [col for col, _, _ in self.feature_bounds]
        repeated = sorted({c for c in names if names.count(c) > 1})
        if repeated:
            raise ValueError(f"{where}: datasets.feature_bounds lists {repeated} twice")
        for col, lo, hi in self.feature_bounds:
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(
                    f"{where}: datasets.feature_bounds.{col} = [{lo!r}, {hi!r}] must be "
                    "two finite numbers [lo, hi] with lo < hi")
        known = self.features or (FED_TCGA_BRCA_FEATURES if self.kind == "fed_tcga_brca"
                                  else None)
        if known is not None:
            check_bounded_columns(self, known)

    def _validate_classes(self) -> None:
        """An image data set declares its classes: two or more distinct folder names
        (exactly two for a binary task), the same list in the same order at every site.

        Raises:
            ValueError: naming the data set, the list and the rule.
        """
        if self.task not in ("binary", "multiclass"):
            raise ValueError(f"dataset {self.name!r}: images need task 'binary' or 'multiclass'")
        classes = list(self.classes)
        if not classes:
            raise ValueError(
                f"dataset {self.name!r} ({self.path}): kind 'images' needs datasets.classes, "
                "the class folder names in label order, e.g. classes = [\"benign\", "
                "\"malignant\"], the same list at every site: labels taken from each site's "
                "own folders would differ wherever a site lacks a class"
            )
        if len(classes) < 2:
            raise ValueError(
                f"dataset {self.name!r}: datasets.classes={classes!r} must name at least 2 "
                "classes (a classifier of one class learns nothing)"
            )
        if self.task == "binary" and len(classes) != 2:
            raise ValueError(
                f"dataset {self.name!r}: task 'binary' needs exactly 2 datasets.classes, "
                f"got {classes!r} (use task 'multiclass')"
            )
        repeated = sorted({c for c in classes if classes.count(c) > 1})
        if repeated:
            raise ValueError(f"dataset {self.name!r}: datasets.classes lists {repeated} twice")
        from fedge.wire.messages import check_class_bounds

        # what an agent can tell the coordinator (DatasetClasses)
        check_class_bounds(classes, f"dataset {self.name!r}: datasets.classes")
        bad = [c for c in classes if not c or c.startswith(".") or "/" in c or "\\" in c]
        if bad:
            raise ValueError(
                f"dataset {self.name!r}: datasets.classes {bad!r} must be plain folder names "
                "(not empty, no '/', not starting with '.')"
            )

    def _role_columns(self) -> dict[str, str]:
        """Declared non-feature columns by role (target, event, time, split, site, id)."""
        roles = {
            "target": self.target,
            "event": self.event,
            "time": self.time,
            "split_column": self.split_column,
            "site_column": self.site_column,
            "id_column": self.id_column,
        }
        return {role: col for role, col in roles.items() if col is not None}


STANDARDISE_MODES = ("continuous", "all", "none", "bounds")
# the modes whose constants are fitted on the site's training rows
FITTED_STANDARDISE_MODES = ("continuous", "all")
# why DP-SGD refuses them, and the fix: the site's refusal (fedge.agent.trainer) and
# the coordinator's at submit (fedge.coordinator.service) say the same
DP_FITTED_STANDARDISE_WHY = ("under the plan's privacy.dp (DP-SGD), replacing one record "
                             "would move every other record's features, so the "
                             "record-level epsilon would not hold")
DP_FITTED_STANDARDISE_FIX = ("standardise = \"bounds\" with feature_bounds = { column = "
                             "[lo, hi], ... } for the continuous columns (e.g. { "
                             "age_at_index = [0, 120] }), or standardise = \"none\"")


def _bounds_triples(bounds: Any) -> tuple[tuple[str, float, float], ...]:
    """``feature_bounds`` as ((column, lo, hi), ...), from a mapping column -> [lo, hi]
    or from triples already.

    Raises: ValueError: not a table of [lo, hi] pairs of numbers (named)."""
    if isinstance(bounds, Mapping):
        items = list(bounds.items())
    elif isinstance(bounds, list | tuple) and all(
            isinstance(t, list | tuple) and len(t) == 3 for t in bounds):
        items = [(t[0], t[1:]) for t in bounds]
    else:
        raise ValueError(f"datasets.feature_bounds={bounds!r} must be a table of "
                         "column = [lo, hi], e.g. { age_at_index = [0, 120] }")
    out = []
    for col, pair in items:
        if not isinstance(col, str):
            raise ValueError(f"datasets.feature_bounds: column {col!r} must be a name")
        if (not isinstance(pair, list | tuple) or len(pair) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool)
                           for v in pair)):
            raise ValueError(f"datasets.feature_bounds.{col} = {pair!r} must be [lo, hi], "
                             "two numbers")
        out.append((_nfc(col), float(pair[0]), float(pair[1])))
    return tuple(out)


def check_bounded_columns(spec: DatasetSpec, features: Sequence[str]) -> None:
    """Every column ``spec.feature_bounds`` names is one of the model's ``features``.

    Raises: ValueError: naming the unknown column(s) and the features."""
    unknown = [col for col, _, _ in spec.feature_bounds if col not in features]
    if unknown:
        shown = 12
        listed = ", ".join(repr(f) for f in features[:shown])
        more = f" and {len(features) - shown} more" if len(features) > shown else ""
        raise ValueError(
            f"dataset {spec.name!r}: datasets.feature_bounds names {unknown}, not a feature "
            f"column of the data set (its features: {listed}{more})")


@dataclass
class Split:
    """Arrays of one split. Survival ``y`` is (n, 2) float32: [event, time]."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass
class Standardiser:
    """Per-feature (x - mean) / scale: fitted on one site's training rows (`fit`), or
    from public bounds alone (`from_bounds`)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def from_bounds(cls, features: Sequence[str],
                    bounds: Mapping[str, tuple[float, float]]) -> Standardiser:
        """mean = (lo + hi) / 2 and scale = (hi - lo) / 2 for each bounded column, 0 and
        1 for the others: no statistic of any row (the caller clamps to the bounds)."""
        mean = np.zeros(len(features), dtype=np.float64)
        scale = np.ones(len(features), dtype=np.float64)
        for j, name in enumerate(features):
            if name in bounds:
                lo, hi = bounds[name]
                mean[j], scale[j] = (lo + hi) / 2, (hi - lo) / 2
        return cls(mean.astype(np.float32), scale.astype(np.float32))

    @classmethod
    def fit(cls, x: np.ndarray, mode: str) -> Standardiser:
        d = x.shape[1]
        mean = np.zeros(d, dtype=np.float64)
        scale = np.ones(d, dtype=np.float64)
        if mode != "none" and x.shape[0] > 1:
            for j in range(d):
                col = x[:, j].astype(np.float64)
                if mode == "continuous" and np.all(np.isin(col, (0.0, 1.0))):
                    continue  # one-hot / binary columns keep their 0/1 meaning
                sd = float(col.std())
                mean[j] = float(col.mean())
                scale[j] = sd if sd > 1e-12 else 1.0
        return cls(mean.astype(np.float32), scale.astype(np.float32))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}


SPLIT_HINTS = {
    "val": " (hold one out with the data set's val_fraction > 0, or a split column)",
    "test": " (the data set has no test rows: a split column or train_test_split.csv)",
}
IMAGE_SPLIT_HINTS = {
    "val": " (hold one out with the data set's val_fraction > 0, or put images under "
           "<root>/val/<class>/ next to train/)",
    "test": " (the data set has no test images: put them under <root>/test/<class>/ next to "
            "<root>/train/<class>/, or set cv_folds)",
}


@dataclass
class SiteData:
    """One site's data, ready for training: train / val / test splits."""

    name: str
    task: str
    feature_names: list[str]
    train: Split
    val: Split | None = None
    test: Split | None = None
    standardiser: Standardiser | None = None
    n_classes: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> Split:
        """The named split.

        Raises:
            ValueError: unknown name, or that split is absent at this site.
        """
        if name not in ("train", "val", "test"):
            raise ValueError(f"split {name!r} must be 'train', 'val' or 'test'")
        part = getattr(self, name)
        if part is None or len(part) == 0:
            hints = IMAGE_SPLIT_HINTS if self.info.get("kind") == "images" else SPLIT_HINTS
            hint = hints.get(name, "")
            raise ValueError(f"site {self.name!r} has no {name!r} split{hint}")
        return part


# ---------------------------------------------------------------------------
# CSV / Parquet


# Other separators a spreadsheet saves "CSV" with, and when: ';' where the decimal
# mark is a comma (Excel in much of Europe), tab ("Text (Tab delimited)").
_OTHER_SEPARATORS = (
    (";", "semicolon", "as Excel saves CSV where the decimal mark is a comma"),
    ("\t", "tab", "as a spreadsheet saves 'Text (Tab delimited)'"),
)


def _separator_hint(header: list[str]) -> tuple[str, str] | None:
    """(local, public) text saying which other separator a CSV file seems to use, when
    its header, read with commas, holds semicolons or tabs; else None.

    Given only alongside a refusal the header explains (one column, a missing
    declared column, rows of another length): a comma-separated file whose column
    names hold a ';' is fine, and the file is never read with a guessed separator."""
    count, sep, name, why = max((sum(h.count(sep) for h in header), sep, name, why)
                                for sep, name, why in _OTHER_SEPARATORS)
    if count == 0:
        return None
    return (f"the header holds {count} {name}(s) ({sep!r}): this file looks {name}-separated "
            f"({why}); fedge reads comma-separated CSV with decimal points, so re-save it "
            "as CSV (comma delimited) or as Parquet",
            f"the header holds {name}s: the file looks {name}-separated; fedge reads "
            "comma-separated CSV")


def _not_a_file(path: Path) -> DataError | None:
    """The refusal of a data path that is not a regular file, saying what it is: a
    directory, something else that exists (a named pipe, device or socket), or nothing
    (a broken symbolic link too; ``_spelt_otherwise`` says where a folder holds its
    name spelt another way); else None."""
    if path.is_file():
        return None
    if path.is_dir():
        said = "is a directory, not a file"
    elif path.exists():
        said = "is not a regular file (a named pipe, device or socket)"
    else:
        said = "file does not exist"
        twin = _spelt_otherwise(path)
        if twin is not None:
            return DataError(path, f"{said}; {twin[0]}", problem=f"{said}; {twin[1]}")
    return DataError(path, said, problem=said)


def _form(name: str) -> str:
    """Which Unicode normal form ``name`` is in, as a message says it."""
    for form in ("NFC", "NFD"):
        if unicodedata.is_normalized(form, name):
            return form
    return "neither NFC nor NFD"


def _spelt_otherwise(path: Path) -> tuple[str, str] | None:
    """(local, public) text saying that the folder of the first part of ``path`` that
    does not exist holds a name equal to that part once both are NFC, else None.

    macOS writes names decomposed (NFD: 'u' and a combining diaeresis for 'ü'), and a
    name typed into agent.toml is mostly composed (NFC): the two look the same, and
    Linux, comparing bytes, finds no file. The path is not opened by the other spelling:
    which of two spellings is meant is for the site to say. The public text names no
    path."""
    missing = path
    while not os.path.lexists(missing.parent) and missing.parent != missing.parent.parent:
        missing = missing.parent
    folder, name = missing.parent, _nfc(missing.name)
    try:
        with os.scandir(folder) as entries:
            found = sorted(e.name for e in entries
                           if e.name != missing.name and _nfc(e.name) == name)
    except OSError:  # not a folder, or not readable: nothing to say
        return None
    if not found:
        return None
    entry = found[0]
    return (f"the folder {str(folder)!r} holds {entry!a} ({_form(entry)}), a name that "
            f"differs from {missing.name!a} (as given, {_form(missing.name)}) only in Unicode "
            "normalisation (a name made on a Mac is decomposed): rename it, or copy its "
            "spelling into agent.toml",
            f"{'its folder' if missing == path else 'a folder on its path'} holds a name "
            "that differs only in Unicode normalisation (a name made on a Mac is "
            "decomposed): rename it, or copy its spelling into agent.toml")


# What a file given as CSV is, where its first bytes say it is no text: (magic, local
# text, public text). Each fails as not UTF-8, and is named there (``_not_utf8``).
_FOREIGN_FORMATS = (
    (b"PAR1", "not UTF-8 text: this looks like a Parquet file; name it .parquet",
     "not UTF-8 text (it looks like a Parquet file)"),
    (b"PK\x03\x04",
     "not CSV text: this is an Excel workbook (.xlsx) or another zip file; save it from "
     "the spreadsheet as CSV UTF-8 (comma delimited), or as Parquet",
     "not CSV text (it is an Excel workbook or another zip file)"),
    (b"\x1f\x8b",
     "not CSV text: this is a gzip file; decompress it (gunzip) and name the .csv inside",
     "not CSV text (it is a gzip file)"),
)


def _whole_file_is_blank(path: Path) -> bool:
    """The file's text is only white space (read a block at a time)."""
    with path.open(encoding="utf-8-sig", newline="") as text:
        return all(not block.strip() for block in iter(lambda: text.read(1 << 20), ""))


def _utf8_refusal(path: Path) -> DataError | None:
    """The refusal of a file with a byte that is not UTF-8 (naming its line and column),
    else None. The check reads a block at a time; only a refusal reads the file whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as raw:
            for block in iter(lambda: raw.read(1 << 20), b""):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        try:
            path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            return _not_utf8(path, exc)
    return None


class _CsvRows:
    """A CSV file read once, a row at a time: the header when opened, then each
    non-blank row as (line, fields), without the file or its rows ever held whole
    (a site's extract can be millions of rows of which a model reads a few columns).

    Lines are counted as the csv module counts them (only CR, LF and CRLF end a
    line), so a U+2028 or form feed inside a cell does not shift later numbers. A
    record whose quoted cell holds a line break spans several lines: it is numbered
    by the line it starts on (the csv module's count is the line it ends on), and a
    cell of it by the line that cell starts on (``_cell_line``), so that a refusal
    points where an editor shows the bad cell.
    Columns with no name in the header and nothing in any row (Excel's trailing
    ",,") are dropped; an unnamed first column that holds values (pandas' index) is
    kept as any undeclared column is; any other unnamed column that holds values is
    refused (a decimal comma in an unquoted cell, '24,5', makes one).

    Refusals come in the order a reader of the whole file gives them: a byte that is
    not UTF-8 anywhere in the file, then malformed CSV (both raised while rows are
    read), then, from :meth:`finish` once the last row is read, an empty file, Excel's
    'sep=' first line, a one-column header that looks separated by ';' or tabs, unnamed
    columns that hold values, a repeated column name, the first row of another length,
    no rows. Where line 1 looks like a data row (``_looks_like_data``: a file exported
    without its header), a refusal the header explains says so, and quotes line 1 in
    its local message only (``holds_value``). Before any of these, a path that is not a
    regular file is refused as what it is; a Parquet, zip (.xlsx) or gzip file given as
    CSV is not UTF-8, and named as what it is there (``_not_utf8``).
    """

    def __init__(self, path: Path) -> None:
        """Open ``path`` and read its header.

        Raises:
            DataError: the file does not exist, is a directory or no regular file,
                is not UTF-8 (an Excel workbook or gzip file named) or is malformed CSV
                (naming the line and, for a byte that is not UTF-8, the column).
        """
        refusal = _not_a_file(path)
        if refusal is not None:
            raise refusal
        self.path = path
        # No cell can be longer than the file: the csv module's default limit (131072
        # characters) only refused files with a long free-text column (a report) that no
        # model reads. Process-wide, and only raised.
        size = path.stat().st_size
        if csv.field_size_limit() < size:
            csv.field_size_limit(size)
        # Excel's "CSV UTF-8" starts with a byte-order mark: utf-8-sig drops it
        self._text = path.open(encoding="utf-8-sig", newline="")
        self._reader = csv.reader(self._text, strict=True)
        self._end = 0  # the line the last record read ends on (:meth:`__iter__`)
        self._records = self._read()
        first = next(self._records, None)
        self._blank_header = first is None or all(not h.strip() for h in first)
        # NFC, as agent.toml's column names are read: a header written by an editor that
        # decomposes 'é' names the same column (and two spellings of one name are a repeat)
        self.header = [_nfc(h.strip()) for h in first or []]
        self._unnamed = [j for j, h in enumerate(self.header) if not h]
        self._dropped: set[int] = set(self._unnamed)  # unnamed, with no text in any row yet
        self._valued_at: dict[int, int] = {}  # an unnamed column: the line of its first text
        self._first_line_of_length: dict[int, int] = {}  # lengths other than the header's
        self.count = 0  # non-blank rows
        # the header's last line (the next record starts on the line after), and how many
        # rows so far span more than one line (a quoted cell with a line break)
        self._end = self._reader.line_num
        self.spanning = 0

    def _read(self) -> Iterator[list[str]]:
        try:
            yield from self._reader
        except UnicodeDecodeError:
            refusal = _utf8_refusal(self.path)
            if refusal is None:  # pragma: no cover - the file changed while read
                raise DataError(self.path, "not UTF-8 text", problem="not UTF-8 text") from None
            raise refusal from None
        except csv.Error as exc:
            line, start = self._reader.line_num, self._end + 1
            refusal = _utf8_refusal(self.path)  # a bad byte further on is said first
            if refusal is not None:
                raise refusal from None
            said = f"malformed CSV: {exc}"
            if start < line:  # where its record began: an unclosed quote opens there
                said += (f" (in the record that starts on line {start}: a quote opened there "
                         "and not closed runs on to this line)")
            raise DataError(self.path, said, line=line, problem="malformed CSV") from exc
        finally:
            self._text.close()

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        """(line, fields) for each row that is not blank, fields as the file has them
        (no column dropped, a ragged row as it is: :meth:`finish` refuses it). The line
        is the one the row starts on; where it spans more than one, :attr:`spanning`
        has grown by one before it is given (``_cell_line`` finds a cell's line)."""
        width, reader = len(self.header), self._reader
        lengths, unseen = self._first_line_of_length, self._dropped
        for fields in self._records:
            start, end = self._end + 1, reader.line_num
            self._end = end
            if not fields or (not fields[0].strip() and not "".join(fields).strip()):
                continue
            self.count += 1
            if end != start:
                self.spanning += 1
            if len(fields) != width:
                lengths.setdefault(len(fields), start)
            if unseen:
                found = {j for j in unseen if j < len(fields) and fields[j].strip()}
                if found:
                    unseen -= found
                    for j in found:
                        self._valued_at[j] = _cell_line(start, fields, j)
            yield start, fields

    def finish(self) -> tuple[list[str], list[int]]:
        """Once every row is read: the header less the dropped columns, and where
        each of its columns is in a row's fields.

        Raises:
            DataError: an empty file, unnamed columns that hold values, a repeated
                column name, a row of another length than the header (naming its
                line and, for a truncated row, the first missing column), no data
                rows; and where the file looks separated by ';' or tabs, saying so.
        """
        path, header = self.path, self.header
        if self.count == 0 and self._blank_header and _whole_file_is_blank(path):
            raise DataError(path, "file is empty (no header line)", line=1,
                            problem="file is empty (no header line)")
        if _EXCEL_SEP_LINE.fullmatch(",".join(header).strip()):
            said = ("line 1 is Excel's 'sep=' line: remove it, or re-save as CSV UTF-8 "
                    "(comma delimited)")
            raise DataError(path, f"{said} (it reads {','.join(header)!r})", line=1,
                            problem=said)
        hint = _separator_hint(header)
        data_row = _looks_like_data(header)
        if len(header) == 1 and hint is not None:
            if data_row:
                raise _header_is_data(path, header, said="the header is one column", hint=hint)
            raise DataError(path, f"the header is one column {header[0]!r}; {hint[0]}", line=1,
                            problem=f"the header is one column; {hint[1]}")
        dropped = self._dropped
        unnamed = [j + 1 for j in self._unnamed if j not in dropped]
        if unnamed and data_row and (len(unnamed) > 1 or unnamed[0] != 1):
            raise _header_is_data(path, header, hint=hint,
                                  said="a column has no name in the header but holds values")
        if len(unnamed) > 1:
            raise DataError(
                path,
                f"{len(unnamed)} columns have no name in the header (columns "
                f"{', '.join(map(str, unnamed))}, counting from 1) but hold values; name them "
                "or delete them",
                line=1,
                problem=f"{len(unnamed)} columns have no name in the header but hold values",
            )
        if unnamed and unnamed[0] != 1:
            # pandas writes its index as a first column with no name; another unnamed
            # column with values is a column its header misses (a decimal comma in an
            # unquoted cell splits it in two: '24,5' reads as 24 and an unnamed 5)
            said = (f"column {unnamed[0]} (counting from 1) has no name in the header but "
                    "holds values")
            hint_more = ("; name it or delete it (a decimal comma in an unquoted cell, "
                         "'24,5', splits that cell into two columns: save with decimal "
                         "points)")
            raise DataError(
                path,
                f"{said}, first on this line{hint_more}",
                line=self._valued_at[unnamed[0] - 1],
                problem="a column other than the first has no name in the header but holds "
                        "values",
            )
        kept = [j for j in range(len(header)) if j not in dropped]
        header = [header[j] for j in kept]
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            said = "the header names a column more than once"
            if data_row:
                raise _header_is_data(path, header, said=said, hint=hint)
            raise DataError(
                path,
                f"header names {repeated} more than once; each column needs its own name",
                line=1,
                column=repeated[0],
                problem=said,
                column_public=False,
            )
        # A row's length less the dropped columns it reaches: Excel's trailing ",," may
        # be missing from a row without harm
        by_line = sorted(self._first_line_of_length.items(), key=lambda item: item[1])
        for length, lineno in by_line:
            got = length - sum(1 for j in dropped if j < length)
            if got == len(header):
                continue
            missing = header[got] if got < len(header) else None
            what = "truncated row" if got < len(header) else "extra fields"
            said = f"{what}: {got} fields where the header has {len(header)}"
            if data_row:
                raise _header_is_data(path, header, said=said, hint=hint, line=lineno)
            raise DataError(
                path,
                said if hint is None else f"{said}; {hint[0]}",
                line=lineno,
                column=missing,
                problem=said if hint is None else f"{said}; {hint[1]}",
                column_public=False,
            )
        if self.count == 0:
            raise DataError(path, "no data rows after the header", line=2,
                            problem="no data rows after the header")
        return header, kept

    def position(self, name: str | None) -> int | None:
        """Where the column ``name`` is in a row's fields, for filtering rows as they are
        read; None where the header lacks it (:func:`_column_index` refuses that).

        Raises:
            DataError: as :meth:`finish`, where ``name`` is empty and the header has
                several unnamed columns (which one stays is known only once every row
                is read, so the file is read through once first).
        """
        at = [j for j, h in enumerate(self.header) if h == name]
        if len(at) > 1 and name == "":
            first = _CsvRows(self.path)
            for _ in first:
                pass
            at = [j for j in at if j not in first._dropped]
        return at[0] if at else None  # a repeated name is refused by finish()


# A line break as the csv module's source (a file opened with newline="") splits lines.
_LINE_BREAK = re.compile(r"\r\n?|\n")


def _cell_line(start: int, fields: Sequence[str], j: int) -> int:
    """The line field ``j`` of a row starting on line ``start`` starts on: the row's
    line plus the line breaks quoted in the fields before it."""
    return start + sum(len(_LINE_BREAK.findall(f)) for f in fields[:j] if "\n" in f or "\r" in f)


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, fields) rows of a small CSV file of a fixed format
    (FLamby's train_test_split.csv), held whole; a site's own tables are read by
    ``_csv_columns`` instead.

    Raises:
        DataError: as :class:`_CsvRows`.
    """
    table = _CsvRows(path)
    rows = list(table)
    header, kept = table.finish()
    if len(kept) != len(table.header):
        rows = [(lineno, [fields[j] for j in kept]) for lineno, fields in rows]
    return header, rows


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> DataError:
    """A DataError naming the line and column of the first byte that is not UTF-8."""
    data = exc.object  # the bytes after any BOM; exc.start indexes into them
    for magic, said, problem in _FOREIGN_FORMATS:  # a Parquet, zip (.xlsx) or gzip file
        if isinstance(data, bytes | bytearray) and data.startswith(magic):
            return DataError(path, said, line=1, problem=problem)
    # Decode again keeping bad bytes as lone surrogates, and let the csv module
    # find the field that holds the first one, so line and column are its own.
    line, column = None, None
    try:
        text = bytes(data).decode("utf-8", errors="surrogateescape")
        reader = csv.reader(io.StringIO(text, newline=""))
        names = next(reader)
        header = [h.strip() for h in names]
        first = _first_surrogate(header)
        if first is not None:
            line = _cell_line(1, names, first)
        else:
            end = reader.line_num  # where a record ends; the next starts on the line after
            for fields in reader:
                start, end = end + 1, reader.line_num
                first = _first_surrogate(fields)
                if first is not None:
                    line = _cell_line(start, fields, first)
                    column = header[first] if first < len(header) else None
                    break
    except (csv.Error, StopIteration):
        pass
    if line is None:  # the csv module gave up: count line ends up to the bad byte
        before = bytes(data[: exc.start]).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        line = before.count(b"\n") + 1
    return DataError(
        path,
        f"not UTF-8 text (byte 0x{data[exc.start]:02x}); re-save the file as UTF-8 "
        "(in Excel: CSV UTF-8)",
        line=line,
        column=column,
        problem="not UTF-8 text",
        column_public=False,
    )


def _first_surrogate(fields: list[str]) -> int | None:
    for j, f in enumerate(fields):
        if any("\udc80" <= ch <= "\udcff" for ch in f):
            return j
    return None


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


# How many of the header's columns a missing-column error lists.
HEADER_SHOWN = 40

# Excel's first line naming the separator ("sep=;", "sep=,"), as the csv module splits it.
_EXCEL_SEP_LINE = re.compile(r"sep=.?", re.IGNORECASE)
# A date as a cell holds one: 2020-01-02, 01.02.2020, 1/2/20.
_DATE_CELL = re.compile(r"[0-9]{1,4}([-./])[0-9]{1,2}\1[0-9]{1,4}")


def _reads_as_number(text: str) -> bool:
    """``text`` is what ``_number`` reads as a number (TRUE/FALSE included), or a date."""
    if text.casefold() in _BOOLEAN_CELLS or _DATE_CELL.fullmatch(text):
        return True
    if "_" in text:
        return False
    try:
        float(text)
    except ValueError:
        return False
    return True


def _looks_like_data(header: Sequence[str]) -> bool:
    """Line 1, read as a header, looks like a data row (a table exported without its
    header, whose first patient's row is read as one): at least half of its names (split
    at ';' and tabs too, as a file of another separator has them) are numbers, booleans
    or dates. Column names 0, 1, 2, ... in a run (pandas' default names, or years) are
    a header."""
    names = [n.strip() for h in header for n in re.split(r"[;\t]", h) if n.strip()]
    numeric = [n for n in names if _reads_as_number(n)]
    if not numeric or 2 * len(numeric) < len(names):
        return False
    if len(numeric) == len(names) > 1 and all(n.isdigit() and n.isascii() for n in names):
        first = int(names[0])
        if [int(n) for n in names] == list(range(first, first + len(names))):
            return False
    return True


def _header_is_data(path: Path, header: Sequence[str], *, said: str,
                    hint: tuple[str, str] | None, line: int = 1,
                    column: str | None = None) -> DataError:
    """The refusal of a file whose line 1 looks like a data row (``_looks_like_data``),
    found by ``said`` (a missing column, a repeated name, a row of another length). The
    names of line 1 are a patient's cells: only the local message (DEBUG) lists them."""
    problem = (f"{said}: line 1 looks like a data row, not a header; the file needs a "
               "header row naming its columns")
    listed = ", ".join(_shown(h) for h in header[:HEADER_SHOWN])
    more = f" and {len(header) - HEADER_SHOWN} more" if len(header) > HEADER_SHOWN else ""
    message = f"{problem}; line 1 has {listed}{more}"
    if hint is not None:
        message, problem = f"{message}; {hint[0]}", f"{problem}; {hint[1]}"
    return DataError(path, message, line=line, column=column, problem=problem,
                     holds_value=True)


def _column_index(path: Path, header: list[str], column: str) -> int:
    try:
        return header.index(column)
    except ValueError:
        pass
    hint = None if _is_parquet(path) else _separator_hint(header)
    if _looks_like_data(header):
        raise _header_is_data(path, header, said="missing column in the header", hint=hint,
                              column=column)
    message, problem = _missing_column(header, column), "missing column in the header"
    if hint is not None:
        message, problem = f"{message}; {hint[0]}", f"{problem}; {hint[1]}"
    raise DataError(path, message, line=1, column=column, problem=problem)


def _shown(name: str) -> str:
    """A column name as a message shows it: ascii() where it is not plain printable
    ASCII, so 'a\u0301ge', a Cyrillic 'а' or a zero-width space shows as what it is."""
    return repr(name) if name.isascii() and name.isprintable() else ascii(name)


def _loose(name: str) -> str:
    """A name less case, width and compatibility forms and invisible format characters:
    what makes two names look the same to a reader."""
    folded = unicodedata.normalize("NFKC", name).casefold()
    return "".join(c for c in folded if unicodedata.category(c) != "Cf")


def _missing_column(header: list[str], column: str) -> str:
    """The message for a declared ``column`` not in ``header``: the name as it is
    (ascii()), any header column that differs from it only in how it looks, and the
    header's columns."""
    message = "missing column in the header"
    if _shown(column) != repr(column):
        message += f" (declared as {_shown(column)})"
    near = [h for h in header if _loose(h) == _loose(column)]
    if near:
        message += (f"; the header's {', '.join(_shown(h) for h in near)} differs from it "
                    "only in case, width or invisible characters")
    listed = ", ".join(_shown(h) for h in header[:HEADER_SHOWN])
    more = f" and {len(header) - HEADER_SHOWN} more" if len(header) > HEADER_SHOWN else ""
    return f"{message}; the header has {listed}{more}"


# Every value is trained on as float32: beyond this, the cast makes it inf (and the
# standardiser then makes its whole column NaN).
FLOAT32_MAX = float(np.finfo(np.float32).max)


# A spreadsheet's boolean cells, as Excel and LibreOffice write them into CSV: 1 and 0,
# as a Parquet boolean column reads (``_parquet_cell``), so an event or a binary label
# kept as TRUE/FALSE loads the same from either format.
_BOOLEAN_CELLS = {"true": 1.0, "false": 0.0}

def _number(path: Path, lineno: int, column: str, cell: str) -> float:
    """One cell of a numeric column as a number: a decimal (float()'s syntax less '_'),
    or TRUE/FALSE (any case) as 1/0.

    Raises:
        DataError: the cell is empty, not a number, not finite, or beyond float32's
            range (naming the line and column; the message quotes the cell).
    """
    raw = cell.strip()
    if raw == "":
        raise DataError(path, "missing value", line=lineno, column=column,
                        problem="missing value")
    if raw.casefold() in _BOOLEAN_CELLS:
        return _BOOLEAN_CELLS[raw.casefold()]
    try:
        if "_" in raw:  # float() takes Python's digit separators: 2_50 is no number
            raise ValueError(raw)
        value = float(raw)
    except ValueError:
        # 01.02.2024, 1/2/24, 2024-02-01: an export's date column declared as a feature
        said = " (it looks like a date)" if _DATE_CELL.fullmatch(raw) else ""
        raise DataError(
            path, f"value {raw!r} is not a number{said}", line=lineno, column=column,
            problem=f"value is not a number{said}", holds_value=True,
        ) from None
    if not math.isfinite(value):
        raise DataError(path, f"value {raw!r} is not finite", line=lineno, column=column,
                        problem="value is not finite", holds_value=True)
    if abs(value) > FLOAT32_MAX:  # finite here, inf once training casts it to float32
        raise DataError(path, f"value {raw!r} is outside float32's range "
                        f"(|x| <= {FLOAT32_MAX:.4g})", line=lineno, column=column,
                        problem="value is outside float32's range", holds_value=True)
    return value


# A cell as a German or Swiss locale writes an integer of 1000 or more: a dot between
# groups of three digits, the first group never 0 ("1.234" = 1234, "12.500.000").
_GROUPED_CELL = re.compile(r"\s*-?[1-9][0-9]{0,2}(?:\.[0-9]{3})+\s*")
# ``_Numbers`` joins a block's cells with NUL to look at them at once: no cell that reads
# as a number holds one.
_ANY_INTEGER_CELL = re.compile(r"(?:^|\x00)\s*[-+]?[0-9]+\s*(?=\x00|$)")
_WIDE_INTEGER_CELL = re.compile(r"(?:^|\x00)\s*[-+]?0*[1-9][0-9]{3,}\s*(?=\x00|$)")
_DOTTED_CELL = re.compile(r"[^\x00]*\.[^\x00]*")


class _Grouping:
    """Whether a text column of numbers looks written with a thousands separator that
    is a dot (a German or Swiss export whose ';' was turned into ','): each such cell
    reads as a decimal 1000 times too small ('1.234' as 1.234), and nothing else fails.

    The column looks so when it holds at least two cells of that shape (``_GROUPED_CELL``)
    and a plain integer, and no cell with a dot of another shape (24.5, 0.512, 1.5e3) nor
    an integer of four digits or more written without a separator (a file that writes
    1234 has no thousands separator). A column of decimals with exactly three places
    whose other values are whole numbers under 1000 matches too; such a file loads from
    Parquet.
    """

    def __init__(self) -> None:
        self.settled = False  # a cell says the column has no thousands separator
        self.grouped = 0  # cells of the grouped shape
        self.first: tuple[int, str] | None = None  # (line, cell) of the first of them
        self.integer = False  # a plain integer cell (under 1000)

    def add(self, lines: Sequence[int], cells: Sequence[str], values: np.ndarray) -> None:
        """Look at one block of cells that all read as numbers, ``values``."""
        if self.settled:
            return
        joined = "\x00".join(cells)
        # only a value of 1000 or more can be an integer written with four digits or more
        if (values.size and float(np.abs(values).max()) >= 1000
                and _WIDE_INTEGER_CELL.search(joined)):
            self.settled = True
            return
        if "." in joined:
            for match in _DOTTED_CELL.finditer(joined):
                if not _GROUPED_CELL.fullmatch(match.group()):
                    self.settled = True
                    return
                if self.first is None:
                    k = joined.count("\x00", 0, match.start())
                    self.first = (lines[k], cells[k].strip())
                self.grouped += 1
        if not self.integer and _ANY_INTEGER_CELL.search(joined):
            self.integer = True

    def refusal(self, path: Path, column: str) -> DataError | None:
        """The refusal of a column that looks written with a thousands dot, else None."""
        if self.settled or self.grouped < 2 or not self.integer or self.first is None:
            return None
        line, cell = self.first
        problem = ("the values look like numbers with a thousands separator (a dot); re-save "
                   "the file with no thousands separator and a decimal point")
        return DataError(
            path,
            f"the values look like numbers with a thousands separator (a dot): {cell!r} "
            f"here and {self.grouped - 1} more cell(s) of that shape, beside whole numbers, "
            "would read as decimals 1000 times too small; re-save the file with no "
            "thousands separator and a decimal point (in Excel: Format Cells, Number, "
            "'Use 1000 Separator' off), or, if they are decimals with three places, save "
            "the table as Parquet",
            line=line, column=column, problem=problem, holds_value=True,
        )


# A date as a spreadsheet writes day and month where the decimal mark is a comma
# ("dd.mm"), with the day's leading zero: 01.01 to 09.12. Read as a number it is 1.01 to
# 9.12, so only cells of a value in [_DAY_MONTH_LOW, _DAY_MONTH_HIGH) are looked at.
_DAY_MONTH_CELL = re.compile(r"\s*0([1-9])\.(0[1-9]|1[0-2])\s*")
_DAY_MONTH_LOW, _DAY_MONTH_HIGH = 1.01, 9.125
# A cell written with a 0 before another digit, in a block's cells joined by NUL after a
# NUL put first.
_ZERO_LED_CELL = re.compile(r"\x000[0-9][^\x00]*")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")


class _DayMonth:
    """Whether a text column of numbers holds dates written day.month ('01.02' for
    1 February), as a spreadsheet whose decimal mark is a comma writes a number typed
    with a point ('1.2') once it has made it a date: each reads as a number (1.02), and
    nothing else fails.

    The column holds them when a cell is such a date with its day's leading zero (01.01
    to 09.12, ``_DAY_MONTH_CELL``: no writer of numbers puts a 0 before another digit),
    and no cell written with a leading zero has another shape (01.50, 03.5, 007: a
    column written zero-padded, as '%05.2f' does, whose 01.02 is the number 1.02). A
    day from 10 on ('31.12') has no mark of a date: a decimal with two places looks the
    same, and it loads as one. 0.5 and 12.50 have no leading zero before a digit.

    Only cells valued from 1.01 to 9.12 can be such a date, and the cells of a block
    with none of them are not looked at (a column of ages, of 0/1 flags): a zero-padded
    column pads those values too, so it is seen as one there. A block with one is
    searched whole, every cell written with a leading zero (00.50 beside 01.02 shows the
    padding as 01.50 does), however few such values it has: how a column is judged
    does not depend on how many of its cells lie from 1.01 to 9.12.
    """

    def __init__(self) -> None:
        self.padded = False  # a cell with a leading zero of another shape: no dates
        self.dates = 0  # cells of the day.month shape
        self.first: tuple[int, str] | None = None  # (line, cell) of the first of them

    def add(self, lines: Sequence[int], cells: Sequence[str], values: np.ndarray) -> None:
        """Look at one block of cells that all read as numbers, ``values``."""
        if self.padded:
            return
        if not np.any((values >= _DAY_MONTH_LOW) & (values < _DAY_MONTH_HIGH)):
            return
        # every cell of the block, not only those valued like a date: a padding zero
        # shows on any of them (00.50). One regex over the cells joined costs less than
        # a Python loop over them.
        joined = "\x00" + "\x00".join(cells)
        led = [(-1, m.group()[1:]) for m in _ZERO_LED_CELL.finditer(joined)]
        if led and self.first is None:  # the first one's row, counted once
            first = _ZERO_LED_CELL.search(joined)
            assert first is not None
            led[0] = (joined.count("\x00", 0, first.start()), led[0][1])
        for k, cell in led:
            if not _DAY_MONTH_CELL.fullmatch(cell):
                self.padded = True
                return
            if self.first is None:
                self.first = (lines[k], cell.strip())
            self.dates += 1

    def refusal(self, path: Path, column: str) -> DataError | None:
        """The refusal of a column that holds day.month dates, else None."""
        if self.padded or self.first is None:
            return None
        line, cell = self.first
        match = _DAY_MONTH_CELL.fullmatch(cell)
        assert match is not None
        date = f"{match.group(1)} {_MONTHS[int(match.group(2)) - 1]}"
        problem = ("the values look like dates (day.month with a leading zero), not numbers: "
                   "a spreadsheet whose decimal mark is a comma turns a number typed with a "
                   "point into a date")
        more = f", as do {self.dates - 1} more cell(s)" if self.dates > 1 else ""
        return DataError(
            path,
            f"{cell!r} looks like a date (day.month: {date}), not a number{more}; a "
            "spreadsheet whose decimal mark is a comma turns a number typed with a point "
            "('1.2') into a date, and each would load as a number (1.02): take the "
            "column's values again from the system that holds them, or format the column "
            "as Number and retype them (a column written zero-padded, where a cell such as "
            "01.50 or 007 shows it, loads as it is)",
            line=line, column=column, problem=problem, holds_value=True,
        )


class _Numbers:
    """One declared numeric column, converted a block of rows at a time as the file is
    read, kept as ``dtype`` (float32 for features: what training casts them to anyway).

    A bad cell is not raised at once: the first one is kept as :attr:`error`, and the
    caller raises it when it comes to this column, so that a file's refusals stay in the
    order of the file's checks, then the declared columns' order (``_load_tabular``).
    Once every cell reads as a number, a text column that looks written with a
    thousands dot (``_Grouping``), or that holds day.month dates (``_DayMonth``), is
    refused too; typed Parquet numbers are not text.
    """

    def __init__(self, path: Path, column: str, dtype: type) -> None:
        self.path, self.column, self.dtype = path, column, dtype
        self.error: DataError | None = None
        self._blocks: list[np.ndarray] = []
        self._grouping = _Grouping()
        self._dates = _DayMonth()
        self._rows = 0  # cells added
        # a cell's line where it is not its row's (a CSV row spanning lines): by position
        self._moved: dict[int, int] = {}

    def add_cells(self, lines: Sequence[int], cells: Sequence[str],
                  moved: Mapping[int, int] | None = None) -> None:
        """Convert one block of cells (``_number``'s rules), ``lines`` their lines;
        ``moved``: the block's cells whose line is not their row's, by position in the
        block (:meth:`lines`)."""
        if self.error is not None:
            return
        if moved:
            self._moved.update((self._rows + k, line) for k, line in moved.items())
        self._rows += len(cells)
        # float() on the cell as it is, then a check of the whole block, is the same as
        # _number on every cell wherever it passes (float() strips what str.strip()
        # strips, and takes no TRUE/FALSE or empty cell); any other block goes cell by
        # cell, to convert TRUE/FALSE or to name the first bad cell
        try:
            values = np.fromiter(map(float, cells), np.float64, len(cells))
            fast = "_" not in "".join(cells) and bool(np.all(np.abs(values) <= FLOAT32_MAX))
        except ValueError:
            fast = False
        if not fast:
            values = np.empty(len(cells), np.float64)
            for k, (lineno, cell) in enumerate(zip(lines, cells, strict=True)):
                try:
                    values[k] = _number(self.path, lineno, self.column, cell)
                except DataError as exc:
                    self.error, self._blocks = exc, []
                    return
        self._grouping.add(lines, cells, values)
        self._dates.add(lines, cells, values)
        self._blocks.append(values.astype(self.dtype, copy=False))

    def add_values(self, values: np.ndarray) -> None:
        """A block already converted and checked (a Parquet number column)."""
        if self.error is None:
            self._blocks.append(values.astype(self.dtype, copy=False))

    def values(self) -> np.ndarray:
        """The column.

        Raises:
            DataError: its first bad cell."""
        if self.error is not None:
            raise self.error
        grouped = self._grouping.refusal(self.path, self.column)
        if grouped is not None:
            raise grouped
        dated = self._dates.refusal(self.path, self.column)
        if dated is not None:
            raise dated
        if not self._blocks:
            return np.empty(0, self.dtype)
        return np.concatenate(self._blocks)

    def lines(self, rows: np.ndarray) -> np.ndarray:
        """The line of each of the column's cells, given its rows' lines."""
        if not self._moved:
            return rows
        at = rows.copy()
        for k, line in self._moved.items():
            at[k] = line
        return at


class _SplitNames:
    """A declared split column, read as ``_Numbers`` reads numbers: each cell's split
    name (train, val or test, as ``_SPLIT_NAMES`` spells them), or its first bad cell."""

    def __init__(self, path: Path, column: str) -> None:
        self.path, self.column = path, column
        self.error: DataError | None = None
        self.names: list[str | None] = []

    def add_cells(self, lines: Sequence[int], cells: Sequence[str]) -> None:
        if self.error is not None:
            return
        for lineno, cell in zip(lines, cells, strict=True):
            name = _SPLIT_NAMES.get(cell.strip().lower())
            if name is None:
                self.error = DataError(
                    self.path,
                    f"split value {cell!r} must be one of train, val, test",
                    line=lineno,
                    column=self.column,
                    problem="split value must be one of train, val, test",
                    holds_value=True,
                )
                return
            self.names.append(name)


@dataclass
class _Declared:
    """A table's declared columns, read: what ``_load_tabular`` checks, in its order."""

    header: list[str]  # every column of the file, as ``_column_index`` lists them
    lines: np.ndarray  # the line of each row kept (Parquet: row number + 1)
    site_rows: int  # rows with this site's value (every row without a site column)
    numbers: dict[str, _Numbers]
    split: _SplitNames | None
    ids: list[str]  # the id column's cells, where the caller filters on it


def _numeric_roles(spec: DatasetSpec) -> dict[str, type]:
    """The columns read as numbers, with the dtype each is kept as."""
    roles: dict[str, type] = {f: np.float32 for f in spec.features}
    labels = (spec.event, spec.time) if spec.task == "survival" else (spec.target,)
    roles.update({c: np.float64 for c in labels if c is not None})
    return roles


# Rows converted at a time: the declared cells of one block are all the text a CSV
# load holds at once (a few MB), and numpy's per-block work stays small beside it.
_BLOCK_ROWS = 4096


def _csv_columns(spec: DatasetSpec, path: Path,
                 keep_id: Callable[[str], bool] | None) -> _Declared:
    """Read a CSV table's declared columns in one pass, keeping no other cell: rows
    without this site's value, or whose id ``keep_id`` refuses, are skipped.

    Raises:
        DataError: as :class:`_CsvRows` (a bad cell is not raised here but kept,
            ``_Numbers``)."""
    table = _CsvRows(path)
    header = table.header
    roles = _numeric_roles(spec)
    # by position in the fields: a repeated or unnamed name may be at several (finish()
    # refuses the first, and keeps one of the second)
    numbers = {j: _Numbers(path, h, roles[h]) for j, h in enumerate(header) if h in roles}
    splits = {j: _SplitNames(path, h) for j, h in enumerate(header) if h == spec.split_column}
    site_at = table.position(spec.site_column) if spec.site_column is not None else None
    id_at = table.position(spec.id_column) if keep_id is not None else None
    wanted = sorted({*numbers, *splits, *([id_at] if id_at is not None else [])})
    width = max(wanted, default=-1) + 1
    pick = operator.itemgetter(*wanted) if len(wanted) > 1 else (
        (lambda fields: (fields[wanted[0]],)) if wanted else (lambda fields: ()))
    same_site: dict[str, bool] = {}
    lines = array.array("q")
    block_lines: list[int] = []
    block: list[tuple[str, ...]] = []
    # the block's rows that span lines (a quoted cell with a line break), by position:
    # the line each wanted cell starts on
    spans: dict[int, list[int]] = {}
    spanning = 0
    ids: list[str] = []
    site_rows = 0

    def flush() -> None:
        cells = list(zip(*block, strict=True)) if block else [() for _ in wanted]
        for k, j in enumerate(wanted):
            at: Sequence[int] = block_lines
            moved = {r: cell_lines[k] for r, cell_lines in spans.items()
                     if cell_lines[k] != block_lines[r]}
            if moved:
                at = list(block_lines)
                for r, line in moved.items():
                    at[r] = line
            if j in numbers:
                numbers[j].add_cells(at, cells[k], moved)
            if j in splits:
                splits[j].add_cells(at, cells[k])
            if j == id_at:
                ids.extend(cell.strip() for cell in cells[k])
        lines.extend(block_lines)
        block_lines.clear()
        block.clear()
        spans.clear()

    for lineno, fields in table:
        if len(fields) < width:  # a ragged row: finish() refuses it
            fields = fields + [""] * (width - len(fields))
        if site_at is not None:
            cell = fields[site_at] if site_at < len(fields) else ""
            kept = same_site.get(cell)
            if kept is None:
                kept = same_site[cell] = _same_site(cell, spec.site)
            if not kept:
                continue
        site_rows += 1
        if id_at is not None and keep_id is not None and not keep_id(fields[id_at].strip()):
            continue
        if table.spanning != spanning:  # this row, or one skipped since the last kept
            spanning = table.spanning
            spans[len(block)] = [_cell_line(lineno, fields, j) for j in wanted]
        block_lines.append(lineno)
        block.append(pick(fields))
        if len(block) == _BLOCK_ROWS:
            flush()
    flush()
    header, kept_at = table.finish()
    # each declared column by name, from the one position finish() kept for it
    kept_set = set(kept_at)
    return _Declared(
        header=header,
        lines=np.array(lines, dtype=np.int64),
        site_rows=site_rows,
        numbers={c.column: c for j, c in numbers.items() if j in kept_set},
        split=next((s for j, s in splits.items() if j in kept_set), None),
        ids=ids,
    )


def _parquet_cell(value: Any) -> str:
    # booleans as 1/0 so an event or binary-label column of bools reads as numbers
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _parquet_cells(column: Any) -> Iterator[list[str]]:
    """A Parquet column's cells as text (``_parquet_cell``), a block at a time."""
    for chunk in column.chunks:
        for start in range(0, len(chunk), _BLOCK_ROWS):
            yield [_parquet_cell(v) for v in chunk.slice(start, _BLOCK_ROWS).to_pylist()]


def _parquet_numbers(column: Any, lines: np.ndarray, numbers: _Numbers) -> None:
    """Fill ``numbers`` from a Parquet column, as ``_number`` reads each cell's text
    (``_parquet_cell``): a column of integers, floats or booleans is converted whole
    (their text reads back as the same double), any other type cell by cell."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_boolean(kind)
            or pa.types.is_float32(kind) or pa.types.is_float64(kind)):
        start = 0
        for cells in _parquet_cells(column):
            numbers.add_cells(lines[start:start + len(cells)].tolist(), cells)
            start += len(cells)
        return
    missing = pc.is_null(column).to_numpy(zero_copy_only=False) if column.null_count else None
    if missing is not None:
        column = pc.fill_null(column, False if pa.types.is_boolean(kind) else 0)
    values = column.to_numpy().astype(np.float64)
    bad = ~(np.abs(values) <= FLOAT32_MAX)  # NaN, inf, beyond float32
    if missing is not None:
        bad |= missing
    if bad.any():
        k = int(bad.argmax())
        cell = "" if missing is not None and missing[k] else _parquet_cell(column[k].as_py())
        numbers.add_cells([int(lines[k])], [cell])  # keeps the refusal of that cell
        return
    numbers.add_values(values)


def _parquet_columns(spec: DatasetSpec, path: Path,
                     keep_id: Callable[[str], bool] | None) -> _Declared:
    """Read a Parquet table's declared columns, one at a time, and no other; rows
    without this site's value, or whose id ``keep_id`` refuses, are left out.

    Parquet has no text lines; a row's "line" is its row number counting a header as
    line 1, so that messages read the same for both formats.

    Raises:
        DataError: pyarrow missing, the file missing, empty or unreadable, a repeated
            column name, no rows (a bad cell is not raised here but kept, ``_Numbers``).
    """
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise DataError(path, "reading Parquet needs the 'pyarrow' package",
                        problem="reading Parquet needs the 'pyarrow' package") from exc
    refusal = _not_a_file(path)
    if refusal is not None:
        raise refusal
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty", problem="file is empty")
    try:
        schema_names = list(pq.read_schema(path).names)
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(path, f"not a readable Parquet file: {exc}",
                        problem="not a readable Parquet file") from exc
    # as a CSV header is read: spaces around a name dropped ('age ' from a SAS or
    # pandas export names the column 'age'), NFC
    header = [_nfc(h.strip()) for h in schema_names]
    # before reading: pyarrow's own refusal of a repeated name does not say which
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise DataError(path, f"column names {repeated} repeat", line=1, column=repeated[0],
                        problem="a column name repeats", column_public=False)

    def read(name: str | None) -> Any:
        """The column ``name`` (declared), or None where the file has none."""
        if name not in header:
            return None
        try:
            table = parquet.read(columns=[schema_names[header.index(name)]])
        except Exception as exc:
            raise DataError(path, f"not a readable Parquet file: {exc}",
                            problem="not a readable Parquet file") from exc
        return table.column(0)

    rows = parquet.metadata.num_rows
    if rows == 0:
        raise DataError(path, "no data rows", line=2, problem="no data rows")
    keep = np.ones(rows, dtype=bool)
    site = read(spec.site_column) if spec.site_column is not None else None
    if site is not None:
        same_site: dict[str, bool] = {}
        flags: list[bool] = []
        for cells in _parquet_cells(site):
            for cell in cells:
                kept = same_site.get(cell)
                if kept is None:
                    kept = same_site[cell] = _same_site(cell, spec.site)
                flags.append(kept)
        keep = np.array(flags, dtype=bool)
        del flags, site
    site_rows = int(keep.sum())
    ids: list[str] = []
    id_column = read(spec.id_column) if keep_id is not None else None
    if keep_id is not None and id_column is not None:
        every_id = [cell.strip() for cells in _parquet_cells(id_column) for cell in cells]
        for k, pid in enumerate(every_id):
            if keep[k] and not keep_id(pid):
                keep[k] = False
        ids = [pid for k, pid in enumerate(every_id) if keep[k]]
    positions = np.flatnonzero(keep)
    lines = positions + 2
    every_row = positions.size == rows

    def kept_rows(column: Any) -> Any:
        return column if every_row else column.take(positions)

    numbers: dict[str, _Numbers] = {}
    for name, dtype in _numeric_roles(spec).items():
        column = read(name)
        if column is not None:
            numbers[name] = _Numbers(path, name, dtype)
            _parquet_numbers(kept_rows(column), lines, numbers[name])
    split = None
    column = read(spec.split_column) if spec.split_column is not None else None
    if column is not None:
        split = _SplitNames(path, header[header.index(spec.split_column)])
        start = 0
        for cells in _parquet_cells(kept_rows(column)):
            split.add_cells(lines[start:start + len(cells)].tolist(), cells)
            start += len(cells)
    return _Declared(header, lines, site_rows, numbers, split, ids)


def _at(unit: str, position: int) -> dict[str, int]:
    """``line=`` for text files, ``row=`` for arrays: where a DataError points."""
    return {unit: position}


def _check_survival(
    path: Path,
    positions: Sequence[int],
    event: np.ndarray,
    time: np.ndarray,
    event_column: str,
    time_column: str,
    unit: str = "line",
    time_positions: Sequence[int] | None = None,
) -> None:
    """Every event is 0 or 1 and every time a finite number >= 0. ``positions``: each
    row's line (or row); ``time_positions``: each time cell's, where it differs (a CSV
    row spanning lines).

    Raises:
        DataError: at the first bad value, naming its line (or row) and column.
    """
    bad = ~((event == 0.0) | (event == 1.0)) | ~(np.isfinite(time) & (time >= 0))
    for k in range(int(bad.argmax()) if bad.any() else bad.size, bad.size):
        pos = int(positions[k])
        if event[k] not in (0.0, 1.0):
            raise DataError(
                path,
                f"event value {event[k]:g} must be 0 or 1",
                column=event_column,
                problem="event value must be 0 or 1",
                holds_value=True,
                **_at(unit, pos),
            )
        if not (math.isfinite(time[k]) and time[k] >= 0):
            raise DataError(
                path,
                f"time value {time[k]:g} must be a finite number >= 0",
                column=time_column,
                problem="time value must be a finite number >= 0",
                holds_value=True,
                **_at(unit, pos if time_positions is None else int(time_positions[k])),
            )


def _check_labels(
    path: Path,
    positions: Sequence[int],
    target: np.ndarray,
    task: str,
    column: str,
    unit: str = "line",
) -> tuple[np.ndarray, int]:
    """The labels as the task's dtype, and the number of classes (0 for regression).

    Raises:
        DataError: a label that is not finite, or not 0/1 (binary) or a
            non-negative integer (multiclass), naming its line (or row) and column.
    """
    good = np.isfinite(target)
    if task in ("binary", "multiclass"):
        good &= (target == np.floor(target)) & (target >= 0)
        if task == "binary":
            good &= target <= 1
    for k in range(int(good.argmin()) if not good.all() else good.size, good.size):
        pos = int(positions[k])
        v = float(target[k])
        if not math.isfinite(v):
            raise DataError(path, f"label {v:g} is not finite", column=column,
                            problem="label is not finite", holds_value=True, **_at(unit, pos))
        if task in ("binary", "multiclass") and (
            v != int(v) or v < 0 or (task == "binary" and v > 1)
        ):
            rule = "0 or 1" if task == "binary" else "a non-negative integer"
            raise DataError(path, f"label {v:g} must be {rule}", column=column,
                            problem=f"label must be {rule}", holds_value=True,
                            **_at(unit, pos))
    if task == "binary":
        return target.astype(np.float32), 2
    if task == "multiclass":
        return target.astype(np.int64), int(target.max()) + 1
    return target.astype(np.float32), 0


@dataclass
class _Table:
    x: np.ndarray
    y: np.ndarray
    split: list[str | None]
    features: list[str]
    n_classes: int = 0
    # the id column's cells of the rows kept, where the loader filtered on it
    ids: list[str] = field(default_factory=list)
    # the train, val and test rows, where the loader placed them itself (the images:
    # each split's rows together, so that the splits are views of x); else the split
    # is made from ``split`` (``_split_rows``)
    parts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


# a plain decimal number: no leading zeros (007 is a code, not 7), no exponent, no _
_DECIMAL = re.compile(r"[+-]?(0|[1-9][0-9]*)(\.[0-9]+)?")


def _same_site(cell: str, site: str | int | None) -> bool:
    """A row's site value is the declared one: the same text, or the same number when
    both are plain decimals (a Parquet float column gives 1.0 for site = 1), compared
    exactly (large ids stay apart). A zero-padded code (007) is text."""
    raw, want = cell.strip(), str(site).strip()
    if raw == want:
        return True
    if _DECIMAL.fullmatch(raw) and _DECIMAL.fullmatch(want):
        return Decimal(raw) == Decimal(want)
    return False


def _load_tabular(spec: DatasetSpec, path: Path,
                  keep_id: Callable[[str], bool] | None = None) -> _Table:
    """Read, check and convert a CSV or Parquet table's declared columns.

    ``keep_id``: keep only the rows whose ``id_column`` cell (stripped) it accepts; their
    ids are returned in ``_Table.ids``.

    Raises:
        DataError: the file's problems (``_CsvRows``, ``_parquet_columns``); then a
            missing split, site or id column; no row with this site's value; a feature
            that is also a label or bookkeeping column; no features; then, column by
            column in declared order (features, then event and time, or target), a
            missing column or the column's first bad cell; then bad survival values or
            labels; then the first bad split value.
    """
    read = _parquet_columns if _is_parquet(path) else _csv_columns
    table = read(spec, path, keep_id)
    header = table.header
    for col in (spec.split_column, spec.site_column, spec.id_column):
        if col is not None:
            _column_index(path, header, col)
    if spec.site_column is not None and table.site_rows == 0:
        raise DataError(path, f"no row has site value {spec.site!r}", column=spec.site_column,
                        problem="no row has this site's value (datasets.site)")
    for role, col in spec._role_columns().items():
        if col in spec.features:  # validate() catches this too, but not for defaults set here
            raise DataError(path, f"feature column is also the {role!r} column", line=1,
                            column=col, problem=f"feature column is also the {role!r} column")
    features = list(spec.features)
    if not features:  # validate() refuses this too; a header's own order is no schema
        raise DataError(path, "no feature columns declared (datasets.features)",
                        problem="no feature columns declared (datasets.features)")

    def column(name: str) -> tuple[np.ndarray, np.ndarray]:
        """The column's values and each cell's line."""
        _column_index(path, header, name)
        numbers = table.numbers.pop(name)  # dropped here: x holds it now
        return numbers.values(), numbers.lines(lines)

    lines = table.lines
    x = np.empty((lines.size, len(features)), dtype=np.float32)
    for j, name in enumerate(features):
        x[:, j] = column(name)[0]
    n_classes = 0
    if spec.task == "survival":
        assert spec.event is not None and spec.time is not None
        event, event_lines = column(spec.event)
        time, time_lines = column(spec.time)
        _check_survival(path, event_lines, event, time, spec.event, spec.time,
                        time_positions=time_lines)
        y = np.stack([event, time], axis=1).astype(np.float32)
    else:
        assert spec.target is not None
        target, target_lines = column(spec.target)
        y, n_classes = _check_labels(path, target_lines, target, spec.task, spec.target)
    split: list[str | None] = [None] * lines.size
    if table.split is not None:
        if table.split.error is not None:
            raise table.split.error
        split = table.split.names
    return _Table(x, y, split, features, n_classes, ids=table.ids)


# ---------------------------------------------------------------------------
# Fed-TCGA-BRCA (FLamby)

FED_TCGA_BRCA_REGIONS = ("Northeast", "South", "West", "Midwest", "Europe", "Canada")

# FLamby's 39 features of brca.csv, in its column order (FLamby's in_features = 39):
# every centre's model input, whatever order a copy of the file has.
FED_TCGA_BRCA_FEATURES: tuple[str, ...] = (
    "age_at_index",
    "ethnicity_not hispanic or latino",
    "ethnicity_not reported",
    "race_asian",
    "race_black or african american",
    "race_not reported",
    "race_white",
    "ajcc_pathologic_m_MX",
    "ajcc_pathologic_n_N0 (i-)",
    "ajcc_pathologic_n_N1",
    "ajcc_pathologic_n_N1a",
    "ajcc_pathologic_n_N2",
    "ajcc_pathologic_n_N2a",
    "ajcc_pathologic_stage_Stage IA",
    "ajcc_pathologic_stage_Stage IIA",
    "ajcc_pathologic_stage_Stage IIB",
    "ajcc_pathologic_stage_Stage IIIA",
    "ajcc_pathologic_stage_Stage IIIC",
    "ajcc_pathologic_t_T1c",
    "ajcc_pathologic_t_T2",
    "ajcc_pathologic_t_T3",
    "ajcc_staging_system_edition_5th",
    "ajcc_staging_system_edition_6th",
    "ajcc_staging_system_edition_7th",
    "icd_10_code_C50.9",
    "morphology_8500/3",
    "morphology_8520/3",
    "primary_diagnosis_Infiltrating duct carcinoma, NOS",
    "primary_diagnosis_Lobular carcinoma, NOS",
    "prior_malignancy_yes",
    "synchronous_malignancy_Not Reported",
    "treatment_or_therapy_not reported",
    "treatment_or_therapy_yes",
    "tumor_stage_stage i",
    "tumor_stage_stage ia",
    "tumor_stage_stage iia",
    "tumor_stage_stage iib",
    "tumor_stage_stage iiia",
    "tumor_stage_stage iiic",
)


def tcga_centre_of_barcodes(path: Path) -> dict[str, int]:
    """Map each patient id to its FLamby centre via the split file's ``fold2`` column.

    FLamby derived ``fold2`` (``train_3`` / ``test_3``) from the TSS code of the
    TCGA barcode (``TCGA-<TSS>-<participant>``) and the region in centers.csv.

    Raises:
        DataError: the split file is missing, malformed or names an unknown fold.
    """
    split_path = path / "train_test_split.csv"
    header, rows = _read_csv(split_path)
    pid = _column_index(split_path, header, "pid")
    fold2 = _column_index(split_path, header, "fold2")
    out: dict[str, int] = {}
    for lineno, fields in rows:
        part, _, centre = fields[fold2].strip().partition("_")
        if part not in ("train", "test") or not centre.isdigit() or int(centre) > 5:
            raise DataError(
                split_path,
                f"fold2 value {fields[fold2]!r} must look like train_<0..5> or test_<0..5>",
                line=lineno,
                column="fold2",
                problem="fold2 value must look like train_<0..5> or test_<0..5>",
                holds_value=True,
            )
        out[fields[pid].strip()] = int(centre)
    return out


def _load_fed_tcga_brca(spec: DatasetSpec) -> _Table:
    root = Path(spec.path)
    split_path = root / "train_test_split.csv"
    header, rows = _read_csv(split_path)
    pid = _column_index(split_path, header, "pid")
    fold2 = _column_index(split_path, header, "fold2")
    fold_of: dict[str, str] = {}
    centre_of = tcga_centre_of_barcodes(root)
    for _, fields in rows:
        fold_of[fields[pid].strip()] = fields[fold2].strip().partition("_")[0]
    site = int(spec.site)  # validated

    inner = replace(
        spec,
        kind="tabular",
        path=str(root / "brca.csv"),
        event=spec.event or "E",
        time=spec.time or "T",
        id_column="pid",
        features=spec.features or FED_TCGA_BRCA_FEATURES,
    )
    table = _load_tabular(inner, root / "brca.csv",
                          keep_id=lambda pid: centre_of.get(pid) == site)
    table.split = [_SPLIT_NAMES[fold_of[p]] for p in table.ids]
    return table



# ---------------------------------------------------------------------------
# images and numpy


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


# What an operating system leaves in folders of its own accord, ignored like dot-files:
# Windows' thumbnail cache and folder settings, the folder macOS's zip puts its
# resource forks in (``__MACOSX/<class>/._x.png``). Windows names are case-blind.
_SYSTEM_LITTER = frozenset({"thumbs.db", "desktop.ini", "__macosx"})


def _visible(path: Path) -> bool:
    """Not a dot-file or dot-folder (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.png``),
    nor what Windows or macOS's zip leave behind (``Thumbs.db``, ``desktop.ini``,
    ``__MACOSX``)."""
    return not path.name.startswith(".") and path.name.casefold() not in _SYSTEM_LITTER


def _image_parts(root: Path) -> list[tuple[str | None, Path]]:
    """The split folders of an image data set: with ``<root>/train/``, each visible
    folder next to it that names a split (``train``, ``test``, ``val``, ``valid``,
    ``validation``: ``_SPLIT_NAMES``) with its split; without, ``[(None, root)]`` (the
    flat layout, every image in training).

    Raises: DataError: a visible folder next to ``train/`` that names no split (its
        images would be ignored), named with the folders allowed there."""
    if not (root / "train").is_dir():
        return [(None, root)]
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    other = [p.name for p in folders if p.name not in _SPLIT_NAMES]
    if other:
        raise DataError(root, f"folder(s) {other} next to train/ are not split folders; "
                        f"next to train/ only {', '.join(f'{n}/' for n in _SPLIT_NAMES)} "
                        "are read (each holding <class>/ folders): move the images into "
                        "one of them, or move the folder out", part="the image folder",
                        problem="a folder next to train/ is not a split folder (train/, "
                        "test/, val/, valid/ or validation/)")
    return [(_SPLIT_NAMES[p.name], p) for p in folders]


def _load_images(spec: DatasetSpec) -> _Table:
    """Images under ``<root>/<class>/`` (or ``<root>/<split>/<class>/``, the splits
    ``train/``, ``test/`` and a validation folder ``val/``, ``valid/`` or
    ``validation/``), labelled by the class's position in ``spec.classes``. Files of
    another type are skipped, with one warning naming how many and a few of them.

    The images are decoded ``IMAGE_DECODE_WORKERS`` at a time straight into one array,
    the rows of each split together (train, then validation, then test: ``_Table.parts``)
    so that the splits are views of it rather than copies. What is loaded, and what is
    refused first, is what reading the files one by one in the order listed (split
    folder, class in ``spec.classes`` order, file name) gives.

    Raises:
        DataError: no folder, a visible class folder not among ``spec.classes``
            (named), a visible folder next to ``train/`` that names no split (named),
            a class folder holding files but no supported image (named), no image, or
            an image that cannot be read or scaled (named).
    """
    root = Path(spec.path)
    if not root.is_dir():
        twin = None if root.exists() else _spelt_otherwise(root)
        if twin is not None:
            raise DataError(root, f"image folder does not exist; {twin[0]}",
                            part="the image folder", problem=f"does not exist; {twin[1]}")
        raise DataError(root, "image folder does not exist", part="the image folder",
                        problem="does not exist")
    parts = _image_parts(root)
    classes = list(spec.classes)
    label_of = {name: k for k, name in enumerate(classes)}
    for _, folder in parts:
        if not folder.is_dir():
            continue
        unknown = sorted(p.name for p in folder.iterdir()
                         if p.is_dir() and _visible(p) and p.name not in label_of)
        if unknown:
            raise DataError(
                folder,
                f"class folder(s) {unknown} are not among datasets.classes {classes}; "
                "declare them (in the same place in the list at every site) or move them out",
                part="the image folder",
                problem="holds a class folder not among datasets.classes",
            )
    listed = _image_files(parts, classes)
    images = listed.images
    size = spec.image_size
    if listed.refusal is not None:
        # read one by one, every image listed before the class folder would have been
        # read (and an unreadable one refused) before that folder was refused
        _decode_images(images, None, None, size)
        raise listed.refusal
    if images:
        rows = _split_rows(spec, listed.split)
        # after the three splits, the rows in none (a test/ folder's, when cv_folds makes
        # the test split of training images): read all the same, as they always were
        unused = np.ones(len(images), dtype=bool)
        for idx in rows:
            unused[idx] = False
        order = np.concatenate([*rows, np.flatnonzero(unused)])
        slot = np.empty(len(images), dtype=np.int64)
        slot[order] = np.arange(order.size)
        x = np.empty((len(images), 1, size, size), dtype=np.float32)
        _decode_images(images, slot, x, size)
    if listed.skipped:
        skipped = listed.skipped
        names = ", ".join(str(f.relative_to(root)) for f in skipped[:5])
        log.warning("data set %r (%s): %d file(s) skipped, not a supported image (PNG, JPEG, "
                    "BMP, TIFF): %s%s", spec.name, root, len(skipped), names,
                    f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    if not images:
        raise DataError(
            root, f"no image files found in class folders {classes} "
            "(expected <root>/<class>/<image>.png)", part="the image folder",
            problem="no image files found in the class folders",
        )
    labels = np.asarray(listed.labels, dtype=np.float32 if spec.task == "binary" else np.int64)
    ends = np.cumsum([idx.size for idx in rows])
    return _Table(x, labels[order], [listed.split[i] for i in order],
                  [f"pixel[{size}x{size}]"], len(classes),
                  parts=(np.arange(0, ends[0]), np.arange(ends[0], ends[1]),
                         np.arange(ends[1], ends[2])))


@dataclass
class _ImageFiles:
    """The images of a folder in the order the loader reads them, each with its class
    (``images``), label and split folder; the files skipped as not images; and the
    refusal of the first class folder holding files but no image, where one does
    (``images`` then ends with the images listed before it)."""

    images: list[tuple[Path, str]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    split: list[str | None] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    refusal: DataError | None = None


def _image_files(parts: list[tuple[str | None, Path]], classes: list[str]) -> _ImageFiles:
    """The image files under each split folder's class folders: split folders as
    ``parts`` lists them, classes in declared order, files sorted by name."""
    listed = _ImageFiles()
    for part, folder in parts:
        for label, cls in enumerate(classes):
            cdir = folder / cls
            if not cdir.is_dir():
                continue  # a site may hold no image of some class
            files = [f for f in sorted(cdir.iterdir()) if _visible(f) and not f.is_dir()]
            images = [f for f in files if f.suffix.lower() in _IMAGE_SUFFIXES]
            if files and not images:
                kinds = sorted({f.suffix.lower() or "no extension" for f in files})
                listed.refusal = DataError(
                    cdir, f"holds {len(files)} file(s) ({', '.join(kinds[:5])}) and not one "
                    f"supported image (PNG, JPEG, BMP, TIFF): class {cls!r} would have no "
                    "images here; convert them (DICOM to PNG, say) or move them out",
                    part=f"class folder {cls!r}", problem="holds files but not one "
                    "supported image (PNG, JPEG, BMP, TIFF)")
                return listed
            listed.skipped.extend(f for f in files if f.suffix.lower() not in _IMAGE_SUFFIXES)
            for f in images:
                listed.images.append((f, cls))
                listed.labels.append(label)
                listed.split.append(part)
    return listed


# Images decoded at once. Pillow lets go of the GIL while it decodes, converts and
# resizes, so threads overlap on as many cores; each holds one image at its full size.
IMAGE_DECODE_WORKERS = min(4, os.cpu_count() or 1)


def _decode_images(images: Sequence[tuple[Path, str]], slot: np.ndarray | None,
                   out: np.ndarray | None, size: int) -> None:
    """Decode ``images[i]`` into ``out[slot[i], 0]`` (only check that it decodes where
    ``out`` is None), ``IMAGE_DECODE_WORKERS`` at a time, a bounded number of files
    ahead of the first not yet done.

    Raises:
        DataError: the first image, in ``images`` order, that reading them one by one
            refuses, with that refusal (``_decode_image``'s).
    """
    from PIL import Image

    workers = max(1, IMAGE_DECODE_WORKERS)
    ahead: collections.deque[tuple[int, Future[bool]]] = collections.deque()
    # Pillow warns of a decompression bomb from the worker threads: the filter that makes
    # it an error is the process's, set here around all of them rather than per image
    with warnings.catch_warnings(), \
            ThreadPoolExecutor(workers, thread_name_prefix="fedge-images") as pool:
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            for i, (path, _) in enumerate(images):
                row = 0 if slot is None else int(slot[i])
                ahead.append((i, pool.submit(_decode_at_once, path, out, row, size)))
                if len(ahead) >= 4 * workers:
                    _finish_image(images, slot, out, size, *ahead.popleft())
            while ahead:
                _finish_image(images, slot, out, size, *ahead.popleft())
        finally:
            for _, later in ahead:
                later.cancel()


def _finish_image(images: Sequence[tuple[Path, str]], slot: np.ndarray | None,
                  out: np.ndarray | None, size: int, i: int, decoded: Future[bool]) -> None:
    """Wait for image ``i``; one its worker could not decode is read again the way
    the loader always read one, which refuses it in the words it always used."""
    if not decoded.result():
        path, cls = images[i]
        pixels = _decode_image(path, cls, size)
        if out is not None and slot is not None:
            out[slot[i], 0] = pixels


def _decode_at_once(path: Path, out: np.ndarray | None, row: int, size: int) -> bool:
    """``path``'s pixels into ``out[row, 0]``, the file read once: every chunk checked
    (``verify``), then decoded, from the same bytes. False where either fails (the
    caller reads the file again to say why, in ``_decode_image``'s words)."""
    from PIL import Image

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            pixels = _grey_pixels(path, im, size)
        if out is not None:
            out[row, 0] = pixels
    except Exception:  # _decode_image reads it again and names what is wrong
        return False
    return True


def _decode_image(path: Path, cls: str, size: int) -> np.ndarray:
    """One image file of class ``cls``, checked and decoded from its path.

    Raises:
        DataError: the image is too large to load safely, is not a readable image (a
            chunk's CRC fails, say), or has no fixed range (``_grey_pixels``), naming
            the file.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # past Pillow's pixel limit (~89 M) a warning, past twice it an
            # error: either way far beyond a training image, and a file
            # made to exhaust memory (a decompression bomb)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.verify()  # every chunk's CRC, the pixel data's included
            with Image.open(path) as im:
                return _grey_pixels(path, im, size)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataError(path, f"image too large to load safely: {exc}",
                        part=f"an image file of class {cls!r}",
                        problem="image too large to load safely") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        # verify() raises SyntaxError for a broken PNG chunk
        raise DataError(path, f"not a readable image: {exc}",
                        part=f"an image file of class {cls!r}",
                        problem="not a readable image") from exc


SIXTEEN_BIT_MAX = 65535.0

EXIF_ORIENTATION = 0x0112


def _upright(im: Any) -> Any:
    """``im`` turned as its EXIF Orientation (2..8) says; as it is without one.

    Pillow's ImageOps.exif_transpose does this too, but also rewrites the EXIF block it
    keeps (which can fail on a camera's malformed one); only the pixels are used here."""
    from PIL import Image

    turn = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
    orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    method = turn.get(orientation) if isinstance(orientation, int) else None
    return im if method is None else im.transpose(method)


def _grey_pixels(path: Path, im: Any, size: int) -> np.ndarray:
    """One image as a ``size`` x ``size`` float32 greyscale array in [0, 1].

    8-bit modes (L, RGB, P, ...) go through Pillow's greyscale conversion and / 255.
    16-bit greyscale (``I;16``, ``I;16B``, ...) is read as its integers and / 65535:
    ``convert("L")`` would clip every value above 255 to white. ``I`` (32-bit integer)
    is taken as 16-bit when its values lie in 0..65535 (readers give some 16-bit
    files so); beyond that, and for ``F`` (32-bit float), there is no fixed range
    to scale by, and a per-image min-max would make intensities incomparable
    between images, so they are refused.

    The pixels are turned first as the EXIF Orientation tag says (a phone's or a
    dermatoscope's JPEG stores them sideways and says so), so that the model sees
    what a viewer shows, whichever way each camera stores them.

    Raises:
        DataError: a mode without a fixed range (names the file and the mode).
    """
    from PIL import Image

    im = _upright(im)
    if im.mode.startswith("I;16") or im.mode == "I":
        raw = np.asarray(im)
        lo, hi = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
        if lo < 0 or hi > SIXTEEN_BIT_MAX:
            raise DataError(path, f"32-bit integer pixels (mode {im.mode}) range {lo}..{hi}, "
                            "beyond 16 bits: no fixed scale to [0, 1]; export the image as "
                            "8- or 16-bit greyscale", part="an image file",
                            problem="32-bit integer pixels beyond 16 bits: no fixed scale "
                            "to [0, 1]")
        grey = Image.fromarray(raw.astype(np.float32) / np.float32(SIXTEEN_BIT_MAX))
        scaled = np.asarray(grey.resize((size, size)), dtype=np.float32)
        return np.clip(scaled, 0.0, 1.0)  # bicubic resampling overshoots at edges
    if im.mode == "F":
        raise DataError(path, "32-bit float pixels (mode F) have no fixed range to scale "
                        "to [0, 1]; export the image as 8- or 16-bit greyscale with the "
                        "intensity window you want", part="an image file",
                        problem="32-bit float pixels (mode F) have no fixed range")
    return np.asarray(im.convert("L").resize((size, size)), dtype=np.float32) / 255.0


def _load_numpy(spec: DatasetSpec) -> _Table:
    """``x`` (n, ...) with ``y`` (n,) or ``event`` and ``time`` (n,), checked like a table.

    ``x`` of shape (n, height, width) is taken as single-channel images and given
    its channel axis, (n, 1, height, width), as the image models take. Numbers only:
    complex, date and time arrays are refused (no meaning as one float each). A
    ``split`` array may hold text or bytes (``np.array([b"train", ...])``).

    Raises:
        DataError: a missing, unreadable or misshapen array, or a bad value,
            naming the array and the 1-based row.
    """
    path = Path(spec.path)
    refusal = _not_a_file(path)
    if refusal is not None:
        raise refusal
    import zipfile

    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(path, f"not a readable .npz file: {exc}",
                        problem="not a readable .npz file") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(path, "a .npy file holds one array; fedge reads an .npz with "
                        "named arrays: np.savez(path, x=..., y=...) (survival: x, event, time)",
                        problem="a .npy file holds one array; fedge reads an .npz with "
                        "named arrays")
    labels = ["event", "time"] if spec.task == "survival" else ["y"]
    with npz:
        keys = set(npz.files)
        for k in ["x", *labels]:
            if k not in keys:
                raise DataError(path, f"missing array {k!r}; found {sorted(keys)}", column=k,
                                problem="missing array")
        arrays: dict[str, np.ndarray] = {}
        for k in ["x", *labels]:
            try:
                raw = npz[k]
                if raw.dtype.kind in "cmM":
                    what = {"c": "complex numbers", "m": "time spans", "M": "dates"}
                    raise DataError(path, f"array {k!r} holds {what[raw.dtype.kind]} "
                                    f"(dtype {raw.dtype}); it needs plain numbers", column=k,
                                    problem=f"array holds {what[raw.dtype.kind]}; it needs "
                                    "plain numbers")
                arrays[k] = np.asarray(raw, dtype=np.float64)
            except (ValueError, TypeError) as exc:
                if isinstance(exc, DataError):
                    raise
                raise DataError(path, f"array {k!r} is not numeric: {exc}", column=k,
                                problem="array is not numeric") from exc
            except (OSError, EOFError, zipfile.BadZipFile) as exc:
                raise DataError(path, f"truncated or corrupt array: {exc}", column=k,
                                problem="truncated or corrupt array") from exc
        try:
            split_arr = npz["split"] if "split" in keys else None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(path, f"truncated or corrupt array: {exc}", column="split",
                            problem="truncated or corrupt array") from exc
    x = arrays["x"]
    if x.ndim == 3:  # (n, height, width): single-channel images without their channel axis
        x = x[:, None, :, :]
    if x.ndim < 2:
        raise DataError(
            path,
            f"array 'x' has shape {x.shape}; it needs one row per sample, "
            "shape (n, features) or (n, channels, height, width)",
            column="x",
            problem=f"array has shape {x.shape}; it needs shape (n, features) or "
            "(n, channels, height, width)",
        )
    if x.shape[0] == 0:
        raise DataError(path, "array 'x' has no rows", column="x", problem="array has no rows")
    for k in labels:
        if arrays[k].shape != (x.shape[0],):
            raise DataError(
                path,
                f"array {k!r} has shape {arrays[k].shape}; it needs one value for each of "
                f"the {x.shape[0]} rows of 'x'",
                column=k,
                problem=f"array has shape {arrays[k].shape}; it needs one value for each of "
                f"the {x.shape[0]} rows of 'x'",
            )
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if bad.size:
        raise DataError(path, "non-finite value", row=int(bad[0]) + 1, column="x",
                        problem="non-finite value")
    for k in ["x", *labels]:  # finite in float64, inf as the float32 training uses
        flat = arrays[k].reshape(len(x), -1)
        beyond = np.isfinite(flat) & (np.abs(flat) > FLOAT32_MAX)
        big = np.flatnonzero(beyond.any(axis=1))
        if big.size:
            value = flat[big[0]][beyond[big[0]]][0]
            raise DataError(path, f"value {float(value)!r} is outside float32's range "
                            f"(|x| <= {FLOAT32_MAX:.4g})", row=int(big[0]) + 1, column=k,
                            problem="value is outside float32's range", holds_value=True)
    rows = range(1, x.shape[0] + 1)
    n_classes = 0
    if spec.task == "survival":
        event, time = arrays["event"], arrays["time"]
        _check_survival(path, rows, event, time, "event", "time", unit="row")
        y = np.stack([event, time], axis=1).astype(np.float32)
    else:
        y, n_classes = _check_labels(path, rows, arrays["y"], spec.task, "y", unit="row")
    split: list[str | None] = [None] * len(x)
    if split_arr is not None:
        if split_arr.shape != (len(x),):
            raise DataError(
                path,
                f"array 'split' has shape {split_arr.shape}; it needs one value per row of 'x'",
                column="split",
                problem=f"array has shape {split_arr.shape}; it needs one value per row of 'x'",
            )
        for k, v in enumerate(split_arr.tolist()):
            if isinstance(v, bytes):
                v = v.decode("utf-8", errors="replace")
            if str(v).lower() not in _SPLIT_NAMES:
                raise DataError(
                    path,
                    f"split value {v!r} must be train, val or test",
                    row=k + 1,
                    column="split",
                    problem="split value must be train, val or test",
                    holds_value=True,
                )
            split[k] = _SPLIT_NAMES[str(v).lower()]
    names = [f"x{j}" for j in range(x.shape[1])] if x.ndim == 2 else ["x"]
    return _Table(x.astype(np.float32), y, split, names, n_classes)


# ---------------------------------------------------------------------------


def _split_rows(spec: DatasetSpec,
                split: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The train, val and test rows (ascending) of rows marked ``split`` (None is
    train), as ``load_site_data`` documents: ``cv_folds`` and ``val_fraction``
    applied."""
    marks = np.array([s or "train" for s in split])
    train_idx = np.flatnonzero(marks == "train")
    val_idx = np.flatnonzero(marks == "val")
    test_idx = np.flatnonzero(marks == "test")
    if spec.cv_folds:
        fold = np.random.default_rng(spec.seed).permutation(train_idx.size) % spec.cv_folds
        train_idx, test_idx = train_idx[fold != spec.cv_fold], train_idx[fold == spec.cv_fold]
    if val_idx.size == 0 and spec.val_fraction > 0:
        rng = np.random.default_rng(spec.seed)
        perm = rng.permutation(train_idx)
        n_val = round(spec.val_fraction * perm.size)
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return train_idx, val_idx, test_idx


def _consecutive(idx: np.ndarray) -> bool:
    """Ascending row numbers without a gap (or none)."""
    return idx.size == 0 or int(idx[-1]) - int(idx[0]) + 1 == idx.size


def load_site_data(spec: DatasetSpec) -> SiteData:
    """Load one declared data set, split it and standardise it.

    Rows marked ``test`` form the test split; rows marked ``val`` the validation
    split; otherwise ``val_fraction`` of the training rows (a permutation fixed
    by ``seed``) become validation. The standardiser is fitted on what remains
    for training and applied to all three splits; under ``standardise = "bounds"``
    every split's bounded columns are clamped to their ``feature_bounds`` and
    mapped by those public constants alone.

    Raises:
        ValueError: the spec is incoherent.
        DataError: a file is missing, empty, truncated, or a value is wrong
            (naming the file, line and column).
    """
    spec.validate()
    loaders = {
        "tabular": lambda: _load_tabular(spec, Path(spec.path)),
        "fed_tcga_brca": lambda: _load_fed_tcga_brca(spec),
        "images": lambda: _load_images(spec),
        "numpy": lambda: _load_numpy(spec),
    }
    table = loaders[spec.kind]()
    train_idx, val_idx, test_idx = (table.parts if table.parts is not None
                                    else _split_rows(spec, table.split))
    if train_idx.size == 0:
        raise DataError(spec.path, f"dataset {spec.name!r}: no training rows at this site",
                        part="the data set", problem="no training rows at this site")
    std = None
    x = table.x
    if x.ndim == 2 and spec.standardise == "bounds":
        check_bounded_columns(spec, table.features)  # numpy's x0, x1, ... known only now
        bounds = spec.bounds()
        x = x.copy()
        for j, name in enumerate(table.features):
            if name in bounds:
                np.clip(x[:, j], *bounds[name], out=x[:, j])
        std = Standardiser.from_bounds(table.features, bounds)
        x = std.transform(x)
    elif x.ndim == 2:
        std = Standardiser.fit(x[train_idx], spec.standardise)
        x = std.transform(x)

    # rows that lie together (the images, placed so) are views, not copies, when
    # every row is in some split (else x's rows in none would be kept alive)
    placed = (sum(idx.size for idx in (train_idx, val_idx, test_idx)) == x.shape[0]
              and all(_consecutive(idx) for idx in (train_idx, val_idx, test_idx)))

    def part(idx: np.ndarray) -> Split | None:
        if not idx.size:
            return None
        rows = slice(int(idx[0]), int(idx[-1]) + 1) if placed else idx
        return Split(x[rows], table.y[rows])

    train = part(train_idx)
    assert train is not None
    return SiteData(
        name=spec.name,
        task=spec.task,
        feature_names=table.features,
        train=train,
        val=part(val_idx),
        test=part(test_idx),
        standardiser=std,
        n_classes=table.n_classes,
        info={"kind": spec.kind, "path": spec.path, "site": spec.site},
    )


def pooled(sites: Sequence[SiteData], name: str = "pooled") -> SiteData:
    """Concatenate sites' splits (for the pooled-training baseline only; never on an agent).

    Raises:
        ValueError: no site, or sites of different tasks or feature counts.
    """
    if not sites:
        raise ValueError("pooled needs at least one site")
    if len({s.task for s in sites}) != 1 or len({s.train.x.shape[1:] for s in sites}) != 1:
        raise ValueError("pooled: sites differ in task or feature shape")

    def cat(name_: str) -> Split | None:
        parts = [getattr(s, name_) for s in sites if getattr(s, name_) is not None]
        if not parts:
            return None
        return Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))

    train = cat("train")
    assert train is not None
    return SiteData(
        name=name,
        task=sites[0].task,
        feature_names=sites[0].feature_names,
        train=train,
        val=cat("val"),
        test=cat("test"),
        n_classes=max(s.n_classes for s in sites),
    )
