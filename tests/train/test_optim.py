"""The flat parameter buffer and the fused optimiser steps, held to torch.optim and to the core."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedge.train.models import ModelSpec, build_model
from fedge.train.optim import AdamStepper, FlatParams, SGDStepper, core_function


def test_parameters_and_gradients_are_views_of_one_buffer() -> None:
    model = build_model(ModelSpec("mlp", {"in_features": 4, "hidden": [5]}))
    flat = FlatParams(model, torch.device("cpu"))
    assert flat.size == 4 * 5 + 5 + 5 + 1
    flat.data.fill_(0.5)
    assert all(torch.all(p == 0.5) for p in model.parameters())
    model(torch.ones(3, 4)).sum().backward()
    assert flat.grads_are_views()
    assert float(flat.grad.abs().sum()) > 0  # autograd wrote into the flat buffer
    flat.zero_grad()
    assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters())


def _torch_reference(opt_name: str, steps: int, **kw: float) -> np.ndarray:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(50))
    grads = [torch.randn(50) for _ in range(steps)]
    if opt_name == "sgd":
        opt = torch.optim.SGD([w], **kw)
    elif opt_name == "adamw":
        opt = torch.optim.AdamW([w], **kw)
    else:
        opt = torch.optim.Adam([w], **kw)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach().numpy()


def _ours(stepper_cls: type, steps: int, lr: float, **kw: object) -> np.ndarray:
    torch.manual_seed(0)
    w = torch.randn(50)
    grads = [torch.randn(50) for _ in range(steps)]
    st = stepper_cls(50, torch.device("cpu"), backend="torch", **kw)
    for g in grads:
        st.step(w, g, lr=lr)
    return w.numpy()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"momentum": 0.9},
        {"momentum": 0.9, "weight_decay": 0.01},
        {"momentum": 0.8, "nesterov": True},
        {"momentum": 0.9, "dampening": 0.3},
    ],
)
def test_torch_backend_sgd_equals_torch_optim(kw: dict[str, float]) -> None:
    ref = _torch_reference("sgd", 6, lr=0.1, **kw)
    np.testing.assert_allclose(_ours(SGDStepper, 6, 0.1, **kw), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "name,kw", [("adam", {}), ("adam", {"weight_decay": 0.01}), ("adamw", {"weight_decay": 0.01})]
)
def test_torch_backend_adam_equals_torch_optim(name: str, kw: dict[str, float]) -> None:
    ref = _torch_reference(name, 6, lr=0.01, **kw)
    ours = _ours(AdamStepper, 6, 0.01, decoupled=name == "adamw", **kw)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(core_function("sgd_step") is None, reason="compiled core without sgd_step")
@pytest.mark.parametrize(
    "kw", [{"momentum": 0.9, "weight_decay": 0.01, "prox_mu": 0.1}, {"prox_mu": 0.0}]
)
def test_core_and_torch_backends_agree_with_prox_and_scaffold(kw: dict[str, float]) -> None:
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=64).astype(np.float32)
    g_list = [rng.normal(size=64).astype(np.float32) for _ in range(5)]
    glob = torch.from_numpy(rng.normal(size=64).astype(np.float32))
    c = torch.from_numpy(rng.normal(size=64).astype(np.float32) * 0.1)
    ci = torch.from_numpy(rng.normal(size=64).astype(np.float32) * 0.1)
    out = {}
    for backend in ("core", "torch"):
        w = torch.from_numpy(w0.copy())
        st = SGDStepper(64, torch.device("cpu"), backend=backend, **kw)
        assert st.backend == backend
        for g in g_list:
            st.step(
                w, torch.from_numpy(g), lr=0.05, global_params=glob, scaffold_c=c, scaffold_ci=ci
            )
        out[backend] = w.numpy()
    np.testing.assert_allclose(out["core"], out["torch"], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(core_function("adam_step") is None, reason="compiled core without adam_step")
def test_core_and_torch_adam_agree() -> None:
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=64).astype(np.float32)
    g_list = [rng.normal(size=64).astype(np.float32) for _ in range(5)]
    out = {}
    for backend in ("core", "torch"):
        w = torch.from_numpy(w0.copy())
        st = AdamStepper(64, torch.device("cpu"), backend=backend, weight_decay=0.01)
        for g in g_list:
            st.step(w, torch.from_numpy(g), lr=0.01)
        out[backend] = w.numpy()
    np.testing.assert_allclose(out["core"], out["torch"], rtol=1e-5, atol=1e-6)
