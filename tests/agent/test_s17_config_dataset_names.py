"""Two [[datasets]] tables of one name are refused, naming both (s17 F5).

The last one used to win silently: a site that declared its centre twice trained on
the second table and never said so.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from fedge.agent.process import AgentConfigError, load_config
from fedge.agent.trainer import TorchTrainer


def table(name: str, site: int) -> str:
    return (f'[[datasets]]\nname = "{name}"\nkind = "fed_tcga_brca"\n'
            f'path = "/srv/brca"\nsite = {site}\n')


def test_two_tables_of_one_name_are_refused_at_load_naming_both(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(table("fed_tcga_brca", 0) + table("other", 1) + table("fed_tcga_brca", 3))
    with pytest.raises(AgentConfigError) as err:
        load_config(p)
    message = str(err.value)
    assert str(p) in message
    assert ("[[datasets]] table 1 (name = 'fed_tcga_brca') and [[datasets]] table 3 "
            "(name = 'fed_tcga_brca') have one name") in message


def test_names_equal_once_normalised_are_one_name(tmp_path: Path) -> None:
    """Plans' names are read NFC, so 'é' composed and decomposed name one data set."""
    composed, decomposed = "centre_é", unicodedata.normalize("NFD", "centre_é")
    assert composed != decomposed
    p = tmp_path / "agent.toml"
    p.write_text(table(composed, 0) + table(decomposed, 1), encoding="utf-8")
    with pytest.raises(AgentConfigError, match=r"table 1 .* and .*table 2 .* have one name"):
        load_config(p)


def test_a_trainer_given_two_tables_of_one_name_refuses_them() -> None:
    tables = [{"name": "brca", "kind": "fed_tcga_brca", "path": "/x", "site": s}
              for s in (0, 3)]
    with pytest.raises(ValueError, match=r"table 1 .* and .*table 2 .* have one name"):
        TorchTrainer(tables)
    assert TorchTrainer(tables[1:]).dataset_spec("brca").site == 3
