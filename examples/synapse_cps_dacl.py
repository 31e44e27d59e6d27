#!/usr/bin/env python
"""3D semi-supervised multi-organ segmentation: co-training (CPS) + DACL, Synapse protocol.

Two nnU-Net networks (``dynamic_network_architectures.PlainConvUNet``, the network nnU-Net
builds for 3D full resolution) are trained by cross pseudo supervision on random patches
drawn from a two-stream batch (labeled + unlabeled volumes); with ``--method dacl`` each gets
the density-aware contrastive term of torch_dacl on the embeddings of a projection head
attached to its last full-resolution decoder stage. Whole volumes are predicted by
sliding-window inference with Gaussian weighting (the two models' softmax averaged, as DHC
does, ``--eval-model ensemble``), and scored per organ with medpy (Dice, Jaccard, HD95, ASD
in voxels of the preprocessed grid). The loop, checkpoints, resume, DDP and the metrics
record are the shared engine's (``engine.py``); this script holds the data, the network,
the evaluation and the presets.

Why PlainConvUNet and not DHC's V-Net: it is the network nnU-Net builds (3d_fullres), from a
maintained package, configured per dataset the nnU-Net way (``synapse_data.plan_unet``: per-stage
strides, 1x3x3 kernels for anisotropic MR such as CHAOS-T2), with instance norm (robust with
2 + 2 patches), and its last decoder stage (``decoder.stages.<n-2>``) outputs the last
full-resolution feature map the projection head reads. The paper's Synapse numbers are with
V-Net; CPS vs DACL is compared here on one backbone.

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

Presets: ``smoke`` (12 s measured on a 2-core CPU, for CI), ``cpu`` (CHAOS-T2 at 4x in-plane
downsampling, 3000 iterations: 28-29 training minutes for CPS and 51-53 for DACL measured on
one thread of that CPU, two runs side by side), ``paper`` (the DHC protocol: patch 64x128x128,
2 + 2 patches, 30k iterations; a GPU). Every preset value can be overridden on the command line.

Examples::

    python examples/synapse_cps_dacl.py --preset smoke --method dacl
    python examples/synapse_cps_dacl.py --preset cpu --method cps --labeled 4 --seed 0
    python examples/synapse_cps_dacl.py --preset paper --dataset btcv --labeled 4 \\
        --dataset-dir /data/Synapse/RawData/Training --device cuda --amp fp16
    torchrun --standalone --nproc_per_node=2 examples/synapse_cps_dacl.py --preset paper --amp fp16  # DDP, 2 GPUs

Distributed: see ``engine.py``; the smoke preset's 1 + 1 needs ``--labeled-bs 2 --unlabeled-bs 2``
on 2 ranks.

Outputs (``--output-dir``, default ``runs/synapse/<dataset>_<preset>_<method>_l<labeled>_s<seed>``;
an nnU-Net dataset: ``<its folder name>_<preset>_<method>_s<seed>`` when its split sets the labeled cases):
``metrics.json``, ``config.json``, ``last.pt`` / ``best.pt`` (resume with ``--resume``),
``tb/`` (TensorBoard), ``test_slices.npz`` and ``test_predictions.png`` (test slices; ``acdc_plot.py``
puts several runs side by side).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads)
import _dist  # noqa: E402
from _cli import float_range, int_range  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
import synapse_data as sd  # noqa: E402
import nnunet_data as nd  # noqa: E402
from torch_dacl import CoTrainingWrapper  # noqa: E402

# ----------------------------------------------------------------------------- presets
# chaos_zoom: (z, y, x) factors applied to CHAOS-T2 (native 256x256xZ, 1.25x1.25x7.7 mm);
# btcv / dhc_npy volumes are resized to patch + patch // 4 (DHC).
# nnunet datasets (nnunet_data): volume_budget caps the median volume after resampling (36x64x64
# voxels: CHAOS-T2 at the smoke / quick chaos_zoom; None: the median spacing); the product of
# patch is the patch's voxel budget and n_stages the deepest network (both derived per dataset).
PRESETS: Dict[str, dict] = {
    "smoke": dict(
        patch=(16, 64, 64), chaos_zoom=(1.0, 0.25, 0.25), volume_budget=36 * 64 * 64, features=(4, 8, 16), n_stages=3, lr=0.01,
        labeled_bs=1, unlabeled_bs=1, steps=8, val_every=8, cross_rampup=0, val_volumes=1, test_volumes=2,
        embed_dim=16, hidden_dim=16, num_anchors=64, num_positives=128, num_negatives=128, bank_size=100,
        max_samples_per_class=256, warmup_steps=2, val_overlap=0.25,
        note="smoke: CHAOS-T2 in-plane downsampled 4x (64x64xZ), patch 16x64x64, 3-stage PlainConvUNet "
             "(4-8-16 features), 1+1 patches, 8 iterations (DACL active from iteration 3), DACL sizes reduced (D=16, N_q=64, N_p=128, L=100), "
             "1 val and 2 test volumes, window overlap 0.25. Checks the pipeline runs; the numbers mean nothing."),
    "cpu": dict(
        patch=(16, 64, 64), chaos_zoom=(1.0, 0.25, 0.25), volume_budget=36 * 64 * 64, features=(8, 16, 32, 64), n_stages=4, lr=0.03,
        labeled_bs=2, unlabeled_bs=2, steps=3000, val_every=250, val_volumes=None, test_volumes=None,
        cross_rampup=160, embed_dim=32, hidden_dim=32, num_anchors=256, num_positives=512, num_negatives=512,
        bank_size=1000, max_samples_per_class=512, warmup_steps=100, val_overlap=0.5, pseudo_policy="class_prior",
        note="cpu: CHAOS-T2 in-plane downsampled 4x (64x64xZ, 5x5x7.7 mm) so a 16x64x64 patch holds whole "
             "slices, 4-stage PlainConvUNet (8-16-32-64 features), 2+2 patches, 3000 iterations (DACL warm-up 100 = "
             "1000/30000 scaled), lr 0.03 (poly) and lambda_cross ramped up over the first 160 iterations (Gaussian, "
             "as Eq. 1): with lr 0.01, or with lambda_cross = 1 from step 0, both models collapsed to predicting "
             "background only within the first 150-200 iterations (CPS reinforces the all-background argmax of "
             "untrained models); embedding D=32; paper DACL sizes otherwise (N_q=256, N_p=512, L=1000); "
             "the 2D cpu preset's objective (lambda_CL 0.1, class_prior pseudo labels, heads at lambda_CL(t)); "
             "all 2 val / 6 test volumes; validation every 250 iterations."),
    "paper": dict(
        patch=(64, 128, 128), chaos_zoom=(1.0, 0.625, 0.625), volume_budget=None, features=(32, 64, 128, 256, 320), n_stages=5, lr=0.01,
        labeled_bs=2, unlabeled_bs=2, steps=30000, val_every=500, cross_rampup=0, val_volumes=None, test_volumes=None,
        embed_dim=64, hidden_dim=None, num_anchors=256, num_positives=512, num_negatives=512, bank_size=1000,
        max_samples_per_class=512, warmup_steps=1000, val_overlap=0.5,
        note="paper: DHC protocol (patch 64x128x128 on volumes resized to 80x160x160, 2+2 patches, 30k "
             "iterations, warm-up 1000), PlainConvUNet 32-64-128-256-320 in place of V-Net, DACL defaults."),
}

DATASET_DIRS = {"chaos": "CHAOS-T2", "btcv": "Synapse/RawData/Training", "dhc_npy": "synapse_data"}
SPLIT_FILES = {"chaos": "chaos_t2", "btcv": "synapse_dhc", "dhc_npy": "synapse_dhc"}


def dataset_dir(cfg: dict) -> Path:
    if cfg["dataset_dir"]:
        return Path(cfg["dataset_dir"])
    import _data  # one lookup for both examples: --data-root, $TORCH_DACL_DATA, the cache

    sub = DATASET_DIRS[cfg["dataset"]]
    if cfg["dataset"] == "chaos":  # (downloaded into the cache when no source holds it, unless --no-download)
        try:
            return _data.resolve_data_root(cfg["data_root"], "chaos", download=not cfg["no_download"]) / sub
        except _data.DataNotFoundError as e:
            raise SystemExit(f"error: {e}") from None
    roots = [path for _, path in _data.data_sources(cfg["data_root"])]
    return next((r / sub for r in roots if (r / sub).is_dir()), roots[0] / sub)


# ----------------------------------------------------------------------------- data
class Volumes3D:
    """Labeled / unlabeled / val volumes in memory (test volumes loaded at test time), the two
    patch samplers (seeded per rank) and the split."""

    def __init__(self, cfg: dict, run_dir: Path) -> None:
        self.cfg, self.kind = cfg, {"chaos": "chaos", "nnunet": "nnunet"}.get(cfg["dataset"], "synapse")
        split = self.prepare_nnunet(cfg, run_dir) if cfg["dataset"] == "nnunet" else \
            sd.load_split(SPLIT_FILES[cfg["dataset"]], cfg["labeled"])
        self.root = dataset_dir(cfg)
        if not self.root.exists():
            hint = "; get it with `python examples/get_data.py chaos`" if cfg["dataset"] == "chaos" else ""
            raise SystemExit(f"error: dataset folder not found: {self.root} (set --data-root, --dataset-dir or "
                             f"TORCH_DACL_DATA{hint})")
        self.class_names, self.split, self.name = split["classes"], split, self.root.name
        self.labeled, self.labeled_unit = len(split["labeled"]), "cases" if self.kind == "nnunet" else "volumes"
        self.val_ids = split["val"][: cfg["val_volumes"]] if cfg["val_volumes"] else split["val"]
        self.test_ids = split["test"][: cfg["test_volumes"]] if cfg["test_volumes"] else split["test"]
        self.keep_for_plot = self.test_ids[:4]
        lab, unl = self.load(split["labeled"]), self.load(split["unlabeled"]) if cfg["method"] != "sup" else []
        self.val = self.load(self.val_ids)
        for v in unl:
            v.label = None  # the unlabeled stream never sees its labels
        self.spacing = lab[0].spacing if cfg["dataset"] in ("chaos", "nnunet") else None
        self.lab = sd.PatchSampler(lab, cfg["patch"], seed=_dist.rank_seed(cfg["seed"]))
        self.unl = sd.PatchSampler(unl, cfg["patch"], seed=_dist.rank_seed(cfg["seed"]) + 1000) if unl else None
        self.summary = (f"{self.root}: {len(lab)} labeled / {len(unl)} unlabeled / {len(self.val)} val / "
                        f"{len(self.test_ids)} test volumes (shape of the first {lab[0].image.shape})")

    def prepare_nnunet(self, cfg: dict, run_dir: Path) -> dict:
        """Check the folder, resolve the split (saved in the run folder), take the fingerprint,
        derive the target spacing, patch and depth (unless --patch / --features set them)."""
        prep = nd.prepare(cfg["dataset_dir"], 3, cfg["split"], cfg["labeled"], cfg["split_seed"],
                          patch_budget=math.prod(PRESETS[cfg["preset"]]["patch"]), max_stages=cfg["n_stages"],
                          volume_budget=cfg.get("volume_budget"), spacing=cfg["spacing"], verbose=_dist.is_main())
        if not cfg["patch_given"]:
            cfg["patch"] = tuple(prep.plan["patch"])
        if not cfg["features_given"]:  # as many stages as the patch can pool (nnU-Net's rule), at most the preset's
            n = len(sd.poolings(cfg["patch"], prep.plan["target_spacing"], max_stages=cfg["n_stages"]))
            cfg["n_stages"], cfg["features"] = n, tuple(cfg["features"][:n])
        cfg["in_channels"], cfg["labeled"] = prep.in_channels, len(prep.split["labeled"])
        cfg["nnunet"] = {**prep.summary(), "patch_used": list(cfg["patch"]), "n_stages_used": cfg["n_stages"]}
        self.prepared = prep
        if _dist.is_main():
            prep.save(run_dir)
            print(f"plan: patch {list(cfg['patch'])}, {cfg['n_stages']} stages {list(cfg['features'])}, target "
                  f"spacing {[round(s, 3) for s in prep.plan['target_spacing']]} (split in {run_dir / 'split.json'})")
        return {**prep.split, "classes": prep.class_names}

    def load(self, ids: Sequence[str]) -> List[sd.Volume]:
        cfg = self.cfg
        if cfg["dataset"] == "nnunet":  # normalised per channel, resampled to the target spacing
            return self.prepared.load(ids)
        resize, out = tuple(p + p // 4 for p in cfg["patch"]), []
        for cid in ids:
            if cfg["dataset"] == "chaos":
                out.append(sd.read_generic_case(self.root, cid, normalization="percentile", zoom=cfg["chaos_zoom"]))
            elif cfg["dataset"] == "btcv":
                out.append(sd.read_btcv_case(self.root, cid, resize_shape=resize))
            else:
                v = sd.read_dhc_npy_case(self.root, cid)
                v.image, v.label = sd.resize_volume(v.image, v.label, resize)
                out.append(v)
        return out

    def batches(self, start_step: int, lbs: int, ubs: int):
        while True:  # labeled patches first; the unlabeled rows' labels are never read
            xl, yl = self.lab.sample(lbs)
            if self.unl is None:
                yield xl, yl
                continue
            xu, _ = self.unl.sample(ubs)
            yield torch.cat([xl, xu]), torch.cat([yl, yl.new_zeros((ubs,) + tuple(yl.shape[1:]))])

    def state_dict(self) -> dict:
        return {"lab": self.lab.state_dict(), "unl": self.unl.state_dict() if self.unl else None}

    def load_state_dict(self, st: dict) -> None:
        self.lab.load_state_dict(st["lab"])
        if self.unl is not None:
            self.unl.load_state_dict(st["unl"])

    def reseed(self, seed: int, step: int) -> None:
        self.lab.rng = np.random.default_rng([seed, step])
        if self.unl is not None:
            self.unl.rng = np.random.default_rng([seed, step, 1000])


# ----------------------------------------------------------------------------- model
def build_unet(cfg: dict, num_classes: int, spacing) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    strides, kernels = sd.plan_unet(cfg["patch"], spacing, cfg["n_stages"])
    net = PlainConvUNet(
        input_channels=cfg.get("in_channels", 1), n_stages=cfg["n_stages"], features_per_stage=list(cfg["features"]),
        conv_op=nn.Conv3d, kernel_sizes=kernels, strides=strides, n_conv_per_stage=2, num_classes=num_classes,
        n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=False,
    )
    net.apply(PlainConvUNet.initialize)
    # Without deep supervision only the last segmentation layer is used: the others are frozen
    # (they never get a gradient, so nothing changes), which lets DDP run with
    # find_unused_parameters=False -- required by the sparse heads, which run outside its forward.
    for layer in net.decoder.seg_layers[:-1]:
        layer.requires_grad_(False)
    return net


def feature_layer_name(cfg: dict) -> str:
    """The decoder stage the heads read: ``feature_stage`` 1 (default) is the last one, the
    full-resolution decoder feature map (``features[0]`` channels) just before the 1x1
    segmentation layer; 2 the one before it (``features[1]`` channels), and so on."""
    stage = int(cfg.get("feature_stage") or 1)
    if not 1 <= stage <= cfg["n_stages"] - 1:
        raise ValueError(f"feature_stage: expected 1 to {cfg['n_stages'] - 1} for a {cfg['n_stages']}-stage "
                         f"U-Net, got {stage}")
    return f"decoder.stages.{cfg['n_stages'] - 1 - stage}"


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, num_classes: int, smooth: float = 1e-5) -> torch.Tensor:
    """Batch soft Dice over the foreground classes (nnU-Net's batch Dice, background excluded)."""
    probs = torch.softmax(logits.float(), 1)
    oh = F.one_hot(target, num_classes).movedim(-1, 1).float()
    dims = (0,) + tuple(range(2, logits.dim()))
    inter = (probs * oh).sum(dims)[1:]
    denom = probs.sum(dims)[1:] + oh.sum(dims)[1:]
    return 1.0 - ((2 * inter + smooth) / (denom + smooth)).mean()


@torch.no_grad()
def predict_volume(wrapper: CoTrainingWrapper, vol: sd.Volume, cfg: dict, num_classes: int, device,
                   amp_dtype, overlap: float) -> np.ndarray:
    """Sliding-window (Gaussian) prediction of ``--eval-model`` (ensemble: the softmax of the two averaged)."""
    models = (wrapper.model_a, wrapper.model_b) if cfg["eval_model"] == "ensemble" else \
        (getattr(wrapper, f"model_{cfg['eval_model']}"),)

    def predict(x):
        x = x.contiguous(memory_format=getattr(wrapper, "example_memory_format", torch.contiguous_format))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = [m(x) for m in models]  # the wrapper's hooks keep nothing when a model runs alone
        return torch.log(sum(torch.softmax(lg.float(), 1) for lg in logits) / len(logits) + 1e-8)

    image = torch.from_numpy(vol.image).to(device)
    probs = sd.sliding_window_inference(predict, image, cfg["patch"], num_classes, overlap=overlap, gaussian=True,
                                        batch_size=4)
    return probs.max(0).indices.cpu().numpy().astype(np.uint8)  # (= argmax(0); several times faster on CPU)


# ----------------------------------------------------------------------------- the task
class Synapse(engine.Task):
    name, doc, presets = "synapse", __doc__, PRESETS
    paper_labeled, labeled_default = (2, 4), 4
    summary_keys = ("patch", "features")
    defaults = dict(pseudo_confidence=0.9, eval_model="ensemble", nesterov=True)
    find_unused_parameters = False  # the unused segmentation layers are frozen (build_unet)
    reseed_after_model = False     # one process: the training RNG continues from the initialisation

    def add_arguments(self, g) -> None:
        g.add_argument("--dataset", choices=sorted(DATASET_DIRS) + ["nnunet"], default=None,
                       help="nnunet: an nnU-Net raw folder given by --dataset-dir (the default when --dataset-dir is "
                            "given; see docs/tutorials/own_data.rst); else chaos")
        g.add_argument("--spacing", type=float_range(0, lo_open=True), nargs=3, metavar=("Z", "Y", "X"), default=None,
                       help="nnunet: target spacing in mm (default: the median spacing, coarsened to the preset's "
                            "volume budget)")
        g.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                       help="channels_last_3d memory format (auto: on for CPU, where it makes Conv3d backward "
                            "several times faster via oneDNN)")
        g.add_argument("--patch", type=int_range(8), nargs=3, metavar=("Z", "Y", "X"), default=None, help="patch size")
        g.add_argument("--features", type=int_range(1), nargs="+", default=None, help="features per U-Net stage")

    def configure(self, cfg: dict, args: dict) -> None:
        cfg["dataset"] = cfg["dataset"] or ("nnunet" if cfg["dataset_dir"] else "chaos")
        if cfg["dataset"] != "nnunet":
            cfg["labeled"] = int(cfg["labeled"] or self.labeled_default)
        cfg["patch_given"], cfg["features_given"] = args["patch"] is not None, args["features"] is not None
        cfg["patch"], cfg["features"] = tuple(cfg["patch"]), tuple(cfg["features"])
        if cfg["features_given"]:
            cfg["n_stages"] = len(cfg["features"])

    def output_dir(self, cfg: dict) -> Path:
        data = Path(cfg["dataset_dir"]).name if cfg["dataset"] == "nnunet" else cfg["dataset"]
        labeled = "" if cfg["labeled"] is None else f"l{cfg['labeled']}_"  # None: the split file's labeled cases
        return engine.REPO_ROOT / "runs" / "synapse" / f"{data}_{cfg['preset']}_{cfg['method']}_{labeled}s{cfg['seed']}"

    def build_data(self, cfg: dict, run_dir: Path) -> Volumes3D:
        return Volumes3D(cfg, run_dir)

    def build_model(self, cfg: dict, data: Volumes3D) -> CoTrainingWrapper:
        k = len(data.class_names)
        wrapper = CoTrainingWrapper(build_unet(cfg, k, data.spacing), build_unet(cfg, k, data.spacing),
                                    feature_layer=feature_layer_name(cfg),
                                    feature_channels=cfg["features"][int(cfg.get("feature_stage") or 1) - 1],
                                    embed_dim=cfg["embed_dim"], hidden_dim=cfg["hidden_dim"], spatial_dims=3,
                                    sparse_heads=not cfg.get("dense_heads", False),
                                    point_norm=cfg.get("point_norm", "sample"))
        on = cfg["channels_last"] == "on" or (cfg["channels_last"] == "auto" and cfg["device"] == "cpu")
        fmt = torch.channels_last_3d if on else torch.contiguous_format
        if on and _dist.is_dist():  # DDP's note on the 1x1x1 kernels, whose strides differ in size-1 dims only
            import warnings
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        wrapper = wrapper.to(memory_format=fmt)
        wrapper.example_memory_format = fmt
        cfg["strides"], cfg["kernels"] = sd.plan_unet(cfg["patch"], data.spacing, cfg["n_stages"])
        return wrapper

    def sup_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels) + soft_dice_loss(logits, labels, logits.shape[1])

    def evaluate(self, wrapper, data: Volumes3D, split, cfg, device, amp, full, keep=()):
        wrapper.eval()
        per_case, kept = {}, {}
        overlap = cfg["val_overlap"] if split == "val" else 0.5
        for v in data.val if split == "val" else data.load(data.test_ids):
            pred = predict_volume(wrapper, v, cfg, len(data.class_names), device, amp, overlap)
            per_case[v.case_id] = engine.case_metrics(pred, v.label, len(data.class_names), full=full)
            if v.case_id in keep:  # (the first channel of a multi-channel image)
                kept[v.case_id] = {"image": v.image if v.image.ndim == 3 else v.image[0], "label": v.label, "pred": pred}
        wrapper.train()
        return engine.test_result(data.class_names[1:], per_case, (
            f"{split} split, sliding window (overlap {overlap}, Gaussian weights sigma = patch/8), model "
            f"{cfg['eval_model']}, on the preprocessed (resampled) grid; medpy per organ and case, mean over cases")), kept

    def record_extra(self, cfg: dict, data: Volumes3D) -> dict:
        return {"network": {"type": "dynamic_network_architectures PlainConvUNet (nnU-Net 3d_fullres)",
                            "features_per_stage": list(cfg["features"]), "strides": cfg["strides"],
                            "kernel_sizes": cfg["kernels"], "feature_layer": feature_layer_name(cfg)},
                "split": {"labeled": data.split["labeled"], "unlabeled": data.split["unlabeled"], "val": data.val_ids,
                          "test": data.test_ids},
                "reduced": cfg["note"], "dataset_dir": str(data.root),
                **({"nnunet": cfg["nnunet"]} if cfg["dataset"] == "nnunet" else {})}


TASK = Synapse()


def build_parser():
    return engine.build_parser(TASK)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return engine.main(TASK, argv)


if __name__ == "__main__":
    engine.cli(TASK)
