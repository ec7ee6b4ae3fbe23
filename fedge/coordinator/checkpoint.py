"""Atomic safetensors checkpoints of the global model (and the strategy state).

Layout: ``<state_dir>/jobs/<job_id>/round-<r>.safetensors`` and
``final.safetensors``. Tensors: ``weights`` (float32, the flat global model)
and ``strategy.<name>`` (float64 server-optimiser buffers, e.g. ``strategy.m``).
Metadata (all strings): ``plan`` (the TOML text), ``round``, ``model_digest``
(hex sha256 of the flat float32 weights' bytes), ``feature_names`` (JSON list)
and ``metrics`` (JSON). ``final.safetensors`` also says how its job ended
(:class:`JobOutcome`): ``job_status`` (completed, cancelled or failed: the last two
hold the last committed round's model, not the planned final one), ``job_error``
(why it did not complete) and, for a job under differential privacy, ``epsilon``
(JSON: the ε the coordinator's records give, :func:`recorded_epsilon`). A final
checkpoint written before these keys existed has none of them.

A write goes to a temporary file in the same directory, is fsynced, renamed
over the target and the directory is fsynced, so a reader sees either the old
file or the new one, never a torn one.

Retention: a job's directory keeps ``round-0`` (the starting model, weights
only), its last committed round (weights and strategy state: what a restarted
coordinator resumes from, and what a failed or cancelled job's result is
written from) and ``final.safetensors`` (weights only: the result, which
nothing resumes from). Every other round checkpoint is removed once a later
round is committed in SQLite (:func:`prune_rounds`); until then it is the
only copy a resume can use. What reads which file:

=====================  ==========================================================
round-0                starting or resuming a job before its round 1 commits
round-<committed>      resuming after a restart (also a round pinned to an earlier
                       unmasking: it starts again from the same model); a failed or
                       cancelled job's final.safetensors; finishing a job whose
                       final write failed or was cut short
final.safetensors      the ONNX export, ``jobs fetch``, ``fedge export``/serve
report files           written from SQLite, read by ``jobs fetch`` only
=====================  ==========================================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedge.update import files


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or inconsistent with its digest."""


# how a job ends (fedge.coordinator.store's final job statuses)
JOB_STATUSES = ("completed", "cancelled", "failed")


@dataclass(frozen=True)
class JobOutcome:
    """How the job whose result a ``final.safetensors`` holds ended (module docstring).

    ``epsilon``: :func:`recorded_epsilon`'s summary, None for a job without DP.
    """

    status: str
    error: str = ""
    epsilon: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.status not in JOB_STATUSES:
            raise ValueError(f"job status {self.status!r} is not one a job ends with: "
                             f"{', '.join(JOB_STATUSES)}")

    @property
    def partial(self) -> bool:
        """The model is not the planned final one: the job stopped early."""
        return self.status != "completed"

    def metadata(self) -> dict[str, str]:
        meta = {"job_status": self.status, "job_error": self.error}
        if self.epsilon is not None:
            meta["epsilon"] = json.dumps(self.epsilon, sort_keys=True)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> JobOutcome | None:
        """None for a checkpoint that does not say (a round's, or an older final one).

        Raises: CheckpointError: ``job_status`` or ``epsilon`` is not what
        :meth:`metadata` writes."""
        if "job_status" not in meta:
            return None
        try:
            epsilon = json.loads(meta["epsilon"]) if "epsilon" in meta else None
            return cls(meta["job_status"], meta.get("job_error", ""), epsilon)
        except ValueError as exc:  # json.JSONDecodeError is one
            raise CheckpointError(f"checkpoint job outcome is not readable: {exc}") from None


def recorded_epsilon(plan_toml: str, metrics: list[dict[str, Any]],
                     attempts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ε of a job under differential privacy, from the coordinator's records, as
    its report gives it (fedge.coordinator.report): under ``privacy.dp`` (DP-SGD) each
    site's cumulative record-level ε in this job as it reported it with its last
    update (the ``privacy``/``epsilon_job`` metric rows); under ``privacy.client_dp``
    alone (DP-FedAvg) each site's client-level ε at ``report.CLIENT_DP_DELTA`` from
    the unmasked sums that held its update (every attempt's whose sum was formed:
    committed, failed after the sum, cancelled or interrupted). ε is known per site
    only: ``max`` is the largest over the sites (the bound the model as a whole
    carries), ``sites`` each one; ``None`` stands for an unbounded ε (DP-FedAvg
    without noise).

    Returns None for a job without DP, or one whose plan cannot be read."""
    from fedge.coordinator.plan import PlanError, parse_plan
    from fedge.coordinator.report import CLIENT_DP_DELTA, client_privacy, privacy_bound

    try:
        privacy = parse_plan(plan_toml).privacy
    except PlanError:
        return None
    dp = privacy.get("dp")
    if isinstance(dp, dict):
        last: dict[str, tuple[int, float]] = {}
        for r in sorted(metrics, key=lambda r: r["round"]):  # each site's last stays
            if r["split"] == "privacy" and r["name"] == "epsilon_job" and r["site"] != "*":
                last[r["site"]] = (int(r["round"]), float(r["value"]))
        sites: dict[str, float | None] = {s: v for s, (_, v) in sorted(last.items())}
        out = {"mechanism": "dp_sgd", "level": privacy_bound(plan_toml),
               "delta": float(dp.get("delta", 1e-5)),
               "source": "each site's cumulative DP-SGD epsilon in this job, as it "
                         "reported it with its last committed update"}
    elif isinstance(privacy.get("client_dp"), dict):
        client = client_privacy(plan_toml, attempts) or {"sites": {}}
        sites = {s: (v["epsilon"] if math.isfinite(v["epsilon"]) else None)
                 for s, v in client["sites"].items()}
        out = {"mechanism": "dp_fedavg", "level": "per site (client-level)",
               "delta": CLIENT_DP_DELTA,
               "source": "each site's client-level epsilon from the unmasked sums "
                         "that held its update, committed or not (its own ledger, "
                         "`fedge agent privacy`, is the authority)"}
    else:
        return None
    finite = [v for v in sites.values() if v is not None]
    out["max"] = max(finite) if finite and len(finite) == len(sites) else None
    out["sites"] = sites
    out["max_is"] = ("the largest epsilon over the sites (known per site only)" if sites
                     else "unknown: no site's epsilon is recorded")
    return out


@dataclass
class Checkpoint:
    weights: np.ndarray
    round: int
    plan: str
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    feature_names: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    # a final checkpoint's: how its job ended (None for a round's)
    outcome: JobOutcome | None = None

    @property
    def model_digest(self) -> str:
        return model_digest(self.weights)


def model_digest(weights: np.ndarray) -> str:
    """Hex sha256 of the flat float32 weights (little-endian bytes)."""
    return hashlib.sha256(np.ascontiguousarray(weights, dtype="<f4").tobytes()).hexdigest()


def job_dir(state_dir: str | Path, job_id: str) -> Path:
    return Path(state_dir) / "jobs" / job_id


def round_path(state_dir: str | Path, job_id: str, rnd: int) -> Path:
    return job_dir(state_dir, job_id) / f"round-{rnd}.safetensors"


def final_path(state_dir: str | Path, job_id: str) -> Path:
    return job_dir(state_dir, job_id) / "final.safetensors"


ROUND_NAME = re.compile(r"round-(?P<round>0|[1-9][0-9]{0,8})\.safetensors")


def round_checkpoints(state_dir: str | Path, job_id: str) -> dict[int, Path]:
    """The job's ``round-<r>.safetensors`` files now on disk, by round."""
    try:
        names = [f.name for f in job_dir(state_dir, job_id).iterdir()]
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out: dict[int, Path] = {}
    for name in names:
        match = ROUND_NAME.fullmatch(name)
        if match is not None:
            out[int(match["round"])] = job_dir(state_dir, job_id) / name
    return out


def prune_rounds(state_dir: str | Path, job_id: str, committed: int, *,
                 ended: bool = False) -> list[Path]:
    """Remove the job's round checkpoints that nothing reads any more (module
    docstring), given that round ``committed`` is committed in SQLite, not only
    written: every round r with 0 < r < committed. Round 0 stays, and so does the
    last committed round, all that resuming and a failed job's result read. A round
    past ``committed`` is a checkpoint
    written but not committed (a crash or a failed database write in between); a
    running job writes it again, so it stays unless ``ended`` (the job is completed,
    failed or cancelled in SQLite, and no round of it will ever commit again).

    A crash part-way leaves files that the next call removes: it looks at the
    directory, not at what the last call did.

    Returns the paths removed.

    Raises:
        OSError: a file cannot be removed (other than one already gone).
    """
    removed: list[Path] = []
    for rnd, path in sorted(round_checkpoints(state_dir, job_id).items()):
        if 0 < rnd < committed or (ended and rnd > committed):
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


# A finished job's results beside its checkpoints, as `fedge console jobs fetch` gets
# them: the final weights, the ONNX export, and the report (written last).
RESULT_FILES = ("final.safetensors", "final.onnx", "model.onnx", "report.json", "report.md",
                "metrics.json", "learning_curve.png", "privacy.png")


def results(state_dir: str | Path, job_id: str) -> list[str]:
    """The names in RESULT_FILES that the job's directory holds now."""
    d = job_dir(state_dir, job_id)
    return [name for name in RESULT_FILES if (d / name).is_file()]


# atomic_write's temporary file beside its target: ".<name>.tmp-<pid>"
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>[0-9]+)")
# the ONNX export's (fedge.serve.export, tempfile.mkstemp): ".<name>.onnx.<8 random>.tmp"
EXPORT_TEMP_NAME = re.compile(r"\.(?P<name>[^/]+\.onnx)\.[a-z0-9_]{8}\.tmp")
# fedge.update.files.write_atomic's of a result file (the report and its plots):
# ".<name>.<mkstemp's 8 random characters>"
RESULT_TEMP_NAME = re.compile(
    r"\.(?P<name>" + "|".join(re.escape(n) for n in RESULT_FILES) + r")\.[a-z0-9_]{8}")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename + directory fsync.

    A failed write removes its temporary file; one killed mid-write leaves it, for
    :func:`remove_stale_temps` at the next start.

    Raises:
        OSError: the directory or the file cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_stale_temps(state_dir: str | Path, *, older_than: float) -> list[Path]:
    """Remove :func:`atomic_write`'s temporary files, the ONNX export's, and those of
    the report's writes (``fedge.update.files.write_atomic`` of a RESULT_FILES name)
    in the job directories that were last written before ``older_than`` (a
    ``time.time()``, e.g. when this process started): a write killed between open and
    rename (the coordinator SIGKILLed, its export child with it) leaves one, and its
    name holds a pid or a random part, so no later write replaces it. Only names of
    those three patterns are touched, and a report temporary a live writer holds
    (its flock) is left.

    Returns the paths removed.
    """
    removed: list[Path] = []
    try:
        dirs = [d for d in (Path(state_dir) / "jobs").iterdir() if d.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for d in dirs:
        removed += files.remove_stale_temps(d, RESULT_TEMP_NAME,
                                 grace_s=max(0.0, time.time() - older_than))
        for f in d.iterdir():
            if not (TEMP_NAME.fullmatch(f.name) or EXPORT_TEMP_NAME.fullmatch(f.name)):
                continue
            try:
                st = f.lstat()
                if stat.S_ISREG(st.st_mode) and st.st_mtime < older_than:
                    f.unlink()
                    removed.append(f)
            except FileNotFoundError:
                continue
    return removed


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> str:
    """Write ``ckpt`` atomically; returns its model digest.

    Raises:
        CheckpointError: weights are not a 1-D float32 array.
    """
    w = np.asarray(ckpt.weights)
    if w.dtype != np.float32 or w.ndim != 1:
        raise CheckpointError(f"weights must be 1-D float32, got {w.dtype} with shape {w.shape}")
    tensors: dict[str, np.ndarray] = {"weights": np.ascontiguousarray(w)}
    for key, buf in ckpt.strategy_state.items():
        tensors[f"strategy.{key}"] = np.ascontiguousarray(buf, dtype=np.float64)
    digest = model_digest(w)
    meta = {
        "plan": ckpt.plan,
        "round": str(ckpt.round),
        "model_digest": digest,
        "feature_names": json.dumps(list(ckpt.feature_names)),
        "metrics": json.dumps(ckpt.metrics, sort_keys=True),
    }
    if ckpt.outcome is not None:
        meta.update(ckpt.outcome.metadata())
    atomic_write(Path(path), st_save(tensors, metadata=meta))
    return digest


def save_final(state_dir: str | Path, job_id: str, ckpt: Checkpoint,
               outcome: JobOutcome | None = None) -> str:
    """Write ``ckpt`` as the job's ``final.safetensors``, without its strategy state
    (module docstring: the last committed round's checkpoint keeps that) and with
    ``outcome``, how the job ended; returns its model digest, the same as the round's.

    Raises:
        CheckpointError: weights are not a 1-D float32 array.
        OSError: the file cannot be written.
    """
    return save_checkpoint(final_path(state_dir, job_id),
                           dataclasses.replace(ckpt, strategy_state={}, outcome=outcome))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint.

    Raises:
        CheckpointError: missing file, unparsable safetensors, missing
            ``weights`` or metadata, or weights that do not match ``model_digest``.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {p}: {exc}") from exc
    try:
        tensors = st_load(data)
        meta = _metadata(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {p} is not valid safetensors: {exc}") from exc
    if "weights" not in tensors:
        raise CheckpointError(f"checkpoint {p} has no 'weights' tensor")
    for key in ("plan", "round", "model_digest"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {p} metadata lacks {key!r}")
    ckpt = Checkpoint(
        weights=tensors["weights"],
        round=int(meta["round"]),
        plan=meta["plan"],
        strategy_state={k[len("strategy."):]: v for k, v in tensors.items()
                        if k.startswith("strategy.")},
        feature_names=json.loads(meta.get("feature_names", "[]")),
        metrics=json.loads(meta.get("metrics", "{}")),
        outcome=JobOutcome.from_metadata(meta),
    )
    if ckpt.model_digest != meta["model_digest"]:
        raise CheckpointError(
            f"checkpoint {p} weights digest {ckpt.model_digest} does not match metadata "
            f"{meta['model_digest']}"
        )
    return ckpt


def _metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__", {}))
