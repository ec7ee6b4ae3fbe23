"""The model registry and the Cox partial likelihood."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedge.train.model_names import MODEL_PARAMS
from fedge.train.models import (
    MODELS,
    ModelSpec,
    build_model,
    cox_partial_likelihood,
    input_shape,
)
from fedge.train.optim import flatten

SPECS = {
    "linear": ({"in_features": 5, "out_features": 2}, (3, 5), (3, 2)),
    "logistic": ({"in_features": 5}, (3, 5), (3, 1)),
    "mlp": ({"in_features": 5, "hidden": [8, 4], "out_features": 3}, (3, 5), (3, 3)),
    "cox_linear": ({"in_features": 39}, (4, 39), (4, 1)),
    "cox_mlp": ({"in_features": 39, "hidden": [16], "dropout": 0.1}, (4, 39), (4, 1)),
    "resnet_small": ({"classes": 3, "width": 8}, (2, 1, 64, 64), (2, 3)),
}


def test_registry_lists_every_required_model() -> None:
    assert set(MODELS) == set(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_each_model_builds_deterministically_with_the_right_output(name: str) -> None:
    params, in_shape, out_shape = SPECS[name]
    a = build_model(ModelSpec(name, params))
    b = build_model(ModelSpec(name, params))
    c = build_model(ModelSpec(name, {**params, "seed": 1}))
    np.testing.assert_array_equal(flatten(a), flatten(b))
    assert not np.array_equal(flatten(a), flatten(c))
    a.eval()
    assert tuple(a(torch.zeros(in_shape)).shape) == out_shape


@pytest.mark.parametrize("name", sorted(SPECS))
def test_predict_in_batches_gives_what_one_forward_pass_gives(name: str) -> None:
    """A site's whole split is predicted a few rows at a time (memory bounded by the
    batch, not the split); the uneven last batch included, the outputs are the same."""
    from fedge.train.api import predict

    params, in_shape, _ = SPECS[name]
    spec = ModelSpec(name, params)
    model = build_model(spec)
    model.eval()
    x = np.random.default_rng(0).normal(size=(7, *in_shape[1:])).astype(np.float32)
    with torch.no_grad():
        whole = model(torch.from_numpy(x)).numpy()
    batched = predict(spec, flatten(model), x, batch_size=3)
    np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-6)
    assert predict(spec, flatten(model), x[:0]).shape == (0, *whole.shape[1:])


@pytest.mark.parametrize("width", [4, 6, 8, 10, 12, 16])
def test_resnet_small_builds_at_any_width(width: int) -> None:
    model = build_model(ModelSpec("resnet_small", {"classes": 3, "width": width}))
    model.eval()
    assert tuple(model(torch.zeros(1, 1, 64, 64)).shape) == (1, 3)


def test_bad_specs_are_named() -> None:
    with pytest.raises(ValueError, match="'transformer' is not registered"):
        build_model(ModelSpec("transformer", {}))
    with pytest.raises(ValueError, match="missing required parameter 'in_features'"):
        build_model(ModelSpec("cox_linear", {}))
    with pytest.raises(ValueError, match=r"hidden=.*positive integers"):
        build_model(ModelSpec("mlp", {"in_features": 3, "hidden": [0]}))
    with pytest.raises(ValueError, match="missing required key 'name'"):
        ModelSpec.from_dict({"params": {}})


def test_a_parameter_the_model_does_not_take_is_refused_naming_the_ones_it_takes() -> None:
    """A misspelt parameter is refused, not read as its default (hiden = [8] trained
    hidden = [64]); so is another model's parameter."""
    with pytest.raises(ValueError, match=r"model 'mlp': unknown parameter 'hiden'; mlp takes "
                                         r"dropout, hidden, in_features, out_features, seed$"):
        build_model(ModelSpec("mlp", {"in_features": 5, "hiden": [8]}))
    with pytest.raises(ValueError, match="unknown parameter 'hidden'"):
        build_model(ModelSpec("cox_linear", {"in_features": 5, "hidden": [8]}))
    with pytest.raises(ValueError, match="unknown parameter 'widht'"):
        ModelSpec.from_dict({"name": "resnet_small", "params": {"widht": 8}})
    with pytest.raises(ValueError, match="unknown parameter 'image_sise'"):
        input_shape(ModelSpec("resnet_small", {"image_sise": 32}))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_declared_parameter_is_taken_and_its_declared_default_is_the_builders(
    name: str,
) -> None:
    """Each model's declared parameters (MODEL_PARAMS, the table the coordinator checks
    plans against) are the ones its builder reads, with the defaults it builds with: a
    plan that spells every default out builds the same weights as one that leaves
    them out."""
    params, _, _ = SPECS[name]
    required = {k: v for k, v in params.items() if MODEL_PARAMS[name][k].default is None}
    spelt = required | {k: p.default for k, p in MODEL_PARAMS[name].items()
                        if p.default is not None}
    assert set(spelt) == set(MODEL_PARAMS[name])
    np.testing.assert_array_equal(flatten(build_model(ModelSpec(name, spelt))),
                                  flatten(build_model(ModelSpec(name, required))))
    assert input_shape(ModelSpec(name, spelt)) == input_shape(ModelSpec(name, required))


def _breslow_reference(s: np.ndarray, t: np.ndarray, e: np.ndarray) -> float:
    total = 0.0
    for i in range(len(s)):
        if e[i]:
            total -= s[i] - np.log(np.sum(np.exp(s[t >= t[i]])))
    return total


def test_cox_loss_matches_a_loop_reference_with_ties() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(size=30)
    t = rng.integers(1, 8, size=30).astype(float)
    e = (rng.random(30) < 0.6).astype(float)
    ref = _breslow_reference(s, t, e)
    got = cox_partial_likelihood(torch.tensor(s), torch.tensor(t), torch.tensor(e), reduction="sum")
    assert float(got) == pytest.approx(ref, rel=1e-10)
    mean = cox_partial_likelihood(torch.tensor(s), torch.tensor(t), torch.tensor(e))
    assert float(mean) == pytest.approx(ref / 30, rel=1e-10)
    big = cox_partial_likelihood(
        torch.tensor(s + 800.0), torch.tensor(t), torch.tensor(e), reduction="sum"
    )
    assert float(big) == pytest.approx(ref, rel=1e-8)  # shift-invariant, no overflow


def test_cox_loss_and_gradient_stay_finite_when_scores_spread_beyond_float32_exp() -> None:
    # raw features (age in years) under Adam lr 0.1 spread log-risks by hundreds; with
    # the highest risk dying first, the last subjects' risk sets hold only scores whose
    # exp() underflows after one shared shift (log 0 = -inf)
    s64 = np.linspace(200.0, -200.0, 12)
    t = np.arange(1.0, 13.0)
    e = np.ones(12)
    s = torch.tensor(s64, dtype=torch.float32, requires_grad=True)
    loss = cox_partial_likelihood(
        s,
        torch.tensor(t, dtype=torch.float32),
        torch.tensor(e, dtype=torch.float32),
        reduction="sum",
    )
    loss.backward()
    assert s.grad is not None and bool(torch.all(torch.isfinite(s.grad)))
    assert float(loss.detach()) == pytest.approx(_breslow_reference(s64, t, e), rel=1e-5)
