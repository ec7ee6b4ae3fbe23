"""`fedge demo` end to end: real coordinator and six agent processes, SecAgg on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "../shared/data/fed_tcga_brca"


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    if not (DATA / "brca.csv").is_file():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")
    report = tmp_path_factory.mktemp("demo") / "report"
    out = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "demo", "--rounds", "4", "--report", str(report)],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return report, out.stdout + out.stderr


def test_demo_prints_a_table_per_centre_and_writes_the_report(demo_report) -> None:  # type: ignore[no-untyped-def]
    report, text = demo_report
    for i in range(6):
        assert f"centre-{i}" in text
    assert "federated" in text and "local-only" in text and "pooled" in text
    m = json.loads((report / "metrics.json").read_text())
    assert [r["round"] for r in m["rounds"]] == [1, 2, 3, 4]
    # the live curve is the validation C-index; the test rows wait for the final table
    assert m["eval_split"] == "val" and "val C-index" in text
    assert "test C-index per centre" in text
    assert m["secure_aggregation"] is True
    assert set(m["final"]["per_centre"]) == {f"centre-{i}" for i in range(6)}
    for part in ("final", "local_only", "pooled_training"):
        vals = list(m[part]["per_centre"].values())
        assert len(vals) == 6 and all(0.0 <= v <= 1.0 for v in vals)
    # a trained Cox model ranks patients far better than chance
    assert m["final"]["mean_per_centre"] > 0.7
    for png in ("learning_curve.png", "loss_curve.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_onnx_model_matches_the_final_weights(demo_report) -> None:  # type: ignore[no-untyped-def]
    report, _ = demo_report
    m = json.loads((report / "metrics.json").read_text())
    if "model.onnx" not in m["files"]:
        pytest.skip("fedge.serve.export_onnx not available")
    import onnxruntime as ort

    from fedge.demo.run import VAL_FRACTION
    from fedge.demo.tcga import load_centres
    from fedge.train.metrics import concordance_index

    # centre 0 as its agent loads it: validation rows held out, standardiser fitted on the rest
    centre = load_centres(DATA, "continuous", val_fraction=VAL_FRACTION)[0]
    sess = ort.InferenceSession(str(report / "model.onnx"), providers=["CPUExecutionProvider"])
    x = centre.test.x.astype(np.float32)
    onnx_risk = sess.run(None, {sess.get_inputs()[0].name: x})[0].reshape(-1)
    # the C-index of the exported model on centre 0 is the one the demo's table reports
    c = concordance_index(centre.test.y[:, 1], onnx_risk, centre.test.y[:, 0])
    assert c == pytest.approx(m["final"]["per_centre"]["centre-0"], abs=1e-6)
    # the per-centre export folds centre 0's standardisation in: raw features, same risks
    raw = load_centres(DATA, "none")[0].test.x.astype(np.float32)
    sess0 = ort.InferenceSession(
        str(report / "model-centre-0.onnx"), providers=["CPUExecutionProvider"]
    )
    raw_risk = sess0.run(None, {sess0.get_inputs()[0].name: raw})[0].reshape(-1)
    np.testing.assert_allclose(raw_risk, onnx_risk, rtol=1e-4, atol=1e-4)


def test_demo_refuses_a_missing_data_directory_with_a_clear_message(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge.cli",
            "demo",
            "--data",
            str(tmp_path / "nowhere"),
            "--report",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 1
    assert "Fed-TCGA-BRCA not found" in out.stderr and "--data" in out.stderr
    assert not (tmp_path / "r").exists()  # nothing started, nothing written
