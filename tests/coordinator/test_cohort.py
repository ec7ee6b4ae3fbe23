"""Cohort selection: enrolled, connected, eligible, holds the data set, not busy."""

from __future__ import annotations

from fedge.coordinator.cohort import select_cohort
from fedge.coordinator.store import Store

ED = bytes(32)


def test_every_exclusion_has_its_reason(tmp_path):
    store = Store(tmp_path)
    for i, site in enumerate(["ok", "revoked", "offline", "hot", "nodata", "busy"]):
        store.enrol(site, f"{i:040d}", ED, actor="t")
        store.record_heartbeat(site, version="0.1.0", health={}, eligible=site != "hot",
                               reason="GPU at 91 C" if site == "hot" else "",
                               datasets=["other"] if site == "nodata" else ["brca"],
                               current_task="")
    store.revoke("revoked", actor="t")
    sel = select_cohort(store.appliances(), connected={"ok", "revoked", "hot", "nodata", "busy"},
                        dataset="brca", busy={"busy"})
    assert sel.candidates == ["ok"]
    assert sel.excluded == {
        "revoked": "status revoked",
        "offline": "not connected",
        "hot": "not eligible: GPU at 91 C",
        "nodata": "does not hold data set 'brca'",
        "busy": "busy with another task",
    }
