"""FedProx and SCAFFOLD client terms, and local training on other tasks and models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.train.api import (
    ClientState,
    DatasetSpec,
    ModelSpec,
    TrainConfig,
    build_model,
    evaluate,
    flatten,
    load_site_data,
    local_train,
)

COX = ModelSpec("cox_linear", {"in_features": 39})


@pytest.fixture(scope="module")
def site(tcga_dir: Path):  # type: ignore[no-untyped-def]
    return load_site_data(
        DatasetSpec(name="c3", kind="fed_tcga_brca", path=str(tcga_dir), site=3, val_fraction=0.0)
    )


def test_fedprox_keeps_the_local_model_closer_to_the_global_one(site) -> None:  # type: ignore[no-untyped-def]
    w0 = flatten(build_model(COX))
    far = local_train(COX, w0, site, TrainConfig(steps=60, batch_size=8, lr=0.1), round=0)
    near = local_train(
        COX, w0, site, TrainConfig(steps=60, batch_size=8, lr=0.1, prox_mu=5.0), round=0
    )
    assert np.linalg.norm(near.weights - w0) < 0.7 * np.linalg.norm(far.weights - w0)


def test_scaffold_updates_the_control_variate_by_option_two(site) -> None:  # type: ignore[no-untyped-def]
    w0 = flatten(build_model(COX))
    state = ClientState(job="s")
    c = np.full(40, 0.01, np.float32)
    cfg = TrainConfig(steps=30, batch_size=8, lr=0.05, scaffold=True)
    out = local_train(COX, w0, site, cfg, round=0, state=state, server_control=c)
    expected_ci = -c + (w0 - out.weights) / (30 * 0.05)  # c_i was 0
    np.testing.assert_allclose(state.scaffold_ci, expected_ci, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.extra["scaffold_delta_c"], expected_ci, rtol=1e-4, atol=1e-6)
    # the correction changes the trajectory
    plain = local_train(COX, w0, site, TrainConfig(steps=30, batch_size=8, lr=0.05), round=0)
    assert not np.allclose(plain.weights, out.weights)
    with pytest.raises(ValueError, match="server_control of length 40"):
        local_train(COX, w0, site, cfg, round=1, state=state, server_control=None)


def test_cox_mlp_and_adam_train(site) -> None:  # type: ignore[no-untyped-def]
    spec = ModelSpec("cox_mlp", {"in_features": 39, "hidden": [16]})
    w0 = flatten(build_model(spec))
    out = local_train(
        spec, w0, site, TrainConfig(steps=40, batch_size=16, optimizer="adam", lr=0.005), round=0
    )
    assert evaluate(spec, out.weights, site, "train").metrics["c_index"] > 0.6


def test_logistic_binary_task_reports_classification_metrics(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=300) > 0).astype(int)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_site_data(
        DatasetSpec(
            name="b", kind="numpy", path=str(tmp_path / "d.npz"), task="binary", val_fraction=0.3
        )
    )
    spec = ModelSpec("logistic", {"in_features": 4})
    out = local_train(
        spec,
        flatten(build_model(spec)),
        data,
        TrainConfig(epochs=5, batch_size=32, lr=0.5),
        round=0,
    )
    m = evaluate(spec, out.weights, data, "val").metrics
    assert m["accuracy"] > 0.85 and m["roc_auc"] > 0.9 and m["brier"] < 0.15
    assert 0 <= m["balanced_accuracy"] <= 1


def _scans(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, centre in (("clear", 0), ("lesion", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            img = rng.integers(0, 60, size=(64, 64)).astype(np.uint8)
            if centre:
                img[24:40, 24:40] = 250  # a bright lesion
            Image.fromarray(img).save(root / cls / f"{i}.png")


def test_resnet_small_trains_on_an_image_folder(tmp_path: Path) -> None:
    _scans(tmp_path)
    data = load_site_data(
        DatasetSpec(
            name="scans",
            kind="images",
            path=str(tmp_path),
            task="binary",
            classes=("clear", "lesion"),
            val_fraction=0.0,
            image_size=32,
        )
    )
    spec = ModelSpec("resnet_small", {"classes": 2, "width": 4})
    w0 = flatten(build_model(spec))
    out = local_train(
        spec, w0, data, TrainConfig(steps=10, batch_size=12, optimizer="adam", lr=0.01), round=0
    )
    assert out.n_examples == 12 and not np.array_equal(out.weights, w0)
    assert evaluate(spec, out.weights, data, "train").metrics["accuracy"] >= 0.9


@pytest.mark.gpu
def test_cuda_training_matches_cpu(site) -> None:  # type: ignore[no-untyped-def]
    """Truly needs torch on CUDA: local_train moves the torch model and batches to
    device="cuda". With a CPU-only torch it skips even where a GPU is present."""
    from fedge import core

    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip(f"training with device='cuda' needs a CUDA-enabled torch: torch "
                    f"{torch.__version__} has none (torch.cuda.is_available() is False; "
                    f"GPUs visible to fedge._core: {core.info()['gpus']})")
    w0 = flatten(build_model(COX))
    cpu = local_train(
        COX, w0, site, TrainConfig(steps=20, batch_size=8, lr=0.05, device="cpu"), round=0
    )
    gpu = local_train(
        COX, w0, site, TrainConfig(steps=20, batch_size=8, lr=0.05, device="cuda"), round=0
    )
    np.testing.assert_allclose(gpu.weights, cpu.weights, rtol=1e-4, atol=1e-5)
