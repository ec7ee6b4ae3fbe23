"""Record-level DP-SGD, client-level DP-FedAvg, the accountant and plan refusal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedge.train.api import (
    ClientState,
    DatasetSpec,
    ModelSpec,
    TrainConfig,
    load_site_data,
    local_train,
)
from fedge.train.privacy import (
    ClientDPConfig,
    DPConfig,
    PrivacyBudgetError,
    PrivacyLedger,
    calibrate_noise,
    check_dp_plan,
    dp_fedavg_privatise,
    epsilon_for,
    noisy_clipped_gradient,
    per_example_grads,
    secret_gaussian,
    secret_uniform,
)

COX = ModelSpec("cox_linear", {"in_features": 39})


def test_epsilon_comes_from_dp_accounting_and_grows_with_steps() -> None:
    """ε is dp_accounting's PLD accountant's for replacing one record (the site's
    record count leaves with its updates): at least what its default grid gives (the
    pessimistic estimate is an upper bound, ours is on a coarser grid) and within
    0.2 % of it, and well above the add-or-remove RDP ε it replaced."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 300)
    acc = PLDAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(event)
    ref = acc.get_epsilon(1e-5)
    ours = epsilon_for(noise_multiplier=1.1, sampling_rate=0.05, steps=300, delta=1e-5)
    assert ref <= ours <= ref * 1.002
    add_or_remove = RdpAccountant()
    add_or_remove.compose(event)
    assert ours > 1.3 * add_or_remove.get_epsilon(1e-5)
    more = epsilon_for(noise_multiplier=1.1, sampling_rate=0.05, steps=600, delta=1e-5)
    assert more > ours > 0


def test_ledger_composes_per_round_and_cumulative() -> None:
    ledger = PrivacyLedger()
    for r in range(3):
        ledger.record(job="j", round=r, noise_multiplier=1.0, sampling_rate=0.1, steps=50)
    one = ledger.epsilon(1e-5, job="j", round=1)
    total = ledger.epsilon(1e-5, job="j")
    assert total == pytest.approx(
        epsilon_for(noise_multiplier=1.0, sampling_rate=0.1, steps=150, delta=1e-5)
    )
    assert one < total < 3 * one  # composition is sub-additive here
    assert PrivacyLedger.from_dict(ledger.to_dict()).epsilon(1e-5) == pytest.approx(total)


def test_plan_refused_with_the_numbers_when_target_unreachable() -> None:
    ok = check_dp_plan(
        target_epsilon=50.0,
        delta=1e-5,
        rounds=5,
        steps_per_round=100,
        sampling_rate=0.03,
        noise_multiplier=1.0,
    )
    assert 0 < ok <= 50.0
    with pytest.raises(PrivacyBudgetError) as err:
        check_dp_plan(
            target_epsilon=1.0,
            delta=1e-5,
            rounds=20,
            steps_per_round=100,
            sampling_rate=0.03,
            noise_multiplier=1.0,
        )
    msg = str(err.value)
    assert "target epsilon 1" in msg and "20 rounds" in msg and "at most" in msg
    assert "raise noise_multiplier to" in msg
    z = calibrate_noise(target_epsilon=1.0, delta=1e-5, sampling_rate=0.03, steps=2000)
    assert epsilon_for(noise_multiplier=z, sampling_rate=0.03, steps=2000, delta=1e-5) <= 1.0


def test_per_example_gradients_match_a_loop() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(6, 3)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])

    def terms(out: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(
            out.reshape(-1), yy, reduction="none"
        )

    grads = per_example_grads(model, terms, x, y, coupled=False)
    for i in range(6):
        model.zero_grad()
        terms(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        torch.testing.assert_close(grads[0][i], model.weight.grad)
        torch.testing.assert_close(grads[1][i], model.bias.grad)


def test_clipping_bounds_each_example_and_noise_has_the_right_scale() -> None:
    g = [torch.tensor([[3.0, 4.0], [0.3, 0.4]])]  # norms 5 and 0.5
    noiseless, frac = noisy_clipped_gradient(
        g, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch=2.0
    )
    torch.testing.assert_close(noiseless, torch.tensor([(0.6 + 0.3) / 2, (0.8 + 0.4) / 2]))
    assert frac == 0.5
    zeros = [torch.zeros(1, 20000)]
    noisy, _ = noisy_clipped_gradient(
        zeros, max_grad_norm=2.0, noise_multiplier=1.5, expected_batch=1.0
    )
    assert float(noisy.std()) == pytest.approx(3.0, rel=0.05)


def test_dp_randomness_is_keyed_by_fresh_os_bytes_and_right_in_distribution() -> None:
    """A given key gives the same draws (the core's AES-CTR stream); no key means a
    fresh one each call, so two calls never agree."""
    key = bytes(range(16))
    a = secret_gaussian(50_000, 2.0, key=key)
    assert np.array_equal(a, secret_gaussian(50_000, 2.0, key=key))
    assert float(a.mean()) == pytest.approx(0.0, abs=0.05)
    assert float(a.std()) == pytest.approx(2.0, rel=0.02)
    fresh = secret_gaussian(1000, 1.0)
    assert not np.array_equal(fresh, secret_gaussian(1000, 1.0))
    u = secret_uniform(100_000, key=key)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01)
    assert float((u < 0.1).mean()) == pytest.approx(0.1, abs=0.01)
    assert not np.array_equal(secret_uniform(1000), secret_uniform(1000))
    with pytest.raises(ValueError, match="16 bytes"):
        secret_gaussian(4, 1.0, key=b"short")


def test_the_coordinator_cannot_regenerate_the_dp_noise(tcga_dir: Path) -> None:
    """Everything the coordinator knows (global weights, plan, its train seed, round,
    site) is the same in both runs; under DP-SGD and under DP-FedAvg the released
    weights still differ by about the noise's scale, so nobody holding those inputs
    can subtract the noise. Without DP the same inputs give the same bits. Under
    DP-SGD the raw batches' loss and clipped fraction stay at the site."""
    data = load_site_data(
        DatasetSpec(name="c0", kind="fed_tcga_brca", path=str(tcga_dir), site=0, val_fraction=0.0)
    )
    w = np.zeros(40, np.float32)
    plain = TrainConfig(steps=5, batch_size=16, lr=0.05, seed=7)
    assert np.array_equal(
        local_train(COX, w, data, plain, round=3).weights,
        local_train(COX, w, data, plain, round=3).weights,
    )
    dp = TrainConfig(steps=5, batch_size=16, lr=0.05, seed=7,
                     dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                                 cox_per_term=True))
    one = local_train(COX, w, data, dp, round=3, state=ClientState(job="j"))
    two = local_train(COX, w, data, dp, round=3, state=ClientState(job="j"))
    # per step the noise on the mean gradient has sd sigma*C/(q n) = 1/16; times lr, 5 steps
    assert float(np.std(one.weights - two.weights)) > 0.2 * 0.05 / 16
    assert "train_loss" not in one.metrics and "clipped_fraction" not in one.metrics
    assert set(one.local_metrics) == {"train_loss", "clipped_fraction"}
    assert np.isfinite(one.local_metrics["train_loss"])
    client = TrainConfig(steps=5, batch_size=16, lr=0.05, seed=7,
                         client_dp=ClientDPConfig(clip_norm=0.1, noise_multiplier=1.0,
                                                  cohort_size=4))
    runs = [local_train(COX, w, data, client, round=3).weights for _ in range(10)]
    diffs = np.concatenate([runs[i] - runs[i + 1] for i in range(0, 10, 2)])  # 200 values
    # each update carries N(0, (z*S/sqrt(cohort))^2) = N(0, 0.05^2) per coordinate
    assert float(np.std(diffs)) == pytest.approx(0.05 * np.sqrt(2), rel=0.3)


def test_dp_sgd_local_train_reports_epsilon_per_round_and_cumulative(tcga_dir: Path) -> None:
    """A run enters the ledger pending and counts once released; the ε a round reports is
    the job's as it stands once that round's update is released."""
    data = load_site_data(
        DatasetSpec(name="c0", kind="fed_tcga_brca", path=str(tcga_dir), site=0, val_fraction=0.0)
    )
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, cox_per_term=True)
    cfg = TrainConfig(steps=10, batch_size=16, lr=0.05, dp=dp)
    state = ClientState(job="job-1")
    w = np.zeros(40, np.float32)

    def eps(steps: int) -> float:
        return epsilon_for(noise_multiplier=1.0, sampling_rate=16 / 248, steps=steps,
                           delta=1e-5)

    first = local_train(COX, w, data, cfg, round=0, state=state)
    assert first.ledger_key == ("job-1", 0, 1)
    assert state.ledger.epsilon(1e-5, job="job-1") == 0.0  # trained, not yet released
    state.ledger.release(first.ledger_key)
    # round 1's first attempt never leaves the site (its round failed); the retry does
    lost = local_train(COX, first.weights, data, cfg, round=1, state=state)
    second = local_train(COX, first.weights, data, cfg, round=1, state=state)
    assert (lost.ledger_key, second.ledger_key) == (("job-1", 1, 1), ("job-1", 1, 2))
    state.ledger.release(second.ledger_key)
    assert first.epsilon == pytest.approx(eps(10))
    assert second.epsilon == pytest.approx(eps(20))  # the lost attempt is not counted
    assert state.ledger.epsilon(1e-5, job="job-1") == pytest.approx(eps(20))
    assert second.metrics["epsilon_round_per_loss_term"] == pytest.approx(first.epsilon)
    assert second.delta == 1e-5 and np.all(np.isfinite(second.weights))

    def target(value: float) -> TrainConfig:
        return TrainConfig(steps=10, batch_size=16, lr=0.05,
                           dp=DPConfig(noise_multiplier=1.0, delta=1e-5, target_epsilon=value,
                                       cox_per_term=True))

    # a target the next round would break is refused, and nothing is recorded
    with pytest.raises(PrivacyBudgetError, match="round 2 refused"):
        local_train(COX, second.weights, data, target(second.epsilon + 1e-3), round=2,
                    state=state)
    assert len(state.ledger.entries) == 3
    # the check counts the released runs and the round about to run, not the lost one
    third = local_train(COX, second.weights, data, target(eps(30) + 1e-3), round=2,
                        state=state)
    assert third.epsilon == pytest.approx(eps(30))


def test_dp_fedavg_clips_the_update_and_adds_the_noise_share() -> None:
    update = np.full(10000, 0.1, np.float32)  # norm 10
    cfg = ClientDPConfig(clip_norm=1.0, noise_multiplier=1e-6, cohort_size=4)  # noise ~0
    clipped, norm = dp_fedavg_privatise(update, cfg)
    assert norm == pytest.approx(10.0, rel=1e-5)
    assert float(np.linalg.norm(clipped)) == pytest.approx(1.0, rel=1e-4)
    noisy_cfg = ClientDPConfig(clip_norm=1.0, noise_multiplier=2.0, cohort_size=4)
    noisy, _ = dp_fedavg_privatise(np.zeros(40000, np.float32), noisy_cfg)
    assert float(noisy.std()) == pytest.approx(2.0 * 1.0 / 2.0, rel=0.05)  # z*S/sqrt(cohort)


def test_dp_config_errors_are_named() -> None:
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPConfig.from_dict({"max_grad_norm": 1.0})
    with pytest.raises(ValueError, match=r"delta=2\.0"):
        DPConfig.from_dict({"noise_multiplier": 1.0, "delta": 2.0})
    with pytest.raises(ValueError, match="cohort_size"):
        ClientDPConfig.from_dict({"clip_norm": 1.0, "noise_multiplier": 1.0})


@pytest.mark.parametrize("z", [0.0, -1.0, float("nan")])
def test_dp_fedavg_without_noise_is_refused_however_it_is_made(z: float) -> None:
    """noise_multiplier 0 would only clip: the update would leave the site as trained
    with nothing to account. Refused from a plan's table and when built directly."""
    with pytest.raises(ValueError, match=r"train\.client_dp\.noise_multiplier=.* must be > 0"):
        ClientDPConfig.from_dict({"clip_norm": 1.0, "noise_multiplier": z, "cohort_size": 1})
    with pytest.raises(ValueError, match="only clips"):
        ClientDPConfig(clip_norm=1.0, noise_multiplier=z, cohort_size=1)
    with pytest.raises(ValueError, match=r"train\.client_dp\.noise_multiplier"):
        TrainConfig.from_dict({"client_dp": {"clip_norm": 1.0, "noise_multiplier": z,
                                             "cohort_size": 1}})
    with pytest.raises(ValueError, match="clip_norm"):
        ClientDPConfig(clip_norm=0.0, noise_multiplier=1.0, cohort_size=1)
    assert ClientDPConfig(clip_norm=1.0, noise_multiplier=0.01, cohort_size=1)
    with pytest.raises(ValueError, match=r"scaffold with train\.dp"):
        TrainConfig(scaffold=True, dp=DPConfig(noise_multiplier=1.0)).validate()


def test_ledger_survives_a_restart_and_refuses_a_corrupt_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ledger = PrivacyLedger()
    ledger.record(job="j", round=1, noise_multiplier=1.2, sampling_rate=0.05, steps=40)
    path = tmp_path / "privacy" / "ledger.json"
    ledger.save(path)
    again = PrivacyLedger.load(path)
    assert again.entries == ledger.entries
    assert again.epsilon(1e-5) == pytest.approx(ledger.epsilon(1e-5))
    assert PrivacyLedger.load(tmp_path / "none.json").entries == []
    path.write_text('{"entries": [{"job": "j"}]}')
    with pytest.raises(ValueError, match="lacks"):
        PrivacyLedger.load(path)


def test_per_example_grads_of_a_dropout_mlp_use_one_mask_per_example() -> None:
    """MLP 4 -> 8 -> dropout(0.5) -> 1: an example's last-layer weight gradient over its
    bias gradient is its hidden vector times its own dropout mask / (1 - p), so each
    entry is 0 or h / (1 - p); the first layer's rows of dropped units are 0 by the same
    mask; and examples draw different masks (vmap used to refuse the random op)."""
    from fedge.train.api import _loss_terms
    from fedge.train.models import build_model

    torch.manual_seed(0)
    spec = ModelSpec("mlp", {"in_features": 4, "hidden": [8], "dropout": 0.5})
    model = build_model(spec)
    model.train()
    x = torch.randn(64, 4)
    y = (torch.rand(64) > 0.5).float()
    w1, _b1, w2, b2 = per_example_grads(model, _loss_terms("binary", "mean"), x, y,
                                       coupled=False)
    hidden = torch.relu(x @ model[0].weight.T + model[0].bias)  # (64, 8)
    ratio = w2.reshape(64, 8) / b2.reshape(64, 1)
    kept = ratio.abs() > 1e-6
    torch.testing.assert_close(ratio[kept], (hidden / 0.5)[kept], rtol=1e-4, atol=1e-5)
    live = hidden > 1e-6
    assert torch.all(w1.abs().sum(dim=2)[live & ~kept] == 0)  # dropped unit: no gradient
    assert torch.all(w1.abs().sum(dim=2)[live & kept] > 0)
    # one mask shared by the batch would keep or drop a unit for every example alike
    kept_somewhere = (live & kept).any(dim=0)
    dropped_somewhere = (live & ~kept).any(dim=0)
    assert torch.any(kept_somewhere & dropped_somewhere)
    assert 0.3 < float(kept[live].float().mean()) < 0.7  # p = 0.5


def test_a_dp_sgd_round_trains_a_dropout_mlp() -> None:
    from fedge.train.data import SiteData, Split
    from fedge.train.models import build_model
    from fedge.train.optim import flatten

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    y = (rng.random(50) > 0.5).astype(np.float32)
    data = SiteData("s", "binary", ["a", "b", "c", "d"], Split(x, y))
    spec = ModelSpec("mlp", {"in_features": 4, "hidden": [8], "dropout": 0.3})
    w0 = flatten(build_model(spec))
    cfg = TrainConfig(steps=3, batch_size=10, lr=0.1, dp=DPConfig(noise_multiplier=1.0))
    state = ClientState(job="j")
    out = local_train(spec, w0, data, cfg, round=0, state=state)
    assert out.epsilon is not None and out.epsilon > 0
    # a record-level bound: no per-loss-term label anywhere
    assert out.metrics["epsilon"] == out.epsilon and "epsilon_per_loss_term" not in out.metrics
    assert not state.ledger.per_loss_term() and "bound" not in state.ledger.entries[0]
    assert np.all(np.isfinite(out.weights)) and not np.array_equal(out.weights, w0)


def _cox_site() -> object:
    from fedge.train.data import SiteData, Split

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = np.stack([rng.integers(0, 2, 40), rng.random(40) * 10], 1).astype(np.float32)
    return SiteData("s", "survival", ["a", "b", "c"], Split(x, y))


def test_a_site_refuses_dp_sgd_on_a_cox_model_unless_the_plan_accepts_a_per_term_bound(
        tmp_path: Path) -> None:
    """Removing one record moves a Cox batch's clipped sum by up to ~(2b-1)·C, not C: the
    accountant's ε is not a record-level bound. An mlp trained on survival data is a Cox
    model too, which the coordinator cannot see in the plan; the site refuses it."""
    from fedge.train.accounting import PER_LOSS_TERM
    from fedge.train.models import build_model
    from fedge.train.optim import flatten

    data = _cox_site()
    for spec in (ModelSpec("cox_linear", {"in_features": 3}),
                 ModelSpec("mlp", {"in_features": 3, "hidden": [4]})):
        w0 = flatten(build_model(spec))
        cfg = TrainConfig(steps=2, batch_size=10, dp=DPConfig(noise_multiplier=1.0))
        state = ClientState(job="j")
        with pytest.raises(ValueError, match=r"\(2b - 1\) x max_grad_norm.*cox_per_term"):
            local_train(spec, w0, data, cfg, round=0, state=state)
        assert state.ledger.entries == []
        ok = TrainConfig(steps=2, batch_size=10,
                         dp=DPConfig(noise_multiplier=1.0, cox_per_term=True))
        out = local_train(spec, w0, data, ok, round=0, state=state)
        assert "epsilon" not in out.metrics and "epsilon_round" not in out.metrics
        assert out.metrics["epsilon_per_loss_term"] == pytest.approx(out.epsilon)
        assert state.ledger.entries[0]["bound"] == PER_LOSS_TERM
        assert state.ledger.per_loss_term(job="j") and not state.ledger.per_loss_term(job="k")
        state.ledger.save(tmp_path / "ledger.json")
        assert PrivacyLedger.load(tmp_path / "ledger.json").per_loss_term(job="j")


def test_cox_per_term_is_a_boolean() -> None:
    assert DPConfig.from_dict({"noise_multiplier": 1.0, "cox_per_term": True}).cox_per_term
    with pytest.raises(ValueError, match="cox_per_term='yes' must be true or false"):
        DPConfig.from_dict({"noise_multiplier": 1.0, "cox_per_term": "yes"})


def _cnn_terms(out: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out, yy, reduction="none")


def test_a_batch_taken_in_chunks_gives_the_gradient_of_the_batch_taken_whole() -> None:
    """DP-SGD's per-example gradients of an uncoupled loss are computed, clipped and
    summed a chunk of examples at a time: the same clipped sum, noise and clipped
    fraction as the whole batch at once, whatever the chunk."""
    from fedge.train.models import build_model
    from fedge.train.privacy import private_gradient

    torch.manual_seed(3)
    model = build_model(ModelSpec("resnet_small", {"classes": 3, "width": 4,
                                                   "image_size": 16}))
    x = torch.randn(37, 1, 16, 16)
    y = torch.randint(0, 3, (37,))
    key = bytes(range(16))
    grads = per_example_grads(model, _cnn_terms, x, y, coupled=False)
    norms = torch.cat([g.reshape(37, -1) for g in grads], dim=1).norm(dim=1)
    ranked = norms.sort().values  # a clip half-way between two norms: half clipped
    clip = float(ranked[18] + ranked[19]) / 2
    whole, frac = noisy_clipped_gradient(grads, max_grad_norm=clip, noise_multiplier=1.1,
                                         expected_batch=40.0, noise_key=key)
    assert 0.3 < frac < 0.7
    for chunk in (1, 5, 32, 37, 100):
        got, got_frac = private_gradient(model, _cnn_terms, x, y, coupled=False,
                                         max_grad_norm=clip, noise_multiplier=1.1,
                                         expected_batch=40.0, noise_key=key, chunk=chunk)
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)
        assert got_frac == frac
    with pytest.raises(ValueError, match="chunk=0"):
        private_gradient(model, _cnn_terms, x, y, coupled=False, max_grad_norm=1.0,
                         noise_multiplier=1.0, expected_batch=1.0, chunk=0)

