"""Identities, the console-signed roster, and key derivations bound to their context."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest

from fedge.secagg import Identity, Roster, RosterSignatureError, SecAggConfigError, keys

D1 = hashlib.sha256(b"model-1").digest()
D2 = hashlib.sha256(b"model-2").digest()


def test_identity_round_trips_through_a_private_file(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "identity.key"
    ident.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Identity.load(path)
    assert loaded.public_bytes() == ident.public_bytes()
    assert keys.verify_signature(ident.public_bytes(), loaded.sign(b"hello"), b"hello")


def test_identity_file_of_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.key"
    path.write_bytes(b"short")
    with pytest.raises(SecAggConfigError, match="holds 5 bytes, expected 32"):
        Identity.load(path)


def _roster() -> tuple[Identity, Roster, dict[str, bytes]]:
    console = Identity.generate()
    entries = {f"site-{i}": Identity.generate().public_bytes() for i in range(3)}
    return console, Roster.build(entries, console), entries


def test_roster_verifies_under_the_console_key() -> None:
    console, roster, entries = _roster()
    again = Roster.from_bytes(roster.to_bytes(), console.public_bytes())
    assert dict(again.entries) == entries
    assert "site-1" in again and "mallory" not in again


def test_roster_signed_by_another_key_is_refused() -> None:
    _, roster, _ = _roster()
    with pytest.raises(RosterSignatureError, match="does not verify"):
        Roster.from_bytes(roster.to_bytes(), Identity.generate().public_bytes())


def test_roster_with_an_added_sybil_is_refused() -> None:
    console, roster, _ = _roster()
    outer = json.loads(roster.to_bytes())
    body = json.loads(outer["body"])
    body["entries"]["mallory"] = Identity.generate().public_bytes().hex()
    outer["body"] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    with pytest.raises(RosterSignatureError, match="does not verify"):
        Roster.from_bytes(json.dumps(outer).encode(), console.public_bytes())


def test_malformed_roster_is_refused() -> None:
    console, _, _ = _roster()
    with pytest.raises(RosterSignatureError, match="malformed"):
        Roster.from_bytes(b"{not json", console.public_bytes())
    with pytest.raises(RosterSignatureError, match="malformed"):  # past json's depth
        Roster.from_bytes(b"[" * 100_000, console.public_bytes())


def test_roster_refuses_bad_entries() -> None:
    with pytest.raises(SecAggConfigError, match="must be 32 bytes"):
        Roster.build({"site-1": b"x"}, Identity.generate())
    with pytest.raises(SecAggConfigError, match="not a client id"):
        Roster.build({"": bytes(32)}, Identity.generate())


def test_roster_serial_is_signed_and_a_roster_without_one_reads_as_serial_0() -> None:
    console, legacy, entries = _roster()
    assert json.loads(json.loads(legacy.to_bytes())["body"]) == {
        "entries": {k: v.hex() for k, v in sorted(entries.items())}, "version": 1}
    assert Roster.from_bytes(legacy.to_bytes(), console.public_bytes()).serial == 0
    newer = Roster.build(entries, console, serial=7)
    again = Roster.from_bytes(newer.to_bytes(), console.public_bytes())
    assert again.serial == 7 and dict(again.entries) == entries
    # a replayed old roster cannot be dressed up as a newer one: the serial is signed
    outer = json.loads(newer.to_bytes())
    body = json.loads(outer["body"])
    body["serial"] = 8
    outer["body"] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    with pytest.raises(RosterSignatureError, match="does not verify"):
        Roster.from_bytes(json.dumps(outer).encode(), console.public_bytes())
    with pytest.raises(SecAggConfigError, match="serial -1"):
        Roster.build(entries, console, serial=-1)


def _seed(a: keys.RoundKeys, b: keys.RoundKeys, me: str, peer: str, **kw: object) -> bytes:
    ctx: dict[str, object] = {"job_id": "job", "round_": 1, "model_digest": D1}
    ctx.update(kw)
    return keys.pairwise_mask_seed(
        a.mask_private, b.mask_public, me=me, peer=peer, **ctx  # type: ignore[arg-type]
    )


def test_pairwise_seed_is_symmetric_between_the_pair() -> None:
    a, b = keys.RoundKeys(), keys.RoundKeys()
    assert _seed(a, b, "alice", "bob") == _seed(b, a, "bob", "alice")
    assert len(_seed(a, b, "alice", "bob")) == 16


@pytest.mark.parametrize(
    "change",
    [{"model_digest": D2}, {"round_": 2}, {"job_id": "other-job"}],
)
def test_pairwise_seed_is_bound_to_job_round_and_model(change: dict[str, object]) -> None:
    a, b = keys.RoundKeys(), keys.RoundKeys()
    assert _seed(a, b, "alice", "bob") != _seed(a, b, "alice", "bob", **change)


def test_pairwise_seed_is_bound_to_both_client_ids() -> None:
    a, b = keys.RoundKeys(), keys.RoundKeys()
    assert _seed(a, b, "alice", "bob") != _seed(a, b, "alice", "carol")


def test_share_key_is_symmetric_and_bound_to_the_model() -> None:
    a, b = keys.RoundKeys(), keys.RoundKeys()
    kw = {"job_id": "j", "round_": 0, "model_digest": D1}
    k_ab = keys.share_encryption_key(a.enc_private, b.enc_public, me="a", peer="b", **kw)
    k_ba = keys.share_encryption_key(b.enc_private, a.enc_public, me="b", peer="a", **kw)
    assert k_ab == k_ba and len(k_ab) == 32
    kw["model_digest"] = D2
    assert keys.share_encryption_key(a.enc_private, b.enc_public, me="a", peer="b", **kw) != k_ab
