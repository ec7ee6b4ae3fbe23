"""What the privacy ledger tells a hospital is not smaller than the truth.

Every training run whose update can leave the site is recorded, with its mechanism:
DP-SGD, client-level DP-FedAvg, or none (an exact update, whose release makes ε
unbounded). ε is for replacing one record (the site's record count leaves with its
updates, so add-or-remove neighbours are told apart), computed by dp_accounting's PLD
accountant under REPLACE_ONE; a DP-FedAvg round is a Gaussian release of sensitivity
2S (one site's data replaced) against noise zS. A DP-SGD site refuses a delta that is
not below 1/n.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fedge.train.accounting import (
    DP_FEDAVG,
    DP_SGD,
    EPSILON_CEILING,
    NO_DP,
    RELEASED,
    PrivacyLedger,
    calibrate_noise,
    check_dp_plan,
    epsilon_for,
)
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
from fedge.train.privacy import ClientDPConfig, DPConfig

DELTA = 1e-5
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def poisson_gaussian(z: float, q: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)


def pld_replace_one(*events: dp_accounting.DpEvent) -> float:
    """dp_accounting's PLD accountant for replacing one record, its default grid."""
    accountant = PLDAccountant(neighboring_relation=REPLACE_ONE)
    for event in events:
        accountant.compose(event)
    return float(accountant.get_epsilon(DELTA))


def gaussian_epsilon(mu: float, delta: float = DELTA) -> float:
    """The exact ε of a Gaussian mechanism whose sensitivity / noise ratio is ``mu``
    (composed Gaussians: mu = sqrt(sum of the squares)), by the closed form of
    Balle & Wang 2018: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2),
    in logs, so that it holds for the huge ε of noise far too small (mu in the
    hundreds: e^eps and Phi's far tail are out of a float's range)."""

    def log_phi(x: float) -> float:
        if x > -30:
            return math.log(0.5 * math.erfc(-x / math.sqrt(2)))
        # the tail's asymptotic series (Mills' ratio): relative error < 1e-10 here
        return (-x * x / 2 - math.log(-x) - 0.5 * math.log(2 * math.pi)
                + math.log1p(-1 / x**2 + 3 / x**4 - 15 / x**6))

    def log_delta_at(eps: float) -> float:
        first, second = log_phi(-eps / mu + mu / 2), eps + log_phi(-eps / mu - mu / 2)
        return first + math.log1p(-math.exp(second - first))

    lo, hi = 0.0, 200.0 + mu * mu
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if log_delta_at(mid) <= math.log(delta) else (mid, hi)
    return hi


# --- record-level ε is for replacing one record ------------------------------------


def test_record_level_epsilon_is_for_replacing_one_record_not_adding_or_removing() -> None:
    """The review's numbers (q = 0.2, z = 2.5, 300 steps): the RDP add-or-remove ε the
    ledger reported was 7.489; the PLD accountant's for replacing one record is 14.85.
    Every record-level figure (epsilon_for, the ledger, the plan check) is the latter."""
    event = poisson_gaussian(2.5, 0.2, 300)
    rdp = RdpAccountant()
    rdp.compose(event)
    add_or_remove = rdp.get_epsilon(DELTA)
    replace_one = pld_replace_one(event)
    assert replace_one > 1.9 * add_or_remove

    ours = epsilon_for(noise_multiplier=2.5, sampling_rate=0.2, steps=300, delta=DELTA)
    assert replace_one <= ours <= replace_one * 1.003
    ledger = PrivacyLedger()
    for r in range(30):
        ledger.record(job="j", round=r, noise_multiplier=2.5, sampling_rate=0.2, steps=10)
    assert ledger.epsilon(DELTA) == ours
    assert check_dp_plan(target_epsilon=ours, delta=DELTA, rounds=30, steps_per_round=10,
                         sampling_rate=0.2, noise_multiplier=2.5) == ours
    # a plan the add-or-remove figure let through is now refused
    with pytest.raises(ValueError, match="cannot be met"):
        check_dp_plan(target_epsilon=add_or_remove * 1.01, delta=DELTA, rounds=30,
                      steps_per_round=10, sampling_rate=0.2, noise_multiplier=2.5)
    z = calibrate_noise(target_epsilon=8.0, delta=DELTA, sampling_rate=0.2, steps=300)
    assert epsilon_for(noise_multiplier=z, sampling_rate=0.2, steps=300, delta=DELTA) <= 8.0
    assert pld_replace_one(poisson_gaussian(z, 0.2, 300)) <= 8.0


@pytest.mark.parametrize(("z", "q", "steps"), [
    (2.5, 0.2, 300), (5.0, 0.5, 10), (20.0, 0.01, 1000), (1000.0, 0.2, 300),
    (2.0, 0.001, 100_000), (1.1, 0.004, 30_000), (4.0, 1.0, 50),
])
def test_the_coarser_grid_stays_an_upper_bound_within_0_3_percent(
        z: float, q: float, steps: int) -> None:
    """ε is computed on a grid sized to its scale (fast), never below what the default,
    finest grid gives (pessimistic: an upper bound) and close to it."""
    reference = pld_replace_one(poisson_gaussian(z, q, steps))
    ours = epsilon_for(noise_multiplier=z, sampling_rate=q, steps=steps, delta=DELTA)
    assert reference <= ours <= reference * 1.003


def test_noise_too_small_to_protect_anything_is_a_finite_upper_bound_on_a_coarse_grid(
) -> None:
    """Past EPSILON_CEILING the grid is coarse (scale / 300): quick, and still an upper
    bound, finite where the accountant can compute it (a site reports it, and the
    coordinator stores a finite ε: an infinite one failed the site's round), unbounded
    only where it cannot. Within a minute, not after minutes on a grid too big for a
    site's memory."""
    start = time.perf_counter()
    huge = epsilon_for(noise_multiplier=0.5, sampling_rate=1.0, steps=5000, delta=DELTA)
    small_z = epsilon_for(noise_multiplier=0.05, sampling_rate=0.2, steps=300, delta=DELTA)
    unbounded = epsilon_for(noise_multiplier=0.01, sampling_rate=0.5, steps=100_000,
                            delta=DELTA)
    assert time.perf_counter() - start < 60
    # q = 1: 5000 Gaussians compose to one, mu = 2 sqrt(steps) / z (replacing one record),
    # whose exact ε the closed form gives (dp_accounting's PLD took ~20 s on it)
    exact = gaussian_epsilon(2 * math.sqrt(5000) / 0.5)
    assert EPSILON_CEILING < exact <= huge < math.inf
    assert EPSILON_CEILING < small_z < math.inf
    assert unbounded == math.inf


@pytest.mark.parametrize(("z", "q", "steps"), [
    (1.0, 1e-4, 1), (1.0, 1e-4, 3000), (2.5, 1e-4, 1), (0.1, 1e-5, 10_000),
])
def test_where_the_rdp_scale_overstates_epsilon_the_grid_is_sized_again(
        z: float, q: float, steps: int) -> None:
    """At small q (or small z) the RDP estimate that sizes the grid is hundreds of times
    ε; a grid sized from it overstated ε up to 5x (and refused plans that fit). The grid
    is sized again from the first ε: within 1 % of the default grid. (Both grids give
    pessimistic bounds; on different grids they may differ by rounding either way.)"""
    reference = pld_replace_one(poisson_gaussian(z, q, steps))
    ours = epsilon_for(noise_multiplier=z, sampling_rate=q, steps=steps, delta=DELTA)
    assert reference * (1 - 1e-4) <= ours <= reference * 1.01


def test_a_plan_check_and_a_calibration_stay_fast() -> None:
    """A refusal searches the rounds that fit and the noise that would: dozens of
    compositions, each on a grid sized to its ε (the default grid took ~1.5 s each)."""
    start = time.perf_counter()
    with pytest.raises(ValueError, match="raise noise_multiplier to"):
        check_dp_plan(target_epsilon=3.0, delta=DELTA, rounds=200, steps_per_round=25,
                      sampling_rate=0.021, noise_multiplier=0.91)
    assert time.perf_counter() - start < 20


# --- every run is recorded, with its mechanism --------------------------------------


def test_a_ledger_saved_before_mechanisms_loads_every_entry_as_dp_sgd(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    old = [{"job": "j", "round": r, "attempt": 1, "status": RELEASED,
            "noise_multiplier": 1.1, "sampling_rate": 0.05, "steps": 10} for r in (1, 2)]
    path.write_text(json.dumps({"entries": old}))
    ledger = PrivacyLedger.load(path)
    assert [e["mechanism"] for e in ledger.entries] == [DP_SGD, DP_SGD]
    assert ledger.epsilon(DELTA) == epsilon_for(noise_multiplier=1.1, sampling_rate=0.05,
                                                steps=20, delta=DELTA)
    path.write_text(json.dumps({"entries": [{**old[0], "mechanism": "dp_magic"}]}))
    with pytest.raises(ValueError, match=r"entry 0: mechanism 'dp_magic' is not one of"):
        PrivacyLedger.load(path)


def test_a_ledger_saved_before_mechanisms_stays_legacy_through_later_saves(
        tmp_path) -> None:
    """An earlier release recorded DP-SGD runs only: its ledger (no version) loads
    legacy, and every save keeps saying so (which entries it recorded, and since when
    this release records every run), so `fedge agent privacy` can tell the hospital."""
    path = tmp_path / "ledger.json"
    old = [{"job": "old", "round": r, "attempt": 1, "status": RELEASED,
            "noise_multiplier": 1.1, "sampling_rate": 0.08, "steps": 3} for r in (1, 2)]
    path.write_text(json.dumps({"entries": old}))
    ledger = PrivacyLedger.load(path)
    assert (ledger.legacy, ledger.legacy_entries, ledger.complete_since) == (True, 2, None)
    before = time.time()
    ledger.record(job="new", round=1, mechanism=NO_DP, steps=3)
    ledger.save(path)
    saved = json.loads(path.read_text())
    assert (saved["version"], saved["legacy"], saved["legacy_entries"]) == (2, True, 2)
    since = saved["complete_since"]
    assert before <= since <= time.time()
    again = PrivacyLedger.load(path)
    assert (again.legacy, again.legacy_entries, again.complete_since) == (True, 2, since)
    assert again.entries == ledger.entries
    again.save(path)  # the first save's time stands
    assert json.loads(path.read_text())["complete_since"] == since
    # the ε the earlier release showed for its entries (RDP, add-or-remove) and today's
    rdp = RdpAccountant()
    rdp.compose(poisson_gaussian(1.1, 0.08, 6))
    assert again.legacy_epsilon(DELTA) == (
        epsilon_for(noise_multiplier=1.1, sampling_rate=0.08, steps=6, delta=DELTA),
        pytest.approx(rdp.get_epsilon(DELTA)))
    assert again.legacy_epsilon(DELTA, job="new") == (0.0, 0.0)
    # a ledger started by this release is not legacy
    fresh = PrivacyLedger()
    fresh.record(job="new", round=1, mechanism=NO_DP, steps=3)
    fresh.save(tmp_path / "fresh.json")
    loaded = PrivacyLedger.load(tmp_path / "fresh.json")
    assert (loaded.legacy, loaded.legacy_entries) == (False, 0)
    assert loaded.complete_since is not None


@pytest.mark.parametrize(("change", "why"), [
    ({"version": 3}, "version 3: this release reads 2"),
    ({"legacy_entries": 5}, "legacy_entries 5 is not an integer from 0 to the 1 entries"),
    ({"legacy": "yes"}, "legacy 'yes' is not true or false"),
    ({"complete_since": "today"}, "complete_since 'today' is not a time"),
])
def test_a_versioned_ledger_with_a_bad_field_is_refused_naming_it(
        tmp_path, change, why) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger()
    ledger.record(job="j", round=1, mechanism=NO_DP)
    ledger.save(path)
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=f"ledger {path}: not a valid ledger: {why}"):
        PrivacyLedger.load(path)


def test_a_released_run_without_dp_makes_its_job_and_the_total_unbounded() -> None:
    ledger = PrivacyLedger()
    ledger.record(job="dp", round=1, noise_multiplier=1.1, sampling_rate=0.05, steps=10)
    key = ledger.record(job="plain", round=1, mechanism=NO_DP, steps=10, pending=True)
    # trained, never left: nothing spent, nothing unbounded
    assert ledger.epsilon(DELTA, job="plain") == 0.0 and ledger.without_dp() == []
    finite = ledger.epsilon(DELTA)
    assert 0 < finite < math.inf
    ledger.release(key)
    assert ledger.epsilon(DELTA, job="plain") == math.inf
    assert ledger.epsilon(DELTA) == math.inf
    assert ledger.epsilon(DELTA, job="dp") == finite  # the DP job's own ε stands
    assert ledger.without_dp() == ["plain"] and ledger.mechanisms() == [DP_SGD, NO_DP]
    assert PrivacyLedger.from_dict(ledger.to_dict()).epsilon(DELTA) == math.inf


def test_a_dp_fedavg_round_is_a_gaussian_of_sensitivity_2s_against_noise_zs() -> None:
    """The cohort is public (the roster), so the neighbouring relation replaces one
    site's data: its clipped update moves the sum by up to 2S, against noise zS on the
    sum. R released rounds (q = 1, every site each round) compose to a Gaussian with
    mu = 2 sqrt(R) / z, whose exact ε the closed form gives."""
    z, rounds = 1.5, 12
    ledger = PrivacyLedger()
    for r in range(1, rounds + 1):
        ledger.record(job="fl", round=r, mechanism=DP_FEDAVG, noise_multiplier=z,
                      clip_norm=0.7, cohort_size=5)
    assert ledger.events() == [(DP_FEDAVG, z, 1.0, rounds)]
    exact = gaussian_epsilon(2 * math.sqrt(rounds) / z)
    ours = ledger.epsilon(DELTA, job="fl")
    assert exact <= ours <= exact * 1.003
    # GaussianDpEvent(z/2) in add-or-remove terms: the same figure
    add_or_remove = PLDAccountant()
    add_or_remove.compose(dp_accounting.GaussianDpEvent(z / 2), rounds)
    assert ours == pytest.approx(add_or_remove.get_epsilon(DELTA), rel=3e-3)
    # one round is one release whatever the entry's steps say
    assert ledger.epsilon(DELTA, job="fl", round=3) == pytest.approx(
        gaussian_epsilon(2 / z), rel=3e-3)


def test_the_site_total_composes_dp_fedavg_rounds_with_dp_sgd_runs() -> None:
    ledger = PrivacyLedger()
    for r in (1, 2, 3):
        ledger.record(job="fl", round=r, mechanism=DP_FEDAVG, noise_multiplier=2.0)
        ledger.record(job="sgd", round=r, noise_multiplier=1.1, sampling_rate=0.05, steps=10)
    reference = pld_replace_one(
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 3),
        poisson_gaussian(1.1, 0.05, 30))
    total = ledger.epsilon(DELTA)
    assert reference <= total <= reference * 1.003
    assert total > max(ledger.epsilon(DELTA, job="fl"), ledger.epsilon(DELTA, job="sgd"))


# --- local_train records every run; a DP-SGD site refuses delta >= 1/n ----------------

MODEL = ModelSpec("logistic", {"in_features": 2})


def _site(tmp_path: Path, n: int):  # type: ignore[no-untyped-def]
    p = tmp_path / f"rows{n}.csv"
    p.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(n)))
    return load_site_data(DatasetSpec(name="rows", kind="tabular", path=str(p), task="binary",
                                      features=("a", "b"), target="y", val_fraction=0.0))


@pytest.mark.parametrize(("privacy", "mechanism"), [
    ({}, NO_DP),
    ({"client_dp": ClientDPConfig(clip_norm=0.5, noise_multiplier=1.2, cohort_size=3)},
     DP_FEDAVG),
    ({"dp": DPConfig(noise_multiplier=1.1)}, DP_SGD),
    # DP-FedAvg on DP-SGD weights is post-processing: the DP-SGD bound is recorded
    ({"dp": DPConfig(noise_multiplier=1.1),
      "client_dp": ClientDPConfig(clip_norm=0.5, noise_multiplier=1.2, cohort_size=3)},
     DP_SGD),
])
def test_local_train_records_every_run_pending_with_its_mechanism(
        tmp_path: Path, privacy: dict, mechanism: str) -> None:
    state = ClientState(job="job-1")
    cfg = TrainConfig(steps=3, batch_size=8, lr=0.1, **privacy)
    out = local_train(MODEL, flatten(build_model(MODEL)), _site(tmp_path, 64), cfg, round=1,
                      state=state)
    assert out.ledger_key == ("job-1", 1, 1)
    entry = state.ledger.entry(out.ledger_key)
    assert (entry["mechanism"], entry["status"]) == (mechanism, "pending")
    assert state.ledger.epsilon(DELTA) == 0.0
    state.ledger.release(out.ledger_key)
    spent = state.ledger.epsilon(DELTA)
    if mechanism == NO_DP:
        assert spent == math.inf
    elif mechanism == DP_FEDAVG:
        assert (entry["noise_multiplier"], entry["clip_norm"], entry["cohort_size"]) == \
            (1.2, 0.5, 3)
        assert spent == pytest.approx(gaussian_epsilon(2 / 1.2), rel=3e-3)
    else:
        assert spent == epsilon_for(noise_multiplier=1.1, sampling_rate=8 / 64, steps=3,
                                    delta=DELTA)


def test_a_dp_sgd_site_refuses_a_delta_not_below_one_over_its_records(tmp_path: Path) -> None:
    data = _site(tmp_path, 64)  # 1/n = 0.015625
    for delta in (0.5, 1 / 64):
        state = ClientState(job="job-1")
        cfg = TrainConfig(steps=2, batch_size=8, lr=0.1,
                          dp=DPConfig(noise_multiplier=1.1, delta=delta))
        with pytest.raises(ValueError, match=rf"train\.dp\.delta={delta:g} is not below "
                                             r"1/n = 0\.01562 for this site's n=64 training"):
            local_train(MODEL, flatten(build_model(MODEL)), data, cfg, round=1, state=state)
        assert state.ledger.entries == []
    cfg = TrainConfig(steps=2, batch_size=8, lr=0.1,
                      dp=DPConfig(noise_multiplier=1.1, delta=0.01))
    out = local_train(MODEL, flatten(build_model(MODEL)), data, cfg, round=1,
                      state=ClientState(job="job-1"))
    assert np.all(np.isfinite(out.weights)) and out.epsilon is not None
