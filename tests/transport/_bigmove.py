"""Helper process for test_transport_bigmove: move one large tensor over CURVE.

    python _bigmove.py recv MB   -> prints the endpoint and server key, then a JSON report
    python _bigmove.py send MB ENDPOINT SERVER_KEY AGENT_PUBLIC AGENT_SECRET -> JSON report

Each process reports its own peak RSS growth (VmHWM, reset first) around the transfer,
so the sender's array and the receiver's buffers are measured apart.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import zlib
from dataclasses import dataclass

import numpy as np

from fedge.transport import ClientSocket, CurveKeyPair, ServerSocket, message_limit_for_model
from fedge.wire import Tensor, decode, encode, message


@message("test.bigmove.model", max_bytes=None, tensors={"weights": Tensor("float32", 1)})
@dataclass(frozen=True)
class Model:
    crc: int
    weights: np.ndarray


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> float:
    """Reset the peak-RSS mark (VmHWM) to the current RSS and return it, in MB.

    ru_maxrss would not do: a child inherits its parent's peak across fork+exec.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    return _status_mb("VmHWM")


def used_numpy_before() -> None:
    """Free a 16 MiB array, as a coordinator or agent has long done before a model
    arrives: glibc then raises its mmap threshold to 16 MiB, so the received chunks
    land in malloc arenas instead of mappings of their own, and freeing one does
    not return its pages by itself (a fresh process would hide that)."""
    scratch = np.ones(4 << 20, dtype=np.float32)  # 16 MiB: glibc follows up to 32
    del scratch


def pattern(n: int) -> np.ndarray:
    w = np.arange(n, dtype=np.uint32)
    w *= np.uint32(2654435761)  # in place: no second buffer
    return w.view(np.float32)


async def recv(mb: int) -> None:
    n = mb * (1 << 20) // 4
    server_keys = CurveKeyPair.generate()
    agent = CurveKeyPair.generate()
    limit = message_limit_for_model(n)
    server = ServerSocket(server_keys, allowed=[agent.public], max_message_bytes=limit)
    endpoint = server.bind("tcp://127.0.0.1:0")
    print(json.dumps({"endpoint": endpoint, "server_key": server_keys.public,
                      "agent_public": agent.public, "agent_secret": agent.secret}), flush=True)
    used_numpy_before()
    base = reset_peak()
    msg = await server.recv(timeout=120)
    t = time.perf_counter()
    n_frames = len(msg.frames)
    last = msg.frames[-1]
    env = decode(msg.frames, max_bytes=limit, release_frames=True)
    decode_s = time.perf_counter() - t
    w = env.body.weights
    shares = bool(np.shares_memory(w, np.frombuffer(last.buffer, dtype=np.uint8)))
    del last
    report = {
        "n": int(w.size),
        "frames": n_frames,
        "crc_ok": zlib.crc32(memoryview(w).cast("B")) == env.body.crc,
        "shares_frame": shares,
        "decode_s": decode_s,
        "peak_growth_mb": peak_mb() - base,
        "payload_mb": w.nbytes / (1 << 20),
    }
    await server.send(msg.peer, encode(Model(0, np.zeros(0, np.float32)), sender="receiver"))
    await asyncio.sleep(0.5)  # let the ack leave before the socket closes
    print(json.dumps(report), flush=True)
    await server.close()


async def send(mb: int, endpoint: str, server_key: str, public: str, secret: str) -> None:
    n = mb * (1 << 20) // 4
    w = pattern(n)
    crc = zlib.crc32(memoryview(w).cast("B"))
    base = reset_peak()
    client = ClientSocket(CurveKeyPair(public, secret), server_key, endpoint)
    client.start()
    await client.wait_connected(30)
    t = time.perf_counter()
    frames = encode(Model(crc, w), sender="agent")
    await client.send(frames, timeout=120)
    ack = decode(await client.recv(timeout=120), max_bytes=1 << 20)  # the receiver has it all
    report = {"send_s": time.perf_counter() - t, "peak_growth_mb": peak_mb() - base,
              "acked": ack.header.sender == "receiver",
              "tensor_frame_is_view": bool(np.shares_memory(np.frombuffer(frames[-1], np.uint8),
                                                            w))}
    print(json.dumps(report), flush=True)
    await client.close()


if __name__ == "__main__":
    if sys.argv[1] == "recv":
        asyncio.run(recv(int(sys.argv[2])))
    else:
        asyncio.run(send(int(sys.argv[2]), *sys.argv[3:7]))
