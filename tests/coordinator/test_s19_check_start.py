"""`fedge coordinator check` sees what `fedge coordinator run` meets at start beyond the
file itself (s19): it said "ok" for a config run then failed to start on -- its port
held by another process, a bind host that is no address of this host, a state
directory the service user cannot write -- and a restart was the only full check.

Now each is said, as run would fail on it (exit 2; a jobs/ it cannot write, exit 1:
run starts, each job fails; an admin channel that cannot listen, a warning: run
serves without it), without starting, locking, listening or writing anything: check
runs beside the running coordinator, and a port that coordinator holds (it holds the
state directory's lock) is a note, not a problem.

The real CLI in a subprocess, real sockets on loopback, a real coordinator. Another
user's view without a second user: as root, the process runs with CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH dropped (setpriv), so mode bits bind it as they bind the service
user."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.coordinator.test_s17_coord_config_bom import provision

REPO = Path(__file__).resolve().parents[2]
NODAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
         "--inh-caps", "-dac_override,-dac_read_search", "--"]


def fedge(*argv: str, service_user: bool = False) -> subprocess.CompletedProcess[str]:
    prefix: list[str] = []
    if service_user and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot drop CAP_DAC_OVERRIDE")
        prefix = NODAC
    return subprocess.run([*prefix, sys.executable, "-m", "fedge.cli", "coordinator", *argv],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(tmp_path: Path, bind: str, admin: str = "") -> Path:
    """A config whose provision file tells the appliances `bind`, and the console `admin`
    (no port warnings)."""
    import json

    prov = provision(tmp_path)
    told = {"endpoint": bind} | ({"admin_endpoint": admin} if admin else {})
    prov.write_text(json.dumps(json.loads(prov.read_text()) | told))
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'state_dir = "st"\nprovision = "prov.json"\nbind = "{bind}"\n'
                   + (f'[admin]\nendpoint = "{admin}"\n' if admin else ""))
    return cfg


def user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


@pytest.fixture
def held() -> object:
    """A port held by a plain socket of this process, listening on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "*", "0.0.0.0", "localhost"])
def test_a_port_another_process_holds_is_refused_naming_it(tmp_path, held, host) -> None:
    cfg = config(tmp_path, f"tcp://{host}:{held}")
    done = fedge("check", "--config", str(cfg))
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(
        f"fedge coordinator: bind = 'tcp://{host}:{held}' in {cfg}: port {held} is in use by "
        f"another process: pid {os.getpid()} ("), line
    assert line.endswith("): the coordinator cannot listen for the appliances there and "
                         "stops"), line
    assert not (tmp_path / "st").exists()  # nothing made


def test_a_bind_host_that_is_no_address_of_this_host_is_refused(tmp_path) -> None:
    cfg = config(tmp_path, "tcp://192.0.2.1:7700")  # TEST-NET-1
    done = fedge("check", "--config", str(cfg))
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr == (
        f"fedge coordinator: bind = 'tcp://192.0.2.1:7700' in {cfg}: this host cannot listen "
        "there: 192.0.2.1 is not an address of this host: the coordinator cannot listen for "
        "the appliances there and stops\n")


def test_an_admin_port_another_process_holds_is_warned_of(tmp_path, held) -> None:
    """Run serves the federation without the channel (retried), so check warns."""
    cfg = config(tmp_path, f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{held}")
    done = fedge("check", "--config", str(cfg))
    assert (done.returncode, done.stdout) == (0, f"ok: {cfg}\n"), done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(
        f"warning: the admin channel's endpoint tcp://127.0.0.1:{held} in {cfg}: port "
        f"{held} is in use by another process: pid {os.getpid()} ("), line
    assert "the admin channel fails to start" in line, line


def start(cfg: Path, state: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                             "--config", str(cfg)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    for _ in range(600):  # up to 60 s: it writes the endpoint once it listens
        if (state / "endpoint").exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    if proc.poll() is not None:
        pytest.fail(f"the coordinator did not start: {proc.communicate()[1]}")
    assert (state / "endpoint").exists()
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def test_check_beside_the_running_coordinator_says_ok_and_disturbs_nothing(tmp_path) -> None:
    port, admin = free_port(), free_port()
    cfg = config(tmp_path, f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{admin}")
    state = tmp_path / "st"
    proc = start(cfg, state)
    try:
        done = fedge("check", "--config", str(cfg))
        assert (done.returncode, done.stdout) == (0, f"ok: {cfg}\n"), done.stderr
        assert done.stderr.splitlines() == [
            f"note: bind = 'tcp://127.0.0.1:{port}' in {cfg}: port {port} is in use by the "
            f"running coordinator (pid {proc.pid}); it holds {state}'s lock",
            f"note: the admin channel's endpoint tcp://127.0.0.1:{admin} in {cfg}: port "
            f"{admin} is in use by the running coordinator (pid {proc.pid}); it holds "
            f"{state}'s lock"]
        # the config edited to a port another process holds: refused all the same
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            taken = other.getsockname()[1]
            edited = tmp_path / "edited.toml"
            edited.write_text(cfg.read_text().replace(f":{port}\"", f":{taken}\""))
            done = fedge("check", "--config", str(edited))
        assert done.returncode == 2, done.stderr
        assert (f"port {taken} is in use by another process: pid {os.getpid()} ("
                in done.stderr), done.stderr
        # the coordinator still runs, its lock and port its own
        assert proc.poll() is None
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        again = fedge("run", "--config", str(cfg))
        assert again.returncode == 2 and "is running on state directory" in again.stderr
    finally:
        stop(proc)


def test_an_unwritable_state_dir_is_refused_naming_it_and_the_user(tmp_path) -> None:
    cfg = config(tmp_path, f"tcp://127.0.0.1:{free_port()}")
    state = tmp_path / "st"
    state.mkdir(mode=0o500)
    state.chmod(0o500)
    try:
        done = fedge("check", "--config", str(cfg), service_user=True)
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert done.stderr == (
            f"fedge coordinator: state_dir {state} (mode 0500, owner {user()}) cannot be "
            f"written as user {user()}: `fedge coordinator run` as user {user()} would stop "
            "at start; give the service user the directory (chown -R), or point state_dir "
            "at one it owns\n")
        # as run does stop, as that user
        ran = fedge("run", "--config", str(cfg), service_user=True)
        assert ran.returncode == 2 and f"cannot open the coordinator lock {state}" in ran.stderr
        assert list(state.iterdir()) == []
    finally:
        state.chmod(0o700)


def test_a_database_the_user_cannot_write_is_refused(tmp_path) -> None:
    """`fedge coordinator run` run once by hand as root left root's database behind."""
    from fedge.coordinator.store import DB_NAME

    cfg = config(tmp_path, f"tcp://127.0.0.1:{free_port()}")
    state = tmp_path / "st"
    state.mkdir(mode=0o700)
    db = state / DB_NAME
    db.write_bytes(b"")
    db.chmod(0o444)
    done = fedge("check", "--config", str(cfg), service_user=True)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.startswith(
        f"fedge coordinator: its file {db} (mode 0444, owner {user()}) cannot be written as "
        f"user {user()}: "), done.stderr


def test_a_state_dir_that_cannot_be_made_is_refused(tmp_path) -> None:
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o500)
    parent.chmod(0o500)
    cfg = config(tmp_path, f"tcp://127.0.0.1:{free_port()}")
    cfg.write_text(cfg.read_text().replace('state_dir = "st"', 'state_dir = "locked/st"'))
    try:
        done = fedge("check", "--config", str(cfg), service_user=True)
    finally:
        parent.chmod(0o700)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.startswith(
        f"fedge coordinator: state_dir {parent / 'st'} does not exist, and the directory it "
        f"would be made in, {parent} (mode 0500, owner {user()}) cannot be written as user "
        f"{user()}: "), done.stderr


def test_a_jobs_dir_the_user_cannot_write_exits_1(tmp_path) -> None:
    """Run starts; each job's checkpoints and outputs fail."""
    cfg = config(tmp_path, f"tcp://127.0.0.1:{free_port()}")
    jobs = tmp_path / "st" / "jobs"
    jobs.mkdir(parents=True)
    jobs.chmod(0o500)
    try:
        done = fedge("check", "--config", str(cfg), service_user=True)
    finally:
        jobs.chmod(0o700)
    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    assert done.stderr == (
        f"fedge coordinator: the job directory {jobs} (mode 0500, owner {user()}) cannot be "
        f"written as user {user()}: `fedge coordinator run` starts, but no job's "
        "checkpoints and outputs can be written: each job fails\n")


def nobody() -> object:
    import pwd

    if os.geteuid() != 0:
        pytest.skip("needs root: --user looks as another user")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")


def test_root_looks_at_the_state_dir_as_the_service_user_with_user(request, tmp_path
                                                                   ) -> None:
    """The documented `sudo fedge coordinator check` runs as root (the provision file is
    root's), and root writes anywhere: --user NAME looks as the service user does."""
    entry = nobody()
    # nobody may reach st, as the unit's user reaches /var/lib (pytest's tmp_path is
    # under root's 0700 directory)
    base = Path(tempfile.mkdtemp(prefix="s19-check-user-"))
    request.addfinalizer(lambda: shutil.rmtree(base))
    base.chmod(0o755)
    cfg = config(base, f"tcp://127.0.0.1:{free_port()}")
    state = base / "st"
    state.mkdir(mode=0o700)
    done = fedge("check", "--config", str(cfg))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ok: {cfg}\n", "")
    done = fedge("check", "--config", str(cfg), "--user", "nobody")
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr == (
        f"fedge coordinator: state_dir {state} (mode 0700, owner root) cannot be written "
        "as user nobody: `fedge coordinator run` as user nobody would stop at start; give "
        "the service user the directory (chown -R), or point state_dir at one it owns\n")
    os.chown(state, entry.pw_uid, entry.pw_gid)
    done = fedge("check", "--config", str(cfg), "--user", "nobody")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ok: {cfg}\n", "")
    unreached = tmp_path / "st"  # under pytest's directory, root's and 0700
    cfg.write_text(cfg.read_text().replace('state_dir = "st"', f'state_dir = "{unreached}"'))
    done = fedge("check", "--config", str(cfg), "--user", "nobody")
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.startswith(
        f"fedge coordinator: state_dir {unreached} cannot be reached as user nobody: "
        f"Permission denied: {unreached}: "), done.stderr
    done = fedge("check", "--config", str(cfg), "--user", "no-such-user-s19")
    assert (done.returncode, done.stderr) == (
        2, "fedge coordinator check: --user no-such-user-s19: no such user\n")
