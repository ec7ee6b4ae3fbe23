"""What a site's training releases, and the mismatches it names before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.train.api import (
    DatasetSpec,
    ModelSpec,
    TrainConfig,
    load_site_data,
    local_train,
)
from fedge.train.privacy import ClientDPConfig

COX = ModelSpec("cox_linear", {"in_features": 39})


def _centre(tcga_dir: Path):  # type: ignore[no-untyped-def]
    return load_site_data(DatasetSpec(name="c0", kind="fed_tcga_brca", path=str(tcga_dir),
                                      site=0, val_fraction=0.0))


def test_dp_fedavg_releases_only_the_noised_weights_not_the_update_norm_or_loss(
    tcga_dir: Path,
) -> None:
    """Under DP-FedAvg the raw update's norm (before clipping and noise) and the raw
    batches' loss are outside the mechanism; they stay in the site's journal."""
    cfg = TrainConfig(steps=5, batch_size=16, lr=0.05, seed=7,
                      client_dp=ClientDPConfig(clip_norm=0.1, noise_multiplier=1.0,
                                               cohort_size=3))
    out = local_train(COX, np.zeros(40, np.float32), _centre(tcga_dir), cfg, round=1)
    assert set(out.metrics) == {"steps", "lr"}  # data-independent
    assert set(out.local_metrics) == {"update_norm", "train_loss"}
    assert out.local_metrics["update_norm"] > 0 and np.isfinite(out.local_metrics["train_loss"])
    plain = local_train(COX, np.zeros(40, np.float32), _centre(tcga_dir),
                        TrainConfig(steps=5, batch_size=16, lr=0.05, seed=7), round=1)
    assert "train_loss" in plain.metrics  # without DP the loss is a round metric as before


def test_a_site_whose_feature_count_is_not_the_models_is_named(tcga_dir: Path) -> None:
    wide = ModelSpec("cox_linear", {"in_features": 40})
    with pytest.raises(ValueError, match=r"'c0' has 39 features at this site but "
                                         r"model\.params\.in_features is 40"):
        local_train(wide, np.zeros(41, np.float32), _centre(tcga_dir),
                    TrainConfig(steps=1, batch_size=8, lr=0.01), round=1)
