"""Tests of the ACDC example (examples/acdc_cps_dacl.py and its modules).

Fast tests use a fake ACDC layout in ``tmp_path``; the slow test runs the ``smoke`` preset
on the real data (found by the examples' lookup: ``--data-root``, ``TORCH_DACL_DATA`` or the
cache of ``get_data.py``, see conftest.py; skipped when it is absent) exactly as CI and the
README do, and checks the metrics JSON.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")
pytest.importorskip("segmentation_models_pytorch")
pytest.importorskip("medpy")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

import acdc_cps_dacl  # noqa: E402
import acdc_data  # noqa: E402
import acdc_plot  # noqa: E402
import evaluate_acdc  # noqa: E402
from acdc_data import ACDCDataError  # noqa: E402



# ----------------------------------------------------------------------------- fake data
def _disk(shape, center, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def _fake_slice(rng, shape=(40, 36)):
    c = (shape[0] // 2 + int(rng.integers(-3, 4)), shape[1] // 2 + int(rng.integers(-3, 4)))
    label = np.zeros(shape, np.uint8)
    label[_disk(shape, c, 10)] = 1
    label[_disk(shape, c, 7)] = 2
    label[_disk(shape, c, 4)] = 3
    image = (label / 3.0 + 0.1 * rng.random(shape)).astype(np.float32)
    return image, label


def make_fake_acdc(root: Path, n_slices: int = 140, n_val: int = 2, n_test: int = 2) -> Path:
    """``root/ACDC`` in the SSL4MIS layout with tiny synthetic slices and volumes."""
    acdc = root / "ACDC"
    (acdc / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"patient{i // 20 + 1:03d}_frame01_slice_{i % 20}" for i in range(n_slices)]
    for n in names:
        image, label = _fake_slice(rng)
        with h5py.File(acdc / "data" / f"{n}.h5", "w") as f:
            f["image"], f["label"] = image, label
    (acdc / "train_slices.list").write_text("\n".join(names) + "\n")
    for split, n, offset in (("val", n_val, 80), ("test", n_test, 90)):
        vols = [f"patient{offset + i:03d}_frame01" for i in range(n)]
        for v in vols:
            pairs = [_fake_slice(rng) for _ in range(4)]
            with h5py.File(acdc / "data" / f"{v}.h5", "w") as f:
                f["image"] = np.stack([p[0] for p in pairs])
                f["label"] = np.stack([p[1] for p in pairs])
        (acdc / f"{split}.list").write_text("\n".join(vols) + "\n")
    return acdc


@pytest.fixture
def fake_root(tmp_path):
    make_fake_acdc(tmp_path / "data")
    return tmp_path / "data"


TINY = ["--preset", "smoke", "--size", "32", "--labeled-bs", "2", "--unlabeled-bs", "2", "--steps", "4",
        "--val-every", "2", "--decoder-channels", "16", "16", "8", "--encoder", "tu-regnetx_002",
        "--embed-dim", "8", "--num-anchors", "16", "--num-positives", "16", "--num-negatives", "16",
        "--bank-size", "32", "--max-samples-per-class", "64", "--no-plot", "--threads", "1"]


# ----------------------------------------------------------------------------- data root and errors
def test_resolve_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_DACL_DATA", raising=False)
    monkeypatch.setenv("TORCH_DACL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ACDCDataError, match=r"get_data\.py acdc"):  # nothing anywhere, no download
        acdc_data.resolve_data_root()
    (tmp_path / "cache" / "data" / "ACDC").mkdir(parents=True)
    assert acdc_data.resolve_data_root() == tmp_path / "cache" / "data"
    monkeypatch.setenv("TORCH_DACL_DATA", str(tmp_path))
    assert acdc_data.resolve_data_root() == tmp_path
    assert acdc_data.resolve_data_root(str(tmp_path / "x")) == tmp_path / "x"


def test_find_acdc_dir_accepts_root_or_acdc_folder(fake_root):
    assert acdc_data.find_acdc_dir(fake_root) == fake_root / "ACDC"
    assert acdc_data.find_acdc_dir(fake_root / "ACDC") == fake_root / "ACDC"


def test_missing_data_root_names_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ACDCDataError) as e:
        acdc_cps_dacl.main(["--data-root", str(missing), "--output-dir", str(tmp_path / "run")])
    assert str(missing) in str(e.value) and "SSL4MIS ACDC layout" in str(e.value)


def test_root_without_acdc(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ACDCDataError, match="no ACDC folder"):
        acdc_data.find_acdc_dir(tmp_path / "empty")


def test_cli_reports_missing_root_cleanly(tmp_path):
    missing = tmp_path / "nowhere"
    r = subprocess.run([sys.executable, str(EXAMPLES / "acdc_cps_dacl.py"), "--data-root", str(missing),
                        "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert str(missing) in r.stderr and "SSL4MIS ACDC layout" in r.stderr
    assert "Traceback" not in r.stderr


def test_list_naming_absent_case(fake_root):
    acdc = fake_root / "ACDC"
    with open(acdc / "test.list", "a") as f:
        f.write("patient999_frame01\n")
    with pytest.raises(ACDCDataError) as e:
        acdc_data.read_list(acdc, "test.list")
    assert str(acdc / "data" / "patient999_frame01.h5") in str(e.value)
    assert "layout" in str(e.value)


def test_missing_list_file(fake_root, tmp_path):
    (fake_root / "ACDC" / "val.list").unlink()
    with pytest.raises(ACDCDataError, match="val.list"):
        acdc_cps_dacl.main(["--data-root", str(fake_root), "--output-dir", str(tmp_path / "run")] + TINY)


def test_corrupt_h5(fake_root):
    acdc = fake_root / "ACDC"
    name = (acdc / "train_slices.list").read_text().split()[0]
    path = acdc / "data" / f"{name}.h5"
    path.write_bytes(b"this is not an HDF5 file")
    ds = acdc_data.ACDCSlices(acdc, size=32)
    with pytest.raises(ACDCDataError) as e:
        ds[0]
    assert str(path) in str(e.value) and "layout" in str(e.value)


def test_h5_missing_key_and_wrong_rank(fake_root):
    acdc = fake_root / "ACDC"
    path = acdc / "data" / "bad.h5"
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros((4, 4), np.float32)
    with pytest.raises(ACDCDataError, match="label"):
        acdc_data.read_case(path, ndim=2)
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint8)
    with pytest.raises(ACDCDataError, match="3D volume"):
        acdc_data.read_case(path, ndim=3)


# ----------------------------------------------------------------------------- data pipeline
def test_dataset_shapes_and_augmentation_is_seeded(fake_root):
    ds = acdc_data.ACDCSlices(fake_root / "ACDC", size=48)
    a, b = ds[(3, 123)], ds[(3, 123)]
    assert a["image"].shape == (1, 48, 48) and a["label"].shape == (48, 48)
    assert a["image"].dtype == torch.float32 and a["label"].dtype == torch.int64
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert set(a["label"].unique().tolist()) <= {0, 1, 2, 3}


def test_two_stream_sampler():
    s = acdc_data.TwoStreamBatchSampler(range(5), range(5, 20), 2, 3, num_steps=12, seed=1)
    batches = list(s)
    assert len(batches) == 12
    for b in batches:
        idx = [i for i, _ in b]
        assert all(i < 5 for i in idx[:2]) and all(i >= 5 for i in idx[2:])
    # every labeled index is seen once per pass
    first = [i for b in batches[:5] for i, _ in b[:2]]
    assert sorted(first) == sorted(list(range(5)) * 2)
    resumed = list(acdc_data.TwoStreamBatchSampler(range(5), range(5, 20), 2, 3, num_steps=12, seed=1, start_step=7))
    assert resumed == batches[7:]
    other = list(acdc_data.TwoStreamBatchSampler(range(5), range(5, 20), 2, 3, num_steps=12, seed=2))
    assert other != batches
    sup = acdc_data.TwoStreamBatchSampler(range(5), [], 2, 0, num_steps=3)
    assert all(len(b) == 2 for b in sup)


# ----------------------------------------------------------------------------- metrics
def test_case_metrics_conventions():
    gt = np.zeros((3, 20, 20), np.int64)
    gt[1, 5:10, 5:10] = 1
    gt[1, 12:15, 12:15] = 2
    pred = gt.copy()
    m = evaluate_acdc.case_metrics(pred, gt)
    assert m["dice"][:2] == [1.0, 1.0] and m["hd95"][:2] == [0.0, 0.0]
    # class 3 empty in both: perfect by convention
    assert (m["dice"][2], m["jaccard"][2], m["hd95"][2], m["asd"][2]) == (1.0, 1.0, 0.0, 0.0)
    assert m["empty"] == 1
    pred[pred == 2] = 0  # class 2 missed entirely
    m = evaluate_acdc.case_metrics(pred, gt)
    diag = math.sqrt(3**2 + 20**2 + 20**2)
    assert (m["dice"][1], m["jaccard"][1]) == (0.0, 0.0)
    assert m["hd95"][1] == pytest.approx(diag) and m["asd"][1] == pytest.approx(diag)
    shifted = np.roll(gt, 2, axis=2)
    m = evaluate_acdc.case_metrics(shifted, gt)
    assert 0 < m["dice"][0] < 1 and m["hd95"][0] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- training on fake data
def test_train_resume_is_exact_and_outputs(fake_root, tmp_path):
    common = ["--data-root", str(fake_root)] + TINY
    straight = acdc_cps_dacl.main(common + ["--output-dir", str(tmp_path / "a")])
    assert acdc_cps_dacl.main(common + ["--output-dir", str(tmp_path / "b"), "--stop-at", "3"]) == {"stopped_at": 3}
    first = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["train_seconds"]
    assert first > 0
    resumed = acdc_cps_dacl.main(common + ["--output-dir", str(tmp_path / "b"), "--resume"])
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    for key in ("model", "objective"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), (key, name)
    assert int(b["objective"]["loss_a.bank.count"].sum()) > 0  # the memory bank was used and restored
    assert a["diagnostics"] == b["diagnostics"] and a["diagnostics"]  # DACL's per-class diagnostics
    assert straight["test"]["mean"] == resumed["test"]["mean"]
    # the record's training time spans both processes: the checkpoint at step 3 (off the
    # validation grid) carries the time of steps 1-3, the resumed process adds step 4's
    hist, total = resumed["val_history"], b["train_seconds"]
    assert [h["step"] for h in hist] == [2, 4] and 0 < hist[0]["train_seconds"] < first < total
    assert hist[1]["train_seconds"] == pytest.approx(total, abs=1e-3)
    assert resumed["timing"]["train_seconds"] == pytest.approx(total, abs=0.051)
    assert resumed["timing"]["per_step"] == pytest.approx(total / 4, rel=1e-6)
    for f in ("config.json", "metrics.json", "best.pt", "last.pt", "test_slices.npz"):
        assert (tmp_path / "a" / f).is_file(), f
    assert list((tmp_path / "a" / "tb").iterdir())


@pytest.mark.parametrize("extra", [["--method", "sup"], ["--method", "cps"],
                                   ["--sampling", "random", "--no-bank", "--weighting", "none"],
                                   ["--ks", "8", "--no-bank", "--weighting", "none", "--anchor-mode", "class"],
                                   ["--bank-source", "pixel", "--weighting", "scale"],
                                   ["--table2-row", "III", "--bank-size", "16"]])
def test_methods_and_ablation_switches_run(fake_root, tmp_path, extra):
    m = acdc_cps_dacl.main(["--data-root", str(fake_root), "--output-dir", str(tmp_path / "r")] + TINY
                           + ["--steps", "2", "--val-every", "2"] + extra)
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    if "--method" in extra:
        assert cfg["method"] == extra[1]
    if extra[0] == "--method" and extra[1] == "sup":
        assert cfg["unlabeled_bs"] == 0
    if extra[0] == "--table2-row":  # the row's options by name; a flag of the command line still wins
        assert (cfg["ks"], cfg["no_bank"], cfg["weighting"], cfg["bank_size"]) == ([8], True, "none", 16)
    assert math.isfinite(m["test"]["mean"]["dice"])


def test_warmup_scales_with_steps():
    cfg = acdc_cps_dacl.make_config(["--preset", "paper"])
    assert cfg["warmup_steps"] == 1000 and cfg["steps"] == 30000
    assert (cfg["size"], cfg["labeled_bs"], cfg["unlabeled_bs"]) == (256, 12, 12)
    cfg = acdc_cps_dacl.make_config(["--preset", "cpu"])
    assert cfg["warmup_steps"] == 100


# ----------------------------------------------------------------------------- the real smoke run
def _check_metrics(m: dict) -> None:
    """The run record (examples/results_schema.py)."""
    for key in ("identity", "best", "val_history", "test", "timing", "environment", "config", "extra"):
        assert key in m, key
    for key in ("method", "preset", "seed", "labeled", "labeled_unit", "steps"):
        assert key in m["identity"], key
    assert "labeled_slices" in m["extra"] and "reduced_evaluation" in m["extra"] and m["timing"]["wall_seconds"] > 0
    t = m["test"]
    assert t["units"]["hd95"] == "voxels" and t["classes"] == ["RV", "Myo", "LV"]
    for metric in ("dice", "jaccard", "hd95", "asd"):
        v = t["mean"][metric]
        assert isinstance(v, float) and math.isfinite(v), metric
        assert set(t["per_class"][metric]) == {"RV", "Myo", "LV"}
    assert 0.0 <= t["mean"]["dice"] <= 1.0 and 0.0 <= t["mean"]["jaccard"] <= 1.0
    assert t["mean"]["hd95"] >= 0 and t["mean"]["asd"] >= 0
    assert len(t["per_case"]) == t["num_cases"]
    for case in t["per_case"].values():
        assert len(case["dice"]) == 3


@pytest.mark.slow
def test_smoke_preset_on_real_data(tmp_path, acdc_dir):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(EXAMPLES / "acdc_cps_dacl.py"), "--preset", "smoke", "--output-dir", str(run),
                        "--data-root", str(acdc_dir.parent)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    _check_metrics(m)
    assert m["identity"]["preset"] == "smoke" and m["extra"]["reduced_evaluation"] is True
    assert m["test"]["num_cases"] == 3 and m["extra"]["test_volumes_in_split"] == 40
    assert m["extra"]["labeled_slices"] == 136 and m["identity"]["steps"] == 30
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "dacl" and cfg["size"] == 64
    assert (run / "test_predictions.png").stat().st_size > 1000
    assert (run / "best.pt").is_file() and (run / "last.pt").is_file() and list((run / "tb").iterdir())

    # standalone evaluation of the checkpoint, and the multi-run comparison figure
    res = evaluate_acdc.main([str(run / "best.pt"), "--limit", "1", "--output", str(tmp_path / "eval.json")])
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["num_cases"] == 1 and set(ev["mean"]) == {"dice", "jaccard", "hd95", "asd"}
    assert res["mean"] == ev["mean"]
    out = acdc_plot.main([str(run), str(run), "--names", "one", "two", "-o", str(tmp_path / "cmp.png")])
    assert out.stat().st_size > 1000


def test_crop_windows_and_basicunet(fake_root, tmp_path):
    """--crop trains on windows of the resized slice (random per augmented item, central
    otherwise); --encoder basicunet is MONAI's plain U-Net with its last decoder level hooked;
    --no-test stops before the test set and writes the validation curve."""
    from acdc_data import ACDCSlices, find_acdc_dir
    from acdc_model import build_wrapper

    ds = ACDCSlices(find_acdc_dir(fake_root), 32, augment=True, crop=16)
    a, b = ds[(0, 5)], ds[(0, 5)]
    assert a["image"].shape == (1, 16, 16) and a["label"].shape == (16, 16)
    assert torch.equal(a["image"], b["image"])  # the window follows the augmentation seed
    full = ACDCSlices(find_acdc_dir(fake_root), 32, augment=False)[0]["image"]
    assert torch.equal(ds[0]["image"], full[:, 8:24, 8:24])  # no seed: the central window
    pytest.importorskip("monai")
    w = build_wrapper(dict(encoder="basicunet", decoder_channels=[16], embed_dim=8, seed=0))
    out = w(torch.randn(2, 1, 32, 32))
    assert out.logits_a.shape == (2, 4, 32, 32) and out.features_a.shape == (2, 16, 32, 32)  # the sparse heads' input
    assert w.head_a(out.features_a).shape == (2, 8, 32, 32)
    res = acdc_cps_dacl.main(["--data-root", str(fake_root)] + TINY + ["--crop", "24", "--method", "sup",
                              "--no-test", "--output-dir", str(tmp_path / "r")])
    assert res == {"stopped_at": 4}
    hist = json.loads((tmp_path / "r" / "val_history.json").read_text())["history"]
    assert [h["step"] for h in hist] == [2, 4]
    assert 0 <= hist[0]["train_seconds"] <= hist[1]["train_seconds"]  # cumulative training time
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_checkpoints_are_written_atomically(tmp_path):
    """best.pt and last.pt go through ``engine.save_atomic``: a save that fails half-way leaves
    the previous checkpoint whole and no temporary file behind."""
    import inspect

    import engine

    path = tmp_path / "best.pt"
    engine.save_atomic({"step": 1}, path)
    with pytest.raises(Exception):
        engine.save_atomic({"step": 2, "bad": lambda: None}, path)  # a lambda cannot be pickled
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    src = inspect.getsource(engine.Run)
    assert 'torch.save(' not in src and src.count("save_atomic(") == 2  # last.pt (Run.save) and best.pt


def test_mechanism_probe_through_training_and_resume(fake_root, tmp_path):
    """``--mechanism-every``: the probe's measurements (both spaces) every N steps in
    mechanism.json, kept across a resume; the run itself is the same as without it."""
    common = ["--data-root", str(fake_root)] + TINY + ["--probe-pixels", "20"]
    plain = acdc_cps_dacl.main(common + ["--output-dir", str(tmp_path / "plain")])
    probed = acdc_cps_dacl.main(common + ["--output-dir", str(tmp_path / "p"), "--mechanism-every", "2",
                                          "--stop-at", "2"])
    assert probed == {"stopped_at": 2}
    probed = acdc_cps_dacl.main(common + ["--output-dir", str(tmp_path / "p"), "--mechanism-every", "2", "--resume"])
    assert probed["test"]["mean"] == plain["test"]["mean"]  # measuring changes nothing of the run
    rec = json.loads((tmp_path / "p" / "mechanism.json").read_text())["records"]
    assert [r["step"] for r in rec] == [2, 4]
    for space in ("feature", "head"):
        m = rec[-1][space]
        assert -1 <= m["silhouette"] <= 1 and m["davies_bouldin"] > 0 and math.isfinite(m["l_cl"])
        assert set(m["tail_density"]) <= {"background", "RV", "Myo", "LV"} and -1 <= m["tail_density_mean"] <= 1
    assert rec[0]["pixels"] == rec[1]["pixels"] > 0


def test_hypotheses_are_named_flag_sets(fake_root, tmp_path):
    import engine

    cfg = acdc_cps_dacl.make_config(["--preset", "cpu", "--hypothesis", "H5-constant"])
    assert (cfg["ramp_shape"], cfg["lambda_cl"]) == ("constant", 0.5)
    cfg = acdc_cps_dacl.make_config(["--preset", "cpu", "--hypothesis", "H5-constant", "--lambda-cl", "0.2"])
    assert cfg["lambda_cl"] == 0.2  # the command line wins
    assert acdc_cps_dacl.make_config(["--preset", "cpu", "--hypothesis", "H1-long"])["steps"] == 9000
    assert acdc_cps_dacl.make_config(["--preset", "cpu", "--hypothesis", "H3-labeled"])["pseudo_policy"] == "none"
    assert acdc_cps_dacl.make_config(["--preset", "cpu", "--hypothesis", "H3-agree"])["pseudo_agree"] is True
    assert set(engine.HYPOTHESES) == {"H1-long", "H3-labeled", "H3-agree", "H4-stage2", "H5-constant"}
    # H4: the heads on the decoder stage before the last (half resolution here), trained end to end
    m = acdc_cps_dacl.main(["--data-root", str(fake_root), "--output-dir", str(tmp_path / "h4")] + TINY
                           + ["--hypothesis", "H4-stage2", "--steps", "2", "--val-every", "2"])
    cfg = json.loads((tmp_path / "h4" / "config.json").read_text())
    assert cfg["feature_stage"] == 2 and math.isfinite(m["test"]["mean"]["dice"])
    from acdc_model import build_wrapper

    w = build_wrapper(cfg)
    assert w.feature_layer == "decoder.blocks.1" and w.head_a.in_channels == 16
