"""The fleet table's health summary and columns."""

from fedge.console.fleet import fleet_rows, format_table, health_summary


def test_health_summary_reads_gpus_disk_and_xids():
    report = {"gpus": [{"temperature_c": 61.0}, {"temperature_c": 74.4}],
              "host": {"disk_total_bytes": 1000, "disk_free_bytes": 250},
              "xid_events": [{"xid": 79}]}
    assert health_summary(report) == "2 GPU max 74C, disk 25% free, 1 XID"
    assert health_summary({"gpus": [], "host": {}}) == "no GPU"
    assert health_summary({}) == "no report"


def test_rows_show_eligibility_reason_and_revocation():
    fleet = [{"site_id": "a", "status": "revoked", "version": "0.1.0", "connected": False,
              "last_seen": 1000.0, "health": {}, "eligible": False,
              "eligibility_reason": "GPU too hot", "current_task": ""},
             {"site_id": "b", "status": "enrolled", "version": "0.1.0", "connected": True,
              "last_seen": 1090.0, "health": {"gpus": []}, "eligible": True,
              "eligibility_reason": "", "current_task": "job-1 round 2"}]
    rows = fleet_rows(fleet, now=1100.0)
    assert rows[0] == ["a (revoked)", "0.1.0", "no", "100s ago", "no report",
                       "no: GPU too hot", "-"]
    assert rows[1][2:] == ["yes", "10s ago", "no GPU", "yes", "job-1 round 2"]
    table = format_table(rows).splitlines()
    assert table[0].startswith("SITE") and len(table) == 3


def test_health_summary_leaves_out_fields_of_the_wrong_shape():
    assert health_summary({"gpus": 3}) == "no GPU"
    assert health_summary({"gpus": [{"temperature_c": "hot"}, {"temperature_c": 70}]}) == (
        "2 GPU max 70C")
    assert health_summary({"gpus": ["x"], "host": {"disk_total_bytes": 10,
                                                   "disk_free_bytes": "5"}}) == "1 GPU"
    assert health_summary({"host": {"disk_total_bytes": 0, "disk_free_bytes": 0}}) == "no GPU"
    assert health_summary({"xid_events": 4, "gpus": [{"temperature_c": float("nan")}]}) == (
        "1 GPU")
    assert health_summary(["not", "a", "dict"]) == "no report"


def test_last_seen_is_counted_from_the_coordinators_time_when_the_consoles_clock_is_off():
    """'last seen' is the coordinator's time. A connected site was seen by it moments
    ago: a console 2 h fast used to show it '2.0h ago' (and one 2 h slow, every site
    '0s ago'); the newest heartbeat of a connected site stands for the coordinator's
    clock then, and the rows count from it."""
    coordinator_now = 1_800_000_000.0
    fleet = [{"site_id": "a", "connected": True, "last_seen": coordinator_now - 3},
             {"site_id": "b", "connected": False, "last_seen": coordinator_now - 1800}]
    for off in (7200.0, -7200.0):
        rows = fleet_rows(fleet, now=coordinator_now + off)
        assert [r[3] for r in rows] == ["0s ago", "30m ago"]

    from fedge.console.cli import clock_off_note
    from fedge.console.fleet import reference_time

    for off in (7200.0, -7200.0):
        ref, found = reference_time(fleet, coordinator_now + off)
        assert ref == coordinator_now - 3 and found == off + 3
    # the console's clock right: its own reading, to the second
    assert [r[3] for r in fleet_rows(fleet, now=coordinator_now)] == ["3s ago", "30m ago"]
    assert reference_time(fleet, coordinator_now) == (coordinator_now, None)
    # nobody connected: the console's clock is all there is
    alone = [dict(fleet[1])]
    assert fleet_rows(alone, now=coordinator_now + 7200)[0][3] == "2.5h ago"
    note = clock_off_note(coordinator_now + 7200, 7203.0)
    assert note.startswith("note: this console's clock reads 2027-01-15T10:00:00+00:00, "
                           "about 2.0 h ahead of the coordinator's")
    assert "behind" in clock_off_note(coordinator_now, -7203.0)
