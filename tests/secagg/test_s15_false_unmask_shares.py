"""A survivor that sends a false share at unmasking (M2, session 15).

The attack: a share of an honest survivor's self-mask seed shifted by the inverse of
its Lagrange weight, so that interpolation over the first t shares gives seed + 1, a
well-formed 16-byte seed; the server would remove the wrong mask and the sum would be
noise. The server now waits for every site asked and checks each secret's shares
against one another: a false share is left out and its sender named when the shares
that agree outnumber it by t, and otherwise the round fails instead of summing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os

import numpy as np
import pytest

from fedge.coordinator import checkpoint
from fedge.secagg import ReconstructionFailed, shamir
from fedge.secagg import messages as msgs
from fedge.wire import codec
from tests.coordinator.conftest import InProcFederation, synthetic_secure_plan

from .harness import Federation

VICTIM = "site-002"


def _shifted(share: bytes, base: tuple[int, ...]) -> bytes:
    """``share`` moved so that interpolating at 0 over the x's ``base`` gives the
    secret + 1 (still a well-formed 16-byte seed, so no size check sees it)."""
    x, y = shamir._decode(share)
    weight = shamir._lagrange_at_zero(base)[base.index(x)]
    y = (y + pow(weight, -1, shamir.PRIME)) % shamir.PRIME
    return share[:2] + y.to_bytes(len(share) - 2, "big")


def _lie_about(fed: Federation, liar: str, owner: str = VICTIM):
    """A mangle for ``_drive``: ``liar`` shifts its share of ``owner``'s seed."""
    t = fed.config.threshold
    base = tuple(range(1, t + 1))  # the t lowest x's the old server interpolated
    assert fed.server.index[liar] in base
    lied = {"done": False}

    def mangle(sender: str, reply: object) -> list[tuple[str, object]]:
        if sender == liar and isinstance(reply, msgs.UnmaskShares):
            seeds = dict(reply.seed_shares)
            seeds[owner] = _shifted(seeds[owner], base)
            reply = dataclasses.replace(reply, seed_shares=seeds)
            lied["done"] = True
        return [(sender, reply)]

    return mangle, lied


def _drive(fed: Federation, mangle):
    now = 0.0
    queue = list(fed.server.start(now))
    for _ in range(20):
        while queue:
            recipient, message = queue.pop(0)
            for reply in fed.clients[recipient].receive(message, now):
                for sender, body in mangle(recipient, reply):
                    queue += fed.server.receive(sender, body, now)
        if fed.server.done:
            return fed.server
        now += fed.config.stage_timeout + 1
        queue += fed.server.tick(now)
    raise AssertionError("round did not finish")


# --- shamir.recover -----------------------------------------------------------------

def _forge(share: bytes, delta: int = 1) -> bytes:
    _, y = shamir._decode(share)
    return share[:2] + ((y + delta) % shamir.PRIME).to_bytes(len(share) - 2, "big")


@pytest.mark.parametrize(("n", "t", "false"), [(5, 3, 1), (7, 3, 2), (30, 17, 6), (4, 1, 1)])
def test_recover_leaves_out_false_shares_the_others_outnumber_by_t_and_names_them(
        n: int, t: int, false: int) -> None:
    secret = os.urandom(16)
    shares = shamir.split(secret, range(1, n + 1), t)
    liars = set(range(2, 2 + false))
    given = [_forge(s, 7 + x) if x in liars else s for x, s in shares.items()]
    assert shamir.recover(given, t, 16) == (secret, tuple(sorted(liars)))


def test_recover_refuses_shares_that_disagree_when_too_few_agree_to_tell() -> None:
    """t + 1 shares, one false: any t of them fit a polynomial, so the false one
    cannot be told; the shares are refused, never combined."""
    shares = shamir.split(os.urandom(16), [1, 2, 3, 4], 3)
    given = [shares[1], _forge(shares[2]), shares[3], shares[4]]
    with pytest.raises(shamir.InconsistentShares, match="too few agree") as caught:
        shamir.recover(given, 3, 16)
    assert caught.value.xs == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="do not lie on one polynomial"):
        shamir.combine(given, 3, 16)


def test_recover_cannot_see_a_false_share_among_exactly_t() -> None:
    """The limit, as documented: t values always fit a polynomial of degree t - 1."""
    secret = os.urandom(16)
    shares = shamir.split(secret, [1, 2, 3], 3)
    got, false = shamir.recover([_shifted(shares[1], (1, 2, 3)), shares[2], shares[3]], 3, 16)
    assert false == () and int.from_bytes(got, "big") == int.from_bytes(secret, "big") + 1


def test_recover_with_every_share_true_names_nobody() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, range(1, 11), 6)
    assert shamir.recover(shares.values(), 6, 32) == (secret, ())


# --- the server -------------------------------------------------------------------

def test_unmask_leaves_out_a_shifted_seed_share_names_its_sender_and_sums_exactly(
        caplog: pytest.LogCaptureFixture) -> None:
    """n = 5, t = 3: five shares of the victim's seed, one false; the other four
    outnumber it by 3, so the server sums exactly and names the liar."""
    fed = Federation(5, 16, alpha=0.0, threshold=3, delta=0.4)
    liar = "site-000"
    mangle, lied = _lie_about(fed, liar)
    with caplog.at_level(logging.WARNING, logger="fedge.secagg.server"):
        server = _drive(fed, mangle)
    assert lied["done"]
    assert server.result is not None, server.failure
    assert server.result.survivors == fed.ids
    np.testing.assert_array_equal(server.result.total, fed.expected_sum(fed.ids))
    assert server.result.false_shares == {liar: [f"{VICTIM}'s self-mask seed"]}
    assert f"false unmasking shares, left out, came from 1 site(s): {liar} (of " \
           f"{VICTIM}'s self-mask seed)" in caplog.text


def test_unmask_fails_rather_than_remove_a_wrong_mask_when_the_false_share_cannot_be_told(
) -> None:
    """n = 4, t = 3: four shares, one false. It is seen but cannot be told from the
    others: the round fails, naming the secret and its holders, and no sum exists."""
    fed = Federation(4, 16, alpha=0.0, threshold=3, delta=0.2)
    mangle, lied = _lie_about(fed, "site-001")
    server = _drive(fed, mangle)
    assert lied["done"]
    assert server.result is None
    assert isinstance(server.failure, ReconstructionFailed)
    assert str(server.failure).startswith(
        f"cannot recover the secret of {VICTIM!r} (self-mask seed): its shares from "
        "site-000, site-001, site-002, site-003 disagree: the 4 shares do not lie on one "
        "polynomial of degree 2")
    assert "one or more of them sent a false share" in str(server.failure)


def test_unmask_at_its_deadline_needs_only_t_answers() -> None:
    """Waiting for every site costs a silent one no more than the stage deadline:
    then the t answers in are enough."""
    fed = Federation(4, 16, alpha=0.0, threshold=3, delta=0.2)

    def silent(sender: str, reply: object) -> list[tuple[str, object]]:
        if sender == "site-003" and isinstance(reply, msgs.UnmaskShares):
            return []
        return [(sender, reply)]

    server = _drive(fed, silent)
    assert server.result is not None, server.failure
    np.testing.assert_array_equal(server.result.total, fed.expected_sum(fed.ids))


# --- the coordinator, with real agents --------------------------------------------

PLAN = synthetic_secure_plan(secagg_stage_s=3)


def _run(fed: InProcFederation) -> str:
    async def go() -> str:
        await fed.heartbeats()
        job = fed.coord.submit_job(PLAN, actor="test")
        await fed.pump_alive(until=lambda: fed.coord.store.job(job).status
                             in ("completed", "failed"), max_steps=4000)
        return job
    return asyncio.run(go())


def _tamper_seed_share(fed: InProcFederation, liar: str, owner: str) -> dict[str, bool]:
    """``liar``'s agent sends, through the real codec, a shifted share of ``owner``'s
    seed (the malicious-site reviewer's tamper hook)."""
    lied = {"done": False}

    async def send_frames(frames) -> None:
        env = codec.decode([bytes(f) for f in frames], max_bytes=1 << 30)
        body = env.body
        if isinstance(body, msgs.UnmaskShares) and owner in body.seed_shares:
            seeds = dict(body.seed_shares)
            x = shamir.share_x(seeds[owner])
            seeds[owner] = _shifted(seeds[owner], (x, x + 1))  # x = 1 sorts first
            body = dataclasses.replace(body, seed_shares=seeds)
            lied["done"] = True
        out = codec.encode(body, sender=liar, job=env.header.job, round=env.header.round)
        fed.inbox.append((liar, [bytes(f) for f in out]))

    fed.agents[liar].send_frames = send_frames
    return lied


def test_a_site_shifting_a_seed_share_in_a_three_site_round_commits_no_model(tmp_path) -> None:
    """The reviewer's repro: three sites, t = 2, 'aa' (x = 1) shifts h1's seed share.
    The job used to commit a random model; now the attempt fails, saying why."""
    fed = InProcFederation(tmp_path / "coord", ["aa", "h1", "h2"])
    try:
        lied = _tamper_seed_share(fed, "aa", "h1")
        job = _run(fed)
        assert lied["done"]
        record = fed.coord.store.job(job)
        assert record.status == "failed"
        assert "ReconstructionFailed: cannot recover the secret of 'h1' (self-mask seed): " \
               "its shares from aa, h1, h2 disagree" in record.error
        assert not checkpoint.final_path(fed.coord.state_dir, job).exists()
    finally:
        fed.pool.shutdown(wait=True)
        fed.coord.close()
