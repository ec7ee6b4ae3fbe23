"""State diagrams generated from the transition tables (so the docs cannot drift).

``python -m fedge.secagg.diagram`` prints both as Mermaid ``stateDiagram-v2``.
"""

from __future__ import annotations

from .client import CLIENT_TERMINAL_STATES, CLIENT_TRANSITIONS
from .server import SERVER_TERMINAL_STAGES, SERVER_TRANSITIONS


def client_mermaid() -> str:
    """The client's states and the server message that moves each one on."""
    lines = ["stateDiagram-v2", "    [*] --> R0AdvertiseKeys"]
    for (state, message), nxt in CLIENT_TRANSITIONS.items():
        lines.append(f"    {state} --> {nxt}: {message}")
    for state in sorted({s for s, _ in CLIENT_TRANSITIONS}):
        lines.append(f"    {state} --> Aborted: SecAggAbort or RoundFailed")
    lines += [f"    {s} --> [*]" for s in CLIENT_TERMINAL_STATES]
    return "\n".join(lines)


def server_mermaid() -> str:
    """The server's stages, the client message each collects, and where it goes next."""
    lines = ["stateDiagram-v2", "    [*] --> AdvertiseKeys: start(now)"]
    for stage, (message, nxt) in SERVER_TRANSITIONS.items():
        lines.append(f"    {stage} --> {nxt}: all {message} in, or deadline")
        lines.append(f"    {stage} --> Failed: too few clients / shares")
    lines += [f"    {s} --> [*]" for s in SERVER_TERMINAL_STAGES]
    return "\n".join(lines)


if __name__ == "__main__":
    print("Client\n\n" + client_mermaid() + "\n\nServer\n\n" + server_mermaid())
