"""macOS writes a file or folder name decomposed (NFD: 'u' then a combining diaeresis
for 'ü'); agent.toml mostly holds it composed (NFC). The two look the same, and Linux,
comparing bytes, finds no such file: the loader says where the folder holds a name that
differs only so, and which, and does not open it by the other spelling. What may leave
the appliance names neither."""

from __future__ import annotations

import os
import time
import unicodedata
from pathlib import Path

import pytest
from PIL import Image

from fedge.agent.trainer import read_source
from fedge.train.data import DataError, DatasetSpec

NFC = unicodedata.normalize("NFC", "Zürich")
NFD = unicodedata.normalize("NFD", "Zürich")
SAID = ("only in Unicode normalisation (a name made on a Mac is decomposed): rename it, "
        "or copy its spelling into agent.toml")


def _table(path: Path) -> DatasetSpec:
    return DatasetSpec.from_config({
        "name": "t", "kind": "tabular", "path": str(path), "task": "binary",
        "features": ["alter"], "target": "y", "val_fraction": 0, "standardise": "none"})


def _refusal(spec: DatasetSpec) -> DataError:
    with pytest.raises(DataError) as err:
        read_source(spec)
    return err.value


def _csv(path: Path) -> Path:
    path.write_text("alter,y\n61,1\n55,0\n")
    hour_ago = time.time() - 3600  # not moments ago: read_source pauses for that
    os.utime(path, (hour_ago, hour_ago))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".npz"])
def test_a_file_named_in_another_normalisation_is_said_and_not_opened(
        tmp_path: Path, suffix: str) -> None:
    _csv(tmp_path / f"{NFD}{suffix}")
    given = tmp_path / f"{NFC}{suffix}"
    spec = _table(given) if suffix != ".npz" else DatasetSpec.from_config({
        "name": "t", "kind": "numpy", "path": str(given), "task": "binary",
        "val_fraction": 0, "features": ["f0"]})
    e = _refusal(spec)
    assert str(e) == (
        f"{given}: file does not exist; the folder {str(tmp_path)!r} holds "
        f"'Zu\\u0308rich{suffix}' (NFD), a name that differs from 'Z\\xfcrich{suffix}' "
        f"(as given, NFC) {SAID}")
    assert e.public == (f"the data file: file does not exist; its folder holds a name that "
                        f"differs {SAID}")
    assert "rich" not in e.public and str(tmp_path) not in e.public


def test_a_folder_on_the_path_named_so_is_said(tmp_path: Path) -> None:
    (tmp_path / NFD).mkdir()
    _csv(tmp_path / NFD / "table.csv")
    given = tmp_path / NFC / "table.csv"
    e = _refusal(_table(given))
    assert str(e).startswith(f"{given}: file does not exist; the folder {str(tmp_path)!r} "
                             "holds 'Zu\\u0308rich' (NFD), a name that differs from "
                             "'Z\\xfcrich' (as given, NFC)")
    assert e.public == ("the data file: file does not exist; a folder on its path holds a "
                        f"name that differs {SAID}")


def test_an_nfd_name_given_for_an_nfc_file_is_said_too(tmp_path: Path) -> None:
    _csv(tmp_path / f"{NFC}.csv")
    e = _refusal(_table(tmp_path / f"{NFD}.csv"))
    assert "holds 'Z\\xfcrich.csv' (NFC), a name that differs from 'Zu\\u0308rich.csv' " \
           "(as given, NFD)" in str(e)


def test_an_image_folder_named_so_is_said(tmp_path: Path) -> None:
    (tmp_path / NFD / "a").mkdir(parents=True)
    Image.new("L", (4, 4)).save(tmp_path / NFD / "a" / "x.png")
    spec = DatasetSpec.from_config({
        "name": "t", "kind": "images", "path": str(tmp_path / NFC), "task": "binary",
        "classes": ["a", "b"], "image_size": 4, "val_fraction": 0})
    e = _refusal(spec)
    assert "image folder does not exist; the folder" in str(e)
    assert e.public == ("the image folder: does not exist; its folder holds a name that "
                        f"differs {SAID}")


def test_a_missing_file_without_a_twin_is_said_as_before(tmp_path: Path) -> None:
    _csv(tmp_path / "Zuerich.csv")
    e = _refusal(_table(tmp_path / f"{NFC}.csv"))
    assert str(e) == f"{tmp_path / NFC}.csv: file does not exist"
    assert e.public == "the data file: file does not exist"


def test_a_missing_folder_above_is_no_error_of_its_own(tmp_path: Path) -> None:
    e = _refusal(_table(tmp_path / "gone" / "deeper" / f"{NFC}.csv"))
    assert e.public == "the data file: file does not exist"
