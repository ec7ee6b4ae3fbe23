"""Every way a secure-aggregation round can be refused, each with its own name.

A client raises one of these from ``ClientSession.receive`` when the server
(or whoever relays for it) breaks the protocol; the session then stays in its
``Aborted`` state and reveals nothing more.  A server session records one in
``ServerSession.failure`` when the round cannot produce a correct sum.  Each
class names the attack or failure it stops, and each has a test of that name.

Configuration mistakes are not aborts: they are ``SecAggConfigError`` (a
``ValueError``) raised before any round starts.
"""

from __future__ import annotations


class SecAggConfigError(ValueError):
    """A configuration value breaks a rule; the message names value and rule."""


class SecAggAbort(Exception):
    """Base of every protocol abort of a secure-aggregation round."""


class UnexpectedMessage(SecAggAbort):
    """A message arrived that the current protocol state does not accept."""


class MalformedMessage(SecAggAbort):
    """A message field has the wrong type (e.g. a list where bytes belong)."""


class ReplayedMessage(SecAggAbort):
    """A message carries another job id or round number (replayed or misrouted)."""


class UnknownClient(SecAggAbort):
    """The server named a client that is not in the signed roster / cohort / neighbourhood."""


class DuplicateClient(SecAggAbort):
    """The server named one client twice in one list."""


class CohortMismatch(SecAggAbort):
    """The announced cohort does not match the configuration or omits this client."""


class ParameterMismatch(SecAggAbort):
    """The server announced round parameters (n, threshold, degree, length) unlike this client's."""


class GraphSeedMismatch(SecAggAbort):
    """The published neighbour-graph seed or degree is not the one every client derives."""


class UnsignedAdvertisement(SecAggAbort):
    """A key advertisement came without a signature."""


class ForgedAdvertisement(SecAggAbort):
    """A key advertisement's signature does not verify under the roster key of its client."""


class DuplicateAdvertisement(SecAggAbort):
    """Two advertisements share a public key (a key substituted or replayed across clients)."""


class TamperedShare(SecAggAbort):
    """A relayed share ciphertext fails authentication or names the wrong sender/receiver."""


class TooFewSurvivors(SecAggAbort):
    """Fewer than the threshold t of clients remain, so the round cannot go on safely."""


class RevivedDroppedClient(SecAggAbort):
    """The server lists as alive a client that had dropped out at an earlier stage."""


class ClientListedAsAliveAndDropped(SecAggAbort):
    """The server lists one client both among survivors and among the dropped."""


class SelfListedAsDropped(SecAggAbort):
    """The server lists this very client as dropped while talking to it."""


class ConsistencyCheckFailed(SecAggAbort):
    """Consistency-check signatures are missing, invalid, or cover different survivor lists."""


class BothSharesRequested(SecAggAbort):
    """Revealing a share would give the server both share kinds of one peer."""


class RevealRefused(SecAggAbort):
    """The client's own records forbid revealing (they cannot be read or written)."""


class UpdateAlreadySummed(RevealRefused):
    """This client's update (or one within a hair of it) was already unmasked in a sum
    over another survivor set: a second sum would give the server the difference,
    i.e. single updates."""


class ServerAborted(SecAggAbort):
    """The server told this client that the round failed."""


class TooFewInputs(SecAggAbort):
    """Fewer than ``min_clients`` masked inputs survived; no sum is produced."""


class ReconstructionFailed(SecAggAbort):
    """Too few (or inconsistent) shares came back to remove a mask; no sum is produced."""


__all__ = [
    "BothSharesRequested",
    "ClientListedAsAliveAndDropped",
    "CohortMismatch",
    "ConsistencyCheckFailed",
    "DuplicateAdvertisement",
    "DuplicateClient",
    "ForgedAdvertisement",
    "GraphSeedMismatch",
    "MalformedMessage",
    "ParameterMismatch",
    "ReconstructionFailed",
    "ReplayedMessage",
    "RevealRefused",
    "RevivedDroppedClient",
    "SecAggAbort",
    "SecAggConfigError",
    "SelfListedAsDropped",
    "ServerAborted",
    "TamperedShare",
    "TooFewInputs",
    "TooFewSurvivors",
    "UnexpectedMessage",
    "UnknownClient",
    "UnsignedAdvertisement",
    "UpdateAlreadySummed",
]
