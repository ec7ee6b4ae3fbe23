"""A download has an overall deadline, its floor plus its signed length at a minimum
rate: a coordinator that answers every fetch request in time but with a byte or two
(slow retrieval) fails the download instead of holding the agent's one install lock
for ever."""

from __future__ import annotations

import time

import pytest

from fedge.agent.updates import (
    DOWNLOAD_FLOOR_S,
    DOWNLOAD_MIN_RATE,
    AgentUpdater,
    FetchTransportError,
    ZmqFetcher,
    retryable,
)
from fedge.serve.repository import ModelRepository
from fedge.update.messages import UpdateFetchReply, UpdateOutcome


def dripping(fleet, pause_s: float):
    """The coordinator's relay, answering each target request with one byte after
    `pause_s` (metadata as usual)."""
    honest = fleet.repo.handle_fetch

    def drip(req):
        reply = honest(req)
        if not req.path.startswith("targets/"):
            return reply
        time.sleep(pause_s)
        return UpdateFetchReply(reply.path, reply.offset, reply.data[:1],
                                reply.eof and len(reply.data) <= 1, reply.error)
    return drip


def test_a_target_dripped_a_byte_per_reply_fails_at_its_deadline(fleet, tmp_path, make_onnx):
    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    fetcher = ZmqFetcher(fleet._roundtrip, chunk=4096, floor_s=0.5, min_rate=1024.0)
    updater = AgentUpdater(fleet.agent_dir, fetcher, clock=fleet.clock)
    [spec] = updater.pending()
    deadline = fetcher.deadline_s(spec.length)
    assert deadline == pytest.approx(0.5 + spec.length / 1024)
    fleet.roundtrip = dripping(fleet, pause_s=0.02)  # the whole target: >= 2 s
    assert spec.length * 0.02 > 2 * deadline
    fleet.requests = 0
    t0 = time.monotonic()
    with pytest.raises(FetchTransportError, match=(
            rf"fetch targets/model/risk/1/[0-9a-f]+\.model\.onnx: \d+ of at most "
            rf"{spec.length} bytes after [0-9.]+ s, past this download's deadline of "
            rf"{deadline:.1f} s \(0.5 s plus its length at 1 KiB/s\)")):
        updater.download(spec)
    assert time.monotonic() - t0 < deadline + 0.5
    assert fleet.requests < spec.length

    outcome = updater.install(spec, models=ModelRepository(tmp_path / "models"))
    assert not outcome.ok and outcome.detail.startswith("FetchTransportError: fetch targets/")
    # a transport failure: the roll-out asks this site again, it is not final
    assert retryable(UpdateOutcome("r1", spec.path, outcome.ok, False, outcome.detail))
    assert updater.installed() == {}


def test_a_target_delivered_in_time_is_not_affected_by_the_deadline(fleet, tmp_path,
                                                                     make_onnx):
    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    fetcher = ZmqFetcher(fleet._roundtrip, chunk=16, floor_s=5.0, min_rate=1024.0)
    updater = AgentUpdater(fleet.agent_dir, fetcher, clock=fleet.clock)
    [spec] = updater.pending()
    assert updater.install(spec, models=ModelRepository(tmp_path / "models")).ok


def test_the_default_deadline_is_generous_for_a_slow_site_and_bounded():
    """The floor, plus the length at half the rate a site's link needs to stay
    connected at all (1 MiB per 30 s of libzmq heartbeat): 5 min + 64 s for 1 MiB,
    about 24 h for a 1.4 GB bundled venv."""
    fetcher = ZmqFetcher(lambda req: None)
    assert (DOWNLOAD_FLOOR_S, DOWNLOAD_MIN_RATE) == (300.0, 16 * 1024)
    assert fetcher.deadline_s(1 << 20) == 300.0 + 64.0
    assert 23 * 3600 < fetcher.deadline_s(1_400_000_000) < 24 * 3600
    with pytest.raises(ValueError, match="must be > 0"):
        ZmqFetcher(lambda req: None, min_rate=0)
