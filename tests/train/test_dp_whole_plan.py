"""A site checks a DP-SGD plan's whole budget at its own size before it spends any of it.

The coordinator checks a plan's ``target_epsilon`` at the declared
``min_site_examples``. A site with fewer rows samples at a higher rate; one with more
rows can take more steps a round (epochs round up). Checked round by round only, such
a site released rounds until its budget ran out and the job failed, its ε spent for
nothing. Now it refuses the plan before training its first run of the job.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fedge.train.api as api
from fedge.coordinator.plan import parse_plan
from fedge.train.api import (
    ClientState,
    DatasetSpec,
    ModelSpec,
    TrainConfig,
    build_model,
    flatten,
    load_site_data,
    local_train,
)
from fedge.train.privacy import DPConfig, PrivacyBudgetError, epsilon_for

MODEL = ModelSpec("logistic", {"in_features": 2})
SIGMA = 1.1


def _eps(rows: int, rounds: int = 3) -> float:
    """ε at this module's sites: ``rounds`` epochs of ceil(rows / 16) steps at rate
    16 / rows (for replacing one record: recomputed by the accountant, not pasted)."""
    return epsilon_for(noise_multiplier=SIGMA, sampling_rate=16 / rows,
                       steps=rounds * -(-rows // 16), delta=1e-5)


# a target the plan meets at its min_site_examples (160 rows) and a 128-row site does not
TARGET = round((_eps(160) + _eps(128)) / 2, 2)
# one the plan meets at 160 rows and a 161-row site (11 steps an epoch) does not
TARGET_161 = round((_eps(160) + _eps(161)) / 2, 2)


def _site(tmp_path: Path, n: int):  # type: ignore[no-untyped-def]
    p = tmp_path / f"rows{n}.csv"
    p.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(n)))
    data = load_site_data(DatasetSpec(name="rows", kind="tabular", path=str(p), task="binary",
                                      features=("a", "b"), target="y", val_fraction=0.0))
    assert len(data.split("train")) == n
    return data


def _cfg(target: float) -> TrainConfig:
    return TrainConfig(epochs=1, batch_size=16, lr=0.1,
                       dp=DPConfig(noise_multiplier=SIGMA, delta=1e-5, target_epsilon=target))


def _plan_accepted(target: float) -> None:
    """The coordinator's submit check passes the plan (3 rounds, min_site_examples 160)."""
    parse_plan(
        '[job]\ndataset = "rows"\nrounds = 3\n'
        '[model]\nname = "logistic"\nparams = { in_features = 2 }\n'
        '[train]\nepochs = 1\nbatch_size = 16\nlearning_rate = 0.1\n'
        '[strategy]\nname = "fedavg"\n'
        '[privacy]\nmin_site_examples = 160\n'
        f'dp = {{ noise_multiplier = {SIGMA}, delta = 1e-5, target_epsilon = {target} }}\n')


def _train(data, cfg: TrainConfig, state: ClientState, round: int):  # type: ignore[no-untyped-def]
    return local_train(MODEL, flatten(build_model(MODEL)), data, cfg, round=round,
                       state=state, rounds=3, min_site_examples=160)


def test_a_site_below_min_site_examples_refuses_the_plan_before_training(
        tmp_path: Path) -> None:
    """Was: rounds 1 and 2 trained and released, round 3 refused, job failed."""
    assert _eps(160) < TARGET < _eps(128) and _eps(128, rounds=2) < TARGET
    _plan_accepted(TARGET)
    state = ClientState(job="job-1")
    with pytest.raises(PrivacyBudgetError) as err:
        _train(_site(tmp_path, 128), _cfg(TARGET), state, round=1)
    assert str(err.value) == (
        "job 'job-1' refused before training: this site has 128 training rows, below the "
        "plan's min_site_examples 160: its 3 rounds of 8 steps at sampling rate 0.125 "
        f"would spend epsilon {_eps(128):.3f} > target_epsilon {TARGET:g} (delta=1e-05); "
        "nothing was trained or spent")
    assert state.ledger.entries == []


def test_a_site_whose_epochs_round_up_to_more_steps_refuses_the_plan_too(
        tmp_path: Path) -> None:
    """161 rows are not below 160, but one epoch in batches of 16 is 11 steps, not 10:
    more ε over 3 rounds than the plan's check found at 160 rows."""
    assert _eps(160) < TARGET_161 < _eps(161)
    _plan_accepted(TARGET_161)
    state = ClientState(job="job-1")
    with pytest.raises(PrivacyBudgetError) as err:
        _train(_site(tmp_path, 161), _cfg(TARGET_161), state, round=1)
    assert ("this site has 161 training rows, not below the plan's min_site_examples 160, "
            "but its epochs in batches of 16 round up to 11 steps a round: its 3 rounds of "
            f"11 steps at sampling rate 0.09938 would spend epsilon {_eps(161):.3f} > "
            f"target_epsilon {TARGET_161:g}") in str(err.value)
    assert state.ledger.entries == []


def test_a_site_the_plan_fits_trains_every_round(tmp_path: Path) -> None:
    data, state = _site(tmp_path, 160), ClientState(job="job-1")
    for r in (1, 2, 3):
        out = _train(data, _cfg(TARGET), state, round=r)
        state.ledger.release(out.ledger_key)
    assert out.epsilon == pytest.approx(
        epsilon_for(noise_multiplier=SIGMA, sampling_rate=0.1, steps=30, delta=1e-5))


def test_a_site_with_only_unreleased_runs_of_the_job_is_still_checked_whole(
        tmp_path: Path) -> None:
    """Pending runs never left the site and a late first round spends like any: nothing
    is committed yet, so the plan is checked whole, at any round."""
    state = ClientState(job="job-1")
    state.ledger.record(job="job-1", round=1, noise_multiplier=SIGMA, sampling_rate=0.125,
                        steps=8, pending=True)
    state.ledger.record(job="other", round=1, noise_multiplier=SIGMA, sampling_rate=0.125,
                        steps=8)  # another job's released run commits nothing to this one
    with pytest.raises(PrivacyBudgetError, match="refused before training: this site has 128"):
        _train(_site(tmp_path, 128), _cfg(TARGET), state, round=2)
    assert len(state.ledger.entries) == 2


def test_once_a_run_of_the_job_is_released_the_per_round_check_governs(
        tmp_path: Path) -> None:
    """A site that released round 1 (under an earlier release, say) is committed: the
    next round is refused only when it alone would pass the target."""
    data, state = _site(tmp_path, 128), ClientState(job="job-1")
    state.ledger.record(job="job-1", round=1, noise_multiplier=SIGMA, sampling_rate=0.125,
                        steps=8)
    out = _train(data, _cfg(TARGET), state, round=2)
    assert out.epsilon == pytest.approx(_eps(128, rounds=2))
    state.ledger.release(out.ledger_key)
    with pytest.raises(PrivacyBudgetError, match=rf"round 3 refused: epsilon would rise from "
                                                 rf"{_eps(128, rounds=2):.3f} to "
                                                 rf"{_eps(128):.3f}"):
        _train(data, _cfg(TARGET), state, round=3)


def test_the_whole_plan_costs_one_composition_however_many_rounds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def counted(**kw: float) -> float:
        calls.append(int(kw["steps"]))
        return epsilon_for(**kw)  # type: ignore[arg-type]

    monkeypatch.setattr(api, "epsilon_for", counted)
    with pytest.raises(PrivacyBudgetError, match="its 100000 rounds of 8 steps"):
        local_train(MODEL, flatten(build_model(MODEL)), _site(tmp_path, 128), _cfg(TARGET),
                    round=1, state=ClientState(job="job-1"), rounds=100_000)
    assert calls == [800_000]


def test_rounds_must_be_a_positive_integer(tmp_path: Path) -> None:
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match=r"rounds=.* must be an integer >= 1"):
            local_train(MODEL, np.zeros(3, np.float32), _site(tmp_path, 16), _cfg(TARGET),
                        round=1, rounds=bad)  # type: ignore[arg-type]
