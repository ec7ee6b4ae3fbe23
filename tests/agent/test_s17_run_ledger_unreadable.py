"""`fedge agent run` on a privacy ledger its user cannot read (privacy/ left by a `sudo
fedge agent run` by hand, a restore with the wrong owner): one line naming the file,
the user and the chown, exit 2 (7746f36), without the "invalid configuration:" that
it was printed with, as if agent.toml were wrong: nothing in it is.

The real CLI in a subprocess, on an enrolled state dir. As root, the agent runs with
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped (setpriv), and privacy/ belongs to
uid 65534, so mode bits bind it as they bind the service user; as any other user,
privacy/ is made mode 0."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent.test_s17_check_credentials import NODAC, REPO, appliance, user


def test_an_unreadable_ledger_is_said_in_one_line_not_as_invalid_configuration(
        tmp_path: Path) -> None:
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop CAP_DAC_OVERRIDE")
    state, config = appliance(tmp_path)
    config.write_text(config.read_text().replace("[eligibility]", "health = false\n"
                                                 "[eligibility]"))
    privacy = state / "privacy"
    privacy.mkdir(mode=0o700)
    (privacy / "ledger.json").write_text('{"entries": []}\n')
    if os.geteuid() == 0:
        os.chown(privacy, 65534, 65534)
    else:
        privacy.chmod(0)
    env = {k: v for k, v in os.environ.items() if k not in (
        "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "FEDGE_SOFTWARE_ROOT")}
    try:
        done = subprocess.run([*(NODAC if os.geteuid() == 0 else []), sys.executable, "-m",
                               "fedge.cli", "agent", "run", "--config", str(config),
                               "--connect-timeout", "30"],
                              capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    finally:
        privacy.chmod(0o700)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"fedge agent: privacy ledger {privacy / 'ledger.json'} cannot be read as user "
        f"{user()}: Permission denied; it and its directory must belong to the user the "
        f"agent runs as (e.g. chown -R fedge: {privacy})")
    assert "invalid configuration" not in done.stderr
