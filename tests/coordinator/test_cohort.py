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


def test_a_secure_job_leaves_out_sites_speaking_another_secure_aggregation_protocol(tmp_path):
    """Sites whose masks are keyed another way (an appliance not yet updated) would
    turn every secure round into 'tampered' aborts; they are named and left out."""
    from fedge.coordinator.rounds import SECAGG_PROTOCOL
    from fedge.wire import codec
    from fedge.wire import messages as m

    store = Store(tmp_path)
    for i, site in enumerate(["new", "old"]):
        store.enrol(site, f"{i:040d}", ED, actor="t")
        store.record_heartbeat(site, version="0.1.0", health={}, eligible=True, reason="",
                               datasets=["brca"], current_task="")
    # an agent from before the field existed sends none: it speaks protocol 1
    frames = codec.encode(m.Heartbeat("old", "0.1.0", "{}", True, "", ["brca"], ""),
                          sender="old")
    assert codec.decode(frames, max_bytes=1 << 20).body.secagg_protocol == 1
    protocols = {"new": SECAGG_PROTOCOL, "old": 1}
    sel = select_cohort(store.appliances(), connected={"new", "old"}, dataset="brca",
                        protocols=protocols, secure_protocol=SECAGG_PROTOCOL)
    assert sel.candidates == ["new"]
    assert sel.excluded == {"old": f"speaks secure-aggregation protocol 1, this coordinator "
                                   f"{SECAGG_PROTOCOL}: update the appliance"}
    plain = select_cohort(store.appliances(), connected={"new", "old"}, dataset="brca",
                          protocols=protocols, secure_protocol=None)
    assert plain.candidates == ["new", "old"]  # a plain job needs no common key derivation


def test_a_connected_site_not_heard_from_by_heartbeat_yet_waits_for_one(tmp_path):
    """Its protocol (None) is unknown, and so is what it declares now: for a secure or a
    plain job it is left out as waiting, with no advice to update it."""
    from fedge.coordinator.cohort import WAITING_FOR_HEARTBEAT
    from fedge.coordinator.rounds import SECAGG_PROTOCOL

    store = Store(tmp_path)
    for i, site in enumerate(["beat", "quiet"]):
        store.enrol(site, f"{i:040d}", ED, actor="t")
        store.record_heartbeat(site, version="0.1.0", health={}, eligible=True, reason="",
                               datasets=["brca"], current_task="")
    protocols = {"beat": SECAGG_PROTOCOL, "quiet": None}
    for secure in (SECAGG_PROTOCOL, None):
        sel = select_cohort(store.appliances(), connected={"beat", "quiet"}, dataset="brca",
                            protocols=protocols, secure_protocol=secure)
        assert sel.candidates == ["beat"]
        assert sel.excluded == {"quiet": WAITING_FOR_HEARTBEAT}


def test_a_dp_job_leaves_out_sites_before_fedge_0_2_which_report_a_lower_epsilon(tmp_path):
    """Agents before 0.2 report ε for adding or removing one record (RDP), below today's
    replace-one figure: a DP job gives them no seat; any other job does. The version
    heard on this connection wins over the registry's."""
    from fedge.coordinator.cohort import OLD_EPSILON_ACCOUNTING

    store = Store(tmp_path)
    for i, (site, version) in enumerate([("new", "0.2.0"), ("newer", "0.2.3+dev1"),
                                         ("old", "0.1.9"), ("updated", "0.1.0"),
                                         ("unread", "")]):
        store.enrol(site, f"{i:040d}", ED, actor="t")
        store.record_heartbeat(site, version=version, health={}, eligible=True, reason="",
                               datasets=["brca"], current_task="")
    everyone = {"new", "newer", "old", "updated", "unread"}
    versions = {"updated": "0.2.0"}  # its heartbeat since the registry's was written
    dp = select_cohort(store.appliances(), connected=everyone, dataset="brca", dp=True,
                       versions=versions)
    assert dp.candidates == ["new", "newer", "updated"]
    assert dp.excluded == {"old": OLD_EPSILON_ACCOUNTING, "unread": OLD_EPSILON_ACCOUNTING}
    assert OLD_EPSILON_ACCOUNTING == (
        "reports epsilon under the accounting of fedge <0.2 (add-or-remove, lower than "
        "today's replace-one): update the appliance")
    plain = select_cohort(store.appliances(), connected=everyone, dataset="brca",
                          versions=versions)
    assert plain.candidates == sorted(everyone)


def test_a_scaffold_job_leaves_out_sites_before_fedge_0_2_which_move_c_i_their_own_way(
        tmp_path):
    """Agents before 0.2 drop the ControlCommit and move c_i at the EvalTask: their
    c_i would drift from the server's c, so a SCAFFOLD job gives them no seat."""
    from fedge.coordinator.cohort import OLD_CONTROL_RULE

    store = Store(tmp_path)
    for i, (site, version) in enumerate([("new", "0.2.0"), ("old", "0.1.9")]):
        store.enrol(site, f"{i:040d}", ED, actor="t")
        store.record_heartbeat(site, version=version, health={}, eligible=True, reason="",
                               datasets=["brca"], current_task="")
    scaffold = select_cohort(store.appliances(), connected={"new", "old"}, dataset="brca",
                             scaffold=True)
    assert scaffold.candidates == ["new"] and scaffold.excluded == {"old": OLD_CONTROL_RULE}
    assert "update the appliance" in OLD_CONTROL_RULE
    fedavg = select_cohort(store.appliances(), connected={"new", "old"}, dataset="brca")
    assert fedavg.candidates == ["new", "old"]


def test_the_sites_a_cohort_left_out_are_the_excluded_enrolled_ones_and_those_a_pinned_retry_did_not_take():  # noqa: E501
    from fedge.coordinator.cohort import PINNED_OUT, Selection

    sel = Selection(["a", "b", "c"], {"d": "not connected", "e": "status revoked"},
                    enrolled=4, inactive=frozenset({"e"}))
    assert sel.left_out(["a", "b", "c"]) == {"d": "not connected"}
    assert sel.left_out(["a", "b"]) == {"d": "not connected", "c": PINNED_OUT}
