"""End to end, real processes on loopback: the canary's connection to the coordinator
goes through a small TCP proxy that resets it (RST both ways) in the middle of the
signed model's download. The agent reconnects, the coordinator asks it again, the
lost chunk request is sent again, and the update installs at the canary and then at
the next site: the roll-out does not stop at a network blip."""

from __future__ import annotations

import json
import re
import select
import socket
import struct
import threading

import onnx
import pytest

from fedge.console.cli import push
from fedge.serve.repository import ModelRepository
from tests.e2e.test_updates_e2e import Federation, wait_for
from tests.update.conftest import tiny_onnx

pytestmark = pytest.mark.e2e


class ResettingProxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target>; the first connection to carry more than
    `cut_after` bytes from the coordinator is reset (RST to both ends) on the read that
    crosses it, that read's bytes never delivered. Later connections pass untouched."""

    def __init__(self, target: int, cut_after: int) -> None:
        self.target, self.cut_after = target, cut_after
        self.accepted = self.cuts = 0
        self._stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                agent, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._pump, args=(agent,), daemon=True).start()

    def _pump(self, agent: socket.socket) -> None:
        coordinator = socket.create_connection(("127.0.0.1", self.target), timeout=5)
        peer = {agent: coordinator, coordinator: agent}
        down = 0
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([agent, coordinator], [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is coordinator and self.cuts == 0:
                        down += len(data)
                        if down > self.cut_after:
                            self.cuts += 1
                            return  # the finally resets both ends
                    peer[s].sendall(data)
        except OSError:
            return
        finally:
            for s in (agent, coordinator):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


def padded_onnx(scale: float, pad: int) -> bytes:
    """A valid model of about `pad` bytes (several 1 MiB fetch chunks)."""
    model = onnx.load_from_string(tiny_onnx(scale))
    model.metadata_props.add(key="padding", value="x" * pad)
    return model.SerializeToString()


def test_a_connection_reset_mid_download_does_not_stop_the_rollout(tmp_path):
    fed = Federation(tmp_path)
    coordinator_port = int(re.search(r'bind = "tcp://127.0.0.1:(\d+)"',
                                     fed.coord_config.read_text()).group(1))
    proxy = ResettingProxy(coordinator_port, cut_after=512 * 1024)
    try:
        repos = {}
        for site in ("h1", "h2"):
            state = fed.enrol(site)
            if site == "h1":  # the canary reaches the coordinator through the proxy
                endpoint = state / "keys" / "coordinator.json"
                doc = json.loads(endpoint.read_text())
                doc["endpoint"] = f"tcp://127.0.0.1:{proxy.port}"
                endpoint.write_text(json.dumps(doc))
            repos[site] = ModelRepository(state / "models")
            repos[site].install("risk", tiny_onnx(2.0))  # version 1
            fed.start_agent(site)
        wait_for("two connected agents", lambda: {"h1", "h2"} <= fed.connected(), 60)
        onnx_file = tmp_path / "risk-v2.onnx"
        onnx_file.write_bytes(padded_onnx(3.0, 3 << 20))
        rollout = push(fed.console, fed.admin, onnx_file, kind="model", name="risk",
                       version="2", canary="h1", sites=["h1", "h2"], deadline_s=60)
        assert proxy.cuts == 1 and proxy.accepted >= 2, (proxy.cuts, proxy.accepted)
        assert rollout["state"] == "succeeded", (rollout, fed.log("agent-h1"))
        assert list(rollout["results"]) == ["h1", "h2"]
        for site in ("h1", "h2"):
            assert repos[site].versions("risk") == [1, 2]
        log = fed.log("agent-h1")
        assert "sending the request again" in log, log
        installs = [json.loads(line) for line in
                    (tmp_path / "h1" / "updates" / "audit.jsonl").read_text().splitlines()]
        assert [(e["version"], e["ok"]) for e in installs] == [("2", True)]
    finally:
        proxy.close()
        fed.close()
