"""The build: CUDA is optional, and FEDGE_CUDA=ON without nvcc fails clearly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedge import core

REPO = Path(__file__).resolve().parents[2]


def _configure(tmp_path: Path, fedge_cuda: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    import pybind11

    return subprocess.run(
        [
            "cmake", "-S", str(REPO), "-B", str(tmp_path / "b"), f"-DFEDGE_CUDA={fedge_cuda}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
        ],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_fedge_cuda_on_without_nvcc_fails_at_configure(tmp_path: Path) -> None:
    path = ":".join(p for p in os.environ["PATH"].split(":") if not Path(p, "nvcc").exists())
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_PATH", "CUDA_HOME")}
    env["PATH"] = path
    if shutil.which("nvcc", path=path) or Path("/usr/local/cuda/bin/nvcc").exists():
        # CMake also looks in /usr/local/cuda/bin; point it at a toolkit that is not there.
        env["CUDA_PATH"] = str(tmp_path / "no-cuda")
        env["CUDACXX"] = str(tmp_path / "no-cuda" / "nvcc")
    out = _configure(tmp_path, "ON", env)
    assert out.returncode != 0
    assert "FEDGE_CUDA=ON but no CUDA compiler was found" in out.stderr + out.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_unknown_fedge_cuda_value_is_refused(tmp_path: Path) -> None:
    out = _configure(tmp_path, "MAYBE", dict(os.environ))
    assert out.returncode != 0
    assert "FEDGE_CUDA must be AUTO, ON or OFF, got 'MAYBE'" in out.stderr + out.stdout


def test_module_imports_and_reports_without_a_gpu() -> None:
    info = core.info()
    if shutil.which("nvcc") is not None and os.environ.get("FEDGE_CUDA", "AUTO") != "OFF":
        assert info["cuda_compiled"] is True  # AUTO picked nvcc up
    if info["gpus"] == 0 and info["cuda_compiled"]:
        with pytest.raises(RuntimeError, match=r"CUDA error at .*\.cuh?:\d+"):
            core._core.cuda_prg(0, 0, 0, 4, bytes(16), 0)


def test_extension_has_no_dynamic_cudart_dependency() -> None:
    so = Path(core._core.__file__)
    if shutil.which("ldd") is None:
        pytest.skip("needs ldd")
    out = subprocess.run(["ldd", str(so)], capture_output=True, text=True, timeout=30)
    assert "libcudart" not in out.stdout


def _compile_flags(tmp_path: Path, *defines: str) -> str:
    import pybind11

    build = tmp_path / "b"
    out = subprocess.run(
        [
            "cmake", "-S", str(REPO), "-B", str(build), "-DFEDGE_CUDA=OFF",
            "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}", *defines,
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    commands = json.loads((build / "compile_commands.json").read_text())
    return next(c["command"] for c in commands if c["file"].endswith("module.cpp"))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_warnings_are_errors_unless_a_sanitizer_build_turns_that_off(tmp_path: Path) -> None:
    default = _compile_flags(tmp_path / "default")
    assert "-Werror" in default.split()
    assert "-fsanitize" not in default
    asan = _compile_flags(
        tmp_path / "asan", "-DFEDGE_WERROR=OFF", "-DFEDGE_SANITIZE=address,undefined"
    )
    assert "-Werror" not in asan.split()
    assert "-fsanitize=address,undefined" in asan.split()
