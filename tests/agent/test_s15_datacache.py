"""A data set re-exported while the agent runs: a job keeps the version it began on
for all its rounds, a job that begins later reads the new one (TorchTrainer)."""

from __future__ import annotations

import gc
import logging
import os
import weakref
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.trainer import TaskRefusal, TorchTrainer
from fedge.coordinator.plan import parse_plan
from fedge.coordinator.rounds import train_seed

PLAN = parse_plan("""
[job]
dataset = "onc"
rounds = 3
seed = 5
[model]
name = "cox_linear"
params = { in_features = 1 }
[train]
steps = 3
batch_size = 8
learning_rate = 0.05
[strategy]
name = "fedavg"
""")
W0 = np.zeros(2, np.float32)


def export(path: Path, ages: list[str]) -> None:
    """What a data manager's export writes, in place (the file keeps its inode)."""
    with open(path, "w") as f:
        f.write("age,E,T\n" + "".join(f"{a},{i % 2},{100 + i}\n" for i, a in enumerate(ages)))


# ages exported in months, then corrected to years (zero-padded to three digits, so
# the file keeps its size)
MONTHS = [f"{600 + 7 * i}" for i in range(40)]
YEARS = [f"{(600 + 7 * i) / 12:03.0f}" for i in range(40)]


def table(path: Path) -> dict:
    return {"name": "onc", "kind": "tabular", "path": str(path), "task": "survival",
            "features": ["age"], "event": "E", "time": "T", "standardise": "none",
            "val_fraction": 0.0}


def rnd(trainer: TorchTrainer, job: str, r: int, w: np.ndarray) -> np.ndarray:
    return trainer.train("site-0", job, PLAN, w, round=r,
                         seed=train_seed(5, r, "site-0")).weights


def reference(tmp_path: Path, name: str, ages: list[str], job: str, rounds: int) -> np.ndarray:
    """Job ``job``'s weights after ``rounds`` rounds on ``ages`` alone, never changed."""
    path = tmp_path / name
    export(path, ages)
    w, t = W0, TorchTrainer([table(path)])
    for r in range(1, rounds + 1):
        w = rnd(t, job, r, w)
    return w


def test_a_job_keeps_the_rows_it_began_on_and_the_next_job_reads_the_re_export(
        tmp_path, caplog):
    """The re-export keeps the file's inode, its size and (os.utime) its modification
    time to the nanosecond: only its status-change time, which the kernel sets on
    every write, tells it apart."""
    assert len("".join(MONTHS)) == len("".join(YEARS))
    path = tmp_path / "onc.csv"
    export(path, MONTHS)
    first = os.stat(path)
    trainer = TorchTrainer([table(path)])
    w1 = rnd(trainer, "job-1", 1, W0)

    export(path, YEARS)
    os.utime(path, ns=(first.st_atime_ns, first.st_mtime_ns))
    now = os.stat(path)
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (
        first.st_ino, first.st_size, first.st_mtime_ns)

    with caplog.at_level(logging.INFO, logger="fedge.agent"):
        trainer.load_data("onc")  # as the agent does before each task
        w2 = rnd(trainer, "job-1", 2, w1)
        v1 = rnd(trainer, "job-2", 1, W0)
        trainer.load_data("onc")
        w3 = rnd(trainer, "job-1", 3, w2)
        v2 = rnd(trainer, "job-2", 2, v1)

    # job-1's rounds 2 and 3 on the months it began on, job-2 on the years only
    np.testing.assert_array_equal(w3, reference(tmp_path, "m.csv", MONTHS, "job-1", 3))
    np.testing.assert_array_equal(v2, reference(tmp_path, "y.csv", YEARS, "job-2", 2))
    assert not np.array_equal(v1, reference(tmp_path, "m2.csv", MONTHS, "job-2", 1))
    reread = [r for r in caplog.records if "re-read" in r.getMessage()]
    assert len(reread) == 1 and reread[0].levelno == logging.INFO
    assert reread[0].getMessage() == (
        "data set 'onc' re-read: its file changed since it was loaded (status-change "
        "time); jobs that began on the earlier version keep it for their remaining rounds")
    assert str(tmp_path) not in caplog.text


def test_a_job_trains_on_while_its_file_is_away_and_a_new_job_is_refused(tmp_path):
    """A job's rounds do not look at the file again: one being rewritten (here moved
    away) does not stop it. A job that begins meanwhile is refused, naming no path."""
    path = tmp_path / "onc.csv"
    export(path, MONTHS)
    trainer = TorchTrainer([table(path)])
    w1 = rnd(trainer, "job-1", 1, W0)
    path.rename(tmp_path / "elsewhere.csv")
    rnd(trainer, "job-1", 2, w1)
    with pytest.raises(TaskRefusal, match="data set 'onc' cannot be loaded") as info:
        rnd(trainer, "job-2", 1, W0)
    assert str(tmp_path) not in str(info.value)


def test_an_earlier_version_leaves_memory_with_the_last_job_that_began_on_it(tmp_path):
    """The trainer holds its last ``held_jobs`` jobs; the version a dropped job began
    on is freed once no held job began on it (a job is not said to end)."""
    path = tmp_path / "onc.csv"
    export(path, MONTHS)
    trainer = TorchTrainer([table(path)], held_jobs=1)
    rnd(trainer, "job-1", 1, W0)
    months = weakref.ref(trainer._site_data("onc", "job-1"))
    export(path, [f"{a}0" for a in MONTHS])  # a new size this time
    rnd(trainer, "job-1", 2, W0)
    gc.collect()
    assert months() is not None  # job-1 is held and began on it
    rnd(trainer, "job-2", 1, W0)  # job-1 is dropped (held_jobs=1)
    gc.collect()
    assert months() is None


def test_an_image_folder_is_a_new_version_when_an_image_in_it_is_replaced(tmp_path, caplog):
    """An image overwritten in place with the same size and modification time, one
    added, one removed: each a new version of the folder; a dot-file (an editor's, a
    desktop's) is not, nor is an image added and removed again."""
    from PIL import Image

    from fedge.agent.trainer import source_version

    root = tmp_path / "scans"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(
                    root / split / cls / f"{i}.png")
    spec = {"name": "scans", "kind": "images", "path": str(root), "task": "binary",
            "classes": ["a", "b"], "image_size": 8}
    trainer = TorchTrainer([spec])
    trainer.load_data("scans")
    before = trainer._site_data("scans").train.x.copy()
    v0 = source_version(root)
    (root / "train" / "a" / ".DS_Store").write_bytes(b"x")
    assert source_version(root) == v0

    image = root / "train" / "a" / "1.png"
    old = image.read_bytes()
    was = os.stat(image)
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(image)
    assert len(image.read_bytes()) == len(old)
    os.utime(image, ns=(was.st_atime_ns, was.st_mtime_ns))
    v1 = source_version(root)
    assert v1 != v0 and v1.size == v0.size
    with caplog.at_level(logging.INFO, logger="fedge.agent"):
        trainer.load_data("scans")
    assert "data set 'scans' re-read: its folder changed since it was loaded" in caplog.text
    assert not np.array_equal(trainer._site_data("scans").train.x, before)

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "test" / "b" / "3.png")
    v2 = source_version(root)
    assert v2 != v1 and v2.size == v1.size + 1
    (root / "test" / "b" / "3.png").unlink()
    assert source_version(root) == v1  # it holds what it held
    (root / "train" / "b" / "0.png").unlink()
    v3 = source_version(root)
    assert v3 != v1 and v3.size == v1.size - 1
