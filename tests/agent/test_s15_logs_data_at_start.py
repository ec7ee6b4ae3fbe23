"""A configured data set whose path is missing is said when the agent starts, not
first when a job arrives and fails on it (logs review, session 15, L8)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedge.agent.process import AgentConfigError, data_not_found, load_config, run


def config(tmp_path: Path, *paths: str) -> Path:
    tables = "".join(f'[[datasets]]\nname = "set{i}"\nkind = "fed_tcga_brca"\npath = "{p}"\n'
                     f'site = 0\n\n' for i, p in enumerate(paths))
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\nhealth = false\n\n{tables}')
    return cfg


def test_the_agent_warns_at_start_of_each_data_set_it_cannot_find(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    present = tmp_path / "brca"
    present.mkdir()
    missing = tmp_path / "no-such-data"
    cfg = load_config(config(tmp_path, str(present), str(missing)))
    with caplog.at_level(logging.WARNING, logger="fedge.agent"), \
            pytest.raises(AgentConfigError, match="not enrolled"):
        run(cfg)  # stops at the enrolment (none here), after the check
    warned = [r.getMessage() for r in caplog.records if "data set" in r.getMessage()]
    assert warned == [f"data set 'set1': its path {missing} does not exist; every job on it "
                      "is refused until that is fixed (the data sets' paths are checked "
                      "when the agent starts, and by each job)"]


def test_a_path_that_cannot_be_reached_is_named_with_why(tmp_path: Path) -> None:
    a_file = tmp_path / "export.csv"
    a_file.write_text("id\n1\n")
    under_a_file = a_file / "train.csv"
    lines = data_not_found([
        {"name": "ok", "path": str(a_file)},
        {"name": "bad", "path": str(under_a_file)},
        {"name": "no path"},  # refused by fedge.train when it loads, by name
    ])
    assert len(lines) == 1
    assert lines[0].startswith(f"data set 'bad': its path {under_a_file} cannot be reached "
                               "as user ")
    assert lines[0].endswith(": Not a directory")
