"""A site sets how long its data set's first load may take (agent.toml ``data_load_s``,
bigsite review, H3). The bound was fixed at 30 min (DATA_LOAD_S); a real image set
takes longer (500k images of 512x512: about 50 min, 100k chest X-rays: about 85 min),
so the agent counted itself stuck, systemd restarted it and the load was lost, at
every task. Now the bound is the site's, a load past half of it is a WARNING naming
the setting, a load past it (plus the stuck grace) says which setting bounds it, and
every load says at INFO how long it took and how much it read, so that IT can size it.

The slow load is test_slow_first_load's: SyntheticTrainer with a first load that takes
as long as the test holds it (slow, not hung), as TorchTrainer's does."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import numpy as np
import pytest

from fedge.agent.process import AgentConfigError, load_config
from fedge.agent.runtime import DATA_LOAD_S, Agent
from fedge.agent.trainer import SyntheticTrainer, TorchTrainer
from fedge.wire import messages as m
from tests.agent.test_runtime import PLAIN_OK, PLAN, Link, deliver, task

WAIT_S = 10.0  # bound on every wait here; none is reached when the agent works


class HeldLoad(SyntheticTrainer):
    """A first load that lasts until the test lets it end."""

    def __init__(self, site: str) -> None:
        super().__init__(site)
        self.loading = threading.Event()
        self.release = threading.Event()

    def load_data(self, name: str, job: str | None = None) -> None:
        self.loading.set()
        assert self.release.wait(WAIT_S)


async def _loading(agent: Agent, trainer: HeldLoad) -> asyncio.Future:
    training = asyncio.ensure_future(deliver(agent, task(PLAN)))
    assert await asyncio.to_thread(trainer.loading.wait, WAIT_S)
    return training


def halfway_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "past half of its limit" in r.getMessage()]


def test_a_load_past_the_sites_data_load_s_is_stuck_and_names_the_setting(caplog):
    trainer = HeldLoad("site-a")
    agent = Agent("site-a", trainer, policy=PLAIN_OK, stuck_grace_s=0.2, data_load_s=0.3)
    link = Link(agent)

    async def scenario() -> None:
        training = await _loading(agent, trainer)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:  # heartbeats until the load counts as stuck
            await agent.heartbeat()
            if not link.bodies(m.Heartbeat)[-1].eligible:
                break
            await asyncio.sleep(0.05)
        trainer.release.set()
        await training
        await agent.heartbeat()

    with caplog.at_level(logging.INFO, logger="fedge.agent"):
        asyncio.run(scenario())
    late = [b for b in link.bodies(m.Heartbeat) if not b.eligible]
    assert late, "the load was never counted stuck"
    assert late[0].reason.startswith(
        "worker stuck: loading data set 'synthetic' for train job1 round 1"), late[0].reason
    assert "past its deadline of 0.3 s plus 0.2 s (agent.toml data_load_s sets that " \
           "deadline)" in late[0].reason
    (half,) = halfway_warnings(caplog)  # once, though every heartbeat asked
    assert "loading data set 'synthetic' for train job1 round 1 has run" in half
    assert "past half of its limit (agent.toml data_load_s = 0.3 s)" in half
    assert "raise data_load_s if it needs longer" in half
    assert link.bodies(m.Heartbeat)[-1].eligible  # back once the load returned
    assert len(link.bodies(m.TrainDone)) == 1


def test_the_sites_limit_not_the_default_bounds_a_load(caplog):
    """An image set that needs 2 h, the site's data_load_s set to 3 h: the default
    (30 min) would have had it restarted at 32 min."""
    trainer = HeldLoad("site-a")
    agent = Agent("site-a", trainer, policy=PLAIN_OK, data_load_s=3 * 3600.0)

    async def scenario() -> tuple[list[str], int]:
        training = await _loading(agent, trainer)
        now = time.monotonic()
        said = [agent.stuck_worker(now + s) for s in (DATA_LOAD_S + 600, 2 * 3600)]
        warned = len(halfway_warnings(caplog))
        said.append(agent.stuck_worker(now + 3 * 3600 + 121))
        trainer.release.set()
        await training
        return said, warned

    with caplog.at_level(logging.WARNING, logger="fedge.agent"):
        (at_40_min, at_2_h, at_3_h), warned = asyncio.run(scenario())
    assert at_40_min == "" and at_2_h == ""
    assert warned == 1  # at 2 h, past half of 3 h
    assert "past its deadline of 10800 s plus 120 s (agent.toml data_load_s" in at_3_h


@pytest.mark.parametrize("value", [0, -5.0, '"90 min"', "true"])
def test_data_load_s_is_refused_unless_a_positive_number_and_the_key_is_named(
        tmp_path, value):
    path = tmp_path / "agent.toml"
    path.write_text(f'state_dir = "st"\ndata_load_s = {value}\n')
    with pytest.raises(AgentConfigError, match=r"agent config data_load_s = .* must be > 0"):
        load_config(path)
    with pytest.raises(ValueError, match="data_load_s=0 must be > 0"):
        Agent("site-a", SyntheticTrainer("site-a"), data_load_s=0)


def test_data_load_s_is_read_from_agent_toml_and_defaults_to_30_min(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('state_dir = "st"\n')
    assert load_config(path).data_load_s == DATA_LOAD_S == 1800.0
    path.write_text('state_dir = "st"\ndata_load_s = 10800\n')
    assert load_config(path).data_load_s == 10800.0


def test_each_load_says_how_long_it_took_and_how_much_it_read(tmp_path, caplog):
    """With the real loader: a table's rows, an image set's images, by split."""
    from PIL import Image

    table = tmp_path / "onc.csv"
    table.write_text("age,E,T\n" + "".join(f"{40 + i},{i % 2},{100 + i}\n"
                                           for i in range(40)))
    root = tmp_path / "scans"
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(
                    root / split / cls / f"{i}.png")
    trainer = TorchTrainer([
        {"name": "onc", "kind": "tabular", "path": str(table), "task": "survival",
         "features": ["age"], "event": "E", "time": "T", "standardise": "none",
         "val_fraction": 0.25},
        {"name": "scans", "kind": "images", "path": str(root), "task": "binary",
         "classes": ["a", "b"], "image_size": 8, "val_fraction": 0.0}])
    with caplog.at_level(logging.INFO, logger="fedge.agent"):
        trainer.load_data("onc")
        trainer.load_data("scans")
        trainer.load_data("scans")  # unchanged: not read again, not said again
    loaded = [r.getMessage() for r in caplog.records if " loaded in " in r.getMessage()]
    assert len(loaded) == 2, loaded
    assert loaded[0].startswith("data set 'onc' loaded in ")
    assert loaded[0].endswith(" s: 40 rows (train 30, val 10)")
    assert loaded[1].startswith("data set 'scans' loaded in ")
    assert loaded[1].endswith(" s: 10 images (train 6, test 4)"), loaded[1]
    assert str(tmp_path) not in caplog.text
    assert all(r.levelno == logging.INFO for r in caplog.records
               if " loaded in " in r.getMessage())


def test_a_trainer_whose_load_data_takes_the_job_gets_it(tmp_path):
    """The runtime hands the task's job to a load_data that takes one (TorchTrainer's:
    a job's later rounds skip the look at the source, test_s15_bigsite_midjob)."""
    seen: list[tuple[str, str | None]] = []

    class Recording(SyntheticTrainer):
        def load_data(self, name: str, job: str | None = None) -> None:
            seen.append((name, job))

    agent = Agent("site-a", Recording("site-a"), policy=PLAIN_OK)
    Link(agent)
    asyncio.run(deliver(agent, task(PLAN), job="job-7"))
    assert seen == [("synthetic", "job-7")]
