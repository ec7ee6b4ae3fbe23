"""A false unmasking share in a committed round is audited (session 15).

SecAgg+ leaves a survivor's false unmasking share out of the sum when the shares
that agree outnumber it by t, and the round commits; the coordinator's audit log
names the sender ("false_unmask_share": job, round, site, whose secret), so a
security officer reading it sees the site, not only the coordinator's log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

from fedge.coordinator import checkpoint
from fedge.secagg import messages as msgs
from fedge.secagg import shamir
from fedge.wire import codec
from tests.coordinator.conftest import InProcFederation
from tests.secagg.test_s15_false_unmask_shares import PLAN, _shifted

SITES = ["aa", "h1", "h2", "h3", "h4"]  # n = 5: t = 3, every site holds every share


def _tamper_seed_share(fed: InProcFederation, liar: str, owner: str) -> dict[str, bool]:
    """``liar``'s agent sends, through the real codec, its share of ``owner``'s
    self-mask seed shifted so that the t lowest x's would give the seed + 1."""
    lied = {"done": False}

    async def send_frames(frames) -> None:
        env = codec.decode([bytes(f) for f in frames], max_bytes=1 << 30)
        body = env.body
        if isinstance(body, msgs.UnmaskShares) and owner in body.seed_shares:
            seeds = dict(body.seed_shares)
            x = shamir.share_x(seeds[owner])
            seeds[owner] = _shifted(seeds[owner], (x, x + 1, x + 2))  # 'aa': x = 1
            body = dataclasses.replace(body, seed_shares=seeds)
            lied["done"] = True
        out = codec.encode(body, sender=liar, job=env.header.job, round=env.header.round)
        fed.inbox.append((liar, [bytes(f) for f in out]))

    fed.agents[liar].send_frames = send_frames
    return lied


def test_a_false_seed_share_in_a_committed_round_is_audited_naming_its_sender(
        tmp_path: Path) -> None:
    fed = InProcFederation(tmp_path / "coord", SITES)
    try:
        lied = _tamper_seed_share(fed, "aa", "h1")

        async def go() -> str:
            await fed.heartbeats()
            job = fed.coord.submit_job(PLAN, actor="test")
            await fed.pump_alive(until=lambda: fed.coord.store.job(job).status
                                 in ("completed", "failed"), max_steps=4000)
            return job

        job = asyncio.run(go())
        assert lied["done"]
        store = fed.coord.store
        assert store.job(job).status == "completed", store.job(job).error
        committed = [r for r in store.rounds(job) if r.status == "committed"]
        assert [r.survivors for r in committed] == [SITES]
        assert checkpoint.final_path(fed.coord.state_dir, job).exists()

        found = store.audit_log(action="false_unmask_share", job=job)
        assert len(found) == 1
        detail = json.loads(found[0]["detail"])
        assert (detail["job"], detail["round"], detail["site"]) == (job, 1, "aa")
        assert detail["secrets"] == ["h1's self-mask seed"]
        assert detail["owners"] == ["h1"]
        assert detail["reason"].startswith(
            "aa's unmasking share of h1's self-mask seed did not fit the other shares and "
            "was left out of the sum")
    finally:
        fed.pool.shutdown(wait=True)
        fed.coord.close()
