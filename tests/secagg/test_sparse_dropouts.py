"""Dropouts on the sparse neighbour graph (more than 64 sites): the graph is sized so
dropouts close together on the ring do not end the round, a round that does end says
which neighbourhood fell short, and an unmasking that cannot complete is never asked
for."""

from __future__ import annotations

import hashlib

import numpy as np

from fedge.secagg import TooFewSurvivors
from fedge.secagg import messages as msgs

from .harness import Federation


def ring(fed: Federation) -> list[str]:
    """The cohort in the order of the server's Harary ring (config.neighbours)."""
    seed = fed.server.graph_seed
    return sorted(fed.ids, key=lambda c: hashlib.sha256(seed + c.encode()).digest())


def test_a_200_site_round_survives_12_dropouts_in_one_neighbourhood_with_an_exact_sum():
    """200 sites (plan defaults alpha = 0.1, delta = 0): 12 sites within one 25-site
    stretch of the ring go silent before advertising keys (6 % of the cohort). With the
    logarithmic graph (k = 24, t = 14) the site in the middle kept 13 < t, its pruning
    cascaded round the ring and the round failed; the graph sized for dropouts keeps
    every neighbourhood at t and the round sums the other 188 exactly."""
    fed = Federation(200, 4, alpha=0.1, delta=0.0, seed=5)
    order = ring(fed)
    p = 50
    gone = {order[(p + off) % 200] for off in [*range(-12, -5), *range(8, 13)]}
    assert len(gone) == 12
    server = fed.run({"advertise": gone})
    assert server.result is not None, server.failure
    survivors = sorted(set(fed.ids) - gone)
    assert server.result.survivors == survivors
    np.testing.assert_array_equal(server.result.total, fed.expected_sum(survivors))
    assert not fed.client_errors


def test_a_round_lost_to_pruning_names_the_site_that_fell_short_per_neighbourhood():
    """On a sparse graph (n = 12, degree 4, t = 4) two sites next to each other on the
    ring go silent: each of the two sites beside them keeps t - 1 of its neighbourhood,
    and their pruning cascades round the ring until fewer than t remain although 10
    answered. The failure names the site that fell short first, what it kept of its
    neighbourhood and the threshold, and says the threshold holds per neighbourhood
    (it used to say only '10 clients remain after key advertisement, too few for
    threshold 4', which reads as a contradiction)."""
    fed = Federation(12, 8, alpha=0.0, threshold=4, degree=4, delta=0.2)
    order = ring(fed)
    gone = {order[1], order[2]}
    server = fed.run({"advertise": gone})
    assert server.result is None and isinstance(server.failure, TooFewSurvivors)
    first = min(order[0], order[3])  # the two whose neighbourhoods hold both
    text = str(server.failure)
    assert text.startswith(f"site {first!r} kept 3 live of its neighbourhood of 5 "
                           "(itself and its 4 neighbours) after key advertisement, fewer "
                           "than threshold t=4; the threshold holds per neighbourhood"), text
    assert text.endswith("of the 10 clients left, 0 remain"), text


def test_an_unmasking_certain_to_fail_is_never_asked_for():
    """Sparse graph (n = 20, degree 8, t = 5). A site X and four others of its
    neighbourhood (the two at its ends among them) send their masked inputs, then never
    sign the consistency check. Every signer keeps t of its own neighbourhood, so none
    is pruned, but only t - 1 live sites hold shares of X's self-mask seed: the
    unmasking cannot complete. The server fails the round at the consistency check,
    naming X, and sends no UnmaskRequest: no site reveals a share, and the coordinator
    does not pin the round to a survivor list it could never unmask."""
    fed = Federation(20, 8, alpha=0.0, threshold=5, degree=8, delta=0.0)
    order = ring(fed)
    p, h, t = 10, 4, 5
    x = order[p]
    silent = {order[p + off] for off in (0, -h, h, -1, 2)}  # m - t + 1 = 5 of X's 9
    assert len((fed.server.neighbours[x] | {x}) - silent) == t - 1
    asked: list[str] = []

    def watch(recipient: str, message: object) -> None:
        if isinstance(message, msgs.UnmaskRequest):
            asked.append(recipient)

    server = fed.run({"consistency": silent}, tamper=watch)
    assert server.result is None and isinstance(server.failure, TooFewSurvivors)
    assert str(server.failure) == (
        f"only 4 live sites hold shares of {x!r}'s self-mask seed after the consistency "
        "check, threshold is 5: the unmasking could not complete, so no unmask request "
        "was sent")
    assert asked == []
    assert not any(isinstance(m, msgs.UnmaskShares) for _, m in fed.sent)
    assert server.dropped == {c: "ConsistencyCheck" for c in silent}


def test_the_server_builds_the_consistency_payload_once_per_round_not_per_signature(
    monkeypatch,
):
    """Every signature covers the same survivor list, so the server builds the signed
    payload once; it rebuilt it over the whole list for each of the n signatures
    (O(n^2) a round). The real function runs; only its callers are counted."""
    import sys

    from fedge.secagg import keys

    real = keys.consistency_payload
    server_calls = []

    def counted(*args, **kwargs):
        if sys._getframe(1).f_code.co_filename.endswith("server.py"):
            server_calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(keys, "consistency_payload", counted)
    fed = Federation(12, 4, alpha=0.1)
    server = fed.run()
    assert server.result is not None, server.failure
    assert len(server_calls) == 1
