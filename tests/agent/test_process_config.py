"""Agent configuration and enrolment state: checked at start, errors name the culprit."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.agent.process import AgentConfigError, load_config, load_enrolled
from fedge.secagg.keys import Identity, Roster
from fedge.transport import CurveKeyPair


def write(tmp_path, text):
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_defaults_and_datasets(tmp_path):
    cfg = load_config(write(tmp_path, 'state_dir = "st"\nworkers = 2\n[[datasets]]\n'
                            'name = "x"\nkind = "numpy"\npath = "x.npz"\n'))
    assert cfg.state_dir == tmp_path / "st" and cfg.workers == 2
    assert cfg.datasets[0]["path"] == str(tmp_path / "x.npz")
    assert (cfg.heartbeat_interval_s, cfg.heartbeat_timeout_s) == (1.0, 5.0)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("colour = 1\n", "'colour' is unknown"),
        ("workers = 0\n", "workers"),
        ("[heartbeat]\ninterval_s = 3\ntimeout_s = 2\n", "must exceed"),
        ("[heartbeat]\nperiod = 3\n", "interval_s, timeout_s"),
        ("health = 'yes'\n", "true or false"),
        ("datasets = 3\n", "datasets"),
        ("[x\n", "not valid TOML"),
    ],
)
def test_invalid_config(tmp_path, text, match):
    with pytest.raises(AgentConfigError, match=match):
        load_config(write(tmp_path, text))


def enrolled_state(sd):
    console, me = Identity.generate(), Identity.generate()
    kp = CurveKeyPair.generate()
    (sd / "keys").mkdir(parents=True)
    (sd / "keys" / "curve.json").write_text(json.dumps({"public": kp.public,
                                                       "secret": kp.secret}))
    me.save(sd / "keys" / "identity.key")
    (sd / "keys" / "coordinator.json").write_text(json.dumps(
        {"endpoint": "tcp://127.0.0.1:1", "public_key": CurveKeyPair.generate().public}))
    (sd / "roster.json").write_bytes(Roster.build({"s1": me.public_bytes()}, console).to_bytes())
    (sd / "enrolment.json").write_text(json.dumps(
        {"site": "s1", "roster_public_key": console.public_bytes().hex()}))
    return kp, me


def test_enrolled_state_is_read(tmp_path):
    kp, me = enrolled_state(tmp_path)
    e = load_enrolled(tmp_path)
    assert e.site == "s1" and e.curve_public == kp.public
    assert e.identity.public_bytes() == me.public_bytes() and "s1" in e.roster


def test_credentials_directory_overrides_secrets(tmp_path, monkeypatch):
    enrolled_state(tmp_path / "st")
    other = CurveKeyPair.generate()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "fedge_curve.key").write_text(other.secret + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    e = load_enrolled(tmp_path / "st")
    assert (e.curve_public, e.curve_secret) == (other.public, other.secret)


def test_a_bare_z85_secret_starting_with_a_brace_is_a_secret_not_json(tmp_path, monkeypatch):
    """'{' is a z85 character: one generated secret in 85 starts with it, and such a
    credential was read as JSON and refused (a flake of the test above in CI)."""
    enrolled_state(tmp_path / "st")
    for _ in range(2000):
        other = CurveKeyPair.generate()
        if other.secret.startswith("{"):
            break
    assert other.secret.startswith("{")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "fedge_curve.key").write_text(other.secret + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    e = load_enrolled(tmp_path / "st")
    assert (e.curve_public, e.curve_secret) == (other.public, other.secret)


def test_not_enrolled_and_corrupt(tmp_path):
    with pytest.raises(AgentConfigError, match="not enrolled"):
        load_enrolled(tmp_path)
    enrolled_state(tmp_path)
    (tmp_path / "roster.json").write_text("{}")
    with pytest.raises(AgentConfigError, match="corrupt"):
        load_enrolled(tmp_path)


@pytest.mark.parametrize("name", ["keys/coordinator.json", "keys/curve.json", "roster.json",
                                  "keys/identity.key", "enrolment.json"])
@pytest.mark.parametrize("content", [b"", b"\x00\xff garbage \xfe", b"{}"])
def test_each_corrupt_enrolment_file_is_named(tmp_path, monkeypatch, name, content):
    """Whichever enrolment file is damaged (empty, not UTF-8, or JSON lacking its
    fields), the one-line error names that file: hospital IT must not guess among
    them, two being secrets."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    enrolled_state(tmp_path)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(AgentConfigError) as info:
        load_enrolled(tmp_path)
    message = str(info.value)
    assert str(tmp_path / name) in message and "\n" not in message


def test_a_missing_enrolment_file_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    enrolled_state(tmp_path)
    (tmp_path / "keys" / "coordinator.json").unlink()
    with pytest.raises(AgentConfigError, match=r"keys/coordinator\.json is missing"):
        load_enrolled(tmp_path)


README = Path(__file__).resolve().parents[2] / "firmware" / "README.md"


def readme_enrolment_commands() -> list[list[str]]:
    """The shell lines of the firmware README's Enrolment section, split."""
    section = README.read_text().split("## Enrolment", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    return [shlex.split(line) for line in block.strip().splitlines()]


def test_the_firmware_readme_enrolment_steps_work_as_written(tmp_path, monkeypatch):
    """Enrol (the README's first line, through the real CLI), run its install and
    shred lines on real files, let "systemd" load the credential directory, start."""
    from datetime import UTC, datetime, timedelta

    from fedge.console.enrolment import create_enrolment
    from fedge.console.store import ConsoleStore

    console = ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://127.0.0.1:7000",
                                clock=lambda: datetime.now(UTC))
    file, _ = create_enrolment(console, "hospital-a", valid_for=timedelta(days=7))
    state, etc = tmp_path / "var-lib-fedge", tmp_path / "creds-agent"
    etc.mkdir()

    def here(arg: str) -> str:  # the credentials' path first: it starts as the state's
        return (arg.replace("/var/lib/fedge-credentials/agent", str(etc))
                .replace("/var/lib/fedge", str(state)))

    commands = readme_enrolment_commands()
    assert [c[0] for c in commands] == ["fedge", "install", "install", "shred", "systemctl"]
    enrol = commands[0]
    assert enrol[:3] == ["fedge", "agent", "enrol"]
    fingerprint = console.roster_public_key().hex()[:16]  # what `fedge console enrol` prints
    out = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "enrol", "--state-dir",
                          str(state), "--console-key", fingerprint, str(file)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    enrolled = load_enrolled(state)
    for argv in commands[1:4]:
        if argv[0] == "install":  # not root here: keep the mode, leave the owner
            assert argv[1:7] == ["-o", "root", "-g", "root", "-m", "0600"]
            argv = ["install", "-m", "0600", *argv[7:]]
        subprocess.run([here(a) for a in argv], check=True, timeout=30)
    assert not (state / "keys" / "curve.json").exists()
    assert not (state / "keys" / "identity.key").exists()
    assert sorted(p.name for p in etc.iterdir()) == ["curve.key", "identity.key"]

    # Without the unit (no $CREDENTIALS_DIRECTORY) the keys are gone: a clear error.
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(AgentConfigError, match="curve key not found") as err:
        load_enrolled(state)
    assert "CREDENTIALS_DIRECTORY is not set" in str(err.value)
    assert str(state / "keys" / "curve.json") in str(err.value)

    # LoadCredential=fedge:<dir>: each file becomes fedge_<name>.
    creds = tmp_path / "run-credentials"
    creds.mkdir()
    for f in etc.iterdir():
        shutil.copy(f, creds / f"fedge_{f.name}")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    e = load_enrolled(state)
    assert (e.curve_public, e.curve_secret) == (enrolled.curve_public, enrolled.curve_secret)
    assert e.identity.public_bytes() == enrolled.identity.public_bytes()
    assert e.site == "hospital-a"


def test_curve_credential_as_bare_z85_or_json_and_what_is_refused(tmp_path, monkeypatch):
    kp, _ = enrolled_state(tmp_path / "st")
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cred = creds / "fedge_curve.key"
    for text in (kp.secret + "\n", json.dumps({"public": kp.public, "secret": kp.secret}),
                 json.dumps({"secret": kp.secret})):
        cred.write_text(text)
        assert load_enrolled(tmp_path / "st").curve_public == kp.public
    for text, match in [("not-a-key", "no 40-character z85 secret key"),
                        ('{"public": "x"}', 'JSON without a "secret"'),
                        (json.dumps({"public": CurveKeyPair.generate().public,
                                     "secret": kp.secret}), "does not belong")]:
        cred.write_text(text)
        with pytest.raises(AgentConfigError, match=match) as err:
            load_enrolled(tmp_path / "st")
        assert str(cred) in str(err.value)
    cred.unlink()
    (creds / "fedge_identity.key").write_bytes(b"short")
    with pytest.raises(AgentConfigError, match=r"identity key .*fedge_identity\.key is corrupt"):
        load_enrolled(tmp_path / "st")


def test_the_sites_max_colluders_reaches_its_trainer(tmp_path):
    """The DP-FedAvg share is sized for K - f honest sites only if the agent builds
    its trainer with the policy's f (a TorchTrainer built without it sizes for K)."""
    from fedge.agent.process import make_trainer

    for f in (0, 2):
        cfg = load_config(write(tmp_path, f'state_dir = "st"\n[privacy]\nmax_colluders = {f}\n'
                                '[[datasets]]\nname = "x"\nkind = "numpy"\npath = "x.npz"\n'))
        assert cfg.policy.max_colluders == f
        assert make_trainer(cfg).max_colluders == f
