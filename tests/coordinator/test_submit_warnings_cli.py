"""`fedge coordinator submit` (the direct database CLI) makes the submission checks
that `fedge console jobs submit` makes (Coordinator.submission_warnings), in the same
words, from the database: a job.name already queued or running, a data set declared by
too few of the sites heard from (warnings, queued all the same), a data set no site
declares (refused, nothing submitted). It used to queue them all without a word."""

from __future__ import annotations

from pathlib import Path

from fedge.coordinator.store import Store
from fedge.secagg.keys import Identity
from tests.coordinator.test_damaged_database import coordinator_config, fedge

PLAN = """
[job]
name = "{name}"
dataset = "{dataset}"
rounds = 1
min_clients = 2
[model]
name = "linear"
params = {{ in_features = 8 }}
[train]
steps = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "fedavg"
"""


def _fleet(tmp_path: Path, heard: list[str]) -> tuple[Path, Path]:
    """Sites a, b, c enrolled; those in ``heard`` with a recorded heartbeat declaring
    fed_tcga_brca; one queued job named "A" (job-2)."""
    cfg, state = coordinator_config(tmp_path)  # site "a" and job-1 (no name)
    store = Store(state)
    try:
        for site in ("b", "c"):
            store.enrol(site, site.upper() * 40, Identity.generate().public_bytes(),
                        actor="test")
        for site in heard:
            store.record_heartbeat(site, version="0.3.0", health={}, eligible=True,
                                   reason="", datasets=["fed_tcga_brca"], current_task="")
        store.create_job("job-2", PLAN.format(name="A", dataset="fed_tcga_brca"),
                         actor="test")
    finally:
        store.close()
    return cfg, state


def _jobs(state: Path) -> list[str]:
    store = Store(state)
    try:
        return [j.job_id for j in store.jobs()]
    finally:
        store.close()


def test_direct_submit_warns_of_a_taken_name_and_a_data_set_too_few_sites_declare(
        tmp_path: Path) -> None:
    cfg, state = _fleet(tmp_path, heard=["a"])
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.format(name="A", dataset="fed_tcga_brcaa"))
    out = fedge("coordinator", "submit", "--config", str(cfg), str(plan))
    assert out.returncode == 0, out.stderr
    (job,) = out.stdout.split()  # the id alone on stdout
    assert job in _jobs(state)
    assert out.stderr.splitlines() == [
        "warning: job.name 'A' is also the name of 1 queued or running job(s) (job-2): "
        "tell them apart by their ids",
        "warning: job.dataset 'fed_tcga_brcaa' is declared by 0 of the 1 site(s) heard "
        "from, fewer than job.min_clients = 2 (2 enrolled site(s) not heard from yet): "
        "unless more sites holding it connect, its rounds wait for a cohort and the job "
        "fails after 3 attempt(s) of 60 s",
    ]


def test_direct_submit_refuses_a_data_set_no_site_declares_and_stores_nothing(
        tmp_path: Path) -> None:
    cfg, state = _fleet(tmp_path, heard=["a", "b", "c"])
    before = _jobs(state)
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.format(name="B", dataset="fed_tcga_brcaa"))
    out = fedge("coordinator", "submit", "--config", str(cfg), str(plan))
    assert out.returncode == 2
    assert out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line == (
        "fedge coordinator submit: plan field job.dataset = 'fed_tcga_brcaa': no enrolled "
        "site declares this data set; the 3 site(s) heard from declare 'fed_tcga_brca' "
        "(a, b, c), and the 0 not heard from yet could not make job.min_clients = 2 even "
        "if they all held it. Nothing was submitted")
    assert _jobs(state) == before
    # a plan the sites can run goes in without a word
    plan.write_text(PLAN.format(name="B", dataset="fed_tcga_brca"))
    out = fedge("coordinator", "submit", "--config", str(cfg), str(plan))
    assert out.returncode == 0 and out.stderr == "", out.stderr
