"""The coordinator's STATUS= as `systemctl status` shows it: what it does now, sent
each time that changes and never again while it stays the same. A real coordinator
and real agents, systemd's side a bound NOTIFY_SOCKET."""

from __future__ import annotations

import itertools
import threading

import pytest

from tests.e2e.conftest import DATA, Federation
from tests.sdnotify import notify_socket

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 1
min_clients = 2
max_failed_attempts = 1
seed = 7
[model]
name = "cox_linear"
params = { in_features = 39 }
[train]
steps = 2
batch_size = 16
learning_rate = 0.05
[strategy]
name = "fedavg"
[secagg]
enabled = true
alpha = 0.1
delta = 0.0
clip = 1.0
[deadlines]
cohort_s = 60
train_s = 60
secagg_stage_s = 20
eval_s = 30
"""


def test_status_says_idle_once_the_job_completed_and_never_repeats_itself(tmp_path):
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")
    fed = Federation(tmp_path / "fed")
    with notify_socket() as notify:
        notify.settimeout(0.2)
        lines: list[str] = []
        done = threading.Event()

        def drain() -> None:  # as systemd does: every datagram at once
            while not done.is_set():
                try:
                    lines.extend(notify.recv(4096).decode().splitlines())
                except TimeoutError:
                    continue

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            sites = {"site-0": 0, "site-1": 1}
            for site, centre in sites.items():
                fed.add_site(site, [{"name": "fed_tcga_brca", "kind": "fed_tcga_brca",
                                     "path": str(DATA.resolve()), "site": centre}])
            fed.enrol_in_store()
            fed.env["NOTIFY_SOCKET"] = notify.getsockname()
            fed.start_coordinator()
            fed.env.pop("NOTIFY_SOCKET")
            for site in sites:
                fed.start_agent(site)
            fed.wait_for(lambda: set(sites) <= fed.connected(), 120, "both sites")
            job = fed.submit(PLAN)
            row = fed.wait_job(job, 240)
            assert row["status"] == "completed", fed.dump()

            def statuses() -> list[str]:
                return [x.removeprefix("STATUS=") for x in list(lines)
                        if x.startswith("STATUS=")]

            # the job's end shows: idle, with the fleet and the queue
            idle = "idle; 2 sites connected, 0 jobs queued"
            fed.wait_for(lambda: statuses()[-1:] == [idle], 30,
                         f"STATUS={idle} (last: {statuses()[-3:]})")
        finally:
            done.set()
            reader.join(5)
            fed.close()
    seen = statuses()
    assert any(s.startswith(f"job {job} round 1/1 training") for s in seen), seen
    assert any(s.startswith(f"idle, writing the ONNX model and report of job {job};")
               for s in seen), seen
    # each line says something new: none repeats the one before it
    repeated = [a for a, b in itertools.pairwise(seen) if a == b]
    assert not repeated, seen
