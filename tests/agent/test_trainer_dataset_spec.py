"""TorchTrainer.dataset_spec: a held data set's agent.toml table as parsed, by the
NFC form of its name (as class_names looks it up); Agent.declared_inputs reads the
tables through it, so any trainer that offers it declares its data sets' inputs."""

from __future__ import annotations

import unicodedata

from fedge.agent.runtime import Agent
from fedge.agent.trainer import TorchTrainer
from fedge.train.data import DatasetSpec

# "Bäder" written with a combining diaeresis (NFD) in agent.toml and asked for in NFC
NFD_NAME = unicodedata.normalize("NFD", "Bäder")
TABLES = [
    {"name": NFD_NAME, "kind": "tabular", "path": "/nonexistent/b.csv",
     "task": "regression", "target": "y", "features": ["a", "b"]},
    {"name": "broken", "kind": "tabular", "path": "/nonexistent/c.csv", "no_such_key": 1},
]


def test_dataset_spec_finds_a_held_table_by_either_normal_form_of_its_name():
    trainer = TorchTrainer(TABLES)
    for asked in ("Bäder", NFD_NAME):
        spec = trainer.dataset_spec(asked)
        assert spec is not None and spec.name == unicodedata.normalize("NFC", "Bäder")
        assert (spec.kind, spec.task, list(spec.features)) == \
            ("tabular", "regression", ["a", "b"])


def test_dataset_spec_is_none_for_a_data_set_not_held_or_whose_table_was_refused():
    trainer = TorchTrainer(TABLES)
    assert "broken" in trainer.unusable
    assert trainer.dataset_spec("broken") is None
    assert trainer.dataset_spec("elsewhere") is None


class OnlyPublicTrainer:
    """A trainer that offers its tables through the public methods only (no
    TorchTrainer internals): what declared_inputs may rely on."""

    def __init__(self, trainer: TorchTrainer) -> None:
        self._inner = trainer
        self.unusable = trainer.unusable

    def datasets(self) -> list[str]:
        return self._inner.datasets()

    def dataset_spec(self, name: str) -> DatasetSpec | None:
        return self._inner.dataset_spec(name)


def test_declared_inputs_come_from_the_public_dataset_spec():
    agent = Agent("h1", OnlyPublicTrainer(TorchTrainer(TABLES)))
    name = unicodedata.normalize("NFC", "Bäder")
    assert agent.declared_inputs() == ({name: "regression"}, {name: [2]})
