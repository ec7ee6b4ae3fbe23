"""Signed-update download speed through the product's path, against an anchor
measured in the same run.

The fetch: an agent in this process (`fedge.agent.runtime.Agent` with
`attach_update_client`, connected by `run_agent` over CurveZMQ) downloads one
signed target from a real `fedge coordinator` process. As when an
UpdateAvailable arrives, python-tuf runs in the agent's executor thread; each
chunk (by default `ZmqFetcher`'s, as `AgentUpdateClient` builds it; else
``--chunk-kib``) is one UpdateFetchRequest handed to the agent's event loop
(`AgentUpdateClient.roundtrip`), encoded and sent by `fedge.transport`,
dispatched by the coordinator to its TUF relay (`UpdateRepository.handle_fetch`)
and answered the same way back. Timed apart, in that thread:

  refresh: timestamp, snapshot and targets fetched and verified, cold (the
           agent's metadata cache emptied down to its trusted root before each
           try, as when the console has signed new targets);
  download: the target, its length and sha256 checked by python-tuf (install
           is not timed).

Anchor: the same stored bytes pulled by the same thread, in the same chunk
size, from a bare pyzmq CurveZMQ ROUTER in another process (this file run with
``--anchor-server``): raw request/reply, no TUF, no codec, no asyncio, no
hashing; the least that moving these bytes in these chunks costs. The refresh's
anchor is the same server answering one request per file the refresh asked
for, each as long as that file: the next root (not there: an empty answer), then
timestamp, snapshot and targets; the least four round trips of those sizes cost,
beside which the refresh's figure is its verification and the product's path.

Fetch and anchor alternate ``--repeats`` times; each figure is its best try.

    python bench/updates.py [--quick] [--mib N] [--chunk-kib K] [--repeats R]

Ends with: RESULT fetch_mib_s=... anchor_mib_s=... ratio=... refresh_ms=...
refresh_anchor_ms=... refresh_ratio=... size_mib=... chunk_kib=... (ratio =
download / anchor: what verification, the codec, the agent's loop and the
coordinator's dispatch cost; refresh_ratio = refresh / its anchor, the same for
the metadata).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from _coordinator import start_coordinator

from fedge.agent.updates import ZmqFetcher, attach_update_client, install_trusted_root

PRODUCT_CHUNK = inspect.signature(ZmqFetcher).parameters["chunk"].default


def anchor_server(stored: Path, chunk: int) -> int:
    """A CurveZMQ ROUTER answering "offset" with the next `chunk` bytes, or
    "offset,length" with `length` bytes, until SIGTERM."""
    data = stored.read_bytes()
    public, secret = zmq.curve_keypair()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = public, secret
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(json.dumps({"endpoint": f"tcp://127.0.0.1:{port}", "public": public.decode()}),
          flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        if sock.poll(100):
            ident, request = sock.recv_multipart()
            off, _, length = request.partition(b",")
            start = int(off)
            sock.send_multipart([ident, data[start:start + (int(length) if length else chunk)]])
    sock.close(0)
    ctx.term()
    return 0


def anchor_pull(endpoint: str, public: bytes, size: int,
                lengths: tuple[int, ...] = ()) -> tuple[float, float]:
    """Seconds to pull `size` bytes from the anchor server (handshake done before),
    and seconds for one request each of `lengths` bytes (the refresh's anchor)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.curve_serverkey = public
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.connect(endpoint)
    try:
        sock.send(b"0")  # untimed: the CURVE handshake
        sock.recv()
        got = 0
        t0 = time.perf_counter()
        while got < size:
            sock.send(str(got).encode())
            got += len(sock.recv())
        t1 = time.perf_counter()
        for length in lengths:
            sock.send(f"0,{length}".encode())
            if len(sock.recv()) != length:
                raise RuntimeError(f"the anchor server sent other than {length} bytes")
        return t1 - t0, time.perf_counter() - t1
    finally:
        sock.close(0)


@dataclass(frozen=True)
class Site:
    """What the one enrolled appliance needs to connect and verify."""

    name: str
    enrolled: Any  # fedge.agent.process.Enrolled
    trusted_root: bytes  # the console's TUF root, as enrolment installs it


def start_relay_with_site(root: Path, tuf_targets: list[tuple[str, str, str, str, bytes]]
                      ) -> tuple[subprocess.Popen[bytes], Site, Path]:
    """A `fedge coordinator` relaying `tuf_targets`, with one enrolled site.

    Returns the process, the site, and where the coordinator stores the first target."""
    from fedge.agent.process import Enrolled
    from fedge.console.store import ConsoleStore
    from fedge.coordinator.store import Store
    from fedge.coordinator.updates import UpdateRepository
    from fedge.secagg.keys import Identity, Roster
    from fedge.transport import CurveKeyPair, save_keypair

    console = ConsoleStore.init(root / "console", coordinator_endpoint="tcp://127.0.0.1:1")
    coord_dir = root / "coordinator"
    repo = UpdateRepository.from_provision(coord_dir, console.provision())
    repo.publish(*console.sign_targets(tuf_targets))
    roster_key = Identity.generate()  # signs the SecAgg roster; unused by updates
    coord_keys = CurveKeyPair.generate()
    save_keypair(root / "keys", "coordinator", coord_keys)
    site, site_keys, identity = "site-000", CurveKeyPair.generate(), Identity.generate()
    roster = Roster.build({site: identity.public_bytes()}, roster_key)
    (root / "roster.json").write_bytes(roster.to_bytes())
    store = Store(coord_dir)
    store.enrol(site, site_keys.public, identity.public_bytes(), actor="bench")
    store.close()
    proc, endpoint = start_coordinator(root, coord_dir, roster_key.public_bytes().hex(),
                                       heartbeat=(1.0, 10.0))
    stored = next((repo.root_dir / "targets").rglob(f"*.{tuf_targets[0][3]}"))
    enrolled = Enrolled(site, site_keys.public, site_keys.secret, endpoint, coord_keys.public,
                        identity, roster, roster_key=roster_key.public_bytes())
    return proc, Site(site, enrolled, console.root_bytes()), stored


async def measure(root: Path, site: Site, data: bytes, chunk: int, repeats: int,
                  anchor: tuple[str, bytes]) -> dict[str, float]:
    """Alternate fetch (refresh, download) and anchor `repeats` times; best of each."""
    from fedge.agent.process import run_agent
    from fedge.agent.runtime import Agent
    from fedge.agent.trainer import SyntheticTrainer

    agent_dir = root / "agent"
    install_trusted_root(agent_dir, site.trusted_root)
    pool = ThreadPoolExecutor(1, thread_name_prefix="fedge-task")
    enrolled = site.enrolled
    agent = Agent(site.name, SyntheticTrainer(site.name), identity=enrolled.identity,
                  roster=enrolled.roster, executor=pool, roster_key=enrolled.roster_key)
    client = attach_update_client(agent, agent_dir)
    # the product's fetcher, built again so that the chunk measured is the one named
    client.updater.fetcher = ZmqFetcher(client.roundtrip, chunk=chunk)
    updater = client.updater
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    running = asyncio.ensure_future(run_agent(agent, enrolled, interval_s=1.0, timeout_s=10.0,
                                              stop=stop))
    # The client knows its loop from the first message it handles (an UpdateAvailable,
    # in the product); here the bench starts the TUF client itself.
    client._loop = loop
    deadline = time.monotonic() + 60
    while client.skew is None:  # a HeartbeatAck came back: the link works both ways
        if running.done() or time.monotonic() > deadline:
            log = (root / "coordinator.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the agent did not connect; the coordinator's log ends:\n{log}")
        await asyncio.sleep(0.05)

    fetched: list[int] = []  # the metadata files' lengths, as the refresh took them

    def fetch_once() -> tuple[float, float]:
        for old in updater.metadata_dir.iterdir():  # untimed: back to the trusted root
            if old.is_file() and old.name != "root.json":
                old.unlink()
        for old in updater.targets_dir.iterdir():
            old.unlink()
        t0 = time.perf_counter()
        specs = updater.refresh()
        t1 = time.perf_counter()
        fetched[:] = [0] + [(updater.metadata_dir / f"{role}.json").stat().st_size
                      for role in ("timestamp", "snapshot", "targets")]
        path = updater.download(next(s for s in specs if s.name == "big"))
        t2 = time.perf_counter()
        if path.read_bytes() != data:
            raise RuntimeError(f"downloaded {path} differs from the signed target")
        return t1 - t0, t2 - t1

    best = {"refresh": float("inf"), "download": float("inf"), "anchor": float("inf"),
            "refresh_anchor": float("inf")}
    try:
        for _ in range(repeats):
            refresh_s, download_s = await loop.run_in_executor(pool, fetch_once)
            anchor_s, refresh_anchor_s = await loop.run_in_executor(
                pool, anchor_pull, *anchor, len(data), tuple(fetched))
            best = {"refresh": min(best["refresh"], refresh_s),
                    "download": min(best["download"], download_s),
                    "anchor": min(best["anchor"], anchor_s),
                    "refresh_anchor": min(best["refresh_anchor"], refresh_anchor_s)}
    finally:
        stop.set()
        await running
        pool.shutdown(wait=True)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 MiB instead of 32, 3 tries")
    ap.add_argument("--mib", type=int, default=None, help="target size in MiB")
    ap.add_argument("--chunk-kib", type=int, default=None,
                    help=f"chunk size (default: the product's, {PRODUCT_CHUNK >> 10} KiB)")
    ap.add_argument("--repeats", type=int, default=None, help="tries of each (default 5)")
    ap.add_argument("--anchor-server", nargs=2, metavar=("FILE", "CHUNK"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.anchor_server:
        return anchor_server(Path(args.anchor_server[0]), int(args.anchor_server[1]))
    mib = args.mib or (4 if args.quick else 32)
    repeats = args.repeats or (3 if args.quick else 5)
    chunk = args.chunk_kib * 1024 if args.chunk_kib else PRODUCT_CHUNK
    data = os.urandom(mib << 20)
    with tempfile.TemporaryDirectory(prefix="fedge-bench-updates-") as tmp:
        root = Path(tmp)
        coord, site, stored = start_relay_with_site(
            root, [("model", "big", "1", "model.onnx", data)])
        server = None
        try:
            server = subprocess.Popen(
                [sys.executable, __file__, "--anchor-server", str(stored),
                 str(chunk)], stdout=subprocess.PIPE, text=True)
            assert server.stdout is not None
            info = json.loads(server.stdout.readline())
            best = asyncio.run(measure(root, site, data, chunk, repeats,
                                       (info["endpoint"], info["public"].encode())))
        finally:
            for proc in (server, coord):
                if proc is not None:
                    proc.terminate()
            for proc in (server, coord):
                if proc is not None:
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    fetch, anchor = mib / best["download"], mib / best["anchor"]
    chunk_kib = chunk >> 10
    print(f"{mib} MiB target in {chunk_kib} KiB chunks ({-(-(mib << 20) // chunk)} requests), "
          f"best of {repeats} tries each, fetch and anchor alternating")
    refresh_ms, refresh_anchor_ms = best["refresh"] * 1e3, best["refresh_anchor"] * 1e3
    print(f"refresh (timestamp, snapshot, targets; cold):    {refresh_ms:8.1f} ms")
    print(f"refresh anchor, 4 raw requests of those sizes:   {refresh_anchor_ms:8.1f} ms")
    print(f"download via agent -> coordinator, TUF-verified: {fetch:8.1f} MiB/s "
          f"({best['download']:.3f} s)")
    print(f"anchor, raw CurveZMQ request/reply, other process: {anchor:6.1f} MiB/s "
          f"({best['anchor']:.3f} s)")
    print(f"RESULT fetch_mib_s={fetch:.1f} anchor_mib_s={anchor:.1f} ratio={fetch / anchor:.3f} "
          f"refresh_ms={refresh_ms:.1f} refresh_anchor_ms={refresh_anchor_ms:.2f} "
          f"refresh_ratio={refresh_ms / refresh_anchor_ms:.1f} size_mib={mib} "
          f"chunk_kib={chunk_kib}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
