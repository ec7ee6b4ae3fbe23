"""Job plans: every invalid field is refused with its name and the rule."""

from __future__ import annotations

import tomllib

import pytest

from fedge.coordinator.plan import (
    CLIENT_DP_KEYS,
    DP_KEYS,
    PlanError,
    check_submission,
    parse_plan,
    read_plan_file,
)

GOOD = """
[job]
dataset = "fed_tcga_brca"
rounds = 3
min_clients = 2
seed = 7

[model]
name = "cox_linear"
params = { in_features = 39 }

[train]
epochs = 1
batch_size = 32
optimizer = "sgd"
learning_rate = 0.01

[strategy]
name = "fedadam"
server_learning_rate = 0.01
beta1 = 0.9
beta2 = 0.999
tau = 1e-3

[secagg]
enabled = true
clip = 2.0

[privacy]
dp = { noise_multiplier = 1.1, max_grad_norm = 1.0, cox_per_term = true }

[deadlines]
train_s = 30
"""
GOOD_DP = "dp = { noise_multiplier = 1.1, max_grad_norm = 1.0, cox_per_term = true }"


def test_good_plan_parses_with_defaults():
    plan = parse_plan(GOOD)
    assert plan.dataset == "fed_tcga_brca"
    assert plan.rounds == 3 and plan.min_clients == 2 and plan.seed == 7
    assert plan.model_params == {"in_features": 39}
    assert plan.train.epochs == 1 and plan.train.steps is None
    assert plan.strategy.get("beta2") == 0.999
    assert plan.strategy.get("tau") == 1e-3
    assert plan.secagg.clip == 2.0 and plan.secagg.alpha == 0.1
    assert plan.deadlines.train_s == 30.0 and plan.deadlines.eval_s == 120.0
    assert plan.privacy == {"dp": {"noise_multiplier": 1.1, "max_grad_norm": 1.0,
                                   "cox_per_term": True}}
    assert plan.prox_mu == 0.0
    assert len(plan.digest) == 64


def test_fedprox_mu_reaches_clients():
    plan = parse_plan(GOOD.replace('name = "fedadam"', 'name = "fedprox"\nmu = 0.1')
                      .replace("beta1 = 0.9\nbeta2 = 0.999\ntau = 1e-3\n", ""))
    assert plan.prox_mu == 0.1


@pytest.mark.parametrize(
    ("old", "new", "field", "rule"),
    [
        ("rounds = 3", "rounds = 0", "job.rounds", ">= 1"),
        ("min_clients = 2", "min_clients = 1", "job.min_clients", "reveals it"),
        ("rounds = 3", 'rounds = "3"', "job.rounds", "integer"),
        ('dataset = "fed_tcga_brca"', "", "job.dataset", "missing"),
        ("batch_size = 32", "batch_size = -1", "train.batch_size", ">= 1"),
        ("epochs = 1", "epochs = 1\nsteps = 5", "train.epochs", "exactly one"),
        ('optimizer = "sgd"', 'optimizer = "lbfgs"', "train.optimizer", "one of"),
        ("learning_rate = 0.01", "learning_rate = 0", "train.learning_rate", "> 0"),
        ("learning_rate = 0.01", "learning_rate = nan", "train.learning_rate", "finite"),
        ('name = "fedadam"', 'name = "fedsgd"', "strategy.name", "one of"),
        ("beta1 = 0.9", "beta1 = 1.0", "strategy.beta1", "< 1"),
        ("tau = 1e-3", "tau = 1e-3\nmu = 0.1", "strategy.mu", "not a parameter of fedadam"),
        ("server_learning_rate", "server_lr", "strategy.server_lr", "not a parameter"),
        ("enabled = true", "enabled = 1", "secagg.enabled", "true or false"),
        ("clip = 2.0", "clip = 0.0", "secagg.clip", "> 0"),
        ("train_s = 30", "train_s = -5", "deadlines.train_s", "> 0"),
        ("train_s = 30", "trian_s = 5", "deadlines.trian_s", "unknown key"),
        ("[privacy]", "[extras]", "extras", "unknown table"),
        ("[model]", "[model]\nlayers = 3", "model.layers", "unknown key"),
    ],
)
def test_invalid_plan_names_field_and_rule(old, new, field, rule):
    assert old in GOOD
    with pytest.raises(PlanError, match=rule) as info:
        parse_plan(GOOD.replace(old, new, 1))
    assert info.value.field == field
    assert field in str(info.value)


def test_not_toml():
    with pytest.raises(PlanError, match="not valid TOML"):
        parse_plan("[job\nrounds=")
    with pytest.raises(PlanError, match="nested too deeply"):
        parse_plan("a = " + "[" * 100_000)


def test_missing_table():
    with pytest.raises(PlanError, match="strategy"):
        parse_plan(GOOD.replace("[strategy]", "[strategyx]"))


def _dp_plan(rounds: int, target: float, *, n_min: int | None = 200) -> str:
    table = f"dp = {{ noise_multiplier = 1.1, max_grad_norm = 1.0, delta = 1e-5, " \
            f"target_epsilon = {target}, cox_per_term = true }}\n"
    if n_min is not None:
        table += f"min_site_examples = {n_min}\n"
    return GOOD.replace("rounds = 3", f"rounds = {rounds}").replace(
        GOOD_DP + "\n", table)


def test_privacy_target_within_budget_is_accepted():
    plan = parse_plan(_dp_plan(3, 8.0))
    assert plan.privacy["dp"]["target_epsilon"] == 8.0


def test_privacy_target_that_the_rounds_cannot_meet_is_refused_with_the_numbers():
    with pytest.raises(PlanError) as info:
        parse_plan(_dp_plan(200, 1.0))
    err = info.value
    assert err.field == "privacy.dp.target_epsilon"
    # the refusal gives the spend, how many rounds would fit and the noise that would
    assert "cannot be met" in err.rule and "at most" in err.rule
    assert "raise noise_multiplier to" in err.rule
    fit = int(err.rule.split("at most ")[1].split()[0])
    assert 0 <= fit < 200
    if fit >= 1:  # the number of rounds it names does fit
        assert parse_plan(_dp_plan(fit, 1.0)).rounds == fit


def test_privacy_target_needs_the_smallest_site_size():
    with pytest.raises(PlanError, match=r"privacy\.min_site_examples"):
        parse_plan(_dp_plan(3, 8.0, n_min=None))


def test_unknown_privacy_key_is_refused():
    with pytest.raises(PlanError, match=r"privacy\.noise_multiplier"):
        parse_plan(GOOD.replace(GOOD_DP,
                                "noise_multiplier = 1.1"))


def test_an_unregistered_model_is_refused_naming_the_known_ones():
    with pytest.raises(PlanError) as info:
        parse_plan(GOOD.replace('name = "cox_linear"', 'name = "cox_linearr"'))
    assert info.value.field == "model.name" and info.value.value == "cox_linearr"
    assert "not a registered model" in info.value.rule and "cox_linear" in info.value.rule
    assert str(info.value).count("cox_linearr") == 1


def test_the_plan_check_does_not_import_torch():
    """The coordinator checks model names, model parameters and privacy targets
    without torch."""
    import subprocess
    import sys

    code = ("import sys\nfrom fedge.coordinator.plan import check_submission, parse_plan\n"
            f"parse_plan({_dp_plan(3, 8.0)!r})\n"
            f"check_submission({GOOD!r})\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# (privacy table, its inline body, the field a refusal names or None when accepted).
# min_site_examples = 200 sits beside each table so that a target is checked for real.
PRIVACY_TABLES = [
    ("dp", "noise_multiplier = 1.1", None),
    ("dp", "noise_multiplier = 1.0, delta = 1e-6, max_grad_norm = 2.0", None),
    ("dp", "noise_multiplier = 1.0, target_epsilon = 50.0", None),
    ("dp", "noise_multiplier = 1.1, max_grad_nrm = 1.0", "privacy.dp.max_grad_nrm"),
    ("dp", "noise_multiplier = -1.0", "privacy.dp.noise_multiplier"),
    ("dp", "noise_multiplier = 0.0", "privacy.dp.noise_multiplier"),
    ("dp", "noise_multiplier = nan", "privacy.dp.noise_multiplier"),
    ("dp", "max_grad_norm = 1.0", "privacy.dp.noise_multiplier"),
    ("dp", "noise_multiplier = 1.0, max_grad_norm = 0.0", "privacy.dp.max_grad_norm"),
    ("dp", "noise_multiplier = 1.0, max_grad_norm = -2.0", "privacy.dp.max_grad_norm"),
    ("dp", "noise_multiplier = 1.0, delta = 1.0", "privacy.dp.delta"),
    ("dp", "noise_multiplier = 1.0, delta = 0.0", "privacy.dp.delta"),
    ("dp", "noise_multiplier = 1.0, target_epsilon = 0.0", "privacy.dp.target_epsilon"),
    ("dp", "noise_multiplier = 1.0, target_epsilon = -3.0", "privacy.dp.target_epsilon"),
    ("client_dp", "clip_norm = 0.5, noise_multiplier = 0.5, cohort_size = 3", None),
    ("client_dp", "clip_norm = 0.5, noise_multiplier = 0.0, cohort_size = 1",
     "privacy.client_dp.noise_multiplier"),
    ("client_dp", "clip_norm = 0.5, noise = 0.5, cohort_size = 3", "privacy.client_dp.noise"),
    ("client_dp", "clip_norm = 0.5, noise_multiplier = -0.5, cohort_size = 3",
     "privacy.client_dp.noise_multiplier"),
    ("client_dp", "clip_norm = 0.0, noise_multiplier = 0.5, cohort_size = 3",
     "privacy.client_dp.clip_norm"),
    ("client_dp", "clip_norm = -1.0, noise_multiplier = 0.5, cohort_size = 3",
     "privacy.client_dp.clip_norm"),
    ("client_dp", "clip_norm = 0.5, noise_multiplier = 0.5, cohort_size = 0",
     "privacy.client_dp.cohort_size"),
    ("client_dp", "clip_norm = 0.5, noise_multiplier = 0.5", "privacy.client_dp.cohort_size"),
    ("client_dp", "noise_multiplier = 0.5, cohort_size = 3", "privacy.client_dp.clip_norm"),
]


def _privacy_plan(key: str, body: str) -> str:
    old = GOOD_DP
    assert old in GOOD
    if key == "dp":  # GOOD's model is a Cox model (tests/coordinator/test_plan_cox_dp.py)
        body += ", cox_per_term = true"
    return GOOD.replace(old, f"{key} = {{ {body} }}\nmin_site_examples = 200")


@pytest.mark.parametrize(("key", "body", "field"), PRIVACY_TABLES)
def test_privacy_tables_are_checked_field_by_field_at_submit(key, body, field):
    if field is None:
        plan = check_submission(_privacy_plan(key, body))
        table = tomllib.loads(f"t = {{ {body} }}")["t"]
        assert {k: v for k, v in plan.privacy[key].items() if k != "cox_per_term"} == table
        return
    with pytest.raises(PlanError) as info:
        check_submission(_privacy_plan(key, body))
    assert info.value.field == field
    assert str(info.value).startswith(f"plan field {field} = ")


def test_privacy_tables_follow_the_rules_the_sites_apply():
    """What submit (check_submission) accepts, fedge.train.privacy's configs (the
    agent's) accept too, and what they refuse it refuses: a plan that passes submit is
    not refused later."""
    from fedge.train.privacy import ClientDPConfig, DPConfig

    configs = {"dp": DPConfig, "client_dp": ClientDPConfig}
    for key, body, field in PRIVACY_TABLES:
        try:
            configs[key].from_dict(tomllib.loads(f"t = {{ {body} }}")["t"])
            site_refuses = False
        except ValueError:
            site_refuses = True
        assert site_refuses == (field is not None), (key, body)
    assert set(DPConfig.__dataclass_fields__) == set(DP_KEYS)
    assert set(ClientDPConfig.__dataclass_fields__) == set(CLIENT_DP_KEYS)


@pytest.mark.parametrize(("body", "field"), [
    ("dp = 3", "privacy.dp"),
    ("client_dp = 3", "privacy.client_dp"),
    ("client_dp = { clip_norm = 0.5, noise_multiplier = 0.5, cohort_size = 2.5 }",
     "privacy.client_dp.cohort_size"),
    ("client_dp = { clip_norm = 0.5, noise_multiplier = inf, cohort_size = 2 }",
     "privacy.client_dp.noise_multiplier"),
    ('dp = { noise_multiplier = "1.1" }', "privacy.dp.noise_multiplier"),
    ("min_site_examples = 0", "privacy.min_site_examples"),
])
def test_privacy_values_that_are_not_numbers_of_the_right_kind_are_refused(body, field):
    with pytest.raises(PlanError) as info:
        parse_plan(GOOD.replace(GOOD_DP, body))
    assert info.value.field == field


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be",
                                      "utf-32"])
def test_a_plan_file_is_read_as_utf8_or_as_its_byte_order_mark_says(tmp_path, encoding):
    text = GOOD.replace("seed = 7", "seed = 7  # Zürich, 東京")
    data = text.encode(encoding)
    if encoding in ("utf-16-le", "utf-16-be"):  # Notepad's "Unicode": with the mark
        data = ("\ufeff" + text).encode(encoding)
    path = tmp_path / "plan.toml"
    path.write_bytes(data)
    assert read_plan_file(path) == text
    assert parse_plan(read_plan_file(path)).seed == 7


@pytest.mark.parametrize(("data", "rule"), [
    (GOOD.replace("seed = 7", "seed = 7  # résumé").encode("latin-1"),
     "not UTF-8 text: byte 0xe9 at offset"),
    (GOOD.encode("utf-16-le"), "holds NUL characters (UTF-16 saved without a byte-order mark?)"),
    (b"\xff\xfe" + "[job]\n".encode("utf-16-le") + b"\x00", "not UTF-16-LE text"),
])
def test_a_plan_file_that_is_not_text_is_refused_in_one_line(tmp_path, data, rule):
    path = tmp_path / "plan.toml"
    path.write_bytes(data)
    with pytest.raises(PlanError) as info:
        read_plan_file(path)
    assert info.value.field == "<toml>" and info.value.value == str(path)
    assert rule in info.value.rule and "save the plan as UTF-8" in info.value.rule
    assert "\n" not in str(info.value)



def test_a_plan_without_a_seed_gets_a_fresh_one_written_in_one_with_a_seed_is_kept() -> None:
    """Jobs that share a seed and a model train bit-identical first-round updates,
    which sites refuse to have summed over two survivor sets; a seed chosen at
    submission keeps jobs apart and is stored with the plan (reproducible)."""
    from fedge.coordinator.plan import with_seed

    bare = "# a comment\n[job]   # the job\ndataset = \"d\"\nrounds = 1\n" \
           "[model]\nname = \"linear\"\n[train]\nsteps = 1\nbatch_size = 1\n" \
           "learning_rate = 0.1\n[strategy]\nname = \"fedavg\"\n"
    one, two = with_seed(bare), with_seed(bare)
    assert parse_plan(one).seed != parse_plan(two).seed  # 1 chance in 2**31 to be equal
    assert one.startswith("# a comment\n[job]   # the job\nseed = ")
    assert parse_plan(one).dataset == "d" and parse_plan(one).rounds == 1
    named = bare.replace("rounds = 1", "rounds = 1\nseed = 7")
    assert with_seed(named) == named
    with pytest.raises(PlanError):
        with_seed(bare.replace("rounds = 1", "rounds = 0"))


MLP = """
[job]
dataset = "d"
rounds = 1
[model]
name = "{model}"
params = {{ {params} }}
[train]
steps = 1
batch_size = 1
learning_rate = 0.1
[strategy]
name = "fedavg"
"""


def test_a_misspelt_model_parameter_is_refused_at_submission_naming_the_ones_it_takes():
    """An ML engineer's `hiden = [8]` trained the default hidden = [64], silently."""
    from fedge.coordinator.plan import check_submission, with_seed

    text = MLP.format(model="mlp", params="in_features = 5, hiden = [8]")
    for submit in (check_submission, with_seed):
        with pytest.raises(PlanError) as info:
            submit(text)
        assert info.value.field == "model.params.hiden" and info.value.value == [8]
        assert info.value.rule == ("unknown parameter of model 'mlp'; it takes dropout, "
                                   "hidden, in_features, out_features, seed")


@pytest.mark.parametrize(("model", "params", "field", "rule"), [
    ("mlp", 'in_features = 5, hidden = "8"', "model.params.hidden",
     "must be a list of positive integers"),
    ("mlp", "in_features = 5, hidden = [8, 0]", "model.params.hidden",
     "must be a list of positive integers"),
    ("cox_mlp", "in_features = 5, dropout = 1.0", "model.params.dropout", "must lie in [0, 1)"),
    ("logistic", "in_features = 5, classes = 1", "model.params.classes",
     "must be an integer >= 2"),
    ("linear", "in_features = 5.0", "model.params.in_features", "must be an integer >= 1"),
    ("cox_linear", "in_features = 39, seed = true", "model.params.seed", "must be an integer"),
    ("resnet_small", "width = 8, image_size = 0", "model.params.image_size",
     "must be an integer >= 1"),
    # a parameter of another model is no parameter of this one
    ("cox_linear", "in_features = 39, hidden = [8]", "model.params.hidden",
     "unknown parameter of model 'cox_linear'; it takes in_features, seed"),
])
def test_a_model_parameter_that_breaks_its_rule_is_refused_at_submission(model, params, field,
                                                                         rule):
    from fedge.coordinator.plan import check_submission

    with pytest.raises(PlanError) as info:
        check_submission(MLP.format(model=model, params=params))
    assert info.value.field == field and info.value.rule == rule


@pytest.mark.parametrize(("model", "params"), [
    ("linear", "in_features = 5, out_features = 2, seed = 3"),
    ("logistic", "in_features = 5, classes = 3, seed = 3"),
    ("mlp", "in_features = 5, hidden = [8, 4], out_features = 3, dropout = 0.1, seed = 3"),
    ("cox_linear", "in_features = 39, seed = 3"),  # bench/flamby_tcga.py, the demo
    ("cox_mlp", "in_features = 39, hidden = [32], dropout = 0.0, seed = 3"),
    ("resnet_small", "in_channels = 1, classes = 2, width = 16, image_size = 32, seed = 3"),
    # a missing required one is named when the starting model is built
    # (tests/coordinator/test_initmodel.py); plans run on synthetic weights leave it out
    ("linear", ""),
])
def test_every_parameter_a_model_takes_is_accepted_at_submission(model, params):
    from fedge.coordinator.plan import check_submission

    assert check_submission(MLP.format(model=model, params=params)).model_name == model


def test_a_job_with_a_misspelt_model_parameter_stored_by_an_earlier_release_stays_readable(
    tmp_path,
):
    """The rule is checked at submission, not in parse_plan (as the Cox DP rule is):
    a job stored before it keeps its status readable. It never trains the default in
    place of what was asked: the coordinator's starting model and every site's model
    are built by fedge.train, which refuses the same parameter."""
    from fedge.coordinator.service import Coordinator, torch_initial_weights
    from fedge.train.api import ModelSpec, build_model

    old = MLP.format(model="mlp", params="in_features = 5, hiden = [8]")
    plan = parse_plan(old)
    coord = Coordinator(tmp_path / "coord")
    try:
        coord.store.create_job("job-old", old, actor="console")  # as the old release did
        assert coord.job_status("job-old")["rounds_planned"] == 1
        with pytest.raises(PlanError, match=r"model\.params\.hiden"):
            coord.submit_job(old)
    finally:
        coord.close()
    with pytest.raises(PlanError, match="unknown parameter 'hiden'"):
        torch_initial_weights(plan)
    with pytest.raises(ValueError, match="unknown parameter 'hiden'"):  # as the agent's
        build_model(ModelSpec(plan.model_name, dict(plan.model_params)))  # trainer does


@pytest.mark.parametrize("target", ["0.0", "-3.0"])
def test_a_target_epsilon_that_is_not_positive_is_refused_as_such(target):
    """Refused for what it is (not a budget no noise could meet): the message says the
    target must be above 0."""
    with pytest.raises(PlanError) as info:
        check_submission(_privacy_plan("dp", f"noise_multiplier = 1.0, target_epsilon = {target}"))
    assert info.value.field == "privacy.dp.target_epsilon"
    assert "must be > 0" in str(info.value), str(info.value)


def test_job_name_is_parsed_and_a_bad_one_refused_at_submission():
    from fedge.coordinator.plan import plan_labels

    named = GOOD.replace("[job]\n", '[job]\nname = "brca baseline"\n')
    assert check_submission(named).name == "brca baseline"
    assert parse_plan(GOOD).name == ""
    assert plan_labels(named) == {"name": "brca baseline", "dataset": "fed_tcga_brca",
                                  "model": "cox_linear"}
    for value, rule in [("3", "must be a string of at most 100 characters"),
                        ('"' + "x" * 101 + '"', "this one has 101"),
                        ('"two\\nlines"', "without line breaks or control characters")]:
        bad = GOOD.replace("[job]\n", f"[job]\nname = {value}\n")
        with pytest.raises(PlanError, match=rule) as refused:
            check_submission(bad)
        assert refused.value.field == "job.name"
        # a job stored before the rule existed still reads: its name is kept if it can be
        assert parse_plan(bad).name in ("", "x" * 100, "two\nlines")
    assert check_submission(GOOD.replace("[job]\n", f'[job]\nname = "{"y" * 100}"\n'))
