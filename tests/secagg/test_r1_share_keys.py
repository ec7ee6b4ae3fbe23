"""Stage 1, share keys: every advertisement must be signed by its client's roster identity."""

from __future__ import annotations

import dataclasses

from fedge.secagg import (
    CohortMismatch,
    DuplicateAdvertisement,
    ForgedAdvertisement,
    TooFewSurvivors,
    UnknownClient,
    UnsignedAdvertisement,
    keys,
)
from fedge.secagg import messages as msgs

from .harness import Federation, attack, sign_advert

VICTIM = "site-002"
PEER = "site-004"


def _with(m: msgs.AdvertisedKeys, cid: str, enc: bytes, mask: bytes, sig: bytes):
    return dataclasses.replace(
        m,
        enc_keys={**m.enc_keys, cid: enc},
        mask_keys={**m.mask_keys, cid: mask},
        signatures={**m.signatures, cid: sig},
    )


def test_share_keys_aborts_on_advertisement_with_a_substituted_key() -> None:
    fed = Federation(5, 4, alpha=0.0)
    fake = keys.RoundKeys()
    err = attack(
        fed,
        VICTIM,
        msgs.AdvertisedKeys,
        lambda m: dataclasses.replace(m, mask_keys={**m.mask_keys, PEER: fake.mask_public}),
    )
    assert isinstance(err, ForgedAdvertisement) and PEER in str(err)


def test_share_keys_aborts_on_unsigned_advertisement() -> None:
    fed = Federation(5, 4, alpha=0.0)
    err = attack(
        fed,
        VICTIM,
        msgs.AdvertisedKeys,
        lambda m: dataclasses.replace(m, signatures={**m.signatures, PEER: b""}),
    )
    assert isinstance(err, UnsignedAdvertisement)


def test_share_keys_aborts_on_advertisement_signed_by_the_server_instead_of_the_client() -> None:
    fed = Federation(5, 4, alpha=0.0)
    fake = keys.RoundKeys()

    def forge(m: msgs.AdvertisedKeys) -> msgs.AdvertisedKeys:
        sig = fed.console.sign(
            keys.advertisement_payload(
                PEER, fake.enc_public, fake.mask_public, job_id=fed.job_id, round_=fed.round
            )
        )
        return _with(m, PEER, fake.enc_public, fake.mask_public, sig)

    assert isinstance(attack(fed, VICTIM, msgs.AdvertisedKeys, forge), ForgedAdvertisement)


def test_share_keys_aborts_on_advertisement_replayed_from_an_earlier_round() -> None:
    fed = Federation(5, 4, alpha=0.0)
    old = keys.RoundKeys()
    payload = keys.advertisement_payload(
        PEER, old.enc_public, old.mask_public, job_id=fed.job_id, round_=fed.round - 1
    )
    old_sig = fed.identities[PEER].sign(payload)  # the peer really signed it, last round
    err = attack(
        fed,
        VICTIM,
        msgs.AdvertisedKeys,
        lambda m: _with(m, PEER, old.enc_public, old.mask_public, old_sig),
    )
    assert isinstance(err, ForgedAdvertisement)


def test_share_keys_aborts_if_server_substitutes_this_clients_own_keys() -> None:
    fed = Federation(5, 4, alpha=0.0)
    mine = keys.RoundKeys()
    # even with a valid signature (say a leaked one), the client knows its own keys
    sig = sign_advert(fed, VICTIM, VICTIM, mine.enc_public, mine.mask_public)
    err = attack(
        fed,
        VICTIM,
        msgs.AdvertisedKeys,
        lambda m: _with(m, VICTIM, mine.enc_public, mine.mask_public, sig),
    )
    assert isinstance(err, ForgedAdvertisement) and "not its own" in str(err)


def test_share_keys_aborts_if_own_advertisement_is_missing() -> None:
    fed = Federation(5, 4, alpha=0.0)

    def omit(m: msgs.AdvertisedKeys) -> msgs.AdvertisedKeys:
        return dataclasses.replace(
            m,
            enc_keys={c: k for c, k in m.enc_keys.items() if c != VICTIM},
            mask_keys={c: k for c, k in m.mask_keys.items() if c != VICTIM},
            signatures={c: k for c, k in m.signatures.items() if c != VICTIM},
        )

    assert isinstance(attack(fed, VICTIM, msgs.AdvertisedKeys, omit), CohortMismatch)


def test_share_keys_aborts_on_duplicate_advertisement_from_a_colluding_client() -> None:
    # a colluder advertises the victim's neighbour's key as its own, signed with its
    # own identity, hoping to receive shares meant for that neighbour
    fed = Federation(5, 4, alpha=0.0)
    colluder = "site-003"

    def dup(m: msgs.AdvertisedKeys) -> msgs.AdvertisedKeys:
        enc, mask = m.enc_keys[PEER], m.mask_keys[PEER]
        return _with(m, colluder, enc, mask, sign_advert(fed, colluder, colluder, enc, mask))

    assert isinstance(attack(fed, VICTIM, msgs.AdvertisedKeys, dup), DuplicateAdvertisement)


def test_share_keys_aborts_on_advertisement_from_a_sybil_outside_the_cohort() -> None:
    fed = Federation(5, 4, alpha=0.0)
    sybil = keys.RoundKeys()
    spare = fed.spares[0]  # enrolled, but not in this round's cohort
    sig = sign_advert(fed, spare, spare, sybil.enc_public, sybil.mask_public)
    err = attack(
        fed,
        VICTIM,
        msgs.AdvertisedKeys,
        lambda m: _with(m, spare, sybil.enc_public, sybil.mask_public, sig),
    )
    assert isinstance(err, UnknownClient) and "not in the cohort" in str(err)


def test_share_keys_aborts_on_advertisement_from_a_non_neighbour() -> None:
    fed = Federation(10, 4, degree=4, threshold=3, alpha=0.0)
    graph = fed.server.neighbours
    stranger = next(c for c in fed.ids if c != VICTIM and c not in graph[VICTIM])
    fresh = keys.RoundKeys()
    sig = sign_advert(fed, stranger, stranger, fresh.enc_public, fresh.mask_public)
    err = attack(
        fed,
        VICTIM,
        msgs.AdvertisedKeys,
        lambda m: _with(m, stranger, fresh.enc_public, fresh.mask_public, sig),
    )
    assert isinstance(err, UnknownClient) and "not a neighbour" in str(err)


def test_share_keys_aborts_if_fewer_than_threshold_advertised() -> None:
    fed = Federation(5, 4, alpha=0.0)
    keep = {VICTIM, "site-000"}

    def thin(m: msgs.AdvertisedKeys) -> msgs.AdvertisedKeys:
        return dataclasses.replace(
            m,
            enc_keys={c: k for c, k in m.enc_keys.items() if c in keep},
            mask_keys={c: k for c, k in m.mask_keys.items() if c in keep},
            signatures={c: k for c, k in m.signatures.items() if c in keep},
        )

    err = attack(fed, VICTIM, msgs.AdvertisedKeys, thin)
    assert isinstance(err, TooFewSurvivors) and "threshold is 3" in str(err)
