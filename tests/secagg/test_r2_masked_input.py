"""Stage 2, masked input: shares must authenticate; masks only cancel for the same model."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedge.secagg import (
    RevivedDroppedClient,
    TamperedShare,
    TooFewSurvivors,
    UnknownClient,
    keys,
)
from fedge.secagg import messages as msgs
from fedge.secagg.client import _share_plaintext

from .harness import Federation, attack

VICTIM = "site-002"
PEER = "site-004"


def test_masked_input_aborts_on_tampered_share_ciphertext() -> None:
    fed = Federation(5, 4, alpha=0.0)

    def flip(m: msgs.RelayedShares) -> msgs.RelayedShares:
        blob = bytearray(m.ciphertexts[PEER])
        blob[20] ^= 0x01
        return dataclasses.replace(m, ciphertexts={**m.ciphertexts, PEER: bytes(blob)})

    err = attack(fed, VICTIM, msgs.RelayedShares, flip)
    assert isinstance(err, TamperedShare) and "fails authentication" in str(err)


def test_masked_input_aborts_on_share_redirected_from_another_receiver() -> None:
    fed = Federation(5, 4, alpha=0.0)

    def redirect(m: msgs.RelayedShares) -> msgs.RelayedShares:
        other = fed.server._ciphertexts[PEER]["site-000"]  # PEER's share for site-000
        return dataclasses.replace(m, ciphertexts={**m.ciphertexts, PEER: other})

    assert isinstance(attack(fed, VICTIM, msgs.RelayedShares, redirect), TamperedShare)


def test_masked_input_aborts_on_share_bound_to_another_round() -> None:
    # correctly keyed for the pair, but its associated data names round 2
    fed = Federation(5, 4, alpha=0.0)

    def rebind(m: msgs.RelayedShares) -> msgs.RelayedShares:
        victim = fed.clients[VICTIM]
        assert victim.round_keys is not None
        key = keys.share_encryption_key(
            victim.round_keys.enc_private,
            victim.peer_enc_keys[PEER],
            job_id=fed.job_id,
            round_=fed.round,
            model_digest=fed.ctx.model_digest,
            me=VICTIM,
            peer=PEER,
        )
        share = bytes(2) + bytes(66)
        plaintext = _share_plaintext(PEER, VICTIM, share, share)
        nonce = os.urandom(12)
        aad = keys.share_associated_data(PEER, VICTIM, fed.job_id, fed.round - 1)
        blob = nonce + AESGCM(key).encrypt(nonce, plaintext, aad)
        return dataclasses.replace(m, ciphertexts={**m.ciphertexts, PEER: blob})

    assert isinstance(attack(fed, VICTIM, msgs.RelayedShares, rebind), TamperedShare)


def test_masked_input_aborts_on_share_from_a_client_that_never_advertised() -> None:
    fed = Federation(6, 4, alpha=0.0)
    ghost = "site-005"
    err = attack(
        fed,
        VICTIM,
        msgs.RelayedShares,
        lambda m: dataclasses.replace(m, ciphertexts={**m.ciphertexts, ghost: os.urandom(200)}),
        drop={"advertise": {ghost}},
    )
    assert isinstance(err, RevivedDroppedClient)


def test_masked_input_aborts_on_share_from_outside_the_cohort() -> None:
    fed = Federation(5, 4, alpha=0.0)
    err = attack(
        fed,
        VICTIM,
        msgs.RelayedShares,
        lambda m: dataclasses.replace(m, ciphertexts={**m.ciphertexts, "mallory": b"x" * 200}),
    )
    assert isinstance(err, UnknownClient)


def test_masked_input_aborts_if_fewer_than_threshold_shares_are_relayed() -> None:
    fed = Federation(5, 4, alpha=0.0)
    err = attack(
        fed,
        VICTIM,
        msgs.RelayedShares,
        lambda m: dataclasses.replace(m, ciphertexts={PEER: m.ciphertexts[PEER]}),
    )
    assert isinstance(err, TooFewSurvivors)


def test_masked_input_arriving_after_its_sender_was_dropped_is_discarded() -> None:
    fed = Federation(5, 64, alpha=0.0)
    late = "site-001"
    held: list[msgs.MaskedInput] = []
    now = 0.0
    queue = list(fed.server.start(now))
    while queue:
        recipient, message = queue.pop(0)
        for reply in fed.clients[recipient].receive(message, now):
            if isinstance(reply, msgs.MaskedInput) and recipient == late:
                held.append(reply)  # delayed in the network
                continue
            queue += fed.server.receive(recipient, reply, now)
        if not queue and fed.server.stage == "MaskedInput":
            now += fed.config.stage_timeout + 1
            queue += fed.server.tick(now)
            assert fed.server.dropped == {late: "MaskedInput"}
            before = fed.server.discarded
            queue += fed.server.receive(late, held[0], now)  # arrives after the deadline
            assert fed.server.discarded == before + 1
    assert fed.server.result is not None
    assert late not in fed.server.result.survivors
    survivors = [c for c in fed.ids if c != late]
    np.testing.assert_array_equal(fed.server.result.total, fed.expected_sum(survivors))


def test_client_given_a_different_model_digest_yields_no_sum() -> None:
    # share keys are bound to the model digest: the odd client's shares do not open
    other = hashlib.sha256(b"a different global model").digest()
    fed = Federation(5, 512, alpha=0.0, digests={"site-003": other})
    server = fed.run()
    assert server.result is None
    assert set(fed.client_errors) == set(fed.ids)
    assert all(isinstance(e, TamperedShare) for e in fed.client_errors.values())
    assert "site-003" in str(fed.client_errors["site-000"])


def test_masks_derived_under_a_different_model_digest_leave_garbage() -> None:
    # the pairwise mask seeds are bound to the digest too: even past the shares,
    # two clients on different models do not cancel each other's masks
    from fedge.secagg import _masking

    d = 1024
    rng = np.random.default_rng(5)
    a, b = keys.RoundKeys(), keys.RoundKeys()
    digests = {"alice": fed_digest(b"m1"), "bob": fed_digest(b"m2")}
    x = {c: rng.uniform(-1, 1, d).astype(np.float32) for c in digests}
    own = {"alice": (a, b), "bob": (b, a)}
    peer = {"alice": "bob", "bob": "alice"}
    total = np.zeros(d, dtype=np.uint32)
    for cid in ("alice", "bob"):
        mine, theirs = own[cid]
        seed = keys.pairwise_mask_seed(
            mine.mask_private, theirs.mask_public, job_id="j", round_=1,
            model_digest=digests[cid], me=cid, peer=peer[cid],
        )
        total += _masking.quantise_and_mask(
            x[cid], clip=1.0, bits=31, quantise_seed=bytes(16), self_seed=bytes(16),
            pair_seeds=[seed], pair_signs=[_masking.pair_sign(cid, peer[cid])],
        )
    _masking.remove_masks(total, [bytes(16), bytes(16)], [-1, -1])
    summed = _masking.dequantise(total, n_summands=2, clip=1.0, bits=31)
    plain = x["alice"].astype(np.float64) + x["bob"]
    assert (np.abs(summed - plain) > 1e-3).mean() > 0.99


def fed_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_masked_input_looks_nothing_like_the_quantised_input() -> None:
    fed = Federation(3, 4096, alpha=0.0)
    fed.run()
    masked = {s: m.masked for s, m in fed.sent if isinstance(m, msgs.MaskedInput)}
    for cid, vec in masked.items():
        assert vec.dtype == np.uint32 and vec.shape == (4096,)
        q = fed.quantised(cid)
        assert (vec == q).mean() < 0.01
        # roughly uniform over Z_2^32 while the quantised input sits near its middle
        assert 0.4 < (vec >= 2**31).mean() < 0.6
