"""Stage 0, advertise keys: the client checks the cohort and parameters before it says anything."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedge.secagg import (
    ClientSession,
    CohortMismatch,
    DuplicateClient,
    GraphSeedMismatch,
    Identity,
    ParameterMismatch,
    ReplayedMessage,
    SecAggConfigError,
    UnexpectedMessage,
    UnknownClient,
)
from fedge.secagg import messages as msgs

from .harness import Federation, attack

VICTIM = "site-002"


def test_advertise_aborts_on_request_replayed_from_an_earlier_round() -> None:
    fed = Federation(5, 4, alpha=0.0)
    err = attack(fed, VICTIM, msgs.AdvertiseRequest, lambda m: dataclasses.replace(m, round=2))
    assert isinstance(err, ReplayedMessage)
    assert "round 2" in str(err)


def test_advertise_aborts_on_request_for_another_job() -> None:
    fed = Federation(5, 4, alpha=0.0)
    err = attack(fed, VICTIM, msgs.AdvertiseRequest, lambda m: dataclasses.replace(m, job_id="x"))
    assert isinstance(err, ReplayedMessage)


def test_advertise_aborts_if_cohort_names_a_sybil_outside_the_roster() -> None:
    fed = Federation(5, 4, alpha=0.0)
    err = attack(
        fed,
        VICTIM,
        msgs.AdvertiseRequest,
        lambda m: dataclasses.replace(m, cohort=[*m.cohort[:-1], "mallory"]),
    )
    assert isinstance(err, UnknownClient) and "mallory" in str(err)


def test_advertise_aborts_if_cohort_lists_a_client_twice() -> None:
    fed = Federation(5, 4, alpha=0.0)
    err = attack(
        fed,
        VICTIM,
        msgs.AdvertiseRequest,
        lambda m: dataclasses.replace(m, cohort=[*m.cohort[:-1], m.cohort[0]]),
    )
    assert isinstance(err, DuplicateClient)


def test_advertise_aborts_if_cohort_leaves_this_client_out() -> None:
    fed = Federation(5, 4, alpha=0.0)
    err = attack(
        fed,
        VICTIM,
        msgs.AdvertiseRequest,
        lambda m: dataclasses.replace(
            m, cohort=[c for c in m.cohort if c != VICTIM] + fed.spares[:1]
        ),
    )
    assert isinstance(err, CohortMismatch)


@pytest.mark.parametrize(
    "change", [{"threshold": 2}, {"degree": 2}, {"vector_length": 5}]
)
def test_advertise_aborts_if_server_announces_weaker_parameters(change: dict) -> None:
    fed = Federation(5, 4, alpha=0.0)
    err = attack(fed, VICTIM, msgs.AdvertiseRequest, lambda m: dataclasses.replace(m, **change))
    assert isinstance(err, ParameterMismatch)
    assert next(iter(change)) in str(err)


def test_advertise_aborts_if_server_chooses_its_own_graph_seed() -> None:
    fed = Federation(10, 4, degree=4, threshold=3, alpha=0.0)
    err = attack(
        fed,
        VICTIM,
        msgs.AdvertiseRequest,
        lambda m: dataclasses.replace(m, graph_seed=bytes(32)),
    )
    assert isinstance(err, GraphSeedMismatch)


def test_message_out_of_order_is_refused_and_session_stays_aborted() -> None:
    fed = Federation(3, 4, alpha=0.0)
    client = fed.clients[VICTIM]
    early = msgs.UnmaskRequest(fed.job_id, fed.round, fed.ids, [], {})
    with pytest.raises(UnexpectedMessage, match="UnmaskRequest is not accepted in state R0"):
        client.receive(early, 0.0)
    assert client.state == "Aborted" and client.revealed_shares == {}
    opening = fed.server.start(0.0)[0][1]
    with pytest.raises(UnexpectedMessage, match="after the session aborted"):
        client.receive(opening, 0.0)


def test_advertisement_is_signed_with_the_enrolled_identity() -> None:
    from fedge.secagg import keys

    fed = Federation(3, 4, alpha=0.0)
    request = fed.server.start(0.0)[0][1]
    (advert,) = fed.clients[VICTIM].receive(request, 0.0)
    assert isinstance(advert, msgs.KeyAdvertisement)
    payload = keys.advertisement_payload(
        VICTIM, advert.enc_public, advert.mask_public, job_id=fed.job_id, round_=fed.round
    )
    assert keys.verify_signature(fed.roster.public_key(VICTIM), advert.signature, payload)
    assert advert.enc_public != advert.mask_public


def test_server_drops_a_client_whose_advertisement_is_forged() -> None:
    fed = Federation(5, 8, alpha=0.0)
    now = 0.0
    out = fed.server.start(now)
    for cid, request in out:
        (advert,) = fed.clients[cid].receive(request, now)
        if cid == VICTIM:
            advert = dataclasses.replace(advert, signature=bytes(64))
        fed.server.receive(cid, advert, now)
    assert fed.server.dropped == {VICTIM: "AdvertiseKeys"}
    assert fed.server.stage == "ShareKeys"


def test_client_refuses_bad_construction_arguments() -> None:
    fed = Federation(3, 4, alpha=0.0)
    ident = fed.identities[VICTIM]
    good = np.zeros(4, dtype=np.float32)
    with pytest.raises(SecAggConfigError, match="float32"):
        ClientSession(fed.config, fed.ctx, VICTIM, ident, fed.roster, good.astype(np.float64))
    with pytest.raises(SecAggConfigError, match=r"shape \(5,\)"):
        ClientSession(fed.config, fed.ctx, VICTIM, ident, fed.roster, np.zeros(5, np.float32))
    with pytest.raises(SecAggConfigError, match="NaN"):
        ClientSession(fed.config, fed.ctx, VICTIM, ident, fed.roster, good + np.nan)
    with pytest.raises(SecAggConfigError, match="not in the roster"):
        ClientSession(fed.config, fed.ctx, "mallory", ident, fed.roster, good)
    with pytest.raises(SecAggConfigError, match="does not match its key"):
        ClientSession(fed.config, fed.ctx, VICTIM, Identity.generate(), fed.roster, good)
