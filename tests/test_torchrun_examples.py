"""The examples under ``torchrun``: 2 CPU processes (gloo) on the ``smoke`` presets.

Fast tests check the per-rank split of the two-stream batch and the single-process no-ops of
``examples/_dist.py``; the slow tests launch ``python -m torch.distributed.run
--nproc_per_node=2 --standalone`` on the real data (skipped when it is absent) and check that
rank 0 alone wrote one well-formed ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

import _dist  # noqa: E402


def _torchrun(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU / gloo, also on a GPU machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(EXAMPLES / script), *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


# ----------------------------------------------------------------------------- fast
def test_two_stream_sampler_split_is_the_single_process_batch():
    from acdc_data import TwoStreamBatchSampler

    kw = dict(primary=range(10), secondary=range(10, 40), primary_bs=4, secondary_bs=6, num_steps=7, seed=3)
    single = list(TwoStreamBatchSampler(**kw))
    ranks = [list(TwoStreamBatchSampler(**kw, rank=r, world_size=2)) for r in range(2)]
    for t, batch in enumerate(single):
        r0, r1 = ranks[0][t], ranks[1][t]
        assert len(r0) == len(r1) == 5
        # labeled block of rank 0, of rank 1, then the unlabeled blocks: the single-process batch
        assert r0[:2] + r1[:2] + r0[2:] + r1[2:] == batch
        assert all(i < 10 for i, _ in r0[:2] + r1[:2]) and all(i >= 10 for i, _ in r0[2:] + r1[2:])
    resumed = list(TwoStreamBatchSampler(**kw, rank=1, world_size=2, start_step=4))
    assert resumed == ranks[1][4:]
    with pytest.raises(ValueError, match="multiples of world_size"):
        TwoStreamBatchSampler(**{**kw, "primary_bs": 3}, rank=0, world_size=2)


def test_dist_helpers_are_noops_in_one_process():
    assert _dist.rank() == 0 and _dist.world_size() == 1 and _dist.is_main()
    assert _dist.rank_seed(5) == 5 and _dist.split_batch(3, "--x") == 3
    m = torch.nn.Linear(2, 2)
    assert _dist.wrap_ddp(m, torch.device("cpu")) is m and _dist.unwrap(m) is m
    assert _dist.mean_scalars({"a": 1.5}) == {"a": 1.5}
    assert _dist.gather_objects({"x": 1}) == [{"x": 1}]
    _dist.barrier()


# ----------------------------------------------------------------------------- torchrun, real data
@pytest.mark.slow
def test_acdc_smoke_under_torchrun(tmp_path, acdc_dir):
    pytest.importorskip("segmentation_models_pytorch")
    pytest.importorskip("medpy")
    run = tmp_path / "run"
    r = _torchrun("acdc_cps_dacl.py", "--preset", "smoke", "--output-dir", str(run), "--threads", "1",
                  "--data-root", str(acdc_dir.parent))
    out = r.stdout + r.stderr
    # rank 0 alone tests and writes: one result table, one "run folder" line
    assert out.count("run folder:") == 1 and out.count("ACDC test:") == 1, out[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["environment"]["world_size"] == 2 and m["extra"]["per_rank_batch"] == [1, 1]
    ident = m["identity"]
    assert ident["steps"] == 30 and ident["preset"] == "smoke" and ident["method"] == "dacl"
    assert [h["step"] for h in m["val_history"]] == [15, 30]
    assert m["test"]["num_cases"] == 3
    assert all(math.isfinite(v) for v in m["test"]["mean"].values())
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["labeled_bs"] == 2  # the global batch
    ck = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 30 and len(ck["ranks"]) == 2
    assert not any(k.startswith("module.") for k in ck["model"])  # the unwrapped model's keys
    for name in ("best.pt", "test_predictions.png"):
        assert (run / name).is_file()
    assert not list(run.glob("*.tmp"))


@pytest.mark.slow
def test_synapse_smoke_under_torchrun(tmp_path, chaos_dir):
    pytest.importorskip("dynamic_network_architectures")
    pytest.importorskip("medpy")
    out_dir = tmp_path / "run"
    # the smoke preset's 1 + 1 patches cannot be split over 2 ranks: 2 + 2 globally, 1 + 1 per rank
    r = _torchrun("synapse_cps_dacl.py", "--preset", "smoke", "--output-dir", str(out_dir), "--threads", "1",
                  "--no-progress", "--labeled-bs", "2", "--unlabeled-bs", "2", "--data-root", str(chaos_dir.parent))
    out = r.stdout + r.stderr
    assert out.count("test mean Dice") == 1, out[-3000:]
    m = json.loads((out_dir / "metrics.json").read_text())
    assert m["environment"]["world_size"] == 2 and m["extra"]["per_rank_batch"] == [1, 1]
    assert m["identity"]["steps"] == 8 and m["best"]["step"] == 8 and len(m["test"]["per_case"]) == 2
    assert all(0.0 <= v <= 1.0 for v in m["test"]["per_class"]["dice"].values())
    ck = torch.load(out_dir / "last.pt", map_location="cpu", weights_only=False)
    assert len(ck["ranks"]) == 2 and ck["step"] == 8
    assert not any(k.startswith("module.") for k in ck["model"])
