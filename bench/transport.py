"""Benchmark of the wire codec and the CurveZMQ transport on loopback.

Measured in one run (default 200 MiB model, ``--quick`` 50 MiB; sizes and rates are
in MiB, 2^20 bytes, although the RESULT keys say ``mb``):
  codec: encode + decode of a model-sized float32 tensor, against the anchor
         of one memcpy of the same bytes (np.copyto): the codec is zero-copy,
         so the ratio codec/memcpy is far below 1;
  transfer: sender -> receiver -> ack between two processes over 127.0.0.1,
         fedge.transport + fedge.wire with CurveZMQ (encryption, ZAP, 1 MiB
         chunks, chunk-by-chunk decode), against the anchor of bare pyzmq
         ROUTER/DEALER without security sending the same bytes as one frame;
  memory: each side's peak RSS growth around the transfer, over the payload
         (the goal: at most one extra copy, i.e. receiver <= ~1.3). The sender's
         own array is allocated before the mark and not counted; the rest is
         about two copies of one 1 MiB chunk while it is encrypted and sent
         (send_peak_x 0.02 at 200 MiB; 0.65 with the 64 MiB chunks before).

Each transfer is the best of ``--repeats`` (the machine is shared).  Last line:
``RESULT curve_mb_s=... null_mb_s=... curve_vs_null=... codec_vs_memcpy=...
recv_peak_x=... send_peak_x=...``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.wire import Tensor, decode, encode, message

HERE = Path(__file__).resolve().parent


@message("bench.transport.codec", max_bytes=None, tensors={"weights": Tensor("float32", 1)})
@dataclass(frozen=True)
class CodecModel:
    weights: np.ndarray


def transfer(mb: int, mode: str) -> tuple[dict[str, float], dict[str, float]]:
    peer = str(HERE / "_transport_peer.py")
    recv = subprocess.Popen([sys.executable, peer, "recv", str(mb), mode],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None
        info = json.loads(recv.stdout.readline())
        sent = subprocess.run(
            [sys.executable, peer, "send", str(mb), mode, info["endpoint"], info["server_key"],
             info["agent_public"], info["agent_secret"]],
            capture_output=True, text=True, timeout=600, check=True)
        out, _ = recv.communicate(timeout=120)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    receiver = json.loads(out.strip().splitlines()[-1])
    if not receiver["ok"]:
        raise SystemExit(f"{mode}: the receiver got wrong data")
    return json.loads(sent.stdout.strip().splitlines()[-1]), receiver


def codec_ratio(mb: int, repeats: int) -> tuple[float, float]:
    w = np.ones(mb * (1 << 20) // 4, dtype=np.float32)
    dst = np.empty_like(w)
    best_copy = best_codec = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, w)
        best_copy = min(best_copy, time.perf_counter() - t)
        t = time.perf_counter()
        frames = encode(CodecModel(w), sender="bench", chunk_bytes=None)
        env = decode(frames, max_bytes=w.nbytes + (1 << 20))
        best_codec = min(best_codec, time.perf_counter() - t)
        assert env.body.weights.size == w.size
    return best_codec, best_copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="model size in MiB (default 200)")
    ap.add_argument("--quick", action="store_true", help="50 MiB, one repetition")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    mb, repeats = (50, 1) if args.quick else (args.mb, args.repeats)

    codec_s, copy_s = codec_ratio(mb, 5)
    print(f"codec encode+decode {mb} MiB: {codec_s * 1e3:.3f} ms; memcpy anchor "
          f"{copy_s * 1e3:.1f} ms; ratio {codec_s / copy_s:.4f}")
    best: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
    for mode in ("null", "curve"):
        for _ in range(repeats):
            s, r = transfer(mb, mode)
            if mode not in best or s["mb_s"] > best[mode][0]["mb_s"]:
                best[mode] = (s, r)
        s, r = best[mode]
        print(f"{mode:5s} {mb} MiB: {s['mb_s']:.0f} MiB/s ({s['seconds']:.2f} s); peak RSS "
              f"growth sender {s['peak_growth_mb']:.0f} MiB, receiver "
              f"{r['peak_growth_mb']:.0f} MiB")
    curve_s, curve_r = best["curve"]
    null_s, _ = best["null"]
    print(
        f"RESULT curve_mb_s={curve_s['mb_s']:.0f} null_mb_s={null_s['mb_s']:.0f} "
        f"curve_vs_null={curve_s['mb_s'] / null_s['mb_s']:.2f} "
        f"codec_vs_memcpy={codec_s / copy_s:.4f} "
        f"recv_peak_x={curve_r['peak_growth_mb'] / mb:.2f} "
        f"send_peak_x={curve_s['peak_growth_mb'] / mb:.2f}"
    )


if __name__ == "__main__":
    main()
