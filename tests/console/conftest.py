from datetime import UTC, datetime

import pytest

from fedge.console.store import ConsoleStore


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def console(tmp_path, clock) -> ConsoleStore:
    return ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://127.0.0.1:7000",
                             clock=clock)
