"""GPU check: CUDA PRG, masks and quantisation bit-identical to the CPU path.

On a machine with an NVIDIA GPU, a CUDA-enabled torch and the core built with
CUDA, this compares the device results with the CPU results word for word at
lengths 3, 1_000_003 and ``--d`` (odd lengths reach the kernels' tails), and
measures device throughput at ``--d`` (GB/s of mask applied, quantised
elements/s), in well under three minutes. If `fedge.health.gpu_report_text()`
exists, its report is printed first.

Where no GPU exists (neither ``nvidia-smi -L`` nor NVML finds one) it says why
it skipped and exits 0. Where one exists but the check cannot reach it (the
core built without CUDA, torch without CUDA, the core seeing no device), that
is a failure: it names why and exits 1.

Last line: `GPU_CHECK ok=<bool> prg_identical=... mask_identical=...
quantise_identical=... mask_gbps=... prg_gbps=... quantise_gelem_s=...`
(or `GPU_CHECK skipped reason=...`, or `GPU_CHECK ok=False reason=...`).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
import time

import numpy as np

from fedge import core


def _health_report() -> None:
    try:
        health = importlib.import_module("fedge.health")
    except ImportError:
        return
    report = getattr(health, "gpu_report_text", None)
    if callable(report):
        try:
            print(report())
        except Exception as exc:  # a report failure must not hide the check itself
            print(f"fedge.health.gpu_report_text() failed: {exc!r}")


def _gpu_present() -> str | None:
    """How a GPU was found on this machine, independently of the core and torch
    (``nvidia-smi -L``, else NVML), or None when neither finds one."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            listed = None
        gpus = [] if listed is None else [
            line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
        if gpus:
            return f"nvidia-smi -L lists {len(gpus)} GPU(s): {gpus[0]}"
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no library, no driver: NVML finds nothing
        return None
    return f"NVML finds {count} GPU(s)" if count > 0 else None


def _skip_reason() -> str | None:
    info = core.info()
    if not info["cuda_compiled"]:
        return "core_built_without_cuda"
    if info["gpus"] == 0:
        return "no_gpu_visible"
    try:
        import torch
    except ImportError:
        return "torch_missing"
    if not torch.cuda.is_available():
        return "torch_without_cuda"
    return None


def _u32(t: object) -> np.ndarray:
    import torch

    assert isinstance(t, torch.Tensor)
    return t.view(torch.int32).cpu().numpy().view(np.uint32)


def _timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    import torch

    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def _identical(n: int, seeds: list[bytes], signs: list[int], rng: np.random.Generator
               ) -> dict[str, bool]:
    """Whether the device's PRG, masks and quantise + dequantise equal the CPU's, word
    for word, on n words."""
    import torch

    # PRG at an offset that is not a multiple of 4
    prg_ok = bool(
        np.array_equal(_u32(core.prg(seeds[0], n, 3, device="cuda")), core.prg(seeds[0], n, 3))
    )
    base = rng.integers(0, 2**32, n, dtype=np.uint32)
    cpu = base.copy()
    core.apply_masks(cpu, seeds, signs, offset_words=1, threads=2)
    dev = torch.from_numpy(base.view(np.int32).copy()).cuda()
    core.apply_masks(dev, seeds, signs, offset_words=1)
    mask_ok = bool(np.array_equal(_u32(dev), cpu))
    x = (rng.standard_normal(n) * 2).astype(np.float32)
    q_cpu = core.quantise(x, clip=3.0, bits=24, seed=seeds[1], threads=2)
    q_dev = core.quantise(torch.from_numpy(x).cuda(), clip=3.0, bits=24, seed=seeds[1])
    deq_cpu = core.dequantise(q_cpu, n_summands=1, clip=3.0, bits=24)
    deq_dev = core.dequantise(q_dev, n_summands=1, clip=3.0, bits=24).cpu().numpy()
    quant_ok = bool(np.array_equal(_u32(q_dev), q_cpu) and np.array_equal(deq_dev, deq_cpu))
    return {"prg": prg_ok, "mask": mask_ok, "quantise": quant_ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=10_000_000, help="vector length (words)")
    ap.add_argument("--k", type=int, default=20, help="number of seeds")
    args = ap.parse_args()
    _health_report()
    print(f"core: {core.info()}")
    reason = _skip_reason()
    if reason is not None:
        present = _gpu_present()
        if present is not None:
            print(f"GPU check failed: {present}, but the CUDA paths cannot run here: "
                  f"{reason}", file=sys.stderr)
            print(f"GPU_CHECK ok=False reason={reason}")
            return 1
        print(f"GPU check skipped: {reason} (and neither nvidia-smi -L nor NVML finds a GPU)")
        print(f"GPU_CHECK skipped reason={reason}")
        return 0

    import torch

    d, k = args.d, args.k
    rng = np.random.default_rng(0)
    seeds = [rng.bytes(16) for _ in range(k)]
    signs = [1 if i % 2 else -1 for i in range(k)]
    print(f"device: {torch.cuda.get_device_name(0)}; d={d}, k={k}")

    every = {"prg": True, "mask": True, "quantise": True}
    for n in sorted({3, 1_000_003, d}):
        same = _identical(n, seeds, signs, rng)
        print(f"n={n}: " + ", ".join(f"{what} {'identical' if ok else 'DIFFERENT'}"
                                     for what, ok in same.items()))
        every = {what: every[what] and same[what] for what in every}
    prg_ok, mask_ok, quant_ok = every["prg"], every["mask"], every["quantise"]

    # timings at d
    base = rng.integers(0, 2**32, d, dtype=np.uint32)
    cpu = base.copy()
    dev = torch.from_numpy(base.view(np.int32).copy()).cuda()
    xd = torch.from_numpy((rng.standard_normal(d) * 2).astype(np.float32)).cuda()

    t_mask = _timed(lambda: core.apply_masks(dev, seeds, signs), 5)
    t_prg = _timed(lambda: core.prg(seeds[0], d, device="cuda"), 5)
    t_q = _timed(lambda: core.quantise(xd, clip=3.0, bits=24, seed=seeds[1]), 5)
    t_cpu = min(_timed(lambda: core.apply_masks(cpu, seeds, signs, threads=2), 1) for _ in range(2))
    mask_gbps = 4 * d * k / t_mask / 1e9
    cpu_gbps = 4 * d * k / t_cpu / 1e9
    prg_gbps = 4 * d / t_prg / 1e9
    print(f"mask: GPU {mask_gbps:.1f} GB/s vs CPU (2 threads) {cpu_gbps:.1f} GB/s")
    print(f"prg: GPU {prg_gbps:.1f} GB/s; quantise: GPU {d / t_q / 1e9:.2f} G elem/s")
    ok = prg_ok and mask_ok and quant_ok
    print(
        f"GPU_CHECK ok={ok} prg_identical={prg_ok} mask_identical={mask_ok} "
        f"quantise_identical={quant_ok} mask_gbps={mask_gbps:.1f} "
        f"mask_vs_cpu={mask_gbps / cpu_gbps:.1f} prg_gbps={prg_gbps:.1f} "
        f"quantise_gelem_s={d / t_q / 1e9:.2f}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
