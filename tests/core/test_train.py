"""Fused optimiser kernels against torch's optimisers and the formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedge import core

D = 10_007


def _close(got: np.ndarray, want: np.ndarray) -> None:
    # float32 results computed along different (double vs float) routes:
    # relative error 1e-6 per element, with an absolute floor of 1e-6 of the
    # vector's scale for elements that pass near zero.
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * scale)


def _grads(rng: np.random.Generator, steps: int) -> list[np.ndarray]:
    return [rng.standard_normal(D).astype(np.float32) for _ in range(steps)]


@pytest.mark.parametrize(
    "hp",
    [
        {"momentum": 0.0, "weight_decay": 0.0},
        {"momentum": 0.9, "weight_decay": 1e-4},
        {"momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
        {"momentum": 0.5, "dampening": 0.3},
    ],
)
def test_sgd_matches_torch(hp: dict) -> None:
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal(D).astype(np.float32)
    grads = _grads(rng, 5)
    tp = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.SGD([tp], lr=0.05, foreach=False, **hp)
    w = w0.copy()
    buf = np.zeros(D, np.float32)
    for i, g in enumerate(grads):
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        core.sgd_step(w, g, buf, lr=0.05, first_step=(i == 0), **hp)
        _close(w, tp.detach().numpy())


def test_sgd_accepts_cpu_torch_tensors_in_place() -> None:
    p = torch.ones(10)
    core.sgd_step(p, torch.full((10,), 2.0), None, lr=0.5)
    assert torch.equal(p, torch.zeros(10))


def test_fedprox_and_scaffold_terms_follow_the_formula() -> None:
    rng = np.random.default_rng(2)
    w, g, wg, c, ci = (rng.standard_normal(D).astype(np.float32) for _ in range(5))
    lr, mu, wd = 0.1, 0.01, 1e-3
    d = [a.astype(np.float64) for a in (w, g, wg, c, ci)]
    corrected = d[1] + mu * (d[0] - d[2]) + (d[3] - d[4]) + wd * d[0]
    want = (d[0] - lr * corrected).astype(np.float32)
    got = w.copy()
    core.sgd_step(
        got, g, None, lr=lr, weight_decay=wd, prox_mu=mu, global_params=wg,
        scaffold_c=c, scaffold_ci=ci,
    )  # fmt: skip
    _close(got, want)


def test_fedprox_with_momentum_matches_torch_on_the_corrected_gradient() -> None:
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal(D).astype(np.float32)
    wg = rng.standard_normal(D).astype(np.float32)
    mu = 0.05
    tp = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.SGD([tp], lr=0.02, momentum=0.9, foreach=False)
    w, buf = w0.copy(), np.zeros(D, np.float32)
    for i, g in enumerate(_grads(rng, 4)):
        tp.grad = torch.from_numpy(g) + mu * (tp.detach() - torch.from_numpy(wg))
        opt.step()
        core.sgd_step(w, g, buf, lr=0.02, momentum=0.9, prox_mu=mu, global_params=wg,
                      first_step=(i == 0))  # fmt: skip
        _close(w, tp.detach().numpy())


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_matches_torch(decoupled: bool, weight_decay: float) -> None:
    rng = np.random.default_rng(4)
    w0 = rng.standard_normal(D).astype(np.float32)
    tp = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([tp], lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay,
              foreach=False)  # fmt: skip
    w, m, v = w0.copy(), np.zeros(D, np.float32), np.zeros(D, np.float32)
    for step, g in enumerate(_grads(rng, 6), start=1):
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        core.adam_step(w, g, m, v, step=step, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8,
                       weight_decay=weight_decay, decoupled=decoupled)  # fmt: skip
        _close(w, tp.detach().numpy())
    state = opt.state[tp]
    _close(m, state["exp_avg"].numpy())
    _close(v, state["exp_avg_sq"].numpy())


def test_clip_l2_scales_down_and_returns_the_norm() -> None:
    rng = np.random.default_rng(5)
    v = rng.standard_normal(D).astype(np.float32)
    before = float(np.linalg.norm(v.astype(np.float64)))
    orig = v.copy()
    norm = core.clip_l2(v, 1.5)
    assert norm == pytest.approx(before, rel=1e-12)
    assert float(np.linalg.norm(v.astype(np.float64))) == pytest.approx(1.5, rel=1e-6)
    _close(v, (orig.astype(np.float64) * (1.5 / before)).astype(np.float32))


def test_clip_l2_leaves_a_short_vector_alone() -> None:
    v = np.array([0.3, 0.4], np.float32)
    assert core.clip_l2(v, 1.0) == pytest.approx(0.5, rel=1e-7)
    np.testing.assert_array_equal(v, np.array([0.3, 0.4], np.float32))


def test_clip_l2_refuses_nan_and_keeps_the_vector() -> None:
    v = np.array([1.0, np.nan, 2.0], np.float32)
    with pytest.raises(ValueError, match="vec contains NaN"):
        core.clip_l2(v, 1.0)
    assert v[0] == 1.0 and v[2] == 2.0
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        core.clip_l2(np.ones(3, np.float32), 0.0)


def test_gaussian_noise_has_the_right_distribution() -> None:
    from scipy import stats

    n, std = 1_000_001, 0.7
    v = np.zeros(n, np.float32)
    core.add_gaussian_noise(v, std=std, seed=b"dp-noise-seed-01")
    z = v.astype(np.float64) / std
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.std() - 1) < 5 / np.sqrt(2 * n)
    assert stats.kstest(z[:200_000], "norm").pvalue > 1e-4


def test_gaussian_noise_is_deterministic_in_the_seed_and_adds() -> None:
    base = np.arange(1001, dtype=np.float32)
    a, b, c = base.copy(), base.copy(), base.copy()
    core.add_gaussian_noise(a, std=1.0, seed=bytes(16))
    core.add_gaussian_noise(b, std=1.0, seed=bytes(16))
    core.add_gaussian_noise(c, std=1.0, seed=b"\x01" * 16)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(float((a - base).mean())) < 0.2  # noise added to, not written over, base
    d = base.copy()
    core.add_gaussian_noise(d, std=0.0, seed=bytes(16))
    np.testing.assert_array_equal(d, base)


def test_noise_is_the_same_on_every_path() -> None:
    ref = np.zeros(4097, np.float32)
    core.add_gaussian_noise(ref, std=1.0, seed=b"s" * 16, path="portable")
    for p in core.info()["paths"]:
        v = np.zeros(4097, np.float32)
        core.add_gaussian_noise(v, std=1.0, seed=b"s" * 16, path=p)
        np.testing.assert_array_equal(v, ref)


@pytest.mark.parametrize(
    ("call", "exc", "words"),
    [
        (lambda: core.sgd_step(np.zeros(3, np.float32), np.zeros(4, np.float32), None, lr=0.1),
         ValueError, "grads has 4 elements but params has 3"),
        (lambda: core.sgd_step(np.zeros(3, np.float64), np.zeros(3, np.float32), None, lr=0.1),
         TypeError, "params must have dtype float32, got float64"),
        (lambda: core.sgd_step(np.zeros(3, np.float32), np.zeros(3, np.float32), None, lr=0.1,
                               momentum=0.9),
         ValueError, "momentum=0.9 needs momentum_buf"),
        (lambda: core.sgd_step(np.zeros(3, np.float32), np.zeros(3, np.float32), None, lr=0.1,
                               prox_mu=0.1),
         ValueError, "prox_mu=0.1 needs global_params"),
        (lambda: core.sgd_step(np.zeros(3, np.float32), np.zeros(3, np.float32), None, lr=0.1,
                               scaffold_c=np.zeros(3, np.float32)),
         ValueError, "scaffold_c and scaffold_ci must be given together"),
        (lambda: core.sgd_step(np.zeros(3, np.float32), np.zeros(3, np.float32), None,
                               lr=float("inf")),
         ValueError, "lr must be finite"),
        (lambda: core.adam_step(*(np.zeros(3, np.float32) for _ in range(4)), step=0, lr=0.1),
         ValueError, "step must be >= 1, got 0"),
        (lambda: core.adam_step(*(np.zeros(3, np.float32) for _ in range(4)), step=1, lr=0.1,
                                beta2=1.0),
         ValueError, r"beta2 must be in \[0, 1\)"),
        (lambda: core.add_gaussian_noise(np.zeros(3, np.float32), std=-1.0, seed=bytes(16)),
         ValueError, "std must be >= 0"),
    ],
)  # fmt: skip
def test_bad_arguments_are_named(call, exc: type, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=words):
        call()


def test_a_tensor_of_the_wrong_dtype_is_named() -> None:
    with pytest.raises(TypeError, match="params must have dtype float32"):
        core.sgd_step(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3), None, lr=0.1)
    with pytest.raises(TypeError, match="params must have dtype float32, got float64"):
        core.sgd_step(torch.zeros(3, dtype=torch.float64), torch.zeros(3), None, lr=0.1)
    with pytest.raises(ValueError, match="params must be C-contiguous"):
        core.sgd_step(torch.zeros(6)[::2], torch.zeros(3), None, lr=0.1)


# ------------------------------------------- tensors written behind autograd
def test_a_tensor_that_requires_grad_is_not_written_under_grad_mode() -> None:
    # autograd cannot record a write through the tensor's memory: refused, as
    # torch refuses an in-place op on a leaf that requires grad.
    w = torch.ones(8, requires_grad=True)
    calls = {
        "sgd_step": lambda: core.sgd_step(w, torch.ones(8), None, lr=0.1),
        "adam_step": lambda: core.adam_step(
            w, torch.ones(8), torch.zeros(8), torch.zeros(8), step=1, lr=0.1
        ),
        "clip_l2": lambda: core.clip_l2(w, 0.5),
        "add_gaussian_noise": lambda: core.add_gaussian_noise(w, std=1.0, seed=bytes(16)),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=r"(params|vec) requires grad"):
            call()
        assert torch.equal(w.detach(), torch.ones(8)), name
    m = torch.zeros(8, requires_grad=True)
    with pytest.raises(TypeError, match="exp_avg requires grad"):
        core.adam_step(torch.ones(8), torch.ones(8), m, torch.zeros(8), step=1, lr=0.1)
    out = torch.zeros(8, dtype=torch.uint32)
    core.quantise(torch.ones(8, requires_grad=True), clip=1.0, bits=8, seed=bytes(16), out=out)


@pytest.mark.parametrize(
    "write",
    [
        lambda w: core.sgd_step(w, torch.ones(8), None, lr=0.1),
        lambda w: core.adam_step(w, torch.ones(8), torch.zeros(8), torch.zeros(8), step=1, lr=0.1),
        lambda w: core.clip_l2(w, 0.5),
        lambda w: core.add_gaussian_noise(w, std=1.0, seed=bytes(16)),
    ],
    ids=["sgd_step", "adam_step", "clip_l2", "add_gaussian_noise"],
)
def test_a_write_under_no_grad_invalidates_graphs_that_saved_the_tensor(write) -> None:  # type: ignore[no-untyped-def]
    # As after torch's own in-place ops: backward through a graph that saved
    # the old values raises instead of silently using the new ones.
    w = torch.ones(8, requires_grad=True)
    loss = (w * w).sum()  # saves w
    with torch.no_grad():
        write(w)
    assert not torch.equal(w.detach(), torch.ones(8))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_negated_view_is_refused_by_type() -> None:
    neg = torch._neg_view(torch.ones(8))
    with pytest.raises(TypeError, match="params is a tensor numpy cannot view"):
        core.sgd_step(neg, torch.ones(8), None, lr=0.1)
    with pytest.raises(TypeError, match="grads is a tensor numpy cannot view"):
        core.sgd_step(torch.ones(8), neg, None, lr=0.1)


# ---------------------------------------------------- buffers that alias
def test_sgd_refuses_a_written_buffer_that_overlaps_another() -> None:
    a = np.arange(9, dtype=np.float32)
    with pytest.raises(ValueError, match="params overlaps grads"):
        core.sgd_step(a[1:], a[:-1], None, lr=1.0)
    np.testing.assert_array_equal(a, np.arange(9))  # nothing written
    buf = np.zeros(16, np.float32)
    with pytest.raises(ValueError, match="momentum_buf overlaps params"):
        core.sgd_step(buf[:8], np.ones(8, np.float32), buf[4:12], lr=0.1, momentum=0.9)
    g = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="params overlaps global_params"):
        core.sgd_step(buf[:8], g, None, lr=0.1, prox_mu=0.1, global_params=buf[:8])
    # operands that are only read may share memory
    c = np.ones(8, np.float32)
    core.sgd_step(buf[:8], g, None, lr=0.1, scaffold_c=c, scaffold_ci=c)
    np.testing.assert_allclose(buf[:8], -0.1)


def test_adam_refuses_a_written_buffer_that_overlaps_another() -> None:
    p, g = np.ones(8, np.float32), np.full(8, 0.5, np.float32)
    m = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="exp_avg_sq overlaps exp_avg"):
        core.adam_step(p, g, m, m, step=1, lr=0.1)
    with pytest.raises(ValueError, match="params overlaps grads"):
        core.adam_step(p, p, m, np.zeros(8, np.float32), step=1, lr=0.1)
    np.testing.assert_array_equal(p, 1.0)
    np.testing.assert_array_equal(m, 0.0)
    # adjacent but separate
    both = np.zeros(16, np.float32)
    core.adam_step(p, g, both[:8], both[8:], step=1, lr=0.1)
    np.testing.assert_allclose(p, 0.9, rtol=1e-6)


def test_the_cuda_paths_refuse_the_same_overlaps_by_pointer() -> None:
    # The CUDA bindings take raw device pointers; fedge.core checks them.
    ptrs = {"params": 4096, "grads": 4096 + 4 * 7, "momentum_buf": 0}
    with pytest.raises(ValueError, match="params overlaps grads"):
        core._cuda_disjoint("sgd_step", 8, ptrs, ("params", "momentum_buf"))
    ptrs["grads"] = 4096 + 4 * 8  # adjacent
    core._cuda_disjoint("sgd_step", 8, ptrs, ("params", "momentum_buf"))
    read_only = {"params": 0, "scaffold_c": 8192, "scaffold_ci": 8192}
    core._cuda_disjoint("sgd_step", 8, read_only, ("params",))
