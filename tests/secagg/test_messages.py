"""Message vocabulary: field types are checked; the diagrams come from the tables."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedge.secagg import CLIENT_TRANSITIONS, SERVER_TRANSITIONS, MalformedMessage
from fedge.secagg import messages as msgs
from fedge.secagg.diagram import client_mermaid, server_mermaid

from .harness import Federation


def test_every_message_carries_job_and_round() -> None:
    for cls in msgs.MESSAGE_TYPES.values():
        names = [f.name for f in dataclasses.fields(cls)]
        assert names[:2] == ["job_id", "round"], cls.__name__


def test_client_refuses_a_message_with_a_field_of_the_wrong_type() -> None:
    fed = Federation(3, 4, alpha=0.0)
    request = fed.server.start(0.0)[0][1]
    bad = dataclasses.replace(request, cohort="site-000,site-001")
    with pytest.raises(MalformedMessage, match=r"AdvertiseRequest.cohort should be list"):
        fed.clients["site-000"].receive(bad, 0.0)


@pytest.mark.parametrize(
    "bad",
    [
        msgs.RelayedShares("j", 3, {"site-001": "text, not bytes"}),
        msgs.RelayedShares("j", True, {}),
        msgs.UnmaskRequest("j", 3, ["a"], [7], {}),  # type: ignore[list-item]
        "not a message",
    ],
)
def test_check_fields_names_the_bad_field(bad: object) -> None:
    with pytest.raises(MalformedMessage):
        msgs.check_fields(bad)


def test_server_discards_a_malformed_client_message() -> None:
    fed = Federation(3, 4, alpha=0.0)
    fed.server.start(0.0)
    bad = msgs.MaskedInput("job-brca", 3, "site-000", masked=[1, 2, 3])  # type: ignore[arg-type]
    assert fed.server.receive("site-000", bad, 0.0) == []
    assert fed.server.discarded == 1


def test_masked_input_field_is_a_uint32_array() -> None:
    fed = Federation(3, 16, alpha=0.0)
    fed.run()
    (masked,) = [m for s, m in fed.sent if isinstance(m, msgs.MaskedInput) and s == "site-001"]
    msgs.check_fields(masked)
    assert isinstance(masked.masked, np.ndarray) and masked.masked.dtype == np.uint32


def test_state_diagrams_are_generated_from_the_transition_tables() -> None:
    client = client_mermaid()
    for (state, message), nxt in CLIENT_TRANSITIONS.items():
        assert f"{state} --> {nxt}: {message}" in client
    server = server_mermaid()
    for stage, (message, nxt) in SERVER_TRANSITIONS.items():
        assert f"{stage} --> {nxt}: all {message} in" in server
