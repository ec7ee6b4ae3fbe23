"""The console's side of the admin channel: one CurveZMQ DEALER per call,
authenticated with the operator's key and pinned to the coordinator's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class AdminError(RuntimeError):
    """The coordinator refused or failed the request; the message says why."""


@dataclass(frozen=True)
class AdminClient:
    endpoint: str
    server_public_key: str
    public_key: str
    secret_key: str
    timeout_s: float = 10.0

    @classmethod
    def from_store(cls, store: Any, operator: str, *, timeout_s: float = 10.0) -> AdminClient:
        """Raises: ConsoleError if the operator is unknown."""
        keys = store.operator_keys(operator)
        return cls(store.admin_endpoint, store.coordinator_public_key, keys["public"],
                   keys["secret"], timeout_s)

    def call(self, op: str, args: dict[str, Any] | None = None,
             blobs: dict[str, bytes] | None = None) -> tuple[Any, dict[str, bytes]]:
        """Send one request and wait for the reply.

        Raises:
            AdminError: the coordinator answered with an error.
            TimeoutError: no reply within timeout_s (coordinator down, or our key
                refused by its ZAP handler — CURVE refusals are silent by design).
        """
        import zmq

        from fedge.console.protocol import AdminReply, AdminRequest
        from fedge.transport._sockopts import set_ipv6
        from fedge.wire import codec

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        set_ipv6(sock, self.endpoint, bind=False)  # IPv6 for tcp://[ADDRESS]:P only
        sock.curve_serverkey = self.server_public_key.encode("ascii")
        sock.curve_publickey = self.public_key.encode("ascii")
        sock.curve_secretkey = self.secret_key.encode("ascii")
        try:
            sock.connect(self.endpoint)
            req = AdminRequest(op, json.dumps(args or {}), dict(blobs or {}))
            sock.send_multipart(codec.encode(req, sender="console"))
            if not sock.poll(int(self.timeout_s * 1000)):
                raise TimeoutError(f"no reply from the coordinator at {self.endpoint} within "
                                   f"{self.timeout_s:g} s (down, or this operator key is "
                                   "not accepted)")
            env = codec.decode(sock.recv_multipart(), max_bytes=256 << 20)
        finally:
            sock.close(0)
        reply = env.body
        if not isinstance(reply, AdminReply):
            raise AdminError(f"unexpected reply type {type(reply).__name__}")
        if not reply.ok:
            raise AdminError(reply.error)
        return json.loads(reply.result_json), dict(reply.blobs)
