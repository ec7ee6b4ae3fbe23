"""What the agent itself refuses to install (`AgentUpdater.refusal`): what is already
here is nothing to do, whatever was signed since; otherwise only the newest signed
version of a lineage, newer than what is installed and running. One order decides it
all, PEP 440's, in which "1.2" and "1.2.0" are the same version."""

from __future__ import annotations

import pytest
from packaging.version import Version

from fedge.agent.updates import AgentUpdater, InstallOutcome, release_version
from fedge.serve.repository import ModelRepository
from fedge.update import tuf_repo
from fedge.update.ab import SLOT_ENV, SelfUpdate
from fedge.update.messages import UpdateAvailable
from fedge.update.rollout import Rollout
from tests.update.test_agent_update_client import linked
from tests.update.test_self_update import bundle


def spec(kind: str, name: str, version: str) -> tuf_repo.TargetSpec:
    path = f"{kind}/{name}/{version}/x"
    return tuf_repo.TargetSpec(kind, name, version, path, 1, "0" * 64)


def with_installed(fleet, **installed: str) -> AgentUpdater:
    updater = AgentUpdater(fleet.agent_dir)
    for key, version in installed.items():
        kind, name = key.split("__")
        updater.record(InstallOutcome(kind, name, version, True, False, "installed"))
    return updater


def test_a_roll_out_of_the_installed_software_after_a_newer_one_was_signed_goes_on(
        tmp_path, fleet, publisher):
    """2.0.0 is installed, then 3.0.0 is signed; a roll-out of 2.0.0 (started before,
    or re-asked on reconnect) finds it here: ok, nothing staged, and the roll-out goes
    on to the next site instead of stopping at this one, though 2.0.0 is no longer
    listed (or still is: an earlier console's targets)."""
    root = tmp_path / "software"
    with_installed(fleet, software__fedge="2.0.0")
    paths = {version: publisher(fleet, "software", "fedge", version, f"fedge-{version}.tar.gz",
                                bundle(tmp_path, version, "good").read_bytes())
             for version in ("2.0.0", "3.0.0")}
    restarts: list[str] = []
    outcome, = linked(fleet, None, [], self_update=SelfUpdate(root),
                      restart=lambda: restarts.append("restart"),
                      asks=[UpdateAvailable("r2", paths["2.0.0"])])
    assert outcome.ok and not outcome.rolled_back, outcome.detail
    assert "software 2.0.0 is the installed software/fedge already" in outcome.detail
    assert restarts == [] and SelfUpdate(root).pending() is None

    rollout = Rollout("r2", paths["2.0.0"], ["h1", "h2"])
    rollout.start(0.0)
    assert rollout.receive("h1", outcome, 1.0) == [("h2", UpdateAvailable("r2", paths["2.0.0"]))]
    assert rollout.state == "rest" and not rollout.failure


def test_a_roll_out_of_the_installed_model_after_a_newer_one_was_signed_is_nothing_to_do(
        tmp_path, fleet, make_onnx, publisher):
    with_installed(fleet, model__risk="2")
    old, _ = (publisher(fleet, "model", "risk", version, "model.onnx", make_onnx(float(version)))
              for version in ("2", "3"))
    models = ModelRepository(tmp_path / "models")
    outcome, = linked(fleet, models, [], asks=[UpdateAvailable("r2", old)])
    assert outcome.ok, outcome.detail
    assert "model risk 2 already installed" in outcome.detail
    assert models.versions("risk") == []  # nothing installed again


def test_the_running_software_is_nothing_to_do_though_newer_is_signed(fleet, monkeypatch):
    monkeypatch.setenv(SLOT_ENV, "2.0.0")
    updater = with_installed(fleet)
    specs = [spec("software", "fedge", "2.0.0"), spec("software", "fedge", "3.0.0")]
    assert updater.refusal(specs[0], specs) == (
        True, "software 2.0.0 is the running software already; nothing to do")
    assert updater.refusal(specs[1], specs) is None


@pytest.mark.parametrize("have, offered, signed", [
    ("1.2.0", "1.2", ["1.2", "1.2.0"]),  # version_key put 1.2.0 above 1.2: "not newest"
    ("1.2", "1.2.0", ["1.2.0"]),
])
def test_software_1_2_and_1_2_0_are_one_version(fleet, monkeypatch, have, offered, signed):
    monkeypatch.setenv(SLOT_ENV, "1.0")
    updater = with_installed(fleet, software__fedge=have)
    specs = [spec("software", "fedge", v) for v in signed]
    ok, detail = updater.refusal(spec("software", "fedge", offered), specs)
    assert ok and "is the installed software/fedge already" in detail


@pytest.mark.parametrize("have, offered", [
    ("1.2.0", "1.2"),  # was refused: (1, 2, 0) >= (1, 2) but the strings differ
    ("1.2", "1.2.0"),  # was installed again: (1, 2) < (1, 2, 0)
])
def test_a_model_at_1_2_and_1_2_0_is_one_version(fleet, have, offered):
    updater = with_installed(fleet, model__risk=have)
    offer = spec("model", "risk", offered)
    assert updater.refusal(offer, [offer]) == (
        True, f"model risk {have} already installed; {offered} is the same version, "
        "nothing to do")


def test_an_older_model_than_the_installed_one_is_refused(fleet):
    updater = with_installed(fleet, model__risk="3")
    offer = spec("model", "risk", "2.9")
    assert updater.refusal(offer, [offer]) == (
        False, "model risk 2.9 is older than the installed model/risk 3; refusing it")


@pytest.mark.parametrize("a, b", [
    ("1.2", "1.2.0"), ("1.2.0.0", "1.2"), ("3", "3.0.0"), ("0", "0.0"), ("1.10", "1.9"),
    ("2", "1.99.99"), ("1.2.1", "1.2"), ("0.0.1", "0"),
])
def test_target_versions_order_as_pep_440_does(a, b):
    assert ((tuf_repo.version_key(a) > tuf_repo.version_key(b)) ==
            (release_version(a) > release_version(b)) == (Version(a) > Version(b)))
    assert ((tuf_repo.version_key(a) == tuf_repo.version_key(b)) ==
            (Version(a) == Version(b)))
