"""DP-FedAvg noise is sized for the honest sites: a site that assumes f of the K
sites of its cohort could collude with the coordinator adds N(0, (zS)^2 / (K - f)),
so the K - f honest shares alone carry the N(0, (zS)^2) that ε is accounted at.

Each site used to add N(0, (zS)^2 / K) whatever it assumed: f colluders leaving
their noise out left the sum with z·sqrt((K - f) / K), and the ε shown was too small.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedge.train.api import ClientState, TrainConfig, local_train
from fedge.train.data import SiteData, Split
from fedge.train.models import ModelSpec
from fedge.train.privacy import (
    ClientDPConfig,
    dp_fedavg_privatise,
    dp_fedavg_share_std,
    honest_sites,
)

N = 400_000  # the sd of N draws is within 0.5 % of the true one at ~4.5 standard errors
Z, S = 1.3, 0.5


def noise(cfg: ClientDPConfig, colluders: int, site: int) -> np.ndarray:
    """One site's share on a zero update (so the share is its noise alone)."""
    share, norm = dp_fedavg_privatise(np.zeros(N, np.float32), cfg, colluders=colluders,
                                      seed=bytes([site]) * 16)
    assert norm == 0.0
    return share.astype(np.float64)


@pytest.mark.parametrize(("cohort", "colluders"), [(4, 0), (4, 1), (4, 2), (4, 3), (7, 5)])
def test_the_honest_sites_shares_alone_carry_the_noise_epsilon_is_accounted_at(
        cohort, colluders):
    cfg = ClientDPConfig(clip_norm=S, noise_multiplier=Z, cohort_size=cohort)
    assert dp_fedavg_share_std(cfg, colluders) == pytest.approx(
        Z * S / np.sqrt(cohort - colluders))
    # the colluders leave their noise out: what stays in the sum is the honest sites'
    honest = sum(noise(cfg, colluders, site) for site in range(cohort - colluders))
    assert float(honest.std()) == pytest.approx(Z * S, rel=0.005)


def test_without_colluders_each_share_is_sized_for_the_whole_cohort():
    cfg = ClientDPConfig(clip_norm=S, noise_multiplier=Z, cohort_size=4)
    assert float(noise(cfg, 0, 1).std()) == pytest.approx(Z * S / 2, rel=0.005)


def test_a_cohort_with_no_honest_site_left_is_refused_naming_both_settings():
    cfg = ClientDPConfig(clip_norm=S, noise_multiplier=Z, cohort_size=3)
    assert honest_sites(cfg, 2) == 1
    for colluders in (3, 5):
        with pytest.raises(ValueError, match=(
                rf"cohort_size = 3 leaves no honest site when {colluders} may collude "
                rf"\(this site's \[privacy\] max_colluders = {colluders}\)")):
            dp_fedavg_privatise(np.zeros(4, np.float32), cfg, colluders=colluders)
    with pytest.raises(ValueError, match="colluders=-1 must be an integer >= 0"):
        honest_sites(cfg, -1)


def test_local_train_refuses_before_training_and_records_nothing():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 2)).astype(np.float32)
    data = SiteData("s", "binary", ["a", "b"], Split(x, (x[:, 0] > 0).astype(np.float32)))
    cfg = TrainConfig.from_dict({"steps": 2, "batch_size": 8, "client_dp": {
        "clip_norm": 1.0, "noise_multiplier": 1.0, "cohort_size": 2}})
    state = ClientState(job="j")
    spec = ModelSpec("logistic", {"in_features": 2})
    with pytest.raises(ValueError, match="leaves no honest site"):
        local_train(spec, np.zeros(3, np.float32), data, cfg, round=1, state=state,
                    max_colluders=2)
    assert state.ledger.entries == []
    out = local_train(spec, np.zeros(3, np.float32), data, cfg, round=1, state=state,
                      max_colluders=1)
    assert np.all(np.isfinite(out.weights))
