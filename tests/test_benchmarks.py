"""The cost benchmark runs (--quick, as CI does) and writes a well-formed JSON. Nothing is timed here."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_loss_cost_quick_writes_json(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    out = tmp_path / "cost.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loss_cost.py"), "--quick", "--threads", "1",
                    "--output", str(out)], check=True, cwd=ROOT, timeout=600)
    data = json.loads(out.read_text())
    assert [r["classes"] for r in data["ratio"]] == [4, 14]
    for r in data["ratio"]:
        assert r["loss_fwd_bwd_s"] > 0 and r["cps_step_s"] > 0 and r["speedup_vs_naive"] > 0
    assert {r["axis"] for r in data["scaling"]} == {"bank", "classes", "samples"}
    assert all(r["peak_extra_mb"] >= 0 for r in data["scaling"])
    assert data["training_step"]["dacl_step_s"] > 0
    pytest.importorskip("matplotlib")
    fig = tmp_path / "cost_scaling.png"
    assert fig.is_file() and fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
