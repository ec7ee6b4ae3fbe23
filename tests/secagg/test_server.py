"""The server survives misbehaving clients: bad messages are discarded, never fatal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedge.secagg import SecAggConfigError, ServerSession
from fedge.secagg import messages as msgs

from .harness import Federation


def _drive(fed: Federation, mangle) -> ServerSession:
    """Run a round where ``mangle(sender, reply)`` may swap a client's reply."""
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


BAD = "site-001"


@pytest.mark.parametrize(
    "mangle_name",
    [
        "wrong_shape",
        "wrong_dtype",
        "spoofed_sender",
        "other_round",
        "garbage_object",
        "outsider",
        "bad_shares_receiver",
        "forged_consistency_signature",
    ],
)
def test_misbehaving_client_is_dropped_or_ignored_and_the_rest_sum_exactly(mangle_name: str):
    fed = Federation(5, 16, alpha=0.0, threshold=3, delta=0.2)

    def mangle(sender: str, reply: object) -> list[tuple[str, object]]:
        if sender != BAD:
            return [(sender, reply)]
        if mangle_name == "wrong_shape" and isinstance(reply, msgs.MaskedInput):
            return [(sender, dataclasses.replace(reply, masked=reply.masked[:-1]))]
        if mangle_name == "wrong_dtype" and isinstance(reply, msgs.MaskedInput):
            return [(sender, dataclasses.replace(reply, masked=reply.masked.astype(np.int64)))]
        if mangle_name == "spoofed_sender" and isinstance(reply, msgs.MaskedInput):
            return [(sender, dataclasses.replace(reply, client_id="site-000"))]
        if mangle_name == "other_round" and isinstance(reply, msgs.MaskedInput):
            return [(sender, dataclasses.replace(reply, round=reply.round + 1))]
        if mangle_name == "garbage_object" and isinstance(reply, msgs.MaskedInput):
            return [(sender, "hello"), (sender, None)]
        if mangle_name == "outsider" and isinstance(reply, msgs.MaskedInput):
            return [(sender, reply), ("mallory", dataclasses.replace(reply, client_id="mallory"))]
        if mangle_name == "bad_shares_receiver" and isinstance(reply, msgs.EncryptedShares):
            return [(sender, dataclasses.replace(
                reply, ciphertexts={**reply.ciphertexts, "mallory": b"x"}))]
        if (mangle_name == "forged_consistency_signature"
                and isinstance(reply, msgs.ConsistencySignature)):
            return [(sender, dataclasses.replace(reply, signature=bytes(64)))]
        return [(sender, reply)]

    server = _drive(fed, mangle)
    assert server.result is not None, server.failure
    survivors = server.result.survivors
    if mangle_name == "outsider":
        assert survivors == fed.ids
    elif mangle_name == "forged_consistency_signature":
        # its masked input was in before it forged the signature: the sum keeps it,
        # but the site itself is dropped at the consistency check, named as refused
        assert survivors == fed.ids
        assert server.dropped == {BAD: "ConsistencyCheck"}
        assert server.left_out[BAD] == (
            "dropped out of secure aggregation in its ConsistencyCheck stage: its "
            "ConsistencySignature was refused (malformed, or not what this stage allows)")
    else:
        assert BAD not in survivors and len(survivors) == 4
    assert server.discarded >= 1
    np.testing.assert_array_equal(server.result.total, fed.expected_sum(survivors))


def test_duplicate_masked_input_is_counted_once() -> None:
    fed = Federation(4, 16, alpha=0.0)

    def twice(sender: str, reply: object) -> list[tuple[str, object]]:
        if isinstance(reply, msgs.MaskedInput) and sender == BAD:
            return [(sender, reply), (sender, reply)]
        return [(sender, reply)]

    server = _drive(fed, twice)
    assert server.result is not None and server.discarded >= 1
    np.testing.assert_array_equal(server.result.total, fed.expected_sum(fed.ids))


def test_server_refuses_a_cohort_that_is_not_in_the_roster() -> None:
    fed = Federation(3, 4, alpha=0.0)
    with pytest.raises(SecAggConfigError, match="'mallory' is not in the roster"):
        ServerSession(fed.config, fed.ctx, ["site-000", "site-001", "mallory"], fed.roster)
    with pytest.raises(SecAggConfigError, match="cohort has 2 clients"):
        ServerSession(fed.config, fed.ctx, ["site-000", "site-001"], fed.roster)


def test_server_cannot_be_started_twice_and_ignores_messages_before_start() -> None:
    fed = Federation(3, 4, alpha=0.0)
    assert fed.server.receive("site-000", "early", 0.0) == []
    fed.server.start(0.0)
    with pytest.raises(RuntimeError, match="start"):
        fed.server.start(1.0)


def test_stage_deadline_is_measured_from_when_the_stage_opened() -> None:
    fed = Federation(3, 4, alpha=0.0, threshold=2, delta=0.33)
    out = fed.server.start(100.0)
    assert fed.server.deadline == 100.0 + fed.config.stage_timeout
    for cid, request in out[:2]:
        (advert,) = fed.clients[cid].receive(request, 100.0)
        fed.server.receive(cid, advert, 105.0)
    assert fed.server.tick(109.9) == [] and fed.server.stage == "AdvertiseKeys"
    out = fed.server.tick(110.0)
    assert fed.server.stage == "ShareKeys" and fed.server.dropped == {"site-002": "AdvertiseKeys"}
    assert sorted(cid for cid, _ in out) == ["site-000", "site-001"]


def test_lying_client_shares_for_a_dropped_peer_fail_the_round_not_the_sum() -> None:
    # a client sends a forged mask-key share: the recovered key does not match the
    # dropped client's signed public key, so the round fails instead of a wrong sum
    from fedge.secagg import ReconstructionFailed, shamir

    fed = Federation(5, 16, alpha=0.0, threshold=3, delta=0.4)
    gone = "site-004"
    liar = "site-001"
    liar_x = fed.server.index[liar]

    def lie(sender: str, reply: object) -> list[tuple[str, object]]:
        if sender == liar and isinstance(reply, msgs.UnmaskShares):
            forged = liar_x.to_bytes(2, "big") + bytes(range(66))
            assert shamir.share_x(forged) == liar_x
            reply = dataclasses.replace(reply, mask_key_shares={gone: forged})
        return [(sender, reply)]

    dropped_gone = {"done": False}

    def mangle(sender: str, reply: object) -> list[tuple[str, object]]:
        if sender == gone and isinstance(reply, msgs.MaskedInput):
            dropped_gone["done"] = True
            return []  # gone drops before its masked input arrives
        if sender == "site-003" and isinstance(reply, msgs.UnmaskShares):
            return []  # silent: at the deadline exactly t = 3 shares, nothing to check against
        return lie(sender, reply)

    # site-000..002 answer, so the server combines x = 1, 2, 3: the liar's among them
    server = _drive(fed, mangle)
    assert dropped_gone["done"]
    assert server.result is None
    assert isinstance(server.failure, ReconstructionFailed)
    # these bytes are no share of anything: the interpolation itself gives them away
    assert str(server.failure) == (
        "cannot recover the secret of 'site-004': shares are inconsistent: the "
        "recovered value does not fit 32 bytes")


def test_a_share_that_recovers_a_wrong_but_well_formed_key_fails_the_round() -> None:
    """The liar shifts its share of the dropped site's mask key so that the key the
    server interpolates is the real key + 1: a well-formed 32-byte key, which only
    the check against the dropped site's signed public key can catch."""
    from fedge.secagg import ReconstructionFailed, shamir

    fed = Federation(5, 16, alpha=0.0, threshold=3, delta=0.4)
    gone, liar = "site-004", "site-001"
    # site-000..002 answer (site-003 stays silent: with a fourth share the server
    # would see the lie), so the server combines their x = 1, 2, 3
    first = ("site-000", "site-001", "site-002")
    assert all(gone in fed.server.neighbours[c] for c in first)
    xs = tuple(sorted(fed.server.index[c] for c in first))
    weight = shamir._lagrange_at_zero(xs)[xs.index(fed.server.index[liar])]
    forged_any = {"done": False}

    def mangle(sender: str, reply: object) -> list[tuple[str, object]]:
        if sender == gone and isinstance(reply, msgs.MaskedInput):
            return []  # gone drops before its masked input arrives
        if sender == "site-003" and isinstance(reply, msgs.UnmaskShares):
            return []
        if sender == liar and isinstance(reply, msgs.UnmaskShares):
            real = reply.mask_key_shares[gone]
            _, y = shamir._decode(real)
            # the interpolation weighs this y by `weight`: adding weight^-1 adds 1
            y = (y + pow(weight, -1, shamir.PRIME)) % shamir.PRIME
            forged = real[:2] + y.to_bytes(len(real) - 2, "big")
            reply = dataclasses.replace(reply, mask_key_shares={gone: forged})
            forged_any["done"] = True
        return [(sender, reply)]

    server = _drive(fed, mangle)
    assert forged_any["done"]
    assert server.result is None
    assert isinstance(server.failure, ReconstructionFailed), server.failure
    assert str(server.failure) == (
        "mask key of dropped 'site-004' does not match its signed public key")


LOW_ORDER_POINT = bytes([1]) + bytes(31)  # u = 1 has order 4: every exchange with it fails


@pytest.mark.parametrize(
    ("field", "key"),
    [("enc_public", bytes(32)), ("enc_public", LOW_ORDER_POINT), ("mask_public", bytes(32))],
    ids=["zero_enc_key", "low_order_enc_key", "zero_mask_key"],
)
def test_signed_but_unusable_key_drops_only_its_owner_not_the_round(field: str, key: bytes):
    # a correctly signed advertisement of a key nobody can agree with used to be
    # relayed, so every honest neighbour aborted and the round ended with no one
    from .harness import sign_advert

    fed = Federation(5, 8, alpha=0.0, delta=0.2)
    bad = "site-004"

    def unusable_key(sender: str, reply: object) -> list[tuple[str, object]]:
        if sender == bad and isinstance(reply, msgs.KeyAdvertisement):
            reply = dataclasses.replace(reply, **{field: key})
            signature = sign_advert(fed, bad, bad, reply.enc_public, reply.mask_public)
            reply = dataclasses.replace(reply, signature=signature)
        return [(sender, reply)]

    server = _drive(fed, unusable_key)
    assert server.result is not None, server.failure
    assert server.dropped == {bad: "AdvertiseKeys"} and server.discarded >= 1
    assert server.result.survivors == fed.ids[:4]
    np.testing.assert_array_equal(server.result.total, fed.expected_sum(fed.ids[:4]))


def _run_refusing(fed: Federation, refuse: dict[str, type], *, after_answer: bool = False,
                  now: float = 0.0) -> list[tuple[str, object]]:
    """Run a round at one instant (no deadline ever passes): each site in ``refuse``
    calls ``ServerSession.refuse`` on the message of its type, instead of answering
    it or, with ``after_answer``, once its answer is in. Returns what the server sent."""
    sent: list[tuple[str, object]] = []
    queue = list(fed.server.start(now))
    while queue:
        recipient, message = queue.pop(0)
        sent.append((recipient, message))
        refusing = isinstance(message, refuse.get(recipient, ()))
        if refusing and not after_answer:
            queue += fed.server.refuse(recipient, now)
            continue
        for reply in fed.clients[recipient].receive(message, now):
            queue += fed.server.receive(recipient, reply, now)
        if refusing:
            queue += fed.server.refuse(recipient, now)
    return sent


@pytest.mark.parametrize("opener", [msgs.AdvertiseRequest, msgs.RelayedShares,
                                    msgs.ConsistencyRequest])
def test_a_refusal_drops_its_site_at_once_and_the_round_ends_without_waiting(opener: type):
    """No deadline passes: the stage the refuser was due to answer closes as the last
    other answer arrives, and the sum is the others' (its input, if it was masked in
    before it refused the consistency check, included)."""
    fed = Federation(5, 16, alpha=0.0, threshold=3, delta=0.2)
    _run_refusing(fed, {BAD: opener})
    server = fed.server
    assert server.result is not None, server.failure
    stage = {msgs.AdvertiseRequest: "AdvertiseKeys", msgs.RelayedShares: "MaskedInput",
             msgs.ConsistencyRequest: "ConsistencyCheck"}[opener]
    assert server.dropped == {BAD: stage}
    summed = fed.ids if opener is msgs.ConsistencyRequest else \
        [c for c in fed.ids if c != BAD]
    assert server.result.survivors == summed
    np.testing.assert_allclose(server.result.total, fed.expected_sum(summed), atol=1e-6)


def test_a_refusal_after_its_answer_changes_nothing():
    fed = Federation(4, 16, alpha=0.0)
    _run_refusing(fed, {BAD: msgs.RelayedShares}, after_answer=True)
    assert fed.server.result is not None and fed.server.dropped == {}
    assert fed.server.result.survivors == fed.ids


def test_unmask_refusals_fail_the_round_at_once_when_a_secret_falls_below_t():
    """t = 3 of 4: one refusal to unmask leaves three sites with a share of every
    secret (the round sums all four inputs); two leave two, and the round fails as
    the second arrives, naming both, and every site is told."""
    fed = Federation(4, 16, alpha=0.0, threshold=3, delta=0.2)
    _run_refusing(fed, {"site-001": msgs.UnmaskRequest})
    assert fed.server.result is not None, fed.server.failure
    np.testing.assert_allclose(fed.server.result.total, fed.expected_sum(fed.ids), atol=1e-6)

    fed = Federation(4, 16, alpha=0.0, threshold=3, delta=0.2)
    refusers = {"site-001": msgs.UnmaskRequest, "site-002": msgs.UnmaskRequest}
    sent = _run_refusing(fed, refusers)
    assert fed.server.stage == "Failed" and fed.server.result is None
    assert "unmasking cannot complete: 2 site(s) dropped out of it (site-001, site-002), " \
        "so 2 of the sites holding a share of" in str(fed.server.failure)
    assert "threshold 3" in str(fed.server.failure)
    told = {cid for cid, m in sent if isinstance(m, msgs.RoundFailed)}
    assert told == set(fed.ids)


def test_a_refusal_before_start_or_after_the_end_is_ignored():
    fed = Federation(3, 4, alpha=0.0)
    assert fed.server.refuse("site-000", 0.0) == [] and fed.server.stage == "Idle"
    _run_refusing(fed, {})
    assert fed.server.result is not None
    assert fed.server.refuse("site-000", 0.0) == [] and fed.server.dropped == {}


def test_bad_unmask_shares_that_leave_a_secret_below_t_fail_the_round_at_once():
    """Two of four send shares that are not shares (t = 3): they are dropped as they
    arrive, and the round fails then, naming them, not after the stage."""
    fed = Federation(4, 16, alpha=0.0, threshold=3, delta=0.2)

    def garble(sender: str, reply: object) -> list[tuple[str, object]]:
        if isinstance(reply, msgs.UnmaskShares) and sender in ("site-001", "site-002"):
            bad = {owner: b"not a share" for owner in reply.seed_shares}
            return [(sender, dataclasses.replace(reply, seed_shares=bad))]
        return [(sender, reply)]

    server = _drive(fed, garble)
    assert server.stage == "Failed"
    assert "unmasking cannot complete: 2 site(s) dropped out of it (site-001, site-002)" \
        in str(server.failure)


def test_two_sites_advertising_the_same_key_are_both_dropped_and_named():
    """site-004 advertises site-000's keys under its own signature: one key, one
    client, so both go (neither can be told from the other), the record says why,
    and the other three sum exactly."""
    from .harness import sign_advert

    fed = Federation(5, 8, alpha=0.0, threshold=3, delta=0.2)
    copier, owner = "site-004", "site-000"
    adverts: dict[str, msgs.KeyAdvertisement] = {}

    def copy_keys(sender: str, reply: object) -> list[tuple[str, object]]:
        if isinstance(reply, msgs.KeyAdvertisement):
            adverts[sender] = reply
            if sender == copier:
                theirs = adverts[owner]
                signature = sign_advert(fed, copier, copier, theirs.enc_public,
                                        theirs.mask_public)
                reply = dataclasses.replace(reply, enc_public=theirs.enc_public,
                                            mask_public=theirs.mask_public,
                                            signature=signature)
        return [(sender, reply)]

    server = _drive(fed, copy_keys)
    assert server.result is not None, server.failure
    assert server.dropped == {owner: "AdvertiseKeys", copier: "AdvertiseKeys"}
    for cid in (owner, copier):
        assert server.left_out[cid] == ("dropped out of secure aggregation in its "
                                        "AdvertiseKeys stage: it advertised the same "
                                        "public key as another site")
    rest = ["site-001", "site-002", "site-003"]
    assert server.result.survivors == rest
    np.testing.assert_array_equal(server.result.total, fed.expected_sum(rest))


def test_a_site_whose_neighbours_dropped_out_is_pruned_and_the_record_says_so():
    """On a sparse graph (degree 4 of 10, t = 3), three of one site's four neighbours
    drop out before advertising: it is left with fewer than t of its neighbourhood, so
    the server drops it too, names why, and sums the rest exactly."""
    fed = Federation(10, 8, alpha=0.0, threshold=3, degree=4, delta=0.2)
    lonely = fed.ids[0]
    gone = set(sorted(fed.server.neighbours[lonely])[:3])
    server = fed.run({"advertise": gone})
    assert server.result is not None, server.failure
    assert set(server.dropped) >= gone | {lonely}
    assert server.left_out[lonely] == (
        "dropped out of secure aggregation in its AdvertiseKeys stage: fewer than "
        "t = 3 of it and its neighbours were left after key advertisement")
    for cid in gone:
        assert server.left_out[cid].endswith("no answer before the stage deadline")
    survivors = [c for c in fed.ids if c not in server.dropped]
    assert server.result.survivors == survivors and lonely not in survivors
    for cid in survivors:  # every survivor kept t of its neighbourhood
        assert len((fed.server.neighbours[cid] | {cid}) & set(survivors)) >= 3
    np.testing.assert_array_equal(server.result.total, fed.expected_sum(survivors))


def test_a_dropped_site_with_t_minus_1_holders_left_fails_the_round_naming_it():
    """On a sparse graph (degree 4 of 10, t = 3) a site and two of its four neighbours
    drop out before their masked inputs: the dropped site's mask key is in the others'
    masks, and only t - 1 = 2 survivors hold shares of it. The server fails the round
    then, naming that site, rather than unmask a sum it could not finish."""
    import itertools

    from fedge.secagg import TooFewSurvivors

    fed = Federation(10, 8, alpha=0.0, threshold=3, degree=4, delta=0.2)
    nb, t = fed.server.neighbours, 3

    def short(gone: set[str]) -> dict[str, int]:
        """The sites whose shares the survivors need and who have < t holders left."""
        u3 = set(fed.ids) - gone
        counts = {c: len((nb[c] | {c}) & u3) for c in fed.ids if c in u3 or nb[c] & u3}
        return {c: k for c, k in counts.items() if k < t}

    # the first site and pair of its neighbours whose loss leaves that site, and only
    # it, with exactly t - 1 holders (so the error can name no other site first)
    target, gone = next(
        (c, {c, *pair}) for c in fed.ids for pair in itertools.combinations(sorted(nb[c]), 2)
        if short({c, *pair}) == {c: t - 1})
    server = fed.run({"masked_input": gone})
    assert server.stage == "Failed" and server.result is None
    assert isinstance(server.failure, TooFewSurvivors), server.failure
    assert str(server.failure) == f"only 2 survivors hold shares of {target!r}, threshold is 3"
    assert server.dropped == {c: "MaskedInput" for c in gone}


def test_a_stage_that_leaves_t_minus_1_sites_fails_the_round_too_few_for_threshold():
    """After pruning, every site left keeps t of its neighbourhood, so a stage leaves
    either none or at least t: t - 1 survivors can only happen with t = 1 (curious
    server, alpha = 0), when every site drops out. The server says so then (it does
    not go on with nobody to the masked inputs)."""
    from fedge.secagg import TooFewSurvivors

    fed = Federation(10, 8, alpha=0.0, threshold=3, degree=4, delta=0.2)
    fed.config = dataclasses.replace(fed.config, threshold=1, semi_malicious=False,
                                     min_clients=1)
    fed.clients = {cid: fed.make_client(cid) for cid in fed.ids}
    fed.server = ServerSession(fed.config, fed.ctx, fed.ids, fed.roster)
    server = fed.run({"share": set(fed.ids)})
    assert server.stage == "Failed" and server.result is None
    assert isinstance(server.failure, TooFewSurvivors), server.failure
    assert str(server.failure) == "0 clients remain after key sharing, too few for threshold 1"
    assert server.dropped == {c: "ShareKeys" for c in fed.ids}
