"""A hostile server, explored by Hypothesis: every lie it tells is refused by name.

The machine holds a real round (5 clients, t = 3) driven by the honest
``ServerSession``; between deliveries Hypothesis may tamper with the next
message to one client, replay a message from an earlier round, withhold a
message (a dropout), or re-ask a finished client.  Each lie must raise its
named abort in the client it targets.  Invariants throughout: no client
reveals both share kinds for one peer, and a sum the server produces is
exactly the plain quantised sum of its survivors.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from fedge.secagg import (
    ClientListedAsAliveAndDropped,
    CohortMismatch,
    ConsistencyCheckFailed,
    DuplicateAdvertisement,
    DuplicateClient,
    ForgedAdvertisement,
    GraphSeedMismatch,
    ParameterMismatch,
    ReplayedMessage,
    SecAggAbort,
    SelfListedAsDropped,
    TamperedShare,
    UnexpectedMessage,
    UnknownClient,
    UnsignedAdvertisement,
    keys,
)
from fedge.secagg import messages as msgs

from .harness import Federation, attack, revealed_kinds, sign_advert

Lie = Callable[[Federation, str, object], object | None]  # None: does not apply here


def _others(items, me):
    return [c for c in items if c != me]


def _advert_with(m, cid, enc, mask, sig):
    return dataclasses.replace(
        m,
        enc_keys={**m.enc_keys, cid: enc},
        mask_keys={**m.mask_keys, cid: mask},
        signatures={**m.signatures, cid: sig},
    )


def _forge_key(fed, me, m):
    peer = _others(sorted(m.mask_keys), me)
    return peer and dataclasses.replace(
        m, mask_keys={**m.mask_keys, peer[0]: keys.RoundKeys().mask_public}
    )


def _unsign(fed, me, m):
    peer = _others(sorted(m.signatures), me)
    return peer and dataclasses.replace(m, signatures={**m.signatures, peer[-1]: b""})


def _duplicate_advert(fed, me, m):
    peers = _others(sorted(m.enc_keys), me)
    if len(peers) < 2:
        return None
    a, b = peers[0], peers[1]
    enc, mask = m.enc_keys[a], m.mask_keys[a]
    return _advert_with(m, b, enc, mask, sign_advert(fed, b, b, enc, mask))


def _sybil_advert(fed, me, m):
    k = keys.RoundKeys()
    spare = fed.spares[0]
    sig = sign_advert(fed, spare, spare, k.enc_public, k.mask_public)
    return _advert_with(m, spare, k.enc_public, k.mask_public, sig)


def _flip_share(fed, me, m):
    if not m.ciphertexts:
        return None
    sender = sorted(m.ciphertexts)[0]
    blob = bytearray(m.ciphertexts[sender])
    blob[-1] ^= 0x80
    return dataclasses.replace(m, ciphertexts={**m.ciphertexts, sender: bytes(blob)})


def _swap_shares(fed, me, m):
    senders = sorted(m.ciphertexts)
    if len(senders) < 2:
        return None
    a, b = senders[0], senders[1]
    return dataclasses.replace(
        m, ciphertexts={**m.ciphertexts, a: m.ciphertexts[b], b: m.ciphertexts[a]}
    )


def _move_to_dropped(fed, me, m):
    peer = _others(m.survivors, me)
    return peer and dataclasses.replace(
        m, survivors=_others(m.survivors, peer[0]), dropped=[*m.dropped, peer[0]]
    )


def _both_lists(fed, me, m):
    peer = _others(m.survivors, me)
    return peer and dataclasses.replace(m, dropped=[*m.dropped, peer[-1]])


def _forge_consistency(fed, me, m):
    peer = _others(sorted(m.signatures), me)
    return peer and dataclasses.replace(m, signatures={**m.signatures, peer[0]: os.urandom(64)})


def _too_few_signatures(fed, me, m):
    t = fed.config.threshold
    return dataclasses.replace(m, signatures=dict(sorted(m.signatures.items())[: t - 1]))


LIES: dict[type, list[tuple[str, Lie, type[SecAggAbort]]]] = {
    msgs.AdvertiseRequest: [
        ("sybil in cohort", lambda f, me, m: dataclasses.replace(
            m, cohort=[*_others(m.cohort, _others(m.cohort, me)[0]), "mallory"]), UnknownClient),
        ("duplicate in cohort", lambda f, me, m: dataclasses.replace(
            m, cohort=[*_others(m.cohort, _others(m.cohort, me)[0]), me]), DuplicateClient),
        ("cohort without me", lambda f, me, m: dataclasses.replace(
            m, cohort=[*_others(m.cohort, me), f.spares[0]]), CohortMismatch),
        ("weaker threshold", lambda f, me, m: dataclasses.replace(
            m, threshold=m.threshold - 1), ParameterMismatch),
        ("chosen graph seed", lambda f, me, m: dataclasses.replace(
            m, graph_seed=os.urandom(32)), GraphSeedMismatch),
    ],
    msgs.AdvertisedKeys: [
        ("forged key", _forge_key, ForgedAdvertisement),
        ("unsigned advert", _unsign, UnsignedAdvertisement),
        ("duplicate advert", _duplicate_advert, DuplicateAdvertisement),
        ("sybil advert", _sybil_advert, UnknownClient),
    ],
    msgs.RelayedShares: [
        ("tampered share", _flip_share, TamperedShare),
        ("swapped shares", _swap_shares, TamperedShare),
        ("share from outsider", lambda f, me, m: dataclasses.replace(
            m, ciphertexts={**m.ciphertexts, "mallory": os.urandom(200)}), UnknownClient),
    ],
    msgs.ConsistencyRequest: [
        ("survivors without me", lambda f, me, m: dataclasses.replace(
            m, survivors=_others(m.survivors, me)), SelfListedAsDropped),
        ("duplicate survivor", lambda f, me, m: dataclasses.replace(
            m, survivors=[*m.survivors, me]), DuplicateClient),
        ("unknown survivor", lambda f, me, m: dataclasses.replace(
            m, survivors=[*m.survivors, f.spares[0]]), UnknownClient),
    ],
    msgs.UnmaskRequest: [
        ("survivor moved to dropped", _move_to_dropped, ClientListedAsAliveAndDropped),
        ("alive and dropped", _both_lists, ClientListedAsAliveAndDropped),
        ("me dropped", lambda f, me, m: dataclasses.replace(
            m, survivors=_others(m.survivors, me), dropped=[*m.dropped, me]), SelfListedAsDropped),
        ("forged consistency signature", _forge_consistency, ConsistencyCheckFailed),
        ("too few signatures", _too_few_signatures, ConsistencyCheckFailed),
        ("unknown dropped", lambda f, me, m: dataclasses.replace(
            m, dropped=[*m.dropped, "mallory"]), UnknownClient),
    ],
}


def _earlier_round_messages() -> list[tuple[str, object]]:
    """Every server message of an honest earlier round (round 2) of the same job."""
    fed = Federation(5, 8, alpha=0.0, threshold=3, delta=0.4, round=2, seed=99)
    seen: list[tuple[str, object]] = []
    fed.run(tamper=lambda r, m: seen.append((r, m)))
    return seen


EARLIER = _earlier_round_messages()


class HostileServer(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fed = Federation(5, 8, alpha=0.0, threshold=3, delta=0.4, seed=1)
        self.now = 0.0
        self.pending: list[tuple[str, object]] = list(self.fed.server.start(self.now))
        self.silenced: set[str] = set()
        self.last_unmask: dict[str, msgs.UnmaskRequest] = {}
        self.asked_again: set[str] = set()
        self.attacked_stage: type = msgs.AdvertiseRequest

    @initialize(stage=st.sampled_from(sorted(LIES, key=lambda t: t.__name__)))
    def choose_the_stage_to_attack(self, stage: type) -> None:
        self.attacked_stage = stage  # lies and replays land here; dropouts anywhere

    # --- helpers ------------------------------------------------------------------

    def _may_lie(self) -> bool:
        return (
            bool(self.pending)
            and self._casualties() < 2
            and isinstance(self.pending[0][1], self.attacked_stage)
        )

    def _casualties(self) -> int:
        """Clients lost to lies or dropouts; beyond n - t = 2 the round cannot finish."""
        return len(self.silenced) + sum(
            c.state == "Aborted" for c in self.fed.clients.values()
        )

    def _live(self, cid: str) -> bool:
        return cid not in self.silenced and not self.fed.clients[cid].done

    def _deliver(self, cid: str, message: object) -> None:
        if isinstance(message, msgs.UnmaskRequest):
            self.last_unmask[cid] = message
        for reply in self.fed.clients[cid].receive(message, self.now):
            self.fed.sent.append((cid, reply))
            self.pending += self.fed.server.receive(cid, reply, self.now)

    def _expect(self, cid: str, message: object, error: type[SecAggAbort]) -> None:
        client = self.fed.clients[cid]
        revealed_before = dict(client.revealed_shares)
        final_state = "Completed" if client.state == "Completed" else "Aborted"
        try:
            self._deliver(cid, message)
        except SecAggAbort as exc:
            assert type(exc) is error, f"{cid}: expected {error.__name__}, got {exc!r}"
        else:
            raise AssertionError(f"{cid} accepted a lie; expected {error.__name__}")
        assert client.state == final_state
        assert client.revealed_shares == revealed_before  # nothing revealed on abort

    # --- rules ----------------------------------------------------------------------

    @precondition(lambda self: not self.pending)
    @rule()
    def let_a_stage_deadline_pass(self) -> None:
        self.now += self.fed.config.stage_timeout + 1
        self.pending += self.fed.server.tick(self.now)

    @precondition(lambda self: bool(self.pending))
    @rule()
    def deliver_the_stage_honestly(self) -> None:
        batch, self.pending = self.pending, []
        for cid, message in batch:
            if self._live(cid):
                self._deliver(cid, message)

    @precondition(
        lambda self: not self.fed.server.done
        and not (self.pending and isinstance(self.pending[0][1], self.attacked_stage))
    )
    @rule()
    def run_honestly_up_to_the_attacked_stage(self) -> None:
        for _ in range(12):
            if self.pending and isinstance(self.pending[0][1], self.attacked_stage):
                return
            if self.fed.server.done and not self.pending:
                return
            if self.pending:
                self.deliver_the_stage_honestly()
            else:
                self.let_a_stage_deadline_pass()

    @precondition(lambda self: self._may_lie())
    @rule(data=st.data())
    def tell_a_lie(self, data: st.DataObject) -> None:
        cid, message = self.pending.pop(0)
        if not self._live(cid) or type(message) not in LIES:
            return
        _name, lie, error = data.draw(st.sampled_from(LIES[type(message)]), label="lie")
        forged = lie(self.fed, cid, message)
        if not forged:
            self.pending.insert(0, (cid, message))
            return
        self._expect(cid, forged, error)

    @precondition(lambda self: self._may_lie())
    @rule(data=st.data())
    def replay_from_earlier_round(self, data: st.DataObject) -> None:
        cid, _ = self.pending[0]
        if not self._live(cid):
            return
        _, old = data.draw(st.sampled_from(EARLIER), label="replayed")
        self.pending.pop(0)
        self._expect(cid, old, ReplayedMessage)

    @precondition(lambda self: bool(self.pending) and self._casualties() < 2)
    @rule()
    def withhold(self) -> None:
        cid, _ = self.pending.pop(0)
        self.silenced.add(cid)  # from now on this client has dropped out

    def _finished_unasked(self) -> list[str]:
        return sorted(
            c for c in self.last_unmask
            if c not in self.asked_again and self.fed.clients[c].state == "Completed"
        )

    @precondition(lambda self: bool(self._finished_unasked()))
    @rule(data=st.data())
    def ask_again_for_the_other_share(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(self._finished_unasked()), label="client")
        self.asked_again.add(cid)
        forged = _move_to_dropped(self.fed, cid, self.last_unmask[cid])
        if forged:
            self._expect(cid, forged, UnexpectedMessage)

    # --- invariants -------------------------------------------------------------------

    @invariant()
    def no_client_reveals_both_share_kinds_for_one_peer(self) -> None:
        for (revealer, peer), kinds in revealed_kinds(self.fed.sent).items():
            assert len(kinds) == 1, f"{revealer} revealed {kinds} of {peer}"

    @invariant()
    def a_produced_sum_is_exact(self) -> None:
        server = self.fed.server
        if server.result is not None:
            assert server.failure is None
            expected = self.fed.expected_sum(server.result.survivors)
            np.testing.assert_array_equal(server.result.total, expected)
        if server.failure is not None:
            assert server.result is None


HostileServer.TestCase.settings = settings(
    max_examples=75,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_hostile_server = HostileServer.TestCase


@pytest.mark.parametrize(
    ("message_type", "lie", "error"),
    [(t, lie, err) for t, lies in LIES.items() for _, lie, err in lies],
    ids=[name for lies in LIES.values() for name, _, _ in lies],
)
def test_every_lie_is_refused_by_name(message_type: type, lie: Lie, error: type) -> None:
    fed = Federation(5, 8, alpha=0.0, threshold=3, delta=0.4, seed=2)
    victim = "site-002"
    exc = attack(fed, victim, message_type, lambda m: lie(fed, victim, m))
    assert type(exc) is error
    assert fed.clients[victim].revealed_shares == {}
    # the other clients finish the round without the victim, or it fails cleanly
    server = fed.server
    if server.result is not None:
        np.testing.assert_array_equal(
            server.result.total, fed.expected_sum(server.result.survivors)
        )
    assert all(len(k) == 1 for k in revealed_kinds(fed.sent).values())
