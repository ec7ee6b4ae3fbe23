"""The appliance's own record of every update outcome (``updates/audit.jsonl``): a
forged, rolled-back or tampered push is refused, and the refusal is audited and
logged at WARNING here, not only at the coordinator (which the threat model treats
as possibly hostile). Each line says which roll-out asked, the target's path and
signed sha256, and who signed the targets metadata that vouched for it (its
version and the verifying key ids), when verification got that far. The file is
bounded (rotated once), and lines written before these fields were kept still read.

Real TUF metadata signed with real Ed25519 keys, real files; the coordinator's
relay answers the agent's real fetcher through the wire codec (`linked`)."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import timedelta

import pytest

from fedge.agent import updates as agent_updates
from fedge.agent.updates import AgentUpdateClient, AgentUpdater, InstallOutcome
from fedge.serve.repository import ModelRepository
from fedge.update import tuf_repo
from fedge.update.ab import SelfUpdate
from fedge.update.messages import UpdateAvailable
from tests.update.test_agent_update_client import linked
from tests.update.test_self_update import bundle


def audit(fleet) -> list[dict]:
    """audit.jsonl as written, read without the product's reader."""
    path = fleet.agent_dir / "updates" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def console_targets_keyids(fleet) -> list[str]:
    """The key ids the console's root names for the targets role (its offline key)."""
    root = tuf_repo.load(fleet.console.root_bytes(), "root")
    return sorted(root.signed.roles["targets"].keyids)


def signed_sha256(fleet, path: str) -> str:
    return fleet.repo.current_targets().signed.targets[path].hashes["sha256"]


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "fedge.agent.updates" and r.levelno == logging.WARNING
            and "refused" in r.getMessage()]


def test_a_model_install_line_says_which_roll_out_what_target_and_who_signed_it(
        fleet, tmp_path, make_onnx):
    path = fleet.publish("model", "risk", "4", "model.onnx", make_onnx(4.0))
    out, = linked(fleet, ModelRepository(tmp_path / "models"), [],
                  asks=[UpdateAvailable("r1", path)])
    assert out.ok, out.detail
    [line] = audit(fleet)
    assert line["ok"] is True and (line["kind"], line["name"], line["version"]) == (
        "model", "risk", "4")
    assert line["rollout_id"] == "r1" and line["path"] == path
    assert line["sha256"] == signed_sha256(fleet, path)
    assert line["targets_version"] == fleet.repo.current_targets().signed.version
    assert line["targets_signed_by"] == console_targets_keyids(fleet)
    assert line["root_version"] == 1


def test_targets_forged_by_the_coordinator_are_refused_audited_and_logged(
        fleet, tmp_path, make_onnx, caplog):
    """A coordinator re-signs targets with its own online (snapshot) key to push a
    model the console never signed: python-tuf refuses it at refresh, and the
    refusal is on the appliance, signed by nobody it trusts."""
    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    evil = fleet.console.tuf_key("snapshot")
    tf = tuf_repo.new_target_file("model", "risk", "9", "model.onnx", make_onnx(9.0))
    v = fleet.repo.versions["targets"] + 1
    forged = tuf_repo.to_bytes(tuf_repo.create_targets(evil, {tf.path: tf}, version=v,
                                                       now=fleet.clock()))
    (fleet.repo.root_dir / "metadata" / f"{v}.targets.json").write_bytes(forged)
    fleet.repo._v.targets = v
    fleet.repo._v = fleet.repo._sign_online(fleet.repo.root_dir, fleet.repo._snapshot_key,
                                            fleet.repo._timestamp_key, fleet.repo._v,
                                            fleet.clock())
    models = ModelRepository(tmp_path / "models")
    with caplog.at_level(logging.INFO, logger="fedge.agent.updates"):
        out, = linked(fleet, models, [], asks=[UpdateAvailable("evil", tf.path)])
    assert not out.ok and out.detail.startswith("UnsignedMetadataError")
    assert models.versions("risk") == []
    [line] = audit(fleet)
    assert line["ok"] is False and line["rollout_id"] == "evil" and line["path"] == tf.path
    assert line["detail"] == out.detail
    # nothing verified: no signer, no signed hash, is claimed for it
    assert line["targets_signed_by"] is None and line["targets_version"] is None
    assert line["sha256"] is None
    [logged] = refusals(caplog)
    assert "roll-out evil" in logged and "UnsignedMetadataError" in logged


def test_a_software_rollback_push_is_refused_audited_with_its_signer_and_logged(
        tmp_path, fleet, caplog):
    """An earlier console's targets still list 1.0.0 beside 2.0.0: a roll-out of
    1.0.0 is a rollback, refused before anything is fetched or staged. Asked again,
    the same outcome goes back and no second line is written."""
    root = tmp_path / "software"
    paths = {v: fleet.publish_as_earlier_console("software", "fedge", v, f"fedge-{v}.tar.gz",
                                                 bundle(tmp_path, v, "good").read_bytes())
             for v in ("1.0.0", "2.0.0")}
    ask = UpdateAvailable("evil", paths["1.0.0"])
    with caplog.at_level(logging.INFO, logger="fedge.agent.updates"):
        out, = linked(fleet, None, [], self_update=SelfUpdate(root), restart=lambda: None,
                      asks=[ask])
    assert not out.ok and "refusing to install an older one" in out.detail
    assert SelfUpdate(root).pending() is None
    [line] = audit(fleet)
    assert (line["kind"], line["name"], line["version"]) == ("software", "fedge", "1.0.0")
    assert line["ok"] is False and line["rollout_id"] == "evil"
    assert line["path"] == paths["1.0.0"] and line["detail"] == out.detail
    assert line["sha256"] == signed_sha256(fleet, paths["1.0.0"])
    assert line["targets_version"] == fleet.repo.current_targets().signed.version
    assert line["targets_signed_by"] == console_targets_keyids(fleet)
    [logged] = refusals(caplog)
    assert "software fedge 1.0.0 (roll-out evil) refused" in logged

    again, = linked(fleet, None, [], self_update=SelfUpdate(root), restart=lambda: None,
                    asks=[ask])
    assert again == out and len(audit(fleet)) == 1


def test_a_tampered_software_bundle_is_refused_audited_and_logged(tmp_path, fleet, caplog):
    root = tmp_path / "software"
    data = bundle(tmp_path, "9.0.0", "good").read_bytes()
    path = fleet.publish("software", "fedge", "9.0.0", "fedge-9.0.0.tar.gz", data)
    [stored] = [p for p in (fleet.repo.root_dir / "targets").rglob("*") if p.is_file()]
    stored.write_bytes(b"\0" * len(data))  # the coordinator serves other bytes
    with caplog.at_level(logging.INFO, logger="fedge.agent.updates"):
        out, = linked(fleet, None, [], self_update=SelfUpdate(root), restart=lambda: None,
                      asks=[UpdateAvailable("r-tampered", path)])
    assert not out.ok and out.detail.startswith("LengthOrHashMismatchError")
    assert SelfUpdate(root).pending() is None
    [line] = audit(fleet)
    assert line["ok"] is False and line["rollout_id"] == "r-tampered"
    assert line["sha256"] == signed_sha256(fleet, path)  # what was signed, not served
    assert line["targets_signed_by"] == console_targets_keyids(fleet)
    [logged] = refusals(caplog)
    assert "roll-out r-tampered" in logged and "LengthOrHashMismatchError" in logged


def test_a_retryable_refusal_for_expired_metadata_is_audited_each_time(
        fleet, tmp_path, make_onnx):
    """Not kept as the roll-out's answer (asked again, the appliance tries again),
    but each try is an outcome the appliance audits."""
    path = fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    fleet.clock.now += timedelta(days=2)  # the coordinator stopped re-signing
    models = ModelRepository(tmp_path / "models")
    ask = UpdateAvailable("r1", path)
    first, = linked(fleet, models, [], asks=[ask])
    second, = linked(fleet, models, [], asks=[ask])
    assert agent_updates.retryable(first) and agent_updates.retryable(second)
    lines = audit(fleet)
    assert [(e["rollout_id"], e["ok"]) for e in lines] == [("r1", False), ("r1", False)]
    assert all(e["detail"].startswith("ExpiredMetadataError") for e in lines)


def test_a_software_update_outcome_after_its_restart_says_who_signed_it(tmp_path, fleet):
    """Staged by the old version, confirmed by the new one after the restart: the one
    line its outcome gets carries what was verified before the restart."""
    root = tmp_path / "software"
    path = fleet.publish("software", "fedge", "2.0.0", "fedge-2.0.0.tar.gz",
                         bundle(tmp_path, "2.0.0", "good").read_bytes())
    assert linked(fleet, None, [], self_update=SelfUpdate(root), restart=lambda: None,
                  asks=[UpdateAvailable("r1", path)]) == []  # staged; reports after restart
    assert audit(fleet) == []

    async def first_ack() -> list:
        async def send(body: object) -> None:
            pass

        client = AgentUpdateClient(AgentUpdater(fleet.agent_dir, clock=fleet.clock), send,
                                   self_update=SelfUpdate(root), restart=lambda: None)
        await client.on_heartbeat_ack()
        return client.outcomes

    [confirmed] = asyncio.run(first_ack())
    assert confirmed.ok, confirmed.detail
    [line] = audit(fleet)
    assert line["ok"] is True and line["rollout_id"] == "r1" and line["path"] == path
    assert (line["kind"], line["name"], line["version"]) == ("software", "fedge", "2.0.0")
    assert line["sha256"] == signed_sha256(fleet, path)
    assert line["targets_signed_by"] == console_targets_keyids(fleet)
    assert line["targets_version"] == fleet.repo.current_targets().signed.version


def test_the_audit_is_rotated_past_its_bound_and_read_across_both_files(
        fleet, monkeypatch):
    """A coordinator decides how often the appliance refuses: the audit must not grow
    without bound. Past AUDIT_ROTATE_BYTES it moves to audit.jsonl.1 (replacing the
    one before) and the reader reads both, oldest first."""
    monkeypatch.setattr(agent_updates, "AUDIT_ROTATE_BYTES", 2000)
    updater = fleet.updater
    for n in range(1, 41):
        updater.record(InstallOutcome("model", "risk", str(n), False, False, "x" * 100))
    updates = fleet.agent_dir / "updates"
    assert sorted(p.name for p in updates.glob("audit.jsonl*")) == [
        "audit.jsonl", "audit.jsonl.1"]
    assert all(p.stat().st_size < 2000 + 1000 for p in updates.glob("audit.jsonl*"))
    versions = [int(str(r["version"])) for r in updater.audit_log()]
    assert versions[-1] == 40 and versions == list(range(versions[0], 41))
    assert 40 > len(versions) >= 2000 // 400  # the oldest went; a file's worth stays


def test_an_audit_line_from_before_these_fields_is_still_read(fleet):
    audit_file = fleet.agent_dir / "updates" / "audit.jsonl"
    audit_file.parent.mkdir(parents=True)
    old = {"time": "2026-01-01T00:00:00+00:00", "kind": "model", "name": "risk",
           "version": "1", "ok": True, "rolled_back": False, "detail": "installed"}
    audit_file.write_text(json.dumps(old) + "\n")
    fleet.updater.record(InstallOutcome("model", "risk", "2", True, False, "installed"),
                         rollout_id="r2")
    first, second = fleet.updater.audit_log()
    assert {k: first[k] for k in old} == old
    assert first["rollout_id"] is None and first["targets_signed_by"] is None
    assert second["rollout_id"] == "r2" and second["version"] == "2"


@pytest.mark.parametrize("detail_len", [50_000])
def test_a_long_detail_is_cut_so_a_line_stays_small(fleet, detail_len):
    """A detail can quote what the coordinator sent (an error string up to a message's
    size): each line stays small whatever it says."""
    fleet.updater.record(InstallOutcome("model", "risk", "1", False, False,
                                        "y" * detail_len))
    [line] = audit(fleet)
    assert len(line["detail"]) == agent_updates.AUDIT_DETAIL_MAX
