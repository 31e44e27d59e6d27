#!/usr/bin/env python
"""3D semi-supervised multi-organ segmentation: co-training (CPS) + DACL, Synapse protocol.

Two nnU-Net networks (``dynamic_network_architectures.PlainConvUNet``, the network nnU-Net
builds for 3D full resolution) are trained by cross pseudo supervision on random patches
drawn from a two-stream batch (labeled + unlabeled volumes); with ``--method dacl`` each gets
the density-aware contrastive term of torch_dacl on the embeddings of a projection head
attached to its last full-resolution decoder stage. Whole volumes are predicted by
sliding-window inference with Gaussian weighting (the two models' softmax averaged, as DHC
does), and scored per organ with medpy Dice and ASD.

Why PlainConvUNet and not DHC's V-Net: it is the network nnU-Net builds (its 3d_fullres
plan), it comes from a maintained package (``dynamic_network_architectures``) instead of
copied code, it is configured per dataset the nnU-Net way (``synapse_data.plan_unet`` picks
per-stage strides and 1x3x3 kernels for anisotropic MR such as CHAOS-T2, 7.7 mm slices),
it uses instance norm (robust with 2 + 2 patches per batch), and its last decoder stage
(``decoder.stages.<n-2>``) is a named submodule whose output is exactly the last
full-resolution feature map, which is what ``CoTrainingWrapper``'s forward hook needs. The
paper's absolute Synapse numbers are with V-Net; CPS vs DACL is compared here on one backbone.

Datasets (``--dataset``):

* ``nnunet`` (the default with ``--dataset-dir``): your own dataset, any nnU-Net raw folder
  (``dataset.json``, ``imagesTr/``, ``labelsTr/``; ``nnunet_data.py``): classes, names and
  input channels from ``dataset.json``; split from ``--split`` / ``<dir>/split.json`` or
  generated (``--split-seed``), saved in the run folder; ``--labeled`` a count or a
  fraction; per-channel normalisation, resampling, patch and depth derived from the data
  (saved in ``config.json``). See docs/tutorials/own_data.rst.
* ``chaos``: CHAOS-T2 abdominal MRI (liver, kidneys, spleen) in a folder of
  ``image_<id>.nii.gz`` / ``label_<id>.nii.gz``; split ``examples/splits/chaos_t2.json``
  (12 train with 2 / 4 labeled, 2 val, 6 test). Percentile intensity normalisation.
* ``btcv``: Synapse/BTCV raw layout ``img/imgXXXX.nii.gz`` / ``label/labelXXXX.nii.gz``
  with the DHC preprocessing (HU clip -75..275, resize to patch + patch // 4); the DHC split
  ``examples/splits/synapse_dhc.json`` (20 train with 2 / 4 labeled, 4 val, 6 test).
* ``dhc_npy``: DHC's preprocessed ``npy/XXXX_image.npy`` layout, same split.

Presets: ``smoke`` (12 s measured on a 2-core CPU, for CI), ``quick`` (13-25 minutes measured
on that CPU, shared with other jobs), ``paper`` (the DHC protocol: patch 64x128x128, 2 + 2 patches, 30k iterations; a
GPU). Every preset value can be overridden on the command line.

Examples::

    python examples/synapse_cps_dacl.py --preset smoke --method dacl
    python examples/synapse_cps_dacl.py --preset quick --method cps --labeled 4 --seed 0
    python examples/synapse_cps_dacl.py --preset paper --dataset btcv --labeled 4 \\
        --dataset-dir /data/Synapse/RawData/Training --device cuda --amp
    torchrun --standalone --nproc_per_node=2 examples/synapse_cps_dacl.py --preset paper --amp  # DDP, 2 GPUs

Distributed (``torchrun --nproc_per_node=N``, see docs/distributed.rst): the preset's batch
sizes are the *global* batch; each rank draws ``batch_labeled / N`` labeled and
``batch_unlabeled / N`` unlabeled patches (multiples of N are required: the smoke preset's
1 + 1 needs ``--batch-labeled 2 --batch-unlabeled 2`` on 2 ranks). Patch samplers and DACL
sampling are seeded per rank (``seed + rank``); the model initialisation is the same on all
ranks. DDP wraps the networks, DACL gathers its samples over the ranks
(``gather_distributed=True``), BatchNorm (of the projection heads; the U-Nets use
InstanceNorm) becomes SyncBatchNorm on CUDA only (torch has no CPU SyncBatchNorm). Rank 0
alone logs, saves checkpoints and evaluates; the other ranks wait. ``--resume`` loads
``last.pt`` on every rank (each rank continues its own sampler and random state).

Outputs (``--out``, default ``runs/synapse/<dataset>_<preset>_<method>_l<labeled>_s<seed>``):
``metrics.json``, ``last.pt`` / ``best.pt`` (resume with ``--resume``), ``tb/`` (TensorBoard),
``test_slices.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

# OpenMP threads that spin while waiting make a CPU shared with other jobs crawl; this must be
# set before torch loads its OpenMP runtime (same choice as the ACDC example).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import _dist  # noqa: E402
import synapse_data as sd  # noqa: E402
import nnunet_data as nd  # noqa: E402
from torch_dacl import CoTrainingWrapper, DACLObjective, gradient_share  # noqa: E402
from torch_dacl.functional import gaussian_rampup  # noqa: E402

# ----------------------------------------------------------------------------- presets
# chaos_zoom: (z, y, x) factors applied to CHAOS-T2 (native 256x256xZ, 1.25x1.25x7.7 mm);
# btcv / dhc_npy volumes are resized to patch + patch // 4 (DHC).
# nnunet datasets (nnunet_data): volume_budget caps the median volume after resampling (36x64x64
# voxels: CHAOS-T2 at the smoke / quick chaos_zoom; None: the median spacing); the product of
# patch is the patch's voxel budget and n_stages the deepest network (both derived per dataset).
PRESETS: Dict[str, dict] = {
    "smoke": dict(
        patch=(16, 64, 64), chaos_zoom=(1.0, 0.25, 0.25), volume_budget=36 * 64 * 64, features=(4, 8, 16), n_stages=3, lr=0.01,
        batch_labeled=1, batch_unlabeled=1, iterations=8, val_every=8, cross_rampup=0, max_val_cases=1, max_test_cases=2,
        embed_dim=16, hidden_dim=16, num_anchors=64, num_positives=128, num_negatives=128, bank_size=100,
        max_samples_per_class=256, warmup_steps=2, val_overlap=0.25,
        note="smoke: CHAOS-T2 in-plane downsampled 4x (64x64xZ), patch 16x64x64, 3-stage PlainConvUNet "
             "(4-8-16 features), 1+1 patches, 8 iterations (DACL active from iteration 3), DACL sizes reduced (D=16, N_q=64, N_p=128, L=100), "
             "1 val and 2 test volumes, window overlap 0.25. Checks the pipeline runs; the numbers mean nothing."),
    "quick": dict(
        patch=(16, 64, 64), chaos_zoom=(1.0, 0.25, 0.25), volume_budget=36 * 64 * 64, features=(8, 16, 32, 64), n_stages=4, lr=0.03,
        batch_labeled=2, batch_unlabeled=2, iterations=400, val_every=50, max_val_cases=None, max_test_cases=None,
        cross_rampup=160, embed_dim=32, hidden_dim=32, num_anchors=256, num_positives=512, num_negatives=512,
        bank_size=1000, max_samples_per_class=1024, warmup_steps=13, val_overlap=0.5,
        note="quick: CHAOS-T2 in-plane downsampled 4x (64x64xZ, 5x5x7.7 mm) so a 16x64x64 patch holds whole "
             "slices, 4-stage PlainConvUNet (8-16-32-64 features), 2+2 patches, 400 iterations (DACL warm-up 13 = "
             "1000/30000 scaled), lr 0.03 and lambda_cross ramped up over the first 160 iterations (Gaussian, "
             "as Eq. 1): with lr 0.01, or with lambda_cross = 1 from step 0, both models collapsed to predicting "
             "background only within the first 150-200 iterations (CPS reinforces the all-background argmax of "
             "untrained models); embedding D=32; paper DACL sizes otherwise "
             "(N_q=256, N_p=512, L=1000); all 2 val / 6 test volumes."),
    "paper": dict(
        patch=(64, 128, 128), chaos_zoom=(1.0, 0.625, 0.625), volume_budget=None, features=(32, 64, 128, 256, 320), n_stages=5, lr=0.01,
        batch_labeled=2, batch_unlabeled=2, iterations=30000, val_every=500, cross_rampup=0, max_val_cases=None, max_test_cases=None,
        embed_dim=64, hidden_dim=None, num_anchors=256, num_positives=512, num_negatives=512, bank_size=1000,
        max_samples_per_class=1024, warmup_steps=1000, val_overlap=0.5,
        note="paper: DHC protocol (patch 64x128x128 on volumes resized to 80x160x160, 2+2 patches, 30k "
             "iterations, warm-up 1000), PlainConvUNet 32-64-128-256-320 in place of V-Net, DACL defaults."),
}

DATASET_DIRS = {"chaos": "CHAOS-T2", "btcv": "Synapse/RawData/Training", "dhc_npy": "synapse_data"}
SPLIT_FILES = {"chaos": "chaos_t2", "btcv": "synapse_dhc", "dhc_npy": "synapse_dhc"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Distributed" + __doc__.split("\nDistributed", 1)[1].split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    p.add_argument("--method", choices=("sup", "cps", "dacl"), default="dacl")
    p.add_argument("--dataset", choices=sorted(DATASET_DIRS) + ["nnunet"], default=None,
                   help="nnunet: an nnU-Net raw folder given by --dataset-dir (the default when --dataset-dir is "
                        "given; see docs/tutorials/own_data.rst); else chaos")
    p.add_argument("--labeled", type=nd.parse_labeled, default=None,
                   help="labeled training volumes: a count, or a fraction 0<x<1 of the training cases (nnunet: the "
                        "first N of the split's train list; default: the split's labeled list, else a quarter); "
                        "chaos / btcv / dhc_npy: 2 or 4 (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--data-root", default=None,
                   help="folder holding the datasets (default: $TORCH_DACL_DATA, else the cache of "
                        "examples/get_data.py, ~/.cache/torch-dacl/data)")
    p.add_argument("--dataset-dir", default=None, help="the dataset folder itself (overrides --data-root); an "
                                                         "nnU-Net raw folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--split", default=None, help="nnunet: split JSON (train/val/test, optional labeled); default "
                                                 "<dataset-dir>/split.json if present, else generated")
    p.add_argument("--split-seed", type=int, default=0, help="nnunet: seed of a generated split")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), default=None,
                   help="nnunet: target spacing in mm (default: the median spacing, coarsened to the preset's "
                        "volume budget)")
    p.add_argument("--out", default=None, help="output folder (default runs/synapse/<run name>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt if it exists")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output folder that holds an earlier run (its checkpoints, metrics and "
                        "TensorBoard logs are deleted first); without it or --resume such a run is refused")
    p.add_argument("--pseudo-policy", choices=("fixed", "class_fraction", "class_prior"), default="fixed",
                   help="which unlabeled voxels get a pseudo label for DACL (see torch_dacl.functional.dacl_labels)")
    p.add_argument("--pseudo-confidence", type=float, default=0.9,
                   help="confidence threshold of DACL's pseudo labels (not Eq. 2's phi)")
    p.add_argument("--pseudo-fraction", type=float, default=0.5,
                   help="share of each predicted class kept by --pseudo-policy class_fraction")
    p.add_argument("--head-weight", type=float, default=None,
                   help="projection heads learn from this times the DACL loss at every step (default: lambda_CL(t))")
    p.add_argument("--grad-share-every", type=int, default=None,
                   help="every N iterations, measure DACL's share of the gradient norm on the networks")
    p.add_argument("--lambda-cl", type=float, default=0.1, help="max weight of the DACL term (Eq. 1)")
    p.add_argument("--lambda-cross", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: the preset's)")
    p.add_argument("--temperature", type=float, default=0.4)
    p.add_argument("--bank-source", choices=("prototype", "pixel"), default="prototype")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="channels_last_3d memory format (auto: on for CPU, where it makes Conv3d backward "
                        "several times faster via oneDNN)")
    p.add_argument("--no-progress", action="store_true")
    # preset overrides
    p.add_argument("--iterations", type=int)
    p.add_argument("--val-every", type=int)
    p.add_argument("--patch", type=int, nargs=3, metavar=("Z", "Y", "X"))
    p.add_argument("--features", type=int, nargs="+")
    p.add_argument("--batch-labeled", type=int, help="labeled patches per step; under torchrun the global batch, "
                                                     "split over the ranks")
    p.add_argument("--batch-unlabeled", type=int, help="unlabeled patches per step; under torchrun the global batch, "
                                                       "split over the ranks")
    p.add_argument("--embed-dim", type=int)
    p.add_argument("--max-val-cases", type=int)
    p.add_argument("--max-test-cases", type=int)
    p.add_argument("--warmup-steps", type=int, help="DACL warm-up (lambda_CL = 0) steps")
    p.add_argument("--cross-rampup", type=int, help="steps of the Gaussian ramp-up of lambda_cross (0: constant)")
    args = p.parse_args(argv)
    if args.dataset is None:
        args.dataset = "nnunet" if args.dataset_dir else "chaos"
    if args.dataset != "nnunet" and args.labeled is None:
        args.labeled = 4
    cfg = dict(PRESETS[args.preset])
    for key in ("lr", "iterations", "val_every", "batch_labeled", "batch_unlabeled", "embed_dim", "max_val_cases",
                "max_test_cases", "warmup_steps", "cross_rampup"):
        v = getattr(args, key)
        if v is not None:
            cfg[key] = v
    if args.patch is not None:
        cfg["patch"] = tuple(args.patch)
    if args.features is not None:
        cfg["features"] = tuple(args.features)
        cfg["n_stages"] = len(args.features)
    cfg["patch"] = tuple(cfg["patch"])
    args.cfg = cfg
    return args


def dataset_dir(args) -> Path:
    if args.dataset_dir:
        return Path(args.dataset_dir)
    import _data  # one lookup for both examples: --data-root, $TORCH_DACL_DATA, the cache, the dev copy

    sub = DATASET_DIRS[args.dataset]
    if args.dataset == "chaos":
        try:
            return _data.resolve_data_root(args.data_root, "chaos") / sub
        except _data.DataNotFoundError as e:
            raise SystemExit(f"error: {e}") from None
    roots = [path for _, path in _data.data_sources(args.data_root)]
    return next((r / sub for r in roots if (r / sub).is_dir()), roots[0] / sub)


# ----------------------------------------------------------------------------- data
def prepare_nnunet(args, out: Path) -> dict:
    """An nnU-Net raw folder: check it, resolve the split (saved as <out>/split.json), take the
    fingerprint, derive the target spacing, patch and depth (unless --patch / --features set
    them); the plan goes into cfg and <out>/config.json. Returns the split with its classes."""
    cfg = args.cfg
    prep = nd.prepare(args.dataset_dir, 3, args.split, args.labeled, args.split_seed,
                      patch_budget=math.prod(PRESETS[args.preset]["patch"]), max_stages=cfg["n_stages"],
                      volume_budget=cfg.get("volume_budget"), spacing=args.spacing, verbose=_dist.is_main())
    if args.patch is None:
        cfg["patch"] = tuple(prep.plan["patch"])
    if args.features is None:  # depth: as many stages as the patch can pool (nnU-Net's rule), at most the preset's
        n = len(nd._poolings(cfg["patch"], prep.plan["target_spacing"], max_stages=cfg["n_stages"]))
        cfg["n_stages"], cfg["features"] = n, tuple(cfg["features"][:n])
    cfg["in_channels"] = prep.in_channels
    args.labeled = len(prep.split["labeled"])  # the count this run uses (metrics, titles)
    cfg["nnunet"] = {**prep.summary(), "patch_used": list(cfg["patch"]), "n_stages_used": cfg["n_stages"]}
    args.prepared = prep
    if _dist.is_main():
        prep.save(out)
        with open(out / "config.json", "w") as f:
            json.dump(_jsonable({**cfg, "args": vars(args)}), f, indent=1)
        print(f"plan: patch {list(cfg['patch'])}, {cfg['n_stages']} stages {list(cfg['features'])}, target spacing "
              f"{[round(s, 3) for s in prep.plan['target_spacing']]} (saved in {out / 'config.json'}, split in "
              f"{out / 'split.json'})", flush=True)
    return {**prep.split, "classes": prep.class_names}


def load_volumes(args, ids: Sequence[str]) -> List[sd.Volume]:
    if args.dataset == "nnunet":  # normalised per channel, resampled to the target spacing
        return args.prepared.load(ids)
    cfg, root = args.cfg, dataset_dir(args)
    patch = cfg["patch"]
    resize = tuple(p + p // 4 for p in patch)
    out = []
    for cid in ids:
        if args.dataset == "chaos":
            out.append(sd.read_generic_case(root, cid, normalization="percentile", zoom=cfg["chaos_zoom"]))
        elif args.dataset == "btcv":
            out.append(sd.read_btcv_case(root, cid, resize_shape=resize))
        else:
            v = sd.read_dhc_npy_case(root, cid)
            v.image, v.label = sd.resize_volume(v.image, v.label, resize)
            out.append(v)
    return out


# ----------------------------------------------------------------------------- model
def build_unet(cfg: dict, num_classes: int, spacing) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    strides, kernels = sd.plan_unet(cfg["patch"], spacing, cfg["n_stages"])
    net = PlainConvUNet(
        input_channels=cfg.get("in_channels", 1), n_stages=cfg["n_stages"], features_per_stage=list(cfg["features"]), conv_op=nn.Conv3d,
        kernel_sizes=kernels, strides=strides, n_conv_per_stage=2, num_classes=num_classes,
        n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=False,
    )
    net.apply(PlainConvUNet.initialize)
    return net


def feature_layer_name(cfg: dict) -> str:
    """The last decoder stage: its output is the last full-resolution decoder feature map
    (``features[0]`` channels), just before the 1x1 segmentation layer."""
    return f"decoder.stages.{cfg['n_stages'] - 2}"


# ----------------------------------------------------------------------------- losses / metrics
def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, num_classes: int, smooth: float = 1e-5) -> torch.Tensor:
    """Batch soft Dice over the foreground classes (nnU-Net's batch Dice, background excluded)."""
    probs = torch.softmax(logits.float(), 1)
    oh = F.one_hot(target, num_classes).movedim(-1, 1).float()
    dims = (0,) + tuple(range(2, logits.dim()))
    inter = (probs * oh).sum(dims)[1:]
    denom = probs.sum(dims)[1:] + oh.sum(dims)[1:]
    return 1.0 - ((2 * inter + smooth) / (denom + smooth)).mean()


def sup_loss(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target) + soft_dice_loss(logits, target, num_classes)


def dice_np(pred: np.ndarray, gt: np.ndarray) -> float:
    s = pred.sum() + gt.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(pred, gt).sum() / s)


def case_metrics(pred: np.ndarray, gt: np.ndarray, classes: Sequence[str], spacing) -> Dict[str, dict]:
    """Per-organ medpy Dice and ASD (voxels and mm). An organ absent from the prediction
    (but present in the ground truth) gets Dice 0 and ASD None (excluded from means)."""
    from medpy.metric import binary

    out = {}
    for c, name in enumerate(classes):
        if c == 0:
            continue
        p, g = pred == c, gt == c
        if p.any() and g.any():
            d = float(binary.dc(p, g))
            asd_vox = float(binary.asd(p, g))
            asd_mm = float(binary.asd(p, g, voxelspacing=spacing)) if spacing is not None else None
        else:
            d = 1.0 if (not p.any() and not g.any()) else 0.0
            asd_vox = asd_mm = 0.0 if d == 1.0 else None
        out[name] = {"dice": d, "asd_vox": asd_vox, "asd_mm": asd_mm}
    return out


def summarize(per_case: Dict[str, Dict[str, dict]], classes: Sequence[str]) -> dict:
    per_organ = {}
    for name in classes[1:]:
        dices = [m[name]["dice"] for m in per_case.values()]
        asd_v = [m[name]["asd_vox"] for m in per_case.values() if m[name]["asd_vox"] is not None]
        asd_m = [m[name]["asd_mm"] for m in per_case.values() if m[name]["asd_mm"] is not None]
        per_organ[name] = {"dice": float(np.mean(dices)), "dice_std": float(np.std(dices)),
                           "asd_vox": float(np.mean(asd_v)) if asd_v else None,
                           "asd_mm": float(np.mean(asd_m)) if asd_m else None,
                           "asd_missing": len(dices) - len(asd_v)}
    mean = lambda k: (float(np.mean([v[k] for v in per_organ.values() if v[k] is not None]))  # noqa: E731
                      if any(v[k] is not None for v in per_organ.values()) else None)
    return {"mean_dice": mean("dice"), "mean_asd_vox": mean("asd_vox"), "mean_asd_mm": mean("asd_mm"),
            "per_organ": per_organ}


@torch.no_grad()
def predict_volume(wrapper: CoTrainingWrapper, vol: sd.Volume, cfg: dict, num_classes: int, device,
                   amp_dtype, overlap: float) -> np.ndarray:
    """Sliding-window (Gaussian) prediction; softmax of the two models averaged."""
    def predict(x):
        x = x.contiguous(memory_format=getattr(wrapper, "example_memory_format", torch.contiguous_format))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            la = wrapper.model_a(x)  # the wrapper's hooks keep nothing when a model runs alone
            lb = wrapper.model_b(x)
        return torch.log((torch.softmax(la.float(), 1) + torch.softmax(lb.float(), 1)) / 2 + 1e-8)

    image = torch.from_numpy(vol.image).to(device)
    probs = sd.sliding_window_inference(predict, image, cfg["patch"], num_classes, overlap=overlap, gaussian=True,
                                        batch_size=4)
    return probs.argmax(0).cpu().numpy().astype(np.uint8)


def evaluate(wrapper, vols, cfg, classes, device, amp_dtype, overlap, full_metrics=True):
    wrapper.eval()
    per_case, preds = {}, {}
    for v in vols:
        pred = predict_volume(wrapper, v, cfg, len(classes), device, amp_dtype, overlap)
        preds[v.case_id] = pred
        if full_metrics:
            per_case[v.case_id] = case_metrics(pred, v.label, classes, v.spacing)
        else:
            per_case[v.case_id] = {name: {"dice": dice_np(pred == c, v.label == c), "asd_vox": None, "asd_mm": None}
                                   for c, name in enumerate(classes) if c > 0}
    wrapper.train()
    return per_case, preds


def save_overlay_png(path: Path, vol: sd.Volume, pred: np.ndarray, classes: Sequence[str], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fg = (vol.label > 0).reshape(vol.label.shape[0], -1).sum(1)
    order = np.argsort(fg)[::-1]
    zs = sorted(order[: min(3, len(order))].tolist()) if fg.max() > 0 else [vol.image.shape[0] // 2]
    img0 = vol.image if vol.image.ndim == 3 else vol.image[0]  # the first channel
    lo, hi = (0.0, 1.0) if 0.0 <= img0.min() and img0.max() <= 1.0 else np.percentile(img0, [0.5, 99.5])
    colors = ["none", "tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:cyan", "tab:pink",
              "tab:olive", "tab:brown", "gold", "lime", "magenta", "navy"] + [plt.cm.tab20(i) for i in range(20)]
    cmap = ListedColormap(colors[: len(classes)])
    # radiological view: anterior up. Array rows run along Y; put the anterior end on top.
    origin = "lower" if vol.meta.get("axcodes", ("", "P", ""))[1] == "A" else "upper"
    fig, axes = plt.subplots(len(zs), 3, figsize=(9, 3 * len(zs)), squeeze=False)
    for r, z in enumerate(zs):
        for c, (lab, name) in enumerate(((None, "image"), (vol.label, "ground truth"), (pred, "prediction"))):
            ax = axes[r, c]
            ax.imshow(img0[z], cmap="gray", vmin=lo, vmax=hi, origin=origin)
            if lab is not None:
                m = np.ma.masked_where(lab[z] == 0, lab[z])
                ax.imshow(m, cmap=cmap, vmin=0, vmax=len(classes) - 1, alpha=0.5, interpolation="nearest",
                          origin=origin)
            ax.set_title(f"{name}, slice {z}", fontsize=8)
            ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i]) for i in range(1, len(classes))]
    fig.legend(handles, classes[1:], loc="lower center", ncol=min(7, len(classes) - 1), fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- training
class _LogitsOnly(NamedTuple):  # a tuple, so that DDP finds the output tensors
    logits_a: torch.Tensor
    logits_b: torch.Tensor


class _LogitsPair(nn.Module):
    """The two networks without the projection heads (sup / cps), as one module for DDP."""

    def __init__(self, wrapper: CoTrainingWrapper) -> None:
        super().__init__()
        self.model_a, self.model_b = wrapper.model_a, wrapper.model_b

    def forward(self, x: torch.Tensor) -> _LogitsOnly:
        # the wrapper's hooks keep nothing when the models run outside its forward
        return _LogitsOnly(self.model_a(x), self.model_b(x))


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    cfg = args.cfg
    t_start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if _dist.launched():  # torchrun: one process per rank (cuda:LOCAL_RANK or cpu, gloo)
        device = _dist.setup(args.device)
    main_rank = _dist.is_main()
    # per-rank batch: the preset's batch is the global one (unchanged in one process)
    bl = _dist.split_batch(cfg["batch_labeled"], "--batch-labeled")
    bu = _dist.split_batch(cfg["batch_unlabeled"], "--batch-unlabeled") if args.method != "sup" else 0
    amp_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.amp else None
    set_seed(args.seed)

    run_name = f"{args.dataset}_{args.preset}_{args.method}_l{args.labeled}_s{args.seed}"
    out = Path(args.out) if args.out else REPO_ROOT / "runs" / "synapse" / run_name
    earlier = [f for f in ("metrics.json", "last.pt") if (out / f).exists()]
    if earlier and not args.resume:
        if not args.overwrite:
            raise SystemExit(f"error: {out} already holds an earlier run ({', '.join(earlier)}); pass --resume to "
                             f"continue it, --overwrite to start over, or --out for another folder")
        if main_rank:  # --overwrite: nothing of the earlier run stays (TensorBoard would mix the two)
            import shutil

            for name in ("metrics.json", "last.pt", "best.pt", "test_slices.png"):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "tb", ignore_errors=True)
        _dist.barrier()
    out.mkdir(parents=True, exist_ok=True)

    if args.dataset == "nnunet":  # classes, channels, split, preprocessing and plan from the dataset folder
        split = prepare_nnunet(args, out)
    else:
        split = sd.load_split(SPLIT_FILES[args.dataset], args.labeled)
    classes = split["classes"]
    num_classes = len(classes)
    root = dataset_dir(args)
    if not root.exists():
        hint = "; get it with `python examples/get_data.py chaos`" if args.dataset == "chaos" else ""
        raise SystemExit(f"error: dataset folder not found: {root} (set --data-root, --dataset-dir or "
                         f"TORCH_DACL_DATA{hint})")
    val_ids = split["val"][: cfg["max_val_cases"]] if cfg["max_val_cases"] else split["val"]
    test_ids = split["test"][: cfg["max_test_cases"]] if cfg["max_test_cases"] else split["test"]
    t0 = time.time()
    lab_vols = load_volumes(args, split["labeled"])
    unl_vols = load_volumes(args, split["unlabeled"]) if args.method != "sup" else []
    val_vols = load_volumes(args, val_ids)
    for v in unl_vols:
        v.label = None  # the unlabeled stream never sees its labels
    load_s = time.time() - t0
    spacing = lab_vols[0].spacing if args.dataset in ("chaos", "nnunet") else None

    model_a = build_unet(cfg, num_classes, spacing)
    model_b = build_unet(cfg, num_classes, spacing)
    wrapper = CoTrainingWrapper(model_a, model_b, feature_layer=feature_layer_name(cfg),
                                feature_channels=cfg["features"][0], embed_dim=cfg["embed_dim"],
                                hidden_dim=cfg["hidden_dim"], spatial_dims=3).to(device)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cpu")
    mem_fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    wrapper = wrapper.to(memory_format=mem_fmt)
    wrapper.example_memory_format = mem_fmt
    # DDP (no-op in one process); find_unused_parameters: PlainConvUNet without deep supervision
    # never uses the segmentation layers of its lower decoder stages; sup / cps train the nets only
    net = _dist.wrap_ddp(wrapper if args.method == "dacl" else _LogitsPair(wrapper), device,
                         find_unused_parameters=True)
    if _dist.is_dist():  # data, augmentation and DACL sampling differ per rank
        set_seed(_dist.rank_seed(args.seed))
        if channels_last:  # DDP's note on the 1x1x1 kernels, whose strides differ in size-1 dims only
            import warnings
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    iters = cfg["iterations"]
    # Eq. 1 beyond L_sup (the library's objective, shared with the 2D example): CPS, and for dacl
    # one DACL loss per model on pseudo labels; it runs from the first step (banks full at warm-up's end)
    objective = DACLObjective(
        num_classes=num_classes, dim=cfg["embed_dim"], total_steps=iters, lambda_cl=args.lambda_cl,
        lambda_cross=args.lambda_cross, warmup=cfg["warmup_steps"], contrastive=args.method == "dacl",
        pseudo_policy=args.pseudo_policy, pseudo_confidence=args.pseudo_confidence,
        pseudo_fraction=args.pseudo_fraction, head_weight=args.head_weight,
        heads=(wrapper.head_a, wrapper.head_b) if args.head_weight is not None else None,
        temperature=args.temperature, ks=(8, 16, 32), num_anchors=cfg["num_anchors"],
        num_positives=cfg["num_positives"], num_negatives=cfg["num_negatives"], bank_size=cfg["bank_size"],
        bank_source=args.bank_source, weighting="paper", max_samples_per_class=cfg["max_samples_per_class"],
        ignore_index=-100, validate=False, gather_distributed=_dist.is_dist()).to(device)
    shared_params = list(wrapper.model_a.parameters()) + list(wrapper.model_b.parameters())
    diagnostics: list = []
    params = list(wrapper.model_a.parameters()) + list(wrapper.model_b.parameters())
    if args.method == "dacl":
        params += list(wrapper.head_a.parameters()) + list(wrapper.head_b.parameters())
    opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, weight_decay=1e-4, nesterov=True)
    scaler = torch.amp.GradScaler("cuda", enabled=(amp_dtype == torch.float16))
    lab_sampler = sd.PatchSampler(lab_vols, cfg["patch"], seed=_dist.rank_seed(args.seed))
    unl_sampler = sd.PatchSampler(unl_vols, cfg["patch"], seed=_dist.rank_seed(args.seed) + 1000) if unl_vols else None

    start_it, best, history = 0, {"dice": -1.0, "iteration": -1}, []
    ckpt_last, ckpt_best = out / "last.pt", out / "best.pt"
    if args.resume and ckpt_last.exists():
        st = torch.load(ckpt_last, map_location=device, weights_only=False)
        wrapper.load_state_dict(st["wrapper"])
        opt.load_state_dict(st["optimizer"])
        objective.load_state_dict(st["objective"])
        diagnostics = st.get("diagnostics", [])
        lab_sampler.load_state_dict(st["lab_sampler"])
        if unl_sampler is not None and st.get("unl_sampler"):
            unl_sampler.load_state_dict(st["unl_sampler"])
        torch.set_rng_state(st["torch_rng"])
        start_it, best, history = st["iteration"], st["best"], st["history"]
        if _dist.is_dist():  # every rank continues its own streams
            ranks = st.get("ranks") or []
            if len(ranks) == _dist.world_size():
                own = ranks[_dist.rank()]
                lab_sampler.load_state_dict(own["lab_sampler"])
                if unl_sampler is not None and own.get("unl_sampler"):
                    unl_sampler.load_state_dict(own["unl_sampler"])
                torch.set_rng_state(own["torch_rng"])
            else:
                print(f"warning: {ckpt_last} holds the random state of {len(ranks) or 1} rank(s), not "
                      f"{_dist.world_size()}: re-seeding per rank (not a bit-exact continuation)", flush=True)
                rs = [_dist.rank_seed(args.seed), start_it]
                lab_sampler.rng = np.random.default_rng(rs)
                if unl_sampler is not None:
                    unl_sampler.rng = np.random.default_rng(rs + [1000])
                torch.manual_seed(_dist.rank_seed(args.seed) + 7919 * start_it)
        if main_rank:
            print(f"resumed from {ckpt_last} at iteration {start_it}")

    rank_states = None  # under DDP: every rank's sampler and random states, gathered at checkpoints

    def checkpoint(it: int) -> dict:
        return {**({"ranks": rank_states} if rank_states else {}),
                "wrapper": wrapper.state_dict(), "optimizer": opt.state_dict(), "objective": objective.state_dict(),
                "diagnostics": diagnostics, "lab_sampler": lab_sampler.state_dict(),
                "unl_sampler": unl_sampler.state_dict() if unl_sampler else None, "torch_rng": torch.get_rng_state(),
                "iteration": it, "best": best, "history": history, "config": cfg, "args": _jsonable(vars(args))}

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(out / "tb")) if main_rank else _dist.NullWriter()
    try:
        from tqdm import tqdm
        bar = tqdm(range(start_it, iters), initial=start_it, total=iters, disable=args.no_progress or not main_rank,
                   desc=f"{args.method} {args.preset}", dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        bar = range(start_it, iters)
    strides, kernels = sd.plan_unet(cfg["patch"], spacing, cfg["n_stages"])
    ddp_note = f" on {_dist.world_size()} ranks ({bl}+{bu if unl_vols else 0} per rank)" if _dist.is_dist() else ""
    if main_rank:
        print(f"{run_name}: data {root}, {len(lab_vols)} labeled / {len(unl_vols)} unlabeled / {len(val_vols)} val / "
              f"{len(test_ids)} test volumes "
              f"(shape of the first {lab_vols[0].image.shape}), patch {cfg['patch']}, "
              f"batch {cfg['batch_labeled']}+{cfg['batch_unlabeled'] if unl_vols else 0}{ddp_note}, "
              f"{iters} iterations, PlainConvUNet {list(cfg['features'])} strides {strides[1:]}, "
              f"{sum(p.numel() for p in model_a.parameters())} parameters per model, lr {cfg['lr']}, "
              f"lambda_cl {args.lambda_cl if args.method == 'dacl' else 0} (0 for {cfg['warmup_steps']} steps), "
              f"device {device}, out {out}",
              flush=True)
    t_train = time.time()
    val_s = 0.0
    wrapper.train()
    for it in bar:
        lr = cfg["lr"] * (1 - it / iters) ** 0.9
        for g in opt.param_groups:
            g["lr"] = lr
        xl, yl = lab_sampler.sample(bl)
        xl, yl = xl.to(device), yl.to(device)
        if unl_sampler is not None:
            xu, _ = unl_sampler.sample(bu)
            x = torch.cat([xl, xu.to(device)])
        else:
            x = xl
        x = x.contiguous(memory_format=mem_fmt)
        logs = {}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            # dacl: the wrapper; sup / cps: the two networks only (no projection heads: skip
            # their cost); either DDP-wrapped under torchrun
            o = net(x)
        loss_sup = sup_loss(o.logits_a[:bl], yl, num_classes) + sup_loss(o.logits_b[:bl], yl, num_classes)
        loss = loss_sup
        logs["sup"] = loss_sup.item()
        diag = None
        if args.method in ("cps", "dacl"):
            lam_cross = args.lambda_cross if not cfg["cross_rampup"] else gaussian_rampup(
                it, cfg["cross_rampup"], max_weight=args.lambda_cross, warmup_steps=0)
            objective.lambda_cross = lam_cross  # this example ramps lambda_cross up (see the quick preset)
            labeled = torch.arange(x.shape[0], device=device) < bl
            y_full = torch.cat([yl, yl.new_zeros((x.shape[0] - bl,) + tuple(yl.shape[1:]))])  # unlabeled: unread
            res = objective(o.logits_a.float(), o.logits_b.float(), getattr(o, "embeddings_a", None),
                            getattr(o, "embeddings_b", None), y_full, labeled)
            loss = loss + res.loss
            logs["cross"] = res.cross.item()
            logs["lambda_cross"] = lam_cross
            if args.method == "dacl":
                logs["cl"] = (res.cl_a + res.cl_b).item()
                diag = {"iteration": it + 1, **DACLObjective.summarize(res.stats, list(classes))}
                if args.grad_share_every and (it + 1) % args.grad_share_every == 0:
                    diag.update(gradient_share({"cl": res.cl_term, "sup": loss_sup, "cross": res.cross_term},
                                               shared_params))
        lam = objective.lambda_cl
        logs["lambda_cl"] = lam
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        objective.step()
        logs["loss"] = loss.item()
        if diag is not None and main_rank:
            diagnostics.append(diag)
            for k, v in diag.items():
                if k != "iteration":
                    writer.add_scalar(f"dacl/{k}", v, it + 1)
        logs = _dist.mean_scalars(logs)  # averaged over the ranks (unchanged in one process)
        step = it + 1
        for k, v in logs.items():
            writer.add_scalar(f"train/{k}", v, step)
        writer.add_scalar("train/lr", lr, step)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if not k.startswith("lambda")})
        if (step % cfg["val_every"] == 0 or step == iters) and _dist.is_dist():
            rank_states = _dist.gather_objects({
                "lab_sampler": lab_sampler.state_dict(), "torch_rng": torch.get_rng_state(),
                "unl_sampler": unl_sampler.state_dict() if unl_sampler else None})
        if main_rank and (step % cfg["val_every"] == 0 or step == iters):  # rank 0 validates and saves
            t_val = time.time()
            per_case, _ = evaluate(wrapper, val_vols, cfg, classes, device, amp_dtype, cfg["val_overlap"],
                                   full_metrics=False)
            vdice = summarize(per_case, classes)["mean_dice"]
            history.append({"iteration": step, "val_dice": vdice, "loss": logs["loss"],
                            "elapsed_s": time.time() - t_start})
            writer.add_scalar("val/mean_dice", vdice, step)
            if vdice > best["dice"]:
                best = {"dice": vdice, "iteration": step}
                torch.save(checkpoint(step), ckpt_best)
            torch.save(checkpoint(step), ckpt_last)
            msg = f"iter {step}: val mean Dice {vdice:.4f} (best {best['dice']:.4f} @ {best['iteration']})"
            if hasattr(bar, "write") and not args.no_progress:
                bar.write(msg)
            else:
                print(msg, flush=True)
            val_s += time.time() - t_val
        if step % cfg["val_every"] == 0 or step == iters:
            _dist.barrier()  # the other ranks wait for rank 0
    train_s = time.time() - t_train
    if hasattr(bar, "close"):
        bar.close()
    if not main_rank:  # rank 0 alone tests and writes metrics.json
        return {}

    # ------------------------------------------------------------------ test with the best model
    t1 = time.time()
    if ckpt_best.exists():
        wrapper.load_state_dict(torch.load(ckpt_best, map_location=device, weights_only=False)["wrapper"])
    test_vols = load_volumes(args, test_ids)
    per_case, preds = evaluate(wrapper, test_vols, cfg, classes, device, amp_dtype, overlap=0.5, full_metrics=True)
    summary = summarize(per_case, classes)
    test_s = time.time() - t1
    for name, m in summary["per_organ"].items():
        writer.add_scalar(f"test/dice_{name}", m["dice"], iters)
    writer.add_scalar("test/mean_dice", summary["mean_dice"], iters)
    writer.close()
    png = out / "test_slices.png"
    save_overlay_png(png, test_vols[0], preds[test_vols[0].case_id], classes,
                     f"{args.dataset} {args.method} ({args.labeled} labeled), case {test_vols[0].case_id}: "
                     f"Dice {np.mean([m['dice'] for m in per_case[test_vols[0].case_id].values()]):.3f}")

    metrics = {
        **({"nnunet": cfg["nnunet"]} if args.dataset == "nnunet" else {}),
        "dataset": args.dataset, "dataset_dir": str(root), "method": args.method, "preset": args.preset,
        "labeled": args.labeled, "seed": args.seed, "device": str(device), "amp": bool(args.amp), "channels_last": channels_last,
        "torch_threads": torch.get_num_threads(),
        "network": {"type": "dynamic_network_architectures PlainConvUNet (nnU-Net 3d_fullres)",
                    "features_per_stage": list(cfg["features"]),
                    "strides": sd.plan_unet(cfg["patch"], spacing, cfg["n_stages"])[0],
                    "kernel_sizes": sd.plan_unet(cfg["patch"], spacing, cfg["n_stages"])[1],
                    "feature_layer": feature_layer_name(cfg),
                    "parameters_per_model": sum(p.numel() for p in model_a.parameters())},
        "config": _jsonable(cfg), "reduced": cfg["note"],
        "split": {"labeled": split["labeled"], "unlabeled": split["unlabeled"], "val": val_ids, "test": test_ids},
        "volume_shapes": {v.case_id: list(v.image.shape) for v in test_vols},
        "evaluation": "sliding window (overlap 0.5, Gaussian weights sigma = patch/8), softmax of both models "
                      "averaged, on the preprocessed (resampled) grid; medpy dc and asd per organ and case, mean over "
                      "cases; asd_vox in voxels, asd_mm with the grid's spacing; an organ missing from a prediction "
                      "has Dice 0 and no ASD (counted in asd_missing)",
        "best_val": best, "history": history, "dacl_diagnostics": diagnostics, "iterations": iters,
        "test": summary, "test_per_case": per_case,
        "wall_time_s": {"total": time.time() - t_start, "load": load_s, "train_and_val": train_s, "validation": val_s,
                        "test": test_s, "per_iteration": (train_s - val_s) / max(1, iters - start_it)},
        "command": " ".join([sys.executable, *sys.argv]) if argv is None else "main(" + repr(list(argv)) + ")",
        **({"world_size": _dist.world_size(), "per_rank_batch": [bl, bu]} if _dist.is_dist() else {}),
        "png": str(png),
    }
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=1)
    organs = ", ".join(f"{k} {v['dice']:.3f}" for k, v in summary["per_organ"].items())
    print(f"test mean Dice {summary['mean_dice']:.4f} ({organs}); mean ASD {summary['mean_asd_vox']} vox; "
          f"wall {metrics['wall_time_s']['total']:.0f} s; {out / 'metrics.json'}")
    return metrics


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items() if k != "cfg"}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, (str, int, float, bool)) or d is None:
        return d
    return str(d)


if __name__ == "__main__":
    try:
        main()
    except nd.NnUNetDataError as e:  # a malformed dataset folder: the message names the file
        sys.exit(f"error: {e}")
    finally:
        _dist.cleanup()
