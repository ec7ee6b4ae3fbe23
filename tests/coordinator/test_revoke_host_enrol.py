"""The host command `fedge coordinator enrol` keeps the rule the admin channel has: a
site revoked with a CURVE key does not come back with that key (audit s14 L6). The
rule is in Store.enrol, so every path to the registry has it. Real process, real
SQLite."""

from __future__ import annotations

from fedge.coordinator.store import Store
from fedge.secagg.keys import Identity
from fedge.transport import CurveKeyPair
from tests.coordinator.test_cli_one_per_state_dir import config, fedge


def test_the_host_enrol_command_refuses_a_revoked_key_and_takes_a_new_one(tmp_path):
    state = tmp_path / "state"
    cfg = config(tmp_path, "c", state)
    stolen, fresh = CurveKeyPair.generate(), CurveKeyPair.generate()
    identity = Identity.generate().public_bytes()
    store = Store(state)
    store.enrol("h2", stolen.public, identity, actor="operator:admin")
    store.revoke("h2", actor="operator:admin")
    store.close()

    out = fedge("coordinator", "enrol", "--config", str(cfg), "--site", "h2",
                "--curve-public", stolen.public, "--ed25519-public", identity.hex())
    assert out.returncode == 2, out
    assert (f"site 'h2' was revoked with this CURVE key ({stolen.public}); a revoked key "
            "cannot be enrolled again") in out.stderr
    store = Store(state)
    a = store.appliance("h2")
    assert (a.status, a.curve_public_z85) == ("revoked", stolen.public)
    assert stolen.public not in store.allowed_keys()
    store.close()

    # a new identity re-enrols the site, as the console's revoke-then-enrol does
    new_identity = Identity.generate().public_bytes()
    out = fedge("coordinator", "enrol", "--config", str(cfg), "--site", "h2",
                "--curve-public", fresh.public, "--ed25519-public", new_identity.hex())
    assert out.returncode == 0, out
    store = Store(state)
    assert store.allowed_keys() == {fresh.public}
    store.close()


def _key_beginning_with_dash() -> CurveKeyPair:
    # about one CURVE key in 85 begins with '-' (a Z85 character); 3,000 tries miss
    # with probability (84/85)**3000, about 1e-16
    for _ in range(3000):
        kp = CurveKeyPair.generate()
        if kp.public.startswith("-"):
            return kp
    raise AssertionError("no key beginning with '-' in 3000 tries")


def test_the_host_enrol_command_takes_a_curve_key_that_begins_with_a_dash(tmp_path):
    # CI found it: argparse read such a key as an option ("--curve-public: expected
    # one argument"), so about one appliance in 85 could not be enrolled this way
    state = tmp_path / "state"
    cfg = config(tmp_path, "c", state)
    key = _key_beginning_with_dash()
    identity = Identity.generate().public_bytes()
    out = fedge("coordinator", "enrol", "--config", str(cfg), "--site", "h3",
                "--curve-public", key.public, "--ed25519-public", identity.hex())
    assert out.returncode == 0, out
    store = Store(state)
    assert store.allowed_keys() == {key.public}
    assert store.appliance("h3").curve_public_z85 == key.public
    store.close()


def test_a_missing_curve_key_is_still_named():
    from fedge.cli import join_key_values

    # only a 40-character value is joined: a forgotten value stays argparse's error
    assert join_key_values(["enrol", "--curve-public", "--site", "h"]) == [
        "enrol", "--curve-public", "--site", "h"]
    key = "-" + "a" * 39
    assert join_key_values(["--curve-public", key, "--site", "h"]) == [
        f"--curve-public={key}", "--site", "h"]


def test_a_key_pasted_with_a_space_is_enrolled_and_an_abbreviated_option_is_refused(
        tmp_path):
    # flaky-review s16 L1: `--curve KEY` (argparse's abbreviation) and ' KEY ' escaped
    # the join, so a key beginning with '-' still failed that way
    state = tmp_path / "state"
    cfg = config(tmp_path, "c", state)
    key = _key_beginning_with_dash()
    identity = Identity.generate().public_bytes()
    out = fedge("coordinator", "enrol", "--config", str(cfg), "--site", "h4",
                "--curve", key.public, "--ed25519-public", identity.hex())
    assert out.returncode == 2 and "--curve" in out.stderr, out
    out = fedge("coordinator", "enrol", "--config", str(cfg), "--site", "h4",
                "--curve-public", f"{key.public} ", "--ed25519-public", identity.hex())
    assert out.returncode == 0, out
    store = Store(state)
    assert store.allowed_keys() == {key.public}
    store.close()
