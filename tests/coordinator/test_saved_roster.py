"""The roster the console installed last is kept in the state directory
(state_dir/roster.json), written atomically, and checked against the roster key
when a coordinator starts: a copy that does not verify (torn by a crash under a
release that wrote it in place, emptied, damaged) is passed over, naming the file,
rather than sent to every agent and left to block every later roster install."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedge.coordinator.config import load_config
from fedge.coordinator.process import build_coordinator
from fedge.coordinator.service import Coordinator
from fedge.secagg.keys import Identity, Roster
from fedge.transport import CurveKeyPair, save_keypair

ROSTER_FILE = "roster.json"  # fedge.coordinator.service.ROSTER_FILE


@pytest.fixture
def setup(tmp_path: Path):
    console = Identity.generate()
    a, b = Identity.generate(), Identity.generate()
    entries = {"site-a": a.public_bytes(), "site-b": b.public_bytes()}

    def roster(serial: int, keep: tuple[str, ...] = ("site-a", "site-b")) -> bytes:
        return Roster.build({s: entries[s] for s in keep}, console, serial=serial).to_bytes()

    save_keypair(tmp_path / "keys", "coordinator", CurveKeyPair.generate())
    (tmp_path / "roster.json").write_bytes(roster(1))
    state = tmp_path / "state"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{state}"\nbind = "tcp://127.0.0.1:0"\n'
                   f'curve_key = "{tmp_path / "keys" / "coordinator.key_secret"}"\n'
                   f'roster = "{tmp_path / "roster.json"}"\n'
                   f'roster_public_key = "{console.public_bytes().hex()}"\n')
    return load_config(cfg), console, roster


def test_a_torn_saved_roster_does_not_block_the_next_roster_install(setup, caplog):
    conf, _, roster = setup
    coord = build_coordinator(conf)
    coord.set_roster(roster(2))
    coord.store.close()
    saved = conf.state_dir / ROSTER_FILE
    assert saved.read_bytes() == roster(2)
    saved.write_bytes(roster(2)[:len(roster(2)) // 2])  # what a kill mid-write left

    with caplog.at_level(logging.ERROR, logger="fedge.coordinator"):
        coord = build_coordinator(conf)
    try:
        assert coord.roster != saved.read_bytes()  # never sent to the agents
        assert any(str(saved) in r.getMessage() and "not a valid console-signed roster"
                   in r.getMessage() for r in caplog.records)
        revoking = roster(3, keep=("site-a",))
        coord.set_roster(revoking)  # the console can revoke again
        assert coord.roster == revoking
        assert saved.read_bytes() == revoking
    finally:
        coord.store.close()


def test_an_empty_saved_roster_falls_back_to_the_configured_one(setup, caplog):
    conf, _, roster = setup
    conf.state_dir.mkdir(parents=True, exist_ok=True)
    (conf.state_dir / ROSTER_FILE).write_bytes(b"")  # cut between O_TRUNC and the write
    with caplog.at_level(logging.ERROR, logger="fedge.coordinator"):
        coord = Coordinator(conf.state_dir, roster=conf.roster,
                            roster_public_key=conf.roster_public_key)
    try:
        assert coord.roster == roster(1)
        assert any(ROSTER_FILE in r.getMessage() for r in caplog.records)
        with pytest.raises(ValueError, match="older than the one in force"):
            coord.set_roster(roster(0))  # the serial check still holds
    finally:
        coord.store.close()


def test_a_newer_valid_saved_roster_is_kept_over_the_configured_one(setup):
    conf, _, roster = setup
    conf.state_dir.mkdir(parents=True, exist_ok=True)
    (conf.state_dir / ROSTER_FILE).write_bytes(roster(4, keep=("site-a",)))
    coord = Coordinator(conf.state_dir, roster=conf.roster,
                        roster_public_key=conf.roster_public_key)
    try:
        assert coord.roster == roster(4, keep=("site-a",))
    finally:
        coord.store.close()


def test_set_roster_leaves_no_partial_file_behind(setup):
    conf, _, roster = setup
    coord = build_coordinator(conf)
    try:
        for serial in (2, 3, 4):
            coord.set_roster(roster(serial))
        files = sorted(p.name for p in conf.state_dir.iterdir() if "roster" in p.name)
        assert files == [ROSTER_FILE]
        assert (conf.state_dir / ROSTER_FILE).read_bytes() == roster(4)
    finally:
        coord.store.close()


def test_build_coordinator_falls_back_to_the_configured_roster_past_a_torn_saved_one(setup):
    """The process passed the saved file's bytes as the configured roster, so a torn
    saved file left the coordinator with no roster at all (nothing to weigh against)."""
    conf, _, roster = setup
    conf.state_dir.mkdir(parents=True, exist_ok=True)
    (conf.state_dir / ROSTER_FILE).write_bytes(roster(2)[:40])
    coord = build_coordinator(conf)
    try:
        assert coord.roster == roster(1)
    finally:
        coord.store.close()
