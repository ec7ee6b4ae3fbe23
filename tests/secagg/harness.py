"""In-memory SecAgg+ federation: real clients, real server, messages moved by hand.

Like h11's ConnectionPair: no sockets, no clock; the harness advances ``now``
past a stage deadline whenever every queued message has been delivered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedge import core
from fedge.secagg import (
    ClientSession,
    Identity,
    Roster,
    RoundContext,
    SecAggAbort,
    SecAggConfig,
    ServerSession,
)
from fedge.secagg import messages as msgs

# The client-side stage a dropout happens at: the client stops answering the
# message that opens this stage (and everything after it).
STAGE_OPENERS = {
    "advertise": msgs.AdvertiseRequest,
    "share": msgs.AdvertisedKeys,
    "masked_input": msgs.RelayedShares,
    "consistency": msgs.ConsistencyRequest,
    "unmasking": msgs.UnmaskRequest,
}
STAGES = tuple(STAGE_OPENERS)

MODEL_DIGEST = hashlib.sha256(b"global model of round 3").digest()


@dataclass
class Federation:
    n: int
    d: int
    alpha: float = 0.1
    delta: float = 0.0
    clip: float = 1.0
    degree: int | None = None
    threshold: int | None = None
    min_clients: int | None = None
    seed: int = 0
    job_id: str = "job-brca"
    round: int = 3
    digests: dict[str, bytes] = field(default_factory=dict)
    stage_timeout: float = 10.0
    extra_enrolled: int = 1  # enrolled in the roster but not in this round's cohort

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.ids = [f"site-{i:03d}" for i in range(self.n)]
        self.console = Identity.generate()
        self.spares = [f"spare-{i:03d}" for i in range(self.extra_enrolled)]
        self.identities = {cid: Identity.generate() for cid in self.ids + self.spares}
        self.roster = Roster.build(
            {cid: ident.public_bytes() for cid, ident in self.identities.items()}, self.console
        )
        if self.threshold is None:
            self.config = SecAggConfig.derive(
                self.n,
                alpha=self.alpha,
                delta=self.delta,
                clip=self.clip,
                vector_length=self.d,
                min_clients=self.min_clients,
                degree=self.degree,
                stage_timeout=self.stage_timeout,
            )
        else:
            self.config = SecAggConfig(
                n=self.n,
                threshold=self.threshold,
                clip=self.clip,
                vector_length=self.d,
                alpha=self.alpha,
                delta=self.delta,
                min_clients=self.min_clients,
                degree=self.degree,
                stage_timeout=self.stage_timeout,
            )
        self.ctx = RoundContext(self.job_id, self.round, MODEL_DIGEST)
        # a few entries beyond the clip range, to exercise clipping
        self.inputs = {
            cid: (rng.standard_normal(self.d) * 0.6).astype(np.float32) for cid in self.ids
        }
        self.quant_seeds = {cid: rng.bytes(16) for cid in self.ids}
        self.clients = {cid: self.make_client(cid) for cid in self.ids}
        self.server = ServerSession(self.config, self.ctx, self.ids, self.roster)
        self.client_errors: dict[str, SecAggAbort] = {}
        self.sent: list[tuple[str, object]] = []  # every client -> server message

    def make_client(self, cid: str) -> ClientSession:
        ctx = RoundContext(self.job_id, self.round, self.digests.get(cid, MODEL_DIGEST))
        return ClientSession(
            self.config,
            ctx,
            cid,
            self.identities[cid],
            self.roster,
            self.inputs[cid],
            quantise_seed=self.quant_seeds[cid],
        )

    def quantised(self, cid: str) -> np.ndarray:
        return core.quantise(
            self.inputs[cid], clip=self.clip, bits=self.config.bits, seed=self.quant_seeds[cid]
        )

    def expected_sum(self, survivors: list[str]) -> np.ndarray:
        """The plain quantised sum of ``survivors``' inputs, dequantised."""
        total = np.zeros(self.d, dtype=np.uint32)
        for cid in survivors:
            total += self.quantised(cid)
        return core.dequantise(
            total, n_summands=len(survivors), clip=self.clip, bits=self.config.bits
        )

    def run(
        self,
        drop: dict[str, set[str]] | None = None,
        *,
        tamper: Callable[[str, object], object | None] | None = None,
        max_steps: int = 40,
    ) -> ServerSession:
        """Run the round; ``drop[stage]`` stop answering at that stage.

        ``tamper(recipient, message)`` may replace a server message on its way to a
        client (return None to deliver it unchanged).
        """
        drop = drop or {}
        dead: set[str] = set()
        now = 0.0
        queue = list(self.server.start(now))
        for _ in range(max_steps):
            while queue:
                recipient, message = queue.pop(0)
                for stage, opener in STAGE_OPENERS.items():
                    if isinstance(message, opener) and recipient in drop.get(stage, ()):
                        dead.add(recipient)
                if recipient in dead or recipient in self.client_errors:
                    continue
                if tamper is not None:
                    replaced = tamper(recipient, message)
                    message = message if replaced is None else replaced
                try:
                    replies = self.clients[recipient].receive(message, now)
                except SecAggAbort as exc:
                    self.client_errors[recipient] = exc
                    continue
                for reply in replies:
                    self.sent.append((recipient, reply))
                    queue += self.server.receive(recipient, reply, now)
            if self.server.done:
                return self.server
            now += self.config.stage_timeout + 1
            queue += self.server.tick(now)
        raise AssertionError(f"round did not finish in {max_steps} steps")


def attack(
    fed: Federation,
    victim: str,
    message_type: type,
    modify: Callable[[object], object],
    drop: dict[str, set[str]] | None = None,
) -> SecAggAbort:
    """Run ``fed`` with the server's ``message_type`` to ``victim`` replaced by
    ``modify(message)``; return what ``victim`` aborted with (it must abort)."""

    def tamper(recipient: str, message: object) -> object | None:
        if recipient == victim and isinstance(message, message_type):
            return modify(message)
        return None

    fed.run(drop, tamper=tamper)
    assert victim in fed.client_errors, f"{victim} did not abort"
    assert fed.clients[victim].state == "Aborted"
    return fed.client_errors[victim]


def sign_advert(fed: Federation, signer: str, cid: str, enc: bytes, mask: bytes) -> bytes:
    """A signature by ``signer``'s identity on an advertisement of ``cid``'s keys."""
    from fedge.secagg import keys

    payload = keys.advertisement_payload(cid, enc, mask, job_id=fed.job_id, round_=fed.round)
    return fed.identities[signer].sign(payload)


def revealed_kinds(sent: list[tuple[str, object]]) -> dict[tuple[str, str], set[str]]:
    """(revealer, peer) -> the share kinds that revealer sent for that peer."""
    kinds: dict[tuple[str, str], set[str]] = {}
    for sender, message in sent:
        if isinstance(message, msgs.UnmaskShares):
            for peer in message.seed_shares:
                kinds.setdefault((sender, peer), set()).add("seed")
            for peer in message.mask_key_shares:
                kinds.setdefault((sender, peer), set()).add("mask_key")
    return kinds
