"""A site's DP-SGD run is charged when its update can leave, not when training ends:
real Agents over TorchTrainer (Fed-TCGA-BRCA), the real SecAgg+ ServerSession played
by the test (tests/agent/test_guard.py's Fleet), ledgers on disk."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.trainer import TorchTrainer, ledger_path
from fedge.secagg.messages import MaskedInput, UnmaskShares
from fedge.train.accounting import PrivacyLedger, epsilon_for
from fedge.wire import codec
from fedge.wire import messages as m
from tests.agent.test_guard import JOB, RND, SCALE, SITES, Fleet

DATA = Path(__file__).resolve().parents[2] / "../shared/data/fed_tcga_brca"
D = 40  # cox_linear on 39 features
STEPS, Z, DELTA = 3, 1.1, 1e-5

DP_PLAN = """
[job]
dataset = "brca"
rounds = 3
min_clients = 2
seed = 5
[model]
name = "cox_linear"
params = { in_features = 39 }
[train]
steps = 3
batch_size = 16
learning_rate = 0.05
[strategy]
name = "fedavg"
[secagg]
enabled = true
clip = 1.0
[privacy]
min_site_examples = 40
dp = { noise_multiplier = 1.1, max_grad_norm = 1.0, delta = 1e-5, cox_per_term = true }
"""
PLAIN_DP_PLAN = DP_PLAN.replace("enabled = true", "enabled = false")
# DP-SGD needs public standardisation constants (fedge.agent.trainer.
# refuse_fitted_standardisation); age is Fed-TCGA-BRCA's one continuous column
BOUNDED = {"standardise": "bounds", "feature_bounds": {"age_at_index": [0, 120]}}


@pytest.fixture
def fleet(tmp_path: Path):
    """Three agents training Fed-TCGA-BRCA centres 0-2 under DP-SGD, each with its
    privacy ledger under ``tmp_path/<site>``; ``fleet.sent`` records, for every message
    an agent sends, the statuses of its ledger on disk at that moment."""
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")

    def make(policy: PrivacyPolicy | None = None) -> Fleet:
        fleet = Fleet(policy=policy)
        fleet.weights = np.zeros(D, np.float32)
        fleet.sent = []
        for i, (site, agent) in enumerate(fleet.agents.items()):
            agent.trainer = TorchTrainer(
                [{"name": "brca", "kind": "fed_tcga_brca", "path": str(DATA), "site": i,
                  **BOUNDED}],
                state_dir=tmp_path / site)

            async def send(frames, site=site):
                body = codec.decode([bytes(f) for f in frames], max_bytes=1 << 24).body
                on_disk = PrivacyLedger.load(ledger_path(tmp_path / site))
                fleet.sent.append((site, body, statuses(on_disk)))
                fleet.inbox.append((site, body))

            agent.send_frames = send
        return fleet

    make.ledger = lambda site: PrivacyLedger.load(ledger_path(tmp_path / site))
    return make


def one_round(site_index: int) -> float:
    """ε of one DP-SGD round at the site holding centre ``site_index``."""
    from fedge.train.api import DatasetSpec, load_site_data

    n = len(load_site_data(DatasetSpec(name="c", kind="fed_tcga_brca", path=str(DATA),
                                       site=site_index)).split("train"))
    return epsilon_for(noise_multiplier=Z, sampling_rate=min(1.0, 16 / n), steps=STEPS,
                       delta=DELTA)


def statuses(ledger: PrivacyLedger) -> list[str]:
    # an entry without a status (as earlier releases saved them) was charged
    return [e.get("status", "released") for e in ledger.entries]


def runs(ledger: PrivacyLedger) -> list[tuple[int, int, str]]:
    return [(e["round"], e.get("attempt", 1), s) for e, s in zip(ledger.entries,
                                                               statuses(ledger), strict=True)]


def test_a_round_aborted_before_its_inputs_spends_nothing_and_its_retry_is_charged_once(
        fleet) -> None:
    """Round 1's first attempt: every site trains, then the sum fails before any masked
    input is sent (two sites drop out advertising keys), so no update left a site: ε
    stays 0. The retry is summed: each site is charged one round, marked on disk before
    its masked input left (from then on the others could unmask it without it)."""
    f = fleet()

    async def attempts():
        await f.train(SITES, "t1", plan=DP_PLAN)
        assert {s for s, b in f.inbox if isinstance(b, m.TrainDone)} == set(SITES)
        failed = await f.aggregate(SITES, "t1", absent=frozenset({"site-b", "site-c"}))
        trained = {s: fleet.ledger(s) for s in SITES}
        await f.deliver("site-a", m.RoundAbort("too few sites advertised keys"))
        await f.train(SITES, "t2", plan=DP_PLAN)
        done = {s: b for s, b in f.inbox if isinstance(b, m.TrainDone)}
        total = await f.aggregate(SITES, "t2")
        return failed, trained, done, total

    failed, trained, done, total = asyncio.run(attempts())
    assert failed is None and total is not None, f.refusals()
    for i, site in enumerate(SITES):
        assert runs(trained[site]) == [(RND, 1, "pending")]
        assert trained[site].epsilon(DELTA, job=JOB) == 0.0
        ledger = fleet.ledger(site)
        assert runs(ledger) == [(RND, 1, "pending"), (RND, 2, "released")]
        assert ledger.epsilon(DELTA, job=JOB) == pytest.approx(one_round(i))
        # the ε the retry reported is the one charged, not two rounds'
        assert done[site].epsilon == pytest.approx(one_round(i))
        # the mark was on disk before this site's masked input left
        (statuses,) = [st for s, b, st in f.sent if s == site and isinstance(b, MaskedInput)]
        assert statuses == ["pending", "released"]


def test_a_site_whose_update_is_not_summed_is_not_charged(fleet) -> None:
    """site-c trains and is never asked to aggregate (the coordinator went on without
    it): its run stays pending; the two summed sites are charged."""
    f = fleet(PrivacyPolicy(min_cohort=2))  # a sum of two (default min_cohort 3)

    async def round_without_c():
        await f.train(SITES, "t1", plan=DP_PLAN)
        return await f.aggregate(SITES, "t1", absent=frozenset({"site-c"}))

    assert asyncio.run(round_without_c()) is not None, f.refusals()
    assert runs(fleet.ledger("site-c")) == [(RND, 1, "pending")]
    assert fleet.ledger("site-c").epsilon(DELTA) == 0.0
    for i, site in enumerate(SITES[:2]):
        assert fleet.ledger(site).epsilon(DELTA) == pytest.approx(one_round(i))


def test_a_ledger_that_cannot_record_the_release_withholds_the_input(fleet, monkeypatch) -> None:
    """Disk full when the round's run is to be charged: no site sends its masked input,
    so no sum can hold it, and nothing is charged."""
    f = fleet()

    async def full_disk():
        await f.train(SITES, "t1", plan=DP_PLAN)

        def no_room(self, path):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(PrivacyLedger, "save", no_room)
        return await f.aggregate(SITES, "t1")

    assert asyncio.run(full_disk()) is None
    monkeypatch.undo()
    refused = f.refusals()
    assert set(refused) == set(SITES)
    assert all(r.startswith("RevealRefused: cannot record this update's privacy spend in "
                            "the ledger ([Errno 28] No space left on device); the masked "
                            "input is withheld") for r in refused.values()), refused
    assert not [b for _, b, _ in f.sent if isinstance(b, (MaskedInput, UnmaskShares))]
    for site in SITES:
        assert runs(fleet.ledger(site)) == [(RND, 1, "pending")]
        assert f.agents[site].trainer._ledger.epsilon(DELTA) == 0.0  # in memory as well


def test_one_site_that_cannot_charge_its_run_is_left_out_of_the_sum_uncharged(
        fleet, monkeypatch) -> None:
    """Only site-a's ledger cannot be saved: site-a withholds its masked input, the sum
    goes on over site-b and site-c (above the threshold) without it, and site-a, whose
    update is in no sum, is not charged. Had it sent the input, the other two could
    have unmasked it without site-a's shares: the charge comes before the input."""
    f = fleet(PrivacyPolicy(min_cohort=2))  # a sum of two (default min_cohort 3)
    real_save = PrivacyLedger.save

    def a_full(self, path):
        if "site-a" in str(path):
            raise OSError(28, "No space left on device")
        real_save(self, path)

    async def round_():
        await f.train(SITES, "t1", plan=DP_PLAN)
        counts = {s: b.n_examples for s, b in f.inbox if isinstance(b, m.TrainDone)}
        monkeypatch.setattr(PrivacyLedger, "save", a_full)
        return counts, await f.aggregate(SITES, "t1")

    weights, total = asyncio.run(round_())
    monkeypatch.undo()
    assert total is not None, f.refusals()
    assert list(f.refusals()) == ["site-a"]
    assert not [s for s, b, _ in f.sent if s == "site-a" and isinstance(b, MaskedInput)]
    assert total[-1] == pytest.approx(SCALE * (weights["site-b"] + weights["site-c"]), rel=1e-3)
    assert runs(fleet.ledger("site-a")) == [(RND, 1, "pending")]
    for i, site in enumerate(SITES[1:], start=1):
        assert fleet.ledger(site).epsilon(DELTA) == pytest.approx(one_round(i))


def test_a_plain_update_is_charged_on_disk_before_it_leaves_or_withheld(
        fleet, monkeypatch) -> None:
    """Without secure aggregation the update itself leaves in PlainUpdate: the run is
    marked released on disk first; a mark that cannot be saved withholds the update."""
    f = fleet(PrivacyPolicy(require_secure_aggregation=False))

    async def plain(site: str, task_id: str) -> list[object]:
        f.inbox.clear()
        await f.train([site], task_id, plan=PLAIN_DP_PLAN)
        assert fleet.ledger(site).epsilon(DELTA) == 0.0
        await f.deliver(site, m.AggregateBegin(task_id=task_id, cohort=SITES,
                                               weight_scale=0.0025, secure=False,
                                               threshold=0))
        return [b for s, b in f.inbox if s == site]

    sent = asyncio.run(plain("site-a", "t1"))
    assert isinstance(sent[-1], m.PlainUpdate)
    (statuses,) = [st for s, b, st in f.sent if isinstance(b, m.PlainUpdate)]
    assert statuses == ["released"]
    assert fleet.ledger("site-a").epsilon(DELTA) == pytest.approx(one_round(0))

    def no_room(self, path):
        raise OSError(28, "No space left on device")

    async def full_disk():
        await f.train(["site-b"], "t2", plan=PLAIN_DP_PLAN)
        monkeypatch.setattr(PrivacyLedger, "save", no_room)
        await f.deliver("site-b", m.AggregateBegin(task_id="t2", cohort=SITES,
                                                   weight_scale=0.0025, secure=False,
                                                   threshold=0))
        return [b for s, b in f.inbox if s == "site-b"]

    sent = asyncio.run(full_disk())
    monkeypatch.undo()
    assert not [b for b in sent if isinstance(b, m.PlainUpdate)]
    assert f.refusals()["site-b"] == (
        "cannot record this update's privacy spend in the ledger ([Errno 28] No space left "
        "on device); the update is withheld")
    assert runs(fleet.ledger("site-b")) == [(RND, 1, "pending")]
