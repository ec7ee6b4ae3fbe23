"""Transport errors; each message names what was wrong and what would fix it."""

from __future__ import annotations


class TransportError(RuntimeError):
    """Base class of fedge.transport errors."""


class KeyFileError(TransportError, ValueError):
    """A CURVE key or key file is missing, malformed, mismatched or too permissive."""


class HandshakeFailed(TransportError):
    """The CurveZMQ handshake with the server failed; ``reason`` says why.

    ``kind`` is ``"refused"`` (the server's ZAP handler rejected our key: not
    enrolled or revoked) or ``"impostor"`` (the server could not complete the
    handshake for the pinned key: it does not hold that key's secret).
    """

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(reason)


class NotConnected(TransportError):
    """A send or receive on a closed socket, or to a peer that is not connected."""
