"""Tests of the 3D (Synapse-protocol) example: readers, sampling, sliding window, end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

nib = pytest.importorskip("nibabel")
pytest.importorskip("dynamic_network_architectures")

import synapse_data as sd  # noqa: E402


def _save_nifti(path: Path, arr_xyz: np.ndarray, spacing_xyz=(1.5, 1.0, 3.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr_xyz, np.diag(list(spacing_xyz) + [1.0])), str(path))


# ----------------------------------------------------------------------------- readers
def test_btcv_reader_hu_clip_orientation_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    img_xyz = rng.uniform(-1000, 1000, size=(12, 10, 6)).astype(np.float32)
    img_xyz[0, 0, 0], img_xyz[1, 0, 0] = -1000.0, 1000.0  # both ends of the window are reached
    lab_xyz = rng.integers(0, 14, size=(12, 10, 6)).astype(np.uint8)
    _save_nifti(tmp_path / "img" / "img0007.nii.gz", img_xyz)
    _save_nifti(tmp_path / "label" / "label0007.nii.gz", lab_xyz)
    assert sd.list_btcv_cases(tmp_path) == ["0007"]

    v = sd.read_btcv_case(tmp_path, "0007", resize_shape=None)
    assert v.image.shape == (6, 10, 12) and v.image.dtype == np.float32
    expected = (np.clip(img_xyz, -75, 275) + 75) / 350.0
    np.testing.assert_allclose(v.image, expected.transpose(2, 1, 0), atol=1e-6)
    np.testing.assert_array_equal(v.label, lab_xyz.transpose(2, 1, 0))
    assert v.spacing == pytest.approx((3.0, 1.0, 1.5))
    # everything below -75 HU is 0, above 275 is 1
    assert (v.image[(img_xyz <= -75).transpose(2, 1, 0)] == 0).all()
    assert (v.image[(img_xyz >= 275).transpose(2, 1, 0)] == 1).all()

    r = sd.read_btcv_case(tmp_path, "0007", resize_shape=(4, 8, 8))
    assert r.image.shape == (4, 8, 8) and r.label.shape == (4, 8, 8)
    assert 0.0 <= r.image.min() and r.image.max() <= 1.0
    assert set(np.unique(r.label)) <= set(np.unique(lab_xyz))  # nearest: no new label values
    assert r.spacing == pytest.approx((3.0 * 6 / 4, 1.0 * 10 / 8, 1.5 * 12 / 8))


def test_dhc_npy_reader_and_split(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "npy").mkdir()
    (tmp_path / "splits").mkdir()
    img = rng.uniform(-500, 600, size=(5, 8, 9)).astype(np.float32)
    img[0, 0, 0], img[0, 0, 1] = -500, 600
    lab = rng.integers(0, 14, size=(5, 8, 9)).astype(np.int8)
    np.save(tmp_path / "npy" / "0002_image.npy", img)
    np.save(tmp_path / "npy" / "0002_label.npy", lab)
    (tmp_path / "splits" / "labeled_10p.txt").write_text("0023\n0002\n")
    assert sd.list_dhc_npy_cases(tmp_path) == ["0002"]
    assert sd.read_dhc_split(tmp_path, "labeled_10p") == ["0002", "0023"]
    v = sd.read_dhc_npy_case(tmp_path, "0002")
    assert v.image.shape == (5, 8, 9) and v.label.dtype == np.uint8
    np.testing.assert_allclose(v.image, (np.clip(img, -75, 275) + 75) / 350, atol=1e-6)
    np.testing.assert_array_equal(v.label, lab)
    z = sd.read_dhc_npy_case(tmp_path, "0002", zoom=(1.0, 0.5, 1.0))
    assert z.image.shape == (5, 4, 9) and z.label.shape == (5, 4, 9)


def test_generic_reader_percentile_norm_and_zoom(tmp_path):
    rng = np.random.default_rng(2)
    for cid in ("10", "2", "1"):
        img = rng.gamma(2.0, 150.0, size=(16, 16, 5))
        lab = np.zeros((16, 16, 5), np.uint8)
        lab[4:10, 3:8, 1:4] = 1
        lab[10:14, 10:14, 2:4] = 4
        _save_nifti(tmp_path / f"image_{cid}.nii.gz", img, (1.25, 1.25, 7.7))
        _save_nifti(tmp_path / f"label_{cid}.nii.gz", lab.astype(np.float64), (1.25, 1.25, 7.7))
    assert sd.list_generic_cases(tmp_path) == ["1", "2", "10"]
    v = sd.read_generic_case(tmp_path, "2")
    assert v.image.shape == (5, 16, 16) and v.image.dtype == np.float32
    assert v.image.min() == 0.0 and v.image.max() == pytest.approx(1.0)
    # percentile clipping: about 0.5 % of voxels at each bound
    assert (v.image == 1.0).mean() == pytest.approx(0.005, abs=0.004)
    assert v.spacing == pytest.approx((7.7, 1.25, 1.25))
    assert set(np.unique(v.label)) == {0, 1, 4}
    h = sd.read_generic_case(tmp_path, "2", zoom=(1.0, 0.5, 0.5))
    assert h.image.shape == (5, 8, 8) and h.label.shape == (5, 8, 8)
    assert h.spacing == pytest.approx((7.7, 2.5, 2.5))
    with pytest.raises(ValueError):
        sd.read_generic_case(tmp_path, "2", normalization="zscore")


def test_committed_splits(request):
    from conftest import data_root

    s2, s4 = sd.load_split("chaos_t2", 2), sd.load_split("chaos_t2", 4)
    assert len(s2["labeled"]) == 2 and len(s4["labeled"]) == 4 and set(s2["labeled"]) < set(s4["labeled"])
    assert len(s4["labeled"]) + len(s4["unlabeled"]) == 12 and len(s4["val"]) == 2 and len(s4["test"]) == 6
    every = s4["labeled"] + s4["unlabeled"] + s4["val"] + s4["test"]
    assert len(set(every)) == 20
    assert s4["classes"] == list(sd.CHAOS_CLASSES)
    chaos = data_root(request.config) / "CHAOS-T2"
    if chaos.is_dir():  # the split names every case of the real data, when it is here
        assert set(every) == set(sd.list_generic_cases(chaos))
    syn = sd.load_split("synapse_dhc", 4)
    assert len(syn["labeled"]) + len(syn["unlabeled"]) == 20 and len(syn["test"]) == 6
    assert sd.load_split("synapse_dhc", 2)["labeled"] == ["0023", "0028"]
    assert len(syn["classes"]) == 14
    with pytest.raises(ValueError):
        sd.load_split("chaos_t2", 3)


# ----------------------------------------------------------------------------- sampling / planning
def test_patch_sampler_shapes_padding_foreground_and_state():
    rng = np.random.default_rng(3)
    lab = np.zeros((6, 20, 20), np.uint8)
    lab[2:4, 15:18, 15:18] = 2
    v = sd.Volume("a", rng.random((6, 20, 20)).astype(np.float32), lab)
    s = sd.PatchSampler([v], (8, 8, 8), foreground_prob=1.0, augment=False, seed=0)
    x, y = s.sample(3)
    assert x.shape == (3, 1, 8, 8, 8) and y.shape == (3, 8, 8, 8) and y.dtype == torch.int64
    assert all((y[i] == 2).any() for i in range(3))  # foreground oversampling
    assert (x[:, 0, 0] == 0).all() or (x[:, 0, -1] == 0).all()  # Z padded (6 < 8)
    st = s.state_dict()
    a = s.sample(2)
    s.load_state_dict(st)
    b = s.sample(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    u = sd.PatchSampler([sd.Volume("u", v.image, None)], (4, 8, 8), seed=1)
    xu, yu = u.sample(2)
    assert xu.shape == (2, 1, 4, 8, 8) and (yu == 0).all()


def test_plan_unet_anisotropic():
    strides, kernels = sd.plan_unet((16, 64, 64), (7.7, 2.5, 2.5), 4)
    assert strides == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert kernels[0] == [1, 3, 3] and kernels[1] == [3, 3, 3]
    strides, kernels = sd.plan_unet((64, 128, 128), None, 5)
    assert strides[1:] == [[2, 2, 2]] * 4 and all(k == [3, 3, 3] for k in kernels)


# ----------------------------------------------------------------------------- sliding window
def test_gaussian_importance_map():
    g = sd.gaussian_importance_map((8, 16, 16))
    assert g.shape == (8, 16, 16) and g.max() == pytest.approx(1.0) and g.min() > 0
    assert torch.allclose(g, g.flip(0)) and torch.allclose(g, g.flip(2))
    assert g[4, 8, 8] > g[4, 8, 12] > g[4, 8, 15]


def test_sliding_window_pointwise_net_equals_whole_volume():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 1), torch.nn.ReLU(), torch.nn.Conv3d(8, 3, 1)).eval()
    vol = torch.randn(7, 21, 19)  # Z smaller than the patch, Y/X not multiples of it
    probs = sd.sliding_window_inference(net, vol, (8, 8, 8), 3, overlap=0.5, batch_size=3)
    assert probs.shape == (3, 7, 21, 19)
    assert torch.allclose(probs.sum(0), torch.ones(7, 21, 19), atol=1e-5)
    with torch.no_grad():
        ref = torch.softmax(net(vol[None, None]), 1)[0]
    # a pointwise net predicts each voxel the same in every tile (padding never reaches it)
    assert torch.allclose(probs, ref, atol=1e-5)


def test_sliding_window_gaussian_weighting():
    patch = (4, 4, 8)
    calls = []

    def predict(x):  # tile k predicts class k % 2 with certainty
        out = torch.full((x.shape[0], 2) + patch, -30.0)
        for i in range(x.shape[0]):
            out[i, len(calls) % 2] = 30.0
            calls.append(1)
        return out

    probs = sd.sliding_window_inference(predict, torch.zeros(4, 4, 12), patch, 2, overlap=0.5)
    assert len(calls) == 2  # x starts 0 and 4
    g = sd.gaussian_importance_map(patch)
    x = 5  # local index 5 in tile 0, 1 in tile 1
    w0, w1 = g[1, 1, 5], g[1, 1, 1]
    assert probs[0, 1, 1, x] == pytest.approx(float(w0 / (w0 + w1)), abs=1e-5)
    assert probs[0, 1, 1, 2] == pytest.approx(1.0, abs=1e-5) and probs[1, 1, 1, 10] == pytest.approx(1.0, abs=1e-5)
    uniform = sd.sliding_window_inference(predict, torch.zeros(4, 4, 12), patch, 2, overlap=0.5, gaussian=False)
    assert uniform[0, 1, 1, x] == pytest.approx(0.5, abs=1e-5)


# ----------------------------------------------------------------------------- library on 5D with the network
def test_plain_conv_unet_feature_hook_and_dacl_5d():
    import synapse_cps_dacl as ex
    from torch_dacl import CoTrainingWrapper, SoftDensityContrastiveLoss

    cfg = dict(ex.PRESETS["smoke"])
    torch.manual_seed(0)
    w = CoTrainingWrapper(ex.build_unet(cfg, 5, None), ex.build_unet(cfg, 5, None), ex.feature_layer_name(cfg),
                          cfg["features"][0], embed_dim=8, spatial_dims=3)
    x = torch.randn(2, 1, 8, 16, 16)
    o = w(x)
    assert o.logits_a.shape == (2, 5, 8, 16, 16) and o.features_b.shape == (2, cfg["features"][0], 8, 16, 16)
    labels = torch.randint(0, 5, (2, 8, 16, 16))
    labels[1, :4] = -100
    loss = SoftDensityContrastiveLoss(5, 8, num_anchors=16, num_positives=16, num_negatives=16, bank_size=8)(
        o.features_a, labels, head=w.head_a)  # the sparse head: run at the sampled voxels
    (loss + w.cross_loss(o.logits_a, o.logits_b)).backward()
    assert torch.isfinite(loss)
    assert w.head_a.net[0].weight.grad is not None and w.model_a.encoder.stages[0][0].convs[0].conv.weight.grad is not None


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path, chaos_dir):
    import synapse_cps_dacl as ex

    out = tmp_path / "run"
    m = ex.main(["--preset", "smoke", "--method", "dacl", "--dataset", "chaos", "--labeled", "2",
                 "--data-root", str(chaos_dir.parent), "--output-dir", str(out), "--no-progress", "--device", "cpu"])
    with open(out / "metrics.json") as f:
        saved = json.load(f)
    assert saved["test"]["mean"]["dice"] == pytest.approx(m["test"]["mean"]["dice"])
    assert saved["test"]["classes"] == ["liver", "right_kidney", "left_kidney", "spleen"]
    assert all(0.0 <= v <= 1.0 for v in saved["test"]["per_class"]["dice"].values())
    extra = saved["extra"]
    assert len(saved["test"]["per_case"]) == 2 and extra["split"]["test"] == sd.load_split("chaos_t2", 2)["test"][:2]
    assert "smoke" in extra["reduced"] and saved["identity"]["steps"] == 8
    assert saved["val_history"] and saved["best"]["step"] == 8
    assert extra["network"]["feature_layer"] == "decoder.stages.1"
    for name in ("last.pt", "best.pt", "test_predictions.png", "test_slices.npz"):
        assert (out / name).exists()
    assert any((out / "tb").iterdir())


def test_default_run_folder_names():
    import synapse_cps_dacl as ex

    cfg = dict(dataset="chaos", dataset_dir=None, preset="quick", method="cps", labeled=4, seed=1)
    assert ex.TASK.output_dir(cfg).relative_to(REPO).as_posix() == "runs/synapse/chaos_quick_cps_l4_s1"
    btcv = {**cfg, "dataset": "btcv", "dataset_dir": "/data/Synapse/RawData/Training"}
    assert ex.TASK.output_dir(btcv).name == "btcv_quick_cps_l4_s1"
    own = {**cfg, "dataset": "nnunet", "dataset_dir": "/x/Dataset501_Heart", "labeled": None}
    assert ex.TASK.output_dir(own).name == "Dataset501_Heart_quick_cps_s1"
