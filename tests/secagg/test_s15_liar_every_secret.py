"""A survivor that sends a false unmasking share of every secret it holds (M1 of the
second malicious-site review, session 15).

Each false share makes ``shamir.recover`` fall back to Berlekamp-Welch decoding (a
linear system in Python on 521-bit integers), synchronously on the coordinator's
event loop: once per secret, that was 3.4 s at n = 64 and 39 s at n = 100 (delta
0.25), every round. A holder found false once now has its shares of the later
secrets left out while more than t others remain, so it costs one decoding a round.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedge.secagg import ReconstructionFailed, shamir
from fedge.secagg import messages as msgs

from .harness import Federation

LIAR = "site-005"


def _forged(share: bytes) -> bytes:
    x, y = shamir._decode(share)
    return share[:2] + ((y + 1 + x) % shamir.PRIME).to_bytes(len(share) - 2, "big")


def _lying_on_every_share(fed: Federation, liar: str) -> dict[str, int]:
    """Run ``fed`` with ``liar`` sending a false share of every seed it holds; return
    how many it forged."""
    lied = {"shares": 0}
    now = 0.0
    queue = list(fed.server.start(now))
    for _ in range(20):
        while queue:
            recipient, message = queue.pop(0)
            for reply in fed.clients[recipient].receive(message, now):
                if recipient == liar and isinstance(reply, msgs.UnmaskShares):
                    seeds = {o: _forged(s) for o, s in reply.seed_shares.items()}
                    lied["shares"] = len(seeds)
                    reply = dataclasses.replace(reply, seed_shares=seeds)
                queue += fed.server.receive(recipient, reply, now)
        if fed.server.done:
            return lied
        now += fed.config.stage_timeout + 1
        queue += fed.server.tick(now)
    raise AssertionError("round did not finish")


@pytest.fixture
def decodings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the Berlekamp-Welch decodings (shamir._decode_errors), which still run."""
    calls: list[int] = []
    decode = shamir._decode_errors

    def counted(points, threshold):
        calls.append(len(points))
        return decode(points, threshold)

    monkeypatch.setattr(shamir, "_decode_errors", counted)
    return calls


def test_a_site_lying_on_every_share_it_holds_costs_one_decoding_and_the_sum_is_exact(
        decodings: list[int]) -> None:
    """n = 40 (t = 23, complete graph): the liar holds a share of all 40 seeds and
    forges each. One decoding finds it; the other 39 seeds are recovered from the 39
    other shares by the cheap check; the sum is exact and the liar named once."""
    fed = Federation(40, 8, alpha=0.1)
    assert fed.config.threshold == 23
    lied = _lying_on_every_share(fed, LIAR)
    server = fed.server
    assert lied["shares"] == 40
    assert server.result is not None, server.failure
    np.testing.assert_array_equal(server.result.total, fed.expected_sum(fed.ids))
    assert len(decodings) == 1, f"{len(decodings)} decodings"
    assert server.result.false_shares == {LIAR: ["site-000's self-mask seed"]}
    assert server.result.unused_shares == {
        LIAR: [f"{c}'s self-mask seed" for c in fed.ids[1:]]}


def test_a_liar_is_left_out_only_while_more_than_t_other_shares_remain() -> None:
    """n = 6, t = 4. Once the liar is found (in a secret with 6 shares), a secret
    with 6 shares is recovered without its share, but one with 5 is not: leaving it
    out would leave exactly t, which nothing checks; all 5 are used, and a false
    one among them fails the round as before."""
    fed = Federation(6, 8, alpha=0.0, threshold=4, delta=0.2)
    server, liar = fed.server, "site-001"
    x = server.index

    def shares(secret: bytes, holders: list[str], forged: bool) -> dict[str, bytes]:
        dealt = shamir.split(secret, [x[h] for h in holders], 4)
        return {h: _forged(dealt[x[h]]) if forged and h == liar else dealt[x[h]]
                for h in holders}

    a, b, c = (bytes([i]) * 16 for i in (1, 2, 3))
    assert server._recover("A", "seed", shares(a, fed.ids, True), 16) == a
    assert server._recover("B", "seed", shares(b, fed.ids, True), 16) == b
    assert server.false_shares == {liar: ["A's seed"]}
    assert server.unused_shares == {liar: ["B's seed"]}
    five = fed.ids[:5]
    assert server._recover("C", "seed", shares(c, five, False), 16) == c
    assert server.unused_shares == {liar: ["B's seed"]}  # C's five were all used
    with pytest.raises(ReconstructionFailed, match="its shares from site-000, site-001"):
        server._recover("C", "seed", shares(c, five, True), 16)
