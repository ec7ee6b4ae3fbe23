"""200 MB over CurveZMQ on loopback between two real processes, within a memory bound.

The requirement: a model moves with at most one extra copy of it in memory.
The sender's frames are views of its array (no copy; libzmq's CURVE encoder
holds ~2 transient copies of one chunk, ``DEFAULT_CHUNK_BYTES``).  The receiver
holds the received chunks (the one copy) and copies them into the model array,
freeing each chunk as it goes (``release_frames``) and handing the freed pages
back to the OS every ``_TRIM_EVERY_BYTES``; it has freed a large array before,
as any long-running process has, so the chunks sit in malloc arenas.  Each process measures its own
peak RSS growth around the transfer (VmHWM after resetting it: ru_maxrss would
carry the pytest process's peak into the child).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.wire import DEFAULT_CHUNK_BYTES
from fedge.wire.codec import _TRIM_EVERY_BYTES

HERE = Path(__file__).resolve().parent
MB = 200
CHUNK_MB = DEFAULT_CHUNK_BYTES / (1 << 20)
TRIM_MB = _TRIM_EVERY_BYTES / (1 << 20)  # freed chunks not yet handed back
SLACK_MB = 40  # interpreter, allocator and socket buffers


@pytest.mark.timeout(120)
def test_200mb_model_moves_with_at_most_one_extra_copy() -> None:
    recv = subprocess.Popen(
        [sys.executable, str(HERE / "_bigmove.py"), "recv", str(MB)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert recv.stdout is not None
        info = json.loads(recv.stdout.readline())
        send = subprocess.run(
            [sys.executable, str(HERE / "_bigmove.py"), "send", str(MB), info["endpoint"],
             info["server_key"], info["agent_public"], info["agent_secret"]],
            capture_output=True, text=True, timeout=90, check=True,
        )
        out, _ = recv.communicate(timeout=60)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait(timeout=10)
    receiver = json.loads(out.strip().splitlines()[-1])
    sender = json.loads(send.stdout.strip().splitlines()[-1])

    assert receiver["crc_ok"] and receiver["n"] == MB * (1 << 20) // 4
    assert receiver["frames"] == 2 + -(-MB // CHUNK_MB)  # header, body, chunks
    assert sender["acked"] and sender["tensor_frame_is_view"]
    # Receiver: the model array plus the freed chunks not yet handed back.
    assert receiver["peak_growth_mb"] <= MB + max(CHUNK_MB, TRIM_MB) + SLACK_MB, receiver
    # Sender: no copy of the model; libzmq's transient buffers for one chunk.
    assert sender["peak_growth_mb"] <= 2 * CHUNK_MB + SLACK_MB, sender
