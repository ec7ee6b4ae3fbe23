"""What a job's directory keeps on the coordinator: round 0, the last committed round
(weights and strategy state) and final.safetensors (weights only); every older round
goes once a later one is committed in SQLite, never before (fedge.coordinator.checkpoint,
module docstring). Real coordinator and agents in memory; crashes at every step of a
commit end on the uninterrupted run's model, bit for bit."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from fedge.console.protocol import AdminRequest
from fedge.coordinator import checkpoint as ck
from fedge.coordinator import process
from fedge.coordinator.admin import AdminService, Operator
from fedge.coordinator.rounds import Phase
from fedge.coordinator.service import Coordinator
from fedge.wire import messages as m
from tests.coordinator.test_federation_inproc import plan, run

ROUNDS = 5


class Killed(BaseException):
    """The coordinator process dies here (not an Exception: nothing in it catches this)."""


def fedadam(rounds=ROUNDS, secure="true"):
    return plan(rounds=rounds, strategy="fedadam", secure=secure)


def kept(coord, job):
    """The names in the job's directory."""
    return sorted(p.name for p in ck.job_dir(coord.state_dir, job).iterdir())


def rounds_on_disk(coord, job):
    return sorted(ck.round_checkpoints(coord.state_dir, job))


_REFERENCE: dict[str, bytes] = {}


def reference_weights(federation):
    """The final model of the job run without interruption."""
    if "w" not in _REFERENCE:
        ref = federation(["a", "b", "c"], dim=40)
        job = run(ref, fedadam())
        _REFERENCE["w"] = ck.load_checkpoint(
            ck.final_path(ref.coord.state_dir, job)).weights.tobytes()
    return _REFERENCE["w"]


# -- the rule, on files -----------------------------------------------------------------

def _write_rounds(tmp_path, job, rounds):
    for r in rounds:
        ck.save_checkpoint(ck.round_path(tmp_path, job, r),
                           ck.Checkpoint(weights=np.full(3, r, np.float32), round=r, plan="p"))


def test_prune_keeps_round_0_the_last_committed_round_and_rounds_not_yet_committed(
        tmp_path):
    _write_rounds(tmp_path, "j", [0, 1, 2, 3, 4, 5])
    others = ["final.safetensors", "report.json", ".round-6.safetensors.tmp-77",
              "round-07.safetensors", "round-3.safetensors.bak"]
    for name in others:
        (ck.job_dir(tmp_path, "j") / name).write_bytes(b"x")
    removed = ck.prune_rounds(tmp_path, "j", 3)
    assert [p.name for p in removed] == ["round-1.safetensors", "round-2.safetensors"]
    # 4 and 5 are written, not committed: a running job writes them again
    assert sorted(ck.round_checkpoints(tmp_path, "j")) == [0, 3, 4, 5]
    assert ck.prune_rounds(tmp_path, "j", 3) == []  # nothing left to do
    ck.prune_rounds(tmp_path, "j", 3, ended=True)  # no round of it will commit again
    assert sorted(ck.round_checkpoints(tmp_path, "j")) == [0, 3]
    assert all((ck.job_dir(tmp_path, "j") / name).exists() for name in others)


def test_prune_before_any_commit_removes_nothing(tmp_path):
    _write_rounds(tmp_path, "j", [0, 1])
    assert ck.prune_rounds(tmp_path, "j", 0) == []
    assert ck.prune_rounds(tmp_path, "j", 1) == []  # round 1 is the last committed
    assert ck.prune_rounds(tmp_path, "missing", 4) == []
    assert sorted(ck.round_checkpoints(tmp_path, "j")) == [0, 1]


def test_the_final_model_is_written_without_the_strategy_state(tmp_path):
    c = ck.Checkpoint(weights=np.arange(4, dtype=np.float32), round=7, plan="p",
                      strategy_state={"m": np.ones(4), "v": np.ones(4)}, metrics={"x": 1})
    digest = ck.save_final(tmp_path, "j", c)
    final = ck.load_checkpoint(ck.final_path(tmp_path, "j"))
    assert digest == c.model_digest and final.strategy_state == {}
    assert (final.round, final.metrics) == (7, {"x": 1})
    assert c.strategy_state.keys() == {"m", "v"}  # the caller's checkpoint is left whole


# -- a whole job ------------------------------------------------------------------------

def test_a_finished_job_keeps_round_0_its_last_round_and_a_weights_only_final(federation):
    fed = federation(["a", "b", "c"], dim=40)
    seen: list[list[int]] = []  # the round files on disk as each round's row is written
    commit = fed.coord.store.commit_round

    def watched(job_id, rnd, **kw):
        seen.append(rounds_on_disk(fed.coord, job_id))
        return commit(job_id, rnd, **kw)
    fed.coord.store.commit_round = watched
    job = run(fed, fedadam())
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    # round r's file is durable beside r - 1's when r commits; r - 1 goes after
    assert seen == [[0, 1], [0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 5]]
    assert kept(fed.coord, job) == ["final.safetensors", "round-0.safetensors",
                                    f"round-{ROUNDS}.safetensors"]
    last = ck.load_checkpoint(ck.round_path(fed.coord.state_dir, job, ROUNDS))
    final = ck.load_checkpoint(ck.final_path(fed.coord.state_dir, job))
    assert set(last.strategy_state) == {"m", "v"} and final.strategy_state == {}
    assert final.weights.tobytes() == last.weights.tobytes()
    assert final.metrics == last.metrics and final.round == ROUNDS
    assert st.job(job).final_digest == final.model_digest == st.rounds(job)[-1].model_digest
    assert final.weights.tobytes() == reference_weights(federation)


def _kill_at_commit(fed, rnd):
    """Round ``rnd``'s checkpoint is written; the coordinator dies before its row."""
    commit = fed.coord.store.commit_round

    def dies(job_id, r, **kw):
        if r == rnd:
            raise Killed
        return commit(job_id, r, **kw)
    fed.coord.store.commit_round = dies


def _kill_at_prune(monkeypatch, rnd):
    """Round ``rnd`` is committed; the coordinator dies before removing older rounds."""
    prune = ck.prune_rounds

    def dies(state_dir, job_id, committed, **kw):
        if committed == rnd:
            monkeypatch.setattr(ck, "prune_rounds", prune)  # the restarted one does not
            raise Killed
        return prune(state_dir, job_id, committed, **kw)
    monkeypatch.setattr(ck, "prune_rounds", dies)


@pytest.mark.parametrize("crash, on_disk, committed", [
    ("written_not_committed", [0, 2, 3], 2),
    ("committed_not_pruned", [0, 2, 3], 3),
    ("last_committed_not_pruned", [0, ROUNDS - 1, ROUNDS], ROUNDS),
    ("unmasked_not_committed", [0, 2], 2),
])
def test_a_coordinator_killed_at_any_step_of_a_commit_resumes_and_keeps_only_what_is_kept(
        federation, monkeypatch, crash, on_disk, committed):
    """The round before is removed only after the new round's row is written: killed
    between the file and the row, the new coordinator resumes from the old round's
    file; killed before the removal, the leftovers go at the next commit or the job's
    end. Killed after round 3 was unmasked, the retry (pinned to the same sites)
    starts again from round 2's file. Each ends on the uninterrupted model."""
    want = reference_weights(federation)
    fed = federation(["a", "b", "c"], dim=40)
    if crash == "written_not_committed":
        _kill_at_commit(fed, 3)
    elif crash == "committed_not_pruned":
        _kill_at_prune(monkeypatch, 3)
    elif crash == "last_committed_not_pruned":
        _kill_at_prune(monkeypatch, ROUNDS)

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(fedadam(), actor="test")
        try:
            def unmasked():
                r = fed.coord.runner
                return r is not None and r.round is not None and r.round.round == 3 \
                    and r.round.phase is Phase.EVALUATING
            await fed.pump(until=unmasked if crash.startswith("unmasked")
                           else lambda: False)
        except Killed:
            pass
        return job

    job = asyncio.run(go())
    assert rounds_on_disk(fed.coord, job) == on_disk
    assert not ck.final_path(fed.coord.state_dir, job).exists()
    if crash.startswith("unmasked"):
        assert fed.coord.store.unmask_set(job, 3) == ["a", "b", "c"]
    fed.restart()
    assert fed.coord.store.job(job).committed_round == committed

    async def again():
        await fed.heartbeats()
        await fed.pump(until=lambda: fed.coord.store.job(job).status != "running")
    asyncio.run(again())
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    assert kept(fed.coord, job) == ["final.safetensors", "round-0.safetensors",
                                    f"round-{ROUNDS}.safetensors"]
    final = ck.load_checkpoint(ck.final_path(fed.coord.state_dir, job))
    assert final.weights.tobytes() == want
    assert [r.round for r in st.rounds(job) if r.status == "committed"] == [1, 2, 3, 4, 5]


# -- jobs that end early ----------------------------------------------------------------

def test_a_cancelled_job_keeps_its_last_committed_round_as_its_result(federation):
    fed = federation(["a", "b", "c"], dim=40)
    coord = fed.coord
    ended: list[str] = []
    coord.on_job_completed = ended.append

    async def go():
        await fed.heartbeats()
        job = coord.submit_job(fedadam(), actor="test")
        await fed.pump(until=lambda: coord.store.job(job).committed_round == 3)
        return job
    job = asyncio.run(go())
    coord.cancel_job(job, actor="test")
    assert ended == [job]
    assert kept(coord, job) == ["final.safetensors", "round-0.safetensors",
                                "round-3.safetensors"]
    three = ck.load_checkpoint(ck.round_path(coord.state_dir, job, 3))
    final = ck.load_checkpoint(ck.final_path(coord.state_dir, job))
    assert final.weights.tobytes() == three.weights.tobytes() and final.round == 3
    assert final.strategy_state == {} and set(three.strategy_state) == {"m", "v"}
    # jobs fetch reads the job's results, none of the round files
    service = AdminService(coord, {"k": Operator("eng", "viewer")})
    reply = service.handle("k", AdminRequest("jobs_fetch", json.dumps({"job_id": job}), {}))
    assert reply.ok, reply.error
    assert json.loads(reply.result_json)["files"] == ["final.safetensors"]
    assert reply.blobs["final.safetensors"] == ck.final_path(coord.state_dir, job).read_bytes()


def test_a_failed_job_keeps_its_last_committed_round_and_drops_one_never_committed(
        federation):
    """Round 3's file was written but never committed (a crash in between, say); the
    job then fails at round 3: nothing will ever commit it, so it goes with round 1."""
    fed = federation(["a", "b", "c"], dim=40)
    coord = fed.coord
    ended: list[str] = []
    coord.on_job_completed = ended.append
    box: list[str] = []

    def dark(site, body):  # two sites go dark once round 2 is committed
        return (site in "bc" and isinstance(body, m.TrainTask) and bool(box)
                and coord.store.job(box[0]).committed_round >= 2)
    fed.kill_hook = dark

    async def go():
        await fed.heartbeats()
        box.append(coord.submit_job(fedadam(secure="false"), actor="test"))
        await fed.pump(until=lambda: coord.store.job(box[0]).committed_round == 2)
        ck.save_checkpoint(ck.round_path(coord.state_dir, box[0], 3),
                           ck.Checkpoint(weights=np.ones(40, np.float32), round=3, plan="x"))
        await fed.pump(until=lambda: coord.store.job(box[0]).status == "failed")
    asyncio.run(go())
    job = box[0]
    assert ended == [job]
    assert kept(coord, job) == ["final.safetensors", "round-0.safetensors",
                                "round-2.safetensors"]
    final = ck.load_checkpoint(ck.final_path(coord.state_dir, job))
    two = ck.load_checkpoint(ck.round_path(coord.state_dir, job, 2))
    assert final.weights.tobytes() == two.weights.tobytes() and final.strategy_state == {}
    assert coord.store.job(job).final_digest == two.model_digest


def test_a_restarted_coordinator_keeps_an_ended_jobs_result_and_drops_its_old_rounds(
        tmp_path):
    """Killed after a job was marked failed, before its final model was written and
    its old rounds removed: the next start (process._resume_finishing) writes the
    final model from the last committed round, removes the rounds before it, then
    finishes the job for real: its ONNX export (of that model) and its report."""
    coord = Coordinator(tmp_path, initial_weights=lambda p: np.zeros(4, np.float32))
    # a model `fedge export` can build from the plan: 3 inputs and a bias, 4 weights
    exportable = fedadam().replace('name = "linear"\n',
                                   'name = "linear"\nparams = { in_features = 3 }\n')
    assert exportable != fedadam()
    job = coord.submit_job(exportable, actor="test")
    text = coord.store.job(job).plan_toml
    for r in (0, 1, 2, 3):
        c = ck.Checkpoint(weights=np.full(4, r, np.float32), round=r, plan=text,
                          strategy_state={"m": np.full(4, r, np.float64)} if r else {})
        digest = ck.save_checkpoint(ck.round_path(tmp_path, job, r), c)
        if 0 < r < 3:  # round 3: written, not committed
            coord.store.commit_round(job, r, started_at=float(r), cohort=["a", "b"],
                                     survivors=["a", "b"], dropped=[], model_digest=digest,
                                     metrics=[])
    coord.store.set_job_status(job, "failed", actor="test", error="round 3 failed 3 times")
    try:
        assert process.unfinished_jobs(coord) == [job]
        asyncio.run(process._resume_finishing(coord, [job]))
        assert not coord.store.audit_log(action="model_export_failed")
        assert kept(coord, job) == ["final.safetensors", "model.onnx", "report.json",
                                    "report.md", "round-0.safetensors", "round-2.safetensors"]
        final = ck.load_checkpoint(ck.final_path(tmp_path, job))
        assert (final.round, final.strategy_state) == (2, {})
        assert final.weights.tolist() == [2.0] * 4
        assert coord.store.job(job).final_digest == final.model_digest
        # the export is of that model: it names its digest and computes with its weights
        import onnxruntime as ort

        from fedge.serve.export import read_metadata

        onnx_path = ck.job_dir(tmp_path, job) / "model.onnx"
        assert read_metadata(onnx_path).get("model_digest") == final.model_digest
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        x = np.array([[1.0, 2.0, 3.0]], np.float32)
        (y,) = sess.run(None, {sess.get_inputs()[0].name: x})
        assert y.ravel().tolist() == [2.0 * (1 + 2 + 3) + 2.0]  # w = 2, bias = 2
        report = json.loads((ck.job_dir(tmp_path, job) / "report.json").read_text())
        assert (report["job_id"], report["status"], report["partial"], report["error"],
                report["committed_round"]) == (job, "failed", True, "round 3 failed 3 times", 2)
        assert process.unfinished_jobs(coord) == []
    finally:
        coord.close()



def test_a_finished_job_whose_directory_the_operator_deleted_is_left_alone(federation):
    """README.Debian: an ended job's directory may be deleted once its results are
    fetched. The next start does not try to finish it again (export, report) from
    nothing; one whose directory is there without its report still is."""
    import shutil

    fed = federation(["a", "b", "c"], dim=40)
    done, deleted = run(fed, fedadam(rounds=2)), run(fed, fedadam(rounds=2))
    assert process.unfinished_jobs(fed.coord) == [done, deleted]  # no reports here
    shutil.rmtree(ck.job_dir(fed.coord.state_dir, deleted))
    assert process.unfinished_jobs(fed.coord) == [done]
    assert fed.coord.job_status(deleted)["status"] == "completed"  # SQLite keeps its record
