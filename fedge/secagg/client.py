"""SecAgg+ client as a sans-I/O state machine.

Everything that moves the client from one state to the next lives in
``CLIENT_TRANSITIONS`` below; nothing else changes ``ClientSession.state``.

Theory of operation: the agent builds a ``ClientSession`` with its input
vector, then feeds it each message the server sends, with the current time:
``replies = session.receive(message, now)``.  It sends ``replies`` back and
does nothing else; the session never touches a socket or a clock.  When the
server breaks the protocol, ``receive`` raises the ``SecAggAbort`` subclass
that names the attack, the session moves to ``Aborted`` and will not answer
again.  A ``RoundFailed`` from the server also ends in ``Aborted``, with
``failure`` set to ``ServerAborted`` and no exception.

Invariant (checked by the hostile-server tests): for any peer the client
reveals at most one kind of share, self-mask seed (peer survived) or mask key
(peer dropped), never both; ``revealed_shares`` records what it revealed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import ClassVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import _masking, keys, shamir
from . import messages as msgs
from .config import RoundContext, SecAggConfig, graph_seed, neighbours_of, share_index
from .errors import (
    BothSharesRequested,
    ClientListedAsAliveAndDropped,
    CohortMismatch,
    ConsistencyCheckFailed,
    DuplicateAdvertisement,
    DuplicateClient,
    ForgedAdvertisement,
    GraphSeedMismatch,
    ParameterMismatch,
    ReplayedMessage,
    RevivedDroppedClient,
    SecAggAbort,
    SecAggConfigError,
    SelfListedAsDropped,
    ServerAborted,
    TamperedShare,
    TooFewSurvivors,
    UnexpectedMessage,
    UnknownClient,
    UnsignedAdvertisement,
)
from .keys import Identity, Roster
from .messages import (
    AdvertisedKeys,
    AdvertiseRequest,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeyAdvertisement,
    MaskedInput,
    RelayedShares,
    RoundFailed,
    UnmaskRequest,
    UnmaskShares,
)

# (state, message type) -> next state.  Any state but the terminal ones also
# goes to "Aborted" on RoundFailed or on any SecAggAbort raised by its handler.
CLIENT_TRANSITIONS: dict[tuple[str, str], str] = {
    ("R0AdvertiseKeys", "AdvertiseRequest"): "R1ShareKeys",
    ("R1ShareKeys", "AdvertisedKeys"): "R2MaskedInput",
    ("R2MaskedInput", "RelayedShares"): "R3ConsistencyCheck",
    ("R3ConsistencyCheck", "ConsistencyRequest"): "R4Unmasking",
    ("R4Unmasking", "UnmaskRequest"): "Completed",
}
CLIENT_TERMINAL_STATES = ("Completed", "Aborted")

SEED_SHARE = "seed"
MASK_KEY_SHARE = "mask_key"
_NONCE_BYTES = 12


class ClientSession:
    """One client's side of one SecAgg+ round.

    ``input_vector`` is the float32 vector to sum (the caller has already formed
    w_i * delta_i followed by w_i); it must have ``config.vector_length`` finite
    entries.  ``threads`` is passed to the core's mask kernel; ``quantise_seed``
    (16 bytes) keys the stochastic rounding, fresh from the OS when None.
    ``before_reveal(survivors)`` is called once every check of the unmask request
    has passed and before any share leaves: it may raise a ``SecAggAbort`` (the
    session then aborts, revealing nothing), e.g. ``UpdateAlreadySummed`` when the
    caller knows this input was already summed over another survivor set.
    ``before_masked_input(max_summed)`` is called once the masked input is formed and
    before it leaves: past that point the input can be unmasked without this client (any
    t survivors reveal its self-mask seed), so it is the caller's last chance to record
    what the input releases (a DP run's privacy spend) or to withhold it by raising a
    ``SecAggAbort``.  ``max_summed`` is the most inputs, this one included, that the sum
    can hold: the sites of its neighbourhood that shared keys with it, plus the cohort
    members outside its neighbourhood (whether those shared keys is not seen here).  On
    a complete graph (small cohorts) it is exact up to later dropouts; the survivor
    count at ``before_reveal`` can only be smaller.

    Raises (on construction):
        SecAggConfigError: ``client_id`` not in the roster, or the input vector has the
            wrong dtype, shape, length or non-finite entries.
    """

    def __init__(
        self,
        config: SecAggConfig,
        ctx: RoundContext,
        client_id: str,
        identity: Identity,
        roster: Roster,
        input_vector: np.ndarray,
        *,
        threads: int = 1,
        quantise_seed: bytes | None = None,
        before_reveal: Callable[[list[str]], None] | None = None,
        before_masked_input: Callable[[int], None] | None = None,
    ) -> None:
        keys.check_client_id(client_id)
        if client_id not in roster:
            raise SecAggConfigError(f"client_id {client_id!r} is not in the roster")
        if roster.public_key(client_id) != identity.public_bytes():
            raise SecAggConfigError(
                f"identity of {client_id!r} does not match its key in the roster"
            )
        if not isinstance(input_vector, np.ndarray) or input_vector.dtype != np.float32:
            raise SecAggConfigError(
                "input_vector must be a numpy float32 array, got "
                f"{getattr(input_vector, 'dtype', type(input_vector).__name__)}"
            )
        if input_vector.ndim != 1 or input_vector.shape[0] != config.vector_length:
            raise SecAggConfigError(
                f"input_vector has shape {input_vector.shape}, the configuration says "
                f"({config.vector_length},)"
            )
        if not np.isfinite(input_vector).all():
            raise SecAggConfigError("input_vector holds NaN or infinite entries")
        self.config = config
        self.ctx = ctx
        self.client_id = client_id
        self.identity = identity
        self.roster = roster
        self.threads = threads
        if quantise_seed is not None and (
            not isinstance(quantise_seed, bytes) or len(quantise_seed) != 16
        ):
            raise SecAggConfigError("quantise_seed must be 16 bytes or None")
        self._quantise_seed = quantise_seed or os.urandom(16)
        self.before_reveal = before_reveal
        self.before_masked_input = before_masked_input
        self.state: str = "R0AdvertiseKeys"
        self.failure: SecAggAbort | None = None
        self.revealed_shares: dict[str, str] = {}
        self._input: np.ndarray | None = np.ascontiguousarray(input_vector)
        # filled in as the round goes on
        self.cohort: list[str] = []
        self.neighbours: frozenset[str] = frozenset()
        self.index: dict[str, int] = {}
        self.round_keys: keys.RoundKeys | None = None
        self.self_seed = b""
        self.peer_enc_keys: dict[str, bytes] = {}
        self.peer_mask_keys: dict[str, bytes] = {}
        self.share_keys: dict[str, bytes] = {}  # AES-GCM key per peer, both directions
        self.advertised: set[str] = set()  # U1 as seen here (self included)
        self.own_shares: dict[str, tuple[bytes, bytes]] = {}  # holder -> (seed, key) share
        self.held_shares: dict[str, tuple[bytes, bytes]] = {}  # owner -> (seed, key) share
        self.shared: set[str] = set()  # U2 as seen here (self included)
        self.signed_survivors: list[str] = []  # U3 as signed here

    @property
    def done(self) -> bool:
        return self.state in CLIENT_TERMINAL_STATES

    def receive(self, message: object, now: float) -> list[object]:
        """Advance on one message from the server; return the replies to send.

        Raises:
            SecAggAbort: the named subclass of the protocol violation; the session is
                then ``Aborted`` and any later call raises ``UnexpectedMessage``.
            UnexpectedMessage: any message after ``Completed`` (the state stays).
        """
        del now  # the client keeps no deadlines: the server's drop it
        if self.done and isinstance(message, RoundFailed):
            return []  # already finished; nothing left to protect or reveal
        if self.state == "Aborted":
            raise UnexpectedMessage(
                f"{type(message).__name__} after the session aborted ({self.failure!r})"
            )
        if self.state == "Completed":  # stays completed: its one answer is given
            raise UnexpectedMessage(f"{type(message).__name__} after the session completed")
        try:
            msgs.check_fields(message)
            _check_round(message, self.ctx)
            if isinstance(message, RoundFailed):
                self.state = "Aborted"
                self.failure = ServerAborted(message.reason)
                return []
            name = type(message).__name__
            next_state = CLIENT_TRANSITIONS.get((self.state, name))
            if next_state is None:
                raise UnexpectedMessage(f"{name} is not accepted in state {self.state}")
            replies = _STATES[self.state].handle(self, message)
        except SecAggAbort as exc:
            self.state = "Aborted"
            self.failure = exc
            self._forget_secrets()
            raise
        self.state = next_state
        if self.state == "Completed":
            self._forget_secrets()
        return replies

    # --- helpers used by the state classes ----------------------------------------

    def _sign(self, payload: bytes) -> bytes:
        return self.identity.sign(payload)

    def _forget_secrets(self) -> None:
        self._input = None
        self.share_keys = {}
        self.round_keys = None
        self.self_seed = b""
        self.own_shares = {}

    def _reveal(self, peer: str, kind: str) -> None:
        earlier = self.revealed_shares.get(peer)
        if earlier is not None and earlier != kind:
            raise BothSharesRequested(
                f"revealing the {kind} share of {peer!r} after its {earlier} share"
            )
        self.revealed_shares[peer] = kind


def _check_round(message: object, ctx: RoundContext) -> None:
    job = getattr(message, "job_id", None)
    rnd = getattr(message, "round", None)
    if job != ctx.job_id or rnd != ctx.round:
        raise ReplayedMessage(
            f"{type(message).__name__} is for job {job!r} round {rnd}, this session is "
            f"job {ctx.job_id!r} round {ctx.round}"
        )


def _check_ids(ids: list[str], s: ClientSession, what: str) -> None:
    seen: set[str] = set()
    for cid in ids:
        if cid in seen:
            raise DuplicateClient(f"{what} lists {cid!r} twice")
        seen.add(cid)
        if cid not in s.index:
            raise UnknownClient(f"{what} names {cid!r}, not in the cohort")


# --- one class per state ---------------------------------------------------------------


class ClientState:
    name: ClassVar[str]

    @staticmethod
    def handle(s: ClientSession, message: object) -> list[object]:  # pragma: no cover
        raise NotImplementedError


class R0AdvertiseKeys(ClientState):
    """Waiting for the cohort; answers with signed per-round public keys."""

    name = "R0AdvertiseKeys"

    @staticmethod
    def handle(s: ClientSession, message: object) -> list[object]:
        assert isinstance(message, AdvertiseRequest)
        cfg = s.config
        for field, got, want in (
            ("threshold", message.threshold, cfg.threshold),
            ("degree", message.degree, cfg.degree),
            ("vector_length", message.vector_length, cfg.vector_length),
            ("cohort size", len(message.cohort), cfg.n),
        ):
            if got != want:
                raise ParameterMismatch(
                    f"the server announced {field} {got}, this client's configuration says {want}"
                )
        seen: set[str] = set()
        for cid in message.cohort:
            if cid in seen:
                raise DuplicateClient(f"cohort lists {cid!r} twice")
            seen.add(cid)
            if cid not in s.roster:
                raise UnknownClient(f"cohort names {cid!r}, not in the signed roster")
        if s.client_id not in seen:
            raise CohortMismatch(f"cohort does not include this client {s.client_id!r}")
        expected_seed = graph_seed(s.ctx, message.cohort)
        if message.graph_seed != expected_seed:
            raise GraphSeedMismatch(
                "graph seed differs from the one derived from job, round and cohort"
            )
        s.cohort = sorted(message.cohort)
        s.index = share_index(s.cohort)
        assert cfg.degree is not None
        s.neighbours = neighbours_of(s.client_id, s.cohort, cfg.degree, expected_seed)
        s.round_keys = keys.RoundKeys()
        enc, mask = s.round_keys.enc_public, s.round_keys.mask_public
        payload = keys.advertisement_payload(
            s.client_id, enc, mask, job_id=s.ctx.job_id, round_=s.ctx.round
        )
        return [
            KeyAdvertisement(
                job_id=s.ctx.job_id,
                round=s.ctx.round,
                client_id=s.client_id,
                enc_public=enc,
                mask_public=mask,
                signature=s._sign(payload),
            )
        ]


class R1ShareKeys(ClientState):
    """Waiting for neighbours' advertisements; checks them, sends encrypted shares."""

    name = "R1ShareKeys"

    @staticmethod
    def handle(s: ClientSession, message: object) -> list[object]:
        assert isinstance(message, AdvertisedKeys)
        assert s.round_keys is not None
        ctx, me = s.ctx, s.client_id
        ids = set(message.enc_keys) | set(message.mask_keys) | set(message.signatures)
        allowed = s.neighbours | {me}
        for cid in sorted(ids):
            if cid not in s.index:
                raise UnknownClient(f"advertisement from {cid!r}, not in the cohort")
            if cid not in allowed:
                raise UnknownClient(f"advertisement from {cid!r}, not a neighbour of {me!r}")
            signature = message.signatures.get(cid, b"")
            if not signature:
                raise UnsignedAdvertisement(f"advertisement of {cid!r} carries no signature")
            enc = message.enc_keys.get(cid, b"")
            mask = message.mask_keys.get(cid, b"")
            payload = keys.advertisement_payload(
                cid, enc, mask, job_id=ctx.job_id, round_=ctx.round
            )
            if not keys.verify_signature(s.roster.public_key(cid), signature, payload):
                raise ForgedAdvertisement(
                    f"advertisement of {cid!r} does not verify under its roster key"
                )
        if me not in ids:
            raise CohortMismatch("the relayed advertisements omit this client's own")
        if (
            message.enc_keys[me] != s.round_keys.enc_public
            or message.mask_keys[me] != s.round_keys.mask_public
        ):
            raise ForgedAdvertisement("the relayed advertisement of this client is not its own")
        all_keys = list(message.enc_keys.values()) + list(message.mask_keys.values())
        if len(set(all_keys)) != len(all_keys):
            raise DuplicateAdvertisement("two advertisements carry the same public key")
        t = s.config.threshold
        if len(ids) < t:
            raise TooFewSurvivors(
                f"{len(ids)} clients of this neighbourhood advertised keys, threshold is {t}"
            )
        s.advertised = ids
        s.peer_enc_keys = {c: message.enc_keys[c] for c in ids if c != me}
        s.peer_mask_keys = {c: message.mask_keys[c] for c in ids if c != me}
        s.self_seed = os.urandom(keys.MASK_SEED_BYTES)
        holders = sorted(ids)
        xs = [s.index[c] for c in holders]
        seed_shares = shamir.split(s.self_seed, xs, t)
        key_shares = shamir.split(s.round_keys.mask_private_bytes(), xs, t)
        s.own_shares = {c: (seed_shares[s.index[c]], key_shares[s.index[c]]) for c in holders}
        ciphertexts: dict[str, bytes] = {}
        for peer in holders:
            if peer == me:
                continue
            try:
                key = keys.share_encryption_key(
                    s.round_keys.enc_private,
                    s.peer_enc_keys[peer],
                    job_id=ctx.job_id,
                    round_=ctx.round,
                    model_digest=ctx.model_digest,
                    me=me,
                    peer=peer,
                )
            except ValueError as exc:
                raise ForgedAdvertisement(f"encryption key of {peer!r} is unusable: {exc}") from exc
            s.share_keys[peer] = key
            plaintext = _share_plaintext(me, peer, *s.own_shares[peer])
            nonce = os.urandom(_NONCE_BYTES)
            aad = keys.share_associated_data(me, peer, ctx.job_id, ctx.round)
            ciphertexts[peer] = nonce + AESGCM(key).encrypt(nonce, plaintext, aad)
        return [
            EncryptedShares(
                job_id=ctx.job_id, round=ctx.round, client_id=me, ciphertexts=ciphertexts
            )
        ]


class R2MaskedInput(ClientState):
    """Waiting for the shares addressed to it; decrypts them, sends the masked input."""

    name = "R2MaskedInput"

    @staticmethod
    def handle(s: ClientSession, message: object) -> list[object]:
        assert isinstance(message, RelayedShares)
        assert s.round_keys is not None and s._input is not None
        ctx, me, t = s.ctx, s.client_id, s.config.threshold
        for sender in sorted(message.ciphertexts):
            if sender not in s.index or sender == me:
                raise UnknownClient(f"share from {sender!r}, not a peer in the cohort")
            if sender not in s.neighbours:
                raise UnknownClient(f"share from {sender!r}, not a neighbour of {me!r}")
            if sender not in s.advertised:
                raise RevivedDroppedClient(
                    f"share from {sender!r}, which dropped out before advertising keys"
                )
        if len(message.ciphertexts) + 1 < t:
            raise TooFewSurvivors(
                f"{len(message.ciphertexts) + 1} clients of this neighbourhood shared keys, "
                f"threshold is {t}"
            )
        held: dict[str, tuple[bytes, bytes]] = {}
        for sender, blob in message.ciphertexts.items():
            held[sender] = _open_share(s, sender, blob)
        s.held_shares = held
        s.shared = set(held) | {me}
        pair_seeds, pair_signs = [], []
        for peer in sorted(held):
            try:
                seed = keys.pairwise_mask_seed(
                    s.round_keys.mask_private,
                    s.peer_mask_keys[peer],
                    job_id=ctx.job_id,
                    round_=ctx.round,
                    model_digest=ctx.model_digest,
                    me=me,
                    peer=peer,
                )
            except ValueError as exc:
                raise ForgedAdvertisement(f"mask key of {peer!r} is unusable: {exc}") from exc
            pair_seeds.append(seed)
            pair_signs.append(_masking.pair_sign(me, peer))
        masked = _masking.quantise_and_mask(
            s._input,
            clip=s.config.clip,
            bits=s.config.bits,
            quantise_seed=s._quantise_seed,
            self_seed=s.self_seed,
            pair_seeds=pair_seeds,
            pair_signs=pair_signs,
            threads=s.threads,
        )
        s._input = None
        if s.before_masked_input is not None:
            unseen = set(s.cohort) - s.neighbours - {me}  # may be summed, not seen here
            s.before_masked_input(len(s.shared) + len(unseen))
        return [MaskedInput(job_id=ctx.job_id, round=ctx.round, client_id=me, masked=masked)]


class R3ConsistencyCheck(ClientState):
    """Waiting for the survivor list; checks and signs it."""

    name = "R3ConsistencyCheck"

    @staticmethod
    def handle(s: ClientSession, message: object) -> list[object]:
        assert isinstance(message, ConsistencyRequest)
        me, t = s.client_id, s.config.threshold
        _check_ids(message.survivors, s, "the survivor list")
        survivors = set(message.survivors)
        if me not in survivors:
            raise SelfListedAsDropped(f"the survivor list omits this client {me!r}")
        for cid in sorted(survivors & s.neighbours):
            if cid not in s.shared:
                raise RevivedDroppedClient(
                    f"survivor list names {cid!r}, which dropped out before sharing keys"
                )
        alive_here = len(survivors & s.shared)
        if alive_here < t:
            raise TooFewSurvivors(
                f"{alive_here} clients of this neighbourhood survive, threshold is {t}"
            )
        s.signed_survivors = sorted(survivors)
        payload = keys.consistency_payload(
            s.signed_survivors, job_id=s.ctx.job_id, round_=s.ctx.round
        )
        return [
            ConsistencySignature(
                job_id=s.ctx.job_id, round=s.ctx.round, client_id=me, signature=s._sign(payload)
            )
        ]


class R4Unmasking(ClientState):
    """Waiting for the unmask request; checks it, reveals one share kind per peer."""

    name = "R4Unmasking"

    @staticmethod
    def handle(s: ClientSession, message: object) -> list[object]:
        assert isinstance(message, UnmaskRequest)
        me, t, ctx = s.client_id, s.config.threshold, s.ctx
        _check_ids(message.survivors, s, "the survivor list")
        _check_ids(message.dropped, s, "the dropped list")
        survivors, dropped = set(message.survivors), set(message.dropped)
        both = survivors & dropped
        if both:
            raise ClientListedAsAliveAndDropped(
                f"{sorted(both)[0]!r} is listed both as survivor and as dropped"
            )
        if me in dropped:
            raise SelfListedAsDropped(f"this client {me!r} is listed as dropped")
        signed = set(s.signed_survivors)
        revived = survivors - signed
        if revived:
            raise RevivedDroppedClient(
                f"{sorted(revived)[0]!r} is listed as survivor but was not in the signed "
                "survivor list"
            )
        alive_dropped = dropped & signed
        if alive_dropped:
            raise ClientListedAsAliveAndDropped(
                f"{sorted(alive_dropped)[0]!r} is listed as dropped but is in the signed "
                "survivor list"
            )
        if survivors != signed:
            raise ConsistencyCheckFailed(
                f"survivor list differs from the signed one (missing {sorted(signed - survivors)})"
            )
        if len(survivors & s.shared) < t:
            raise TooFewSurvivors(
                f"{len(survivors & s.shared)} clients of this neighbourhood survive, threshold {t}"
            )
        payload = keys.consistency_payload(s.signed_survivors, job_id=ctx.job_id, round_=ctx.round)
        for signer, signature in sorted(message.signatures.items()):
            if signer not in signed:
                raise ConsistencyCheckFailed(f"consistency signature from non-survivor {signer!r}")
            if not keys.verify_signature(s.roster.public_key(signer), signature, payload):
                raise ConsistencyCheckFailed(
                    f"consistency signature of {signer!r} does not cover the same survivor list"
                )
        local_signers = set(message.signatures) & (s.neighbours | {me})
        if len(local_signers) < t:
            raise ConsistencyCheckFailed(
                f"{len(local_signers)} consistency signatures from this neighbourhood, "
                f"threshold is {t}"
            )
        if s.before_reveal is not None:
            s.before_reveal(list(s.signed_survivors))
        seed_shares: dict[str, bytes] = {}
        key_shares: dict[str, bytes] = {}
        for owner in sorted(s.shared):
            share = s.own_shares[me] if owner == me else s.held_shares[owner]
            if owner in survivors:
                s._reveal(owner, SEED_SHARE)
                seed_shares[owner] = share[0]
            elif owner in dropped:
                s._reveal(owner, MASK_KEY_SHARE)
                key_shares[owner] = share[1]
        return [
            UnmaskShares(
                job_id=ctx.job_id,
                round=ctx.round,
                client_id=me,
                seed_shares=seed_shares,
                mask_key_shares=key_shares,
            )
        ]


_STATES: dict[str, type[ClientState]] = {
    cls.name: cls for cls in (R0AdvertiseKeys, R1ShareKeys, R2MaskedInput, R3ConsistencyCheck,
                              R4Unmasking)
}


def _share_plaintext(sender: str, receiver: str, seed_share: bytes, key_share: bytes) -> bytes:
    return keys.length_prefixed(sender) + keys.length_prefixed(receiver) + seed_share + key_share


def _open_share(s: ClientSession, sender: str, blob: bytes) -> tuple[bytes, bytes]:
    """Decrypt and check one relayed share ciphertext.

    Raises:
        TamperedShare: the ciphertext does not authenticate, or names another pair,
            or carries shares for another holder index.
    """
    assert s.round_keys is not None
    ctx, me = s.ctx, s.client_id
    if not (isinstance(blob, bytes) and _NONCE_BYTES + 16 < len(blob) <= msgs.MAX_SHARE_CIPHERTEXT):
        raise TamperedShare(f"share ciphertext from {sender!r} has an impossible length")
    key = s.share_keys[sender]  # derived when this client encrypted its own shares
    aad = keys.share_associated_data(sender, me, ctx.job_id, ctx.round)
    try:
        plaintext = AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise TamperedShare(
            f"share ciphertext from {sender!r} fails authentication (tampered, or keyed for "
            "another job, round or model digest)"
        ) from exc
    head = keys.length_prefixed(sender) + keys.length_prefixed(me)
    if not plaintext.startswith(head) or len(plaintext) != len(head) + 2 * shamir.SHARE_BYTES:
        raise TamperedShare(f"share plaintext from {sender!r} names another sender or receiver")
    body = plaintext[len(head) :]
    seed_share, key_share = body[: shamir.SHARE_BYTES], body[shamir.SHARE_BYTES :]
    for share in (seed_share, key_share):
        try:
            x = shamir.share_x(share)
        except ValueError as exc:
            raise TamperedShare(f"share from {sender!r} is malformed: {exc}") from exc
        if x != s.index[me]:
            raise TamperedShare(f"share from {sender!r} is for holder index {x}, not this client")
    return seed_share, key_share
