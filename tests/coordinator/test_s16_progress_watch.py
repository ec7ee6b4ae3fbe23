"""`jobs watch` says, while a round trains, how many sites are in and whom it waits
for, with the phase's deadline (review s16 progress M2): it printed "round 1/1:
training" for the whole of a slow site's 12 s, naming nobody. Real coordinator,
agents, codec and SQLite in memory (tests/coordinator/conftest.py); the watch reads
the coordinator's own job_status."""

from __future__ import annotations

import asyncio
import re

from fedge.console.cli import progress_text, watch_job
from fedge.coordinator.rounds import Phase
from fedge.wire import messages as m
from tests.coordinator.test_federation_inproc import plan


def test_watch_names_the_site_a_training_round_waits_for(federation):
    fed = federation(["a", "b", "c"])
    coord = fed.coord

    def two_trained() -> bool:
        rnd = coord.runner.round if coord.runner is not None else None
        return (rnd is not None and rnd.phase is Phase.TRAINING
                and sorted(rnd.trained) == ["a", "b"])

    async def go():
        await fed.heartbeats()
        job = coord.submit_job(plan(rounds=1, secure="false"), actor="test")
        fed.kill_hook = lambda site, body: site == "c" and isinstance(body, m.TrainTask)
        await fed.pump(until=two_trained)
        return job

    job = asyncio.run(go())
    waiting = coord.job_status(job)
    coord.cancel_job(job, actor="operator:alice")
    seen = iter([waiting, coord.job_status(job)])
    lines: list[str] = []
    watch_job(lambda op, args: (next(seen), {}), job, interval_s=0, out=lines.append,
              results_wait_s=0)
    said = next(line for line in lines if line.startswith("round 1/1: training"))
    assert re.fullmatch(r"round 1/1: training; 2 of 3 in, waiting for c "
                        r"\(deadline in \d+ s\)", said), said


def test_the_progress_text_names_at_most_five_and_counts_the_rest():
    status = {"reported": ["a"], "waiting_for": ["b", "c", "d", "e", "f", "g", "h"],
              "stage": "MaskedInput", "phase_deadline_at": 1000.0}
    assert progress_text(status, now=940.0) == (
        "; MaskedInput 1 of 8 in, waiting for b, c, d, e, f and 2 more (deadline in 60 s)")
    assert progress_text({"reported": ["a", "b"], "waiting_for": []}) == "; 2 of 2 in"
    assert progress_text({"reported": ["a"], "waiting_for": [],
                          "dropped_out": {"c": "lost", "b": "refused"}}) == (
        "; 1 of 1 in; out: b, c")  # why: once the attempt ends
    assert progress_text({}) == ""  # a coordinator before these fields
