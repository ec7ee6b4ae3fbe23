"""`fedge agent check` on an appliance set up as firmware/README.md says: `fedge agent
enrol`, then the two secret keys moved into the unit's credentials source
(/var/lib/fedge-credentials/agent, root's, 0700: LoadCredential= hands them to the
agent as $CREDENTIALS_DIRECTORY/fedge_*.key) and shredded from keys/. The documented
`sudo -u fedge fedge agent check --config /etc/fedge/agent.toml` then exited 2
"appliance curve key not found" although the service started fine: check never looked
where the unit takes the keys from.

Now check looks there as the next start will get them: readable (run as root), the
keys there are loaded and checked as start checks them; root's and not readable by
this user, it says so in a warning and exits 0; nowhere, the error names every place.

The real CLI in a subprocess. The credentials source is fedge.agent.process.
CREDENTIALS_SOURCE, pointed at a directory under tmp_path in that process (the real
path is system-wide); one test binds a directory over /var/lib in a private mount
namespace to check the path itself (skipped where that is not permitted). Another
user's files without a second user: as root, the process runs with CAP_DAC_OVERRIDE
and CAP_DAC_READ_SEARCH dropped (setpriv) and the files belong to uid 65534."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import zmq

from fedge.agent.enrol import install_enrolment
from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleStore

REPO = Path(__file__).resolve().parents[2]
UNIT_SOURCE = "/var/lib/fedge-credentials/agent"  # packaging/systemd/fedge-agent.service
NODAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
         "--inh-caps", "-dac_override,-dac_read_search", "--"]
# the real CLI, with the unit's credentials source at sys.argv[1]
CHECK = r'''
import sys
import fedge.agent.process
fedge.agent.process.CREDENTIALS_SOURCE = sys.argv.pop(1)
from fedge.cli import main
sys.exit(main(["agent", "check", "--config", sys.argv[1]]))
'''


def test_the_constant_is_the_units_load_credential_source() -> None:
    from fedge.agent.process import CREDENTIALS_SOURCE

    unit = (REPO / "packaging" / "systemd" / "fedge-agent.service").read_text()
    assert f"\nLoadCredential=fedge:{CREDENTIALS_SOURCE}\n" in unit
    assert CREDENTIALS_SOURCE == UNIT_SOURCE


def appliance(tmp_path: Path, coordinator: str = "tcp://192.0.2.7:7000") -> tuple[Path, Path]:
    """An enrolled state dir and its agent.toml."""
    console = ConsoleStore.init(tmp_path / "console", coordinator_endpoint=coordinator)
    file, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                               out=tmp_path / "h1.fedge-enrol")
    state = tmp_path / "state"
    install_enrolment(file, state)
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{state}"\n[eligibility]\nallow_cpu_only = true\n')
    return state, config


def move_keys(state: Path, source: Path) -> None:
    """firmware/README.md, Enrolment: install -m 0600 ..., then shred -u."""
    source.mkdir(parents=True, mode=0o700)
    shutil.copy(state / "keys" / "curve.json", source / "curve.key")
    shutil.copy(state / "keys" / "identity.key", source / "identity.key")
    for name in ("curve.key", "identity.key"):
        (source / name).chmod(0o600)
    (state / "keys" / "curve.json").unlink()
    (state / "keys" / "identity.key").unlink()


def check(config: Path, source: Path, *, service_user: bool = False
          ) -> subprocess.CompletedProcess[str]:
    prefix = []
    if service_user:
        if os.geteuid() == 0 and shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot drop CAP_DAC_OVERRIDE")
        prefix = NODAC if os.geteuid() == 0 else []
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([*prefix, sys.executable, "-c", CHECK, str(source), str(config)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def foreign(path: Path) -> None:
    """`path` as root's credentials are to the service user: not readable by it."""
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    else:
        path.chmod(0)


def test_keys_moved_as_documented_are_said_not_read_and_check_passes(tmp_path) -> None:
    """The reviewer's case: root's 0700 directory, which the service user cannot even
    search (whether it holds the keys is not known to it)."""
    state, config = appliance(tmp_path)
    source = tmp_path / "credentials" / "agent"
    move_keys(state, source)
    foreign(source)
    try:
        r = check(config, source, service_user=True)
    finally:
        source.chmod(0o700)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"ok: {config}\n"
    assert r.stderr == (
        f"warning: the secret keys are not in {state / 'keys'}, so the unit must take them "
        f"from {source} (root's; the unit hands them over as credentials), which this "
        f"check cannot read as user {user()}; run it as root to check them too\n")


def test_keys_seen_in_the_source_but_not_readable_are_said_not_read(tmp_path) -> None:
    """The directory searchable, the files root's 0600: the unit takes these, so the
    state dir's (left there, not shredded) are not what check may vouch for."""
    state, config = appliance(tmp_path)
    source = tmp_path / "credentials" / "agent"
    move_keys(state, source)
    source.chmod(0o755)
    (state / "keys" / "identity.key").write_bytes((source / "identity.key").read_bytes())
    for name in ("curve.key", "identity.key"):
        foreign(source / name)
    try:
        r = check(config, source, service_user=True)
    finally:
        for name in ("curve.key", "identity.key"):
            (source / name).chmod(0o600)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"ok: {config}\n"
    assert r.stderr == (
        f"warning: the secret keys are in {source} (root's; the unit hands them over as "
        "credentials): not read by this check; run it as root to check them too\n")


def test_as_root_the_keys_in_the_source_are_read_and_checked(tmp_path) -> None:
    """As start reads them: a good pair passes without a word; a key that is not one
    is refused naming the file; another key than the enrolled one is warned of."""
    state, config = appliance(tmp_path)
    source = tmp_path / "credentials" / "agent"
    move_keys(state, source)
    r = check(config, source)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"ok: {config}\n", "")

    good = (source / "curve.key").read_bytes()
    (source / "curve.key").write_text("not a key\n")
    r = check(config, source)
    assert r.returncode == 2
    assert r.stderr == (f"fedge agent: CURVE key {source / 'curve.key'} holds no 40-character "
                        "z85 secret key (expected that, or the JSON `fedge agent enrol` "
                        "writes)\n")

    public, secret = zmq.curve_keypair()
    (source / "curve.key").write_bytes(secret)  # the bare z85 secret, as the unit takes it
    r = check(config, source)
    assert r.returncode == 0, r.stderr
    assert (f"warning: using the CURVE key {public.decode()} from {source / 'curve.key'}, "
            "which is not the key enrolled last") in r.stderr
    (source / "curve.key").write_bytes(good)


def test_keys_nowhere_are_an_error_naming_every_place(tmp_path) -> None:
    state, config = appliance(tmp_path)
    source = tmp_path / "credentials" / "agent"
    move_keys(state, source)
    (source / "curve.key").unlink()
    r = check(config, source, service_user=True)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr == (
        "fedge agent: appliance curve key not found: looked at "
        "$CREDENTIALS_DIRECTORY/fedge_curve.key (CREDENTIALS_DIRECTORY is not set: the agent "
        f"is not running under its unit) and {source / 'curve.key'} and "
        f"{state / 'keys' / 'curve.json'}\n")


def test_the_units_own_path_in_a_private_mount_namespace(tmp_path) -> None:
    """No patched constant: a directory bound over /var/lib for this process only."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        pytest.skip("needs root, unshare and setpriv")
    state, config = appliance(tmp_path)
    varlib = tmp_path / "varlib"
    move_keys(state, varlib / "fedge-credentials" / "agent")
    (varlib / "fedge-credentials").chmod(0o700)
    foreign(varlib / "fedge-credentials" / "agent")
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /var/lib && exec "$@"', str(varlib)]
    cli = [sys.executable, "-m", "fedge.cli", "agent", "check", "--config", str(config)]
    probe = subprocess.run([*argv, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()}")
    as_fedge = subprocess.run([*argv, *NODAC, *cli], capture_output=True, text=True,
                              timeout=120, env=env, cwd=REPO)
    assert as_fedge.returncode == 0, as_fedge.stderr
    assert (f"so the unit must take them from {UNIT_SOURCE} (root's; the unit hands them "
            "over as credentials)") in as_fedge.stderr
    as_root = subprocess.run([*argv, *cli], capture_output=True, text=True, timeout=120,
                             env=env, cwd=REPO)
    assert (as_root.returncode, as_root.stderr) == (0, ""), as_root.stderr
