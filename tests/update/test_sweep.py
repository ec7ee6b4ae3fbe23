"""Temporaries that killed writes leave are removed when their owner is next opened:
software slots half unpacked, model staging directories, write_atomic's temp files.
One a live writer holds, or just made, is left; real slots and versions never go."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from fedge.serve.repository import ModelRepository
from fedge.update.ab import SlotInstaller
from fedge.update.files import TEMP_GRACE_S, holding, remove_stale_temps, write_atomic

ROOT = Path(__file__).resolve().parents[2]


def age(path: Path, seconds: float = 10 * TEMP_GRACE_S) -> Path:
    """Make ``path`` look last modified ``seconds`` ago (the grace is about time)."""
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)
    return path


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def paused_child(tmp_path: Path, code: str, *args: object) -> subprocess.Popen[bytes]:
    """Run ``code`` (argv: the file to write when paused, then ``args``) in a child
    that writes that file at the pause it sets up, where a patched call blocks for
    ever; returns once the child is there."""
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(ready), *map(str, args)], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert child.poll() is None, f"child exited with {child.returncode}"
        assert time.monotonic() < deadline, "child never reached its pause"
        time.sleep(0.02)
    return child


def kill(child: subprocess.Popen[bytes]) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.wait()


def tar_bundle(path: Path, version: str) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in {"fedge-bundle.json": b'{"exec": ["true"]}',
                           "site-packages/blob": os.urandom(1 << 16),
                           "v": version.encode()}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path


PAUSED_UNPACK = r"""
import sys, tarfile, time
from pathlib import Path
from fedge.update.ab import SlotInstaller
real = tarfile.TarFile.extractall
def extract_then_stop(self, path, **kw):
    real(self, path, **kw)  # the slot is all there, not yet renamed: killed now
    Path(sys.argv[1]).write_text("x")
    time.sleep(3600)
tarfile.TarFile.extractall = extract_then_stop
SlotInstaller(sys.argv[2]).unpack("0.3.0", sys.argv[3])
"""


def test_a_slot_left_by_an_unpack_killed_mid_way_is_removed_on_open_not_while_unpacking(
        tmp_path):
    root = tmp_path / "software"
    installer = SlotInstaller(root)
    installer.unpack("0.2.0", tar_bundle(tmp_path / "old.tar.gz", "0.2.0"))
    installer.switch("0.2.0")
    bundle = tar_bundle(tmp_path / "fedge-0.3.0.tar.gz", "0.3.0")
    child = paused_child(tmp_path, PAUSED_UNPACK, root, bundle)
    try:
        (leftover,) = [p for p in (root / "slots").iterdir() if p.name.startswith(".0.3.0.")]
        age(leftover)
        SlotInstaller(root)  # another process opens the installer meanwhile
        assert leftover.is_dir(), "a slot a live process is unpacking was removed"
    finally:
        kill(child)
    assert (leftover / "site-packages" / "blob").is_file()  # what SIGKILL left

    SlotInstaller(root)
    assert not leftover.exists()
    assert sorted(p.name for p in (root / "slots").iterdir()) == ["0.2.0"]
    assert installer.current_version() == "0.2.0" and (root / "slots/0.2.0/v").exists()
    # the retry of the same version leaves the slot and nothing else
    SlotInstaller(root).unpack("0.3.0", bundle)
    assert sorted(p.name for p in (root / "slots").iterdir()) == ["0.2.0", "0.3.0"]


def test_a_fresh_or_held_temporary_slot_stays_and_nothing_else_is_touched(tmp_path):
    root = tmp_path / "software"
    slots = root / "slots"
    SlotInstaller(root).unpack("1.0", tar_bundle(tmp_path / "b.tar.gz", "1.0"))
    SlotInstaller(root).switch("1.0")
    fresh = Path(tempfile.mkdtemp(prefix=".1.1.", dir=slots))  # just made, not yet held
    held = age(Path(tempfile.mkdtemp(prefix=".1.2.", dir=slots)))
    stale = age(Path(tempfile.mkdtemp(prefix=".1.3.", dir=slots)))
    (stale / "x").write_text("half a slot")
    age(stale)
    others = [slots / ".hidden-by-hand", slots / ".1.4.not-rand",
              slots / "1.0" / ".1.5.abcdefgh"]  # below a slot: not swept
    for p in others:
        p.mkdir()
        age(p)
    with holding(held):
        SlotInstaller(root)
    assert fresh.is_dir() and held.is_dir() and not stale.exists()
    assert all(p.is_dir() for p in others) and (slots / "1.0" / "v").is_file()
    assert (root / "current").is_symlink()


def test_write_atomic_temps_left_by_a_killed_write_go_when_the_slot_root_is_opened(tmp_path):
    root = tmp_path / "software"
    root.mkdir()
    write_atomic(root / "pending.json", b'{"version": "1"}')
    child = paused_child(tmp_path, r"""
import os, sys, time
from pathlib import Path
from fedge.update import files
def stop(src, dst):
    Path(sys.argv[1]).write_text("x")
    time.sleep(3600)
files.os.replace = stop
files.write_atomic(Path(sys.argv[2]) / "pending.json", b'{"version": "2"}')
""", root)
    try:
        (temp,) = [p for p in root.iterdir() if p.name.startswith(".pending.json.")]
        age(temp)
        SlotInstaller(root)
        assert temp.exists(), "a temp a live write holds was removed"
    finally:
        kill(child)
    SlotInstaller(root)
    assert hidden(root) == [] and (root / "pending.json").read_bytes() == b'{"version": "1"}'


def test_remove_stale_temps_takes_only_its_pattern_and_kind(tmp_path):
    keep = {".config": "f", "state.json": "f", ".state.json.abcdefgh": "d",
            ".link.abcdefgh": "l", ".state.json.abcdefg": "f"}
    for name, kind in keep.items():
        p = tmp_path / name
        if kind == "f":
            p.write_text("")
        elif kind == "d":
            p.mkdir()
        else:
            p.symlink_to(tmp_path / "state.json")
        age(p)
    gone = tmp_path / ".state.json.k2_9zzzz"
    gone.write_text("torn")
    age(gone)
    assert remove_stale_temps(tmp_path) == [gone]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert remove_stale_temps(tmp_path / "missing") == []


@pytest.fixture
def onnx_model():
    from tests.update.conftest import tiny_onnx

    return tiny_onnx(1.0)


def test_model_staging_left_by_a_killed_install_is_removed_on_open(tmp_path, onnx_model):
    repo = ModelRepository(tmp_path / "models")
    assert repo.install("cox", onnx_model) == 1
    assert repo.install("cox", onnx_model) == 2
    retired = repo.retire("cox", 1)
    base = tmp_path / "models" / "cox"
    stale = Path(tempfile.mkdtemp(prefix=".incoming-", dir=base))
    (stale / "model.onnx").write_bytes(onnx_model[:10])  # the install died mid-write
    age(stale)
    held = age(Path(tempfile.mkdtemp(prefix=".incoming-", dir=base)))
    fresh = Path(tempfile.mkdtemp(prefix=".incoming-", dir=base))
    with holding(held):
        again = ModelRepository(tmp_path / "models")
    assert not stale.exists() and held.is_dir() and fresh.is_dir() and retired.is_dir()
    assert again.versions("cox") == [2]
    assert again.install("cox", onnx_model) == 3  # numbering goes on past the retired one
    assert ModelRepository(tmp_path / "no-such-root").models() == []
