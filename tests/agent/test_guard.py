"""What an appliance refuses a coordinator, whatever it asks: real Agents, the real
SecAgg+ ServerSession, real wire encoding. Each attack here gave a coordinator one
hospital's exact update before the agent held the line (fedge.agent.guard)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fedge.agent.guard import (
    PrivacyPolicy,
    PrivacyPolicyError,
    RevealLog,
    RevealLogError,
    update_digest,
)
from fedge.agent.process import AgentConfigError, load_config
from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer
from fedge.coordinator.checkpoint import model_digest
from fedge.coordinator.plan import parse_plan
from fedge.coordinator.rounds import context_digest
from fedge.coordinator.secure import secagg_config
from fedge.secagg import RoundContext, ServerSession
from fedge.secagg.errors import UpdateAlreadySummed
from fedge.secagg.keys import Identity, Roster
from fedge.wire import codec
from fedge.wire import messages as m
from tests.agent.test_runtime import PLAN

SECURE = PLAN.replace("enabled = false", "enabled = true")  # test_runtime's plan
PLAIN = PLAN
SITES = ["site-a", "site-b", "site-c"]
D = 8
JOB, RND = "job1", 1
SCALE = 0.0025
# min_cohort 2 (the default is 3): the tests that use it check another rule (the
# reveal log, DP-FedAvg's cohort) on a sum of two, which the default would refuse first
SUMS_OF_TWO = PrivacyPolicy(min_cohort=2)


class Fleet:
    """Three enrolled agents and a coordinator played by the test."""

    def __init__(self, policy: PrivacyPolicy | None = None, tmp: Path | None = None) -> None:
        console = Identity.generate()
        ids = {s: Identity.generate() for s in SITES}
        self.roster = Roster.build({s: i.public_bytes() for s, i in ids.items()}, console,
                                   serial=1)
        self.inbox: list[tuple[str, object]] = []
        self.agents: dict[str, Agent] = {}
        for s in SITES:
            log = RevealLog(tmp / s / "revealed.jsonl") if tmp is not None else None
            a = Agent(s, SyntheticTrainer(s), identity=ids[s], roster=self.roster,
                      roster_key=console.public_bytes(), policy=policy, reveal_log=log)

            async def send(frames, s=s):
                body = codec.decode([bytes(f) for f in frames], max_bytes=1 << 24).body
                self.inbox.append((s, body))

            a.send_frames = send
            self.agents[s] = a
        self.weights = np.zeros(D, np.float32)
        self.plan_text = SECURE

    async def deliver(self, site: str, body: object) -> None:
        frames = [bytes(f) for f in codec.encode(body, sender="coordinator", job=JOB,
                                                  round=RND)]
        await self.agents[site].handle_frames(frames)

    def refusals(self) -> dict[str, str]:
        return {s: b.reason for s, b in self.inbox if isinstance(b, m.TaskRefused)}

    async def train(self, sites: list[str], task_id: str, plan: str = SECURE,
                    weights: dict[str, np.ndarray] | None = None) -> None:
        self.inbox.clear()
        self.plan_text = plan
        for s in sites:
            w = self.weights if weights is None else weights[s]
            await self.deliver(s, m.TrainTask(
                task_id=task_id, plan=plan, weights=w,
                model_digest=bytes.fromhex(model_digest(self.weights)), train_seed=42,
                quant_seed=b"\x01" * 16))

    async def aggregate(self, cohort: list[str], task_id: str,
                        scales: dict[str, float] | None = None,
                        absent: frozenset[str] = frozenset()) -> np.ndarray | None:
        """The coordinator's side of one secure aggregation; the unmasked total or None.
        Sites in ``absent`` are never asked: they drop out at the stage deadlines."""
        self.inbox.clear()
        plan = parse_plan(self.plan_text)  # the plan the sites trained under
        cfg = secagg_config(plan, len(cohort), self.weights.size + 1)
        bound = context_digest(bytes.fromhex(model_digest(self.weights)), self.plan_text,
                               SCALE, cohort, None)
        server = ServerSession(cfg, RoundContext(JOB, RND, bound), cohort, self.roster)
        for s in [s for s in cohort if s not in absent]:
            scale = SCALE if scales is None else scales[s]
            await self.deliver(s, m.AggregateBegin(task_id=task_id, cohort=cohort,
                                                   weight_scale=scale, secure=True,
                                                   threshold=cfg.threshold))
        now = 0.0
        out = server.start(now)
        for _ in range(40):  # bounded: five stages, each perhaps closed by its deadline
            for site, msg in out:
                if site not in absent:
                    await self.deliver(site, msg)
            out = []
            pending, self.inbox = [(s, b) for s, b in self.inbox if m.is_secagg(b)], [
                (s, b) for s, b in self.inbox if not m.is_secagg(b)]
            if server.done:
                break
            if not pending:  # the stage deadline passes: whoever did not answer dropped
                now += 1e6
                out = server.tick(now)
                continue
            for site, body in pending:
                out += server.receive(site, body, now)
        return None if server.result is None else server.result.total


def run(coro):
    return asyncio.run(coro)


def test_a_second_sum_of_the_same_update_over_fewer_sites_is_refused(tmp_path: Path) -> None:
    fleet = Fleet(policy=SUMS_OF_TWO, tmp=tmp_path)

    async def attack():
        await fleet.train(SITES, "t1")
        first = await fleet.aggregate(SITES, "t1")
        assert first is not None  # the honest sum
        # the same task again without site-b: the difference would be site-b's update
        second = await fleet.aggregate(["site-a", "site-c"], "t1")
        return second, fleet.refusals()

    second, refused = run(attack())
    assert second is None
    assert set(refused) == {"site-a", "site-c"}
    assert all("UpdateAlreadySummed" in r and "already summed" in r for r in refused.values())


def test_a_retrained_round_summed_over_other_survivors_is_refused_the_same_ones_may_retry(
    tmp_path: Path,
) -> None:
    """The coordinator re-sends the round (deterministic training: the same update):
    over other survivors it is refused; over the very same ones (a coordinator that
    crashed after unmasking and retries) it gives the same sum again, nothing more."""
    fleet = Fleet(tmp=tmp_path)

    async def retries():
        await fleet.train(SITES, "t1")
        first = await fleet.aggregate(SITES, "t1")
        await fleet.train(["site-a", "site-c"], "t2")
        fewer = await fleet.aggregate(["site-a", "site-c"], "t2")
        refused = fleet.refusals()
        await fleet.train(SITES, "t3")
        same = await fleet.aggregate(SITES, "t3")
        return first, fewer, refused, same

    first, fewer, refused, same = run(retries())
    assert fewer is None and set(refused) == {"site-a", "site-c"}
    assert first is not None and same is not None
    np.testing.assert_array_equal(first, same)


def test_a_replayed_task_that_trains_differently_is_still_refused_over_other_survivors(
    tmp_path: Path,
) -> None:
    """Another thread count, CPU or library build trains the same task to other bits
    (a resnet moved 2 % between 1 and 2 threads): the coordinator replays round 1's
    task over fewer sites, each site's update comes out 5 % different, past the 1 %
    sketch rule, and is refused all the same, because it is the same task."""

    class Drifting(SyntheticTrainer):
        runs = 0

        def train(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = super().train(*args, **kwargs)
            self.runs += 1
            if self.runs > 1:  # as if on another machine: the update moves 5 %
                w = kwargs.get("weights", args[3] if len(args) > 3 else None)
                out.weights = (w + (out.weights - w) * np.float32(1.05)).astype(np.float32)
            return out

    fleet = Fleet(policy=SUMS_OF_TWO, tmp=tmp_path)
    for s, a in fleet.agents.items():
        a.trainer = Drifting(s)

    async def replay():
        await fleet.train(SITES, "t1")
        first = await fleet.aggregate(SITES, "t1")
        await fleet.train(["site-a", "site-c"], "t2")
        fewer = await fleet.aggregate(["site-a", "site-c"], "t2")
        return first, fewer, fleet.refusals()

    first, fewer, refused = run(replay())
    assert first is not None and fewer is None
    assert set(refused) == {"site-a", "site-c"}
    assert all("same task" in why for why in refused.values())


def test_the_record_survives_an_agent_restart(tmp_path: Path) -> None:
    fleet = Fleet(tmp=tmp_path)
    run(fleet.train(SITES, "t1"))
    assert run(fleet.aggregate(SITES, "t1")) is not None
    restarted = Fleet(tmp=tmp_path)  # same state dirs, fresh processes (and fresh keys)
    restarted.roster = fleet.roster
    for s, a in restarted.agents.items():
        a.identity, a.roster = fleet.agents[s].identity, fleet.roster

    async def again():
        await restarted.train(["site-a", "site-c"], "t2")
        return await restarted.aggregate(["site-a", "site-c"], "t2"), restarted.refusals()

    total, refused = run(again())
    assert total is None and set(refused) == {"site-a", "site-c"}


def test_a_plain_aggregation_is_refused_when_the_plan_enables_secure_aggregation() -> None:
    fleet = Fleet(policy=PrivacyPolicy(require_secure_aggregation=False))

    async def downgrade():
        await fleet.train(["site-a"], "t1")
        fleet.inbox.clear()
        await fleet.deliver("site-a", m.AggregateBegin(task_id="t1", cohort=SITES,
                                                       weight_scale=SCALE, secure=False,
                                                       threshold=2))
        return fleet.inbox

    sent = run(downgrade())
    assert not [b for _, b in sent if isinstance(b, m.PlainUpdate)]
    [(_, refusal)] = sent
    assert isinstance(refusal, m.TaskRefused) and "plain (unmasked)" in refusal.reason


def test_by_default_a_plan_without_secure_aggregation_is_refused() -> None:
    fleet = Fleet()  # the default policy: what agent.toml gives without [privacy]

    async def plain():
        await fleet.train(["site-a"], "t1", plan=PLAIN)
        return fleet.refusals()

    assert "require_secure_aggregation" in run(plain())["site-a"]
    allowed = Fleet(policy=PrivacyPolicy(require_secure_aggregation=False))
    run(allowed.train(["site-a"], "t1", plan=PLAIN))
    assert [b for _, b in allowed.inbox if isinstance(b, m.TrainDone)]


def test_a_zero_weight_scale_or_a_cohort_below_the_sites_minimum_is_refused() -> None:
    fleet = Fleet(policy=PrivacyPolicy(min_cohort=3))

    async def ask(cohort, scale):
        await fleet.train(["site-a"], "t1")
        fleet.inbox.clear()
        await fleet.deliver("site-a", m.AggregateBegin(task_id="t1", cohort=cohort,
                                                       weight_scale=scale, secure=True,
                                                       threshold=2))
        return fleet.refusals().get("site-a", "")

    assert "min_cohort 3" in run(ask(["site-a", "site-b"], SCALE))

    # a weight scale outside (0, 1] cannot even be decoded now: dropped, nothing sent
    async def raw(scale):
        await fleet.train(["site-a"], "t1")
        fleet.inbox.clear()
        frames = [bytes(f) for f in codec.encode(
            m.AggregateBegin(task_id="t1", cohort=SITES, weight_scale=SCALE, secure=True,
                             threshold=2), sender="coordinator", job=JOB, round=RND)]
        body = msgpack.unpackb(frames[1])
        body["weight_scale"] = scale
        await fleet.agents["site-a"].handle_frames([frames[0], msgpack.packb(body),
                                                    *frames[2:]])
        return list(fleet.inbox)

    for scale in (0.0, float("nan"), -1.0, 1.5):
        with pytest.raises(ValueError, match="weight_scale"):
            m.AggregateBegin(task_id="t1", cohort=SITES, weight_scale=scale, secure=True,
                             threshold=2)
        assert run(raw(scale)) == [], scale
    for scale in (0.0, float("nan")):  # and the agent's own floor, behind the decoder
        assert "weight_scale" in (PrivacyPolicy().refuse_aggregation(
            plan_secure=True, secure=True, cohort=3, weight_scale=scale,
            client_dp_cohort=None) or "")


def test_a_weight_scale_that_differs_between_sites_gives_noise_not_one_sites_update() -> None:
    """Weight 0 for all but site-a would make the sum site-a's update; the scale is
    part of the masks' context, so sites given different scales do not cancel."""
    fleet = Fleet()

    async def isolate():
        await fleet.train(SITES, "t1")
        return await fleet.aggregate(SITES, "t1", scales={"site-a": SCALE, "site-b": 1e-9,
                                                          "site-c": 1e-9})

    assert run(isolate()) is None
    refused = fleet.refusals()
    assert set(refused) == set(SITES)  # keyed for another context: nothing opens
    assert all(r.startswith("TamperedShare") for r in refused.values())


def test_a_task_whose_model_digest_is_not_its_weights_is_refused() -> None:
    """Different models to different sites under one digest: each site checks."""
    fleet = Fleet()
    other = np.full(D, 0.3, np.float32)
    run(fleet.train(["site-a"], "t1", weights={"site-a": other}))
    assert "model digest does not match" in fleet.refusals()["site-a"]


def test_dp_fedavg_noise_drawn_for_a_larger_cohort_is_withheld() -> None:
    fleet = Fleet()
    plan = SECURE + "[privacy.client_dp]\nclip_norm = 1.0\nnoise_multiplier = 0.5\n" \
                    "cohort_size = 10\n"

    async def ask():
        await fleet.train(["site-a"], "t1", plan=plan)
        assert [b for _, b in fleet.inbox if isinstance(b, m.TrainDone)], fleet.inbox
        fleet.inbox.clear()
        await fleet.deliver("site-a", m.AggregateBegin(task_id="t1", cohort=SITES,
                                                       weight_scale=SCALE, secure=True,
                                                       threshold=2))
        return fleet.refusals()["site-a"]

    assert "cohort of 10" in run(ask())


def test_reveal_log_on_disk_refuses_another_set_and_never_forgets(tmp_path: Path) -> None:
    path = tmp_path / "secagg" / "revealed.jsonl"
    update = np.linspace(-1, 1, 50).astype(np.float32)
    digest = update_digest(update, 7)
    log = RevealLog(path)
    log.check_and_record(digest, ["b", "a"], update)
    log.check_and_record(digest, ["a", "b"], update)  # the same set, in any order
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(UpdateAlreadySummed):
        RevealLog(path).check_and_record(digest, ["a"], update)
    other = update_digest(update, 8)  # the same values, another count: its own record
    RevealLog(path).check_and_record(other, ["a"], None)
    many = RevealLog(path)  # a long life: old records are never evicted
    for i in range(1030):  # past the 1024 the first version kept
        many.check_and_record(i.to_bytes(32, "big"), ["a", "b"], None)
    with pytest.raises(UpdateAlreadySummed):
        RevealLog(path).check_and_record(digest, ["a", "c"], update)


def test_an_update_a_hair_from_one_already_summed_is_refused_a_new_one_is_not(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(3)
    update = rng.standard_normal(5000).astype(np.float32) * 0.01
    log = RevealLog(tmp_path / "revealed.jsonl")
    log.check_and_record(update_digest(update, 100), ["a", "b", "c"], update)
    hair = update + np.float32(1e-7)  # a model moved by a hair: new bits, same update
    with pytest.raises(UpdateAlreadySummed, match="within 1%"):
        RevealLog(tmp_path / "revealed.jsonl").check_and_record(
            update_digest(hair, 100), ["a", "c"], hair)
    fresh = rng.standard_normal(5000).astype(np.float32) * 0.01  # the next round's
    RevealLog(tmp_path / "revealed.jsonl").check_and_record(
        update_digest(fresh, 100), ["a", "c"], fresh)


def test_an_update_of_the_same_task_that_trained_differently_is_refused_over_other_sites(
    tmp_path: Path,
) -> None:
    """Training repeats bit for bit on one machine only: the same task (model, seed,
    plan) on another thread count moved a resnet's update 2 %, past the sketch's 1 %.
    The task itself is the key: over another survivor set it is refused whatever the
    update's bytes, over the same set it may go again, across restarts and a
    compaction; another task is free."""
    from fedge.agent.guard import task_digest

    rng = np.random.default_rng(5)
    update = rng.standard_normal(5000).astype(np.float32) * 0.01
    moved = update * np.float32(1.03)  # 3 %: another digest, beyond NEAR
    task = task_digest(job="j", round=2, plan="p", model_digest=b"\1" * 32, train_seed=7)
    path = tmp_path / "revealed.jsonl"
    RevealLog(path).check_and_record(update_digest(update, 9), ["a", "b", "c"], update,
                                     inputs=task)
    with pytest.raises(UpdateAlreadySummed, match="same task"):
        RevealLog(path).check_and_record(update_digest(moved, 9), ["a", "c"], moved,
                                         inputs=task)
    RevealLog(path).check_and_record(update_digest(moved, 9), ["a", "b", "c"], moved,
                                     inputs=task)
    log = RevealLog(path, sketches=1)
    assert log._rewrite_or_fail(path)  # compacted: the task rows are kept
    with pytest.raises(UpdateAlreadySummed, match="same task"):
        RevealLog(path).check_and_record(update_digest(moved * 2, 9), ["a", "c"],
                                         moved * 2, inputs=task)
    other = task_digest(job="j", round=3, plan="p", model_digest=b"\1" * 32, train_seed=7)
    fresh = rng.standard_normal(5000).astype(np.float32) * 0.01
    RevealLog(path).check_and_record(update_digest(fresh, 9), ["a", "c"], fresh,
                                     inputs=other)
    assert task != task_digest(job="j", round=2, plan="p", model_digest=b"\1" * 32,
                               train_seed=8)


def test_a_reveal_log_that_cannot_be_read_refuses_every_reveal_and_is_left_as_it_is(
    tmp_path: Path,
) -> None:
    path = tmp_path / "revealed.jsonl"
    path.write_text("{not json")
    log = RevealLog(path)
    with pytest.raises(RevealLogError, match="is corrupt"):
        log.check_and_record(b"\1" * 32, ["a", "b"], None)
    assert path.read_text() == "{not json"  # not reset: restored or moved aside by hand
    unreadable = tmp_path / "dir-not-file"
    unreadable.mkdir()
    with pytest.raises(RevealLogError, match="cannot be read"):
        RevealLog(unreadable).check_and_record(b"\1" * 32, ["a", "b"], None)


def test_the_reveal_log_appends_one_line_per_reveal_and_keeps_earlier_bytes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "revealed.jsonl"
    log = RevealLog(path)
    rng = np.random.default_rng(5)
    sizes = []
    for i in range(5):
        update = rng.standard_normal(300).astype(np.float32)
        before = path.read_bytes() if path.exists() else b""
        log.check_and_record(update_digest(update, i + 1), ["a", "b"], update)
        after = path.read_bytes()
        assert after.startswith(before)  # appended, never rewritten
        sizes.append(len(after) - len(before))
    assert path.read_bytes().count(b"\n") == 6  # a header and one line per reveal
    assert max(sizes[1:]) - min(sizes[1:]) < 40  # the same cost on the 5th as the 2nd
    assert path.stat().st_mode & 0o777 == 0o600


def test_each_reveal_is_on_disk_before_it_is_allowed(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A reveal allowed, then a power cut, must not come back as a log without it (the
    coordinator could then ask for a second sum): the first record is written atomically
    (file synced before the rename, directory after), each later one is an appended
    line synced before check_and_record returns."""
    path = tmp_path / "revealed.jsonl"
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))

    monkeypatch.setattr(os, "fsync", fsync)
    log = RevealLog(path)
    log.check_and_record(b"\1" * 32, ["a", "b"], None)
    (temp, temp_size), (directory, _) = synced
    assert Path(temp).parent == tmp_path and temp_size == path.stat().st_size
    assert not Path(temp).exists() and directory == str(tmp_path)
    for n in (2, 3):
        synced.clear()
        log.check_and_record(bytes([n]) * 32, ["a", "b"], None)
        # the log itself, synced with the new line in it
        assert synced == [(str(path), path.stat().st_size)]
        assert path.read_bytes().count(b"\n") == n + 1


def test_a_torn_last_line_is_dropped_and_cut_a_torn_middle_line_refuses_every_reveal(
    tmp_path: Path,
) -> None:
    path = tmp_path / "revealed.jsonl"
    update = np.linspace(-1, 1, 80).astype(np.float32)
    digest = update_digest(update, 3)
    RevealLog(path).check_and_record(digest, ["a", "b", "c"], update)
    whole = path.read_bytes()
    with path.open("ab") as f:  # a crash inside the next append: no newline
        f.write(b'{"digest":"ab12","surv')
    log = RevealLog(path)
    assert log.error is None
    with pytest.raises(UpdateAlreadySummed):  # the complete record still holds
        log.check_and_record(digest, ["a", "b"], update)
    other = update_digest(update * 3, 3)
    log.check_and_record(other, ["a", "b"], None)
    text = path.read_bytes()
    assert text.startswith(whole) and b"surv{" not in text and b'"ab12"' not in text
    assert RevealLog(path).error is None  # the torn bytes were cut, not glued on
    with pytest.raises(UpdateAlreadySummed):
        RevealLog(path).check_and_record(other, ["a", "c"], None)

    lines = text.split(b"\n")
    lines[1] = lines[1][:30]  # damage inside the file, not at its end
    path.write_bytes(b"\n".join(lines))
    damaged = path.read_bytes()
    with pytest.raises(RevealLogError, match=r"is corrupt \(line 2"):
        RevealLog(path).check_and_record(b"\2" * 32, ["a", "b"], None)
    assert path.read_bytes() == damaged  # left for a person to restore


def test_a_failed_append_records_nothing_and_the_next_one_starts_clean(
    tmp_path: Path,
) -> None:
    path = tmp_path / "revealed.jsonl"
    log = RevealLog(path)
    log.check_and_record(b"\1" * 32, ["a", "b"], None)
    path.rename(tmp_path / "kept")
    path.mkdir()  # the append cannot open the log
    with pytest.raises(OSError):
        log.check_and_record(b"\3" * 32, ["a", "b"], None)
    path.rmdir()
    (tmp_path / "kept").rename(path)
    log.check_and_record(b"\3" * 32, ["a", "c"], None)  # not remembered as summed
    with path.open("ab") as f:  # bytes of a write that failed half-way
        f.write(b'{"digest":"')
    log.check_and_record(b"\4" * 32, ["a", "b"], None)
    assert RevealLog(path).error is None
    with pytest.raises(UpdateAlreadySummed):
        RevealLog(path).check_and_record(b"\4" * 32, ["b", "c"], None)


def test_a_long_log_is_compacted_on_load_to_every_digest_and_the_newest_sketches(
    tmp_path: Path,
) -> None:
    path = tmp_path / "revealed.jsonl"
    rng = np.random.default_rng(4)
    updates = [rng.standard_normal(500).astype(np.float32) for _ in range(10)]
    log = RevealLog(path, sketches=4)
    for u in updates:
        log.check_and_record(update_digest(u, 5), ["a", "b"], u)
    assert path.read_bytes().count(b"\n") == 11
    RevealLog(path, sketches=4)  # 10 sketches on disk > 2 x 4: rewritten
    assert path.read_bytes().count(b"\n") == 1 + 10 + 4
    for u in updates:  # every digest is still refused over another set
        with pytest.raises(UpdateAlreadySummed, match="already summed over 2"):
            RevealLog(path, sketches=4).check_and_record(update_digest(u, 5), ["a"], u)
    newest = updates[-1] + np.float32(1e-6)
    with pytest.raises(UpdateAlreadySummed, match="within 1%"):
        RevealLog(path, sketches=4).check_and_record(update_digest(newest, 5), ["a"], newest)


def _legacy_log(path: Path, key: bytes, entries: dict[str, list[str]],
                sketches: list[tuple[np.ndarray, float, list[str]]]) -> None:
    """The whole-file JSON log the agent wrote before the append-only one."""
    path.write_text(json.dumps({
        "key": key.hex(), "sketch_scheme": 2,
        "entries": [{"digest": d, "survivors": s, "at": 1.0} for d, s in entries.items()],
        "sketches": [{"sketch": base64.b64encode(sk.astype("<f4").tobytes()).decode(),
                      "norm": n, "survivors": s} for sk, n, s in sketches]}, indent=2))


def test_the_whole_file_log_of_earlier_releases_is_taken_over_once(tmp_path: Path) -> None:
    legacy, path = tmp_path / "revealed.json", tmp_path / "revealed.jsonl"
    update = np.random.default_rng(9).standard_normal(2000).astype(np.float32)
    old = RevealLog()  # the old log's key makes the old sketches
    sketch = old.sketch(update)
    _legacy_log(legacy, old._key, {update_digest(update, 10).hex(): ["a", "b", "c"]},
                [(sketch, float(np.linalg.norm(update)), ["a", "b", "c"])])
    original = legacy.read_bytes()
    log = RevealLog(path, legacy=legacy)
    assert log.error is None and path.exists()
    assert (tmp_path / "revealed.json.migrated").read_bytes() == original
    # in its place a stub that the earlier release's loader (data["key"], then
    # data["entries"]) reads as corrupt: rolled back to, it refuses every reveal
    # rather than find no file and start with an empty log
    stub = json.loads(legacy.read_text())
    assert stub["moved_to"] == "revealed.jsonl" and "key" not in stub and "entries" not in stub
    with pytest.raises(UpdateAlreadySummed, match="already summed over 3"):
        log.check_and_record(update_digest(update, 10), ["a", "b"], update)
    hair = update + np.float32(1e-6)
    with pytest.raises(UpdateAlreadySummed, match="within 1%"):  # its sketch came too
        RevealLog(path, legacy=legacy).check_and_record(update_digest(hair, 10), ["a"], hair)

    # the new log lost (moved aside by hand, say): the stub names it, nothing revealed
    path.rename(tmp_path / "aside.jsonl")
    with pytest.raises(RevealLogError, match=r"revealed\.jsonl is missing, and .*revealed\.json "
                                             r"says the log was moved there"):
        RevealLog(path, legacy=legacy).check_and_record(b"\1" * 32, ["a", "b"], None)

    broken = tmp_path / "b" / "revealed.json"
    broken.parent.mkdir()
    broken.write_text('{"key": "00", "entries": [{"digest": 5}]}')
    with pytest.raises(RevealLogError, match=r"revealed.json is corrupt"):
        RevealLog(broken.with_suffix(".jsonl"), legacy=broken).check_and_record(
            b"\1" * 32, ["a", "b"], None)
    assert broken.exists() and not broken.with_suffix(".jsonl").exists()


def test_a_threshold_one_colluder_could_split_is_refused_where_the_site_assumes_one() -> None:
    """With t = 2 of m = 3, a coordinator telling site-b "site-a survived" and site-c
    "site-a dropped" gets one share kind of site-a from each; a colluding third site
    signs both lists and gives the rest. A site assuming one colluder refuses such a
    threshold; a plan whose alpha lifts t to 3 is summed."""
    fleet = Fleet(policy=PrivacyPolicy(max_colluders=1))

    async def ask(plan):
        await fleet.train(SITES, "t1", plan=plan)
        return await fleet.aggregate(SITES, "t1"), fleet.refusals()

    total, refused = run(ask(SECURE))
    assert total is None and set(refused) == set(SITES)
    assert all("t=2 over neighbourhoods of m=3" in r and "max_colluders = 1" in r
               for r in refused.values())
    strict = SECURE.replace("[secagg]\n", "[secagg]\nalpha = 0.5\ndelta = 0.0\n")
    total, refused = run(ask(strict))
    assert total is not None and refused == {}
    with pytest.raises(PrivacyPolicyError, match="max_colluders"):
        PrivacyPolicy(max_colluders=-1)


def test_a_model_moved_by_a_hair_does_not_buy_a_second_sum() -> None:
    """The coordinator asks again with the global model changed in its sixth digit: the
    same seeds give every site a new-looking but near-equal update."""
    fleet = Fleet(policy=SUMS_OF_TWO)

    async def attack():
        await fleet.train(SITES, "t1")
        first = await fleet.aggregate(SITES, "t1")
        fleet.weights = fleet.weights.copy()
        fleet.weights[0] += 1e-6
        await fleet.train(["site-a", "site-c"], "t2")
        second = await fleet.aggregate(["site-a", "site-c"], "t2")
        return first, second, fleet.refusals()

    first, second, refused = run(attack())
    assert first is not None and second is None
    assert set(refused) == {"site-a", "site-c"}
    assert all("within 1%" in r for r in refused.values())


def test_min_cohort_counts_the_sites_summed_not_the_sites_invited() -> None:
    """Invited: three. Summed: two, the third 'dropped' by a coordinator that never
    asked it. Sites whose floor is three reveal nothing."""
    fleet = Fleet(policy=PrivacyPolicy(min_cohort=3))

    async def shrink():
        await fleet.train(["site-a", "site-b"], "t1")
        total = await fleet.aggregate(SITES, "t1", absent=frozenset({"site-c"}))
        return total, fleet.refusals()

    total, refused = run(shrink())
    assert total is None
    assert refused and all("below this appliance's min_cohort 3" in r
                           for r in refused.values())


def test_dp_fedavg_noise_for_three_is_not_revealed_in_a_sum_of_two() -> None:
    fleet = Fleet(policy=SUMS_OF_TWO)
    plan = SECURE + "[privacy.client_dp]\nclip_norm = 1.0\nnoise_multiplier = 0.5\n" \
                    "cohort_size = 3\n"

    async def shrink():
        await fleet.train(["site-a", "site-b"], "t1", plan=plan)
        total = await fleet.aggregate(SITES, "t1", absent=frozenset({"site-c"}))
        return total, fleet.refusals()

    total, refused = run(shrink())
    assert total is None
    assert refused and all("drawn for a cohort of 3" in r for r in refused.values())


def test_agent_config_privacy_table(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[privacy]\nmin_cohort = 4\n")
    assert load_config(cfg).policy == PrivacyPolicy(min_cohort=4)
    cfg.write_text("")
    assert load_config(cfg).policy.require_secure_aggregation is True
    for bad, why in (("min_cohort = 1", "must be an integer >= 2"),
                     ("require_secure_aggregation = 'yes'", "true or false"),
                     ("require_dp = 1", "true or false"),
                     ("min_clients = 3", "unknown")):
        cfg.write_text(f"[privacy]\n{bad}\n")
        with pytest.raises(AgentConfigError, match=why):
            load_config(cfg)
    with pytest.raises(PrivacyPolicyError):
        PrivacyPolicy.from_config([])  # type: ignore[arg-type]


def test_dp_fedavg_sums_an_unweighted_mean_so_the_noise_is_the_plans_whatever_the_sizes() -> None:
    """Each site's noise share N(0, (zS)^2/K) is sized for the unweighted mean of K
    updates. Weighted by example counts (200, 50, 50) the largest site would move the
    mean by more than S/K while the noise stayed the same: an effective z below the
    plan's. The agent weighs every DP-FedAvg update alike, whatever the coordinator's
    weight scale."""
    from fedge.agent.runtime import _Task
    from fedge.agent.trainer import LocalResult
    from fedge.train.privacy import ClientDPConfig, dp_fedavg_privatise

    z, clip_norm, sizes, d = 1.0, 0.5, (200, 50, 50), 20000
    text = SECURE.replace("clip = 0.25", "clip = 10.0") + (
        f"[privacy.client_dp]\nclip_norm = {clip_norm}\nnoise_multiplier = {z}\n"
        f"cohort_size = {len(sizes)}\n")
    plan = parse_plan(text)
    cfg = ClientDPConfig(clip_norm, z, len(sizes))
    agent = Agent("site-a", SyntheticTrainer("site-a"))
    zero = np.zeros(d, np.float32)
    scale = 1.0 / max(sizes)  # what a coordinator sends: min(1, c) / max n
    vectors = []
    for n in sizes:
        noised, _ = dp_fedavg_privatise(zero, cfg)  # a zero update: pure noise
        task = _Task("j", 1, plan, zero, b"\0" * 32, b"\1" * 16,
                     local=LocalResult(noised.astype(np.float32), n))
        vectors.append(agent.input_vector(task, scale))
    total = np.sum(vectors, axis=0, dtype=np.float64)
    mean = total[:-1] / total[-1]  # what the coordinator computes
    weights = [v[-1] for v in vectors]
    assert weights[0] == weights[1] == weights[2]
    influence = clip_norm * max(weights) / sum(weights)  # one site's largest effect
    assert float(np.std(mean)) / influence == pytest.approx(z, rel=0.05)


def test_a_site_requiring_dp_refuses_a_plan_without_it() -> None:
    fleet = Fleet(policy=PrivacyPolicy(require_dp=True))
    run(fleet.train(["site-a"], "t1"))
    assert "requires differential privacy" in fleet.refusals()["site-a"]
    with_dp = SECURE + "[privacy.client_dp]\nclip_norm = 1.0\nnoise_multiplier = 0.5\n" \
                       "cohort_size = 3\n"
    run(fleet.train(["site-a"], "t2", plan=with_dp))
    assert [b for _, b in fleet.inbox if isinstance(b, m.TrainDone)]


def test_a_take_over_that_cannot_write_the_new_log_refuses_every_reveal_and_keeps_the_old(
    tmp_path: Path,
) -> None:
    legacy = tmp_path / "revealed.json"
    _legacy_log(legacy, b"\0" * 16, {"ab" * 32: ["a", "b"]}, [])
    before = legacy.read_bytes()
    (tmp_path / "not-a-dir").write_text("")  # the new log's directory cannot be made
    log = RevealLog(tmp_path / "not-a-dir" / "revealed.jsonl", legacy=legacy)
    with pytest.raises(RevealLogError, match="cannot be written"):
        log.check_and_record(b"\1" * 32, ["a", "b"], None)
    assert legacy.read_bytes() == before  # not replaced by the stub: still the record


# -- what a DP plan releases stays inside its ε, whatever the coordinator asks ---------

DP_PLAN = SECURE + "[privacy.client_dp]\nclip_norm = 1.0\nnoise_multiplier = 0.5\n" \
                   "cohort_size = 3\n"


def test_a_site_requiring_dp_counts_dp_without_noise_as_no_dp() -> None:
    """DP-FedAvg with noise_multiplier 0 only clips: the update leaves as trained.
    A stored plan may still carry it (parse_plan reads it); the site refuses it."""
    fleet = Fleet(policy=PrivacyPolicy(require_dp=True))
    no_noise = DP_PLAN.replace("noise_multiplier = 0.5", "noise_multiplier = 0.0")
    run(fleet.train(["site-a"], "t1", plan=no_noise))
    assert "requires differential privacy" in fleet.refusals()["site-a"]
    assert "noise_multiplier > 0" in fleet.refusals()["site-a"]
    assert not [b for _, b in fleet.inbox if isinstance(b, m.TrainDone)]
    policy = PrivacyPolicy(require_dp=True)
    for privacy in ({}, {"client_dp": {"clip_norm": 1.0, "noise_multiplier": 0,
                                       "cohort_size": 3}},
                    {"client_dp": {"clip_norm": 1.0, "cohort_size": 3}},  # no multiplier
                    {"dp": {"noise_multiplier": -1.0}}, {"dp": {"noise_multiplier": True}},
                    {"dp": {"noise_multiplier": float("nan")}}):
        assert "requires differential privacy" in (policy.refuse_plan(True, privacy) or ""), \
            privacy
    for privacy in ({"dp": {"noise_multiplier": 1.1}},
                    {"client_dp": {"clip_norm": 1.0, "noise_multiplier": 0.5,
                                   "cohort_size": 3}}):
        assert policy.refuse_plan(True, privacy) is None, privacy
    with pytest.raises(TypeError, match=r"\[privacy\] table"):
        policy.refuse_plan(True, True)  # type: ignore[arg-type]


def test_dp_fedavg_noise_sized_for_a_cohort_never_goes_to_a_plain_aggregation() -> None:
    """Each site's share N(0, (zS)^2/K) is sized for the sum of K sites: an update
    the coordinator sees alone carries z/sqrt(K). Refused even where this site's
    policy allows plain aggregation: at the plan, and at the AggregateBegin."""
    plain_ok = PrivacyPolicy(require_secure_aggregation=False)
    fleet = Fleet(policy=plain_ok)
    plain_dp = PLAIN.replace("clip = 0.25", "clip = 10.0") + \
        "[privacy.client_dp]\nclip_norm = 1.0\nnoise_multiplier = 0.5\ncohort_size = 3\n"
    run(fleet.train(["site-a"], "t1", plan=plain_dp))
    reason = fleet.refusals()["site-a"]
    assert "cohort_size is 3" in reason and "needs secure aggregation" in reason
    assert not [b for _, b in fleet.inbox if isinstance(b, m.TrainDone)]
    for policy in (plain_ok, PrivacyPolicy()):
        why = policy.refuse_aggregation(plan_secure=False, secure=False, cohort=3,
                                        weight_scale=1.0, client_dp_cohort=3)
        assert why is not None and "plain (unmasked)" in why, policy
    assert "1/√3 of the plan's noise" in (plain_ok.refuse_aggregation(
        plan_secure=False, secure=False, cohort=3, weight_scale=1.0, client_dp_cohort=3) or "")
    # a cohort of one (noise z*S alone), or no DP-FedAvg: plain is the policy's call
    assert plain_ok.refuse_aggregation(plan_secure=False, secure=False, cohort=3,
                                       weight_scale=1.0, client_dp_cohort=1) is None
    assert plain_ok.refuse_aggregation(plan_secure=False, secure=False, cohort=3,
                                       weight_scale=1.0, client_dp_cohort=None) is None
    cohort_one = plain_dp.replace("cohort_size = 3", "cohort_size = 1")
    run(fleet.train(["site-a"], "t2", plan=cohort_one))
    assert [b for _, b in fleet.inbox if isinstance(b, m.TrainDone)], fleet.inbox


def _evaluate(fleet: Fleet, plan: str, split: str, task_id: str = "e1") -> object:
    fleet.inbox.clear()
    run(fleet.deliver("site-a", m.EvalTask(task_id=task_id, plan=plan,
                                           weights=np.zeros(D, np.float32), split=split)))
    (body,) = [b for s, b in fleet.inbox if s == "site-a"]
    return body


def test_the_training_split_is_not_evaluated_under_dp_whatever_the_coordinator_asks() -> None:
    """Evaluation metrics leave without noise, on the weights the coordinator sends:
    on the training split under DP they are about the very records ε protects. A
    plan stored with eval_split = "train" (submit now refuses it) is refused too."""
    fleet = Fleet()
    for plan in (DP_PLAN, DP_PLAN.replace("[job]", '[job]\neval_split = "train"')):
        body = _evaluate(fleet, plan, "train")
        assert isinstance(body, m.TaskRefused) and body.task == m.TASK_EVAL
        assert "training split" in body.reason and "without noise" in body.reason
        assert isinstance(_evaluate(fleet, plan, "test"), m.EvalResult)
    # without DP the plan's own choice of the training split is evaluated
    assert isinstance(_evaluate(fleet, SECURE.replace("[job]", '[job]\neval_split = "train"'),
                                "train"), m.EvalResult)


def test_a_coordinator_cannot_pick_a_split_the_plan_does_not_name() -> None:
    fleet = Fleet()
    val = SECURE.replace("[job]", '[job]\neval_split = "val"')
    for plan, split in ((SECURE, "val"), (SECURE, "train"), (val, "train")):
        body = _evaluate(fleet, plan, split)
        assert isinstance(body, m.TaskRefused), (plan, split)
        assert f"split {split!r}" in body.reason and "plan does not name" in body.reason
    for plan, split in ((SECURE, "test"), (val, "val"), (val, "test")):
        assert isinstance(_evaluate(fleet, plan, split), m.EvalResult), (plan, split)


def test_each_reveal_row_carries_its_job_and_round_through_compaction(tmp_path: Path) -> None:
    """The agent records the job and round of each update it reveals, beside the
    digest; rows without them (earlier releases) still load and still refuse, and a
    compaction keeps both."""
    fleet = Fleet(tmp=tmp_path)

    async def honest():
        await fleet.train(SITES, "t1")
        return await fleet.aggregate(SITES, "t1")

    assert run(honest()) is not None
    for s in SITES:
        _, row = [json.loads(line) for line in
                     (tmp_path / s / "revealed.jsonl").read_text().splitlines()]
        assert (row["job"], row["round"]) == (JOB, RND)
        assert row["survivors"] == sorted(SITES)

    path = tmp_path / "revealed.jsonl"
    rng = np.random.default_rng(7)
    updates = [rng.standard_normal(50).astype(np.float32) for _ in range(3)]
    log = RevealLog(path, sketches=1)
    log.check_and_record(update_digest(updates[0], 5), ["a", "b"], updates[0])  # no job
    for r, u in enumerate(updates[1:], start=2):
        log.check_and_record(update_digest(u, 5), ["a", "b"], u, job="job-x", round=r)
    RevealLog(path, sketches=1)  # 3 sketches on disk > 2 x 1: rewritten
    rows = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    digests = {row["digest"]: row for row in rows if "digest" in row}
    assert len(rows) == 3 + 1  # every digest, the newest sketch
    assert [(digests[update_digest(u, 5).hex()].get("job"),
             digests[update_digest(u, 5).hex()].get("round")) for u in updates] == [
        (None, None), ("job-x", 2), ("job-x", 3)]
    with pytest.raises(UpdateAlreadySummed):  # the row without a job still refuses
        RevealLog(path).check_and_record(update_digest(updates[0], 5), ["a"], None)
    with pytest.raises(ValueError, match="bad round '2'"):
        RevealLog(path).check_and_record(b"\x09" * 32, ["a"], None, job="job-x",
                                         round="2")  # type: ignore[arg-type]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, json.dumps({"digest": "ab", "survivors": ["a"],
                                                   "job": 7})]) + "\n")
    with pytest.raises(RevealLogError, match="bad job 7"):
        RevealLog(path).check_and_record(b"\1" * 32, ["a", "b"], None)
