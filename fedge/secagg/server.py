"""SecAgg+ server as a sans-I/O state machine.

Everything that moves the server from one stage to the next lives in
``SERVER_TRANSITIONS``; nothing else changes ``ServerSession.stage``.

Theory of operation: ``start(now)`` returns the opening messages as
(recipient, message) pairs; the caller sends them.  Each arriving message is
fed to ``receive(sender, message, now)`` with the transport-authenticated
sender id; ``tick(now)`` must be called regularly (the coordinator ticks after
each batch of messages): it is the only place a stage's deadline passes.  A
stage closes when every expected client answered or its deadline passed;
clients that missed it are dropped for the round.  A message from a
dropped client, from outside the cohort, for another job/round, or one that
does not fit its stage is discarded (counted in ``discarded``), never
fatal.  The server needs no honest client to stay correct.

A discarded message no honest client sends is also noted in ``discards`` as a
:class:`Discard` (sender, kind, why), for the caller to answer and audit (the
coordinator answers it ``Rejected`` and audits it, throttled by the kind, one of
``DISCARD_KINDS``: a fixed code, never text the client chose): a body whose ``client_id`` is not its
sender, or whose job or round is not the session's, or that fails
``check_fields``, whatever the session's state; and, from a client still due to
answer the current stage, the wrong message type for the stage or a second
answer to it. Two cases stay quiet (counted only): anything once the round is
over (or before it starts), and a well-formed message from a client already
dropped, the answer of a site that missed its stage deadline arriving late,
which is how a slow link looks. A message for an earlier round is the caller's
to route by its header (the coordinator never passes one here): one that
reaches the session is noted. The why names the message type and the field or
stage that was wrong, never a vector, a share or key material. A client dropped
at a stage deadline after such a message is dropped naming it ("its MaskedInput
was discarded (...)"), not as silent.

A client may lie about the shares it reveals.  The unmasking waits for every
site asked, but not for long once it could finish: when every secret has t
shares it waits ``UNMASK_GRACE_S`` more for the others (or to its deadline, if
that comes first), then closes with what it has.  It checks
that all the shares of a secret lie on one polynomial of degree t - 1
(``shamir.recover``): false shares are left out and their senders named
(``false_shares``, in the result and in any failure) when the shares that agree
outnumber them by t; otherwise the round fails, naming the secret and its
holders, rather than remove a wrong mask. A holder found false in one secret has
its shares of the secrets recovered after it left out (``unused_shares``) while
more than t others remain: finding a false share costs a Berlekamp-Welch decoding
(a linear system of about k unknowns, in Python, on the coordinator's event loop),
so a holder lying on every share it holds costs one decoding, not one per secret.
A secret with exactly t shares cannot be checked (any t values fit some
polynomial): a site that answers alone for its part of a secret can still make
the sum garbage unseen.  A reconstructed mask key that does not match its
signed public key fails the round.

The round ends with ``done`` true and either ``result`` (the float64 sum of the
survivors' dequantised inputs) or ``failure`` (a ``SecAggAbort``); on failure
every cohort member gets ``RoundFailed``.  No partial or still-masked vector is
ever exposed.
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import _masking, keys, shamir
from . import messages as msgs
from .config import (
    RoundContext,
    SecAggConfig,
    check_cohort,
    graph_seed,
    neighbours,
    share_index,
)
from .errors import (
    ReconstructionFailed,
    SecAggAbort,
    SecAggConfigError,
    TooFewInputs,
    TooFewSurvivors,
)
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

log = logging.getLogger(__name__)

# stage -> (message type it collects, stage after it closes).  A stage that
# cannot continue goes to "Failed"; "Completed" and "Failed" are terminal.
SERVER_TRANSITIONS: dict[str, tuple[str, str]] = {
    "AdvertiseKeys": ("KeyAdvertisement", "ShareKeys"),
    "ShareKeys": ("EncryptedShares", "MaskedInput"),
    "MaskedInput": ("MaskedInput", "ConsistencyCheck"),
    "ConsistencyCheck": ("ConsistencySignature", "Unmasking"),
    "Unmasking": ("UnmaskShares", "Completed"),
}
SERVER_TERMINAL_STAGES = ("Completed", "Failed")
# the stages in which a masked input not yet taken may still come into the sum
_BEFORE_INPUT_CLOSES = ("AdvertiseKeys", "ShareKeys", "MaskedInput")

Outgoing = list[tuple[str, object]]

# Seconds the unmasking still waits, once every secret has t shares, for the sites
# asked that have not answered: their shares beyond t are what exposes a false one
# (module doc).  Honest answers to one UnmaskRequest arrive within a round trip of
# one another (milliseconds on a LAN, well under a second on a WAN), so 2 s takes
# them in; a connected but wedged site then holds the round 2 s, not the stage
# deadline.  A share arriving after the grace is not checked (nor needed).
UNMASK_GRACE_S = 2.0

# ServerSession.discards keeps the newest this many not yet taken by the caller: a
# session nobody drains must not grow with a hostile client's flood
DISCARDS_KEPT = 256
# characters of a client-chosen string (a client_id, a job id) a discard reason quotes
QUOTED_MAX = 64
# Discard.kind: what was wrong with a discarded message, a fixed code. A caller that
# counts repeats by kind (the coordinator's audit throttle) keys by this, never by the
# reason's text, which quotes what the client chose (a client_id, a job id): a client
# varying it would otherwise make each message a new kind.
DISCARD_KINDS = (
    "malformed",        # fails check_fields (a field of the wrong type or size, no secagg message)
    "outsider",         # its sender is not in the cohort of the round
    "not_from_a_site",  # a message only the server sends
    "spoofed_client",   # its client_id is not its sender
    "other_job",        # it names another job
    "other_round",      # it names another round
    "wrong_stage",      # not the message the current stage takes
    "second_answer",    # its sender already answered the stage
    "refused_input",    # the stage's message, not taken (inconsistent with the round)
)


class Discard(NamedTuple):
    """A discarded message no honest client sends (module doc): its sender, what was
    wrong as one of DISCARD_KINDS, and why in words (which may quote the client)."""

    sender: str
    kind: str
    why: str


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked sum of the survivors' inputs (float64[d]) and who took part."""

    total: np.ndarray
    survivors: list[str]
    dropped: list[str]
    # holder -> the secrets it sent a false share of (left out: the sum is right)
    false_shares: dict[str, list[str]] = field(default_factory=dict)
    # holder (one of false_shares) -> the secrets recovered after it was found false,
    # whose share from it was left out unchecked (ServerSession.unused_shares)
    unused_shares: dict[str, list[str]] = field(default_factory=dict)


class ServerSession:
    """The coordinator's side of one SecAgg+ round.

    ``threads`` is passed to the core's mask kernel when masks are removed; None
    (the default) uses every core of the coordinator.

    Raises (on construction):
        SecAggConfigError: the cohort is not ``config.n`` distinct ids of the roster.
    """

    def __init__(
        self,
        config: SecAggConfig,
        ctx: RoundContext,
        cohort: list[str],
        roster: keys.Roster,
        *,
        threads: int | None = None,
    ) -> None:
        self.config = config
        self.ctx = ctx
        self.cohort = check_cohort(cohort, config.n)
        for cid in self.cohort:
            if cid not in roster:
                raise SecAggConfigError(f"cohort member {cid!r} is not in the roster")
        self.roster = roster
        self.threads = threads if threads and threads > 0 else (os.cpu_count() or 1)
        self.graph_seed = graph_seed(ctx, self.cohort)
        assert config.degree is not None
        self.neighbours = neighbours(self.cohort, config.degree, self.graph_seed)
        self.index = share_index(self.cohort)
        self.stage = "Idle"
        self.deadline = float("inf")
        self.result: SecAggResult | None = None
        self.failure: SecAggAbort | None = None
        self.dropped: dict[str, str] = {}  # client -> stage where it dropped
        self._why: dict[str, str] = {}  # client -> why it was dropped
        self._failed_in = ""  # the stage the round failed in
        self.discarded = 0
        # each discarded message no honest client sends (module doc), oldest first,
        # for the caller to answer and audit: take_discards()
        self.discards: collections.deque[Discard] = collections.deque(
            maxlen=DISCARDS_KEPT)
        # client still due to answer the stage -> what its first discarded message in
        # this stage was (its drop at the deadline names it)
        self._sent_wrong: dict[str, str] = {}
        self._alive: set[str] = set(self.cohort)
        self._replied: set[str] = set()
        self._grace_started = False  # unmasking: every secret has t shares (UNMASK_GRACE_S)
        self._adverts: dict[str, KeyAdvertisement] = {}
        self._ciphertexts: dict[str, dict[str, bytes]] = {}
        self._total: np.ndarray | None = None
        self._u1: set[str] = set()
        self._u2: set[str] = set()
        self._u3: set[str] = set()
        self._signatures: dict[str, bytes] = {}
        self._consistency_payload: bytes | None = None
        self._seed_shares: dict[str, dict[str, bytes]] = {}
        self._key_shares: dict[str, dict[str, bytes]] = {}
        # holder -> the secrets whose share from it did not fit the others (unmasking)
        self.false_shares: dict[str, list[str]] = {}
        # holder found false -> the later secrets its share was left out of, unchecked
        self.unused_shares: dict[str, list[str]] = {}

    @property
    def done(self) -> bool:
        return self.stage in SERVER_TERMINAL_STAGES

    def start(self, now: float) -> Outgoing:
        """Open the round: send every cohort member the cohort and parameters.

        Raises:
            RuntimeError: the session was started before.
        """
        if self.stage != "Idle":
            raise RuntimeError(f"start() called in stage {self.stage}")
        self._enter("AdvertiseKeys", now)
        request = AdvertiseRequest(
            job_id=self.ctx.job_id,
            round=self.ctx.round,
            cohort=list(self.cohort),
            threshold=self.config.threshold,
            degree=self.config.degree or 0,
            vector_length=self.config.vector_length,
            graph_seed=self.graph_seed,
        )
        return [(cid, request) for cid in self.cohort]

    def tick(self, now: float) -> Outgoing:
        """Close the current stage if its deadline has passed."""
        if not self.done and self.stage != "Idle" and now >= self.deadline:
            return self._close_stage(now)
        return []

    def postpone(self, seconds: float) -> None:
        """The server took no message for ``seconds``: the stage's deadline moves
        that much later (the clients' silence meanwhile was the server's deafness)."""
        if not self.done and self.stage != "Idle":
            self.deadline += seconds

    def receive(self, sender: str, message: object, now: float) -> Outgoing:
        """Take one client message; return what to send.  Never raises for bad input.

        A stage closes at its deadline by :meth:`tick`, not here: a message taken
        before the tick that closes its stage counts, whatever ``now`` says. A
        server that did not run for a while (paused, swapped out, held up by a
        locked database) takes the answers that waited for it before it ticks,
        and must not hold its own deafness against them."""
        if self.done or self.stage == "Idle":
            return self._discard(sender, message, None)
        expected, _ = SERVER_TRANSITIONS[self.stage]
        try:
            msgs.check_fields(message)
        except SecAggAbort as exc:
            return self._discard(sender, message, str(exc))
        if (
            type(message).__name__ != expected
            or sender not in self._alive
            or sender in self._replied
            or getattr(message, "client_id", None) != sender
            or getattr(message, "job_id", None) != self.ctx.job_id
            or getattr(message, "round", None) != self.ctx.round
        ):
            return self._discard(sender, message, None)
        accepted = getattr(self, "_take_" + expected)(sender, message)
        if not accepted:
            self.discarded += 1
            self.discards.append(Discard(
                sender, "refused_input",
                f"secure aggregation discarded {expected} from {sender}: not what the "
                f"{self.stage} stage allows (malformed, or inconsistent with the round); "
                f"{sender} is dropped from it"))
            return self._drop_now(sender, f"its {expected} was refused (malformed, or not "
                                          "what this stage allows)", now)
        self._replied.add(sender)
        if self._stage_complete():
            return self._close_stage(now)
        if self.stage == "Unmasking" and not self._grace_started and self._can_reconstruct():
            self._grace_started = True
            self.deadline = min(self.deadline, now + UNMASK_GRACE_S)
        return []

    def take_discards(self) -> list[Discard]:
        """The discarded messages noted since the last call (module doc), oldest
        first; the session forgets them. Never raises."""
        out = list(self.discards)
        self.discards.clear()
        return out

    def _discard(self, sender: str, message: object, malformed: str | None) -> Outgoing:
        """Count ``message`` as discarded and note why, unless it is a quiet case
        (module doc). Only this path builds the reason: an accepted message costs
        nothing here."""
        self.discarded += 1
        noted = self._discard_reason(sender, message, malformed)
        if noted is not None:
            kind, why = noted
            name = type(message).__name__
            self.discards.append(Discard(
                sender, kind, f"secure aggregation discarded {name} from {sender}: {why}"))
            if sender in self._alive and sender not in self._replied and not self.done:
                self._sent_wrong.setdefault(sender, f"its {name} was discarded ({why})")
        return []

    def _discard_reason(self, sender: str, message: object,
                        malformed: str | None) -> tuple[str, str] | None:
        """(kind, why) ``message`` from ``sender`` was not taken (kind: one of
        DISCARD_KINDS), or None when that is expected and stays quiet: the round is
        over (or not begun), or ``sender`` was dropped and this is its late answer. A
        body naming another client, job or round, and a malformed one, are never quiet."""
        if malformed is not None:
            return "malformed", malformed
        if sender not in self.index:
            return "outsider", f"{_quoted(sender)} is not in the cohort of this round"
        if not hasattr(message, "client_id"):  # a server's message, or no secagg one
            return "not_from_a_site", f"{type(message).__name__} is not a message a site sends"
        client_id = getattr(message, "client_id", None)
        if client_id != sender:
            return ("spoofed_client",
                    f"its client_id {_quoted(client_id)} is not the sender {sender!r}")
        job_id = getattr(message, "job_id", None)
        if job_id != self.ctx.job_id:
            return ("other_job",
                    f"it names job {_quoted(job_id)}, not this round's {self.ctx.job_id!r}")
        round_ = getattr(message, "round", None)
        if round_ != self.ctx.round:
            return "other_round", f"it names round {_quoted(round_)}, not round {self.ctx.round}"
        if self.done or self.stage == "Idle" or sender not in self._alive:
            return None  # a round over, or a dropped site's late answer: expected
        expected, _ = SERVER_TRANSITIONS[self.stage]
        if type(message).__name__ != expected:
            return "wrong_stage", f"the {self.stage} stage takes {expected}"
        if sender in self._replied:
            return ("second_answer",
                    f"{sender} already answered the {self.stage} stage; its first answer stands")
        return None

    def refuse(self, sender: str, now: float) -> Outgoing:
        """``sender`` has said it will send nothing more this round (its own abort, a
        reveal its log forbids): it is dropped now, not at the stage deadline, so a
        stage left waiting only for refusers closes at once.

        An answer it gave to the current stage stands. In the unmasking stage, once the
        sites still able to answer cannot bring some secret to t shares, the round
        fails at once, naming it (ReconstructionFailed). Never raises."""
        if (self.done or self.stage == "Idle" or sender not in self._alive
                or sender in self._replied):
            return []
        return self._drop_now(sender, "it refused its part", now)

    @property
    def answered(self) -> list[str]:
        """The clients whose answer to the current stage is in, sorted (read-only: what
        ``jobs status`` reports); none before the start and once the round is over.
        The stage still waits for the others alive (those not in ``dropped``)."""
        return [] if self.done or self.stage == "Idle" else sorted(self._replied)

    def awaits_masked_input(self, client: str) -> bool:
        """Whether ``client``'s masked input can still come into the sum: the server
        has not taken it, is still collecting masked inputs (the stages up to
        MaskedInput), and has not dropped ``client``. Never raises."""
        return (self.stage in _BEFORE_INPUT_CLOSES and client in self._alive
                and client not in self._u3)

    # --- stage bookkeeping --------------------------------------------------------

    def _enter(self, stage: str, now: float) -> None:
        self.stage = stage
        self.deadline = now + self.config.stage_timeout
        self._replied = set()
        self._sent_wrong = {}
        self._grace_started = False

    def _drop(self, cid: str, why: str) -> None:
        if cid in self._alive:
            self._alive.discard(cid)
            self.dropped[cid] = self.stage
            self._why[cid] = why

    def _drop_now(self, cid: str, why: str, now: float) -> Outgoing:
        """Drop ``cid`` before the stage ends: the unmasking fails at once if that leaves
        a secret short of t shares; a stage that now has every answer due closes."""
        self._drop(cid, why)
        if self.stage == "Unmasking" and (short := self._unmask_shortfall()):
            return self._fail(ReconstructionFailed(short))
        return self._close_stage(now) if self._stage_complete() else []

    @property
    def left_out(self) -> dict[str, str]:
        """Each cohort member the round went on (or failed) without, and why: those
        dropped, with their stage, and in a round that failed while unmasking, those
        asked who had not answered."""
        out = {cid: f"dropped out of secure aggregation in its {stage} stage: "
                    f"{self._why.get(cid, 'no answer')}"
               for cid, stage in sorted(self.dropped.items())}
        if self._failed_in == "Unmasking":
            for cid in sorted(self._alive - self._replied):
                wrong = self._sent_wrong.get(cid)
                out[cid] = ("asked to unmask, no answer before the round failed" if wrong
                            is None else f"asked to unmask, {wrong}, and no valid answer "
                            "came before the round failed")
        return out

    def _stage_complete(self) -> bool:
        # the unmasking too waits for every site asked, not the first t of each
        # secret: the shares beyond t are what exposes a false one (module doc);
        # receive() brings its deadline to UNMASK_GRACE_S after the t-th
        return self._alive <= self._replied

    def _close_stage(self, now: float) -> Outgoing:
        for cid in sorted(self._alive - self._replied):
            if self.stage != "Unmasking":  # at its deadline or grace unmasking needs only t
                wrong = self._sent_wrong.get(cid)
                self._drop(cid, "no answer before the stage deadline" if wrong is None else
                           f"{wrong}, and no valid answer came before the stage deadline")
        try:
            out = getattr(self, "_close_" + self.stage)()
        except SecAggAbort as exc:
            return self._fail(exc)
        _, next_stage = SERVER_TRANSITIONS[self.stage]
        self._enter(next_stage, now)
        if next_stage == "Completed":
            self.deadline = float("inf")
        return out

    def _fail(self, exc: SecAggAbort) -> Outgoing:
        self.failure = exc
        self._failed_in = self.stage
        self.stage = "Failed"
        self._total = None
        notice = RoundFailed(
            job_id=self.ctx.job_id, round=self.ctx.round, reason=f"{type(exc).__name__}: {exc}"
        )
        return [(cid, notice) for cid in self.cohort]

    def _prune(self, pool: set[str], what: str) -> None:
        """Drop clients whose neighbourhood in ``pool`` has fewer than t members.

        The tolerance is per neighbourhood: pruning one client costs each of its
        neighbours one more, so on a sparse graph the pruning can run round the whole
        ring although most clients answered; the failure then names the first client
        that fell short and how many it kept.

        Raises:
            TooFewSurvivors: fewer than t clients are left.
        """
        t = self.config.threshold
        before = len(self._alive)
        first: tuple[str, int] | None = None  # the first client pruned, and what it kept
        changed = True
        while changed:
            changed = False
            for cid in sorted(self._alive):
                kept = len((self.neighbours[cid] | {cid}) & pool & self._alive)
                if kept < t:
                    first = first or (cid, kept)
                    self._drop(cid, f"fewer than t = {t} of it and its neighbours were "
                                    f"left after {what}")
                    changed = True
        if len(self._alive) >= t:
            return
        if first is None:
            raise TooFewSurvivors(
                f"{before} clients remain after {what}, too few for threshold {t}"
            )
        cid, kept = first
        m = len(self.neighbours[cid]) + 1
        raise TooFewSurvivors(
            f"site {cid!r} kept {kept} live of its neighbourhood of {m} (itself and its "
            f"{m - 1} neighbours) after {what}, fewer than threshold t={t}; the threshold "
            f"holds per neighbourhood, so pruning it cost its neighbours one each and "
            f"pruned {before - len(self._alive)} of the {before} clients left, "
            f"{len(self._alive)} remain"
        )

    # --- stage 0: advertise keys ---------------------------------------------------

    def _take_KeyAdvertisement(self, sender: str, msg: KeyAdvertisement) -> bool:
        # a signed key no neighbour can agree with would make every honest
        # neighbour abort; refusing it drops only its owner
        if not keys.usable_x25519_public(msg.enc_public) or not keys.usable_x25519_public(
            msg.mask_public
        ):
            return False
        payload = keys.advertisement_payload(
            sender, msg.enc_public, msg.mask_public, job_id=self.ctx.job_id, round_=self.ctx.round
        )
        if not isinstance(msg.signature, bytes) or not keys.verify_signature(
            self.roster.public_key(sender), msg.signature, payload
        ):
            return False
        self._adverts[sender] = msg
        return True

    def _close_AdvertiseKeys(self) -> Outgoing:
        seen: dict[bytes, str] = {}
        for cid in sorted(self._alive):  # one key, one client: refuse copies
            adv = self._adverts[cid]
            for key in (adv.enc_public, adv.mask_public):
                if key in seen:
                    why = "it advertised the same public key as another site"
                    self._drop(cid, why)
                    self._drop(seen[key], why)
                seen[key] = cid
        self._prune(self._alive, "key advertisement")
        self._u1 = set(self._alive)
        out: Outgoing = []
        for cid in sorted(self._alive):
            group = sorted((self.neighbours[cid] | {cid}) & self._alive)
            out.append(
                (
                    cid,
                    AdvertisedKeys(
                        job_id=self.ctx.job_id,
                        round=self.ctx.round,
                        enc_keys={c: self._adverts[c].enc_public for c in group},
                        mask_keys={c: self._adverts[c].mask_public for c in group},
                        signatures={c: self._adverts[c].signature for c in group},
                    ),
                )
            )
        return out

    # --- stage 1: share keys ----------------------------------------------------------

    def _take_EncryptedShares(self, sender: str, msg: EncryptedShares) -> bool:
        expected = self.neighbours[sender] & self._u1  # as it was when the keys went out
        if not isinstance(msg.ciphertexts, dict) or not set(msg.ciphertexts) <= expected:
            return False
        if any(
            not isinstance(c, bytes) or len(c) > msgs.MAX_SHARE_CIPHERTEXT
            for c in msg.ciphertexts.values()
        ):
            return False
        self._ciphertexts[sender] = dict(msg.ciphertexts)
        return True

    def _close_ShareKeys(self) -> Outgoing:
        self._prune(self._alive, "key sharing")
        self._u2 = set(self._alive)
        out: Outgoing = []
        for cid in sorted(self._u2):
            relayed = {
                sender: self._ciphertexts[sender][cid]
                for sender in sorted(self.neighbours[cid] & self._u2)
                if cid in self._ciphertexts[sender]
            }
            out.append(
                (cid, RelayedShares(job_id=self.ctx.job_id, round=self.ctx.round,
                                    ciphertexts=relayed))
            )
        return out

    # --- stage 2: masked input ----------------------------------------------------

    def _take_MaskedInput(self, sender: str, msg: MaskedInput) -> bool:
        masked = msg.masked
        if (
            not isinstance(masked, np.ndarray)
            or masked.dtype != np.uint32
            or masked.shape != (self.config.vector_length,)
        ):
            return False
        if self._total is None:
            self._total = masked.copy()  # owned: the message's buffer may be read-only
        else:
            np.add(self._total, masked, out=self._total)  # wraps mod 2^32
        self._u3.add(sender)
        return True

    def _close_MaskedInput(self) -> Outgoing:
        if len(self._u3) < self.config.min_clients:
            raise TooFewInputs(
                f"{len(self._u3)} masked inputs arrived, min_clients is {self.config.min_clients}"
            )
        t = self.config.threshold
        for cid in sorted(self._u2):  # every mask in the sum must be removable
            if cid in self._u3 or self.neighbours[cid] & self._u3:
                holders = (self.neighbours[cid] | {cid}) & self._u3
                if len(holders) < t:
                    raise TooFewSurvivors(
                        f"only {len(holders)} survivors hold shares of {cid!r}, threshold is {t}"
                    )
        request = ConsistencyRequest(
            job_id=self.ctx.job_id, round=self.ctx.round, survivors=sorted(self._u3)
        )
        return [(cid, request) for cid in sorted(self._u3)]

    # --- stage 3: consistency check -------------------------------------------------

    def _take_ConsistencySignature(self, sender: str, msg: ConsistencySignature) -> bool:
        if self._consistency_payload is None:  # once per stage: U3 is fixed by now
            self._consistency_payload = keys.consistency_payload(
                sorted(self._u3), job_id=self.ctx.job_id, round_=self.ctx.round
            )
        if not isinstance(msg.signature, bytes) or not keys.verify_signature(
            self.roster.public_key(sender), msg.signature, self._consistency_payload
        ):
            return False
        self._signatures[sender] = msg.signature
        return True

    def _close_ConsistencyCheck(self) -> Outgoing:
        self._prune(set(self._signatures), "the consistency check")
        # the prune keeps each signer's own neighbourhood at t, not the holders of a
        # survivor's seed that went silent here, nor of a dropped site's mask key: an
        # unmask request then would have every signer reveal, and pin the round to
        # this survivor list, for a sum that cannot be finished
        if short := self._short_secret(due=self._alive):
            owner, what, can = short
            raise TooFewSurvivors(
                f"only {can} live sites hold shares of {owner!r}'s {what} after the "
                f"consistency check, threshold is {self.config.threshold}: the unmasking "
                "could not complete, so no unmask request was sent")
        dropped = sorted(self._u2 - self._u3)
        out: Outgoing = []
        for cid in sorted(self._alive):
            local = (self.neighbours[cid] | {cid}) & self._alive
            out.append(
                (
                    cid,
                    UnmaskRequest(
                        job_id=self.ctx.job_id,
                        round=self.ctx.round,
                        survivors=sorted(self._u3),
                        dropped=dropped,
                        signatures={c: self._signatures[c] for c in sorted(local)},
                    ),
                )
            )
        return out

    # --- stage 4: unmasking ---------------------------------------------------------

    def _take_UnmaskShares(self, sender: str, msg: UnmaskShares) -> bool:
        mine = self.neighbours[sender] | {sender}
        seeds, mask_keys = msg.seed_shares, msg.mask_key_shares
        if not isinstance(seeds, dict) or not isinstance(mask_keys, dict):
            return False
        dropped = self._u2 - self._u3
        if not set(seeds) <= (mine & self._u3) or not set(mask_keys) <= (mine & dropped):
            return False
        x = self.index[sender]
        for share in list(seeds.values()) + list(mask_keys.values()):
            try:
                if shamir.share_x(share) != x:
                    return False
            except ValueError:
                return False
        for owner, share in seeds.items():
            self._seed_shares.setdefault(owner, {})[sender] = share
        for owner, share in mask_keys.items():
            self._key_shares.setdefault(owner, {})[sender] = share
        return True

    def _needed_key_owners(self) -> list[str]:
        return sorted(c for c in self._u2 - self._u3 if self.neighbours[c] & self._u3)

    def _secrets(self) -> list[tuple[str, str, dict[str, bytes]]]:
        """What the unmasking recovers: (owner, what, the shares of it taken so far),
        each survivor's self-mask seed and each needed dropped site's mask key."""
        return ([(c, "self-mask seed", self._seed_shares.get(c, {})) for c in sorted(self._u3)]
                + [(c, "mask key", self._key_shares.get(c, {}))
                   for c in self._needed_key_owners()])

    def _can_reconstruct(self) -> bool:
        t = self.config.threshold
        return all(len(taken) >= t for _, _, taken in self._secrets())

    def _short_secret(self, due: set[str]) -> tuple[str, str, int] | None:
        """The first secret that the shares taken and the sites in ``due`` cannot bring
        to t shares, as (owner, what, shares it can have), or None. A site sends a
        share of each secret of itself and of its neighbours (survivors' self-mask
        seeds, dropped sites' mask keys)."""
        t = self.config.threshold
        for owner, what, taken in self._secrets():
            can = len(taken) + sum(1 for h in due if h == owner or owner in self.neighbours[h])
            if can < t:
                return owner, what, can
        return None

    def _unmask_shortfall(self) -> str | None:
        """Why the unmasking cannot complete with the shares taken and the sites still
        due to answer, or None."""
        short = self._short_secret(self._alive - self._replied)
        if short is None:
            return None
        owner, what, can = short
        left = sorted(c for c, stage in self.dropped.items() if stage == "Unmasking")
        return (f"unmasking cannot complete: {len(left)} site(s) dropped out of "
                f"it ({', '.join(left)}), so {can} of the sites holding a share of "
                f"{owner!r}'s {what} remain, threshold {self.config.threshold}")

    def _close_Unmasking(self) -> Outgoing:
        try:
            return self._unmask()
        except ReconstructionFailed as exc:
            if self.false_shares:
                raise ReconstructionFailed(f"{exc}; {self._false_shares_text()}") from exc
            raise

    def _unmask(self) -> Outgoing:
        seeds: list[bytes] = []
        signs: list[int] = []
        for owner in sorted(self._u3):
            seeds.append(self._recover(owner, "self-mask seed",
                                       self._seed_shares.get(owner, {}), 16))
            signs.append(-1)
        for owner in self._needed_key_owners():
            raw = self._recover(owner, "mask key", self._key_shares.get(owner, {}), 32)
            try:
                matches = keys.x25519_public_from_private(raw) == self._adverts[owner].mask_public
            except ValueError:
                matches = False
            if not matches:
                raise ReconstructionFailed(
                    f"mask key of dropped {owner!r} does not match its signed public key"
                )
            for survivor in sorted(self.neighbours[owner] & self._u3):
                seeds.append(
                    keys.pairwise_mask_seed(
                        raw,
                        self._adverts[survivor].mask_public,
                        job_id=self.ctx.job_id,
                        round_=self.ctx.round,
                        model_digest=self.ctx.model_digest,
                        me=owner,
                        peer=survivor,
                    )
                )
                # the survivor added pair_sign(survivor, owner) * PRG; take it away
                signs.append(-_masking.pair_sign(survivor, owner))
        assert self._total is not None
        total = self._total
        self._total = None
        _masking.remove_masks(total, seeds, signs, threads=self.threads)
        summed = _masking.dequantise(
            total, n_summands=len(self._u3), clip=self.config.clip, bits=self.config.bits
        )
        survivors = sorted(self._u3)
        if self.false_shares:
            log.warning("job %s round %d: secure aggregation summed without false shares: "
                        "%s", self.ctx.job_id, self.ctx.round, self._false_shares_text())
        self.result = SecAggResult(
            total=summed,
            survivors=survivors,
            dropped=[c for c in self.cohort if c not in self._u3],
            false_shares={h: list(w) for h, w in sorted(self.false_shares.items())},
            unused_shares={h: list(w) for h, w in sorted(self.unused_shares.items())},
        )
        return []

    def _recover(self, owner: str, what: str, taken: dict[str, bytes], length: int) -> bytes:
        """``owner``'s ``what`` from the shares ``taken`` (holder -> share), every one
        checked (``shamir.recover``); the holders of shares that did not fit go to
        ``false_shares``.

        The shares of a holder already in ``false_shares`` are left out (recorded in
        ``unused_shares``) when more than t others remain, so that the others can
        still be checked: each false share found costs a decoding (module doc), and
        one liar is decoded once per round, not once per secret it holds a share of.
        With t others or fewer every share is used, as for any secret.

        Raises:
            ReconstructionFailed: fewer than t shares; the shares disagree and too few
                agree to tell which are false; the value does not fit ``length`` bytes.
        """
        t = self.config.threshold
        trusted = {h: s for h, s in taken.items() if h not in self.false_shares}
        left_out = sorted(set(taken) - set(trusted))
        if left_out and len(trusted) > t:
            for h in left_out:
                self.unused_shares.setdefault(h, []).append(f"{owner}'s {what}")
            taken = trusted
        try:
            secret, false_xs = shamir.recover(taken.values(), t, length)
        except shamir.InconsistentShares as exc:
            raise ReconstructionFailed(
                f"cannot recover the secret of {owner!r} ({what}): its shares from "
                f"{', '.join(sorted(taken))} disagree: {exc}; one or more of them sent a "
                "false share") from exc
        except ValueError as exc:
            raise ReconstructionFailed(f"cannot recover the secret of {owner!r}: {exc}") from exc
        holder_of = {self.index[h]: h for h in taken}
        for x in false_xs:
            self.false_shares.setdefault(holder_of[x], []).append(f"{owner}'s {what}")
        return secret

    def _false_shares_text(self) -> str:
        named = "; ".join(f"{h} (of {', '.join(w)})" for h, w in sorted(self.false_shares.items()))
        unused = "; ".join(f"{h}'s shares of {len(w)} secret(s) recovered later were not used"
                           for h, w in sorted(self.unused_shares.items()))
        return (f"false unmasking shares, left out, came from {len(self.false_shares)} "
                f"site(s): {named}" + (f" ({unused})" if unused else ""))


def _quoted(value: object) -> str:
    """``value`` (a field a client chose) as a discard reason quotes it: a string cut
    to QUOTED_MAX characters, a number or None as is, anything else by its type."""
    if isinstance(value, str):
        return repr(value) if len(value) <= QUOTED_MAX else repr(value[:QUOTED_MAX]) + "..."
    if value is None or isinstance(value, int | float):
        return repr(value)
    return f"a {type(value).__name__}"
