"""One contiguous parameter buffer and the fused optimiser steps over it.

``FlatParams`` rewires a module so that every parameter (and its gradient) is a
view into one float32 buffer. The optimiser then works on a single 1-D array:
the compiled core's fused ``sgd_step`` / ``adam_step`` (momentum, weight
decay, FedProx proximal term, SCAFFOLD correction in one pass) when it is
built and the buffer lives on the CPU; the same arithmetic in torch otherwise
(CUDA buffers, or a build without the core). ``tests/train/test_optim.py``
holds the two to each other and to ``torch.optim``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["AdamStepper", "FlatParams", "SGDStepper", "core_function", "flatten", "load_flat"]


def core_function(name: str) -> Callable[..., Any] | None:
    """``fedge.core.<name>`` when the compiled core is importable and has it, else None."""
    try:
        core = importlib.import_module("fedge.core")
        compiled = importlib.import_module("fedge._core")
    except ImportError:
        return None
    fn = getattr(core, name, None)
    # the Python face may be newer than the built extension: require both
    return fn if callable(fn) and hasattr(compiled, name) else None


def _core_for(name: str, device: torch.device) -> Callable[..., Any] | None:
    fn = core_function(name)
    if fn is None or device.type == "cpu":
        return fn
    try:
        info = importlib.import_module("fedge.core").info()
    except Exception:  # an extension without info() cannot run CUDA kernels either
        return None
    return fn if info.get("cuda_compiled") else None


def _select_kernel(name: str, device: torch.device, backend: str) -> Callable[..., Any] | None:
    """The core's fused kernel for `name` when `backend` allows it (None: use torch).

    Raises: RuntimeError if backend is "core" and the core lacks the kernel here.
    """
    core = _core_for(name, device)
    if backend == "core" and core is None:
        raise RuntimeError(f"backend 'core' asked but fedge.core.{name} is unavailable")
    return core if backend in ("auto", "core") else None


def flatten(model: nn.Module) -> np.ndarray:
    """All parameters, in ``model.parameters()`` order, as one float32 vector (a copy)."""
    with torch.no_grad():
        parts = [p.detach().reshape(-1).to("cpu", torch.float32) for p in model.parameters()]
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(parts).numpy().copy()


def load_flat(model: nn.Module, flat: np.ndarray) -> None:
    """Copy a flat float32 vector into the model's parameters, in order.

    Raises:
        ValueError: ``flat`` is not 1-D or its length differs from the parameter count.
    """
    arr = np.asarray(flat)
    n = sum(p.numel() for p in model.parameters())
    if arr.ndim != 1 or arr.size != n:
        raise ValueError(f"flat weights have shape {arr.shape}, the model needs ({n},)")
    if not np.all(np.isfinite(arr)):
        raise ValueError("flat weights contain NaN or infinite values")
    src = torch.from_numpy(arr.astype(np.float32, copy=False))
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            k = p.numel()
            p.copy_(src[offset : offset + k].view_as(p))
            offset += k


class FlatParams:
    """Rewires ``model`` so its parameters and gradients are views of two flat buffers."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
        self.model = model
        self.data = torch.empty(n, dtype=torch.float32, device=device)
        self.grad = torch.zeros(n, dtype=torch.float32, device=device)
        offset = 0
        with torch.no_grad():
            for p in params:
                k = p.numel()
                self.data[offset : offset + k].copy_(p.detach().reshape(-1))
                p.data = self.data[offset : offset + k].view_as(p)
                p.grad = self.grad[offset : offset + k].view_as(p)
                offset += k
        self.size = n

    def load(self, flat: np.ndarray) -> None:
        """Copy weights into the buffer.

        Raises:
            ValueError: wrong length or non-finite values.
        """
        arr = np.asarray(flat, dtype=np.float32)
        if arr.ndim != 1 or arr.size != self.size:
            raise ValueError(f"flat weights have shape {arr.shape}, the model needs ({self.size},)")
        if not np.all(np.isfinite(arr)):
            raise ValueError("flat weights contain NaN or infinite values")
        with torch.no_grad():
            self.data.copy_(torch.from_numpy(arr).to(self.data.device))

    def numpy(self) -> np.ndarray:
        return self.data.detach().to("cpu").numpy().copy()

    def zero_grad(self) -> None:
        self.grad.zero_()

    def grads_are_views(self) -> bool:
        """True while every ``p.grad`` still aliases the flat gradient buffer."""
        base = self.grad.data_ptr()
        end = base + self.grad.numel() * 4
        return all(
            p.grad is not None and base <= p.grad.data_ptr() < end for p in self.model.parameters()
        )


def _arr(t: torch.Tensor) -> Any:
    """numpy view of a CPU buffer (shares memory); CUDA tensors go to the core as they are."""
    return t.detach().numpy() if t.device.type == "cpu" else t.detach()


class SGDStepper:
    """SGD with momentum, weight decay, FedProx and SCAFFOLD terms on a flat buffer.

    Update (torch.optim.SGD conventions; the first momentum step copies the gradient)::

        g = grad + weight_decay*w + prox_mu*(w - w_global) + (c - c_i)
        buf = g  (first step)  |  momentum*buf + (1 - dampening)*g
        w -= lr * (g + momentum*buf if nesterov else buf)
    """

    def __init__(
        self,
        size: int,
        device: torch.device,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        prox_mu: float = 0.0,
        backend: str = "auto",
    ) -> None:
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.dampening = dampening
        self.nesterov = nesterov
        self.prox_mu = prox_mu
        self.buf = torch.zeros(size, dtype=torch.float32, device=device)
        self._first = True
        self._core = _select_kernel("sgd_step", device, backend)
        self.backend = "core" if self._core is not None else "torch"

    def step(
        self,
        w: torch.Tensor,
        grad: torch.Tensor,
        *,
        lr: float,
        global_params: torch.Tensor | None = None,
        scaffold_c: torch.Tensor | None = None,
        scaffold_ci: torch.Tensor | None = None,
    ) -> None:
        if self._core is not None:
            self._core(
                _arr(w),
                _arr(grad),
                _arr(self.buf),
                lr=lr,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                dampening=self.dampening,
                nesterov=self.nesterov,
                prox_mu=self.prox_mu,
                global_params=None if global_params is None else _arr(global_params),
                scaffold_c=None if scaffold_c is None else _arr(scaffold_c),
                scaffold_ci=None if scaffold_ci is None else _arr(scaffold_ci),
                first_step=self._first,
            )
            self._first = False
            return
        with torch.no_grad():
            g = grad.clone()
            if self.weight_decay:
                g.add_(w, alpha=self.weight_decay)
            if self.prox_mu and global_params is not None:
                g.add_(w - global_params, alpha=self.prox_mu)
            if scaffold_c is not None and scaffold_ci is not None:
                g.add_(scaffold_c - scaffold_ci)
            if self.momentum:
                if self._first:
                    self.buf.copy_(g)
                else:
                    self.buf.mul_(self.momentum).add_(g, alpha=1.0 - self.dampening)
                g = g.add(self.buf, alpha=self.momentum) if self.nesterov else self.buf
            w.add_(g, alpha=-lr)
        self._first = False


class AdamStepper:
    """Adam (or AdamW with ``decoupled``) on a flat buffer, torch.optim conventions."""

    def __init__(
        self,
        size: int,
        device: torch.device,
        *,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
        prox_mu: float = 0.0,
        backend: str = "auto",
    ) -> None:
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.weight_decay, self.decoupled, self.prox_mu = weight_decay, decoupled, prox_mu
        self.exp_avg = torch.zeros(size, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros(size, dtype=torch.float32, device=device)
        self.t = 0
        self._core = _select_kernel("adam_step", device, backend)
        self.backend = "core" if self._core is not None else "torch"

    def step(
        self,
        w: torch.Tensor,
        grad: torch.Tensor,
        *,
        lr: float,
        global_params: torch.Tensor | None = None,
        scaffold_c: torch.Tensor | None = None,
        scaffold_ci: torch.Tensor | None = None,
    ) -> None:
        self.t += 1
        with torch.no_grad():
            g = grad
            extra = (self.prox_mu and global_params is not None) or (
                scaffold_c is not None and scaffold_ci is not None
            )
            if extra:
                g = grad.clone()
                if self.prox_mu and global_params is not None:
                    g.add_(w - global_params, alpha=self.prox_mu)
                if scaffold_c is not None and scaffold_ci is not None:
                    g.add_(scaffold_c - scaffold_ci)
            if self._core is not None:
                self._core(
                    _arr(w),
                    _arr(g.contiguous()),
                    _arr(self.exp_avg),
                    _arr(self.exp_avg_sq),
                    step=self.t,
                    lr=lr,
                    beta1=self.beta1,
                    beta2=self.beta2,
                    eps=self.eps,
                    weight_decay=self.weight_decay,
                    decoupled=self.decoupled,
                )
                return
            if self.weight_decay:
                if self.decoupled:
                    w.mul_(1.0 - lr * self.weight_decay)
                else:
                    g = g.add(w, alpha=self.weight_decay)
            self.exp_avg.mul_(self.beta1).add_(g, alpha=1.0 - self.beta1)
            self.exp_avg_sq.mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
            bc1 = 1.0 - self.beta1**self.t
            bc2 = 1.0 - self.beta2**self.t
            denom = (self.exp_avg_sq / bc2).sqrt_().add_(self.eps)
            w.addcdiv_(self.exp_avg, denom, value=-lr / bc1)
