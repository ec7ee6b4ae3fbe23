"""agent.toml's [[datasets]] values are checked when the agent starts (s17 F1, F7).

A value of the wrong type used to load and fail far from the file: ``name = 7`` made
every heartbeat raise (the trainer sorts the names), so the site dropped out while
systemd said ready; ``path = 5`` a traceback; ``seed = "abc"`` or ``image_size = "64"``
the first task; ``path = ""`` quietly read the config's own folder. Now each is
refused by ``load_config``, naming the file, the table and the key. Rules between keys
(kind, task, columns) and unknown keys still leave the table out with its tasks
refused, as before: a rule of another release must not stop the appliance.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedge.agent.process import AgentConfigError, load_config
from fedge.agent.trainer import TorchTrainer
from fedge.train.data import DatasetSpec

BRCA = 'kind = "fed_tcga_brca"\npath = "/srv/brca"\nsite = 0\n'


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text('state_dir = "st"\n' + text)
    return p


def test_a_name_that_is_not_a_string_is_refused_naming_the_file_table_and_key(tmp_path):
    p = write(tmp_path, f'[[datasets]]\nname = "brca"\n{BRCA}'
                        f'[[datasets]]\nname = 7\n{BRCA.replace("0", "1")}')
    with pytest.raises(AgentConfigError) as err:
        load_config(p)
    message = str(err.value)
    assert str(p) in message
    assert "[[datasets]] table 2 (name = 7)" in message
    assert "datasets.name = 7 must be a non-empty string" in message


def test_the_agent_refuses_to_start_on_it_and_says_why(tmp_path):
    """The real CLI: exit 2 before the enrolment is read (there is none here)."""
    p = write(tmp_path, f"health = false\n[[datasets]]\nname = 7\n{BRCA}")
    run = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "run", "--config", str(p)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "[[datasets]] table 1 (name = 7): datasets.name = 7" in run.stderr
    assert "not enrolled" not in run.stderr and "Traceback" not in run.stderr


def test_a_trainer_given_such_a_table_leaves_it_out_and_still_lists_its_data_sets():
    """The heartbeat's list of data sets: it raised TypeError sorting 7 among names."""
    trainer = TorchTrainer([{"name": 7, "kind": "fed_tcga_brca", "path": "/x", "site": 0},
                            {"name": "brca", "kind": "fed_tcga_brca", "path": "/x", "site": 1}])
    assert trainer.datasets() == ["brca"]
    assert "datasets.name = 7" in trainer.unusable["[[datasets]] #1"]


@pytest.mark.parametrize(("line", "key"), [
    ('name = ""', "name"),
    ('name = "  "', "name"),
    ('path = ""', "path"),
])
def test_an_empty_name_or_path_is_refused(tmp_path, line, key):
    table = {"name": '"brca"', "kind": '"fed_tcga_brca"', "path": '"/srv/brca"', "site": "0"}
    k, v = line.split(" = ")
    table[k] = v
    text = "[[datasets]]\n" + "".join(f"{a} = {b}\n" for a, b in table.items())
    with pytest.raises(AgentConfigError, match=rf"datasets\.{key} = .* must be a non-empty"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(("line", "key", "rule"), [
    ("path = 5", "path", "a non-empty string"),
    ('val_fraction = "0.2"', "val_fraction", r"a number in \[0, 1\)"),
    ("val_fraction = 1.0", "val_fraction", r"a number in \[0, 1\)"),
    ("val_fraction = nan", "val_fraction", r"a number in \[0, 1\)"),
    ('cv_folds = "5"', "cv_folds", "an integer >= 2"),
    ("cv_folds = 1", "cv_folds", "an integer >= 2"),
    ("cv_fold = -1", "cv_fold", "an integer >= 0"),
    ('seed = "abc"', "seed", "an integer >= 0"),
    ("seed = -1", "seed", "an integer >= 0"),
    ("seed = 1.5", "seed", "an integer >= 0"),
    ('image_size = "64"', "image_size", "an integer >= 1"),
    ("image_size = 0", "image_size", "an integer >= 1"),
    ("site = true", "site", "an integer"),
    ("kind = 5", "kind", "a string"),
    ("task = 1", "task", "a string"),
    ("standardise = false", "standardise", "a string"),
    ('features = "age"', "features", "a list of column names"),
    ("target = 3", "target", "a string, a column name"),
    ('classes = "benign"', "classes", "a list of folder names"),
    ("feature_bounds = 3", "feature_bounds", "a table of column"),
])
def test_each_key_of_the_wrong_type_or_range_is_refused_at_load_naming_it(
        tmp_path, line, key, rule):
    k = line.split(" = ")[0]
    base = {"name": '"brca"', "kind": '"fed_tcga_brca"', "path": '"/srv/brca"', "site": "0"}
    base[k] = line.split(" = ", 1)[1]
    text = "[[datasets]]\n" + "".join(f"{a} = {b}\n" for a, b in base.items())
    p = write(tmp_path, text)
    with pytest.raises(AgentConfigError, match=rf"datasets\.{key}\b.* {rule}") as err:
        load_config(p)
    assert str(p) in str(err.value) and "[[datasets]] table 1 (name = 'brca')" in str(err.value)


def test_a_seed_or_image_size_of_the_wrong_type_never_reaches_a_task():
    """Before, from_config took them and the first task raised a bare TypeError."""
    for key, value in (("seed", "abc"), ("image_size", "64")):
        with pytest.raises(ValueError, match=rf"datasets\.{key} = '{value}'"):
            DatasetSpec.from_config({"name": "s", "kind": "images", "path": "/x",
                                     "task": "binary", "classes": ["a", "b"], key: value})


def test_valid_tables_load_as_before_and_rules_between_keys_still_leave_a_table_out(
        tmp_path):
    """A relative path is the config's folder's; a missing data path, an unknown key
    or a kind this release lacks is not refused at load: the trainer leaves that
    table out, naming why, and serves the others."""
    p = write(tmp_path, '[[datasets]]\nname = "brca"\nkind = "fed_tcga_brca"\n'
                        'path = "data/brca"\nsite = 0\nval_fraction = 0\nseed = 7\n'
                        'cv_folds = 5\ncv_fold = 4\nstandardise = "all"\n'
                        '[[datasets]]\nname = "t"\nkind = "tabular"\npath = "/none.csv"\n'
                        'features = ["a", "b"]\ntarget = "y"\ntask = "binary"\n'
                        'split_column = "split"\nsite_column = "c"\nsite = "h1"\n'
                        'id_column = "id"\nstandardise = "bounds"\n'
                        'feature_bounds = { a = [0, 1] }\n'
                        '[[datasets]]\nname = "later"\nkind = "dicom"\npath = "/x"\n'
                        '[[datasets]]\nname = "typo"\nkind = "fed_tcga_brca"\npath = "/x"\n'
                        'site = 2\nsedd = 1\n')
    cfg = load_config(p)
    assert cfg.datasets[0]["path"] == str(tmp_path / "data" / "brca")
    trainer = TorchTrainer(cfg.datasets)
    assert trainer.datasets() == ["brca", "t"]
    assert sorted(trainer.unusable) == ["later", "typo"]
    spec = trainer.dataset_spec("brca")
    assert (spec.val_fraction, spec.seed, spec.cv_folds, spec.cv_fold) == (0, 7, 5, 4)
    assert trainer.dataset_spec("t").bounds() == {"a": (0.0, 1.0)}
