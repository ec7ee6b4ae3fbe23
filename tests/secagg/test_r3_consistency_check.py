"""Stage 3, consistency check: the client signs only a survivor list it can believe."""

from __future__ import annotations

import dataclasses

from fedge.secagg import (
    DuplicateClient,
    RevivedDroppedClient,
    SelfListedAsDropped,
    TooFewSurvivors,
    UnknownClient,
    keys,
)
from fedge.secagg import messages as msgs

from .harness import Federation, attack

VICTIM = "site-002"


def test_consistency_aborts_if_server_leaves_this_client_out_of_the_survivors() -> None:
    fed = Federation(5, 4, alpha=0.0)
    err = attack(
        fed,
        VICTIM,
        msgs.ConsistencyRequest,
        lambda m: dataclasses.replace(m, survivors=[c for c in m.survivors if c != VICTIM]),
    )
    assert isinstance(err, SelfListedAsDropped)


def test_consistency_aborts_if_server_revives_a_client_that_dropped_before_sharing() -> None:
    fed = Federation(6, 4, alpha=0.0)
    gone = "site-005"
    err = attack(
        fed,
        VICTIM,
        msgs.ConsistencyRequest,
        lambda m: dataclasses.replace(m, survivors=sorted([*m.survivors, gone])),
        drop={"share": {gone}},
    )
    assert isinstance(err, RevivedDroppedClient) and gone in str(err)


def test_consistency_aborts_on_a_survivor_listed_twice() -> None:
    fed = Federation(5, 4, alpha=0.0)
    err = attack(
        fed,
        VICTIM,
        msgs.ConsistencyRequest,
        lambda m: dataclasses.replace(m, survivors=[*m.survivors, m.survivors[0]]),
    )
    assert isinstance(err, DuplicateClient)


def test_consistency_aborts_on_a_survivor_outside_the_cohort() -> None:
    fed = Federation(5, 4, alpha=0.0)
    err = attack(
        fed,
        VICTIM,
        msgs.ConsistencyRequest,
        lambda m: dataclasses.replace(m, survivors=[*m.survivors, fed.spares[0]]),
    )
    assert isinstance(err, UnknownClient)


def test_consistency_aborts_if_fewer_than_threshold_survive() -> None:
    fed = Federation(5, 4, alpha=0.0)
    err = attack(
        fed,
        VICTIM,
        msgs.ConsistencyRequest,
        lambda m: dataclasses.replace(m, survivors=[VICTIM, "site-000"]),
    )
    assert isinstance(err, TooFewSurvivors)


def test_consistency_signature_covers_the_sorted_survivor_list() -> None:
    fed = Federation(4, 4, alpha=0.0)
    fed.run({"masked_input": {"site-003"}})
    signed = [(s, m) for s, m in fed.sent if isinstance(m, msgs.ConsistencySignature)]
    assert {s for s, _ in signed} == {"site-000", "site-001", "site-002"}
    payload = keys.consistency_payload(
        ["site-000", "site-001", "site-002"], job_id=fed.job_id, round_=fed.round
    )
    for sender, message in signed:
        assert keys.verify_signature(fed.roster.public_key(sender), message.signature, payload)
