"""Helper process for bench/transport.py: one side of a large-model transfer.

    _transport_peer.py recv MIB curve|null  -> prints a JSON line with the endpoint/keys,
                                               then a JSON report when done
    _transport_peer.py send MIB MODE ENDPOINT SERVER_KEY AGENT_PUBLIC AGENT_SECRET

``curve`` uses fedge.transport (CurveZMQ, ZAP, heartbeats) and fedge.wire;
``null`` is the anchor: bare pyzmq ROUTER/DEALER without security, one raw
frame, the fastest this libzmq moves the same bytes.  The sender times from
the first send to the receiver's acknowledgement; each side reports its own
peak RSS growth (VmHWM, reset first) around the transfer.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import zmq
import zmq.asyncio

from fedge.transport import ClientSocket, CurveKeyPair, ServerSocket, message_limit_for_model
from fedge.wire import Tensor, decode, encode, message


@message("bench.transport.model", max_bytes=None, tensors={"weights": Tensor("float32", 1)})
@dataclass(frozen=True)
class Model:
    weights: np.ndarray


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> float:
    """Reset the peak-RSS mark (VmHWM) to the current RSS and return it, in MiB.

    ru_maxrss would not do: a child inherits its parent's peak across fork+exec.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    return _status_mb("VmHWM")


def n_of(mb: int) -> int:
    return mb * (1 << 20) // 4


async def recv_curve(mb: int) -> dict[str, float]:
    server_keys, agent = CurveKeyPair.generate(), CurveKeyPair.generate()
    limit = message_limit_for_model(n_of(mb))
    server = ServerSocket(server_keys, allowed=[agent.public], max_message_bytes=limit)
    endpoint = server.bind("tcp://127.0.0.1:0")
    print(json.dumps({"endpoint": endpoint, "server_key": server_keys.public,
                      "agent_public": agent.public, "agent_secret": agent.secret}), flush=True)
    base = reset_peak()
    msg = await server.recv(timeout=300)
    env = decode(msg.frames, max_bytes=limit, release_frames=True)
    ok = env.body.weights.size == n_of(mb) and float(env.body.weights[-1]) == 1.0
    await server.send(msg.peer, encode(Model(np.zeros(0, np.float32)), sender="receiver"))
    await asyncio.sleep(0.3)
    await server.close()
    return {"ok": ok, "peak_growth_mb": peak_mb() - base}


async def recv_null(mb: int) -> dict[str, float]:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(json.dumps({"endpoint": f"tcp://127.0.0.1:{port}", "server_key": "-",
                      "agent_public": "-", "agent_secret": "-"}), flush=True)
    base = reset_peak()
    frames = await sock.recv_multipart(copy=False)
    w = np.frombuffer(frames[1].buffer, dtype=np.float32)
    ok = w.size == n_of(mb) and float(w[-1]) == 1.0
    await sock.send_multipart([frames[0], b"ack"])
    await asyncio.sleep(0.3)
    sock.close(linger=0)
    ctx.term()
    return {"ok": ok, "peak_growth_mb": peak_mb() - base}


async def send(mb: int, mode: str, endpoint: str, server_key: str, public: str,
               secret: str) -> dict[str, float]:
    w = np.ones(n_of(mb), dtype=np.float32)
    base = reset_peak()
    if mode == "curve":
        client = ClientSocket(CurveKeyPair(public, secret), server_key, endpoint)
        client.start()
        await client.wait_connected(60)
        t = time.perf_counter()
        await client.send(encode(Model(w), sender="agent"), timeout=300)
        await client.recv(timeout=300)
        elapsed = time.perf_counter() - t
        await client.close()
    else:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(endpoint)
        t = time.perf_counter()
        await sock.send_multipart([memoryview(w)], copy=False)
        await sock.recv_multipart()
        elapsed = time.perf_counter() - t
        sock.close(linger=0)
        ctx.term()
    return {"seconds": elapsed, "mb_s": mb / elapsed, "peak_growth_mb": peak_mb() - base}


if __name__ == "__main__":
    size = int(sys.argv[2])
    if sys.argv[1] == "recv":
        run = recv_curve if sys.argv[3] == "curve" else recv_null
        print(json.dumps(asyncio.run(run(size))), flush=True)
    else:
        print(json.dumps(asyncio.run(send(size, *sys.argv[3:8]))), flush=True)
