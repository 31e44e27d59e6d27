"""Semi-supervised cardiac segmentation on ACDC: supervised baseline, CPS, and CPS + DACL.

Protocol (see docs: Design decisions, 4): SSL4MIS split; labeled = the first 68 (3 patients) or 136
(7 patients) lines of ``train_slices.list``, the rest unlabeled; two smp U-Nets trained by
cross pseudo supervision (CPS); DACL adds one :class:`SoftDensityContrastiveLoss` per model
(two memory banks) weighted by the Gaussian ramp-up of Eq. 1; SGD + poly decay; best
checkpoint by mean val Dice; test on the test volumes slice by slice with 3D Dice, Jaccard,
HD95 and ASD (see ``evaluate_acdc.py``).

Your own data: ``--dataset-dir <nnU-Net raw folder>`` trains on it instead of ACDC (2D
images, or 3D volumes cut into slices along ``--slice-axis``); classes, input channels,
split (``--split``, ``--labeled`` count or fraction) from the folder (``nnunet_data.py``,
docs/tutorials/own_data.rst).

Loss: ``L = L_sup(a) + L_sup(b) + lambda_cross * L_cross + lambda_CL(t) * (L_CL(a) + L_CL(b))``
with ``L_sup = CE + Dice`` on the labeled half of the batch and ``L_cross`` the CPS loss on
the whole batch. Everything after ``L_sup`` is the library's :class:`torch_dacl.DACLObjective`:
labels of model a's DACL term are the ground truth on the labeled half and, on the unlabeled
half, model b's confident argmax (``--pseudo-policy``, ``--pseudo-confidence``), else
ignored; symmetric for model b. The DACL losses run from the first step (lambda_CL = 0 in
the warm-up), so the memory banks are full when the term switches on.

Examples::

    python examples/acdc_cps_dacl.py --preset smoke                 # a pipeline check (see the README)
    python examples/acdc_cps_dacl.py --preset quick --method cps    # 882 s measured on 2 shared CPU cores
    python examples/acdc_cps_dacl.py --preset paper --device cuda   # the paper's protocol
    torchrun --standalone --nproc_per_node=4 examples/acdc_cps_dacl.py --preset paper  # DDP, 4 GPUs
    # Table 2 (ablation) rows, on top of CPS:
    #   II  --sampling random --no-bank --weighting none
    #   III --ks 8 --no-bank --weighting none
    #   IV  --ks 8 16 32 --no-bank --weighting none
    #   V   --weighting none              VI (full): the defaults
    # Table 3 class-wise variant: --anchor-mode class

Distributed (``torchrun --nproc_per_node=N``, see docs/distributed.rst): the preset's batch
sizes stay the *global* batch, each rank gets ``labeled_bs / N`` labeled and
``unlabeled_bs / N`` unlabeled slices (both must be multiples of N), so results compare with
one process. DDP wraps the two networks, DACL gathers its samples over the ranks
(``gather_distributed=True``), BatchNorm becomes SyncBatchNorm on CUDA (CPU/gloo runs keep
per-rank BatchNorm: torch has no CPU SyncBatchNorm). Data order, augmentation and DACL
sampling are seeded per rank (``seed + rank``), the model initialisation is the same on
all ranks. Rank 0 alone logs (tqdm, TensorBoard), saves checkpoints and evaluates (val and
test); the other ranks wait. ``--resume`` loads the checkpoint on every rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

# OpenMP threads that spin while waiting make a CPU shared with other jobs crawl (we measured
# 12 s instead of 0.7 s per step on 2 busy cores); must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist  # noqa: E402
from acdc_data import (  # noqa: E402
    CLASS_NAMES,
    LABELED_SLICES,
    NUM_CLASSES,
    ACDCDataError,
    ACDCSlices,
    TwoStreamBatchSampler,
    evenly_spaced,
    find_acdc_dir,
    read_list,
    resolve_data_root,
)
from acdc_model import build_wrapper  # noqa: E402
from acdc_plot import render, save_slices, select_slices  # noqa: E402
from evaluate_acdc import evaluate, format_table, strip_private  # noqa: E402
import nnunet_data  # noqa: E402  (your own dataset: an nnU-Net raw folder, --dataset-dir)

from torch_dacl import DACLObjective, gradient_share  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PAPER_STEPS, PAPER_WARMUP = 30000, 1000

# Everything a preset sets can be overridden by the flag of the same name.
PRESETS: Dict[str, dict] = {
    # end to end in about a minute on 2 CPU cores: tiny input, a handful of steps,
    # val on 2 volumes, test on 3 volumes. A pipeline check, not a result: after 30 steps
    # the nets still predict background only (test Dice 0).
    "smoke": dict(size=64, labeled_bs=2, unlabeled_bs=2, steps=30, encoder="tu-regnetx_002",
                  decoder_channels=[64, 32, 16, 16], embed_dim=32, val_every=15, val_volumes=2,
                  test_volumes=3, workers=0, amp="none", max_samples_per_class=512, cl_stride=2),
    # a CPU-sized run: 96x96, a 0.45M-parameter RegNetX-200MF encoder, batch 4 + 4, D = 32,
    # DACL on a stride-2 pixel grid; val every 200 steps on 5 of the 20 val volumes, test on
    # all 40. Measured on 2 CPU cores shared with other jobs (seed 0, 7 patients): dacl 986 s,
    # cps 882 s, sup 521 s wall. 1200 steps are far from convergence (test Dice about 42 % for
    # all three, val Dice still rising): it exercises the full protocol, but differences
    # between methods at this length are within noise. Use --steps (e.g. 6000) for a
    # comparison, or the paper preset on a GPU.
    "quick": dict(size=96, labeled_bs=4, unlabeled_bs=4, steps=1200, encoder="tu-regnetx_002",
                  decoder_channels=[64, 32, 16, 16], embed_dim=32, val_every=200, val_volumes=5,
                  test_volumes=None, workers=0, amp="none", max_samples_per_class=1024, cl_stride=2),
    # the paper's protocol (GPU): 256x256, batch 12 + 12, 30k steps, val on all 20 volumes
    "paper": dict(size=256, labeled_bs=12, unlabeled_bs=12, steps=30000, encoder="resnet18",
                  decoder_channels=[256, 128, 64, 32, 16], embed_dim=64, val_every=200, val_volumes=None,
                  test_volumes=None, workers=4, amp="bf16", max_samples_per_class=1024, cl_stride=1),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Examples::")[1])
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    g.add_argument("--method", choices=("sup", "cps", "dacl"), default="dacl",
                   help="sup: supervised on the labeled slices only; cps: CPS; dacl: CPS + DACL")
    g.add_argument("--labeled-patients", type=int, choices=sorted(LABELED_SLICES), default=7)
    g.add_argument("--data-root", default=None,
                   help="folder holding ACDC/ (default: $TORCH_DACL_DATA, else the cache of examples/get_data.py, "
                        "~/.cache/torch-dacl/data)")
    g.add_argument("--dataset-dir", default=None,
                   help="train on your own dataset: an nnU-Net raw folder (dataset.json, imagesTr/, labelsTr/; 2D "
                        "images or 3D volumes cut into slices), instead of ACDC; see docs/tutorials/own_data.rst")
    g.add_argument("--labeled", default=None,
                   help="--dataset-dir: labeled training cases, a count or a fraction 0<x<1 (default: the split's "
                        "labeled list, else a quarter)")
    g.add_argument("--split", default=None, help="--dataset-dir: split JSON (train/val/test, optional labeled); "
                                                 "default <dataset-dir>/split.json if present, else generated")
    g.add_argument("--split-seed", type=int, default=0, help="--dataset-dir: seed of a generated split")
    g.add_argument("--slice-axis", type=int, choices=(0, 1, 2), default=None,
                   help="--dataset-dir with 3D volumes: the voxel axis (i, j, k = 0, 1, 2) to cut slices along "
                        "(default: the coarsest-spacing axis)")
    g.add_argument("--output-dir", type=Path, default=None,
                   help="run folder (default: runs/acdc_<method>_<preset>_seed<seed> under the repository)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--amp", choices=("bf16", "fp16", "none"), default=None)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint (default: <output-dir>/last.pt)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an output dir that holds an earlier run (its checkpoints, metrics and "
                        "TensorBoard logs are deleted first); without it or --resume such a run is refused")
    g.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step as if interrupted (continue with --resume)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--ckpt-every", type=int, default=None, help="steps between last.pt saves (default: val_every)")
    g.add_argument("--no-plot", action="store_true", help="skip the PNG of test slices")

    g = p.add_argument_group("model and optimisation (preset defaults)")
    g.add_argument("--size", type=int, default=None, help="input side (slices are resized to size x size)")
    g.add_argument("--labeled-bs", type=int, default=None,
                   help="labeled slices per step; under torchrun the global batch, split over the ranks")
    g.add_argument("--unlabeled-bs", type=int, default=None,
                   help="unlabeled slices per step; under torchrun the global batch, split over the ranks")
    g.add_argument("--steps", type=int, default=None, help="training iterations")
    g.add_argument("--encoder", default=None, help="smp encoder name (random init)")
    g.add_argument("--decoder-channels", type=int, nargs="+", default=None)
    g.add_argument("--embed-dim", type=int, default=None, help="projection head output D")
    g.add_argument("--lr", type=float, default=0.01)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--poly-power", type=float, default=0.9)
    g.add_argument("--lambda-cross", type=float, default=1.0)
    g.add_argument("--eval-model", choices=("a", "b", "ensemble"), default="a",
                   help="which network is validated and tested")

    g = p.add_argument_group("evaluation (preset defaults)")
    g.add_argument("--val-every", type=int, default=None)
    g.add_argument("--val-volumes", type=int, default=None, help="evenly spaced val volumes (default: preset; 0 = all)")
    g.add_argument("--test-volumes", type=int, default=None, help="evenly spaced test volumes (default: preset; 0 = all)")

    g = p.add_argument_group("DACL (paper defaults; ablation switches)")
    g.add_argument("--lambda-cl", type=float, default=0.1, help="max weight of the Gaussian ramp-up (Eq. 1)")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="steps with lambda_CL = 0 (default: 1000 * steps / 30000; see docs: Design decisions, 3.4)")
    g.add_argument("--pseudo-policy", choices=("fixed", "class_fraction", "class_prior"), default="fixed",
                   help="which unlabeled pixels get a pseudo label for DACL: fixed = confidence above "
                        "--pseudo-confidence; class_fraction = also the most confident --pseudo-fraction of each "
                        "predicted class; class_prior = also, for each class, the unlabeled pixels most likely to be it, as many "
                        "as --pseudo-fraction x its share of the labeled pixels (reaches classes not yet predicted)")
    g.add_argument("--pseudo-confidence", type=float, default=0.95,
                   help="confidence threshold of DACL's pseudo labels (not Eq. 2's phi, see --mask-threshold)")
    g.add_argument("--pseudo-fraction", type=float, default=0.5, help="share of each predicted class kept by "
                   "--pseudo-policy class_fraction")
    g.add_argument("--head-weight", type=float, default=None,
                   help="the projection heads learn from this times the DACL loss at every step, warm-up included, "
                        "while the networks still get lambda_CL(t) times its gradient (default: the paper, heads "
                        "learn at lambda_CL(t))")
    g.add_argument("--reduction", choices=("mean", "sum"), default="mean",
                   help="DACL loss reduction over the anchors (Eq. 10 sums; mean is the default, see the docs)")
    g.add_argument("--grad-share-every", type=int, default=None,
                   help="every N steps, measure DACL's share of the gradient norm on the networks (3 extra "
                        "backward passes; logged to TensorBoard and metrics.json)")
    g.add_argument("--mask-threshold", type=float, default=0.5, help="phi of Eq. 2 (prototype masks)")
    g.add_argument("--temperature", type=float, default=0.4)
    g.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32], help="kNN scales; one value = single scale")
    g.add_argument("--num-anchors", type=int, default=256)
    g.add_argument("--num-positives", type=int, default=512)
    g.add_argument("--num-negatives", type=int, default=512)
    g.add_argument("--bank-size", type=int, default=1000)
    g.add_argument("--bank-source", choices=("prototype", "pixel"), default="prototype")
    g.add_argument("--no-bank", action="store_true", help="no memory bank (Table 2 II-IV)")
    g.add_argument("--sampling", choices=("density", "random"), default="density",
                   help="random = plain contrastive learning (Table 2 II)")
    g.add_argument("--weighting", choices=("paper", "scale", "none"), default="paper",
                   help="positiveness weights w_i (Table 2 V: none, VI: paper)")
    g.add_argument("--anchor-mode", choices=("pixel", "class"), default="pixel", help="class: Table 3 class-wise")
    g.add_argument("--max-samples-per-class", type=int, default=None)
    g.add_argument("--cl-stride", type=int, default=None,
                   help="DACL sees the pixels of a regular grid with this stride (random offset each step); "
                        "1 = every pixel (paper preset), 2 saves CPU time in the smaller presets")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> dict:
    cfg = dict(PRESETS[args.preset])
    for key in list(cfg) + ["size", "labeled_bs", "unlabeled_bs"]:
        v = getattr(args, key, None)
        if v is not None:
            cfg[key] = v
    for key in ("val_volumes", "test_volumes"):
        if cfg.get(key) == 0:
            cfg[key] = None
    skip = {"resume", "stop_at", "output_dir", "data_root", "no_plot", "overwrite"}
    for key, v in vars(args).items():
        if key not in cfg and key not in skip:
            cfg[key] = v
    if args.method == "sup":
        cfg["unlabeled_bs"] = 0
    if cfg["warmup_steps"] is None:
        cfg["warmup_steps"] = int(round(PAPER_WARMUP * cfg["steps"] / PAPER_STEPS))
    cfg["ckpt_every"] = cfg["ckpt_every"] or cfg["val_every"]
    cfg["device"] = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg["data_root_arg"] = args.data_root
    cfg["labeled_slices"] = LABELED_SLICES[cfg["labeled_patients"]]
    return cfg


def default_output_dir(cfg: dict) -> Path:
    return REPO_ROOT / "runs" / f"acdc_{cfg['method']}_{cfg['preset']}_seed{cfg['seed']}"


RUN_OUTPUTS = ("metrics.json", "last.pt", "best.pt", "config.json", "test_slices.npz", "test_predictions.png")


def check_run_dir(run_dir: Path, resume: Optional[str], overwrite: bool) -> None:
    """Refuse to train into a folder that holds an earlier run unless ``--resume`` or
    ``--overwrite`` says what to do with it; ``--overwrite`` deletes its outputs (so that
    TensorBoard does not mix the two runs)."""
    earlier = [f for f in ("metrics.json", "last.pt") if (run_dir / f).exists()]
    if not earlier or resume:
        return
    if not overwrite:
        raise FileExistsError(f"{run_dir} already holds an earlier run ({', '.join(earlier)}); pass --resume to "
                              f"continue it, --overwrite to start over, or --output-dir for another folder")
    if _dist.is_main():
        import shutil

        for name in RUN_OUTPUTS:
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)
    _dist.barrier()


# the settings the start-up summary shows (all runs; DACL runs); config.json holds all of them
SUMMARY_KEYS = (("steps", "size", "labeled_bs", "unlabeled_bs", "encoder", "lr", "lambda_cross"),
                ("lambda_cl", "warmup_steps", "pseudo_policy", "pseudo_confidence", "reduction", "embed_dim", "ks",
                 "no_bank", "bank_size", "sampling", "weighting", "anchor_mode"))


def startup_summary(cfg: dict, acdc_dir: Path, run_dir: Path, n_labeled: int, n_unlabeled: int, n_val: int,
                    n_test: int, device) -> str:
    """What this run will do, printed before the progress bar (every setting is in config.json)."""
    evaluated = lambda limit, n: f"{limit} of {n}" if limit else f"all {n}"  # noqa: E731
    threads = f", {torch.get_num_threads()} threads" if torch.device(device).type == "cpu" else ""
    return "\n".join([
        f"{'ACDC' if not cfg.get('dataset_dir') else Path(cfg['dataset_dir']).name} {cfg['method']}, "
        f"preset {cfg['preset']}, seed {cfg['seed']}",
        f"  data    {acdc_dir}: {n_labeled} labeled + {n_unlabeled} unlabeled training slices "
        + (f"({cfg['labeled_patients']} labeled patients)" if not cfg.get("dataset_dir") else "")
        + f"; validation on {evaluated(cfg['val_volumes'], n_val)} "
        f"val volumes, test on {evaluated(cfg['test_volumes'], n_test)} test volumes",
        f"  device  {device}{threads}, amp {cfg['amp']}",
        "  config  " + ", ".join(f"{k} {cfg[k]}" for k in SUMMARY_KEYS[0] + (SUMMARY_KEYS[1] if cfg["method"] == "dacl"
                                                                              else ()) if k in cfg),
        f"  output  {run_dir} (config.json holds every setting)",
    ])


def build_objective(cfg: dict, heads=None) -> DACLObjective:
    """Eq. 1 beyond L_sup: CPS (``cps``) or CPS + one DACL loss per model (``dacl``)."""
    return DACLObjective(
        num_classes=cfg.get("num_classes") or NUM_CLASSES, dim=cfg["embed_dim"], total_steps=cfg["steps"], lambda_cl=cfg["lambda_cl"],
        lambda_cross=cfg["lambda_cross"], warmup=cfg["warmup_steps"], contrastive=cfg["method"] == "dacl",
        pseudo_policy=cfg["pseudo_policy"], pseudo_confidence=cfg["pseudo_confidence"],
        pseudo_fraction=cfg["pseudo_fraction"], pixel_stride=cfg["cl_stride"], head_weight=cfg["head_weight"],
        heads=heads if cfg["head_weight"] is not None else None, ignore_index=-100,
        temperature=cfg["temperature"], ks=tuple(cfg["ks"]), num_anchors=cfg["num_anchors"],
        num_positives=cfg["num_positives"], num_negatives=cfg["num_negatives"], bank_size=cfg["bank_size"],
        bank_source=cfg["bank_source"], use_bank=not cfg["no_bank"], sampling=cfg["sampling"],
        weighting=cfg["weighting"], anchor_mode=cfg["anchor_mode"], reduction=cfg["reduction"],
        max_samples_per_class=cfg["max_samples_per_class"], threshold=cfg["mask_threshold"],
        validate=False, gather_distributed=_dist.is_dist())


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1.0 - min(step, total) / total) ** power


def amp_dtype(name: str) -> Optional[torch.dtype]:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[name]


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class Trainer:
    """Holds the models, losses, optimiser and state of one run."""

    def __init__(self, cfg: dict, run_dir: Path, acdc_dir: Path) -> None:
        import segmentation_models_pytorch as smp

        self.cfg = cfg
        self.run_dir = run_dir
        self.acdc_dir = acdc_dir
        self.device = torch.device(cfg["device"])
        self.amp = amp_dtype(cfg["amp"])
        self.wrapper = build_wrapper(cfg).to(self.device)
        # per-rank batch sizes (the global ones in one process); under DDP the heads are
        # unused by sup / cps, hence find_unused_parameters there
        self.lbs = _dist.split_batch(cfg["labeled_bs"], "--labeled-bs")
        _dist.split_batch(cfg["unlabeled_bs"], "--unlabeled-bs")
        self.net = _dist.wrap_ddp(self.wrapper, self.device, find_unused_parameters=cfg["method"] != "dacl")
        self.wrapper = _dist.unwrap(self.net)  # checkpoints and evaluation use the plain module
        # the objective owns both DACL losses (and their banks), the schedule and the pseudo labels
        self.objective = build_objective(cfg, heads=(self.wrapper.head_a, self.wrapper.head_b)).to(self.device)
        self.shared_params = [p for n, p in self.wrapper.named_parameters() if not n.startswith("head_")]
        self.opt = torch.optim.SGD(self.wrapper.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                   weight_decay=cfg["weight_decay"])
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg["amp"] == "fp16")
        self.dice = smp.losses.DiceLoss(mode="multiclass", from_logits=True)
        self.step = 0
        self.best = {"val_dice": -1.0, "step": None}
        self.history: List[dict] = []
        self.diagnostics: List[dict] = []  # DACL's per-class stats and gradient share, every log step

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"model": self.wrapper.state_dict(), "objective": self.objective.state_dict(),
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "best": self.best, "history": self.history, "diagnostics": self.diagnostics, "rng": rng_state(), "config": self.cfg,
                **({"rng_ranks": _dist.gather_objects(rng_state())} if _dist.is_dist() else {})}

    def load_state_dict(self, ck: dict) -> None:
        self.wrapper.load_state_dict(ck["model"])
        self.objective.load_state_dict(ck["objective"])
        self.opt.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.step = int(ck["step"])
        self.best = ck["best"]
        self.history = ck["history"]
        self.diagnostics = ck.get("diagnostics", [])
        set_rng_state(ck["rng"])
        if _dist.is_dist():  # each rank continues its own random streams
            ranks = ck.get("rng_ranks") or []
            if len(ranks) == _dist.world_size():
                set_rng_state(ranks[_dist.rank()])
            else:
                warnings.warn(f"the checkpoint holds the random state of {len(ranks) or 1} rank(s), not "
                              f"{_dist.world_size()}: re-seeding, the run will not continue bit-exactly")
                torch.manual_seed(_dist.rank_seed(self.cfg["seed"]) + 1 + 7919 * self.step)

    def save(self, name: str) -> Path:
        """Write a checkpoint (rank 0; under DDP every rank must call it: it gathers RNG states)."""
        path = self.run_dir / name
        state = self.state_dict()
        if _dist.is_main():
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)
        return path

    # ------------------------------------------------------------------ one step
    def sup_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels) + self.dice(logits, labels)

    def train_step(self, batch: dict) -> Dict[str, float]:
        cfg = self.cfg
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        lbs = self.lbs  # cfg["labeled_bs"] in one process
        gt = y[:lbs]
        lr = poly_lr(cfg["lr"], self.step, cfg["steps"], cfg["poly_power"])
        for grp in self.opt.param_groups:
            grp["lr"] = lr
        lam = self.objective.lambda_cl
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            out = self.net(x)
        la, lb = out.logits_a.float(), out.logits_b.float()
        l_sup = self.sup_loss(la[:lbs], gt) + self.sup_loss(lb[:lbs], gt)
        loss = l_sup
        logs = {"sup": l_sup}
        diag = None
        if cfg["method"] in ("cps", "dacl"):
            # the library's objective: lambda_cross * L_cross (+ lambda_CL(t) * (L_CL(a) + L_CL(b)), with the
            # pseudo labels of the unlabeled half; it runs during the warm-up too and fills the banks)
            labeled = torch.arange(x.shape[0], device=self.device) < lbs
            res = self.objective(la, lb, out.embeddings_a, out.embeddings_b, y, labeled)
            loss = loss + res.loss
            logs["cross"] = res.cross
            if cfg["method"] == "dacl":
                logs["cl"] = res.cl_a + res.cl_b
                if (self.step + 1) % cfg["log_every"] == 0 or self.step + 1 == cfg["steps"]:
                    diag = {"step": self.step + 1,
                            **DACLObjective.summarize(res.stats, tuple(cfg.get("class_names")
                                                                         or ("background",) + tuple(CLASS_NAMES)))}
                    every = cfg["grad_share_every"]
                    if every and (self.step + 1) % every == 0:
                        diag.update(gradient_share({"cl": res.cl_term, "sup": l_sup, "cross": res.cross_term},
                                                   self.shared_params))
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.objective.step()
        self.step += 1
        if diag is not None:
            self.diagnostics.append(diag)
        logs["loss"] = loss
        vals = {k: float(v.detach()) for k, v in logs.items()}
        vals.update(lam=lam, lr=lr)
        vals = _dist.mean_scalars(vals)  # averaged over the ranks (unchanged in one process)
        if not all(math.isfinite(v) for v in vals.values()):
            raise FloatingPointError(f"non-finite loss at step {self.step}: {vals}")
        if diag is not None:
            vals["_diag"] = diag
        return vals


def run(cfg: dict, run_dir: Path, resume: Optional[str] = None, stop_at: Optional[int] = None,
        plot: bool = True) -> dict:
    """Train (or resume), validate periodically, test the best checkpoint; returns metrics."""
    from torch.utils.data import DataLoader
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    t_start = time.time()
    nn_prep = nnunet_data.open_2d(cfg, run_dir) if cfg.get("dataset_dir") else None
    if nn_prep is not None:  # an nnU-Net raw folder: classes, channels, split and slices from it
        acdc_dir, slices, n_lab = nn_prep, nn_prep.train_slices, nn_prep.train_slices.n_labeled
        val_cases, test_listed = nn_prep.split["val"], nn_prep.split["test"]
    else:
        acdc_dir = find_acdc_dir(resolve_data_root(cfg["data_root_arg"]))
        slices = read_list(acdc_dir, "train_slices.list")
        val_cases = read_list(acdc_dir, "val.list")
        test_listed = read_list(acdc_dir, "test.list")
        n_lab = cfg["labeled_slices"]
        if len(slices) <= n_lab:
            raise ACDCDataError(f"{str(acdc_dir / 'train_slices.list')!r} has {len(slices)} lines; "
                                f"{n_lab} labeled slices plus unlabeled ones are needed")
    run_dir.mkdir(parents=True, exist_ok=True)
    main_rank = _dist.is_main()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])

    trainer = Trainer(cfg, run_dir, acdc_dir)
    ckpt_path = None
    if resume:
        ckpt_path = run_dir / "last.pt" if resume == "auto" else Path(resume)
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: checkpoint {str(ckpt_path)!r} does not exist")
        ck = torch.load(ckpt_path, map_location=trainer.device, weights_only=False)
        changed = {k: (ck["config"].get(k), cfg.get(k)) for k in cfg
                   if k not in ("device", "threads", "workers", "log_every", "data_root_arg") and ck["config"].get(k) != cfg.get(k)}
        if changed:
            warnings.warn(f"resuming with a configuration that differs from the checkpoint's: {changed}")
        trainer.load_state_dict(ck)
        if main_rank:
            print(f"resumed from {ckpt_path} at step {trainer.step}")
    else:
        # DACL's sampling RNG (per rank: seed + rank); the nets were seeded in build_wrapper
        torch.manual_seed(_dist.rank_seed(cfg["seed"]) + 1)
        np.random.seed(_dist.rank_seed(cfg["seed"]))
        random.seed(_dist.rank_seed(cfg["seed"]))
    if main_rank:
        (run_dir / "config.json").write_text(json.dumps({**cfg, "acdc_dir": str(acdc_dir)}, indent=2))
        print(startup_summary(cfg, acdc_dir, run_dir, n_lab, len(slices) - n_lab, len(val_cases), len(test_listed),
                              trainer.device), flush=True)

    ds = slices if nn_prep is not None else ACDCSlices(acdc_dir, cfg["size"], augment=True, cases=slices)
    sampler = TwoStreamBatchSampler(range(n_lab), range(n_lab, len(slices)), cfg["labeled_bs"], cfg["unlabeled_bs"],
                                    num_steps=cfg["steps"], seed=cfg["seed"], start_step=trainer.step,
                                    rank=_dist.rank(), world_size=_dist.world_size())
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=cfg["workers"], pin_memory=trainer.device.type == "cuda",
                        persistent_workers=False,
                        # its own generator: creating the iterator must not draw from the global
                        # RNG, or a resumed run would diverge (the data order is the sampler's)
                        generator=torch.Generator().manual_seed(cfg["seed"]))
    writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=trainer.step or None) if main_rank else None
    val_every = cfg["val_every"]
    last = min(cfg["steps"], stop_at) if stop_at else cfg["steps"]
    bar = tqdm(total=cfg["steps"], initial=trainer.step, desc=f"{cfg['method']} {cfg['preset']}", dynamic_ncols=True,
               disable=not main_rank)
    t_train = time.time()
    for batch in loader:
        if trainer.step >= last:
            break
        vals = trainer.train_step(batch)
        diag = vals.pop("_diag", None)
        if main_rank and diag is not None:  # DACL's per-class diagnostics (and gradient share)
            for k, v in diag.items():
                if k != "step":
                    writer.add_scalar(f"dacl/{k}", v, trainer.step)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in vals.items() if k != "lr"}, refresh=False)
        if main_rank and (trainer.step % cfg["log_every"] == 0 or trainer.step == cfg["steps"]):
            for k, v in vals.items():
                writer.add_scalar(f"train/{k}", v, trainer.step)
        if main_rank and (trainer.step % val_every == 0 or trainer.step == cfg["steps"]):
            res = evaluate(trainer.wrapper, acdc_dir, "val", cfg["size"], trainer.device, which=cfg["eval_model"],
                           limit=cfg["val_volumes"], full=False, amp_dtype=trainer.amp)
            dice = res["mean"]["dice"]
            writer.add_scalar("val/dice", dice, trainer.step)
            for cname, v in res["per_class"]["dice"].items():
                writer.add_scalar(f"val/dice_{cname}", v, trainer.step)
            trainer.history.append({"step": trainer.step, "val_dice": dice})
            if dice > trainer.best["val_dice"]:
                trainer.best = {"val_dice": dice, "step": trainer.step}
                torch.save({"model": trainer.wrapper.state_dict(), "config": cfg, "step": trainer.step,
                            "val_dice": dice}, run_dir / "best.pt")
            bar.write(f"step {trainer.step}: val Dice {100 * dice:.2f} ({res['num_volumes']} volumes), "
                      f"best {100 * trainer.best['val_dice']:.2f} at step {trainer.best['step']}")
        if trainer.step % val_every == 0 or trainer.step == cfg["steps"]:
            _dist.barrier()  # the other ranks wait for rank 0's validation
        if trainer.step % cfg["ckpt_every"] == 0 or trainer.step in (last, cfg["steps"]):
            trainer.save("last.pt")
    bar.close()
    train_seconds = time.time() - t_train
    _dist.barrier()  # last.pt is written before any rank returns
    if not main_rank:  # rank 0 alone tests and writes metrics.json
        return {"stopped_at": trainer.step} if trainer.step < cfg["steps"] else {}
    writer.flush()
    if trainer.step < cfg["steps"]:
        writer.close()
        print(f"stopped at step {trainer.step} of {cfg['steps']}; continue with --resume")
        return {"stopped_at": trainer.step}

    # ---------------------------------------------------------------- test
    best_path = run_dir / "best.pt"
    if best_path.is_file():
        trainer.wrapper.load_state_dict(torch.load(best_path, map_location=trainer.device, weights_only=False)["model"])
    test_cases = list(test_listed) if nn_prep is not None else read_list(acdc_dir, "test.list", check_files=False)
    if cfg["test_volumes"]:
        test_cases = evenly_spaced(test_cases, cfg["test_volumes"])
    keep = evenly_spaced(test_cases, 4)
    res = evaluate(trainer.wrapper, acdc_dir, "test", cfg["size"], trainer.device, which=cfg["eval_model"],
                   limit=cfg["test_volumes"], full=True, amp_dtype=trainer.amp, keep_predictions=keep, progress=True)
    print(format_table(res))
    sl = select_slices(res["_predictions"])
    save_slices(run_dir / "test_slices.npz", sl)
    if plot:
        render([(f"{cfg['method']} prediction", sl)], run_dir / "test_predictions.png",
               class_names=cfg.get("class_names"))
    for m, v in res["mean"].items():
        writer.add_scalar(f"test/{m}", v, trainer.step)
    writer.close()
    n_val = len(val_cases)
    metrics = {
        "method": cfg["method"], "preset": cfg["preset"], "seed": cfg["seed"],
        "labeled_patients": cfg["labeled_patients"], "labeled_slices": n_lab,
        "steps": trainer.step, "best_val_dice": trainer.best["val_dice"], "best_step": trainer.best["step"],
        "val_volumes": cfg["val_volumes"] or n_val, "val_volumes_in_split": n_val,
        "val_metric": f"mean 3D Dice over classes 1-{(cfg.get('num_classes') or NUM_CLASSES) - 1} of model "
                      + cfg["eval_model"],
        "dataset": str(cfg["dataset_dir"]) if nn_prep is not None else "ACDC",
        "reduced_evaluation": bool(cfg["val_volumes"] or cfg["test_volumes"]),
        "val_history": trainer.history,
        "dacl_diagnostics": trainer.diagnostics,
        "test": strip_private(res),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - t_start, 1),
        "device": str(trainer.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "resumed_from": str(ckpt_path) if ckpt_path else None,
        **({"world_size": _dist.world_size(),
            "per_rank_batch": [trainer.lbs, cfg["unlabeled_bs"] // _dist.world_size()]} if _dist.is_dist() else {}),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"run folder: {run_dir} (metrics.json, config.json, best.pt, last.pt, tb/, test_predictions.png)")
    if cfg["preset"] == "smoke":
        print(f"smoke preset: a pipeline check, not a result ({cfg['steps']} steps at {cfg['size']}x{cfg['size']} "
              f"learn little beyond background, so Dice near 0 and a large HD95 are expected); "
              f"use --preset quick (CPU) or --preset paper (GPU) for numbers")
    return metrics


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    cfg = make_config(args)
    run_dir = args.output_dir or default_output_dir(cfg)
    check_run_dir(Path(run_dir), args.resume, args.overwrite)
    if _dist.launched():  # torchrun: one process per rank (device cuda:LOCAL_RANK or cpu)
        cfg["device"] = str(_dist.setup(cfg["device"]))
        cfg["world_size"] = _dist.world_size()
    try:
        return run(cfg, Path(run_dir), resume=args.resume, stop_at=args.stop_at, plot=not args.no_plot)
    finally:
        _dist.cleanup()


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        main()
    except (ACDCDataError, FileExistsError, nnunet_data.NnUNetDataError) as e:
        sys.exit(f"error: {e}")
