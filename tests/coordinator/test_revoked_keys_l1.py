"""Every CURVE key a site was revoked with stays out, not only the key its row holds
now (diff review s14 L1): a site revoked with K1 and re-enrolled with K2 does not take
K1 back, through Store.enrol or the host command `fedge coordinator enrol`; and an
enrolled site is not re-keyed without a revoke, as the admin channel already
requires. Real SQLite, a real process for the host command."""

from __future__ import annotations

import sqlite3

import pytest

from fedge.coordinator.store import SCHEMA_VERSION, Store, StoreError
from fedge.secagg.keys import Identity
from fedge.transport import CurveKeyPair
from tests.coordinator.test_cli_one_per_state_dir import config, fedge

ED = bytes(range(32))


def _keys(n):
    return [CurveKeyPair.generate().public for _ in range(n)]


def test_a_key_revoked_before_a_re_enrolment_stays_out(tmp_path):
    k1, k2 = _keys(2)
    store = Store(tmp_path)
    store.enrol("h2", k1, ED, actor="op")
    store.revoke("h2", actor="op")
    store.enrol("h2", k2, ED, actor="op")
    with pytest.raises(StoreError, match=r"site 'h2' was revoked with this CURVE key"):
        store.enrol("h2", k1, ED, actor="host")
    a = store.appliance("h2")
    assert (a.status, a.curve_public_z85) == ("enrolled", k2)
    assert store.allowed_keys() == {k2}
    # nor for another site: a revoked key is a leaked key
    with pytest.raises(StoreError, match=r"this CURVE key was revoked \(site 'h2'\)"):
        store.enrol("h3", k1, ED, actor="host")
    assert [x.site_id for x in store.appliances()] == ["h2"]
    store.close()
    # it is in the database, not in this Store's memory
    again = Store(tmp_path)
    with pytest.raises(StoreError, match="was revoked with this CURVE key"):
        again.enrol("h2", k1, ED, actor="host")
    again.close()


def test_an_enrolled_site_is_not_re_keyed_without_a_revoke(tmp_path):
    k1, k2 = _keys(2)
    store = Store(tmp_path)
    store.enrol("h2", k1, ED, actor="op")
    with pytest.raises(StoreError, match=(
            r"site 'h2' is enrolled with another CURVE key .*; a site is not re-keyed "
            r"while enrolled: revoke it first")):
        store.enrol("h2", k2, ED, actor="host")
    assert store.allowed_keys() == {k1}
    assert [e["action"] for e in store.audit_log()] == ["enrol"]
    store.enrol("h2", k1, bytes(32), actor="op")  # its own key again: allowed
    assert store.allowed_keys() == {k1}


def test_the_host_command_neither_brings_back_an_old_revoked_key_nor_re_keys(tmp_path):
    state = tmp_path / "state"
    cfg = config(tmp_path, "c", state)
    k1, k2, k3 = _keys(3)
    identity = Identity.generate().public_bytes().hex()
    store = Store(state)
    store.enrol("h2", k1, ED, actor="operator:admin")
    store.revoke("h2", actor="operator:admin")
    store.enrol("h2", k2, ED, actor="operator:admin")
    store.close()
    for key, says in ((k1, "was revoked with this CURVE key"),
                      (k3, "is enrolled with another CURVE key")):
        out = fedge("coordinator", "enrol", "--config", str(cfg), "--site", "h2",
                    "--curve-public", key, "--ed25519-public", identity)
        assert out.returncode == 2, out
        assert says in out.stderr
    store = Store(state)
    assert store.allowed_keys() == {k2}
    store.close()


def _downgrade(path, version):
    """Make a database written by this release look like one of schema `version`."""
    conn = sqlite3.connect(path / "coordinator.sqlite3")
    conn.execute("DROP TABLE revoked_keys")
    conn.execute("DROP TABLE ledger_marks")
    if version == 1:
        conn.execute("DROP TABLE unmask_sets")
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
    conn.commit()
    conn.close()


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_database_gains_the_keys_of_the_sites_it_had_revoked(tmp_path, version):
    k1, k2, k3 = _keys(3)
    store = Store(tmp_path)
    store.enrol("gone", k1, ED, actor="op")
    store.enrol("here", k2, ED, actor="op")
    store.revoke("gone", actor="op")
    store.close()
    _downgrade(tmp_path, version)
    again = Store(tmp_path)
    assert again.schema_version() == SCHEMA_VERSION
    rows = again._conn.execute(
        "SELECT curve_public_z85, site_id, revoked_at FROM revoked_keys").fetchall()
    assert rows == [(k1, "gone", None)]
    again.enrol("gone", k3, ED, actor="op")  # the site returns with a new key
    with pytest.raises(StoreError, match="site 'gone' was revoked with this CURVE key"):
        again.enrol("gone", k1, ED, actor="op")  # the migrated key stays out
    again.revoke("gone", actor="op")
    assert {r[0] for r in again._conn.execute(
        "SELECT curve_public_z85 FROM revoked_keys")} == {k1, k3}
    again.close()


@pytest.mark.parametrize("version", [1, 2])
def test_a_key_replaced_before_the_upgrade_stays_out_too(tmp_path, version):
    """A site revoked and enrolled again with a new key under an older schema has only
    the new key in its row: the old one comes from the audit log's enrol rows."""
    old, new, other = _keys(3)
    store = Store(tmp_path)
    store.enrol("h2", old, ED, actor="op")
    store.enrol("h3", other, ED, actor="op")
    store.revoke("h2", actor="op")
    store.enrol("h2", new, ED, actor="op")
    store.close()
    _downgrade(tmp_path, version)  # as if all this happened before revoked_keys
    again = Store(tmp_path)
    rows = again._conn.execute(
        "SELECT curve_public_z85, site_id FROM revoked_keys").fetchall()
    assert rows == [(old, "h2")]  # not h2's key now, nor h3's
    again.revoke("h2", actor="op")
    with pytest.raises(StoreError, match="site 'h2' was revoked with this CURVE key"):
        again.enrol("h2", old, ED, actor="op")
    again.enrol("h3", other, ED, actor="op")  # an enrolled site's own key is not revoked
    again.close()
