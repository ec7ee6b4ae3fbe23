"""The packaged agent.toml shows every setting with its real default (s17).

It said so, yet left out [privacy] min_noise_multiplier, max_epsilon,
max_epsilon_total and budget_delta, [eligibility] max_pcie_replays and
max_power_fraction, and most [[datasets]] keys. Here every commented setting is
uncommented and loaded through the real loaders, each value shown is compared with
the code's default, and every key the code takes must be in the file: as a setting,
or, when it has no default (off unless set), as "# key: off by default".
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.process import _KEYS, AgentConfig, load_config
from fedge.agent.trainer import TorchTrainer
from fedge.health import EligibilityPolicy
from fedge.train.data import DatasetSpec

PACKAGED = Path(__file__).resolve().parents[2] / "packaging" / "debian" / "etc" / "agent.toml"
SETTING = re.compile(r"^# ?(\[\[?[a-z_]+\]\]?|[a-z_]+ = .*)$")
OFF = re.compile(r"^# ([a-z_]+): off by default\b")


def uncommented(text: str) -> str:
    """Every `# key = value` and `# [table]` line as a setting, its comment cut."""
    lines = []
    for line in text.splitlines():
        m = SETTING.match(line)
        if m:
            lines.append(re.sub(r"\s+#.*$", "", m.group(1)))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def shown() -> tuple[AgentConfig, dict, list[str]]:
    import tomllib

    text = PACKAGED.read_text()
    settings = uncommented(text)
    off = [m.group(1) for line in text.splitlines() if (m := OFF.match(line))]
    return settings, tomllib.loads(settings), off


def test_the_uncommented_file_loads_through_the_real_loaders(shown, tmp_path) -> None:
    settings, _, _ = shown
    path = tmp_path / "agent.toml"
    path.write_text(settings)
    cfg = load_config(path)
    assert cfg.eligibility_policy == EligibilityPolicy()
    assert cfg.policy == PrivacyPolicy()
    assert TorchTrainer(cfg.datasets).unusable == {}  # every example table is accepted


def test_each_value_shown_is_the_codes_default(shown) -> None:
    _, raw, _ = shown
    config = AgentConfig(state_dir=Path("/var/lib/fedge"))
    for key in ("workers", "health", "update_trial_s", "update_restart_wait_s",
                "stuck_task_grace_s", "data_load_s"):
        assert raw[key] == getattr(config, key), key
    assert raw["heartbeat"] == {"interval_s": config.heartbeat_interval_s,
                                "timeout_s": config.heartbeat_timeout_s}
    for key, value in raw["privacy"].items():
        assert value == getattr(PrivacyPolicy(), key), key
    assert EligibilityPolicy.from_config(raw["eligibility"]) == EligibilityPolicy()
    spec = DatasetSpec("n", "fed_tcga_brca", "/p")
    first, _, images = raw["datasets"]
    for key, value in first.items():
        if key not in ("name", "kind", "path", "site"):
            assert value == getattr(spec, key), key
    assert images["image_size"] == spec.image_size


def test_every_key_the_code_takes_is_in_the_file(shown) -> None:
    _, raw, off = shown
    assert set(raw) | {"datasets"} == set(_KEYS)
    privacy = set(raw["privacy"]) | set(off)
    assert set(PrivacyPolicy.KEYS) <= privacy, set(PrivacyPolicy.KEYS) - privacy
    eligibility = {f.name.removesuffix("_bytes") for f in dataclasses.fields(EligibilityPolicy)}
    assert eligibility <= set(raw["eligibility"]) | set(off)
    datasets = {key for table in raw["datasets"] for key in table}
    text = PACKAGED.read_text()
    for key in {f.name for f in dataclasses.fields(DatasetSpec)} - datasets:
        assert re.search(rf"\b{key} = ", text), key  # shown in a comment (target)


def test_the_keys_shown_off_by_default_are_those_without_a_default(shown) -> None:
    _, raw, off = shown
    no_default = {k for k in PrivacyPolicy.KEYS if getattr(PrivacyPolicy(), k) is None}
    no_default |= {f.name for f in dataclasses.fields(EligibilityPolicy)
                   if getattr(EligibilityPolicy(), f.name) is None}
    assert sorted(off) == sorted(no_default)
    assert not set(off) & (set(raw["privacy"]) | set(raw["eligibility"]))
