"""The coordinator's job queue runs jobs in the order they were submitted, whatever the
wall clock did in between (a step backwards gives a later job the earlier
``submitted_at``). In memory, with a fake clock."""

from __future__ import annotations

PLAN = """
[job]
dataset = "synthetic"
rounds = 2
min_clients = 2
seed = 11
max_failed_attempts = 3
[model]
name = "linear"
[train]
epochs = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "fedavg"
[secagg]
enabled = true
[deadlines]
cohort_s = 60
train_s = 20
secagg_stage_s = 20
eval_s = 20
"""


def test_the_queue_runs_jobs_in_the_order_they_were_submitted(federation):
    """A job submitted after the wall clock went back an hour has the earlier
    submitted_at, yet waits behind the job submitted before it (insertion order)."""
    fed = federation(["a"])  # one clock for both: the step moves the records' dates
    first = fed.coord.submit_job(PLAN, actor="test")
    fed.clock.t -= 3600.0
    second = fed.coord.submit_job(PLAN, actor="test")
    assert fed.coord.store.job(second).submitted_at < fed.coord.store.job(first).submitted_at
    assert [j.job_id for j in fed.coord.store.jobs(status="queued")] == [first, second]
    assert [j["job_id"] for j in fed.coord.list_jobs()] == [first, second]
    fed.coord.tick()
    assert fed.coord.runner is not None and fed.coord.runner.job_id == first
