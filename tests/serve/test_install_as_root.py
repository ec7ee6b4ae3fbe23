"""`sudo fedge export --install` / `--out` into directories the less trusted service
user owns (its models/, the coordinator's jobs/<id>/): a symlink that user planted
there gets root to create nothing outside, and what is installed is that user's.

Real root, a real throwaway unprivileged user (useradd -M, removed after), symlinks
planted as that user (runuser), the real repository and the real `fedge export`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from fedge.coordinator.checkpoint import Checkpoint, final_path, save_checkpoint
from fedge.serve.repository import ModelRepository
from fedge.train.api import ModelSpec, build_model, flatten

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("useradd") is None
    or shutil.which("runuser") is None,
    reason="needs root, useradd and runuser: root installs for another user")

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 3

[model]
name = "cox_mlp"
params = { in_features = 39, hidden = [8] }
"""


@pytest.fixture
def user():
    """A throwaway unprivileged user standing in for `fedge`: (name, uid, gid)."""
    import pwd

    name = f"fx{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "-M", "-s", "/bin/sh", name], check=True, timeout=60)
    try:
        pw = pwd.getpwnam(name)
        yield name, pw.pw_uid, pw.pw_gid
    finally:
        subprocess.run(["userdel", name], timeout=60, check=False)


@pytest.fixture
def base():
    """A directory the throwaway user can reach (pytest's tmp_path is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="fedge-install-root-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def owned_dir(path: Path, user) -> Path:
    path.mkdir(mode=0o755)
    os.chown(path, user[1], user[2])
    return path


def as_user(name: str, script: str) -> None:
    subprocess.run(["runuser", "-u", name, "--", "sh", "-ec", script], check=True,
                   timeout=60)


def root_dir(base: Path) -> Path:
    target = base / "rootdir"
    target.mkdir()
    os.chmod(target, 0o755)
    (target / "x").write_text("root only\n")
    return target


def untouched(target: Path) -> bool:
    return (sorted(p.name for p in target.iterdir()) == ["x"]
            and target.stat().st_mode & 0o777 == 0o755)


# Installs as root fork (fedge.as_owner), which run_as refuses beside other threads:
# the tests that install in Python run it in a fresh process of their own, as the
# command line does (pytest's process holds threads that earlier tests left running).
INSTALL = """
import sys, threading
from pathlib import Path
from fedge.serve.repository import ModelRepository
repo, model, threads, data = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
stop = threading.Event()
extra = [threading.Thread(target=stop.wait, args=(60,)) for _ in range(threads)]
for t in extra:
    t.start()
try:
    version = ModelRepository(repo).install("cox", model.read_bytes() if data == "bytes" else model)
    print(f"installed {version}")
except OSError as exc:
    print(f"OSError: {exc}")
finally:
    stop.set()
"""


def install_in_fresh_process(repo_dir: Path, model: Path, *, threads: int = 0,
                             data: str = "path") -> str:
    """`ModelRepository(repo_dir).install("cox", model)` as root in a new process with
    `threads` extra threads running; what it printed ("installed N" or "OSError: ...")."""
    proc = subprocess.run([sys.executable, "-c", INSTALL, str(repo_dir), str(model),
                           str(threads), data], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_root_install_into_the_owners_repository_is_the_owners(
        user, base, cox_v1: tuple[Path, torch.nn.Module]) -> None:
    repo_dir = owned_dir(base / "models", user)
    repo = ModelRepository(repo_dir)
    assert install_in_fresh_process(repo_dir, cox_v1[0]) == "installed 1"
    installed = repo.path("cox", 1)
    for p in (repo_dir / "cox", installed.parent, installed):
        assert (p.stat().st_uid, p.stat().st_gid) == user[1:], p
    # still readable by a serving process running as another user
    assert installed.stat().st_mode & 0o777 == 0o644
    assert installed.parent.stat().st_mode & 0o777 == 0o755
    assert installed.read_bytes() == cox_v1[0].read_bytes()


def test_root_install_does_not_follow_a_model_symlink_the_owner_planted(
        user, base, cox_v1: tuple[Path, torch.nn.Module]) -> None:
    repo_dir = owned_dir(base / "models", user)
    target = root_dir(base)
    as_user(user[0], f"ln -s {target} {repo_dir}/cox")
    assert install_in_fresh_process(repo_dir, cox_v1[0], data="bytes").startswith("OSError")
    assert untouched(target)


def site_config(root: Path) -> Path:
    """An agent.toml (root's) holding data set fed_tcga_brca in the checkpoint's 39
    columns, for `--install --agent-config`."""
    names = [f"feature_{i}" for i in range(39)]
    rng = np.random.default_rng(11)
    root.mkdir(parents=True)
    csv = root / "rows.csv"
    rows = [",".join([*names, "relapse"])]
    rows += [",".join([*(f"{v:.3f}" for v in rng.normal(50, 10, 39)), str(i % 2)])
             for i in range(40)]
    csv.write_text("\n".join(rows) + "\n")
    config = root / "agent.toml"
    config.write_text(
        f'state_dir = "{root / "state"}"\n\n[[datasets]]\nname = "fed_tcga_brca"\n'
        f'kind = "tabular"\npath = "{csv}"\ntask = "binary"\ntarget = "relapse"\n'
        f"features = {names!r}\n".replace("'", '"'))
    return config


@pytest.fixture
def job_state(user, base) -> Path:
    """A coordinator state dir of the user's holding job-a's final checkpoint."""
    model = build_model(ModelSpec("cox_mlp", {"in_features": 39, "hidden": [8]}))
    flat = flatten(model)
    weights = (flat + np.random.default_rng(3).normal(0, 0.1, flat.shape)).astype(np.float32)
    state = base / "coord"
    save_checkpoint(final_path(state, "job-a"), Checkpoint(
        weights=weights, round=3, plan=PLAN,
        feature_names=[f"feature_{i}" for i in range(39)], metrics={}))
    subprocess.run(["chown", "-R", f"{user[1]}:{user[2]}", str(state)], check=True,
                   timeout=60)
    os.chmod(state, 0o755)
    return state


def export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", "export", *args],
                          capture_output=True, text=True, timeout=300)


def test_root_export_and_install_do_not_follow_symlinks_the_owner_planted(
        user, base, job_state: Path) -> None:
    """--out through a directory symlink, and --install into models/<name> that is a
    symlink: root writes nothing into the directory of root's they point at."""
    target = root_dir(base)
    out_dir = owned_dir(base / "out", user)
    as_user(user[0], f"ln -s {target} {out_dir}/sub")
    r = export("--job", "job-a", "--state-dir", str(job_state),
               "--out", str(out_dir / "sub" / "brca.onnx"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "cannot write" in r.stderr
    assert untouched(target)

    repo_dir = owned_dir(base / "models", user)
    as_user(user[0], f"ln -s {target} {repo_dir}/brca")
    # a federated tabular model installs with a site's standardisation only
    r = export("--job", "job-a", "--state-dir", str(job_state),
               "--install", str(repo_dir), "--name", "brca",
               "--agent-config", str(site_config(base / "site")))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "cannot install" in r.stderr
    assert untouched(target)
    # the default output, beside the checkpoint in the user's jobs/job-a/: the user's
    written = final_path(job_state, "job-a").with_name("model.onnx")
    assert written.exists() and written.stat().st_uid == user[1]
    assert written.stat().st_mode & 0o777 == 0o644
