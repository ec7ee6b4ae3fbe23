"""CUDA kernels: bit-identical to the CPU path. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from fedge import core

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not core.info()["cuda_compiled"] or core.info()["gpus"] == 0
        or not torch.cuda.is_available(),
        reason="needs the CUDA build, an NVIDIA GPU and a CUDA-enabled torch",
    ),
]  # fmt: skip


def _host_u32(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int32).cpu().numpy().view(np.uint32)


@pytest.mark.parametrize(
    ("n", "offset"), [(0, 0), (1, 0), (5, 3), (1_000_003, 7), (4096, 2**34 + 1)]
)
def test_prg_on_device_equals_cpu(n: int, offset: int) -> None:
    seed = bytes(range(16))
    got = core.prg(seed, n, offset, device="cuda")
    np.testing.assert_array_equal(_host_u32(got), core.prg(seed, n, offset))


def test_masks_on_device_equal_cpu() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**32, 300_001, dtype=np.uint32)
    seeds = [rng.bytes(16) for _ in range(70)]  # more than one launch's worth of keys
    signs = [1 if i % 3 else -1 for i in range(70)]
    cpu = base.copy()
    core.apply_masks(cpu, seeds, signs, offset_words=5)
    dev = torch.from_numpy(base.view(np.int32).copy()).cuda()
    core.apply_masks(dev, seeds, signs, offset_words=5)
    np.testing.assert_array_equal(_host_u32(dev), cpu)


def test_quantise_and_dequantise_on_device_equal_cpu() -> None:
    x = (np.random.default_rng(1).standard_normal(100_003) * 2).astype(np.float32)
    seed = b"k" * 16
    q_cpu = core.quantise(x, clip=1.5, bits=24, seed=seed)
    q_dev = core.quantise(torch.from_numpy(x).cuda(), clip=1.5, bits=24, seed=seed)
    np.testing.assert_array_equal(_host_u32(q_dev), q_cpu)
    back = core.dequantise(q_dev, n_summands=1, clip=1.5, bits=24)
    np.testing.assert_array_equal(
        back.cpu().numpy(), core.dequantise(q_cpu, n_summands=1, clip=1.5, bits=24)
    )


def test_quantise_on_device_into_out_equals_cpu_and_checks_out() -> None:
    x = (np.random.default_rng(3).standard_normal(50_001)).astype(np.float32)
    seed = b"o" * 16
    xd = torch.from_numpy(x).cuda()
    out = torch.zeros(x.size, dtype=torch.uint32, device="cuda")
    assert core.quantise(xd, clip=1.0, bits=20, seed=seed, out=out) is out
    np.testing.assert_array_equal(_host_u32(out), core.quantise(x, clip=1.0, bits=20, seed=seed))
    with pytest.raises(ValueError, match="out has 10 elements but x has 50001"):
        core.quantise(xd, clip=1.0, bits=20, seed=seed, out=out[:10])
    with pytest.raises(TypeError, match="out must be a CUDA tensor"):
        core.quantise(xd, clip=1.0, bits=20, seed=seed, out=np.zeros(x.size, np.uint32))
    with pytest.raises(ValueError, match="out overlaps x"):
        core.quantise(xd, clip=1.0, bits=20, seed=seed, out=xd.view(torch.uint32))


def test_quantise_on_device_refuses_nan() -> None:
    x = torch.zeros(1000, device="cuda")
    x[500] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        core.quantise(x, clip=1.0, bits=8, seed=bytes(16))


def test_sgd_on_device_equals_cpu() -> None:
    rng = np.random.default_rng(2)
    w, g, wg, c, ci = (rng.standard_normal(10_001).astype(np.float32) for _ in range(5))
    buf = np.zeros_like(w)
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "prox_mu": 0.01}
    dev = [torch.from_numpy(a.copy()).cuda() for a in (w, g, buf, wg, c, ci)]
    for first in (True, False):
        core.sgd_step(w, g, buf, global_params=wg, scaffold_c=c, scaffold_ci=ci,
                      first_step=first, **kw)  # fmt: skip
        core.sgd_step(dev[0], dev[1], dev[2], global_params=dev[3], scaffold_c=dev[4],
                      scaffold_ci=dev[5], first_step=first, **kw)  # fmt: skip
    np.testing.assert_array_equal(dev[0].cpu().numpy(), w)
    np.testing.assert_array_equal(dev[2].cpu().numpy(), buf)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_on_device_equals_cpu(decoupled: bool) -> None:
    rng = np.random.default_rng(3)
    w, g = (rng.standard_normal(10_001).astype(np.float32) for _ in range(2))
    m, v = np.zeros_like(w), np.zeros_like(w)
    dev = [torch.from_numpy(a.copy()).cuda() for a in (w, g, m, v)]
    kw = {"lr": 1e-3, "weight_decay": 0.01, "decoupled": decoupled}
    for step in (1, 2, 3):
        core.adam_step(w, g, m, v, step=step, **kw)
        core.adam_step(*dev, step=step, **kw)
    # libm's and CUDA's sqrt are both correctly rounded; pow is computed on the host
    np.testing.assert_array_equal(dev[0].cpu().numpy(), w)
    np.testing.assert_array_equal(dev[3].cpu().numpy(), v)


def test_device_operands_must_share_a_length() -> None:
    p = torch.zeros(10, device="cuda")
    with pytest.raises(ValueError, match="grads has 9 elements but params has 10"):
        core.sgd_step(p, torch.zeros(9, device="cuda"), None, lr=0.1)
    with pytest.raises(TypeError, match="grads must be a CUDA tensor"):
        core.sgd_step(p, np.zeros(10, np.float32), None, lr=0.1)


def test_clip_l2_on_device_agrees_with_cpu() -> None:
    v = np.random.default_rng(4).standard_normal(100_001).astype(np.float32)
    dev = torch.from_numpy(v.copy()).cuda()
    n_cpu = core.clip_l2(v, 10.0)
    n_dev = core.clip_l2(dev, 10.0)
    assert n_dev == pytest.approx(n_cpu, rel=1e-12)
    np.testing.assert_allclose(dev.cpu().numpy(), v, rtol=1e-6)


def test_noise_on_device_has_the_cpu_values_to_a_few_ulps() -> None:
    cpu = np.zeros(100_001, np.float32)
    dev = torch.zeros(100_001, device="cuda")
    core.add_gaussian_noise(cpu, std=1.0, seed=b"g" * 16)
    core.add_gaussian_noise(dev, std=1.0, seed=b"g" * 16)
    np.testing.assert_allclose(dev.cpu().numpy(), cpu, rtol=1e-5, atol=1e-6)
