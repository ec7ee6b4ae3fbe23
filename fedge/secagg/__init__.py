"""Secure aggregation (SecAgg+) as sans-I/O state machines.

Bonawitz et al. 2017 (CCS) with the sparse neighbour graph of Bell et al.
2020.  The coordinator learns the sum of the surviving clients' inputs and
nothing else, tolerates dropouts down to the threshold t, and cannot break
privacy by lying (semi-malicious server): key advertisements are signed by
identities of the console-signed roster; mask seeds are bound by HKDF to the
job, round, model digest and both client ids; each client checks every list
the server sends and reveals, per peer, a self-mask seed share or a mask-key
share, never both.

Public API::

    cfg = SecAggConfig.derive(n, alpha=0.1, delta=0.3, clip=1.0, vector_length=d)
    ctx = RoundContext(job_id, round, model_digest)
    identity = Identity.generate()                 # Identity.load(path) on an appliance
    roster = Roster.build({cid: pubkey, ...}, console_identity)
    roster = Roster.from_bytes(data, console_public_key)     # verifies the signature

    client = ClientSession(cfg, ctx, client_id, identity, roster, input_vector)
    replies = client.receive(message, now)         # raises a SecAggAbort subclass on attack

    server = ServerSession(cfg, ctx, cohort, roster)
    out = server.start(now)                        # [(client_id, message), ...]
    out = server.receive(sender, message, now)     # never raises for bad client input
    out = server.tick(now)                         # stage deadlines
    server.done, server.result (SecAggResult), server.failure (SecAggAbort | None)

Stages (``CLIENT_TRANSITIONS`` / ``SERVER_TRANSITIONS`` are the tables):
advertise keys -> share keys -> masked input -> consistency check ->
unmasking -> result.  ``messages.MESSAGE_TYPES`` maps wire names to the
message classes.  Masks and quantisation come from ``fedge.core`` only.

The client's input is float32[d] (the caller forms w_i * delta_i then w_i);
it is clipped to [-clip, clip], quantised with ``core.quant_bits(n)`` bits,
masked in Z_2^32.  ``SecAggResult.total`` is float64[d]: the sum of the
survivors' dequantised inputs (n_summands = number of survivors).

Configuration errors raise ``SecAggConfigError`` (a ValueError) whose message
names the value and the rule, e.g. "threshold 4 is below the semi-malicious
bound ceil((n + alpha*n)/2) = 6 for n=10, alpha=0.1".
"""

from .client import CLIENT_TRANSITIONS, ClientSession
from .config import RoundContext, SecAggConfig, default_degree, neighbours
from .errors import (
    BothSharesRequested,
    ClientListedAsAliveAndDropped,
    CohortMismatch,
    ConsistencyCheckFailed,
    DuplicateAdvertisement,
    DuplicateClient,
    ForgedAdvertisement,
    GraphSeedMismatch,
    MalformedMessage,
    ParameterMismatch,
    ReconstructionFailed,
    ReplayedMessage,
    RevealRefused,
    RevivedDroppedClient,
    SecAggAbort,
    SecAggConfigError,
    SelfListedAsDropped,
    ServerAborted,
    TamperedShare,
    TooFewInputs,
    TooFewSurvivors,
    UnexpectedMessage,
    UnknownClient,
    UnsignedAdvertisement,
    UpdateAlreadySummed,
)
from .keys import Identity, Roster, RosterSignatureError
from .server import SERVER_TRANSITIONS, SecAggResult, ServerSession

__all__ = [
    "CLIENT_TRANSITIONS",
    "SERVER_TRANSITIONS",
    "BothSharesRequested",
    "ClientListedAsAliveAndDropped",
    "ClientSession",
    "CohortMismatch",
    "ConsistencyCheckFailed",
    "DuplicateAdvertisement",
    "DuplicateClient",
    "ForgedAdvertisement",
    "GraphSeedMismatch",
    "Identity",
    "MalformedMessage",
    "ParameterMismatch",
    "ReconstructionFailed",
    "ReplayedMessage",
    "RevealRefused",
    "RevivedDroppedClient",
    "Roster",
    "RosterSignatureError",
    "RoundContext",
    "SecAggAbort",
    "SecAggConfig",
    "SecAggConfigError",
    "SecAggResult",
    "SelfListedAsDropped",
    "ServerAborted",
    "ServerSession",
    "TamperedShare",
    "TooFewInputs",
    "TooFewSurvivors",
    "UnexpectedMessage",
    "UnknownClient",
    "UnsignedAdvertisement",
    "UpdateAlreadySummed",
    "default_degree",
    "neighbours",
]
