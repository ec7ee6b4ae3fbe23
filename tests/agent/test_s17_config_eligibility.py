"""The [eligibility] table is checked when agent.toml is loaded (s17 L4).

Its error named neither the file nor the table, came only after the enrolment was
read and the state directory locked, and with ``health = false`` never came at all
(a misspelt key then stood unnoticed until health was turned on).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedge.agent.process import AgentConfigError, load_config


@pytest.mark.parametrize("health", ["true", "false"])
def test_a_misspelt_key_is_refused_at_load_naming_file_and_table(tmp_path: Path, health):
    p = tmp_path / "agent.toml"
    p.write_text(f'state_dir = "st"\nhealth = {health}\n[eligibility]\nallow_cpu_onyl = true\n')
    with pytest.raises(AgentConfigError) as err:
        load_config(p)
    message = str(err.value)
    assert message.startswith("agent config [eligibility] health policy key 'allow_cpu_onyl' "
                              "is unknown")
    assert message.endswith(f"(in {p})")


def test_a_bad_value_is_refused_at_load(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text('[eligibility]\nmin_free_disk = 5.5\n')
    with pytest.raises(AgentConfigError, match=r"\[eligibility\] min_free_disk=5\.5 must be a "
                                               "byte count"):
        load_config(p)


def test_the_agent_stops_before_reading_its_enrolment(tmp_path: Path) -> None:
    """The state dir here holds no enrolment: the error is the table's, not that."""
    p = tmp_path / "agent.toml"
    p.write_text(f'state_dir = "{tmp_path / "none"}"\nhealth = false\n'
                 "[eligibility]\nmin_gpus = -1\n")
    run = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "run", "--config", str(p)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "[eligibility] min_gpus=-1 must be an integer >= 0" in run.stderr
    assert str(p) in run.stderr and "not enrolled" not in run.stderr


def test_a_valid_table_is_parsed_once_and_kept(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text('health = false\n[eligibility]\nmin_free_disk = "20 GiB"\n'
                 "max_report_age_s = 60\n")
    cfg = load_config(p)
    assert cfg.eligibility_policy.min_free_disk_bytes == 20 * 2**30
    assert cfg.eligibility_policy is cfg.eligibility_policy
