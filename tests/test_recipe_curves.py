"""benchmarks/recipe_curves.py on hand-made run folders (a finished --no-test run and one without history)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def test_curves_from_val_history(tmp_path):
    import recipe_curves

    run = tmp_path / "runs" / "A"
    run.mkdir(parents=True)
    cfg = dict(method="sup", encoder="basicunet", size=256, crop=128, labeled_bs=4, unlabeled_bs=4, lr=0.01,
               steps=1000, labeled=7, seed=0, threads=1)
    (run / "config.json").write_text(json.dumps(cfg))
    hist = [{"step": 500, "mean_dice": 0.4, "train_seconds": 300.0}, {"step": 1000, "mean_dice": 0.7,
                                                                        "train_seconds": 600.0}]
    (run / "val_history.json").write_text(json.dumps({"history": hist}))
    empty = tmp_path / "runs" / "B"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    dacl = tmp_path / "runs" / "C"
    dacl.mkdir()
    (dacl / "config.json").write_text(json.dumps({**cfg, "method": "dacl", "lambda_cl": 0.3, "reduction": "mean",
                                                  "pseudo_policy": "class_prior", "head_weight": None,
                                                  "max_samples_per_class": 512, "bank_size": 1000}))
    (dacl / "val_history.json").write_text(json.dumps({"history": hist[:1]}))
    bf16 = tmp_path / "runs" / "D"
    bf16.mkdir()
    (bf16 / "config.json").write_text(json.dumps({**json.loads((dacl / "config.json").read_text()), "amp": "bf16"}))
    (bf16 / "val_history.json").write_text(json.dumps({"history": hist[:1]}))
    runs = recipe_curves.main([str(run), str(empty), str(dacl), str(bf16), "--out", str(out), "--title", "DACL sweep"])
    assert [r["name"] for r in runs] == ["A", "C", "D"] and runs[0]["history"][1]["train_minutes"] == 10.0
    md = (out / "curves.md").read_text()
    assert md.startswith("# DACL sweep: validation Dice")
    assert "| A | sup | - | basicunet | 256 / 128 | 4+0 | 0.01 | 1000 of 1000 | 70.0 % | 1000 | 10 |" in md
    assert ("| C | dacl | λ 0.3 (mean), class_prior, head weight λ, 512/class, bank 1000 | basicunet | 256 / 128 | "
            "4+4 | 0.01 | 500 of 1000 | 40.0 % | 500 | 5 |") in md
    assert "| D | dacl | λ 0.3 (mean), class_prior, head weight λ, 512/class, bank 1000, bf16 autocast |" in md
    assert (out / "curves.png").stat().st_size > 0
    assert "(mean of the foreground classes" not in md and "mean over the foreground classes" in md
    rows = json.loads((out / "table.json").read_text())["rows"]
    got = [(r["run"], r["best val Dice (%)"], r["last val Dice (%)"]) for r in rows]
    assert got == [("A", 70.0, 70.0), ("C", 40.0, 40.0), ("D", 40.0, 40.0)]


def test_curves_of_a_3d_run_name_its_patch_network_and_classes(tmp_path):
    import recipe_curves

    run = tmp_path / "chaos"
    run.mkdir()
    cfg = dict(method="cps", patch=[16, 64, 64], features=[8, 16, 32, 64], labeled_bs=2, unlabeled_bs=2, lr=0.03,
               steps=3000, labeled=4, seed=0)
    (run / "config.json").write_text(json.dumps(cfg))
    hist = [{"step": 250, "mean_dice": 0.5, "per_class": {"liver": 0.6, "spleen": 0.4}, "train_seconds": 120.0}]
    (run / "val_history.json").write_text(json.dumps({"history": hist}))
    recipe_curves.main([str(run), "--out", str(tmp_path / "out"), "--title", "CHAOS", "--target", "70"])
    md = (tmp_path / "out" / "curves.md").read_text()
    assert md.startswith("# CHAOS: validation Dice (mean of liver, spleen;")
    assert "| chaos | cps | - | PlainConvUNet 8-16-32-64 | patch 16x64x64 | 2+2 | 0.03 | 250 of 3000 | 50.0 % | 250 | 2 |" in md
