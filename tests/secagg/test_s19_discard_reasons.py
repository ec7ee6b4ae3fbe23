"""A SecAgg message the server discards says why (session 19).

The server used to count a discarded message and nothing else: a MaskedInput from
site-001 claiming client_id "site-000", or naming another round, left no trace, and
site-001 was later "dropped ... no answer before the stage deadline". Now each
discard no honest client causes is noted in ``ServerSession.discards`` (sender, a
fixed kind, why), for the coordinator to answer and audit, and a site dropped after one is dropped
naming it. The expected ones (a dropped site's late answer, anything after the end)
stay quiet. Real ClientSessions and ServerSession (tests/secagg/harness.Federation).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedge.secagg import messages as msgs
from fedge.secagg.server import DISCARD_KINDS, DISCARDS_KEPT, Discard, ServerSession

from .harness import Federation

BAD = "site-001"
HEAD = f"secure aggregation discarded MaskedInput from {BAD}: "


def _drive(fed: Federation, mangle) -> ServerSession:
    """Run a round where ``mangle(sender, reply)`` may swap a client's reply for a list
    of (sender, body)."""
    now = 0.0
    queue = list(fed.server.start(now))
    for _ in range(20):
        while queue:
            recipient, message = queue.pop(0)
            for reply in fed.clients[recipient].receive(message, now):
                for sender, body in mangle(recipient, reply):
                    queue += fed.server.receive(sender, body, now)
        if fed.server.done:
            return fed.server
        now += fed.config.stage_timeout + 1
        queue += fed.server.tick(now)
    raise AssertionError("round did not finish")


def _federation() -> Federation:
    return Federation(5, 16, alpha=0.0, threshold=3, delta=0.2)


# (id, how site-001's MaskedInput is changed, the kind, the reason after HEAD)
INSTEAD_OF_ITS_INPUT = [
    ("spoofed_client_id", lambda r: dataclasses.replace(r, client_id="site-000"),
     "spoofed_client", "its client_id 'site-000' is not the sender 'site-001'"),
    ("other_round", lambda r: dataclasses.replace(r, round=r.round + 1),
     "other_round", "it names round 4, not round 3"),
    ("other_job", lambda r: dataclasses.replace(r, job_id="job-other"),
     "other_job", "it names job 'job-other', not this round's 'job-brca'"),
    ("long_client_id", lambda r: dataclasses.replace(r, client_id="x" * 100_000),
     "spoofed_client", f"its client_id {'x' * 64!r}... is not the sender 'site-001'"),
    ("malformed", lambda r: dataclasses.replace(r, masked=r.masked.tolist()),
     "malformed", "MaskedInput.masked should be "),
]


@pytest.mark.parametrize("mangled, kind, why", [c[1:] for c in INSTEAD_OF_ITS_INPUT],
                         ids=[c[0] for c in INSTEAD_OF_ITS_INPUT])
def test_a_bad_masked_input_is_noted_with_why_and_its_sender_dropped_naming_it(
        mangled, kind, why):
    fed = _federation()

    def mangle(sender, reply):
        if sender == BAD and isinstance(reply, msgs.MaskedInput):
            return [(sender, mangled(reply))]
        return [(sender, reply)]

    server = _drive(fed, mangle)
    assert server.result is not None, server.failure
    assert server.result.survivors == [c for c in fed.ids if c != BAD]
    np.testing.assert_array_equal(server.result.total, fed.expected_sum(server.result.survivors))
    [(sender, noted_kind, reason)] = server.take_discards()
    assert (sender, noted_kind) == (BAD, kind)
    assert reason.startswith(HEAD + why), reason
    assert len(reason) < 300  # names fields; never the vector, a share or a key
    assert server.take_discards() == []  # taken once
    said = reason[len(HEAD):]
    assert server.left_out == {BAD: (
        "dropped out of secure aggregation in its MaskedInput stage: its MaskedInput was "
        f"discarded ({said}), and no valid answer came before the stage deadline")}


def test_the_wrong_message_for_the_stage_and_a_second_answer_are_noted():
    """site-001 sends its key advertisement again where its shares are due (and never
    sends the shares): dropped naming it. site-002 sends its masked input twice: the
    first stands and it survives; the second is noted."""
    fed = _federation()
    adverts: dict[str, msgs.KeyAdvertisement] = {}

    def mangle(sender, reply):
        if isinstance(reply, msgs.KeyAdvertisement):
            adverts[sender] = reply
        if sender == BAD and isinstance(reply, msgs.EncryptedShares):
            return [(sender, adverts[sender])]
        if sender == "site-002" and isinstance(reply, msgs.MaskedInput):
            return [(sender, reply), (sender, reply)]
        return [(sender, reply)]

    server = _drive(fed, mangle)
    assert server.result is not None and "site-002" in server.result.survivors
    assert server.take_discards() == [
        Discard(BAD, "wrong_stage", f"secure aggregation discarded KeyAdvertisement from "
                f"{BAD}: the ShareKeys stage takes EncryptedShares"),
        Discard("site-002", "second_answer", "secure aggregation discarded MaskedInput "
                "from site-002: site-002 already answered the MaskedInput stage; its "
                "first answer stands"),
    ]
    assert server.left_out == {BAD: (
        "dropped out of secure aggregation in its ShareKeys stage: its KeyAdvertisement "
        "was discarded (the ShareKeys stage takes EncryptedShares), and no valid answer "
        "came before the stage deadline")}


def test_a_late_answer_of_a_dropped_site_and_one_after_the_end_stay_quiet():
    """Expected on any network: counted, not noted. A spoofed one from the same site is
    noted all the same, dropped or not."""
    fed = _federation()
    held: list[msgs.MaskedInput] = []
    answered: dict[str, object] = {}

    def mangle(sender, reply):
        answered[sender] = reply
        if sender == BAD and isinstance(reply, msgs.MaskedInput):
            held.append(reply)  # delayed in the network past the stage deadline
            return []
        if isinstance(reply, msgs.ConsistencySignature) and held:
            late = held.pop()
            return [(BAD, late), (BAD, dataclasses.replace(late, client_id="site-003")),
                    (sender, reply)]
        return [(sender, reply)]

    server = _drive(fed, mangle)
    assert server.result is not None and BAD not in server.result.survivors
    assert server.left_out == {BAD: "dropped out of secure aggregation in its MaskedInput "
                                    "stage: no answer before the stage deadline"}
    assert server.take_discards() == [
        (BAD, "spoofed_client", f"{HEAD}its client_id 'site-003' is not the sender 'site-001'")]
    before = server.discarded
    assert server.receive("site-002", answered["site-002"], 99.0) == []  # after the end
    assert server.discarded == before + 1 and server.take_discards() == []


def test_an_outsider_is_noted_and_the_notes_kept_are_bounded():
    fed = _federation()
    server = fed.server
    server.start(0.0)
    advert = next(r for r in fed.clients[BAD].receive(
        msgs.AdvertiseRequest(fed.job_id, fed.round, list(fed.ids), fed.config.threshold,
                              fed.config.degree or 0, fed.d, server.graph_seed), 0.0))
    assert server.receive("mallory", dataclasses.replace(advert, client_id="mallory"),
                          0.0) == []
    assert server.take_discards() == [
        ("mallory", "outsider", "secure aggregation discarded KeyAdvertisement from "
                                "mallory: 'mallory' is not in the cohort of this round")]
    for i in range(DISCARDS_KEPT + 10):
        assert server.receive(f"mallory-{i}", "hello", 0.0) == []
    assert server.discarded == DISCARDS_KEPT + 11
    kept = server.take_discards()
    assert len(kept) == DISCARDS_KEPT
    assert kept[-1] == (f"mallory-{DISCARDS_KEPT + 9}", "malformed",
                        f"secure aggregation discarded str from mallory-{DISCARDS_KEPT + 9}: "
                        "str is not a secagg message")


def test_a_spoofed_client_id_is_one_kind_whatever_it_names():
    """The kind is a fixed code, never the client's text: a client_id of several words
    (which a kind made of the reason's words kept in part) is still "spoofed_client"."""
    fed = _federation()

    def mangle(sender, reply):
        if sender == BAD and isinstance(reply, msgs.MaskedInput):
            return [(sender, dataclasses.replace(reply, client_id=f"x {w} y"))
                    for w in ("aaa", "bbb", "ccc")] + [(sender, reply)]
        return [(sender, reply)]

    server = _drive(fed, mangle)
    assert server.result is not None and BAD in server.result.survivors
    noted = server.take_discards()
    assert [(d.sender, d.kind) for d in noted] == [(BAD, "spoofed_client")] * 3
    assert "'x bbb y'" in noted[1].why
    assert set(DISCARD_KINDS) >= {d.kind for d in noted}
