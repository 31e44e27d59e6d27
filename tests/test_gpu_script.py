"""benchmarks/gpu_acdc.sh and benchmarks/pack_acdc.py: the GPU job's commands, for 2 steps on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))
pytest.importorskip("h5py")

from test_acdc_example import make_fake_acdc  # noqa: E402


def test_pack_round_trip_quantises_to_uint8(tmp_path):
    import h5py
    import pack_acdc

    src = make_fake_acdc(tmp_path / "data")
    out = pack_acdc.pack(src, tmp_path / "pack")
    acdc = pack_acdc.unpack(out, tmp_path / "unpacked")
    for name in (src / "val.list").read_text().split():
        with h5py.File(src / "data" / f"{name}.h5") as a, h5py.File(acdc / "data" / f"{name}.h5") as b:
            assert b["image"].dtype == np.float32 and np.array_equal(a["label"][()], b["label"][()])
            # ACDC's images lie in [0, 1] (the fake ones reach 1.1: compared where they are in range)
            assert np.abs(np.clip(a["image"][()], 0, 1) - b["image"][()]).max() <= 1 / 510 + 1e-6
    assert (acdc / "train_slices.list").read_text() == (src / "train_slices.list").read_text()


def test_gpu_script_runs_two_steps_on_cpu(tmp_path):
    import pack_acdc

    pack = pack_acdc.pack(make_fake_acdc(tmp_path / "data"), tmp_path / "pack")
    env = {**os.environ, "STEPS": "2", "DEVICE": "cpu", "COST_STEPS": "1", "PACK": str(pack), "OUT": str(tmp_path / "out"),
           "EXTRA": "--size 32 --labeled-bs 2 --unlabeled-bs 2 --encoder tu-regnetx_002 --decoder-channels 16 16 8 "
                    "--embed-dim 8 --num-anchors 16 --num-positives 16 --num-negatives 16 --bank-size 32 "
                    "--max-samples-per-class 64 --val-volumes 1 --test-volumes 1 --workers 0 --amp none "
                    "--threads 1 --no-plot",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_acdc.sh")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for method in ("sup", "cps", "dacl"):
        assert (tmp_path / "out" / "gpu_acdc" / f"acdc_paper_{method}_p7_seed0" / "metrics.json").is_file()
    import json  # the cost phase: CPS, DACL and DACL's old default, the objective alone, on the paper preset

    cost = json.loads((tmp_path / "out" / "gpu_acdc" / "step_cost_paper_gpu.json").read_text())
    assert [r["variant"] for r in cost["rows"]][:2] == ["cps", "dacl"] and cost["device"] == "cpu"
    assert all(r["step_s"] > 0 for r in cost["rows"])
    assert "gpu_acdc took" in res.stdout
