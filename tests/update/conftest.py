"""A console, a coordinator TUF relay and an enrolled agent, all on disk, with one
controllable clock. The agent's fetcher is the real ZmqFetcher; `roundtrip` is
the coordinator's real handler unless a test puts an attacker in between."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import onnx
import pytest
from onnx import TensorProto, helper

from fedge.agent.updates import AgentUpdater, ZmqFetcher, install_trusted_root
from fedge.console.store import ConsoleStore
from fedge.coordinator.updates import UpdateRepository
from fedge.update import tuf_repo


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def tiny_onnx(scale: float) -> bytes:
    """y = x * scale, a valid ONNX model whose output tells versions apart."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    k = helper.make_tensor("k", TensorProto.FLOAT, [1], [scale])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["y"])], "g", [x], [y], [k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


class Fleet:
    def __init__(self, tmp_path) -> None:
        self.clock = Clock()
        self.console = ConsoleStore.init(tmp_path / "console",
                                         coordinator_endpoint="tcp://127.0.0.1:7000",
                                         clock=self.clock)
        self.repo = UpdateRepository.provision(
            tmp_path / "coordinator", root=self.console.root_bytes(),
            targets=self.console.targets_bytes(),
            snapshot_key=self.console.tuf_key("snapshot"),
            timestamp_key=self.console.tuf_key("timestamp"), clock=self.clock)
        self.agent_dir = tmp_path / "agent"
        install_trusted_root(self.agent_dir, self.console.root_bytes())
        self.requests = 0
        self.roundtrip = self.repo.handle_fetch
        self.fetcher = ZmqFetcher(self._roundtrip, chunk=4096)
        self.updater = AgentUpdater(self.agent_dir, self.fetcher, clock=self.clock)

    def _roundtrip(self, req):
        self.requests += 1
        return self.roundtrip(req)

    def publish(self, kind: str, name: str, version: str, filename: str, data: bytes) -> str:
        """Sign and publish one target as `fedge console push` does; returns its path."""
        targets, files = self.console.sign_targets([(kind, name, version, filename, data)])
        self.repo.publish(targets, files)
        [path] = files
        return path

    def publish_as_earlier_console(self, kind: str, name: str, version: str, filename: str,
                                   data: bytes) -> str:
        """Publish one target as a console before this release did: added to every
        target signed so far, so that older versions stay listed. Returns its path."""
        current = tuf_repo.load(self.console.targets_bytes(), "targets")
        tf = tuf_repo.new_target_file(kind, name, version, filename, data)
        md = tuf_repo.create_targets(self.console.tuf_key("targets"),
                                     {**current.signed.targets, tf.path: tf},
                                     version=current.signed.version + 1, now=self.clock())
        targets = tuf_repo.to_bytes(md)
        self.repo.publish(targets, {tf.path: data})
        self.console.save_targets(targets)
        return tf.path


@pytest.fixture
def fleet(tmp_path) -> Fleet:
    return Fleet(tmp_path)


@pytest.fixture(params=["newest-only", "earlier-console"])
def publisher(request):
    """How older versions were signed: this console lists only the newest of each
    lineage; one before this release listed every version ever pushed. The appliance
    must refuse a rollback either way."""
    if request.param == "newest-only":
        return Fleet.publish
    return Fleet.publish_as_earlier_console


@pytest.fixture
def make_onnx():
    return tiny_onnx


@pytest.fixture
def installed(tmp_path):
    """A software slot root running 1.0.0 (tests.update.test_self_update's bundles), and
    the environment its `supervise` starts the unit in."""
    from fedge.update.ab import SlotInstaller
    from tests.update.test_self_update import bundle

    root = tmp_path / "software"
    slots = SlotInstaller(root)
    slots.unpack("1.0.0", bundle(tmp_path, "1.0.0", "stable"))
    slots.switch("1.0.0")
    env = {**os.environ, "FEDGE_TEST_ROOT": str(root),
           "FEDGE_TEST_REPORT": str(tmp_path / "report.json")}
    return root, env
