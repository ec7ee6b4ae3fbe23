"""A coordinator name with IPv6 addresses alone is said to be unreachable, not counted
resolved (s17, after d4469a0).

Since d4469a0 the agent's socket resolves a name for IPv4 alone (ZMQ_IPV6 only for an
IPv6 address in brackets), but its name check (`_lookup`: run_agent's warning, and
`fedge agent check` through `coordinator_endpoint_warnings`) looked the name up for both
families: a name with only AAAA records passed, and the agent never connected, silently.
Now the name is looked up for IPv4, as the socket does, and one with IPv6 addresses
alone is named as such, with the bracketed endpoint to enrol with instead.

The names are real ones, from a hosts file bind-mounted over /etc/hosts in a private
mount namespace (``unshare -rm``, skipped where not permitted), so no DNS is needed:
``coord6.example`` has only 2001:db8::7; ``coord46.example`` has 192.0.2.7 and
2001:db8::7. The real resolver, run_agent with real ZeroMQ, and the real CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.coordinator.test_s17_v6_dual_stack_localhost import in_namespace, namespaces_permitted

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)

HOSTS = """127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
2001:db8::7\tcoord6.example
192.0.2.7\tcoord46.example
2001:db8::7\tcoord46.example
"""

V6_ONLY = ("has only IPv6 addresses (2001:db8::7), and a name is dialled over IPv4: enrol "
           "with its address in brackets, tcp://[2001:db8::7]:{port}")


def scenario(tmp: Path) -> dict[str, Any]:
    """What runs inside the namespace: each case's outcome, by name."""
    import asyncio
    import logging
    import os

    from fedge.agent import process
    from fedge.agent.process import coordinator_endpoint_warnings, resolve_name, run_agent
    from fedge.transport import CurveKeyPair
    from tests.agent.test_s15_logs_link import free_port, site
    from tests.test_s17_check_cli import agent_config

    found: dict[str, Any] = {}
    for name in ("coord6.example", "coord46.example"):
        found[f"resolve {name}"] = list(resolve_name(name, 7700))
        found[f"check {name}"] = coordinator_endpoint_warnings(f"tcp://{name}:7700")

    # the real `fedge agent check` on an appliance enrolled to the IPv6-only name
    cfg = agent_config(tmp, coordinator="tcp://coord6.example:7000")
    done = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "check", "--config",
                           str(cfg)], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=os.environ)
    found["cli"] = [done.returncode, done.stdout, done.stderr]

    # run_agent dialling it: its warnings, with the outage's (after 1 s) naming the cause
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                lines.append(record.getMessage())

    logger = logging.getLogger("fedge")
    logger.setLevel(logging.INFO)
    logger.addHandler(Collect())
    process.NAME_CHECK_S = 0.1
    process.OUTAGE_WARN_S = 1.0
    port = free_port()
    agent, enrolled, _ = site(f"tcp://coord6.example:{port}", CurveKeyPair.generate().public)

    async def main() -> None:
        stop = asyncio.Event()
        run = asyncio.ensure_future(run_agent(agent, enrolled, interval_s=0.05,
                                              timeout_s=0.2, stop=stop))
        try:
            for _ in range(500):  # at most 5 s
                if any("no connection to the coordinator" in x for x in lines):
                    break
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await asyncio.wait_for(run, 20)

    asyncio.run(asyncio.wait_for(main(), 60))
    found["agent port"] = port
    found["agent warnings"] = lines
    return found


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("ipv6only")
    hosts = tmp / "hosts"
    hosts.write_text(HOSTS)
    why = namespaces_permitted(hosts)
    if why is not None:
        pytest.skip(f"no private mount namespace here ({why})")
    code = ("import json, sys; from pathlib import Path; "
            "from tests.agent.test_s17_tail_ipv6_only_name import scenario; "
            "print(json.dumps(scenario(Path(sys.argv[1]))))")
    done = subprocess.run(in_namespace(hosts, sys.executable, "-c", code, str(tmp)),
                          cwd=REPO, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_name_with_only_ipv6_addresses_is_not_counted_resolved(outcome):
    addresses, error = outcome["resolve coord6.example"]
    assert addresses == [] and error == V6_ONLY.format(port=7700), outcome
    # a name with an IPv4 address resolves to it alone: what the socket dials
    assert outcome["resolve coord46.example"] == [["192.0.2.7"], None], outcome


def test_agent_check_says_the_name_has_only_ipv6_addresses(outcome):
    assert outcome["check coord6.example"] == [
        "the coordinator's name coord6.example (from tcp://coord6.example:7700, the "
        f"enrolled coordinator endpoint) {V6_ONLY.format(port=7700)}"], outcome
    assert outcome["check coord46.example"] == [], outcome
    code, stdout, stderr = outcome["cli"]
    assert (code, stdout.splitlines()[-1].startswith("ok: ")) == (0, True), outcome["cli"]
    assert [x for x in stderr.splitlines() if x.startswith("warning: ")] == [
        "warning: the coordinator's name coord6.example (from tcp://coord6.example:7000, "
        f"the enrolled coordinator endpoint) {V6_ONLY.format(port=7000)}"], stderr


def test_the_agent_warns_of_a_name_with_only_ipv6_addresses_once_and_in_the_outage(outcome):
    port = outcome["agent port"]
    warnings = outcome["agent warnings"]
    assert len(warnings) == 2, warnings  # many lookups, one line; then the outage
    assert warnings[0] == (f"site-a: the coordinator's name coord6.example "
                           f"{V6_ONLY.format(port=port)}; still trying"), warnings
    assert warnings[1].startswith(
        f"site-a: no connection to the coordinator at tcp://coord6.example:{port} for "), \
        warnings
    assert f"(its name coord6.example {V6_ONLY.format(port=port)}); still retrying" in \
        warnings[1], warnings
