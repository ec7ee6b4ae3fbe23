"""An agent whose coordinator endpoint cannot be dialled says so and stops (s17
endpoints M1).

An enrolment naming ``tcp://https://host:P`` (or a name that is not ASCII, or a space)
installed, and the agent started: libzmq refused the endpoint (EINVAL) inside the
client's connection task, which logged one ERROR with a traceback and died, and the
agent ran on for ever with no socket, saying five minutes later "still retrying every
30 s". Now `fedge agent enrol` refuses such a file, the agent refuses such a
keys/coordinator.json at start (exit 2, naming the file), and a connection task that
dies for any reason ends the agent: exit 2, one line naming the endpoint and the error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from fedge.agent.enrol import install_enrolment
from fedge.agent.process import AgentConfigError, Enrolled, load_enrolled, run_agent
from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer
from fedge.console.enrolment import EnrolmentError, create_enrolment
from fedge.console.store import ConsoleStore
from fedge.transport import CurveKeyPair
from tests.agent.test_process_config import enrolled_state
from tests.agent.test_runtime import PLAIN_OK

REPO = Path(__file__).resolve().parents[2]
BAD = "tcp://https://fl-coordinator.hospital.example:17760"


def with_endpoint(state: Path, endpoint: str) -> Path:
    enrolled_state(state)
    path = state / "keys" / "coordinator.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"endpoint": endpoint}))
    return path


def test_an_enrolled_endpoint_libzmq_refuses_is_named_when_the_agent_loads(tmp_path):
    path = with_endpoint(tmp_path, BAD)
    with pytest.raises(AgentConfigError) as err:
        load_enrolled(tmp_path)
    assert str(err.value).startswith(f"{path} is corrupt: "), err.value
    assert f"endpoint {BAD!r}: host 'https://fl-coordinator.hospital.example' holds a '/'" \
        in str(err.value)


def test_the_agent_does_not_start_on_it(tmp_path):
    path = with_endpoint(tmp_path / "st", "tcp://krankenhaus-münchen.example:17760")
    cfg = tmp_path / "agent.toml"
    cfg.write_text('state_dir = "st"\nhealth = false\n')
    proc = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "run", "--config",
                           str(cfg)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("fedge agent:")]
    assert str(path) in line and "xn--krankenhaus-mnchen-y6b.example" in line, line
    assert "Traceback" not in proc.stderr


def test_an_enrolment_file_naming_it_is_refused_and_nothing_is_written(tmp_path):
    console = ConsoleStore.init(tmp_path / "console", coordinator_endpoint=BAD)
    file, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                               out=tmp_path / "h1.fedge-enrol")
    state = tmp_path / "state"
    with pytest.raises(EnrolmentError) as err:
        install_enrolment(file, state)
    assert str(err.value).startswith(
        f"enrolment file {file} names a coordinator this appliance cannot dial: "
        f"endpoint {BAD!r}: host"), err.value
    assert "nothing changed" in str(err.value)
    assert not (state / "enrolment.json").exists()


def test_an_agent_whose_connection_task_dies_stops_with_one_line(caplog):
    """Whatever kills the client's connection task (here libzmq refusing a heartbeat TTL
    above its cap, which the agent's config check would have refused: run_agent is
    called directly), the agent stops within a moment, exit 2, and says why once."""
    caplog.set_level(logging.DEBUG, logger="fedge")
    keys = CurveKeyPair.generate()
    endpoint = "tcp://127.0.0.1:9"
    enrolled = Enrolled("site-a", keys.public, keys.secret or "", endpoint,
                        CurveKeyPair.generate().public, None, None)
    agent = Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK)

    async def main() -> int:
        stop = asyncio.Event()
        return await asyncio.wait_for(run_agent(agent, enrolled, interval_s=0.05,
                                                timeout_s=7000.0, stop=stop), 20)

    assert asyncio.run(main()) == 2
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    (line,) = lines
    assert line.name == "fedge.agent" and line.levelno == logging.ERROR
    assert line.getMessage() == (
        "site-a: no connection to the coordinator at tcp://127.0.0.1:9 can be made: "
        "ZMQError: Invalid argument; the agent stops (exit 2)")
    assert line.exc_info is None
