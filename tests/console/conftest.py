from __future__ import annotations

import asyncio
import socket
import threading
from datetime import UTC, datetime

import pytest

from fedge.console.client import AdminClient
from fedge.console.store import ConsoleStore
from fedge.coordinator.admin import AdminConfig, AdminService, serve_admin
from fedge.coordinator.service import Coordinator
from fedge.coordinator.updates import UpdateRepository


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AdminServer:
    """A real Coordinator (SQLite) with its admin channel served on loopback from a
    background thread; `sent` collects what the admin service sends to agents."""

    def __init__(self, tmp_path, console_home=None) -> None:
        if console_home is None:
            port = free_port()
            self.console = ConsoleStore.init(
                tmp_path / "console", coordinator_endpoint=f"tcp://127.0.0.1:{port}",
                admin_endpoint=f"tcp://127.0.0.1:{free_port()}")
        else:
            self.console = ConsoleStore(console_home)
        prov = self.console.provision()
        self.coordinator = Coordinator(tmp_path / "coordinator",
                                       roster_public_key=self.console.roster_public_key())
        # provisioned on the first start, opened on a restart (as the coordinator does)
        self.updates = UpdateRepository.from_provision(tmp_path / "coordinator", prov)
        config = AdminConfig.from_provision(prov, self.console.admin_endpoint)
        self.sent: list[tuple[str, object]] = []
        self.service = AdminService(self.coordinator, config.operators, updates=self.updates,
                                    send=lambda site, msg: self.sent.append((site, msg)))
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.failure: BaseException | None = None

        async def main() -> None:
            ev = asyncio.Event()
            self.task = asyncio.ensure_future(serve_admin(self.coordinator, config,
                                                          service=self.service, ready=ev,
                                                          tick_s=0.05))
            waiter = asyncio.ensure_future(ev.wait())
            await asyncio.wait([waiter, self.task], return_when=asyncio.FIRST_COMPLETED)
            ready.set()  # started, or failed to start (self.task done)
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            except BaseException as exc:
                self.failure = exc

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),),
                                       daemon=True)
        self.thread.start()
        assert ready.wait(60), "admin server did not start within 60 s"
        assert not self.task.done(), f"admin server failed to start: {self.failure!r}"

    def call_in_loop(self, fn, *args):
        """Run fn(*args) on the admin server's event loop thread and wait for it."""
        done = threading.Event()

        def run():
            try:
                fn(*args)
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(10)

    def client(self, operator: str, timeout_s: float = 5.0) -> AdminClient:
        return AdminClient.from_store(self.console, operator, timeout_s=timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)
        self.coordinator.close()


@pytest.fixture
def server(tmp_path):
    s = AdminServer(tmp_path)
    yield s
    s.close()





@pytest.fixture
def make_server(tmp_path):
    servers: list[AdminServer] = []

    def make(console_home=None) -> AdminServer:
        s = AdminServer(tmp_path, console_home)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def admin_port() -> int:
    return free_port()
