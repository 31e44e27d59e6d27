"""Tests of examples/nnunet_data.py: a user's own dataset in nnU-Net's raw format.

Tiny synthetic datasets (2D and 3D, binary and multi-class, one with two channels) are
written to ``tmp_path`` and run end to end through both examples; each malformed dataset
must fail with an error that names the file and what was expected.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")
pytest.importorskip("dynamic_network_architectures")

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

import nnunet_data as nd  # noqa: E402
import synapse_data as sd  # noqa: E402
from nnunet_data import NnUNetDataError  # noqa: E402



# ----------------------------------------------------------------------------- synthetic datasets
def _blobs(rng, shape, n_fg):
    """A label map with ``n_fg`` nested ellipsoid classes and a matching noisy image."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    c = rng.uniform(-0.2, 0.2, size=len(shape))
    r2 = sum(((g - ci) / 0.8) ** 2 for g, ci in zip(grids, c))
    label = np.zeros(shape, np.uint8)
    for k in range(1, n_fg + 1):
        label[r2 < (1.0 - 0.7 * (k - 1) / max(n_fg, 1)) ** 2 * 0.6] = k
    image = 100.0 + 50.0 * label + rng.normal(0, 10, size=shape)
    return image.astype(np.float32), label


def make_dataset(root: Path, ndim: int = 3, classes=("background", "heart"), channels=("MRI",), n_cases: int = 6,
                 shape=(12, 20, 20), spacing=(3.0, 1.5, 1.5), file_ending: str = ".nii.gz") -> Path:
    """An nnU-Net raw folder. ``shape`` / ``spacing`` are ``(Z, Y, X)`` (2D: ``(Y, X)``)."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n_cases):
        case = f"case_{i:03d}"
        image, label = _blobs(rng, tuple(shape), len(classes) - 1)
        for c in range(len(channels)):
            img = image if c == 0 else 300.0 - image + rng.normal(0, 5, size=image.shape)
            _save(root / "imagesTr" / f"{case}_{c:04d}{file_ending}", img.astype(np.float32), spacing)
        _save(root / "labelsTr" / f"{case}{file_ending}", label, spacing)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): n for i, n in enumerate(channels)},
        "labels": {n: i for i, n in enumerate(classes)}, "numTraining": n_cases, "file_ending": file_ending,
        "name": root.name}))
    return root


def _save(path: Path, arr_zyx: np.ndarray, spacing_zyx) -> None:
    if path.name.endswith(".png"):
        from PIL import Image

        Image.fromarray(np.clip(arr_zyx, 0, 255).astype(np.uint8)).save(path)
        return
    if arr_zyx.ndim == 2:  # 2D as NIfTI: (X, Y, 1)
        arr, sp = arr_zyx.T[:, :, None], (spacing_zyx[1], spacing_zyx[0], 1.0)
    else:
        arr, sp = arr_zyx.transpose(2, 1, 0), tuple(reversed(spacing_zyx))
    nib.save(nib.Nifti1Image(arr, np.diag(list(sp) + [1.0])), str(path))


# the examples' smoke presets, reduced further so that each run takes a few seconds
TINY_3D = ["--preset", "smoke", "--steps", "2", "--val-every", "2", "--warmup-steps", "1", "--no-progress", "--device", "cpu",
           "--threads", "1", "--test-volumes", "1"]
TINY_2D = ["--preset", "smoke", "--size", "32", "--labeled-bs", "2", "--unlabeled-bs", "2", "--steps", "2",
           "--val-every", "2", "--decoder-channels", "16", "16", "8", "--encoder", "tu-regnetx_002",
           "--embed-dim", "8", "--num-anchors", "16", "--num-positives", "16", "--num-negatives", "16",
           "--bank-size", "32", "--max-samples-per-class", "64", "--no-plot", "--threads", "1",
           "--val-volumes", "1", "--test-volumes", "1"]


# ----------------------------------------------------------------------------- reading
def test_reads_dataset_json_and_cases(tmp_path):
    root = make_dataset(tmp_path / "ds", classes=("background", "lv", "myo"), channels=("T1", "T2"))
    info = nd.read_dataset_json(root)
    assert info.class_names == ["background", "lv", "myo"] and info.num_classes == 3 and info.in_channels == 2
    cases = nd.list_cases(info)
    assert list(cases) == [f"case_{i:03d}" for i in range(6)]
    c = nd.load_case(info, "case_001", cases["case_001"])
    assert c.image.shape == (2, 12, 20, 20) and c.label.shape == (12, 20, 20)
    assert c.spacing == pytest.approx((3.0, 1.5, 1.5))
    assert set(np.unique(c.label)) == {0, 1, 2}


def test_2d_png_and_nifti_singleton(tmp_path):
    png = make_dataset(tmp_path / "png", ndim=2, shape=(24, 20), spacing=(1.0, 1.0), file_ending=".png")
    nii = make_dataset(tmp_path / "nii", ndim=2, shape=(24, 20), spacing=(0.8, 0.8))
    for root in (png, nii):
        info = nd.read_dataset_json(root)
        geo = nd.check_dataset(info, nd.list_cases(info))
        assert all(g["shape"] == (1, 24, 20) and g["spacing"][0] == nd.DUMMY_SPACING for g in geo.values())
    with pytest.raises(NnUNetDataError, match="2D images: train it with the 2D example"):
        nd.prepare(png, 3, verbose=False)


def test_normalisation_per_modality():
    rng = np.random.default_rng(0)
    img = rng.normal(500, 100, size=(2, 4, 8, 8)).astype(np.float32)
    lab = np.zeros((4, 8, 8), np.uint8)
    lab[1:3, 2:6, 2:6] = 1
    info = nd.DatasetInfo(Path("."), "x", ["CT", "MRI"], ["background", "a"], ".nii.gz")
    fp = nd.intensity_fingerprint(info, [nd.Case("c", img, lab, (1.0, 1.0, 1.0))])
    assert fp[1] is None and fp[0]["voxels"] == int((lab > 0).sum())
    out = nd.normalize(img, info.channel_names, fp)
    fg = img[0][lab > 0]
    lo, hi = np.percentile(fg, [0.5, 99.5])
    np.testing.assert_allclose(out[0], (np.clip(img[0], lo, hi) - fg.mean()) / fg.std(), rtol=1e-4, atol=1e-4)
    assert abs(out[1].mean()) < 1e-4 and out[1].std() == pytest.approx(1.0, rel=1e-3)  # MRI: per-image z-score
    assert nd.normalize(img, ["rescale_to_0_1", "noNorm"], [None, None])[0].max() == pytest.approx(1.0)


def test_target_spacing_and_plan():
    # anisotropic: only the fine axes are coarsened, down to the budget (CHAOS-T2's smoke grid)
    tsp = nd.target_spacing((7.7, 1.25, 1.25), (36, 256, 256), 36 * 64 * 64)
    assert tsp == pytest.approx((7.7, 5.0, 5.0))
    assert nd.target_spacing((1.0, 1.0, 1.0), (10, 10, 10), None) == (1.0, 1.0, 1.0)
    iso = nd.target_spacing((1.0, 1.0, 1.0), (80, 80, 80), 40 * 40 * 40)
    assert iso == pytest.approx((2.0, 2.0, 2.0))
    plan = nd.plan_patch((36, 128, 128), (7.7, 2.5, 2.5), 16 * 64 * 64, max_stages=5)
    assert math.prod(plan["patch"]) <= 16 * 64 * 64
    # the first pooling skips the coarse axis; every axis is a multiple of 2**poolings and >= 4 after them
    assert plan["strides"][0] == [1, 1, 1] and plan["strides"][1] == [1, 2, 2]
    for a in range(3):
        unit = 2 ** sum(st[a] == 2 for st in plan["strides"])
        assert plan["patch"][a] % unit == 0 and plan["patch"][a] // unit >= 4
    # the same strides as the 3D example's planner
    assert sd.plan_unet(plan["patch"], (7.7, 2.5, 2.5), plan["n_stages"])[0] == plan["strides"]
    assert nd.plan_patch((8, 8, 8), (1, 1, 1), 10**6, max_stages=5)["n_stages"] == 2


def test_labeled_count_or_fraction_and_generated_split(tmp_path):
    assert nd.parse_labeled("3") == 3 and nd.parse_labeled("0.25") == 0.25
    for bad in ("0", "1.5", "-1", "x"):
        with pytest.raises(ValueError):
            nd.parse_labeled(bad)
    ids = [f"c{i:02d}" for i in range(20)]
    s = nd.resolve_split(ids, None, 3, seed=7)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (14, 2, 4)
    assert s["labeled"] == s["train"][:3] and s["unlabeled"] == s["train"][3:]
    assert set(s["train"] + s["val"] + s["test"]) == set(ids)
    assert nd.resolve_split(ids, None, 3, seed=7) == s  # reproducible
    assert nd.resolve_split(ids, None, 3, seed=8)["train"] != s["train"]
    assert len(nd.resolve_split(ids, None, 0.5, seed=7)["labeled"]) == 7
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ids[:10], "val": ids[10:12], "test": ids[12:], "labeled": ids[:2]}))
    assert nd.resolve_split(ids, path, None)["labeled"] == ids[:2]
    assert nd.resolve_split(ids, path, 4)["labeled"] == ids[:4]
    path.write_text(json.dumps({"train": ids[:10] + ["nope"], "val": [], "test": []}))
    with pytest.raises(NnUNetDataError, match=r"split\.json.*'nope'.*not in imagesTr"):
        nd.resolve_split(ids, path, None)


# ----------------------------------------------------------------------------- malformed datasets
def test_missing_dataset_json(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "dataset.json").unlink()
    with pytest.raises(NnUNetDataError, match=r"missing dataset\.json: expected .*dataset\.json.* channel_names, "
                                              r"labels and file_ending"):
        nd.prepare(root, 3, verbose=False)


def test_label_value_not_listed(tmp_path):
    root = make_dataset(tmp_path / "ds")
    lab = root / "labelsTr" / "case_002.nii.gz"
    arr = np.asanyarray(nib.load(str(lab)).dataobj).copy()
    arr[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(arr, nib.load(str(lab)).affine), str(lab))
    with pytest.raises(NnUNetDataError, match=r"case_002\.nii\.gz.*value\(s\) \[7\] not listed in labels of "
                                              r"dataset\.json \(expected 0\.\.1: 0 background, 1 heart\)"):
        nd.prepare(root, 3, verbose=False)


def test_image_without_label(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "labelsTr" / "case_004.nii.gz").unlink()
    with pytest.raises(NnUNetDataError, match=r"image without its label: .*case_004_0000\.nii\.gz.* has no label "
                                              r"file .*labelsTr/case_004\.nii\.gz"):
        nd.prepare(root, 3, verbose=False)


def test_mismatched_shapes(tmp_path):
    root = make_dataset(tmp_path / "ds")
    _save(root / "labelsTr" / "case_001.nii.gz", np.zeros((12, 20, 18), np.uint8), (3.0, 1.5, 1.5))
    with pytest.raises(NnUNetDataError, match=r"label file .*case_001\.nii\.gz.* has shape \(12, 20, 18\), expected "
                                              r"the image's shape \(12, 20, 20\)"):
        nd.prepare(root, 3, verbose=False)


def test_mismatched_channels(tmp_path):
    root = make_dataset(tmp_path / "ds", channels=("T1", "T2"))
    _save(root / "imagesTr" / "case_003_0001.nii.gz", np.zeros((12, 16, 20), np.float32), (3.0, 1.5, 1.5))
    with pytest.raises(NnUNetDataError, match=r"channel file .*case_003_0001\.nii\.gz.* has shape \(12, 16, 20\)"):
        nd.prepare(root, 3, verbose=False)
    (root / "imagesTr" / "case_003_0001.nii.gz").unlink()
    with pytest.raises(NnUNetDataError, match=r"missing channel file .*case_003_0001\.nii\.gz"):
        nd.prepare(root, 3, verbose=False)


def test_other_malformations(tmp_path):
    root = make_dataset(tmp_path / "ds")
    (root / "imagesTr" / "badname.nii.gz").write_bytes(b"x")
    with pytest.raises(NnUNetDataError, match=r"badname\.nii\.gz.*expected the name CASE_XXXX\.nii\.gz"):
        nd.prepare(root, 3, verbose=False)
    (root / "imagesTr" / "badname.nii.gz").unlink()
    (root / "imagesTr" / "case_000_0001.nii.gz").write_bytes(b"x")
    with pytest.raises(NnUNetDataError, match=r"case_000_0001\.nii\.gz.*channel 0001 is not listed in channel_names"):
        nd.prepare(root, 3, verbose=False)
    (root / "imagesTr" / "case_000_0001.nii.gz").unlink()
    d = json.loads((root / "dataset.json").read_text())
    d["labels"] = {"background": 0, "heart": 2}
    (root / "dataset.json").write_text(json.dumps(d))
    with pytest.raises(NnUNetDataError, match=r"dataset\.json.*consecutive integers 0\.\.1"):
        nd.prepare(root, 3, verbose=False)


def test_cli_error_names_the_file(tmp_path):
    import subprocess

    root = make_dataset(tmp_path / "ds")
    (root / "labelsTr" / "case_004.nii.gz").unlink()
    r = subprocess.run([sys.executable, str(EXAMPLES / "synapse_cps_dacl.py"), "--dataset-dir", str(root),
                        "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "image without its label" in r.stderr and "case_004" in r.stderr


# ----------------------------------------------------------------------------- end to end: 3D example
@pytest.mark.parametrize("classes,channels", [(("background", "heart"), ("MRI",)),
                                              (("background", "liver", "kidney", "spleen"), ("CT", "MRI"))],
                         ids=["binary", "multiclass-2ch"])
def test_3d_example_end_to_end(tmp_path, classes, channels):
    import synapse_cps_dacl as ex

    root = make_dataset(tmp_path / "ds", classes=classes, channels=channels, n_cases=6)
    out = tmp_path / "run"
    m = ex.main(["--dataset-dir", str(root), "--output-dir", str(out), "--labeled", "0.5"] + TINY_3D)
    assert m["identity"]["dataset"] == "nnunet"
    assert m["test"]["classes"] == list(classes[1:])
    assert all(0.0 <= v <= 1.0 for v in m["test"]["per_class"]["dice"].values())
    cfg = json.loads((out / "config.json").read_text())
    plan = cfg["nnunet"]["plan"]
    assert cfg["in_channels"] == len(channels) and cfg["nnunet"]["dataset"]["class_names"] == list(classes)
    assert list(cfg["patch"]) == plan["patch"] and cfg["n_stages"] == len(cfg["features"]) <= 3
    split = json.loads((out / "split.json").read_text())
    assert (len(split["labeled"]), len(split["unlabeled"]), len(split["val"]), len(split["test"])) == (2, 2, 1, 1)
    assert m["extra"]["split"]["labeled"] == split["labeled"] and m["extra"]["split"]["test"] == split["test"]
    assert (out / "test_predictions.png").stat().st_size > 1000
    # the saved split reproduces the run's split
    again = nd.resolve_split(list(nd.list_cases(nd.read_dataset_json(root))), out / "split.json", None)
    assert again["labeled"] == split["labeled"] and again["test"] == split["test"]


def test_sliding_window_and_sampler_multichannel():
    rng = np.random.default_rng(0)
    lab = np.zeros((6, 12, 12), np.uint8)
    lab[2:4, 3:6, 3:6] = 1
    v = sd.Volume("a", rng.random((2, 6, 12, 12)).astype(np.float32), lab)
    x, y = sd.PatchSampler([v], (4, 8, 8), seed=0).sample(3)
    assert x.shape == (3, 2, 4, 8, 8) and y.shape == (3, 4, 8, 8)
    net = torch.nn.Conv3d(2, 3, 1)
    probs = sd.sliding_window_inference(net, torch.from_numpy(v.image), (4, 8, 8), 3)
    with torch.no_grad():
        ref = torch.softmax(net(torch.from_numpy(v.image)[None]), 1)[0]
    assert torch.allclose(probs, ref, atol=1e-5)


def test_2d_training_slices_honour_crop():
    """--crop with --dataset-dir trains on crop x crop windows, as on ACDC (it used to be ignored)."""
    rng = np.random.default_rng(0)
    slices = [("a", rng.random((2, 24, 20), dtype=np.float32), rng.integers(0, 3, (24, 20)).astype(np.uint8))]
    whole = nd.Slices2D(slices, 32, augment=True, n_labeled=1)
    crop = nd.Slices2D(slices, 32, augment=True, n_labeled=1, crop=16)
    assert tuple(whole[(0, 7)]["image"].shape) == (2, 32, 32)
    a, b = crop[(0, 7)], whole[(0, 7)]
    assert tuple(a["image"].shape) == (2, 16, 16) and tuple(a["label"].shape) == (16, 16)
    windows = [(oy, ox) for oy in range(17) for ox in range(17)
               if torch.equal(b["image"][:, oy:oy + 16, ox:ox + 16], a["image"])]
    assert windows  # a window of the same augmented, resized slice


# ----------------------------------------------------------------------------- end to end: 2D example
@pytest.mark.parametrize("kind", ["2d-png-binary", "3d-sliced-multiclass-2ch"])
def test_2d_example_end_to_end(tmp_path, kind):
    pytest.importorskip("segmentation_models_pytorch")
    import acdc_cps_dacl

    if kind == "2d-png-binary":
        classes, channels = ("background", "cell"), ("noNorm",)
        root = make_dataset(tmp_path / "ds", ndim=2, classes=classes, channels=channels, shape=(24, 20),
                            spacing=(1.0, 1.0), file_ending=".png", n_cases=8)
        extra = []
    else:
        classes, channels = ("background", "lv", "myo", "rv"), ("T1", "T2")
        root = make_dataset(tmp_path / "ds", classes=classes, channels=channels, shape=(6, 20, 20), n_cases=6)
        extra = ["--slice-axis", "2"]
    out = tmp_path / "run"
    tiny = [a for a in TINY_2D if a != "--no-plot"] if extra else TINY_2D
    m = acdc_cps_dacl.main(["--dataset-dir", str(root), "--output-dir", str(out), "--labeled", "2"] + tiny + extra)
    t = m["test"]
    assert list(t["per_class"]["dice"]) == list(classes[1:])
    assert all(len(c["dice"]) == len(classes) - 1 for c in t["per_case"].values())
    assert math.isfinite(t["mean"]["dice"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_classes"] == len(classes) and cfg["in_channels"] == len(channels)
    assert cfg["class_names"] == list(classes)
    split = json.loads((out / "split.json").read_text())
    assert len(split["labeled"]) == 2 and list(t["per_case"])[0] in split["test"]
    if kind != "2d-png-binary":
        assert cfg["nnunet"]["plan"]["slice_axis"] == 2
        assert (out / "test_predictions.png").stat().st_size > 1000
        import evaluate_acdc  # the standalone evaluation finds the dataset and the split of the run

        ev = evaluate_acdc.main([str(out / "best.pt"), "--output", str(tmp_path / "eval.json")])
        assert ev["mean"] == t["mean"] and ev["classes"] == list(classes[1:])


# ----------------------------------------------------------------------------- CHAOS-T2 converted
def test_converted_splits_are_the_fixed_ones(tmp_path):
    import convert_to_nnunet as conv

    full = conv.converted_split("chaos")
    ref = sd.load_split("chaos_t2", 4)
    back = {k: [conv.chaos_source_id(c) for c in full[k]] for k in ("train", "val", "test", "labeled")}
    assert back["train"] == ref["labeled"] + ref["unlabeled"] and back["labeled"] == ref["labeled"]
    assert back["val"] == ref["val"] and back["test"] == ref["test"]
    ids = full["train"] + full["val"] + full["test"]
    for n in (2, 4):
        s = nd.resolve_split(ids, _write(full, tmp_path / f"chaos{n}.json"), n)
        assert [conv.chaos_source_id(c) for c in s["labeled"]] == sd.load_split("chaos_t2", n)["labeled"]
    syn = conv.converted_split("btcv")  # DHC's labeled sets are not nested: labeled_N keys keep them
    ids = syn["train"] + syn["val"] + syn["test"]
    for n in (2, 4):
        s = nd.resolve_split(ids, _write(syn, tmp_path / f"btcv{n}.json"), n)
        assert s["labeled"] == [conv.btcv_case_id(i) for i in sd.load_split("synapse_dhc", n)["labeled"]]


def _write(split: dict, path: Path) -> Path:
    path.write_text(json.dumps(split))
    return path


def test_chaos_conversion_keeps_voxels_and_labels(tmp_path, chaos_dir):
    import convert_to_nnunet as conv

    dst = conv.main(["chaos", str(chaos_dir), str(tmp_path / "Dataset501_CHAOS_T2"), "--cases", "36", "10"])
    info = nd.read_dataset_json(dst)
    assert info.class_names == list(sd.CHAOS_CLASSES) and info.channel_names == ["T2"]
    cases = nd.list_cases(info)
    assert list(cases) == ["CHAOS_010", "CHAOS_036"]
    split = json.loads((dst / "split.json").read_text())
    assert split["train"] == ["CHAOS_036"] and split["test"] == ["CHAOS_010"]
    v = sd.read_generic_case(chaos_dir, "36", normalization="minmax")
    c = nd.load_case(info, "CHAOS_036", cases["CHAOS_036"])
    assert c.image.shape[1:] == v.image.shape and np.array_equal(c.label, v.label)
    assert c.spacing == pytest.approx(v.spacing)


@pytest.mark.slow
def test_chaos_converted_smoke_matches_the_chaos_run(tmp_path, chaos_dir):
    import convert_to_nnunet as conv
    import synapse_cps_dacl as ex

    dst = conv.main(["chaos", str(chaos_dir), str(tmp_path / "Dataset501_CHAOS_T2")])
    out = tmp_path / "run"
    m = ex.main(["--preset", "smoke", "--method", "dacl", "--dataset-dir", str(dst), "--labeled", "2",
                 "--output-dir", str(out), "--no-progress", "--device", "cpu"])
    ref = sd.load_split("chaos_t2", 2)
    split, extra = m["extra"]["split"], m["extra"]
    assert [conv.chaos_source_id(c) for c in split["labeled"]] == ref["labeled"]
    assert [conv.chaos_source_id(c) for c in split["unlabeled"]] == ref["unlabeled"]
    assert [conv.chaos_source_id(c) for c in split["test"]] == ref["test"][:2]
    assert m["test"]["classes"] == ["liver", "right_kidney", "left_kidney", "spleen"]
    assert m["identity"]["steps"] == 8 and m["best"]["step"] == 8
    assert extra["network"]["feature_layer"] == "decoder.stages.1"  # 3 stages, as the chaos smoke run
    assert extra["nnunet"]["plan"]["target_spacing"] == pytest.approx([7.7, 5.0, 5.0], rel=1e-3)  # = chaos_zoom 0.25
    for name in ("last.pt", "best.pt", "test_predictions.png", "config.json", "split.json"):
        assert (out / name).exists()
