"""Version skew: one minor behind is accepted with an update request; more is refused."""

import pytest

from fedge.update.version import check_version_skew


def test_same_minor_is_accepted_without_update():
    d = check_version_skew("1.4.2", "1.4.0")
    assert d.accepted and not d.update_required


def test_one_minor_behind_is_accepted_and_told_to_update():
    d = check_version_skew("1.4.0", "1.3.9")
    assert d.accepted and d.update_required
    assert "1.3.9" in d.reason and "1.4.0" in d.reason


@pytest.mark.parametrize(
    ("coord", "agent", "rule"),
    [
        ("1.4.0", "1.2.7", "at most one minor"),
        ("2.0.0", "1.9.0", "major versions differ"),
        ("1.4.0", "1.5.0", "newer than the coordinator"),
    ],
)
def test_beyond_one_minor_is_refused_naming_both_versions(coord, agent, rule):
    d = check_version_skew(coord, agent)
    assert not d.accepted and not d.update_required
    assert coord in d.reason and agent in d.reason and rule in d.reason


def test_dev_suffixes_are_understood():
    assert check_version_skew("0.2.0", "0.1.0+dev3").update_required


def test_unparsable_version_names_the_value():
    with pytest.raises(ValueError, match="agent version 'banana'"):
        check_version_skew("1.0.0", "banana")


def _heartbeat_frames(version: str):
    from fedge.wire import codec
    from fedge.wire import messages as m

    hb = m.Heartbeat(site="h1", version=version, health_json="{}", eligible=True, reason="",
                     datasets=[], current_task="")
    return codec.encode(hb, sender="h1")


def _coordinator(tmp_path):
    from fedge.coordinator.service import Coordinator
    from fedge.secagg.keys import Identity
    from fedge.update.files import curve_keypair

    coord = Coordinator(tmp_path / "coord")
    coord.enrol("h1", curve_keypair()[0], Identity.generate().public_bytes())
    dropped: list[str] = []
    coord.on_disconnect = dropped.append
    return coord, dropped


@pytest.mark.parametrize("delta", [2, -1])
def test_coordinator_refuses_and_drops_an_agent_too_far_off(tmp_path, delta):
    from fedge import __version__
    from fedge.update.version import parse_version
    from fedge.wire import messages as m

    major, minor, _ = parse_version(__version__)
    old = f"{major}.{minor - delta}.0" if minor - delta >= 0 else f"{major + 1}.0.0"
    coord, dropped = _coordinator(tmp_path)
    coord.handle_frames("h1", _heartbeat_frames(old))
    [out] = coord.outbox
    assert isinstance(out.body, m.Rejected)
    assert old in out.body.reason and __version__ in out.body.reason
    # dropped, but after its Rejected has gone out (process._drain), so the agent's
    # journal says why
    assert out.close_after and dropped == []
    assert coord.fleet()[0]["version"] in ("", None)  # the heartbeat was not recorded
    assert coord.store.audit_log(action="version_refused")
    coord.close()


def test_coordinator_accepts_one_minor_behind_and_records_update_required(tmp_path):
    from fedge import __version__
    from fedge.update.version import parse_version
    from fedge.wire import messages as m

    major, minor, _ = parse_version(__version__)
    if minor == 0:
        pytest.skip("no minor version behind 0")  # pragma: no cover
    behind = f"{major}.{minor - 1}.3"
    coord, dropped = _coordinator(tmp_path)
    coord.handle_frames("h1", _heartbeat_frames(behind))
    assert isinstance(coord.outbox[0].body, m.HeartbeatAck)
    assert coord.outbox[0].body.coordinator_version == __version__
    assert dropped == [] and coord.fleet()[0]["version"] == behind
    [entry] = coord.store.audit_log(action="version_update_required")
    assert behind in entry["detail"]
    coord.close()
