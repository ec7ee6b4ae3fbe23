"""`fedge agent check --config FILE` reads each data set as a task's first load does
(s18 eurocsv, finding 1). It only looked at the paths: a folder as a tabular data set's
path, a ';'-separated export, a decimal-comma file were all "ok", and hospital IT first
heard of it when a job was refused.

Now each data set is read with the trainer's own reading (fedge.agent.trainer.
read_source: fedge.train's loader, the table's settings): "reading data set NAME
(PATH)…" first, then "ok" with its rows, splits and columns, or the loader's whole
error (the site's own terminal); any data set that cannot be used exits 1 (the
agent would start: 2 is for what start refuses), after all are read. Nothing is
written. The real CLI, in a subprocess; what the loader says of
each bad file is taken from the loader itself, in this process, so that the test holds
whatever words fedge.train uses."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedge.train.data import DatasetSpec, load_site_data
from tests.test_s17_check_cli import REPO, agent_config, fedge

GOOD = "age,bmi,label\n" + "".join(f"{40 + i},{20 + i / 10:.1f},{i % 2}\n" for i in range(10))


def appliance(tmp_path: Path, datasets: str, extra: str = "") -> Path:
    """An enrolled state dir "st" (coordinator off loopback) and an agent.toml with
    these [[datasets]] tables."""
    cfg = agent_config(tmp_path)
    (tmp_path / "data.npz").unlink()
    cfg.write_text(f'state_dir = "st"\nhealth = false\n{extra}{datasets}')
    return cfg


def table(name: str, path: Path) -> str:
    return (f'[[datasets]]\nname = "{name}"\nkind = "tabular"\npath = "{path}"\n'
            'task = "binary"\nfeatures = ["age", "bmi"]\ntarget = "label"\n')


def settled(path: Path, text: str | bytes) -> Path:
    """``path`` written, its modification a minute old (an export written earlier: a
    fresh one is warned of, as modified just before it was read)."""
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    old = time.time() - 60
    os.utime(path, (old, old))
    return path


def loader_error(name: str, path: Path) -> str | None:
    """What fedge.train's loader says of this table, in full; None when it loads."""
    spec = DatasetSpec.from_config({"name": name, "kind": "tabular", "path": str(path),
                                    "task": "binary", "features": ["age", "bmi"],
                                    "target": "label"})
    try:
        load_site_data(spec)
    except (OSError, ValueError) as exc:
        return str(exc)
    return None


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_a_good_table_is_read_and_said_ok_with_its_rows_and_columns_and_nothing_written(
        tmp_path):
    data = settled(tmp_path / "Zürich export ü.csv", GOOD)
    cfg = appliance(tmp_path, table("rows", data))
    before = snapshot(tmp_path)
    out = fedge("agent", "check", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert out.stderr == f"reading data set 'rows' ({data})…\n", out.stderr
    assert re.fullmatch(r"data set 'rows': ok: 10 rows \(train 8, val 2\), 2 feature columns; "
                        rf"read in \d+\.\d s\nok: {re.escape(str(cfg))}\n", out.stdout), out.stdout
    assert snapshot(tmp_path) == before  # no cache, no lock, no state written


def test_each_data_set_that_cannot_be_used_is_named_with_why_and_check_exits_2(tmp_path):
    """The reviewer's exports: a folder as the path, a ';'-separated file with decimal
    commas, a comma-separated one with quoted decimal commas; a path that does not
    exist; a table this release leaves out. Each is said, the good one too, then 2."""
    folder = tmp_path / "Zürich data"
    folder.mkdir()
    settled(folder / "brca ü.csv", GOOD)
    semi = settled(tmp_path / "semicolon.csv",
                   "age;bmi;label\n60;24,5;1\n70;30,1;0\n80;22,7;1\n90;28,0;0\n")
    comma = settled(tmp_path / "decimal_comma.csv",
                    'age,bmi,label\n60,"24,5",1\n70,"30,1",0\n80,"22,7",1\n90,"28,0",0\n')
    good = settled(tmp_path / "good.csv", GOOD)
    bad = {"folder": folder, "semi": semi, "comma": comma}
    said = {name: loader_error(name, path) for name, path in bad.items()}
    assert said["folder"] is not None and said["semi"] is not None  # what the job meets
    nofeatures = ('[[datasets]]\nname = "nofeat"\nkind = "tabular"\n'
                  f'path = "{good}"\ntask = "binary"\ntarget = "label"\n')
    cfg = appliance(tmp_path, "".join(table(n, p) for n, p in bad.items())
                    + table("gone", tmp_path / "gone.csv") + table("good", good) + nofeatures)
    out = fedge("agent", "check", "--config", str(cfg))
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.splitlines()
    failed = 2  # gone, nofeat
    for name, path in bad.items():
        reading = lines.index(f"reading data set {name!r} ({path})…")
        if said[name] is None:  # this loader reads it: so does check
            assert out.stdout.count(f"data set {name!r}: ok: ") == 1, out.stdout
            continue
        failed += 1
        assert lines[reading + 1] == f"error: data set {name!r} cannot be loaded: {said[name]}"
    assert (f"error: data set 'gone': its path {tmp_path / 'gone.csv'} does not exist; every "
            "job on it is refused until that is fixed") in lines
    (left_out,) = [x for x in lines if x.startswith("error: data set 'nofeat'")]
    assert left_out.startswith(f"error: data set 'nofeat' in {cfg} is left out, its tasks "
                               "refused until the table is fixed: ")
    assert "reading data set 'gone'" not in out.stderr
    assert "reading data set 'nofeat'" not in out.stderr
    assert re.search(r"^data set 'good': ok: 10 rows \(train 8, val 2\), 2 feature columns; ",
                     out.stdout, re.M), out.stdout
    assert "ok: " + str(cfg) not in out.stdout
    assert lines[-1] == (f"fedge agent: {failed} of 6 data sets in {cfg} cannot be used (said "
                         "above): the agent starts, but refuses every job on them until "
                         "that is fixed")


def test_a_read_slower_than_half_of_data_load_s_is_warned_of(tmp_path):
    data = settled(tmp_path / "rows.csv", GOOD)
    cfg = appliance(tmp_path, table("rows", data), extra="data_load_s = 0.0001\n")
    out = fedge("agent", "check", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    (warning,) = [x for x in out.stderr.splitlines() if x.startswith("warning:")]
    assert warning.startswith("warning: data set 'rows' took ") and warning.endswith(
        "over half of data_load_s = 0.0001 s (agent.toml): a task's load past it counts the "
        "agent stuck, and it is restarted, the load lost; raise data_load_s"), warning


# the real CLI, with fedge.agent.trainer.RECENT_WRITE_S at sys.argv[1] seconds: what
# counts as "just written" does not then hang on how long this machine takes to start it
CHECK = r'''
import sys
import fedge.agent.trainer
fedge.agent.trainer.RECENT_WRITE_S = float(sys.argv.pop(1))
from fedge.cli import main
sys.exit(main(["agent", "check", "--config", sys.argv[1]]))
'''


@pytest.mark.parametrize("age_s", [60, 86400], ids=["a-minute-old", "a-day-old"])
def test_an_export_modified_just_before_check_reads_it_is_warned_of(tmp_path, age_s):
    """What the trainer logs at WARNING while it reads (fedge.agent.trainer.read_source)
    is said on check's terminal too, after the line naming the file; no value of it.
    "Just before" is
    an hour here (RECENT_WRITE_S): a file a minute old is, one a day old is not."""
    data = settled(tmp_path / "rows.csv", GOOD)
    aged = time.time() - age_s
    os.utime(data, (aged, aged))
    cfg = appliance(tmp_path, table("rows", data))
    out = subprocess.run([sys.executable, "-c", CHECK, "3600", str(cfg)], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    warnings = [x for x in out.stderr.splitlines() if x.startswith("warning:")]
    if age_s > 3600:
        assert warnings == []
        return
    (warning,) = warnings
    assert re.fullmatch(r"warning: data set 'rows': its file was "
                        r"modified \d+\.\d s before it was read: .*", warning), warning
    assert "renamed into place" in warning and "20.9" not in warning
    # the path: on the line before, where check says what it reads
    lines = out.stderr.splitlines()
    assert lines[lines.index(warning) - 1] == f"reading data set 'rows' ({data})…"
