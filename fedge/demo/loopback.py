"""A whole federation on loopback: one ``fedge coordinator`` and N ``fedge agent``
processes over CurveZMQ, sharing nothing but the wire.

Each appliance gets the state directory ``fedge agent enrol`` leaves behind
(CURVE key pair, Ed25519 identity, pinned coordinator key, console-signed
roster, enrolment record) and is registered in the coordinator's registry, as
the console's enrolment would do; the coordinator's ZAP allow-list then admits
exactly those keys. Jobs are submitted with ``fedge coordinator submit``; the
coordinator's SQLite store is read (never written) to follow progress. Every
wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["FederationError", "LoopbackFederation"]


class FederationError(RuntimeError):
    """The loopback federation could not start or a job did not finish in time."""


def wait_for(pred: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.1) -> Any:
    """``pred()``'s first true value, polled every ``interval`` s.

    Raises: FederationError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise FederationError(f"timed out after {timeout:g} s waiting for {what}")


class _Proc:
    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        self._log.close()
        return self.p.returncode

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


class LoopbackFederation:
    """Coordinator + agents as subprocesses under ``root``; use as a context manager."""

    def __init__(
        self,
        root: Path,
        sites: Mapping[str, Sequence[Mapping[str, Any]]],
        *,
        heartbeat: tuple[float, float] = (0.5, 5.0),
        allow_plain: bool = False,
    ) -> None:
        from fedge.secagg.keys import Identity
        from fedge.transport import CurveKeyPair, save_keypair

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.sites = {s: list(ds) for s, ds in sites.items()}
        self.interval, self.timeout = heartbeat
        # the agents' [privacy] floor: secure aggregation required unless allowed here
        # (the benchmark compares plans with it on and off)
        self.allow_plain = allow_plain
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONFAULTHANDLER": "1",
        }
        self.env.pop("NOTIFY_SOCKET", None)
        self.console = Identity.generate()
        self.coord_keys = CurveKeyPair.generate()
        save_keypair(self.root / "keys", "coordinator", self.coord_keys)
        self.coord_dir = self.root / "coordinator"
        self.coord_dir.mkdir(exist_ok=True)
        self.keys = {s: (CurveKeyPair.generate(), Identity.generate()) for s in self.sites}
        self.endpoint = "tcp://127.0.0.1:0"
        self.coordinator: _Proc | None = None
        self.agents: dict[str, _Proc] = {}

    # -- set-up ------------------------------------------------------------------
    def _roster(self) -> bytes:
        from fedge.secagg.keys import Roster

        return Roster.build(
            {s: ident.public_bytes() for s, (_, ident) in self.keys.items()}, self.console
        ).to_bytes()

    def _coordinator_config(self) -> Path:
        (self.root / "roster.json").write_bytes(self._roster())
        cfg = self.root / "coordinator.toml"
        cfg.write_text(
            f'state_dir = "{self.coord_dir}"\n'
            f'bind = "{self.endpoint}"\n'
            f'curve_key = "{self.root / "keys" / "coordinator.key_secret"}"\n'
            f'roster = "{self.root / "roster.json"}"\n'
            f'roster_public_key = "{self.console.public_bytes().hex()}"\n'
            "tick_s = 0.02\n"
            f"[heartbeat]\ninterval_s = {self.interval}\ntimeout_s = {self.timeout}\n"
        )
        return cfg

    def _enrol_in_registry(self) -> None:
        from fedge.coordinator.store import Store

        store = Store(self.coord_dir)
        try:
            for site, (curve, ident) in self.keys.items():
                store.enrol(site, curve.public, ident.public_bytes(), actor="demo")
        finally:
            store.close()

    def _agent_config(self, site: str) -> Path:
        curve, ident = self.keys[site]
        sd = self.root / "agents" / site
        (sd / "keys").mkdir(parents=True, exist_ok=True)
        (sd / "keys" / "curve.json").write_text(
            json.dumps({"public": curve.public, "secret": curve.secret})
        )
        ident.save(sd / "keys" / "identity.key")
        (sd / "keys" / "coordinator.json").write_text(
            json.dumps({"endpoint": self.endpoint, "public_key": self.coord_keys.public})
        )
        (sd / "roster.json").write_bytes(self._roster())
        (sd / "enrolment.json").write_text(
            json.dumps(
                {
                    "site": site,
                    "console_id": "demo",
                    "console_fingerprint": "",
                    "roster_public_key": self.console.public_bytes().hex(),
                }
            )
        )
        lines = [
            f'state_dir = "{sd}"',
            "[heartbeat]",
            f"interval_s = {self.interval}",
            f"timeout_s = {self.timeout}",
            "[eligibility]",
            "allow_cpu_only = true",
            "[privacy]",
            f"require_secure_aggregation = {'false' if self.allow_plain else 'true'}",
        ]
        for ds in self.sites[site]:
            lines.append("[[datasets]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in ds.items()]
        cfg = self.root / f"agent-{site}.toml"
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    def start(self, timeout: float = 120.0) -> None:
        """Start the coordinator, then every agent; wait until all are connected.

        Raises:
            FederationError: a process exited or did not connect within ``timeout``.
        """
        self._enrol_in_registry()
        cfg = self._coordinator_config()
        endpoint_file = self.coord_dir / "endpoint"
        endpoint_file.unlink(missing_ok=True)
        self.coordinator = _Proc(
            "coordinator",
            [sys.executable, "-m", "fedge.cli", "coordinator", "--config", str(cfg)],
            self.root / "coordinator.log",
            self.env,
        )
        self.endpoint = wait_for(
            lambda: self._alive() and endpoint_file.exists() and endpoint_file.read_text().strip(),
            timeout,
            "the coordinator's endpoint file",
        )
        for site in self.sites:
            acfg = self._agent_config(site)
            self.agents[site] = _Proc(
                site,
                [sys.executable, "-m", "fedge.cli", "agent", "--config", str(acfg)],
                self.root / f"agent-{site}.log",
                self.env,
            )
        wait_for(
            lambda: self._alive() and self.connected() >= set(self.sites),
            timeout,
            "every agent to connect",
        )

    def _alive(self) -> bool:
        for p in [self.coordinator, *self.agents.values()]:
            if p is not None and p.p.poll() is not None:
                raise FederationError(f"{p.name} exited with {p.p.returncode}:\n{p.tail()}")
        return True

    # -- jobs ----------------------------------------------------------------------
    def submit(self, plan_text: str) -> str:
        """Queue a plan with ``fedge coordinator submit`` (run in this process: same code,
        no interpreter start-up per job); returns the job id.

        Raises:
            FederationError: the coordinator refused the plan (its message included).
        """
        import contextlib
        import io

        from fedge.cli import main as fedge_main

        plan = self.root / f"plan-{time.monotonic_ns()}.toml"
        plan.write_text(plan_text)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = fedge_main(
                [
                    "coordinator",
                    "submit",
                    "--config",
                    str(self.root / "coordinator.toml"),
                    str(plan),
                ]
            )
        if rc != 0:
            raise FederationError(f"plan refused: {err.getvalue().strip() or out.getvalue()}")
        return out.getvalue().strip()

    def query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.coord_dir / "coordinator.sqlite3", timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, args).fetchall()]
        finally:
            conn.close()

    def connected(self) -> set[str]:
        try:
            rows = self.query("SELECT site_id FROM appliances WHERE last_seen IS NOT NULL")
        except sqlite3.OperationalError:
            return set()
        return {r["site_id"] for r in rows}

    def job(self, job_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM jobs WHERE job_id = ?", job_id)
        return rows[0] if rows else None

    def round_metrics(self, job_id: str, rnd: int) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM metrics WHERE job_id = ? AND round = ?", job_id, rnd)

    def wait_job(
        self,
        job_id: str,
        timeout: float,
        *,
        on_round: Callable[[int, list[dict[str, Any]]], None] | None = None,
    ) -> dict[str, Any]:
        """Wait for a job to end, calling ``on_round(round, metric rows)`` per committed round.

        Raises:
            FederationError: timeout, a process died, or the job failed.
        """
        seen = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._alive()
            row = self.job(job_id)
            committed = int(row.get("committed_round") or 0) if row else 0
            while on_round is not None and seen < committed:
                seen += 1
                on_round(seen, self.round_metrics(job_id, seen))
            if row and row["status"] in ("completed", "failed", "cancelled"):
                if row["status"] != "completed":
                    raise FederationError(f"job {job_id} {row['status']}: {row.get('error')}")
                return row
            time.sleep(0.1)
        raise FederationError(f"timed out after {timeout:g} s waiting for job {job_id}")

    def final_weights(self, job_id: str) -> Any:
        from fedge.coordinator import checkpoint as ck

        return ck.load_checkpoint(ck.final_path(self.coord_dir, job_id)).weights

    def close(self) -> None:
        for p in self.agents.values():
            p.stop()
        if self.coordinator is not None:
            self.coordinator.stop()

    def __enter__(self) -> LoopbackFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
