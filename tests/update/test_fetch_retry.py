"""A fetch reply lost on the agent's link (a connection reset mid-download) is asked for
again: the download goes on from the bytes already received and the update installs.
A fetch never answered is reported as a transport failure, which the roll-out asks
again for instead of stopping; a failed install still stops it."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fedge.agent.updates import AgentUpdateClient, AgentUpdater, retryable
from fedge.coordinator.admin import AdminService
from fedge.coordinator.service import Coordinator
from fedge.serve.repository import ModelRepository
from fedge.update.messages import (
    UpdateAvailable,
    UpdateFetchRequest,
    UpdateOutcome,
    transport_failure,
)
from fedge.update.rollout import Rollout
from fedge.wire import codec
from fedge.wire import messages as _registered  # noqa: F401  (registers the fetch pair)


def run_client(fleet, models, requests: list[UpdateFetchRequest], *, drop, asks,
               ask_again_after_drop: bool = False, **kw) -> list[UpdateOutcome]:
    """One AgentUpdateClient over a link through the codec to the coordinator's relay;
    the reply to each request for which ``drop(request)`` is true is lost on the way
    back. With ``ask_again_after_drop`` the coordinator then asks for the roll-out
    again, as it does when the site reconnects. Returns the outcomes sent."""

    async def main() -> list[UpdateOutcome]:
        client: AgentUpdateClient
        loop = asyncio.get_running_loop()

        async def send(body: object) -> None:
            env = codec.decode(codec.encode(body, sender="h1"), max_bytes=1 << 21)
            if not isinstance(env.body, UpdateFetchRequest):
                return
            requests.append(env.body)
            if drop(env.body):
                if ask_again_after_drop:
                    loop.call_later(0.05, lambda: asyncio.ensure_future(
                        client.handle(asks[0])))
                return
            reply = fleet.repo.handle_fetch(env.body)
            back = codec.decode(codec.encode(reply, sender="coordinator"), max_bytes=1 << 21)
            loop.call_soon(lambda: asyncio.ensure_future(client.handle(back.body)))

        client = AgentUpdateClient(AgentUpdater(fleet.agent_dir, clock=fleet.clock), send,
                                   models=models, **kw)
        for ask in asks:
            await client.handle(ask)
        await asyncio.wait_for(asyncio.gather(*client.tasks), 30)
        return client.outcomes

    return asyncio.run(main())


def big_model(make_onnx) -> bytes:
    """A model of a few MiB (several 1 MiB chunks): a valid graph, padded in metadata."""
    import onnx

    model = onnx.load_from_string(make_onnx(4.0))
    model.metadata_props.add(key="padding", value="x" * (3 << 20))
    return model.SerializeToString()


def first_time(pred):
    """A drop() that is true for the first request matching ``pred`` only."""
    seen: list[UpdateFetchRequest] = []

    def drop(req: UpdateFetchRequest) -> bool:
        if not seen and pred(req):
            seen.append(req)
            return True
        return False
    return drop


def test_a_chunk_reply_lost_mid_download_is_asked_for_again_and_the_model_installs(
        fleet, tmp_path, make_onnx, caplog):
    data = big_model(make_onnx)
    fleet.publish("model", "risk", "4", "model.onnx", data)
    path = next(iter(fleet.repo.current_targets().signed.targets))
    models = ModelRepository(tmp_path / "models")
    requests: list[UpdateFetchRequest] = []
    lost = first_time(lambda r: r.path.startswith("targets/") and r.offset > 0)
    with caplog.at_level(logging.WARNING, logger="fedge.agent.updates"):
        outcome, = run_client(fleet, models, requests, drop=lost, reply_timeout_s=0.5,
                              asks=[UpdateAvailable("r1", path)])
    assert outcome.ok, outcome.detail
    assert models.versions("risk") == [1]
    chunks = [r.offset for r in requests if r.path.startswith("targets/")]
    assert chunks == sorted(chunks) and len(chunks) == len(set(chunks)) + 1  # one again
    assert chunks[0] == 0 and chunks.count(chunks[1]) == 2  # resumed, not from 0
    assert "no reply within 0.5 s; sending the request again (try 2 of 4)" in caplog.text
    assert len(AgentUpdater(fleet.agent_dir).audit_log()) == 1


def test_asked_again_by_the_coordinator_the_unanswered_request_goes_again_at_once(
        fleet, tmp_path, make_onnx, caplog):
    """The coordinator asks for the roll-out again when the site reconnects: the request
    lost with the old connection is sent again then, not after reply_timeout_s."""
    fleet.publish("model", "risk", "4", "model.onnx", make_onnx(4.0))
    path = next(iter(fleet.repo.current_targets().signed.targets))
    models = ModelRepository(tmp_path / "models")
    requests: list[UpdateFetchRequest] = []
    lost = first_time(lambda r: r.path.startswith("targets/"))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fedge.agent.updates"):
        outcome, = run_client(fleet, models, requests, drop=lost, reply_timeout_s=20,
                              ask_again_after_drop=True, asks=[UpdateAvailable("r1", path)])
    assert outcome.ok, outcome.detail
    assert time.monotonic() - started < 10
    assert models.versions("risk") == [1]
    assert "the coordinator asked for the roll-out again" in caplog.text


def test_a_fetch_never_answered_is_a_transport_failure_tried_again_when_asked(
        fleet, tmp_path, make_onnx):
    """Every reply lost: after its tries the agent reports a transport failure (not an
    install failure), does not keep it as the roll-out's answer, and installs when
    asked again over a link that works."""
    fleet.publish("model", "risk", "4", "model.onnx", make_onnx(4.0))
    path = next(iter(fleet.repo.current_targets().signed.targets))
    models = ModelRepository(tmp_path / "models")
    requests: list[UpdateFetchRequest] = []
    failed, = run_client(fleet, models, requests, drop=lambda r: True, reply_timeout_s=0.2,
                         fetch_attempts=2, asks=[UpdateAvailable("r1", path)])
    assert transport_failure(failed) and retryable(failed), failed.detail
    assert "after 2 tries" in failed.detail and "nothing installed" in failed.detail
    assert len(requests) == 2 and requests[0] == requests[1]
    assert AgentUpdater(fleet.agent_dir).reported("r1") is None
    again, = run_client(fleet, models, [], drop=lambda r: False, reply_timeout_s=5,
                        asks=[UpdateAvailable("r1", path)])
    assert again.ok and models.versions("risk") == [1]


P = "model/risk/2/model.onnx"
UNFETCHED = UpdateOutcome("r1", P, False, False,
                          f"FetchTransportError: fetch targets/{P}@0: no reply within 30 s, "
                          "after 4 tries")


def test_a_transport_failure_asks_the_same_site_again_and_the_rollout_goes_on():
    r = Rollout("r1", P, ["a", "b"], deadline_s=60)
    r.start(0)
    assert r.receive("a", UNFETCHED, 5) == [("a", UpdateAvailable("r1", P))]
    assert r.state == "canary" and r.waiting_for == "a" and not r.failure
    assert [s for s, _ in r.receive("a", UpdateOutcome("r1", P, True, False, "ok"), 9)] == \
        ["b"]
    assert r.receive("b", UNFETCHED, 10) == [("b", UpdateAvailable("r1", P))]
    r.receive("b", UpdateOutcome("r1", P, True, False, "ok"), 11)
    assert r.state == "succeeded" and r.results["b"]["ok"]


def test_a_failed_install_still_stops_the_rollout_whatever_its_words():
    for detail in ("LengthOrHashMismatchError: hash mismatch", "HealthCheckFailed: no ack",
                   "DownloadError: fetch x@0: no reply within 30 s",  # the previous agent
                   "ok FetchTransportError: not at the start"):
        r = Rollout("r1", P, ["a", "b"])
        r.start(0)
        assert r.receive("a", UpdateOutcome("r1", P, False, False, detail), 1) == []
        assert r.state == "failed" and "1 site(s) not updated" in r.failure


def test_a_site_that_cannot_fetch_before_the_deadline_fails_the_rollout_naming_why():
    r = Rollout("r1", P, ["a", "b"], deadline_s=60)
    r.start(0)
    r.receive("a", UNFETCHED, 40)
    back = Rollout.from_state(r.to_state())
    for rollout in (r, back):
        rollout.tick(59.9)
        assert rollout.state == "canary"
        rollout.tick(60)
        assert rollout.state == "failed" and "a could not fetch" in rollout.failure
        assert "FetchTransportError" in rollout.results["a"]["detail"]


def test_the_coordinator_asks_the_site_again_after_its_transport_failure(tmp_path):
    coordinator = Coordinator(tmp_path / "c")
    sent: list[tuple[str, object]] = []
    service = AdminService(coordinator, {}, send=lambda site, body: sent.append((site, body)),
                           clock=lambda: 101.0)
    rollout = Rollout("rollout-1", P, ["h1", "h2"], deadline_s=60)
    rollout.start(100.0)
    service.rollouts[rollout.rollout_id] = rollout
    service.on_outcome("h1", UpdateOutcome("rollout-1", P, False, False,
                                           UNFETCHED.detail))
    assert sent == [("h1", UpdateAvailable("rollout-1", P))]
    assert service.rollouts["rollout-1"].state == "canary"
    audit, = coordinator.store.audit_log(action="update.outcome")
    assert json.loads(audit["detail"])["detail"].startswith("FetchTransportError: ")
    coordinator.close()
