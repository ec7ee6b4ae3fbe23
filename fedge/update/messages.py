"""Update-fetch messages: an agent pulls TUF metadata and targets, in chunks,
over its existing connection to the coordinator.

The runtime registers both with the wire codec (`fedge.wire.messages`). Fields
use only str/int/bytes/bool so the generic codec serialises them.

Chunking is what makes the endless-data attack harmless: the agent asks for at
most `length` bytes from `offset`; a reply longer than asked is rejected, and
python-tuf stops reading once a file passes its length bound.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CHUNK = 1 << 20  # largest chunk a coordinator will send in one reply

# Values of UpdateFetchReply.error ("" means success).
ERROR_NOT_FOUND = "not_found"
ERROR_BAD_REQUEST = "bad_request"


@dataclass(frozen=True)
class UpdateFetchRequest:
    path: str  # "metadata/<file>" or "targets/<kind>/<name>/<version>/<sha256>.<file>"
    offset: int
    length: int


@dataclass(frozen=True)
class UpdateFetchReply:
    path: str
    offset: int
    data: bytes
    eof: bool
    error: str = ""


# Roll-out: the coordinator tells one agent to install a verified target now; the
# agent answers with the outcome (after its health check, for software). These two
# are registered with the codec here; the fetch pair above by fedge.wire.messages.
def _register_rollout() -> None:
    from fedge.wire.codec import message

    message("update.available")(UpdateAvailable)
    message("update.outcome")(UpdateOutcome)


@dataclass(frozen=True)
class UpdateAvailable:
    rollout_id: str
    path: str  # the TUF target path to install ("model/risk/3/model.onnx")


@dataclass(frozen=True)
class UpdateOutcome:
    rollout_id: str
    path: str
    ok: bool
    rolled_back: bool
    detail: str


# How the detail of an outcome begins when the agent could not fetch the update over its
# connection (requests unanswered after its retries, the connection lost): the name of
# the agent's exception (`fedge.agent.updates.FetchTransportError`). Nothing was
# installed, and the roll-out asks that site again rather than stopping. Said in the
# detail, not a new field: the codec refuses unknown fields, so an outcome with one
# would be refused whole by the previous release's coordinator, which reads this one
# as the failed install it always reported.
TRANSPORT_FAILURE = "FetchTransportError"


def transport_failure(outcome: UpdateOutcome) -> bool:
    """Whether `outcome` says the agent could not fetch the update (`TRANSPORT_FAILURE`),
    as opposed to a refused or failed install."""
    return not outcome.ok and outcome.detail.startswith(f"{TRANSPORT_FAILURE}: ")


_register_rollout()
