"""JobStateStore: a running job's appliance-side state on disk (c_i, data cursor)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.jobstate import JobStateStore
from fedge.agent.runtime import Agent
from fedge.agent.trainer import LocalResult, SyntheticTrainer
from fedge.train.api import ClientState, DataCursor

# these agents run plans with and without secure aggregation
PLAIN_OK = PrivacyPolicy(require_secure_aggregation=False)


def test_arrays_round_trip_per_job_and_kind(tmp_path):
    store = JobStateStore(tmp_path)
    a = {"1": np.arange(4, dtype=np.float32), "2": np.ones(4, np.float32)}
    store.save("job/ä b", "controls", a)
    store.save("job/ä b", "cursors", {"order1": np.arange(3)})
    store.save("other", "controls", {"1": np.zeros(2, np.float32)})
    back = JobStateStore(tmp_path).load("job/ä b", "controls")
    assert sorted(back) == ["1", "2"]
    np.testing.assert_array_equal(back["2"], a["2"])
    assert back["1"].dtype == np.float32
    assert JobStateStore(tmp_path).load("never-saved", "controls") == {}
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o600}


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-job"])
def test_an_unreadable_file_is_moved_aside_and_named(tmp_path, caplog, damage):
    store = JobStateStore(tmp_path)
    store.save("j", "controls", {"1": np.ones(1000, np.float32)})
    path = store.path("j", "controls")
    if damage == "garbage":
        path.write_bytes(b"not an archive")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:  # a file renamed from another job's
        store.save("k", "controls", {"1": np.ones(2, np.float32)})
        os.replace(store.path("k", "controls"), path)
    before = path.read_bytes()
    with caplog.at_level(logging.ERROR, logger="fedge.agent"):
        assert store.load("j", "controls") == {}
    assert str(path) in caplog.text and "unreadable" in caplog.text
    aside = path.with_name(path.name + ".corrupt")
    assert aside.read_bytes() == before and not path.exists()  # kept, not deleted


def test_only_the_newest_files_of_a_kind_are_kept(tmp_path):
    store = JobStateStore(tmp_path, keep=3)
    for i in range(5):
        store.save(f"job-{i}", "controls", {"1": np.full(2, i, np.float32)})
        os.utime(store.path(f"job-{i}", "controls"), ns=(i * 10**9, i * 10**9))
    store.save("job-0", "cursors", {"order1": np.arange(2)})  # another kind: its own count
    kept = {f"job-{i}" for i in range(5) if store.path(f"job-{i}", "controls").exists()}
    assert kept == {"job-2", "job-3", "job-4"}
    assert store.path("job-0", "cursors").exists()
    with pytest.raises(ValueError, match="keep=0"):
        JobStateStore(tmp_path, keep=0)
    with pytest.raises(ValueError, match="kind"):
        store.path("j", "../escape")


def test_client_state_cursors_round_trip_and_bad_arrays_are_named():
    state = ClientState(cursors={2: DataCursor(torch.tensor([3, 1, 2, 0]), 1),
                                 3: DataCursor(torch.tensor([0, 2, 1, 3]), 4)})
    back = ClientState()
    back.restore_cursors(state.cursor_arrays())
    assert sorted(back.cursors) == [2, 3] and back.cursors[2].pos == 1
    assert back.cursors[3].order.tolist() == [0, 2, 1, 3]
    with pytest.raises(ValueError, match="'order2'"):
        back.restore_cursors({"order2": np.arange(4), "pos2": np.array(9)})
    with pytest.raises(ValueError, match="'order2'"):
        back.restore_cursors({"order2": np.arange(4)})


def test_agent_reloads_committed_scaffold_controls_after_a_restart(tmp_path):
    """c_i and the pending Δc_i kept by one Agent are what a new Agent on the same store
    starts from: the restarted one still adds its Δc_i when the ControlCommit comes."""
    import asyncio

    from fedge.agent.runtime import _Task
    from fedge.coordinator.plan import parse_plan
    from fedge.wire import codec
    from fedge.wire import messages as m

    plan = parse_plan('[job]\ndataset = "synthetic"\nrounds = 3\n[model]\nname = "linear"\n'
                      '[train]\nsteps = 1\nbatch_size = 8\nlearning_rate = 0.1\n'
                      '[strategy]\nname = "scaffold"\n[secagg]\nenabled = false\n')
    first = Agent("site-0", SyntheticTrainer("site-0"), job_state=JobStateStore(tmp_path),
                  policy=PLAIN_OK)
    start = np.full(4, 0.5, np.float32)
    JobStateStore(tmp_path).save("job", "controls", {"2": start})
    task = _Task("job", 2, plan, np.zeros(4, np.float32), b"", b"", client_control=start)
    task.local = LocalResult(np.zeros(4, np.float32), 10, {}, 0.0,
                             np.full(4, 0.25, np.float32))
    assert first._hold_control(task) == ""  # as its update leaves
    again = Agent("site-0", SyntheticTrainer("site-0"), job_state=JobStateStore(tmp_path),
                  policy=PLAIN_OK)
    at, dc = again.pending_control("job")
    assert at == 2
    np.testing.assert_array_equal(dc, np.full(4, 0.25))
    np.testing.assert_array_equal(again.client_control("job", 3), start)  # not yet
    frames = codec.encode(m.ControlCommit(task_id="t", summed_round=2), sender="coordinator",
                          job="job", round=3)
    asyncio.run(again.handle_frames([bytes(f) for f in frames]))
    third = Agent("site-0", SyntheticTrainer("site-0"), job_state=JobStateStore(tmp_path),
                  policy=PLAIN_OK)
    np.testing.assert_array_equal(third.client_control("job", 3), np.full(4, 0.75))
    assert third.pending_control("job") is None and third.client_control("job", 1) is None
    agent = Agent("site-0", SyntheticTrainer("site-0"), policy=PLAIN_OK)
    assert agent.client_control("job", 3) is None
