"""The coordinator's registry takes the console's site-name rule (`check_client_id`)
and refuses a site id that differs from an enrolled one only in case."""

from __future__ import annotations

import pytest

from fedge.coordinator.store import Store, StoreError

ED = bytes(range(32))


@pytest.mark.parametrize("site", ["caf\u00e9", "h\u0663", "-x", "_x", "a" * 129, "a:b@c",
                                  "hospital-a\n", ".", ".."])
def test_enrol_refuses_a_site_id_outside_the_console_rule(tmp_path, site):
    store = Store(tmp_path)
    with pytest.raises(StoreError, match=r"not a client id \(1-128 ASCII letters"):
        store.enrol(site, "A" * 40, ED, actor="a")
    assert store.appliances() == []


def test_enrol_refuses_a_site_id_differing_from_an_enrolled_one_only_in_case(tmp_path):
    store = Store(tmp_path)
    store.enrol("hospital-a", "A" * 40, ED, actor="a")
    with pytest.raises(StoreError, match="'Hospital-A' differs from the enrolled site "
                                         "'hospital-a' only in case"):
        store.enrol("Hospital-A", "B" * 40, ED, actor="a")
    assert [a.site_id for a in store.appliances()] == ["hospital-a"]
    store.enrol("hospital-a", "A" * 40, ED, actor="a")  # the same name re-enrols (same key)
    store.revoke("hospital-a", actor="a")
    store.enrol("Hospital-A", "B" * 40, ED, actor="a")  # a rename after a revoke
    assert {a.site_id: a.status for a in store.appliances()} == {
        "hospital-a": "revoked", "Hospital-A": "enrolled"}
