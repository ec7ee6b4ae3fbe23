"""`fedge console init` on a disk that fills while it writes, then init again once
there is room. console.json was written before coordinator-provision.json: the first
run said "[Errno 28] No space left on device", naming no file, and every rerun said
"already holds a console; refusing to overwrite its keys", with no provision file to
give the coordinator. Now the error names the file, console.json is written last (a
home without it holds no console, and a rerun starts afresh), and a console.json an
older release left without its provision file is finished by init when that console
was never used.

The full disk is a file-size limit (RLIMIT_FSIZE) on the real CLI in a subprocess: the
provision file (~4 KB) is the one file of init larger than 2 KB, so a 2 KB limit
refuses it and nothing else, as a disk filling up at that moment would."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from fedge.console.store import ConsoleStore
from fedge.secagg.keys import Identity
from fedge.update.files import curve_keypair

ENDPOINT = "tcp://127.0.0.1:7000"


def init(home: Path, *extra: str, fsize: int | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if fsize is not None:
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, hard))

    return subprocess.run([sys.executable, "-m", "fedge.cli", "console", "--home", str(home),
                           "init", "--coordinator", ENDPOINT, *extra], capture_output=True,
                          text=True, timeout=120, preexec_fn=limit)


def assert_whole(home: Path) -> None:
    """A console that opens, with a provision file of its own keys."""
    store = ConsoleStore(home)
    provision = json.loads((home / "coordinator-provision.json").read_text())
    assert provision["console_id"] == store.console_id
    assert provision["curve_public"] == store.coordinator_public_key
    assert provision["roster_public_key"] == store.roster_public_key().hex()
    assert provision["tuf_root"].encode() == store.root_bytes()


def test_an_init_the_disk_cut_short_names_the_file_and_a_rerun_finishes(
        tmp_path: Path) -> None:
    home = tmp_path / "console"
    first = init(home, fsize=2048)
    assert first.returncode == 1
    provision = home / "coordinator-provision.json"
    assert first.stderr == (f"fedge console: console init in {home} did not finish: cannot "
                            f"write {provision}: File too large. Nothing in {home} is in use "
                            "yet: free space (or mend the permissions) and run init again, "
                            "which starts afresh\n")
    assert not (home / "console.json").exists()  # no console: a rerun starts afresh
    assert [p.name for p in home.iterdir() if p.name.startswith(".")] == []  # no temporaries
    again = init(home)  # room again
    assert again.returncode == 0, again.stderr
    assert f"console created in {home}" in again.stdout
    assert_whole(home)


def test_cut_short_earlier_in_the_keys(tmp_path: Path) -> None:
    home = tmp_path / "console"
    first = init(home, fsize=1024)  # tuf/1.root.json (~1.9 KB) is refused
    assert first.returncode == 1
    assert f"cannot write {home / 'tuf' / '1.root.json'}: File too large" in first.stderr
    assert init(home).returncode == 0
    assert_whole(home)


def test_a_console_json_left_without_its_provision_file_is_finished(tmp_path: Path) -> None:
    """What the older order left: console.json, and no coordinator-provision.json."""
    home = tmp_path / "console"
    assert init(home).returncode == 0
    made = ConsoleStore(home)
    (home / "coordinator-provision.json").unlink()
    other = init(home, "--admin-endpoint", "tcp://127.0.0.1:9999")
    assert other.returncode == 1
    assert (f"{home} holds a console whose init did not finish: console.json, but no "
            f"coordinator-provision.json, for coordinator {ENDPOINT} (admin "
            "tcp://127.0.0.1:7001, operators admin:admin, viewer:viewer). It was never used: "
            f"run init again with those to finish it, or remove {home} to start afresh"
            in other.stderr)
    assert not (home / "coordinator-provision.json").exists()
    done = init(home)
    assert done.returncode == 0, done.stderr
    assert ConsoleStore(home).console_id == made.console_id  # the same keys, finished
    assert_whole(home)
    assert "already holds a console; refusing to overwrite its keys" in init(home).stderr


def test_a_console_in_use_is_never_overwritten(tmp_path: Path) -> None:
    home = tmp_path / "console"
    assert init(home).returncode == 0
    store = ConsoleStore(home)
    store.add_site("site-a", curve_keypair()[0], Identity.generate().public_bytes())
    (home / "coordinator-provision.json").unlink()
    refused = init(home)
    assert refused.returncode == 1
    assert (f"{home} already holds a console; refusing to overwrite its keys (its "
            "coordinator-provision.json is not there, but sites were enrolled or keys "
            "rotated since its init: it is in use)") in refused.stderr
    assert ConsoleStore(home).sites().keys() == {"site-a"}
    assert not (home / "coordinator-provision.json").exists()
