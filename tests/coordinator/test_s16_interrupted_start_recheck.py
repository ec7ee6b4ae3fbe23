"""A queued job whose start the submission re-check refuses (the sites declared
against it since its submit) is failed with the check's words, but not its submit-time
last sentence "Nothing was submitted" (review s16 diffreview2 L3): the job had been
submitted and queued; what the coordinator did not do is start it. Real coordinator
(SQLite) and real agents declaring their data sets (TorchTrainer tables), in memory."""

from __future__ import annotations

from tests.coordinator.test_s16_start_rechecks_plan import (
    PLAN,
    _fleet_declaring_after_the_submit,
)


def _start_error(federation, plan: str) -> str:  # type: ignore[no-untyped-def]
    fed, job, tasks = _fleet_declaring_after_the_submit(federation, plan)
    record = fed.coord.store.job(job)
    assert record.status == "failed" and tasks == []
    return record.error


def test_a_model_the_sites_refuse_at_start_says_the_job_was_not_started(federation):
    error = _start_error(federation, PLAN.replace("in_features = 39", "in_features = 38"))
    assert error.startswith("refused when it was to start, by the submission checks: "
                            "plan field model.params.in_features = 38"), error
    assert "Nothing was submitted" not in error
    assert error.endswith("Every site holding it would refuse the job. "
                          "The job was not started"), error


def test_a_data_set_no_site_holds_at_start_says_the_job_was_not_started(federation):
    error = _start_error(federation, PLAN.replace('dataset = "fed_tcga_brca"',
                                                  'dataset = "fed_tcga_luad"'))
    assert error.startswith("refused when it was to start, by the submission checks: "
                            "plan field job.dataset = 'fed_tcga_luad'"), error
    assert "Nothing was submitted" not in error
    assert error.endswith("even if they all held it. The job was not started"), error
