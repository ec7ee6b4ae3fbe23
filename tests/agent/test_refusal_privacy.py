"""What a site says about its own data when it refuses a task: the coordinator keeps
every TaskRefused.reason for good (rounds.dropped_json, its audit table, the job's
report), so the reason names the data set, the line or row, the column and the kind
of problem, and never the value a cell holds, a local path or a file name the site
chose (an image file's often carries an MRN). The details stay in the site's own
journal: where, at WARNING; the value, at DEBUG only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.runtime import Agent
from fedge.agent.trainer import TaskRefusal, TorchTrainer
from fedge.coordinator.checkpoint import model_digest
from fedge.train.data import DataError, load_site_data, tcga_centre_of_barcodes
from fedge.wire import codec
from fedge.wire import messages as m

TCGA = Path("/work/shared/data/fed_tcga_brca")
VALUE = "DOE^JANE MRN 0012345"
MRN = "0012345"

IMAGE_PLAN = """
[job]
dataset = "scans"
rounds = 1
min_clients = 2
[model]
name = "resnet_small"
params = { classes = 2, width = 4, image_size = 16 }
[train]
steps = 1
batch_size = 2
learning_rate = 0.1
[strategy]
name = "fedavg"
[secagg]
enabled = false
"""


def _refusals(agent: Agent, body: object) -> list[m.TaskRefused]:
    """What ``agent`` sends back for ``body``, decoded as the coordinator decodes it."""
    sent: list[codec.Envelope] = []

    async def send(frames: list) -> None:
        sent.append(codec.decode([bytes(f) for f in frames], max_bytes=1 << 24))

    agent.send_frames = send
    frames = [bytes(f) for f in codec.encode(body, sender="coordinator", job="j", round=1)]
    asyncio.run(agent.handle_frames(frames))
    return [e.body for e in sent if isinstance(e.body, m.TaskRefused)]


def _tasks(d: int) -> list[object]:
    w = np.zeros(d, np.float32)
    return [m.TrainTask(task_id="t1", plan=IMAGE_PLAN, weights=w,
                        model_digest=bytes.fromhex(model_digest(w)), train_seed=1,
                        quant_seed=b"\x01" * 16),
            m.EvalTask(task_id="e1", plan=IMAGE_PLAN, weights=w, split="test")]


def _bad_tcga_copy(folder: Path, centre: int) -> int:
    """A copy of Fed-TCGA-BRCA in ``folder`` whose first row of ``centre`` has a
    patient's name and MRN in its numeric age_at_index cell; returns that line."""
    folder.mkdir(parents=True)
    for f in ("brca.csv", "train_test_split.csv", "centers.csv"):
        shutil.copy(TCGA / f, folder / f)
    centre_of = tcga_centre_of_barcodes(folder)
    lines = (folder / "brca.csv").read_text().splitlines(keepends=True)
    header = lines[0].rstrip("\n").split(",")
    pid, age = header.index("pid"), header.index("age_at_index")
    for i, line in enumerate(lines[1:], start=1):
        cells = line.split(",")
        if centre_of.get(cells[pid]) == centre:
            cells[age] = VALUE
            lines[i] = ",".join(cells)
            (folder / "brca.csv").write_text("".join(lines))
            return i + 1  # the header is line 1
    raise AssertionError(f"no row of centre {centre}")


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.skipif(not TCGA.is_dir(), reason="needs the shared Fed-TCGA-BRCA copy")
def test_a_name_in_a_numeric_cell_reaches_the_coordinator_as_line_and_column_only(tmp_path):
    """A real federation (coordinator and agents as processes, ZeroMQ on loopback):
    site-0's brca.csv has a name in age_at_index. The coordinator learns which data
    set, line and column, and what is wrong; not the name, not where the file lies."""
    from fedge.demo.loopback import FederationError, LoopbackFederation, wait_for
    from tests.e2e.test_federation import plan

    bad_dir = tmp_path / f"exports-MRN{MRN}"
    line = _bad_tcga_copy(bad_dir, centre=0)

    def ds(i: int, path: Path) -> dict[str, object]:
        return {"name": "fed_tcga_brca", "kind": "fed_tcga_brca", "path": str(path), "site": i}

    class SumsOfTwo(LoopbackFederation):  # site-0 refuses: sites 1 and 2 sum alone
        def _agent_config(self, site: str) -> Path:
            cfg = super()._agent_config(site)
            cfg.write_text(cfg.read_text().replace("[privacy]\n", "[privacy]\nmin_cohort = 2\n"))
            return cfg

    fed = SumsOfTwo(tmp_path / "fed", {"site-0": [ds(0, bad_dir)],
                                       "site-1": [ds(1, TCGA)],
                                       "site-2": [ds(2, TCGA)]},
                    heartbeat=(0.5, 5.0))
    try:
        fed.start(120)
        job = fed.submit(plan(rounds=1, min_clients=2, train_s=30, stage_s=5))
        # how the job ends is not the point here; what the coordinator keeps is
        with contextlib.suppress(FederationError):
            fed.wait_job(job, 200)
        # the job's report (which the operator downloads) is written as it ends
        wait_for(lambda: (fed.coord_dir / "jobs" / job / "report.md").is_file(), 60,
                 "the job's report")
    finally:
        fed.close()

    (refused,) = fed.query("SELECT detail FROM audit WHERE action = 'task_refused'")[:1]
    dropped = [json.loads(r["dropped_json"]) for r in
               fed.query("SELECT dropped_json FROM rounds WHERE job_id = ?", job)]
    reason = next(d["site-0"] for d in dropped if "site-0" in d)
    assert reason == (f"data set 'fed_tcga_brca' cannot be loaded: brca.csv, line {line}, "
                      "column 'age_at_index': value is not a number (details in this "
                      "appliance's journal)"), reason
    assert "age_at_index" in str(refused["detail"]) and VALUE not in str(refused["detail"])
    # nowhere in what the coordinator keeps: its database, its job files, its journal
    kept = [p for p in fed.coord_dir.rglob("*") if p.is_file()]
    kept.append(fed.root / "coordinator.log")
    assert {"coordinator.sqlite3", "report.md", "report.json"} <= {p.name for p in kept}
    (report,) = [p for p in kept if p.name == "report.md"]
    assert reason in report.read_text()
    for p in kept:
        data = p.read_bytes()
        for secret in (VALUE.encode(), MRN.encode(), str(bad_dir).encode()):
            assert secret not in data, (p, secret)
    # the site's own journal says where (the path) but not the value, below DEBUG
    journal = (fed.root / "agent-site-0.log").read_text()
    assert f"{bad_dir / 'brca.csv'}, line {line}, column 'age_at_index'" in journal
    assert VALUE not in journal


def _scans(root: Path) -> Path:
    """An image data set at ``root`` whose one unreadable file is named after a patient."""
    for k, name in enumerate(["blob", "ring"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 20), 40 * (k + i), np.uint8)).save(
                root / name / f"{i}.png")
    bad = root / "ring" / f"MRN{MRN}_DOE_JANE.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image")
    return bad


def test_an_unreadable_image_named_after_a_patient_is_refused_without_its_name(
        tmp_path, caplog):
    root = tmp_path / f"ward-MRN{MRN}"
    bad = _scans(root)
    trainer = TorchTrainer([{"name": "scans", "kind": "images", "path": str(root),
                             "task": "binary", "classes": ["blob", "ring"],
                             "image_size": 16}])
    agent = Agent("h1", trainer, policy=PrivacyPolicy(require_secure_aggregation=False))
    with caplog.at_level(logging.DEBUG):
        refusals = [r for body in _tasks(64) for r in _refusals(agent, body)]
    assert [r.task for r in refusals] == [m.TASK_TRAIN, m.TASK_EVAL]
    for r in refusals:
        assert r.reason == ("data set 'scans' cannot be loaded: an image file of class "
                            "'ring': not a readable image (details in this appliance's "
                            "journal)"), r.reason
    # the site's journal names the file, for whoever fixes it
    assert any(str(bad) in rec.getMessage() and rec.levelno == logging.WARNING
               for rec in caplog.records)


def _rows(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"MRN{MRN}" / "rows.csv"
    path.parent.mkdir()
    path.write_text(text)
    return path


def _rows_trainer(path: Path) -> TorchTrainer:
    return TorchTrainer([{"name": "rows", "kind": "tabular", "path": str(path),
                          "task": "binary", "target": "y", "features": ["age", "size"]}])


def test_a_bad_cell_is_told_by_line_and_column_and_its_value_only_at_debug(tmp_path, caplog):
    path = _rows(tmp_path, "age,size,y\n50,2,1\n" + f"{VALUE},3,0\n" + "70,1,1\n" * 8)
    trainer = _rows_trainer(path)
    with caplog.at_level(logging.DEBUG, logger="fedge"), \
            pytest.raises(TaskRefusal) as info:
        trainer.load_data("rows")
    assert str(info.value) == ("data set 'rows' cannot be loaded: the data file, line 3, "
                               "column 'age': value is not a number (details in this "
                               "appliance's journal)")
    above_debug = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert above_debug == [f"data set 'rows' cannot be loaded: {path}, line 3, "
                           "column 'age': value is not a number"]
    assert any(VALUE in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    # the local error itself is unchanged: hospital IT reads it with the value
    with pytest.raises(DataError, match=r"line 3, column 'age': value 'DOE\^JANE MRN 0012345' "
                                        "is not a number"):
        load_site_data(trainer.dataset_spec("rows"))


@pytest.mark.parametrize("text, public", [
    # a file without a header: its first row is a patient's, so no column name of it
    ("1,DOE,1\n2,DOE,0\n", "the data file, line 1: the header names a column more "
                           "than once: line 1 looks like a data row, not a header; the "
                           "file needs a header row naming its columns"),
    ("age,size,y\n50,2\n", "the data file, line 2: truncated row: 2 fields where the "
                           "header has 3"),
    ("age,size,y\n50,2,7\n60,3,0\n", "the data file, line 2, column 'y': label must be "
                                      "0 or 1"),
])
def test_a_data_errors_public_form_holds_no_cell(tmp_path, text, public):
    with pytest.raises(TaskRefusal) as info:
        _rows_trainer(_rows(tmp_path, text)).load_data("rows")
    assert str(info.value) == (f"data set 'rows' cannot be loaded: {public} (details in "
                               "this appliance's journal)")


def test_a_library_error_goes_out_as_its_type_and_fedges_own_checks_with_their_text():
    from fedge.agent.trainer import public_reason
    from fedge.train.data import DatasetSpec

    try:  # numpy quotes the cell it could not read
        np.asarray([VALUE], dtype=float)
    except ValueError as exc:
        assert public_reason(exc) == "ValueError (details in this appliance's journal)"
    try:
        open(f"/nonexistent/MRN{MRN}.png", "rb")  # noqa: SIM115 - it fails
    except OSError as exc:
        assert public_reason(exc) == ("FileNotFoundError: No such file or directory "
                                      "(details in this appliance's journal)")
    try:  # the checks of fedge's own: made of agent.toml and plan, less the path
        DatasetSpec.from_config({"name": "rows", "kind": "tabular", "task": "binary",
                                 "path": f"/srv/MRN{MRN}/rows.csv", "target": "y",
                                 "features": ["age", "age"]})
    except ValueError as exc:
        assert public_reason(exc, [f"/srv/MRN{MRN}/rows.csv"]) == (
            "ValueError: dataset 'rows': datasets.features lists ['age'] twice")


def test_a_refused_data_set_tables_reason_names_no_path(tmp_path):
    path = f"/srv/MRN{MRN}/rows.csv"
    trainer = TorchTrainer([{"name": "rows", "kind": "tabular", "task": "binary",
                             "path": path, "target": "y"}])
    assert "datasets.features" in trainer.unusable["rows"]
    assert MRN not in trainer.unusable["rows"]
    agent = Agent("h1", trainer, policy=PrivacyPolicy(require_secure_aggregation=False))
    plan = IMAGE_PLAN.replace('dataset = "scans"', 'dataset = "rows"')
    w = np.zeros(4, np.float32)
    (refused,) = _refusals(agent, m.TrainTask(
        task_id="t1", plan=plan, weights=w, model_digest=bytes.fromhex(model_digest(w)),
        train_seed=1, quant_seed=b"\x01" * 16))
    assert "declared in this appliance's agent.toml but refused" in refused.reason
    assert MRN not in refused.reason and "datasets.features" in refused.reason
