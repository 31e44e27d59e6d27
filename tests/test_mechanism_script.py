"""benchmarks/mechanism.py end to end on fake ACDC data and a freshly built checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))

pytest.importorskip("sklearn")
pytest.importorskip("h5py")

from test_acdc_example import make_fake_acdc  # noqa: E402


def _checkpoint(path: Path, seed: int) -> Path:
    from acdc_model import build_wrapper

    cfg = dict(encoder="tu-regnetx_002", decoder_channels=[16, 16, 8], embed_dim=8, seed=seed, size=32,
               method="dacl", steps=0)
    torch.save({"model": build_wrapper(cfg).state_dict(), "config": cfg}, path)
    return path


def test_mechanism_metrics_and_figures(tmp_path):
    import mechanism

    root = tmp_path / "data"
    make_fake_acdc(root)
    a, b = _checkpoint(tmp_path / "a.pt", 0), _checkpoint(tmp_path / "b.pt", 1)
    out = tmp_path / "out"
    rep = mechanism.main([str(a), str(b), "--names", "A", "B", "--data-root", str(root), "--slices", "4",
                          "--pixels-per-class", "20", "--map-slices", "2", "--out", str(out)])
    assert set(rep["metrics"]) == {"A", "B"}
    for m in rep["metrics"].values():
        assert -1.0 <= m["silhouette"] <= 1.0 and m["davies_bouldin"] >= 0 and 0 <= m["v_measure"] <= 1
        assert sum(m["pixels"].values()) > 0
    assert json.loads((out / "mechanism.json").read_text())["metrics"] == rep["metrics"]
    assert (out / "mechanism_tsne.png").stat().st_size > 0 and (out / "mechanism_density.png").stat().st_size > 0


def test_balanced_sample_caps_each_class():
    import mechanism

    labels = torch.tensor([0] * 50 + [1] * 3 + [2] * 20)
    idx = mechanism.balanced_sample(labels, per_class=10, seed=0, num_classes=4)
    counts = torch.bincount(labels[idx], minlength=4).tolist()
    assert counts == [10, 3, 10, 0]
    assert torch.equal(idx, mechanism.balanced_sample(labels, per_class=10, seed=0, num_classes=4))
