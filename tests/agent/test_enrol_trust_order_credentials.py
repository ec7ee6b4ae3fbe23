"""After revoke and re-enrol, the appliance's old keys may still sit in the systemd
credentials directory, which the agent reads before the state dir: `fedge agent
enrol` says so and prints the commands that move the new keys into place, and the
agent, at start, says which key it uses and where the enrolled one is (incident
L4). Real console, real signed files, real keys; the real command in a subprocess."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import zmq

from fedge.agent.enrol import credentials_not_enrolled, install_enrolment
from fedge.agent.process import load_enrolled
from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleStore
from fedge.secagg.keys import Identity

SOURCE = "/var/lib/fedge-credentials/agent"


def fedge(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *argv], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


def reenrolled(tmp_path: Path) -> tuple[ConsoleStore, Path, Path, Path]:
    """h2 enrolled, its keys moved to credentials (as firmware/README says), then
    revoked and enrolled anew: (console, state dir, credentials dir, the new file)."""
    console = ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://127.0.0.1:7000")
    old, _ = create_enrolment(console, "h2", valid_for=timedelta(days=1),
                              out=tmp_path / "h2-old.fedge-enrol")
    state = tmp_path / "state"
    install_enrolment(old, state)
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    shutil.copy(state / "keys" / "curve.json", creds / "fedge_curve.key")
    shutil.copy(state / "keys" / "identity.key", creds / "fedge_identity.key")
    console.revoke_site("h2")
    new, _ = create_enrolment(console, "h2", valid_for=timedelta(days=1),
                              out=tmp_path / "h2-new.fedge-enrol")
    return console, state, creds, new


def test_enrol_says_the_credentials_hold_other_keys_and_how_to_move_the_new_ones(tmp_path):
    _, state, creds, new = reenrolled(tmp_path)
    r = fedge("agent", "enrol", "--state-dir", str(state), str(new),
              env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert r.returncode == 0, r.stderr
    assert "enrolled site h2" in r.stdout
    assert "WARNING: the agent loads its keys from the systemd credentials" in r.stderr
    assert f"{creds / 'fedge_curve.key'}: CURVE key " in r.stderr
    assert f"{creds / 'fedge_identity.key'}: another identity key" in r.stderr
    for command in (
            f"install -o root -g root -m 0600 {state}/keys/curve.json {SOURCE}/curve.key",
            f"install -o root -g root -m 0600 {state}/keys/identity.key "
            f"{SOURCE}/identity.key",
            f"shred -u {state}/keys/curve.json {state}/keys/identity.key",
            "systemctl restart fedge-agent"):
        assert f"\n  {command}\n" in r.stderr, command

    # the keys moved as told: said no more
    shutil.copy(state / "keys" / "curve.json", creds / "fedge_curve.key")
    shutil.copy(state / "keys" / "identity.key", creds / "fedge_identity.key")
    r = fedge("agent", "enrol", "--state-dir", str(state), str(new),
              env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert r.returncode == 0, r.stderr
    assert "WARNING" not in r.stderr


def test_the_units_source_directory_is_looked_at_with_a_bare_secret_key(tmp_path):
    """CREDENTIALS_SOURCE's own names (curve.key, identity.key); curve.key may be the
    bare z85 secret."""
    _, state, _, new = reenrolled(tmp_path)
    site = install_enrolment(new, state)
    source = tmp_path / "source"
    source.mkdir()
    public, secret = zmq.curve_keypair()
    (source / "curve.key").write_bytes(secret)
    Identity.generate().save(source / "identity.key")
    found = credentials_not_enrolled(site, places=[(source, "")])
    assert found == [f"{source / 'curve.key'}: CURVE key {public.decode()}, not the enrolled "
                     f"{site.curve_public}",
                     f"{source / 'identity.key'}: another identity key than the enrolled one"]
    (source / "curve.key").write_text(site.curve_secret)
    shutil.copy(state / "keys" / "identity.key", source / "identity.key")
    assert credentials_not_enrolled(site, places=[(source, "")]) == []
    assert credentials_not_enrolled(site, places=[(tmp_path / "none", "")]) == []


def test_the_agent_at_start_says_which_key_it_uses_and_where_the_enrolled_one_is(
        tmp_path, monkeypatch, caplog):
    _, state, creds, new = reenrolled(tmp_path)
    site = install_enrolment(new, state)
    # the documented layout: the state dir's copies shredded once moved (here: not moved)
    (state / "keys" / "curve.json").unlink()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with caplog.at_level(logging.WARNING, logger="fedge.agent"):
        enrolled = load_enrolled(state)
    assert enrolled.curve_public != site.curve_public  # the stale credential is loaded
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"using the CURVE key {enrolled.curve_public} from {creds / 'fedge_curve.key'}"
               f", which is not the key enrolled last ({site.curve_public}, in "
               f"{state / 'enrolment.json'})" in m for m in said), said
    assert any(f"using the identity key in {creds / 'fedge_identity.key'}, which is not the "
               "identity the roster" in m for m in said), said

    caplog.clear()
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    install_enrolment(new, state)  # the enrolled keys back in the state dir, used
    with caplog.at_level(logging.WARNING, logger="fedge.agent"):
        load_enrolled(state)
    assert [r for r in caplog.records if r.levelno == logging.WARNING] == []


def test_the_printed_commands_work_pasted_when_paths_hold_a_space_or_a_dollar(tmp_path):
    # flaky-review s16 L2: the commands were printed with the paths bare, so pasting
    # `shred -u Site A.fedge-enrol` shredded nothing (or another file)
    odd = tmp_path / "IT share $HOME"
    odd.mkdir()
    _, state, creds, new = reenrolled(odd)
    pasted = odd / "h2 new $USER.fedge-enrol"
    new.rename(pasted)
    r = fedge("agent", "enrol", "--state-dir", str(state), str(pasted),
              env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert r.returncode == 0, r.stderr
    lines = [line.strip() for line in r.stderr.splitlines()]
    install = [shlex.split(line) for line in lines if line.startswith("install ")]
    assert [argv[-2:] for argv in install] == [
        [str(state / "keys" / "curve.json"), f"{SOURCE}/curve.key"],
        [str(state / "keys" / "identity.key"), f"{SOURCE}/identity.key"]]
    shred = next(shlex.split(line) for line in lines if line.startswith("shred "))
    assert shred == ["shred", "-u", str(state / "keys" / "curve.json"),
                     str(state / "keys" / "identity.key")]
    # the enrolment file's own shred command, pasted into a shell, removes that file
    said = r.stdout.split("(e.g. `", 1)[1].split("`", 1)[0]
    assert said.startswith("shred -u ")
    done = subprocess.run(["bash", "-c", said], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not pasted.exists()
