"""Export a finished federation job's global model from the coordinator's checkpoint.

Checkpoint layout (docs/CONTRACTS.md): `<state_dir>/jobs/<job_id>/final.safetensors`
whose metadata holds `plan` (TOML), `round`, `model_digest`, `feature_names`
(JSON list) and `metrics` (JSON). The model is rebuilt from the plan's `[model]`
table with the training registry's `build_model(ModelSpec)`, the weights loaded
(a state dict, or one flat vector), and `export_onnx` writes it with the
job's provenance.

A federated job's tabular inputs were standardised at each site with constants
fitted on that site's own training split, which never leave the site. The
exported graph therefore does not standardise: its `preprocessing` metadata says
so (per-site standardisation, not in the graph, for the plan's data set; an
appliance that installs it from a push prepends its own constants,
fedge.serve.sitelocal), and
`input_columns` says where the column order is declared when the plan does not
name the features. A checkpoint that carries `preprocessing` constants has them
folded into the graph instead.

The `output` metadata (JSON) says what the model's output is: a classifier's
logit(s) (no sigmoid or softmax in the graph) and its labels by number (the class
names are declared at the sites, which the coordinator never sees), a Cox model's
log relative risk, or a regression's value.

Whether the model is the job's planned final one: `job_status` (completed,
cancelled or failed, from the checkpoint; "unknown" for one written before fedge
recorded it), `rounds_planned` beside `round`, `job_error`, and a `description`
that begins "partial: the job was cancelled after round 2 of 6" when it is not.
`privacy` (JSON) gives the plan's differential privacy (`mechanism` dp_sgd,
dp_fedavg, both, or none; noise multiplier, clip, delta) and the epsilon the
coordinator recorded (`epsilon`: the largest over the sites, each site's in
`epsilon_sites`). Keys are only ever added, so older readers keep working.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch, onnx and safetensors load only once a checkpoint is found
    import torch

    from fedge.serve.export import ExportResult

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class ExportError(ValueError):
    """The job cannot be exported as asked (the message names what was wrong)."""


class CheckpointError(ExportError):
    """The checkpoint is missing, or lacks what an export needs."""


def checkpoint_path(state_dir: str | Path, job_id: str) -> Path:
    """Raises: CheckpointError for a job id that is not a plain name."""
    if not _JOB_ID.fullmatch(job_id):
        raise CheckpointError(f"job id {job_id!r} must match {_JOB_ID.pattern}")
    return Path(state_dir) / "jobs" / job_id / "final.safetensors"


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors checkpoint.

    Raises:
        CheckpointError: no such file, or it is not a safetensors file.
    """
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (has the job finished?)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    return tensors, meta


def model_spec_from_plan(plan_text: str) -> tuple[str, dict[str, Any]]:
    """(model name, params) from the plan's `[model]` table.

    Accepts `[model] name = "cox_linear"` with the params either in
    `[model.params]` or beside `name`.

    Raises:
        CheckpointError: the plan is not TOML or has no `[model]` name.
    """
    try:
        plan = tomllib.loads(plan_text)
    except tomllib.TOMLDecodeError as exc:
        raise CheckpointError(f"checkpoint plan is not valid TOML: {exc}") from None
    model = plan.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise CheckpointError("checkpoint plan has no [model] table with a 'name'")
    params = model.get("params")
    if not isinstance(params, dict):
        params = {k: v for k, v in model.items() if k != "name"}
    return model["name"], dict(params)


def _build(name: str, params: dict[str, Any]) -> torch.nn.Module:
    from fedge.train.api import ModelSpec, build_model

    try:
        spec = ModelSpec.from_dict({"name": name, "params": params})
        return build_model(spec)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint plan's model cannot be built: {exc}") from None


def _digest(flat: torch.Tensor) -> str:
    import torch

    data = flat.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
    return hashlib.sha256(data).hexdigest()


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load the checkpoint's flat `weights` (parameters() order), or a full state dict.

    Raises:
        CheckpointError: names or sizes do not fit the model.
    """
    if "weights" in tensors:
        flat = tensors["weights"].reshape(-1)
        total = sum(p.numel() for p in model.parameters())
        if flat.numel() != total:
            raise CheckpointError(
                f"checkpoint holds {flat.numel()} weights, the model has {total} parameters"
            )
        import torch

        offset = 0
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype))
                offset += p.numel()
        return
    state = model.state_dict()
    if set(tensors) == set(state):
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint weights do not fit the model: {exc}") from None
        return
    raise CheckpointError(
        f"checkpoint tensors {sorted(tensors)[:5]} hold neither a flat 'weights' vector nor "
        f"the model's state dict {sorted(state)[:5]}"
    )


def _example_input(
    model: torch.nn.Module,
    name: str,
    params: dict[str, Any],
    feature_names: list[str],
    input_shape: Sequence[int] | None,
) -> torch.Tensor:
    """Two example rows of the shape the model takes, checked by running the model.

    The shape is `input_shape` when given, else what the model registry says the
    plan's model takes (`fedge.train.models.input_shape`).

    Raises:
        ExportError: feature names that disagree with the model's input width, or
            an input of that shape the model cannot run on.
    """
    import torch

    from fedge.train.api import ModelSpec
    from fedge.train.models import input_shape as model_input_shape

    if input_shape:
        shape, source = tuple(input_shape), f"--input-shape {','.join(map(str, input_shape))}"
    else:
        try:
            shape = model_input_shape(ModelSpec(name, params))
        except ValueError as exc:
            raise CheckpointError(f"checkpoint plan's model cannot be built: {exc}") from None
        source = f"the plan's model {name!r}"
        if feature_names and shape != (len(feature_names),):
            raise CheckpointError(
                f"checkpoint lists {len(feature_names)} feature names but {source} takes "
                f"inputs of shape {list(shape)} per example; the checkpoint's feature_names "
                "do not belong to this model"
            )
    example = torch.zeros((2, *shape)).normal_(generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(example)
    except RuntimeError as exc:  # torch names the mismatch: "mat1 and mat2 shapes ..."
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"model {name!r} cannot run on inputs of shape {list(shape)} per example "
            f"(from {source}): {detail}"
        ) from None
    return example


def _site_preprocessing(dataset: str, rank: int) -> dict[str, Any]:
    """What a federated job's input went through before the model, truthfully.

    Each site standardises its own tabular rows, either with constants fitted on
    its own training split or, under ``standardise = "bounds"`` (what DP-SGD
    requires), with public constants from its declared ``feature_bounds``
    (fedge.train.data.Standardiser). Those never leave the site, so they are not in
    this graph and the serving site must apply its own.
    Images are not standardised.
    """
    if rank != 1:
        return {
            "kind": "none", "in_graph": False, "dataset": dataset,
            "input": "images as the sites' loader made them for training "
                     "(fedge.train.data, kind 'images'): single-channel (8-bit images "
                     "through Pillow's convert('L'), ITU-R 601-2 luma "
                     "L = 0.299 R + 0.587 G + 0.114 B, an alpha channel dropped), "
                     "resized to the model's size with Pillow's Image.resize default "
                     "(bicubic), 8-bit pixel values / 255, 16-bit greyscale pixel values "
                     "/ 65535; no standardisation",
        }
    return {
        "kind": "per-site standardisation", "in_graph": False, "dataset": dataset,
        "fitted": "by each site: on its own training split of the data set ('continuous', "
                  "'all'), or from the public feature_bounds it declares ('bounds': mean "
                  "= (lo + hi) / 2, scale = (hi - lo) / 2); the constants stay at the "
                  "site and are not in this model",
        "transform": "(x - mean) / scale per feature (fedge.train.data.Standardiser); the "
                     "site's 'standardise' setting for the data set says which columns: "
                     "'continuous' (default: all but 0/1 columns), 'all', 'bounds' (the "
                     "columns with declared feature_bounds, clamped to [lo, hi] before "
                     "training) or 'none'",
        "input": "standardise every row with the serving site's own constants for this "
                 "data set before inference; raw values give wrong outputs. A fedge "
                 "appliance holding the data set does this for you: pushed to it, the "
                 "model gets the site's standardisation prepended to its graph. Under "
                 "'bounds', training clamped each bounded column to [lo, hi]; the "
                 "prepended standardisation does not clamp, so clamp raw rows to the "
                 "same bounds for outputs consistent with training",
    }


def _output_description(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """What the model's output means, for whoever serves it.

    Every classifier ends in raw scores: ``logistic`` and ``resnet_small`` with
    ``classes = 2`` give one logit (log-odds of label 1), with ``classes = k`` one
    logit per label 0..k-1; no sigmoid or softmax is in the graph. The class names
    are declared at each site (the data set's labels, or an image data set's
    ``classes`` folders in the agent config), which the coordinator never sees, so
    the model names the labels by number only (an appliance pushed the model names
    an image data set's classes: fedge.serve.sitelocal.name_classes).
    """
    from fedge.train.model_names import TASK_OF_MODEL, model_param

    task = TASK_OF_MODEL.get(name, "")
    names_note = ("class names are not known to the coordinator: label i is the i-th class "
                  "of the data set as each site declares it (a table's integer label, or "
                  "the i-th name in an image data set's [[datasets]] classes list); a "
                  "fedge appliance holding an image data set writes its names here when "
                  "the model is pushed to it")
    if task == "classification":
        k = model_param(name, params, "classes")  # the plan's, or the model's default
        if k == 2:
            return {"kind": "logit", "task": "binary", "classes": 2, "labels": [0, 1],
                    "meaning": "one logit per example: the log-odds of label 1; "
                               "sigmoid(logit) is its probability (not applied in the graph)",
                    "class_names": names_note}
        return {"kind": "logits", "task": "multiclass", "classes": k,
                "labels": list(range(k)),
                "meaning": f"{k} logits per example, one per label 0..{k - 1} in label "
                           "order; softmax gives the probabilities (not applied in the graph)",
                "class_names": names_note}
    if task == "survival":
        return {"kind": "log relative risk", "task": "survival",
                "meaning": "the Cox model's linear predictor per example: higher means a "
                           "higher hazard; not a probability, and no baseline hazard"}
    # "linear" and "mlp" train on what the data set declares (fedge.train.api's table):
    # the same graph gives logits on labels and values on a regression target, and the
    # export cannot see which (the sites' tasks stay at the sites), so it says both
    k = model_param(name, params, "out_features")
    survival = ("; for a survival data set the Cox model's linear predictor (log relative "
                "risk: higher means a higher hazard; not a probability)"
                if task == "any" else "")
    return {"kind": "raw", "task": "as the data set declares it",
            "meaning": f"{k} raw output(s) per example: for a classification data set "
                       + ("the log-odds of label 1 (sigmoid gives its probability)" if k == 1
                          else f"one logit per label 0..{k - 1} (softmax gives the "
                               "probabilities)")
                       + "; for a regression data set the predicted value(s), in the units "
                         "the sites trained on" + survival + "; no sigmoid or softmax is "
                         "in the graph",
            "class_names": names_note}


def _rounds_planned(plan_text: str) -> int | None:
    try:
        rounds = tomllib.loads(plan_text).get("job", {}).get("rounds")
    except (tomllib.TOMLDecodeError, AttributeError):
        return None
    return rounds if isinstance(rounds, int) and not isinstance(rounds, bool) else None


def _privacy(plan_text: str, epsilon: dict[str, Any] | None, known: bool) -> dict[str, Any]:
    """The plan's differential privacy and the ε the coordinator recorded for it.

    ``epsilon``: the checkpoint's (fedge.coordinator.checkpoint.recorded_epsilon);
    ``known``: whether the checkpoint says how its job ended at all (one written
    before fedge recorded that carries no ε even under DP)."""
    from fedge.train.privacy import DPConfig

    try:
        privacy = tomllib.loads(plan_text).get("privacy") or {}
    except tomllib.TOMLDecodeError:
        privacy = {}
    dp, client_dp = privacy.get("dp"), privacy.get("client_dp")
    dp = dp if isinstance(dp, dict) else None
    client_dp = client_dp if isinstance(client_dp, dict) else None
    if dp is None and client_dp is None:
        return {"mechanism": "none",
                "meaning": "no differential privacy: the sites' updates were not noised"}
    settings: dict[str, dict[str, Any]] = {}
    if dp is not None:
        defaults = DPConfig(noise_multiplier=0.0)  # the plan's defaults (fedge.train.privacy)
        settings["dp_sgd"] = {
            "noise_multiplier": dp.get("noise_multiplier"),
            "clip": dp.get("max_grad_norm", defaults.max_grad_norm),
            "delta": dp.get("delta", defaults.delta),
            "target_epsilon": dp.get("target_epsilon"),
            "cox_per_term": dp.get("cox_per_term", defaults.cox_per_term)}
    if client_dp is not None:
        settings["dp_fedavg"] = {"noise_multiplier": client_dp.get("noise_multiplier"),
                                 "clip": client_dp.get("clip_norm"),
                                 "cohort_size": client_dp.get("cohort_size")}
    # the mechanism the epsilon is for (DP-SGD's when both) at the top level, the
    # other's settings under its name
    main = next(iter(settings))
    out: dict[str, Any] = {"mechanism": "+".join(settings), **settings.pop(main), **settings}
    if epsilon is not None:
        out.update(epsilon=epsilon.get("max"), epsilon_delta=epsilon.get("delta"),
                   epsilon_level=epsilon.get("level"),
                   epsilon_sites=epsilon.get("sites", {}),
                   epsilon_is=f"{epsilon.get('max_is')}; {epsilon.get('source')}")
    else:
        out.update(epsilon=None, epsilon_is=(
            "not recorded: the checkpoint predates fedge recording it; the job's "
            "report.json (privacy) has each site's" if not known else
            "not recorded for this job; see its report.json (privacy)"))
    return out


def _description(job_id: str, name: str, status: str, error: str, rnd: str,
                 planned: int | None) -> str:
    """One line saying which model this is; "partial: ..." for a job that stopped early."""
    of = f" of {planned}" if planned is not None else ""
    job = f"job {job_id}" + (f" ({name})" if name else "")
    if status in ("cancelled", "failed"):
        why = f": {error}" if error else ""
        return (f"partial: the job was {status} after round {rnd}{of}; this is the model "
                f"of its last committed round, not the planned final one ({job}{why})")
    if status == "unknown" and planned is not None and rnd.isdigit() and int(rnd) < planned:
        return (f"partial: the job stopped after round {rnd}{of} (cancelled or failed; "
                f"this checkpoint does not say which); {job}")
    return f"the final model of {job}, after round {rnd}{of}"


def export_job(
    state_dir: str | Path,
    job_id: str,
    out: str | Path | None = None,
    *,
    input_shape: Sequence[int] | None = None,
) -> ExportResult:
    """Export job `job_id`'s final model to ONNX (default: beside the checkpoint, model.onnx).

    Raises:
        CheckpointError: missing/invalid checkpoint, plan, weights or feature names.
        ExportError: an input shape the model cannot run on, or `out` cannot be
            written (nothing written).
        ExportRefused: parity with PyTorch failed (nothing written).
    """
    ckpt = checkpoint_path(state_dir, job_id)
    tensors, meta = read_checkpoint(ckpt)
    from fedge.coordinator.plan import plan_labels
    from fedge.serve.export import Standardisation, export_onnx

    if "plan" not in meta:
        raise CheckpointError(f"{ckpt} metadata has no 'plan'")
    name, params = model_spec_from_plan(meta["plan"])
    model = _build(name, params)
    digest = meta.get("model_digest")
    if "weights" in tensors and digest and _digest(tensors["weights"]) != digest:
        raise CheckpointError(
            f"{ckpt}: weights do not match the recorded model_digest {digest[:16]}…; "
            "refusing to export a corrupted checkpoint"
        )
    load_weights(model, tensors)
    try:
        feature_names = json.loads(meta.get("feature_names", "[]"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{ckpt} metadata 'feature_names' is not JSON") from None
    preprocessing = None
    if "preprocessing" in meta:
        try:
            prep = json.loads(meta["preprocessing"])
        except json.JSONDecodeError:
            raise CheckpointError(f"{ckpt} metadata 'preprocessing' is not JSON") from None
        if isinstance(prep, dict) and "mean" in prep and ("std" in prep or "scale" in prep):
            preprocessing = Standardisation(prep["mean"], prep.get("std", prep.get("scale")))
    from fedge.coordinator.checkpoint import CheckpointError as OutcomeError
    from fedge.coordinator.checkpoint import JobOutcome

    try:
        outcome = JobOutcome.from_metadata(meta)
    except OutcomeError as exc:
        raise CheckpointError(f"{ckpt}: {exc}") from None
    planned = _rounds_planned(meta["plan"])
    props = {
        "job_id": job_id,
        "round": meta.get("round", ""),
        "rounds_planned": "" if planned is None else str(planned),
        "job_status": outcome.status if outcome is not None else "unknown",
        "job_error": outcome.error if outcome is not None else "",
        "model_digest": meta.get("model_digest", ""),
        "model_name": name,
        "model_params": json.dumps(params, sort_keys=True),
        "feature_names": json.dumps(feature_names),
        "metrics": meta.get("metrics", "{}"),
        "output": json.dumps(_output_description(name, params)),
    }
    labels = plan_labels(meta["plan"])  # job.name and job.dataset, as `jobs list` shows them
    if labels["name"]:
        props["job_name"] = labels["name"]
    props["description"] = _description(job_id, labels["name"], props["job_status"],
                                        props["job_error"], props["round"], planned)
    props["privacy"] = json.dumps(_privacy(
        meta["plan"], outcome.epsilon if outcome is not None else None, outcome is not None))
    example = _example_input(model, name, params, feature_names, input_shape)
    dataset = labels["dataset"]
    if preprocessing is None:
        props["preprocessing"] = json.dumps(_site_preprocessing(dataset, example.dim() - 1))
    if not feature_names and example.dim() == 2:  # tabular rows (images have none)
        # feature_names stays (empty) for older readers; this says where the layout is
        props["input_columns"] = (
            f"the feature columns of data set {dataset!r} in the order each site's "
            "agent.toml declares them (its [[datasets]] table's features, or else the "
            "data file's column order); the sites do not send column names, so "
            "feature_names is empty"
        )
    target = Path(out) if out is not None else ckpt.with_name("model.onnx")
    # Run as root where the output's directory (or one on the way) is another user's
    # (the coordinator's jobs/<id>/, the fedge user's): exported into a directory of
    # root's, then copied into place as that user (fedge.as_owner), so a symlink that
    # user planted gets root to write nothing anywhere.
    from fedge.as_owner import owner_to_act_as, run_as
    from fedge.update.files import write_atomic

    owner = owner_to_act_as(target)
    try:
        if owner is None:
            return export_onnx(model, example, props, target, preprocessing=preprocessing)
        with tempfile.TemporaryDirectory(prefix="fedge-export-") as private:
            result = export_onnx(model, example, props, Path(private) / "model.onnx",
                                 preprocessing=preprocessing)
            data = result.path.read_bytes()
        # 0644 as export_onnx writes it: servers may run as another user
        run_as(owner, lambda: write_atomic(target, data, mode=0o644),
               what=f"writing {target}", umask=None)
        return dataclasses.replace(result, path=target)
    except OSError as exc:
        raise ExportError(f"cannot write {target}: {exc.strerror or exc}") from None
