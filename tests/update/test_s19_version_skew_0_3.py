"""Release 0.3.0 beside the fielded 0.2.0, through the real version-skew rule.

main was versioned 0.2.0 for its 486 commits after 8a53b51 (the fielded 0.2.0), so
every site and the coordinator saw "matches" whatever either side ran. At 0.3.0
the rule (fedge.update.version) decides: a 0.3 coordinator accepts a 0.2 agent and
records it as update required (the fleet is upgraded coordinator first, then the
sites by a signed software update); a 0.2 coordinator refuses a 0.3 agent, since
agents may not be newer than the coordinator. Each side is checked where it
applies the rule: the coordinator on a heartbeat, the agent on a HeartbeatAck (the
version it runs is the slot the launcher started, FEDGE_SOFTWARE_SLOT). And the DP
seat rule still seats 0.2 agents (both report replace-one epsilon).
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest
from packaging.version import Version

from fedge.update.version import (
    REPLACE_ONE_EPSILON_SINCE,
    check_version_skew,
    parse_version,
)

REPO = Path(__file__).resolve().parents[2]
FIELDED = "0.2.0"  # 8a53b51, the release installed at the sites
RELEASE = "0.3.0"


def test_the_project_is_versioned_above_the_fielded_release() -> None:
    """Same version, different code: apt keeps the installed 0.2.0-1 ("already the
    newest version"), and an agent answers a signed update of main with "software
    0.2.0 is the running software already; nothing to do"."""
    with open(REPO / "pyproject.toml", "rb") as fh:
        version = tomllib.load(fh)["project"]["version"]
    assert Version(version) > Version(FIELDED), version
    # a minor step, so the skew rule (not only dpkg) tells the two apart
    assert parse_version(version)[:2] > parse_version(FIELDED)[:2], version


def test_a_0_3_coordinator_accepts_a_0_2_agent_and_asks_it_to_update() -> None:
    d = check_version_skew(RELEASE, FIELDED)
    assert d.accepted and d.update_required
    assert d.reason == (f"agent {FIELDED} is one minor version behind coordinator "
                        f"{RELEASE}: accepted, update required")


def test_a_0_2_coordinator_refuses_a_0_3_agent() -> None:
    d = check_version_skew(FIELDED, RELEASE)
    assert not d.accepted and not d.update_required
    assert d.reason == (f"agent {RELEASE} refused by coordinator {FIELDED}: agents may "
                        "not be newer than the coordinator")


def test_0_2_agents_keep_their_dp_seat() -> None:
    """0.2 agents report epsilon for replacing one record, as 0.3 ones do: the DP
    cohort rule must not start leaving them out with the version step."""
    assert REPLACE_ONE_EPSILON_SINCE == (0, 2)
    assert parse_version(FIELDED)[:2] >= REPLACE_ONE_EPSILON_SINCE


def _heartbeat_frames(version: str) -> list[bytes]:
    from fedge.wire import codec
    from fedge.wire import messages as m

    hb = m.Heartbeat(site="h1", version=version, health_json="{}", eligible=True, reason="",
                     datasets=[], current_task="")
    return codec.encode(hb, sender="h1")


def _coordinator(tmp_path: Path, version: str, monkeypatch: pytest.MonkeyPatch):
    """A real Coordinator built as release ``version`` (its module's __version__, which
    the installed distribution's metadata gives otherwise)."""
    import fedge.coordinator.service as service
    from fedge.coordinator.service import Coordinator
    from fedge.secagg.keys import Identity
    from fedge.update.files import curve_keypair

    monkeypatch.setattr(service, "__version__", version)
    coord = Coordinator(tmp_path / "coord")
    coord.enrol("h1", curve_keypair()[0], Identity.generate().public_bytes())
    return coord


def test_coordinator_0_3_acks_a_0_2_heartbeat_and_audits_update_required(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedge.wire import messages as m

    coord = _coordinator(tmp_path, RELEASE, monkeypatch)
    try:
        coord.handle_frames("h1", _heartbeat_frames(FIELDED))
        [out] = coord.outbox
        assert isinstance(out.body, m.HeartbeatAck) and not out.close_after
        assert out.body.coordinator_version == RELEASE
        assert coord.fleet()[0]["version"] == FIELDED
        [entry] = coord.store.audit_log(action="version_update_required")
        assert FIELDED in entry["detail"] and RELEASE in entry["detail"]
        assert not coord.store.audit_log(action="version_refused")
    finally:
        coord.close()


def test_coordinator_0_2_refuses_and_drops_a_0_3_agent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedge.wire import messages as m

    coord = _coordinator(tmp_path, FIELDED, monkeypatch)
    try:
        coord.handle_frames("h1", _heartbeat_frames(RELEASE))
        [out] = coord.outbox
        assert isinstance(out.body, m.Rejected) and out.close_after
        assert "agents may not be newer than the coordinator" in out.body.reason
        assert RELEASE in out.body.reason and FIELDED in out.body.reason
        assert coord.fleet()[0]["version"] in ("", None)  # the heartbeat was not kept
        assert coord.store.audit_log(action="version_refused")
    finally:
        coord.close()


@pytest.mark.parametrize(("running", "coordinator", "accepted", "update_required", "level"), [
    (FIELDED, RELEASE, True, True, logging.WARNING),   # the site updates next
    (RELEASE, FIELDED, False, False, logging.ERROR),   # the coordinator was not upgraded first
    (RELEASE, RELEASE, True, False, None),
])
def test_the_agent_reads_the_skew_from_the_coordinators_ack(
        fleet, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        running: str, coordinator: str, accepted: bool, update_required: bool,
        level: int | None) -> None:
    from fedge.agent.updates import AgentUpdateClient, AgentUpdater
    from fedge.update.ab import SLOT_ENV

    async def send(body: object) -> None:
        return None

    monkeypatch.setenv(SLOT_ENV, running)  # the slot the unit's launcher started
    client = AgentUpdateClient(AgentUpdater(fleet.agent_dir, clock=fleet.clock), send)
    with caplog.at_level(logging.WARNING, logger="fedge"):
        d = client.note_coordinator_version(coordinator)
    assert (d.accepted, d.update_required) == (accepted, update_required)
    skew = [r for r in caplog.records if r.getMessage().startswith("version skew: ")]
    if level is None:
        assert skew == []
    else:
        [record] = skew
        assert record.levelno == level
        assert running in record.getMessage() and coordinator in record.getMessage()
