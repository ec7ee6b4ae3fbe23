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
