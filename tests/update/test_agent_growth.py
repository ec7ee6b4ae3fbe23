"""What an appliance keeps of the updates it installs: each download goes once it is
installed, a model keeps the two versions `fedge serve` loads, an app `current` and
the one before. Months of pushes must not fill the appliance's disk."""

from __future__ import annotations

import io
import os
import tarfile

from fedge.agent.updates import SiteModels
from fedge.serve.repository import ModelRepository
from fedge.update.ab import SelfUpdate
from fedge.update.messages import UpdateAvailable
from tests.update.test_agent_update_client import linked
from tests.update.test_self_update import bundle


class HealthyService:
    def restart(self, slot) -> None:
        pass

    def wait_healthy(self, deadline_s: float) -> None:
        pass

    def stop(self) -> None:
        pass


def app(version: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("plan.toml", f"version = {version!r}\n".encode()),
                           ("weights.bin", os.urandom(20_000))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _files(path) -> list:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def test_ten_pushes_of_a_model_and_an_app_leave_two_versions_of_each_and_no_downloads(
        fleet, tmp_path, make_onnx):
    from fedge.serve.runtime import ModelStore

    models = ModelRepository(tmp_path / "models")
    serve = ModelStore(threads=1)
    apps = fleet.agent_dir / "apps" / "cox"
    for i in range(1, 11):
        fleet.publish("model", "risk", str(i), "model.onnx", make_onnx(float(i)))
        fleet.publish("app", "cox", str(i), "cox.tar.gz", app(str(i)))
        for spec in fleet.updater.pending():
            assert fleet.updater.install(spec, models=models).ok
        serve.sync(models)
        assert _files(fleet.agent_dir / "tuf" / "targets") == []
        assert models.versions("risk") == [v for v in (i - 1, i) if v >= 1]
        assert sorted(p.name for p in models.root.joinpath("risk").iterdir()) == sorted(
            str(v) for v in (i - 1, i) if v >= 1)  # nothing retired left behind
        assert serve.versions("risk") == models.versions("risk")  # what fedge serve loads
        assert sorted(p.name for p in apps.iterdir()) == sorted(
            ["current", *(str(v) for v in (i - 1, i) if v >= 1)])
        assert (apps / "current" / "plan.toml").read_text() == f"version = '{i}'\n"
    assert serve.get("risk").version == 10
    assert fleet.updater.installed() == {"model/risk": "10", "app/cox": "10"}


def test_a_site_model_installer_prunes_the_repository_it_wraps(fleet, tmp_path, make_onnx):
    """The appliance installs through SiteModels (site standardisation, class names);
    its repository is pruned all the same."""
    models = SiteModels(ModelRepository(tmp_path / "models"), lambda _dataset: None)
    for i in range(1, 5):
        fleet.publish("model", "risk", str(i), "model.onnx", make_onnx(float(i)))
        [spec] = fleet.updater.pending()
        assert fleet.updater.install(spec, models=models).ok
    assert models.repository.versions("risk") == [3, 4]


def test_downloads_left_by_an_earlier_release_go_at_the_next_install_a_refused_one_too(
        fleet, tmp_path, make_onnx):
    """A release that kept every download left tuf/targets/ full: the next install
    removes every download no longer listed. A download whose install failed goes too
    (the next try fetches it again)."""
    downloads = fleet.agent_dir / "tuf" / "targets"
    downloads.mkdir(parents=True, exist_ok=True)
    for v in ("1", "2"):
        (downloads / f"model__risk__{v}__model.onnx").write_bytes(b"old")
    fleet.publish("app", "cox", "1", "cox.tar.gz", b"not a tar archive")
    [spec] = fleet.updater.pending()
    outcome = fleet.updater.install(spec)
    assert not outcome.ok and "bad archive" in outcome.detail
    assert _files(downloads) == []
    fleet.publish("model", "risk", "3", "model.onnx", make_onnx(3.0))
    [spec] = [s for s in fleet.updater.pending() if s.kind == "model"]
    assert fleet.updater.install(spec, models=ModelRepository(tmp_path / "models")).ok
    assert _files(downloads) == []


def test_a_software_bundle_is_removed_once_staged(tmp_path, fleet):
    root = tmp_path / "software"
    path = fleet.publish("software", "fedge", "2.0.0", "fedge-2.0.0.tar.gz",
                         bundle(tmp_path, "2.0.0", "good").read_bytes())
    restarts: list[str] = []
    assert linked(fleet, None, [], self_update=SelfUpdate(root),
                  restart=lambda: restarts.append("restart"),
                  asks=[UpdateAvailable("r1", path)]) == []  # reports after the restart
    assert restarts == ["restart"] and SelfUpdate(root).pending()["version"] == "2.0.0"
    assert (root / "slots" / "2.0.0" / "fedge-bundle.json").exists()
    assert _files(fleet.agent_dir / "tuf" / "targets") == []


def test_a_software_install_with_a_health_check_removes_its_download(tmp_path, fleet):
    fleet.publish("software", "fedge", "2.0.0", "fedge-2.0.0.tar.gz",
                  bundle(tmp_path, "2.0.0", "good").read_bytes())
    [spec] = fleet.updater.pending()
    outcome = fleet.updater.install(spec, service=HealthyService())
    assert outcome.ok, outcome.detail
    assert _files(fleet.agent_dir / "tuf" / "targets") == []


def _unservable() -> bytes:
    """Passes onnx.checker (an op of a domain it does not know), fails onnxruntime."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"],
                                                domain="com.example")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _not_finite() -> bytes:
    """Loads in onnxruntime, but log(0) = -inf on fedge serve's zero smoke input."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_pushed_models_that_cannot_be_served_never_cost_the_last_ones_that_can(
        fleet, tmp_path, make_onnx):
    """Versions 3 and 4 pass the checker but fedge serve will not serve them (3 does
    not load in onnxruntime, 4 gives -inf on its smoke input): versions 1 and 2, the
    newest two it can serve, are kept, and serve goes on with 2."""
    from fedge.serve.runtime import ModelStore

    models = ModelRepository(tmp_path / "models")
    serve = ModelStore(threads=1)
    for i, data in enumerate([make_onnx(1.0), make_onnx(2.0), _unservable(),
                              _not_finite()], start=1):
        fleet.publish("model", "risk", str(i), "model.onnx", data)
        [spec] = fleet.updater.pending()
        assert fleet.updater.install(spec, models=models).ok
    assert models.versions("risk") == [1, 2, 3, 4]
    serve.sync(models)
    assert serve.get("risk").version == 2
    fleet.publish("model", "risk", "5", "model.onnx", make_onnx(5.0))
    [spec] = fleet.updater.pending()
    assert fleet.updater.install(spec, models=models).ok
    assert models.versions("risk") == [2, 3, 4, 5]  # 5 and 2 load: 1 goes
