"""ModelRepository: atomic, numbered versions; invalid models and names are refused."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from fedge.serve.repository import ModelRepository


def test_install_numbers_versions_and_accepts_bytes(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module], cox_v2: tuple[Path, torch.nn.Module]
) -> None:
    repo = ModelRepository(tmp_path)
    assert repo.models() == [] and repo.versions("cox") == []
    assert repo.install("cox", cox_v1[0]) == 1
    assert repo.install("cox", cox_v2[0].read_bytes()) == 2
    assert repo.versions("cox") == [1, 2] and repo.models() == ["cox"]
    assert repo.path("cox", 2).read_bytes() == cox_v2[0].read_bytes()
    # readable by a serving process running as another user
    assert repo.path("cox", 2).stat().st_mode & 0o777 == 0o644
    assert repo.path("cox", 2).parent.stat().st_mode & 0o777 == 0o755
    # no staging directories are left behind
    assert sorted(p.name for p in (tmp_path / "cox").iterdir()) == ["1", "2"]


def test_concurrent_installs_get_distinct_versions(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    repo = ModelRepository(tmp_path)
    data = cox_v1[0].read_bytes()
    got: list[int] = []
    threads = [threading.Thread(target=lambda: got.append(repo.install("cox", data)))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]


def test_invalid_onnx_is_refused_and_nothing_is_installed(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    with pytest.raises(ValueError, match="refusing to install 'cox': not a valid ONNX model"):
        repo.install("cox", b"definitely not a protobuf \xff\xfe")
    assert repo.versions("cox") == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "x" * 65])
def test_invalid_model_names_are_refused(
    tmp_path: Path, name: str, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    with pytest.raises(ValueError, match=r"model name .* is invalid"):
        ModelRepository(tmp_path).install(name, cox_v1[0])
    assert list(tmp_path.iterdir()) == []


def test_retire_takes_a_version_out_of_service(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    repo = ModelRepository(tmp_path)
    repo.install("cox", cox_v1[0])
    repo.install("cox", cox_v1[0])
    kept = repo.retire("cox", 2)
    assert repo.versions("cox") == [1]
    assert (kept / "model.onnx").is_file()
    # the retired number names the retired model for good: it is not handed out again
    assert repo.install("cox", cox_v1[0]) == 3
    repo.retire("cox", 3)
    assert repo.install("cox", cox_v1[0]) == 4
    assert repo.versions("cox") == [1, 4]
    with pytest.raises(FileNotFoundError, match="no version 9"):
        repo.retire("cox", 9)
    with pytest.raises(ValueError, match="positive integer"):
        repo.path("cox", 0)


def test_install_skips_a_version_directory_without_a_model_file(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    repo = ModelRepository(tmp_path)
    assert repo.install("cox", cox_v1[0]) == 1
    # a copy by hand under way (or abandoned): not a version yet, but its number is taken
    (tmp_path / "cox" / "2").mkdir()
    (tmp_path / "cox" / "2" / "notes.txt").write_text("copying")
    (tmp_path / "cox" / "3").mkdir()  # empty: taken as well
    done: list[int] = []
    worker = threading.Thread(target=lambda: done.append(repo.install("cox", cox_v1[0])),
                              daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert done == [4], "install spun on a number it could not take"
    assert repo.versions("cox") == [1, 4]
    assert not [p for p in (tmp_path / "cox").iterdir() if p.name.startswith(".incoming-")]


def test_only_ascii_digit_directories_are_versions(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    repo = ModelRepository(tmp_path)
    assert repo.install("cox", cox_v1[0]) == 1
    # str.isdigit() takes both: "²" crashed every scan (int() refuses it), and
    # "١" (Arabic-Indic one) was a second directory for version 1
    for name in ("\u00b2", "\u0661"):
        (tmp_path / "cox" / name).mkdir()
        (tmp_path / "cox" / name / "model.onnx").write_bytes(cox_v1[0].read_bytes())
    assert repo.versions("cox") == [1]
    assert repo.install("cox", cox_v1[0]) == 2
