"""A SecAgg message the coordinator's session discards is answered, logged and
audited, and the round names it where it drops the site (session 19).

Before, an enrolled site's MaskedInput whose body named another site (client_id "a"
from "m") or another job was discarded with no Rejected, no log line and no audit
row, and the committed round said "m" dropped out "no answer before the stage
deadline". The coordinator, agents, codec and SecAgg+ are real
(tests/coordinator/conftest.py's InProcFederation); "m" is a real Agent whose
outgoing messages are edited as a modified appliance holding its own keys would
send them (test_s15_tamper).
"""

from __future__ import annotations

import dataclasses
import logging

import pytest

from fedge.secagg.messages import MaskedInput
from fedge.wire import codec
from fedge.wire import messages as m
from tests.coordinator.test_s15_tamper import DIM, audited, plan, run_job

SITES = {"a": 100, "b": 100, "c": 100, "m": 100}


def send_instead(fed, site, replace):
    """``site``'s MaskedInput is sent as the list ``replace(body)`` (each a new message
    id; a plain function's one body: the real one never goes). Returns the messages
    the coordinator sent ``site`` (decoded), as it receives them."""
    async def send_frames(frames):
        env = codec.decode([bytes(f) for f in frames], max_bytes=1 << 30)
        bodies = [env.body]
        if isinstance(env.body, MaskedInput):
            bodies = replace(env.body)
            bodies = bodies if isinstance(bodies, list) else [bodies]
        for body in bodies:
            fed.inbox.append((site, [bytes(f) for f in codec.encode(
                body, sender=site, job=env.header.job, round=env.header.round)]))
    fed.agents[site].send_frames = send_frames
    received: list[object] = []
    handle = fed.agents[site].handle_frames

    async def handle_frames(frames):
        received.append(codec.decode([bytes(f) for f in frames], max_bytes=1 << 30).body)
        await handle(frames)
    fed.agents[site].handle_frames = handle_frames
    return received


# (id, the change to m's MaskedInput, what the reason says after the head)
CASES = [
    ("spoofed_client_id", lambda b: dataclasses.replace(b, client_id="a"),
     "its client_id 'a' is not the sender 'm'"),
    ("other_job", lambda b: dataclasses.replace(b, job_id="job-elsewhere"),
     "it names job 'job-elsewhere', not this round's "),
]


@pytest.mark.parametrize("replace, why", [(c[1], c[2]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_a_bad_masked_input_is_rejected_logged_audited_and_named_in_the_round(
        federation, caplog, replace, why):
    fed = federation(list(SITES), dim=DIM, n_examples=SITES)
    received = send_instead(fed, "m", replace)
    with caplog.at_level(logging.WARNING, logger="fedge.coordinator"):
        job = run_job(fed, plan(min_clients=2))
    store = fed.coord.store
    assert store.job(job).status == "completed", store.job(job)
    (attempt,) = store.rounds(job)
    assert attempt.status == "committed" and attempt.survivors == ["a", "b", "c"]
    head = "secure aggregation discarded MaskedInput from m: "
    # answered
    rejected = [b.reason for b in received if isinstance(b, m.Rejected)]
    assert len(rejected) == 1 and rejected[0].startswith(head + why), rejected
    # audited, with the job and round
    [row] = audited(fed, "rejected_message", job)
    assert (row["job"], row["round"], row["reason"]) == (job, 1, rejected[0])
    assert [r["actor"] for r in store.audit_log(action="rejected_message", job=job)] == ["m"]
    # logged
    assert f"rejected message from m in job {job} round 1: {head}{why}" in caplog.text
    # the round names what m sent, not silence
    said = rejected[0][len(head):]
    assert attempt.dropped_reasons["m"] == (
        "dropped out of secure aggregation in its MaskedInput stage: its MaskedInput was "
        f"discarded ({said}), and no valid answer came before the stage deadline")


def test_a_site_repeating_bad_masked_inputs_is_answered_each_time_audited_once_a_kind(
        federation):
    """Each is answered; the audit log takes the first of each kind in full and counts
    the rest (AuditThrottle), so a hostile site cannot flood it: a spoofed client_id
    is one kind whatever it names; another job, a second answer are others."""
    fed = federation(list(SITES), dim=DIM, n_examples=SITES)

    def replace(b):
        spoof = [dataclasses.replace(b, client_id=c) for c in ("a", "a", "a", "b")]
        return [*spoof, dataclasses.replace(b, job_id="job-x"), b, b]

    received = send_instead(fed, "m", replace)
    job = run_job(fed, plan(min_clients=2))
    store = fed.coord.store
    assert store.job(job).status == "completed"
    assert store.rounds(job)[0].survivors == ["a", "b", "c", "m"]  # its own one counted
    rejected = [b.reason for b in received if isinstance(b, m.Rejected)]
    assert len(rejected) == 6
    head = "secure aggregation discarded MaskedInput from m: "
    rows = audited(fed, "rejected_message", job)
    full = [r["reason"] for r in rows if "repeated" not in r]
    assert full[:2] == [head + "its client_id 'a' is not the sender 'm'",
                        head + f"it names job 'job-x', not this round's {job!r}"]
    # its own input may be the last the stage waited for: its copy then comes in the next
    assert full[2:] in ([head + "m already answered the MaskedInput stage; its first "
                                "answer stands"],
                        [head + "the ConsistencyCheck stage takes ConsistencySignature"])
    assert sum(r.get("repeated", 0) for r in rows) <= 3


def test_after_the_sum_a_late_masked_input_is_quiet_and_a_spoofed_one_still_refused(
        federation):
    """In the evaluation (the session over) a SecAgg message is harmless and was never
    answered; one whose body names another site is refused and audited all the same.
    "m" sends, before its evaluation result, its own masked input again (quiet) and a
    copy naming "a" (refused)."""
    fed = federation(list(SITES), dim=DIM, n_examples=SITES)
    saved: list[MaskedInput] = []

    async def send_frames(frames):
        env = codec.decode([bytes(f) for f in frames], max_bytes=1 << 30)
        bodies = [env.body]
        if isinstance(env.body, MaskedInput):
            saved.append(env.body)
        if isinstance(env.body, m.EvalResult) and saved:
            bodies = [saved[0], dataclasses.replace(saved[0], client_id="a"), env.body]
        for body in bodies:
            fed.inbox.append(("m", [bytes(f) for f in codec.encode(
                body, sender="m", job=env.header.job, round=env.header.round)]))
    fed.agents["m"].send_frames = send_frames
    job = run_job(fed, plan(min_clients=2))
    store = fed.coord.store
    assert store.job(job).status == "completed", store.job(job)
    (attempt,) = store.rounds(job)
    assert attempt.survivors == ["a", "b", "c", "m"] and saved
    assert [r["reason"] for r in audited(fed, "rejected_message", job)] == [
        "secure aggregation discarded MaskedInput from m: its client_id 'a' is not the "
        "sender 'm'"]


def test_a_plain_update_of_the_wrong_shape_is_audited_as_well(federation):
    """The plain sum's refusal (its Rejected) went to the site unaudited: the round now
    notes every refusal an aggregation answers with, plain or secure."""
    fed = federation(list(SITES), dim=DIM, n_examples=SITES)

    async def send_frames(frames):
        env = codec.decode([bytes(f) for f in frames], max_bytes=1 << 30)
        body = env.body
        if isinstance(body, m.PlainUpdate):
            body = dataclasses.replace(body, vector=body.vector[:3])
        fed.inbox.append(("m", [bytes(f) for f in codec.encode(
            body, sender="m", job=env.header.job, round=env.header.round)]))
    fed.agents["m"].send_frames = send_frames
    job = run_job(fed, plan(min_clients=2, secure=False))
    assert fed.coord.store.job(job).status == "completed"
    [row] = audited(fed, "rejected_message", job)
    assert row["reason"] == (f"plain update of shape (3,) or non-finite; expected finite "
                             f"float32[{DIM + 1}]")
