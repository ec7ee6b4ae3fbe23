"""SIGHUP to a running `fedge agent`: an operator's habitual `kill -HUP` to "reload".
It used to end the process at once, without a log line, and systemd counts a death by
SIGHUP as clean (Restart=on-failure does not restart it): the appliance left the
federation silently. Now it is logged, and the agent goes on; SIGTERM still stops it.
Real coordinator and agent processes (tests/e2e's federation)."""

from __future__ import annotations

import signal
import time

import pytest

from tests.e2e.conftest import Federation, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture
def fed(tmp_path):
    f = Federation(tmp_path / "fed")
    yield f
    f.close()


def test_sighup_is_logged_as_unsupported_and_the_agent_keeps_running(fed):
    fed.add_site("a", [])
    fed.enrol_in_store()
    fed.start_coordinator()
    agent = fed.start_agent("a")
    wait_for(lambda: "a" in fed.connected(), 60, "the agent's first heartbeat")
    agent.p.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload is not supported" in agent.output(), 10, "the SIGHUP warning")
    time.sleep(1.0)
    assert agent.p.poll() is None, agent.output()
    assert "use systemctl restart fedge-agent" in agent.output()
    # still connected: its heartbeats go on after the signal, a second SIGHUP is logged
    # again, and SIGTERM stops it cleanly
    seen = fed.query("SELECT last_seen FROM appliances WHERE site_id = 'a'")[0]["last_seen"]
    wait_for(lambda: fed.query("SELECT last_seen FROM appliances WHERE site_id = 'a'")[0][
        "last_seen"] != seen, 10, "a heartbeat after the SIGHUP")
    agent.p.send_signal(signal.SIGHUP)
    wait_for(lambda: agent.output().count("reload is not supported") == 2, 10,
             "the second SIGHUP warning")
    assert agent.stop(30) == 0, agent.output()
