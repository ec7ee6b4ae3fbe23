"""Signed-update download speed: an agent's verified TUF download of one target
through the chunked fetch relay over CurveZMQ, against an anchor measured in the
same run — the same bytes pulled in the same chunk size over the same CurveZMQ
sockets with no TUF, no codec and no hashing.

    python bench/updates.py [--quick] [--mib N] [--chunk-kib K]

Ends with: RESULT fetch_mib_s=... anchor_mib_s=... ratio=... size_mib=... chunk_kib=...
(ratio = fetch / anchor: the cost of verification and the wire codec.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import zmq

from fedge.agent.updates import AgentUpdater, ZmqFetcher, install_trusted_root
from fedge.console.store import ConsoleStore
from fedge.coordinator.updates import UpdateRepository
from fedge.update.messages import UpdateFetchRequest
from fedge.wire import codec
from fedge.wire import messages as _registered  # noqa: F401


def serve(ctx: zmq.Context, endpoint: str, keys: tuple[bytes, bytes], handler, stop) -> None:
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = keys
    sock.bind(endpoint)
    while not stop.is_set():
        if sock.poll(100):
            ident, *frames = sock.recv_multipart()
            sock.send_multipart([ident, *handler(frames)])
    sock.close(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(ctx: zmq.Context, endpoint: str, server_public: bytes) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.curve_serverkey = server_public
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.connect(endpoint)
    return sock


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4 MiB instead of 32")
    ap.add_argument("--mib", type=int, default=None)
    ap.add_argument("--chunk-kib", type=int, default=256)
    args = ap.parse_args()
    mib = args.mib or (4 if args.quick else 32)
    chunk = args.chunk_kib * 1024
    data = os.urandom(mib << 20)
    tmp = Path(tempfile.mkdtemp(prefix="fedge-bench-updates-"))
    console = ConsoleStore.init(tmp / "console", coordinator_endpoint="tcp://127.0.0.1:1")
    repo = UpdateRepository.from_provision(tmp / "coord", console.provision())
    targets, files = console.sign_targets([("model", "big", "1", "model.onnx", data)])
    repo.publish(targets, files)
    install_trusted_root(tmp / "agent", console.root_bytes())

    ctx = zmq.Context()
    pub, sec = zmq.curve_keypair()
    stop = threading.Event()

    def tuf_handler(frames):
        req = codec.decode(frames, max_bytes=1 << 22).body
        return codec.encode(repo.handle_fetch(req), sender="coordinator")

    stored = next((repo.root_dir / "targets").rglob("*.model.onnx")).read_bytes()

    def raw_handler(frames):
        off = int(frames[0])
        return [stored[off:off + chunk]]

    tuf_ep, raw_ep = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    threads = [threading.Thread(target=serve, args=(ctx, tuf_ep, (pub, sec), tuf_handler, stop),
                                daemon=True),
               threading.Thread(target=serve, args=(ctx, raw_ep, (pub, sec), raw_handler, stop),
                                daemon=True)]
    for t in threads:
        t.start()
    tuf_sock = client(ctx, tuf_ep, pub)

    def roundtrip(req: UpdateFetchRequest):
        tuf_sock.send_multipart(codec.encode(req, sender="agent"))
        if not tuf_sock.poll(10_000):
            raise TimeoutError("no reply")
        return codec.decode(tuf_sock.recv_multipart(), max_bytes=1 << 22).body

    updater = AgentUpdater(tmp / "agent", ZmqFetcher(roundtrip, chunk=chunk))
    t0 = time.perf_counter()
    [spec] = updater.refresh()
    path = updater.download(spec)
    fetch_s = time.perf_counter() - t0
    assert path.read_bytes() == data

    raw = client(ctx, raw_ep, pub)
    t0 = time.perf_counter()
    got = bytearray()
    while len(got) < len(stored):
        raw.send(str(len(got)).encode())
        got += raw.recv()
    anchor_s = time.perf_counter() - t0
    assert bytes(got) == stored
    stop.set()
    for t in threads:
        t.join(2)
    tuf_sock.close(0)
    raw.close(0)
    ctx.term()

    shutil.rmtree(tmp, ignore_errors=True)
    fetch, anchor = mib / fetch_s, mib / anchor_s
    print(f"verified TUF download over CurveZMQ: {fetch:8.1f} MiB/s ({fetch_s:.2f} s)")
    print(f"anchor, raw chunks same sockets:     {anchor:8.1f} MiB/s ({anchor_s:.2f} s)")
    print(f"RESULT fetch_mib_s={fetch:.1f} anchor_mib_s={anchor:.1f} ratio={fetch / anchor:.3f} "
          f"size_mib={mib} chunk_kib={args.chunk_kib}")


if __name__ == "__main__":
    main()
