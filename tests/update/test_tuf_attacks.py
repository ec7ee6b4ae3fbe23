"""Each attack TUF defends against, through the agent's real fetcher and python-tuf.

The coordinator relays metadata it cannot forge (root and targets are signed
offline by the console); these tests play a hostile or broken coordinator by
editing its storage or standing between it and the agent.
"""

import shutil
from datetime import timedelta

import pytest
from tuf.api import exceptions as tuf_exc

from fedge.coordinator.updates import UpdateRepositoryError
from fedge.update import tuf_repo
from fedge.update.messages import UpdateFetchReply


def _meta(fleet, name):
    return fleet.repo.root_dir / "metadata" / name


def test_verified_update_is_listed_downloaded_and_served(make_onnx, fleet, tmp_path):
    from fedge.serve.repository import ModelRepository

    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(2.0))
    [spec] = fleet.updater.pending()
    assert (spec.kind, spec.name, spec.version) == ("model", "risk", "1")
    models = ModelRepository(tmp_path / "models")
    outcome = fleet.updater.install(spec, models=models)
    assert outcome.ok, outcome.detail
    assert models.versions("risk") == [1]
    assert models.path("risk", 1).read_bytes() == make_onnx(2.0)
    assert fleet.updater.pending() == []  # installed: nothing newer
    assert fleet.updater.audit_log()[-1]["ok"] is True


def test_rollback_attack_older_timestamp_is_refused(make_onnx, fleet):
    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    old_ts = _meta(fleet, "timestamp.json").read_bytes()
    old_snap = {p.name: p.read_bytes() for p in _meta(fleet, "").glob("*.snapshot.json")}
    fleet.publish("model", "risk", "2", "model.onnx", make_onnx(2.0))
    assert {s.version for s in fleet.updater.pending()} == {"2"}  # agent has seen v2
    # the coordinator replays yesterday's metadata to hide version 2
    _meta(fleet, "timestamp.json").write_bytes(old_ts)
    for name, data in old_snap.items():
        _meta(fleet, name).write_bytes(data)
    with pytest.raises(tuf_exc.BadVersionNumberError):
        fleet.updater.refresh()


def test_freeze_attack_expired_timestamp_is_refused(make_onnx, fleet):
    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    fleet.updater.refresh()
    # the coordinator stops re-signing: two days later its timestamp has expired
    fleet.clock.now += timedelta(days=2)
    with pytest.raises(tuf_exc.ExpiredMetadataError, match="timestamp"):
        fleet.updater.refresh()
    # an honest coordinator re-signs, and the agent accepts again
    assert fleet.repo.refresh_timestamp()
    assert [s.version for s in fleet.updater.refresh()] == ["1"]


def test_root_near_its_expiry_is_renewed_by_a_push_and_updates_go_on_after_a_year(
        make_onnx, fleet):
    """Root expires a year after `console init`; the console renews it (root v2, the
    same keys) on a push within 30 days of that, and appliances follow it."""
    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    assert [s.version for s in fleet.updater.refresh()] == ["1"]
    v1_expires = fleet.console.root_expires()
    fleet.clock.now += timedelta(days=300)
    assert fleet.console.renewed_root() is None  # two months left: nothing to do
    fleet.clock.now += timedelta(days=40)
    root = fleet.console.renewed_root()
    assert root is not None and fleet.console.renewed_root() == root  # same bytes again
    targets, files = fleet.console.sign_targets([("model", "risk", "2", "model.onnx",
                                                  make_onnx(2.0))])
    fleet.repo.publish(targets, files, root=root)
    # the console died before storing root v2: the next push sends the same document,
    # which the coordinator recognises as the root it holds
    targets, files = fleet.console.sign_targets([("model", "risk", "3", "model.onnx",
                                                  make_onnx(3.0))])
    fleet.repo.publish(targets, files, root=fleet.console.renewed_root())
    fleet.console.save_root(root)
    assert fleet.repo.versions["root"] == 2 and fleet.console.state["root_version"] == 2
    assert fleet.console.root_expires() == v1_expires + timedelta(days=365)
    assert fleet.console.renewed_root() is None
    fleet.clock.now += timedelta(days=30)  # past root v1's expiry
    fleet.repo.refresh_timestamp()
    assert [s.version for s in fleet.updater.refresh()] == ["3"]  # the newest of risk


def test_coordinator_refuses_to_publish_under_an_expired_root_naming_the_date(make_onnx,
                                                                              fleet):
    fleet.clock.now += timedelta(days=366)
    targets, files = fleet.console.sign_targets([("model", "risk", "1", "model.onnx",
                                                  make_onnx(1.0))])
    with pytest.raises(UpdateRepositoryError,
                       match=r"root metadata v1 expired at 2027-11-01T12:00:00\+00:00.*"
                             r"fedge console push"):
        fleet.repo.publish(targets, files)
    assert fleet.repo.versions["targets"] == 1
    # a renewed root in the same push is taken, and the fleet follows it
    fleet.repo.publish(targets, files, root=fleet.console.renewed_root())
    assert [s.version for s in fleet.updater.refresh()] == ["1"]


def test_mix_and_match_old_targets_under_new_snapshot_is_refused(make_onnx, fleet):
    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    fleet.publish("model", "risk", "2", "model.onnx", make_onnx(2.0))
    v = fleet.repo.versions["targets"]
    # serve the older targets file where the snapshot says the newer one is
    shutil.copy(_meta(fleet, f"{v - 1}.targets.json"), _meta(fleet, f"{v}.targets.json"))
    with pytest.raises(tuf_exc.RepositoryError):
        fleet.updater.refresh()


def test_tampered_target_is_refused_and_not_installed(make_onnx, fleet, tmp_path):
    from fedge.serve.repository import ModelRepository

    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    [spec] = fleet.updater.pending()
    stored = fleet.repo.root_dir / "targets" / "model/risk/1" / f"{spec.sha256}.model.onnx"
    stored.write_bytes(make_onnx(666.0))  # same length, other content
    with pytest.raises(tuf_exc.LengthOrHashMismatchError):
        fleet.updater.download(spec)
    models = ModelRepository(tmp_path / "models")
    outcome = fleet.updater.install(spec, models=models)
    assert not outcome.ok and "LengthOrHashMismatch" in outcome.detail
    assert models.versions("risk") == []
    assert fleet.updater.installed() == {}


def test_wrong_key_targets_signed_by_coordinator_key_are_refused(make_onnx, fleet):
    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    # a compromised coordinator signs targets with the key it holds (snapshot)
    evil = fleet.console.tuf_key("snapshot")
    data = make_onnx(9.0)
    tf = tuf_repo.new_target_file("model", "risk", "9", "model.onnx", data)
    forged = tuf_repo.to_bytes(tuf_repo.create_targets(
        evil, {tf.path: tf}, version=fleet.repo.versions["targets"] + 1, now=fleet.clock()))
    # its own publish path refuses ...
    with pytest.raises(UpdateRepositoryError, match="not signed by the targets key"):
        fleet.repo.publish(forged, {tf.path: data})
    # ... so it writes the files and re-signs snapshot/timestamp by hand
    v = fleet.repo.versions["targets"] + 1
    _meta(fleet, f"{v}.targets.json").write_bytes(forged)
    fleet.repo._v.targets = v
    fleet.repo._v = fleet.repo._sign_online(fleet.repo.root_dir, fleet.repo._snapshot_key,
                                            fleet.repo._timestamp_key, fleet.repo._v,
                                            fleet.clock())
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        fleet.updater.refresh()


def test_endless_data_is_cut_at_the_length_bound(fleet):
    fleet.updater.refresh()

    def endless(req):  # never says eof
        return UpdateFetchReply(req.path, req.offset, b"\0" * req.length, False, "")

    fleet.roundtrip = endless
    fleet.requests = 0
    with pytest.raises(tuf_exc.DownloadLengthMismatchError, match="512000"):
        fleet.updater.refresh()
    # the first file asked for is the next root (bound 512000 bytes, 4 KiB chunks):
    # the agent stopped reading right after the bound, not at the attacker's leisure
    assert fleet.requests == 512000 // 4096 + 1


def test_reply_larger_than_requested_chunk_is_refused(fleet):
    def greedy(req):
        return UpdateFetchReply(req.path, req.offset, b"{" * (req.length + 1), True, "")

    fleet.roundtrip = greedy
    with pytest.raises(tuf_exc.DownloadError, match="more than the 4096 asked for"):
        fleet.updater.refresh()


def test_coordinator_refuses_targets_rollback_and_missing_files(fleet):
    t1, f1 = fleet.console.sign_targets([("model", "m", "1", "model.onnx", b"a")])
    t2, f2 = fleet.console.sign_targets([("model", "m", "2", "model.onnx", b"b")])
    fleet.repo.publish(t2, {**f1, **f2})
    with pytest.raises(UpdateRepositoryError, match="rollback refused"):
        fleet.repo.publish(t1, f1)
    t3, _ = fleet.console.sign_targets([("app", "cox", "1", "app.tar.gz", b"c")])
    with pytest.raises(UpdateRepositoryError, match="file was not supplied"):
        fleet.repo.publish(t3, {})


def test_a_corrupted_stored_target_is_repaired_by_pushing_it_again(make_onnx, fleet, caplog):
    import logging

    from fedge.agent.updates import AgentUpdater

    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    tf, = fleet.repo.current_targets().signed.targets.values()
    stored = fleet.repo.root_dir / "targets" / tuf_repo.hashed_path(tf)
    stored.write_bytes(b"\0" * tf.length)  # bit rot, same length
    [spec] = fleet.updater.pending()
    with pytest.raises(tuf_exc.LengthOrHashMismatchError):
        fleet.updater.download(spec)
    # another push that does not carry it: accepted, the corrupt copy is named
    with caplog.at_level(logging.ERROR, logger="fedge.coordinator.updates"):
        fleet.publish("model", "other", "1", "model.onnx", make_onnx(2.0))
    assert f"stored target {tf.path} does not match" in caplog.text
    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))  # pushed again
    assert stored.read_bytes() == make_onnx(1.0)
    fresh = AgentUpdater(fleet.agent_dir, fleet.fetcher, clock=fleet.clock)
    spec = next(s for s in fresh.pending() if s.name == "risk")
    assert fresh.download(spec).read_bytes() == make_onnx(1.0)


@pytest.mark.parametrize(
    ("path", "error"),
    [("../../etc/passwd", "bad_request"), ("metadata/../state.json", "bad_request"),
     ("keys/snapshot.pem", "bad_request"), ("metadata/99.root.json", "not_found")],
)
def test_fetch_handler_refuses_paths_outside_the_repository(fleet, path, error):
    from fedge.update.messages import UpdateFetchRequest

    reply = fleet.repo.handle_fetch(UpdateFetchRequest(path, 0, 100))
    assert reply.error.startswith(error) and reply.data == b""


@pytest.mark.parametrize(
    ("path", "offset", "length", "why"),
    [("metadata/x\x00y", 0, 10, "no NUL"),
     ("metadata/1.root.json", 2**63, 10, "offset 9223372036854775808 must be"),
     ("metadata/1.root.json", 0, 2**63, "length 9223372036854775808"),
     ("metadata/" + "a" * 300, 0, 10, "File name too long"),
     ("targets/" + "a/" * 600 + "b", 0, 10, "at most 1024 characters")],
)
def test_fetch_handler_answers_hostile_requests_with_a_bad_request(fleet, path, offset, length,
                                                                   why):
    """The relay's docstring promise: it never raises; the reply names what was wrong."""
    from fedge.update.messages import UpdateFetchRequest

    reply = fleet.repo.handle_fetch(UpdateFetchRequest(path, offset, length))
    assert reply.error.startswith("bad_request: ") and why in reply.error
    assert reply.data == b"" and reply.eof
    good = fleet.repo.handle_fetch(UpdateFetchRequest("metadata/1.root.json", 0, 10))
    assert good.error == "" and len(good.data) == 10  # the relay still answers


def _tar(files: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_app_target_installs_model_code_and_default_plan(fleet):
    app = _tar({"model.py": b"def build(): ...\n", "plan.toml": b"[job]\nrounds = 3\n"})
    fleet.publish("app", "cox", "1.0", "cox-app.tar.gz", app)
    [spec] = fleet.updater.pending()
    outcome = fleet.updater.install(spec)
    assert outcome.ok, outcome.detail
    current = fleet.agent_dir / "apps" / "cox" / "current"
    assert (current / "plan.toml").read_text() == "[job]\nrounds = 3\n"
    fleet.publish("app", "cox", "1.1", "cox-app.tar.gz",
                  _tar({"../../evil.py": b"x", "plan.toml": b""}))
    [spec] = fleet.updater.pending()
    bad = fleet.updater.install(spec)
    assert not bad.ok and "bad archive" in bad.detail
    assert (current / "plan.toml").read_text() == "[job]\nrounds = 3\n"  # still 1.0
    assert fleet.updater.installed() == {"app/cox": "1.0"}


def test_wrong_kind_arguments_are_refused_up_front(fleet):
    fleet.publish("model", "risk", "1", "model.onnx", b"x")
    [spec] = fleet.updater.pending()
    with pytest.raises(ValueError, match="needs a model repository"):
        fleet.updater.install(spec)


def test_wrong_key_root_rotation_not_signed_by_the_old_root_is_refused(fleet):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    fleet.updater.refresh()
    # the coordinator tries to rotate trust to keys it controls
    evil = Ed25519PrivateKey.generate()
    root2 = tuf_repo.create_root(evil, evil, evil, evil, now=fleet.clock(), version=2)
    _meta(fleet, "2.root.json").write_bytes(tuf_repo.to_bytes(root2))
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        fleet.updater.refresh()
    assert not (fleet.agent_dir / "tuf" / "metadata" / "root_history" / "2.root.json").exists()


def test_online_key_rotation_is_followed_and_the_old_key_is_then_refused(fleet, make_onnx):
    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    fleet.updater.refresh()
    old_timestamp_key = fleet.console.tuf_key("timestamp")
    root2, snap_pem, ts_pem = fleet.console.rotate_online_keys()
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    fleet.repo.rotate_online_keys(root2, load_pem_private_key(snap_pem, None),
                                  load_pem_private_key(ts_pem, None))
    assert [s.version for s in fleet.updater.refresh()] == ["1"]  # follows root v2
    assert (fleet.agent_dir / "tuf" / "metadata" / "root_history" / "2.root.json").exists()
    # whoever still holds the old (exposed) timestamp key can no longer sign for anyone
    snap = _meta(fleet, f"{fleet.repo.versions['snapshot']}.snapshot.json").read_bytes()
    stale = tuf_repo.create_timestamp(old_timestamp_key, snap,
                                      snapshot_version=fleet.repo.versions["snapshot"],
                                      version=fleet.repo.versions["timestamp"] + 1,
                                      now=fleet.clock())
    _meta(fleet, "timestamp.json").write_bytes(tuf_repo.to_bytes(stale))
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        fleet.updater.refresh()


def test_rotation_not_signed_by_the_current_root_is_refused_by_the_coordinator(fleet):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    evil = Ed25519PrivateKey.generate()
    forged = tuf_repo.to_bytes(tuf_repo.create_root(evil, evil, evil, evil, now=fleet.clock(),
                                                    version=2))
    with pytest.raises(UpdateRepositoryError, match="not signed by the root key"):
        fleet.repo.rotate_online_keys(forged, evil, evil)
    assert fleet.repo.versions["root"] == 1


def _forge_targets(fleet, key, data):
    """Targets v+1 listing a bad model, signed with `key`, written into the relay and
    vouched for by snapshot/timestamp (a compromised coordinator holds those keys)."""
    tf = tuf_repo.new_target_file("model", "risk", "9", "model.onnx", data)
    v = fleet.repo.versions["targets"] + 1
    forged = tuf_repo.to_bytes(tuf_repo.create_targets(key, {tf.path: tf}, version=v,
                                                       now=fleet.clock()))
    with pytest.raises(UpdateRepositoryError, match="not signed by the targets key"):
        fleet.repo.publish(forged, {tf.path: data})
    _meta(fleet, f"{v}.targets.json").write_bytes(forged)
    fleet.repo._v.targets = v
    fleet.repo._v = fleet.repo._sign_online(fleet.repo.root_dir, fleet.repo._snapshot_key,
                                            fleet.repo._timestamp_key, fleet.repo._v,
                                            fleet.clock())


@pytest.mark.parametrize("roles", [["targets"], ["root", "targets"]])
def test_offline_key_rotation_is_followed_and_the_retired_keys_are_refused(
        fleet, make_onnx, roles):
    """The console's targets (and root) key was exposed: after the rotation every
    appliance follows root v2, installs what the new key signs, and refuses what the
    retired key signs, even relayed by a coordinator that re-signs snapshot/timestamp."""
    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    fleet.updater.refresh()
    retired = {r: fleet.console.tuf_key(r) for r in ("root", "targets")}
    root2, targets2, pems = fleet.console.rotate_offline_keys(roles)
    assert sorted(pems) == roles
    fleet.repo.publish(targets2, {}, root=root2)
    fleet.publish("model", "risk", "2", "model.onnx", make_onnx(2.0))
    assert [s.version for s in fleet.updater.refresh()] == ["2"]  # the newest of risk
    assert (fleet.agent_dir / "tuf" / "metadata" / "root_history" / "2.root.json").exists()
    assert tuf_repo.load(fleet.console.root_bytes(), "root").signed.version == 2  # enrolments
    # the stolen targets key cannot list a model any more
    _forge_targets(fleet, retired["targets"], make_onnx(9.0))
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        fleet.updater.refresh()
    if "root" in roles:  # nor can the stolen root key move trust to its own keys
        root3 = tuf_repo.create_root(retired["root"], retired["targets"], retired["root"],
                                     retired["root"], now=fleet.clock(), version=3)
        root3.sign(tuf_repo.signer(retired["root"]), append=True)
        _meta(fleet, "3.root.json").write_bytes(tuf_repo.to_bytes(root3))
        with pytest.raises(tuf_exc.UnsignedMetadataError):
            fleet.updater.refresh()
        assert not (fleet.agent_dir / "tuf" / "metadata" / "root_history" /
                    "3.root.json").exists()


def test_a_root_rotation_without_the_old_root_signature_is_refused(fleet):
    from fedge.console.store import ConsoleError

    with pytest.raises(ConsoleError, match="among root, targets; got \\['snapshot'\\]"):
        fleet.console.rotate_offline_keys(["snapshot"])
    with pytest.raises(ConsoleError, match="got none"):
        fleet.console.rotate_offline_keys([])
    root2, targets2, _ = fleet.console.rotate_offline_keys(["root"], persist=False)
    # strip the old root's signature: the new key alone cannot vouch for itself
    md = tuf_repo.load(root2, "root")
    new_keyid = md.signed.roles["root"].keyids[0]
    md.signatures = {k: v for k, v in md.signatures.items() if k == new_keyid}
    with pytest.raises(UpdateRepositoryError, match="not signed by the root key"):
        fleet.repo.publish(targets2, {}, root=tuf_repo.to_bytes(md))
    assert fleet.repo.versions["root"] == 1
    assert tuf_repo.load(fleet.console.root_bytes(), "root").signed.version == 1  # not kept


def test_a_rotation_sent_again_is_taken_once_and_another_of_the_same_version_refused(fleet):
    """A console that lost the reply sends the same root and targets again: answered as
    done, nothing re-signed. A different root of the version now in force is refused."""
    root2, targets2, _ = fleet.console.rotate_offline_keys(["targets"], persist=False)
    fleet.repo.publish(targets2, {}, root=root2)
    before = fleet.repo.versions
    fleet.repo.publish(targets2, {}, root=root2)
    assert fleet.repo.versions == before
    other_root, other_targets, _ = fleet.console.rotate_offline_keys(["targets"],
                                                                     persist=False)
    with pytest.raises(UpdateRepositoryError, match="root version 2 must be 3"):
        fleet.repo.publish(other_targets, {}, root=other_root)
    assert fleet.repo.versions == before
