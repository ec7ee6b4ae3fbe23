"""report.md's "Model file" section and report.json's ``model_file``: what the job's
``model.onnx`` takes (float32 rows of the plan's features, a batch axis, each site's
own standardisation, which an appliance's install prepends) and returns (a
classifier's logit(s) without sigmoid or softmax, a Cox model's log relative risk),
as the export writes it into the file's metadata; and, where the export failed, that
the file is absent and the command that writes it. Before, only the ONNX metadata
said any of it.

The real finish path (finish_job: the `fedge export` child, then the report writer)
on a real finished job (SQLite, checkpoints); the real admin service's jobs_status."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np

from fedge.console.protocol import AdminRequest
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.admin import AdminService, Operator
from fedge.coordinator.process import finish_job
from fedge.coordinator.report import write_job_report
from fedge.coordinator.service import Coordinator
from fedge.coordinator.store import Store
from fedge.serve.export import read_metadata
from tests.coordinator.test_export_on_completion import PLAN as COX_PLAN
from tests.coordinator.test_s17_net_fetch_export_note import diverged_job


def _plan(model: str) -> str:
    return COX_PLAN.replace('name = "cox_linear"\nparams = { in_features = 4 }', model)


LOGISTIC_PLAN = _plan('name = "logistic"\nparams = { in_features = 4 }')
MULTICLASS_PLAN = _plan('name = "logistic"\nparams = { in_features = 4, classes = 3 }')


def _finished(state_dir: Path, job: str, plan: str, metric: str) -> None:
    """A completed job as the coordinator leaves it at its last commit, before
    finish_job (test_export_on_completion.completed_job, for any model's weights)."""
    from fedge.serve.jobs import model_spec_from_plan
    from fedge.train.api import ModelSpec, build_model, flatten

    weights = flatten(build_model(ModelSpec(*model_spec_from_plan(plan)))).astype(np.float32)
    ckpt = ck.Checkpoint(weights=weights, round=1, plan=plan, metrics={f"test/{metric}": 0.7})
    digest = ck.save_checkpoint(ck.round_path(state_dir, job, 1), ckpt)
    ck.save_checkpoint(ck.final_path(state_dir, job), ckpt)
    store = Store(state_dir)
    try:
        store.create_job(job, plan, actor="test")
        store.set_job_status(job, "running", actor="test")
        store.commit_round(job, 1, started_at=time.time() - 5, cohort=["a", "b"],
                           survivors=["a", "b"], dropped=[], model_digest=digest,
                           metrics=[("a", "test", metric, 0.65, 10),
                                    ("b", "test", metric, 0.75, 10),
                                    ("*", "test", metric, 0.7, 20)])
        store.set_job_status(job, "completed", actor="test", final_digest=digest)
    finally:
        store.close()


def _coordinator(state_dir: Path) -> Coordinator:
    return Coordinator(state_dir, initial_weights=lambda plan: np.zeros(5, np.float32))


def _finish(state_dir: Path, job: str) -> tuple[str, dict]:
    """finish_job as the job's end runs it: report.md's text and report.json."""
    coord = _coordinator(state_dir)
    try:
        asyncio.run(finish_job(coord, job))
    finally:
        coord.close()
    out = ck.job_dir(state_dir, job)
    return (out / "report.md").read_text(), json.loads((out / "report.json").read_text())


def _section(md: str) -> str:
    assert "\n## Model file\n" in md, md
    return md.split("\n## Model file\n", 1)[1].split("\n## ", 1)[0]


APPLIANCE = ("A fedge appliance holding the data set does this for you: pushed to it, the "
             "model gets the site's standardisation prepended to its graph")
AUTHORITY = ("the metadata of model.onnx (its `output` and `preprocessing` entries, and "
             "`feature_names` or `input_columns` for the column order)")


def _assert_as_its_metadata(state_dir: Path, job: str, report: dict) -> None:
    """report.json's model_file says what model.onnx's own metadata says."""
    meta = read_metadata(ck.job_dir(state_dir, job) / "model.onnx")
    entry = report["model_file"]
    assert entry["present"] is True and entry["export"] is None
    assert entry["output"] == json.loads(meta["output"])
    assert entry["input"]["preprocessing"] == json.loads(meta["preprocessing"])


def test_a_binary_classifier_s_report_says_its_model_takes_standardised_rows_and_gives_a_logit(
        tmp_path):
    _finished(tmp_path, "job-bin", LOGISTIC_PLAN, "roc_auc")
    md, report = _finish(tmp_path, "job-bin")
    _assert_as_its_metadata(tmp_path, "job-bin", report)
    entry = report["model_file"]
    assert entry["input"]["dtype"] == "float32"
    assert entry["input"]["shape"] == ["batch", 4] and entry["input"]["features"] == 4
    assert entry["output"]["kind"] == "logit"
    section = _section(md)
    assert "`model.onnx`, beside this report: the job's final model (round 1)." in section
    assert ("- **Input**: one float32 tensor of shape [batch, 4] (`batch`: any number of "
            "examples); each row the 4 features of data set `brca`, in the order of its "
            "metadata's `feature_names` or `input_columns`.") in section
    assert "- **Preprocessing** (per-site standardisation, not in the graph): " \
           "Standardise every row with the serving site's own constants for this data " \
           "set before inference; raw values give wrong outputs." in section
    assert " Transform: (x - mean) / scale per feature" in section
    assert " Fitted by each site: on its own training split" in section
    assert APPLIANCE in section
    assert ("- **Output** (logit, binary): One logit per example: the log-odds of label 1; "
            "sigmoid(logit) is its probability (not applied in the graph).") in section
    assert AUTHORITY in section and "absent" not in section


def test_a_multiclass_report_says_one_logit_per_label_and_no_softmax(tmp_path):
    _finished(tmp_path, "job-multi", MULTICLASS_PLAN, "accuracy")
    md, report = _finish(tmp_path, "job-multi")
    _assert_as_its_metadata(tmp_path, "job-multi", report)
    assert report["model_file"]["output"]["labels"] == [0, 1, 2]
    section = _section(md)
    assert ("- **Output** (logits, multiclass): 3 logits per example, one per label 0..2 "
            "in label order; softmax gives the probabilities (not applied in the graph). "
            "Class names are not known to the coordinator") in section
    assert "[batch, 4]" in section and APPLIANCE in section


def test_a_cox_report_says_its_output_is_a_log_relative_risk(tmp_path):
    _finished(tmp_path, "job-cox", COX_PLAN, "c_index")
    md, report = _finish(tmp_path, "job-cox")
    _assert_as_its_metadata(tmp_path, "job-cox", report)
    section = _section(md)
    assert ("- **Output** (log relative risk, survival): The Cox model's linear predictor "
            "per example: higher means a higher hazard; not a probability, and no baseline "
            "hazard.") in section
    assert "[batch, 4]" in section and APPLIANCE in section


def test_a_failed_export_s_report_says_model_onnx_is_absent_and_the_command_that_writes_it(
        tmp_path):
    job = "job-nan"
    command = f"fedge export --job {job} --state-dir {tmp_path}"
    diverged_job(tmp_path, job)  # NaN weights: the export's parity check refuses them
    md, report = _finish(tmp_path, job)
    assert not (ck.job_dir(tmp_path, job) / "model.onnx").exists()
    entry = report["model_file"]
    assert entry["present"] is False
    assert entry["export"]["failed"].startswith("fedge export: export refused")
    assert command in entry["export"]["retry"] and entry["export"]["command"] == command
    assert entry["output"]["kind"] == "log relative risk"  # the plan still says
    section = _section(md)
    assert section.startswith(
        "\n**`model.onnx` is absent: its ONNX export failed: fedge export: export "
        "refused"), section
    assert "log relative risk" in section and APPLIANCE in section

    # given the status `jobs status` gives (its onnx_export), the report names the
    # reason and what gets it done
    coord = _coordinator(tmp_path)
    try:
        service = AdminService(coord, {"k": Operator("eng", "viewer")})
        reply = service.handle("k", AdminRequest("jobs_status",
                                                 json.dumps({"job_id": job}), {}))
        assert reply.ok, reply.error
        status = json.loads(reply.result_json)
        (failed,) = coord.store.audit_log(action="model_export_failed")
        reason = json.loads(failed["detail"])["reason"]
        assert status["onnx_export"]["failed"] == reason
        write_job_report(ck.job_dir(tmp_path, job), status, coord.store.job(job).plan_toml)
    finally:
        coord.close()
    out = ck.job_dir(tmp_path, job)
    section = _section((out / "report.md").read_text())
    retry = status["onnx_export"]["retry"]
    assert command in retry, retry  # a parity check's refusal: by hand only
    assert section.startswith(  # in report.md a '|' of the reason is escaped
        "\n**`model.onnx` is absent: its ONNX export failed: "
        f"{reason.replace('|', chr(92) + '|')}.** {retry[:1].upper() + retry[1:]}. "
        "Written, it holds the job's final model (round 1), with what follows in its "
        "metadata.\n"), section
    export = json.loads((out / "report.json").read_text())["model_file"]["export"]
    assert export == {"failed": reason, "retry": status["onnx_export"]["retry"],
                      "command": command}


def test_a_report_written_after_the_export_was_given_up_still_names_the_command(tmp_path):
    # two alike failures (the job's end and a start), then a start that skips the export
    job = "job-nan"
    diverged_job(tmp_path, job)
    for _ in range(2):
        _finish(tmp_path, job)
    (ck.job_dir(tmp_path, job) / "report.md").unlink()
    md, report = _finish(tmp_path, job)
    coord = _coordinator(tmp_path)
    try:
        assert len(coord.store.audit_log(action="model_export_skipped")) == 1
    finally:
        coord.close()
    assert report["model_file"]["present"] is False
    section = _section(md)
    assert ("so the coordinator no longer tries it at its start: fix the cause, then run "
            f"`fedge export --job {job} --state-dir {tmp_path}` on the coordinator's host"
            ) in section, section


IMAGE_PLAN = _plan('name = "resnet_small"\nparams = { classes = 2, width = 8 }')


def test_an_image_model_s_report_says_it_takes_images_without_standardisation(tmp_path):
    _finished(tmp_path, "job-img", IMAGE_PLAN, "roc_auc")
    status = {"job_id": "job-img", "status": "cancelled", "committed_round": 1,
              "rounds_planned": 1, "metrics": [], "rounds": []}
    out = ck.job_dir(tmp_path, "job-img")
    write_job_report(out, status, IMAGE_PLAN)  # before any export: model.onnx absent
    entry = json.loads((out / "report.json").read_text())["model_file"]
    assert entry["input"]["shape"] == ["batch", 1, 64, 64]
    assert entry["input"]["features"] is None
    assert entry["input"]["preprocessing"]["kind"] == "none"
    section = _section((out / "report.md").read_text())
    assert ("- **Input**: one float32 tensor of shape [batch, 1, 64, 64] (`batch`: any "
            "number of examples); images of data set `brca`.") in section
    assert "- **Preprocessing** (none, not in the graph): Images as the sites' loader " \
           "made them for training" in section
    assert "the job's last committed model (round 1), not a finished training" in section


def test_a_report_without_its_plan_names_the_metadata_as_what_says(tmp_path):
    status = {"job_id": "job-x", "status": "completed", "committed_round": 1,
              "rounds_planned": 1, "metrics": [], "rounds": []}
    write_job_report(tmp_path, status)
    entry = json.loads((tmp_path / "report.json").read_text())["model_file"]
    assert entry["input"] is None and entry["output"] is None
    section = _section((tmp_path / "report.md").read_text())
    assert ("What it takes and returns: no plan was given to the report; " + AUTHORITY) \
        in section
    assert "`fedge export --job job-x --state-dir STATE_DIR`" in section
