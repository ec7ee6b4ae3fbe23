"""Stage 4, unmasking: one share kind per peer, and only for lists that match what was signed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedge.secagg import (
    ClientListedAsAliveAndDropped,
    ConsistencyCheckFailed,
    DuplicateClient,
    RevivedDroppedClient,
    SelfListedAsDropped,
    UnexpectedMessage,
    UnknownClient,
    keys,
)
from fedge.secagg import messages as msgs

from .harness import Federation, attack, revealed_kinds

VICTIM = "site-002"
TARGET = "site-004"


def _fed() -> Federation:
    return Federation(6, 8, alpha=0.0, threshold=4, delta=0.3)


def test_unmask_aborts_if_server_lists_client_as_both_alive_and_dropped() -> None:
    fed = _fed()
    err = attack(
        fed,
        VICTIM,
        msgs.UnmaskRequest,
        lambda m: dataclasses.replace(m, dropped=[*m.dropped, TARGET]),
    )
    assert isinstance(err, ClientListedAsAliveAndDropped) and TARGET in str(err)
    assert fed.clients[VICTIM].revealed_shares == {}


def test_unmask_aborts_if_server_drops_a_client_whose_masked_input_it_holds() -> None:
    # the classic attack: TARGET's input is in the sum; asking for its mask key
    # (as "dropped") together with others' seed shares would unmask it alone
    fed = _fed()
    err = attack(
        fed,
        VICTIM,
        msgs.UnmaskRequest,
        lambda m: dataclasses.replace(
            m,
            survivors=[c for c in m.survivors if c != TARGET],
            dropped=[*m.dropped, TARGET],
        ),
    )
    assert isinstance(err, ClientListedAsAliveAndDropped)
    assert "signed survivor list" in str(err)


def test_unmask_aborts_if_server_lists_this_client_as_dropped() -> None:
    fed = _fed()
    err = attack(
        fed,
        VICTIM,
        msgs.UnmaskRequest,
        lambda m: dataclasses.replace(
            m, survivors=[c for c in m.survivors if c != VICTIM], dropped=[*m.dropped, VICTIM]
        ),
    )
    assert isinstance(err, SelfListedAsDropped)


def test_unmask_aborts_if_server_revives_a_client_dropped_earlier() -> None:
    fed = _fed()
    gone = "site-005"
    err = attack(
        fed,
        VICTIM,
        msgs.UnmaskRequest,
        lambda m: dataclasses.replace(
            m, survivors=sorted([*m.survivors, gone]), dropped=[c for c in m.dropped if c != gone]
        ),
        drop={"masked_input": {gone}},
    )
    assert isinstance(err, RevivedDroppedClient) and gone in str(err)


def test_unmask_aborts_on_survivor_list_shorter_than_the_signed_one() -> None:
    fed = _fed()
    err = attack(
        fed,
        VICTIM,
        msgs.UnmaskRequest,
        lambda m: dataclasses.replace(m, survivors=[c for c in m.survivors if c != TARGET]),
    )
    assert isinstance(err, ConsistencyCheckFailed)


@pytest.mark.parametrize("where", ["survivors", "dropped"])
def test_unmask_aborts_on_a_client_listed_twice(where: str) -> None:
    fed = _fed()

    def twice(m: msgs.UnmaskRequest) -> msgs.UnmaskRequest:
        lst = getattr(m, where) or [TARGET]
        return dataclasses.replace(m, **{where: [*lst, lst[0]]})

    assert isinstance(attack(fed, VICTIM, msgs.UnmaskRequest, twice), DuplicateClient)


def test_unmask_aborts_on_a_client_outside_the_cohort() -> None:
    fed = _fed()
    err = attack(
        fed,
        VICTIM,
        msgs.UnmaskRequest,
        lambda m: dataclasses.replace(m, dropped=[*m.dropped, "mallory"]),
    )
    assert isinstance(err, UnknownClient)


def test_unmask_aborts_on_a_forged_consistency_signature() -> None:
    fed = _fed()
    err = attack(
        fed,
        VICTIM,
        msgs.UnmaskRequest,
        lambda m: dataclasses.replace(m, signatures={**m.signatures, TARGET: bytes(64)}),
    )
    assert isinstance(err, ConsistencyCheckFailed) and TARGET in str(err)


def test_unmask_aborts_if_peers_signed_a_different_survivor_list() -> None:
    # split view: the server told TARGET another survivor list than VICTIM
    fed = _fed()

    def split_view(m: msgs.UnmaskRequest) -> msgs.UnmaskRequest:
        other = [c for c in m.survivors if c != "site-000"]
        payload = keys.consistency_payload(other, job_id=fed.job_id, round_=fed.round)
        sig = fed.identities[TARGET].sign(payload)
        return dataclasses.replace(m, signatures={**m.signatures, TARGET: sig})

    err = attack(fed, VICTIM, msgs.UnmaskRequest, split_view)
    assert isinstance(err, ConsistencyCheckFailed) and "same survivor list" in str(err)


def test_unmask_aborts_with_fewer_consistency_signatures_than_the_threshold() -> None:
    fed = _fed()
    err = attack(
        fed,
        VICTIM,
        msgs.UnmaskRequest,
        lambda m: dataclasses.replace(
            m, signatures={c: s for c, s in list(m.signatures.items())[:3]}
        ),
    )
    assert isinstance(err, ConsistencyCheckFailed) and "threshold is 4" in str(err)


def test_unmask_aborts_on_signature_from_a_non_survivor() -> None:
    fed = _fed()
    gone = "site-005"

    def extra(m: msgs.UnmaskRequest) -> msgs.UnmaskRequest:
        payload = keys.consistency_payload(m.survivors, job_id=fed.job_id, round_=fed.round)
        return dataclasses.replace(
            m, signatures={**m.signatures, gone: fed.identities[gone].sign(payload)}
        )

    err = attack(fed, VICTIM, msgs.UnmaskRequest, extra, drop={"masked_input": {gone}})
    assert isinstance(err, ConsistencyCheckFailed) and "non-survivor" in str(err)


def test_unmask_reveals_seed_shares_of_survivors_and_key_shares_of_the_dropped_only() -> None:
    fed = _fed()
    gone = "site-005"
    server = fed.run({"masked_input": {gone}})
    assert server.result is not None
    survivors = [c for c in fed.ids if c != gone]
    np.testing.assert_array_equal(server.result.total, fed.expected_sum(survivors))
    for _sender, message in fed.sent:
        if isinstance(message, msgs.UnmaskShares):
            assert set(message.seed_shares) == set(survivors)
            assert set(message.mask_key_shares) == {gone}
    assert all(len(kinds) == 1 for kinds in revealed_kinds(fed.sent).values())


def test_second_unmask_request_is_refused_so_no_peer_gets_both_shares() -> None:
    fed = _fed()
    requests: dict[str, msgs.UnmaskRequest] = {}

    def keep(recipient: str, message: object) -> None:
        if isinstance(message, msgs.UnmaskRequest):
            requests[recipient] = message

    fed.run(tamper=keep)
    first = requests[VICTIM]
    second = dataclasses.replace(
        first,
        survivors=[c for c in first.survivors if c != TARGET],
        dropped=[*first.dropped, TARGET],
    )
    client = fed.clients[VICTIM]
    assert client.state == "Completed"
    with pytest.raises(UnexpectedMessage):
        client.receive(second, 99.0)
    assert client.revealed_shares[TARGET] == "seed"
    assert all(len(kinds) == 1 for kinds in revealed_kinds(fed.sent).values())


def test_client_guard_refuses_to_reveal_a_second_share_kind_for_one_peer() -> None:
    # defence in depth below the list checks: the reveal ledger itself refuses
    from fedge.secagg import BothSharesRequested

    fed = _fed()
    client = fed.clients[VICTIM]
    client._reveal(TARGET, "seed")
    client._reveal(TARGET, "seed")  # the same kind again is harmless
    with pytest.raises(BothSharesRequested, match=TARGET):
        client._reveal(TARGET, "mask_key")
    assert client.revealed_shares == {TARGET: "seed"}
