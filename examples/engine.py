"""The training engine under both examples: co-training (CPS) + DACL, written once.

A dataset script describes a :class:`Task` (presets, its own flags, data, the two networks,
evaluation); :func:`main` does the rest: the command line (:func:`build_parser`), the run
folder guard (``--overwrite`` / ``--resume``), the start-up summary, the loop (poly LR, AMP
``--amp bf16|fp16|none``, DDP via ``_dist.py``), the validation schedule, checkpoints and
exact resume, logging (tqdm, TensorBoard, DACL's diagnostics every ``--log-every`` steps,
the gradient share every ``--grad-share-every``) and ``metrics.json`` (``results_schema.RunRecord``).

Loss: ``L = L_sup(a) + L_sup(b) + lambda_cross * L_cross + lambda_CL(t) * (L_CL(a) + L_CL(b))``,
``L_sup`` (the task's CE + Dice) on the labeled rows, the rest the library's
:class:`torch_dacl.DACLObjective` (``--method cps``: no DACL term; ``sup``: labeled rows
only). The DACL losses run from the first step, so the banks are full after the warm-up.

Checkpoints: ``last.pt`` holds ``model``, ``objective`` (losses, banks, schedule),
``optimizer``, ``scaler``, ``step``, ``best``, ``history``, ``diagnostics``, ``train_seconds``, ``rng`` (torch,
numpy, python, CUDA), ``data`` (the samplers), ``config`` and, under DDP, ``ranks`` (each
rank's ``rng`` and ``data``); ``best.pt`` holds ``model``, ``config``, ``step``, ``val_dice``.

Empty masks (:func:`case_metrics`, both examples): both empty: Dice = Jaccard = 1, HD95 =
ASD = 0; exactly one empty: Dice = Jaccard = 0, HD95 = ASD = the volume's diagonal in voxels
(the largest possible distance). Means run over all volumes; ``empty_cases`` counts them.

Distributed (``torchrun``, docs/distributed.rst): the batch sizes are the global batch;
data, augmentation and DACL sampling are seeded per rank (``seed + rank``), the networks'
initialisation is the same on all ranks; rank 0 alone logs, saves and evaluates.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

# OpenMP threads that spin while waiting make a CPU shared with other jobs crawl (12 s instead of
# 0.7 s per step measured on 2 busy cores); set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import record_function  # noqa: E402  (train_step's stages, named for a profiler)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist  # noqa: E402
from _cli import ArgValueError, float_range, int_range  # noqa: E402
from nnunet_data import NnUNetDataError, parse_labeled  # noqa: E402
from torch_dacl import DACLObjective, gradient_share  # noqa: E402
from torch_dacl.checkpoint import save_atomic  # noqa: E402  (best.pt, last.pt: never torn)
from torch_dacl.functional import gaussian_rampup  # noqa: E402
from acdc_plot import render, save_slices, select_slices  # noqa: E402
from results_schema import METRICS, Best, Environment, Identity, RunRecord, TestResult, Timing, ValPoint  # noqa: E402

from torch_dacl.ablation import TABLE2, table2_options  # noqa: E402  (Table 2 rows by name)

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Issue #27's hypotheses on where DACL's effect goes, each a named set of flags (``--hypothesis``;
#: a flag given on the command line wins). ``steps_factor`` multiplies the preset's steps.
HYPOTHESES: Dict[str, Dict[str, Any]] = {
    "H1-long": dict(steps_factor=3),                 # budget: a 3x longer run (with --labeled 3)
    "H3-labeled": dict(pseudo_policy="none"),        # pseudo-label noise: DACL on labeled pixels only
    "H3-agree": dict(pseudo_agree=True),             # pseudo-label noise: where both models agree
    "H4-stage2": dict(feature_stage=2),              # feature layer: heads one decoder stage earlier
    "H5-constant": dict(ramp_shape="constant", lambda_cl=0.5),  # strength: Fig. 5a's constant 0.5
}
PAPER_STEPS, PAPER_WARMUP = 30000, 1000
EMPTY_CONVENTION = ("both empty: dice=jaccard=1, hd95=asd=0; exactly one empty: dice=jaccard=0, "
                    "hd95=asd=volume diagonal in voxels (worst case)")
RUN_OUTPUTS = ("metrics.json", "last.pt", "best.pt", "config.json", "test_slices.npz", "test_predictions.png",
               "mechanism.json")
# configuration keys that may differ on --resume without a warning
RUNTIME_KEYS = ("device", "threads", "workers", "log_every", "no_progress", "no_plot", "no_test", "resume", "overwrite",
                "stop_at", "output_dir", "world_size", "no_download", "commit")


class Task:
    """What a dataset script provides; the engine calls these in this order."""

    name = "task"
    doc = ""                    # the script's docstring (description and epilog of --help)
    presets: Dict[str, dict] = {}
    defaults: Dict[str, Any] = {}  # this script's defaults of common flags and of preset-free settings
    paper_labeled: Tuple[int, ...] = ()  # --labeled on the built-in dataset: the paper's counts ...
    labeled_default: Optional[int] = None  # ... and the default one
    summary_keys: Tuple[str, ...] = ()  # the task's settings shown in the start-up summary
    # DDP's find_unused_parameters; must stay False with DACL's sparse heads: they run in the
    # objective, outside DDP's forward, and DDP would count them unused, then ready twice
    find_unused_parameters = False
    reseed_after_model = True   # False: the training RNG continues from the model's initialisation
    data_error: Tuple[type, ...] = (NnUNetDataError,)  # data errors the command line reports in one line
    has_probe = False  # --mechanism-every: the task's probe() gives a MechanismProbe on its built-in data

    def add_arguments(self, group) -> None: ...  # the dataset's and the model's own flags

    def configure(self, cfg: dict, args: dict) -> None: ...  # derived settings; args: None where unset

    def output_dir(self, cfg: dict) -> Path:
        return REPO_ROOT / "runs" / f"{self.name}_{cfg['method']}_{cfg['preset']}_seed{cfg['seed']}"

    def build_data(self, cfg: dict, run_dir: Path):
        """An object with ``class_names`` (background first), ``name``, ``kind``, ``labeled``,
        ``labeled_unit``, ``summary``, ``keep_for_plot`` (test cases), ``batches(start_step, lbs,
        ubs)`` (``(x, y)`` per step, labeled rows first) and, if it has a state,
        ``state_dict()`` / ``load_state_dict()`` / ``reseed(seed, step)``."""
        raise NotImplementedError

    def build_model(self, cfg: dict, data) -> nn.Module: ...  # a torch_dacl.CoTrainingWrapper

    def sup_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def evaluate(self, wrapper, data, split: str, cfg: dict, device, amp, full: bool, keep=()):
        """:func:`test_result` and ``{case: {"image", "label", "pred"}}`` of the cases in ``keep``."""
        raise NotImplementedError

    def record_extra(self, cfg: dict, data) -> dict:  # the record's ``extra`` (split, network, ...)
        return {}

    def probe(self, cfg: dict, data):
        """A :class:`probe.MechanismProbe` on validation pixels (``--mechanism-every``), or None
        where the task has none."""
        return None


# ----------------------------------------------------------------------------- command line
class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" for preset-set and optional values
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def build_parser(task: Task) -> argparse.ArgumentParser:
    """The script's parser: the common flags (same names and types in both scripts) and the
    task's; a flag that a preset sets defaults to the preset (its help lists the values)."""
    doc = task.doc
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=_Help,
                                epilog="Examples::" + doc.split("Examples::", 1)[1].split("\n\n\n")[0]
                                if "Examples::" in doc else None)
    _run_flags(p.add_argument_group("run"), task)
    _optim_flags(p.add_argument_group("optimisation and evaluation"))
    _objective_flags(p.add_argument_group("objective: CPS and DACL (paper defaults; ablation switches)"))
    task.add_arguments(p.add_argument_group(f"{task.name}: data and model"))
    p.set_defaults(**{k: v for k, v in task.defaults.items() if k in {a.dest for a in p._actions}})
    preset_keys = {k for pr in task.presets.values() for k in pr}
    p.preset_fallback = {a.dest: a.default for a in p._actions if a.dest in preset_keys}
    for a in p._actions:  # a preset's value is the default: None here, the values in the help
        a.help = a.help or a.dest.replace("_", " ")
        if a.dest in preset_keys:
            vals = ", ".join(f"{n} {_fmt(pr.get(a.dest, a.default))}" for n, pr in task.presets.items())
            a.help, a.default = f"{a.help or ''} (preset: {vals})".strip(), None
    return p


def _run_flags(g, task: Task) -> None:
    g.add_argument("--preset", choices=list(task.presets), default="smoke")
    g.add_argument("--method", choices=("sup", "cps", "dacl"), default="dacl",
                   help="sup: the labeled data only; cps: cross pseudo supervision; dacl: CPS + DACL")
    g.add_argument("--labeled", "--labeled-patients", type=parse_labeled, default=None,
                   help="labeled training cases: a count, or a fraction 0<x<1 (--dataset-dir; default the split's "
                        "labeled list, else a quarter); the built-in datasets take the paper's counts "
                        f"{' or '.join(map(str, task.paper_labeled))} (default {task.labeled_default})")
    g.add_argument("--data-root", default=None, help="folder holding the datasets (default: $TORCH_DACL_DATA, else "
                   "the cache of examples/get_data.py, ~/.cache/torch-dacl/data)")
    g.add_argument("--no-download", action="store_true", help="when no data root holds the dataset, stop instead of "
                   "downloading and preparing it into the cache (examples/get_data.py)")
    g.add_argument("--dataset-dir", default=None, help="your own dataset: an nnU-Net raw folder (dataset.json, "
                   "imagesTr/, labelsTr/); see docs/tutorials/own_data.rst")
    g.add_argument("--split", default=None, help="--dataset-dir: split JSON (train/val/test, optional labeled); "
                   "default <dataset-dir>/split.json if present, else generated")
    g.add_argument("--split-seed", type=int_range(0), default=0, help="--dataset-dir: seed of a generated split")
    g.add_argument("--output-dir", "--out", type=Path, default=None, help="run folder (default: under runs/)")
    g.add_argument("--seed", type=int_range(0), default=0)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--amp", choices=("bf16", "fp16", "none"), default="none", help="mixed precision")
    g.add_argument("--threads", type=int_range(1), default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint (no PATH: <output-dir>/last.pt, if it exists)")
    g.add_argument("--overwrite", action="store_true", help="start over in a run folder that holds an earlier run "
                   "(its outputs are deleted first); without it or --resume such a run is refused")
    g.add_argument("--stop-at", type=int_range(1), default=None, help="stop after this step as if interrupted")
    g.add_argument("--log-every", type=int_range(1), default=10, help="steps between TensorBoard scalars and DACL diagnostics")
    g.add_argument("--ckpt-every", type=int_range(1), default=None, help="steps between last.pt saves (default: val_every)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="no picture of the test predictions")
    g.add_argument("--mechanism-every", type=int_range(0), default=0,
                   help="every N steps, measure class compactness on a fixed set of validation pixels in the "
                        "head's and the feature space (examples/probe.py; writes mechanism.json; 0: never)")
    g.add_argument("--probe-pixels", type=int_range(2), default=256, help="--mechanism-every: pixels per class")
    g.add_argument("--hypothesis", choices=tuple(HYPOTHESES), default=None,
                   help="one of issue #27's named hypotheses (the flags it sets: see HYPOTHESES in engine.py)")
    g.add_argument("--no-test", action="store_true",
                   help="stop before the test set (runs that choose settings on the validation split): writes "
                        "val_history.json; a later --resume without it tests the best checkpoint")


def _optim_flags(g) -> None:
    g.add_argument("--steps", "--iterations", type=int_range(1), default=30000, help="training iterations")
    g.add_argument("--labeled-bs", "--batch-labeled", type=int_range(1), default=2,
                   help="labeled samples per step; under torchrun the global batch, split over the ranks")
    g.add_argument("--unlabeled-bs", "--batch-unlabeled", type=int_range(0), default=2,
                   help="unlabeled samples per step; under torchrun the global batch")
    g.add_argument("--lr", type=float_range(0, lo_open=True), default=0.01, help="SGD learning rate (poly decay)")
    g.add_argument("--momentum", type=float_range(0, 1, hi_open=True), default=0.9)
    g.add_argument("--weight-decay", type=float_range(0), default=1e-4)
    g.add_argument("--poly-power", type=float_range(0), default=0.9)
    g.add_argument("--embed-dim", type=int_range(1), default=64, help="projection head output D")
    g.add_argument("--eval-model", choices=("a", "b", "ensemble"), default="a", help="the network(s) evaluated")
    g.add_argument("--val-every", type=int_range(1), default=200, help="steps between validations")
    g.add_argument("--val-volumes", "--max-val-cases", type=int_range(0), default=None, help="val volumes (0 = all)")
    g.add_argument("--test-volumes", "--max-test-cases", type=int_range(0), default=None, help="test volumes (0 = all)")


def _objective_flags(g) -> None:
    g.add_argument("--table2-row", choices=tuple(TABLE2), default=None,
                   help="Table 2's ablation row (sets the DACL options below that it names)")
    g.add_argument("--lambda-cl", type=float_range(0), default=0.1, help="max weight of the Gaussian ramp-up (Eq. 1)")
    g.add_argument("--lambda-cross", type=float_range(0), default=1.0, help="weight of the CPS loss")
    g.add_argument("--cross-rampup", type=int_range(0), default=0, help="steps of a Gaussian ramp-up of lambda_cross (0: none)")
    g.add_argument("--warmup-steps", type=int_range(0), default=None,
                   help="steps with lambda_CL = 0 (default: 1000 * steps / 30000, docs: Design decisions, 3.4)")
    g.add_argument("--pseudo-policy", choices=("fixed", "class_fraction", "class_prior", "none"), default="fixed",
                   help="which unlabeled pixels get a pseudo label for DACL: fixed = confidence above "
                        "--pseudo-confidence; class_fraction = also the most confident --pseudo-fraction of each "
                        "predicted class; class_prior = also, per class, the pixels most likely to be it, "
                        "--pseudo-fraction x its share of the labeled pixels; none = no pseudo labels, DACL on "
                        "the labeled images alone")
    g.add_argument("--pseudo-agree", action="store_true",
                   help="keep a pseudo label only where the two models' argmax agree")
    g.add_argument("--ramp-shape", choices=("gaussian", "constant"), default="gaussian",
                   help="lambda_CL(t) after the warm-up: Eq. 1's Gaussian, or constant at --lambda-cl (Fig. 5a)")
    g.add_argument("--feature-stage", type=int_range(1), default=1,
                   help="the decoder stage the projection heads read: 1 = the last (full resolution), 2 = the one "
                        "before (half resolution), ...")
    g.add_argument("--pseudo-confidence", type=float_range(0, 1), default=0.95,
                   help="confidence threshold of DACL's pseudo labels (not Eq. 2's phi, see --mask-threshold)")
    g.add_argument("--pseudo-fraction", type=float_range(0, 1, lo_open=True), default=0.5, help="see --pseudo-policy")
    g.add_argument("--dense-heads", action="store_true", help="run the projection heads over every pixel (the "
                   "dense path) instead of at the pixels DACL samples (the sparse heads, default; docs: Design "
                   "decisions)")
    g.add_argument("--point-norm", choices=("sample", "frozen"), default="sample", help="the sparse heads' "
                   "normalisation: BatchNorm statistics of the sampled pixels, or the running statistics, frozen")
    g.add_argument("--head-weight", type=float_range(0), default=None, help="the projection heads learn from this times the "
                   "DACL loss at every step (default: the paper, lambda_CL(t))")
    g.add_argument("--grad-share-every", type=int_range(1), default=None, help="every N steps, measure DACL's share of the "
                   "gradient norm on the networks (3 extra backward passes)")
    g.add_argument("--reduction", choices=("mean", "sum"), default="mean", help="DACL loss over the anchors")
    g.add_argument("--mask-threshold", type=float_range(0, 1), default=0.5, help="phi of Eq. 2 (prototype masks)")
    g.add_argument("--temperature", type=float_range(0, lo_open=True), default=0.4)
    g.add_argument("--ks", type=int_range(1), nargs="+", default=[8, 16, 32], help="kNN scales; one value = single scale")
    g.add_argument("--num-anchors", type=int_range(1), default=256)
    g.add_argument("--num-positives", type=int_range(1), default=512)
    g.add_argument("--num-negatives", type=int_range(1), default=512)
    g.add_argument("--bank-size", type=int_range(1), default=1000)
    g.add_argument("--bank-source", choices=("prototype", "pixel"), default="prototype")
    g.add_argument("--no-bank", action="store_true", help="no memory bank (Table 2 II-IV)")
    g.add_argument("--sampling", choices=("density", "random"), default="density", help="random: Table 2 II")
    g.add_argument("--weighting", choices=("paper", "scale", "none"), default="paper", help="w_i (Table 2 V: none)")
    g.add_argument("--anchor-mode", choices=("pixel", "class"), default="pixel", help="class: Table 3 class-wise")
    g.add_argument("--max-samples-per-class", type=int_range(2), default=512)
    g.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                   help="the kNN density's similarity matmul (bfloat16 where the hardware has bfloat16 units)")
    g.add_argument("--cl-stride", type=int_range(1), default=1, help="DACL sees a regular pixel grid with this stride")


def _fmt(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def make_config(task: Task, argv: Optional[Sequence[str]] = None) -> dict:
    """Flags over the preset over the engine's and the task's defaults."""
    p = build_parser(task)
    args = vars(p.parse_args(argv))
    preset, fallback = task.presets[args["preset"]], p.preset_fallback
    cfg = {**{k: v for k, v in task.defaults.items() if k not in args}, **preset}
    for k, v in args.items():
        cfg[k] = v if v is not None or k not in fallback else preset.get(k, fallback[k])
    given = _given(p, argv if argv is not None else sys.argv[1:])
    if cfg.get("table2_row"):  # the row's options, unless a flag of the command line sets them
        opts = table2_options(cfg["table2_row"])
        opts.update(ks=list(opts["ks"]), no_bank=not opts.pop("use_bank"))
        cfg.update({k: v for k, v in opts.items() if k not in given})
    if cfg.get("hypothesis"):  # the hypothesis's flags, unless the command line sets them
        for k, v in HYPOTHESES[cfg["hypothesis"]].items():
            if k == "steps_factor":
                if "steps" not in given:
                    cfg["steps"] = int(cfg["steps"] * v)
            elif k not in given:
                cfg[k] = v
    for key in ("val_volumes", "test_volumes"):
        cfg[key] = cfg[key] or None  # 0 = all
    if cfg["method"] == "sup":
        cfg["unlabeled_bs"] = 0
    if cfg["warmup_steps"] is None:
        cfg["warmup_steps"] = int(round(PAPER_WARMUP * cfg["steps"] / PAPER_STEPS))
    cfg["ckpt_every"] = cfg["ckpt_every"] or cfg["val_every"]
    cfg["commit"] = _commit()  # the code a run ran (config.json): a table's runs name theirs
    cfg["device"] = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.get("mechanism_every") and (not task.has_probe or cfg.get("dataset_dir")):
        p.error(f"argument --mechanism-every: the {task.name} example has a mechanism probe on its built-in "
                "ACDC data only" if task.has_probe else f"argument --mechanism-every: the {task.name} example has "
                "no mechanism probe (the ACDC example has one)")
    if cfg["method"] != "sup" and cfg["unlabeled_bs"] < 1:
        p.error(f"argument --unlabeled-bs: --method {cfg['method']} needs an unlabeled batch >= 1, got "
                f"{cfg['unlabeled_bs']}")
    try:  # the task's own checks of its values (ArgValueError): one line, as argparse's
        task.configure(cfg, args)
    except ArgValueError as e:
        p.error(str(e))
    return cfg


def _given(p: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """The destinations of the flags ``argv`` sets, as argparse reads them (aliases such as
    ``--iterations`` for ``--steps``, unique prefixes such as ``--lambda-c``)."""
    opts = p._option_string_actions
    out = set()
    for tok in argv:
        if not tok.startswith("--"):
            continue
        name = tok.split("=", 1)[0]
        if name in opts:
            out.add(opts[name].dest)
            continue
        matches = {opts[o].dest for o in opts if o.startswith(name)}
        if len(matches) == 1:
            out |= matches
    return out


def _commit() -> Optional[str]:
    """The checkout's commit (with ``+dirty`` for uncommitted changes), or None outside git."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def check_run_dir(run_dir: Path, resume: Optional[str], overwrite: bool) -> None:
    """Refuse a folder that holds an earlier run unless ``--resume`` or ``--overwrite`` says what
    to do with it; ``--overwrite`` deletes its outputs (TensorBoard would mix the two runs)."""
    earlier = [f for f in ("metrics.json", "last.pt") if (run_dir / f).exists()]
    if not earlier or resume:
        return
    if not overwrite:
        raise FileExistsError(f"{run_dir} already holds an earlier run ({', '.join(earlier)}); pass --resume to "
                              f"continue it, --overwrite to start over, or --output-dir for another folder")
    if _dist.is_main():
        for name in RUN_OUTPUTS + ("test_slices.png",):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)
    _dist.barrier()


# ----------------------------------------------------------------------------- state
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


def seed_all(seed: int, torch_offset: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed + torch_offset)


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1.0 - min(step, total) / total) ** power


class _Logits(NamedTuple):  # a tuple, so that DDP finds the output tensors
    logits_a: torch.Tensor
    logits_b: torch.Tensor


class LogitsPair(nn.Module):
    """The two networks without the projection heads (sup / cps), as one module for DDP."""

    def __init__(self, wrapper) -> None:
        super().__init__()
        self.model_a, self.model_b = wrapper.model_a, wrapper.model_b

    def forward(self, x: torch.Tensor) -> _Logits:  # the wrapper's hooks keep nothing outside its forward
        return _Logits(self.model_a(x), self.model_b(x))


def build_objective(cfg: dict, wrapper) -> DACLObjective:
    """Eq. 1 beyond L_sup: CPS (``cps``) or CPS + one DACL loss per model (``dacl``)."""
    return DACLObjective(
        num_classes=len(cfg["class_names"]), dim=cfg["embed_dim"], total_steps=cfg["steps"],
        lambda_cl=cfg["lambda_cl"], lambda_cross=cfg["lambda_cross"], warmup=cfg["warmup_steps"],
        contrastive=cfg["method"] == "dacl", pseudo_policy=cfg["pseudo_policy"],
        pseudo_confidence=cfg["pseudo_confidence"], pseudo_fraction=cfg["pseudo_fraction"],
        pixel_stride=cfg["cl_stride"], head_weight=cfg["head_weight"], heads=wrapper.heads,
        sparse_heads=not cfg["dense_heads"], ignore_index=-100,
        temperature=cfg["temperature"], ks=tuple(cfg["ks"]), num_anchors=cfg["num_anchors"],
        num_positives=cfg["num_positives"], num_negatives=cfg["num_negatives"], bank_size=cfg["bank_size"],
        bank_source=cfg["bank_source"], use_bank=not cfg["no_bank"], sampling=cfg["sampling"],
        weighting=cfg["weighting"], anchor_mode=cfg["anchor_mode"], reduction=cfg["reduction"],
        max_samples_per_class=cfg["max_samples_per_class"], threshold=cfg["mask_threshold"],
        precision=cfg.get("precision", "float32"), pseudo_agree=cfg.get("pseudo_agree", False),
        ramp_shape=cfg.get("ramp_shape", "gaussian"),
        validate=False, gather_distributed=_dist.is_dist())


# ----------------------------------------------------------------------------- the run
class Run:
    """Models, objective, optimiser, data and state of one run."""

    def __init__(self, task: Task, cfg: dict, run_dir: Path) -> None:
        self.task, self.cfg, self.run_dir = task, cfg, run_dir
        self.device = torch.device(cfg["device"])
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[cfg["amp"]]  # autocast dtype
        self.lbs = _dist.split_batch(cfg["labeled_bs"], "--labeled-bs")  # per rank
        self.ubs = _dist.split_batch(cfg["unlabeled_bs"], "--unlabeled-bs")
        seed_all(cfg["seed"])
        t0 = time.time()
        if _dist.is_dist() and not _dist.is_main():
            _dist.barrier()  # rank 0 first: it may download and prepare the data
        self.data = task.build_data(cfg, run_dir)
        if _dist.is_dist() and _dist.is_main():
            _dist.barrier()
        cfg["class_names"] = list(self.data.class_names)
        self.wrapper = task.build_model(cfg, self.data).to(self.device)
        self.load_seconds = time.time() - t0
        if task.reseed_after_model or _dist.is_dist():  # data and DACL sampling: per rank
            seed_all(_dist.rank_seed(cfg["seed"]), int(task.reseed_after_model))
        if _dist.is_dist() and task.find_unused_parameters and cfg["method"] == "dacl" and not cfg["dense_heads"]:
            raise SystemExit("error: DDP with find_unused_parameters=True cannot train the sparse projection heads "
                             "(they run outside DDP's forward); freeze the unused parameters or pass --dense-heads")
        self.net = _dist.wrap_ddp(self.wrapper if cfg["method"] == "dacl" else LogitsPair(self.wrapper), self.device,
                                  find_unused_parameters=task.find_unused_parameters)
        self.objective = build_objective(cfg, self.wrapper).to(self.device)
        self.shared_params = [p for n, p in self.wrapper.named_parameters() if not n.startswith("head_")]
        self.opt = torch.optim.SGD(self.wrapper.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                   weight_decay=cfg["weight_decay"], nesterov=cfg.get("nesterov", False))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg["amp"] == "fp16")
        self.step, self.best = 0, {"val_dice": -1.0, "step": None}
        self.history: List[dict] = []
        self.diagnostics: List[dict] = []  # DACL's per-class stats (and gradient share), every log step
        self.mechanism: List[dict] = []  # --mechanism-every: the probe's measurements
        self.probe = task.probe(cfg, self.data) if cfg.get("mechanism_every") and _dist.is_main() else None
        self.val_seconds = 0.0
        self.train_seconds = 0.0  # in training steps, over every process of the run (validation excluded)

    def state_dict(self) -> dict:
        """The checkpoint (every rank calls it under DDP: it gathers the per-rank states)."""
        own = {"rng": rng_state(), "data": getattr(self.data, "state_dict", lambda: None)()}
        return {"model": self.wrapper.state_dict(), "objective": self.objective.state_dict(),
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "best": self.best, "history": self.history, "diagnostics": self.diagnostics,
                "train_seconds": self.train_seconds, "mechanism": self.mechanism, **own,
                "config": self.cfg, **({"ranks": _dist.gather_objects(own)} if _dist.is_dist() else {})}

    def load_state_dict(self, ck: dict) -> None:
        self.wrapper.load_state_dict(ck["model"])
        self.objective.load_state_dict(ck["objective"])
        self.opt.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.step, self.best, self.history, self.diagnostics = ck["step"], ck["best"], ck["history"], ck["diagnostics"]
        self.mechanism = ck.get("mechanism", [])
        # (older checkpoints: the training time up to the last validation)
        last = (self.history[-1].get("train_seconds") or 0.0) if self.history else 0.0
        self.train_seconds = ck.get("train_seconds", last)
        ranks = ck.get("ranks") or [ck]
        if len(ranks) == _dist.world_size():  # each rank continues its own random streams
            set_rng_state(ranks[_dist.rank()]["rng"])
            getattr(self.data, "load_state_dict", lambda st: None)(ranks[_dist.rank()]["data"])
        else:
            warnings.warn(f"the checkpoint holds the random state of {len(ranks)} rank(s), not {_dist.world_size()}:"
                          " re-seeding, the run will not continue bit-exactly")
            torch.manual_seed(_dist.rank_seed(self.cfg["seed"]) + 1 + 7919 * self.step)
            getattr(self.data, "reseed", lambda seed, step: None)(_dist.rank_seed(self.cfg["seed"]), self.step)

    def save(self, name: str) -> None:
        state = self.state_dict()
        if _dist.is_main():
            save_atomic(state, self.run_dir / name)

    def resume(self, resume: Optional[str]) -> Optional[Path]:
        path = self.run_dir / "last.pt" if resume == "auto" else Path(resume) if resume else None
        if path is None or (resume == "auto" and not path.is_file()):
            return None  # a fresh run (--resume without a checkpoint: nothing to continue yet)
        if not path.is_file():
            raise FileNotFoundError(f"--resume: checkpoint {str(path)!r} does not exist")
        ck = torch.load(path, map_location=self.device, weights_only=False)
        changed = {k: (ck["config"].get(k), v) for k, v in self.cfg.items()
                   if k not in RUNTIME_KEYS and ck["config"].get(k) != v}
        if changed:
            warnings.warn(f"resuming with a configuration that differs from the checkpoint's: {changed}")
        self.load_state_dict(ck)
        if _dist.is_main():
            print(f"resumed from {path} at step {self.step}", flush=True)
        return path

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[Dict[str, float], Optional[dict]]:
        cfg, lbs = self.cfg, self.lbs
        fmt = getattr(self.wrapper, "example_memory_format", torch.contiguous_format)
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        y = y.to(self.device, non_blocking=True)
        lr = poly_lr(cfg["lr"], self.step, cfg["steps"], cfg["poly_power"])
        for grp in self.opt.param_groups:
            grp["lr"] = lr
        with record_function("step.forward"), \
                torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            out = self.net(x)
        with record_function("step.sup_loss"):
            la, lb = out.logits_a.float(), out.logits_b.float()
            l_sup = self.task.sup_loss(la[:lbs], y[:lbs]) + self.task.sup_loss(lb[:lbs], y[:lbs])
        loss, logs, diag, step = l_sup, {"sup": l_sup}, None, self.step + 1
        if cfg["method"] != "sup":
            if cfg["cross_rampup"]:  # a Gaussian ramp-up of lambda_cross (the 3D quick preset)
                self.objective.lambda_cross = gaussian_rampup(self.step, cfg["cross_rampup"],
                                                              max_weight=cfg["lambda_cross"], warmup_steps=0)
            labeled = torch.arange(x.shape[0], device=self.device) < lbs
            with record_function("step.objective"):
                emb = (out[2], out[3]) if cfg["method"] == "dacl" else (None, None)  # embeddings, or the features
                res = self.objective(la, lb, *emb, y, labeled)                        # of the sparse heads
            loss, logs["cross"] = loss + res.loss, res.cross
            if cfg["method"] == "dacl":
                logs["cl"] = res.cl_a + res.cl_b
                every = cfg["grad_share_every"]
                if step % cfg["log_every"] == 0 or step == cfg["steps"] or (every and step % every == 0):
                    diag = {"step": step, **DACLObjective.summarize(res.stats, cfg["class_names"])}
                if every and step % every == 0:
                    diag.update(gradient_share({"cl": res.cl_term, "sup": l_sup, "cross": res.cross_term},
                                               self.shared_params))
        lam = self.objective.lambda_cl
        self.opt.zero_grad(set_to_none=True)
        with record_function("step.backward"):
            self.scaler.scale(loss).backward()
        with record_function("step.optimizer"):
            self.scaler.step(self.opt)
            self.scaler.update()
        self.objective.step()
        self.step = step
        logs["loss"] = loss
        vals = {k: float(v.detach()) for k, v in logs.items()}
        vals = _dist.mean_scalars({**vals, "lambda_cl": lam, "lambda_cross": self.objective.lambda_cross, "lr": lr})
        if not all(math.isfinite(v) for v in vals.values()):
            raise FloatingPointError(f"non-finite loss at step {self.step}: {vals}")
        if diag is not None:
            self.diagnostics.append(diag)
        return vals, diag

    def measure_mechanism(self, writer) -> None:
        """Rank 0, ``--mechanism-every``: the probe's measurements of model a (nothing of the run
        changes), appended to ``mechanism.json`` and TensorBoard."""
        rec = {"step": self.step, "lambda_cl": self.objective.lambda_cl,
               **self.probe.measure(self.wrapper, self.cfg["temperature"], self.device)}
        self.mechanism.append(rec)
        for space in ("feature", "head"):
            for k in ("silhouette", "davies_bouldin", "tail_density_mean", "l_cl"):
                if k in rec[space]:
                    writer.add_scalar(f"mechanism/{space}_{k}", rec[space][k], self.step)
        tmp = self.run_dir / "mechanism.json.tmp"
        tmp.write_text(json.dumps({"what": "examples/probe.py measurements of model a every --mechanism-every steps",
                                   "config": {k: self.cfg.get(k) for k in ("method", "seed", "labeled",
                                                                           "table2_row", "hypothesis")},
                                   "records": self.mechanism}, indent=1, default=str))
        os.replace(tmp, self.run_dir / "mechanism.json")

    def validate(self, writer, bar, loss: float) -> None:
        """Rank 0: Dice on the val volumes; best.pt on an improvement."""
        t0, cfg = time.time(), self.cfg
        res, _ = self.task.evaluate(self.wrapper, self.data, "val", cfg, self.device, self.amp, full=False)
        dice = res.mean["dice"]
        writer.add_scalar("val/dice", dice, self.step)
        for cname, v in res.per_class["dice"].items():
            writer.add_scalar(f"val/dice_{cname}", v, self.step)
        self.history.append({"step": self.step, "mean_dice": dice, "per_class": res.per_class["dice"], "loss": loss,
                             "train_seconds": round(self.train_seconds, 3)})
        if dice > self.best["val_dice"]:
            self.best = {"val_dice": dice, "step": self.step}
            save_atomic({"model": self.wrapper.state_dict(), "config": cfg, "step": self.step, "val_dice": dice},
                        self.run_dir / "best.pt")
        bar.write(f"step {self.step}: val Dice {100 * dice:.2f} ({res.num_cases} volumes), "
                  f"best {100 * self.best['val_dice']:.2f} at step {self.best['step']}")
        self.val_seconds += time.time() - t0


def train(run: Run, stop_at: Optional[int]) -> None:
    """The loop (``run.train_seconds`` accumulates the time of its steps)."""
    from tqdm import tqdm

    cfg, main_rank = run.cfg, _dist.is_main()
    if main_rank:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run.run_dir / "tb"), purge_step=run.step or None)
    else:
        writer = _dist.NullWriter()
    last = min(cfg["steps"], stop_at) if stop_at else cfg["steps"]
    bar = tqdm(total=cfg["steps"], initial=run.step, desc=f"{cfg['method']} {cfg['preset']}", dynamic_ncols=True,
               disable=cfg["no_progress"] or not main_rank)
    run.wrapper.train()
    for x, y in run.data.batches(run.step, run.lbs, run.ubs) if run.step < last else ():
        t_step = time.time()
        vals, diag = run.train_step(x, y)
        run.train_seconds += time.time() - t_step  # training time without validation (the curves' x axis)
        step, final = run.step, run.step == cfg["steps"]
        for k, v in (diag or {}).items():  # DACL's per-class diagnostics (and gradient share)
            if k != "step":
                writer.add_scalar(f"dacl/{k}", v, step)
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in vals.items() if k in ("sup", "cross", "cl", "loss")}, refresh=False)
        if step % cfg["log_every"] == 0 or final:
            for k, v in vals.items():
                writer.add_scalar(f"train/{k}", v, step)
        if step % cfg["val_every"] == 0 or final:
            if main_rank:
                run.validate(writer, bar, vals["loss"])
            _dist.barrier()  # the other ranks wait for rank 0's validation
        if cfg.get("mechanism_every") and (step % cfg["mechanism_every"] == 0 or final) and main_rank:
            run.measure_mechanism(writer)
        if step % cfg["ckpt_every"] == 0 or step in (last, cfg["steps"]):
            run.save("last.pt")
        if step >= last:
            break
    bar.close()
    writer.close()
    _dist.barrier()  # last.pt is written before any rank returns


def main(task: Task, argv: Optional[Sequence[str]] = None) -> dict:
    """Train (or resume), validate, test the best checkpoint; returns the metrics record
    (``{"stopped_at": step}`` after ``--stop-at``)."""
    t_start = time.time()
    cfg = make_config(task, argv)
    run_dir = Path(cfg["output_dir"] or task.output_dir(cfg))
    check_run_dir(run_dir, cfg["resume"], cfg["overwrite"])
    if _dist.launched():  # torchrun: one process per rank (cuda:LOCAL_RANK or cpu)
        cfg["device"], cfg["world_size"] = str(_dist.setup(cfg["device"])), _dist.world_size()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        run = Run(task, cfg, run_dir)
        resumed = run.resume(cfg["resume"])
        run.command = " ".join(["python", *sys.argv]) if argv is None else f"main({list(argv)!r})"
        if _dist.is_main():
            (run_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
            print(startup_summary(run), flush=True)
        train(run, cfg["stop_at"])
        if run.step < cfg["steps"] or cfg["no_test"]:
            if _dist.is_main():
                (run_dir / "val_history.json").write_text(json.dumps(
                    {"history": run.history, "best": run.best, "train_seconds": round(run.train_seconds, 1),
                     "threads": torch.get_num_threads()}, indent=1, default=float))
                print(f"stopped at step {run.step} of {cfg['steps']}"
                      + ("" if run.step < cfg["steps"] else " before the test set (--no-test)")
                      + "; continue with --resume")
            return {"stopped_at": run.step}
        return test(run, resumed, t_start) if _dist.is_main() else {}
    finally:
        _dist.cleanup()


def startup_summary(run: Run) -> str:
    """What this run will do, printed before the progress bar (every setting is in config.json)."""
    cfg = run.cfg
    keys = ("steps", "labeled_bs", "unlabeled_bs", "lr", "lambda_cross") + tuple(run.task.summary_keys) + (
        ("lambda_cl", "warmup_steps", "pseudo_policy", "pseudo_confidence", "embed_dim", "ks", "no_bank",
         "bank_size", "sampling", "weighting", "anchor_mode") if cfg["method"] == "dacl" else ())
    threads = f", {torch.get_num_threads()} threads" if run.device.type == "cpu" else ""
    ddp = f", {_dist.world_size()} ranks ({run.lbs} + {run.ubs} per rank)" if _dist.is_dist() else ""
    return "\n".join([f"{run.task.name} {cfg['method']}, preset {cfg['preset']}, seed {cfg['seed']}",
                      f"  data    {run.data.summary}",
                      f"  device  {run.device}{threads}{ddp}, amp {cfg['amp']}",
                      "  config  " + ", ".join(f"{k} {_fmt(cfg[k])}" for k in keys if k in cfg),
                      f"  output  {run.run_dir} (config.json holds every setting)"])


def test(run: Run, resumed: Optional[Path], t_start: float) -> dict:
    """Rank 0: test the best checkpoint, write the pictures and metrics.json."""
    from torch.utils.tensorboard import SummaryWriter

    cfg, task = run.cfg, run.task
    best = run.run_dir / "best.pt"
    if best.is_file():
        run.wrapper.load_state_dict(torch.load(best, map_location=run.device, weights_only=False)["model"])
    t0 = time.time()
    res, kept = task.evaluate(run.wrapper, run.data, "test", cfg, run.device, run.amp, full=True,
                              keep=run.data.keep_for_plot)
    test_s = time.time() - t0
    print(format_table(res, f"{run.data.name} test"))
    slices = select_slices(kept)  # the slices with the most foreground, in every run the same
    save_slices(run.run_dir / "test_slices.npz", slices)
    if not cfg["no_plot"]:
        render([(f"{cfg['method']} prediction", slices)], run.run_dir / "test_predictions.png",
               class_names=cfg["class_names"])
    with SummaryWriter(log_dir=str(run.run_dir / "tb")) as writer:
        for m, v in res.mean.items():
            if v is not None:
                writer.add_scalar(f"test/{m}", v, run.step)
    rec = RunRecord(
        identity=Identity(dataset=run.data.kind, method=cfg["method"], preset=cfg["preset"], seed=cfg["seed"],
                          labeled=int(run.data.labeled), labeled_unit=run.data.labeled_unit, steps=run.step,
                          variant=cfg.get("table2_row")),
        config=json.loads(json.dumps(cfg, default=str)), test=res, diagnostics=run.diagnostics,
        val_history=[ValPoint(**h) for h in run.history],
        best=Best(step=run.best["step"], val_mean_dice=run.best["val_dice"]),
        # wall: this process; train: the training steps of every process of the run (resumes
        # included, validation excluded), as the validation history counts them
        timing=Timing(wall_seconds=round(time.time() - t_start, 1), train_seconds=round(run.train_seconds, 1),
                      per_step=run.train_seconds / max(1, run.step),
                      phases={"load": round(run.load_seconds, 1), "validation": round(run.val_seconds, 1),
                              "test": round(test_s, 1)}),
        environment=Environment(device=str(run.device), torch=torch.__version__, threads=torch.get_num_threads(),
                                world_size=_dist.world_size()),
        command=run.command,
        extra={"resumed_from": str(resumed) if resumed else None, "per_rank_batch": [run.lbs, run.ubs],
               **task.record_extra(cfg, run.data)})
    rec.save(run.run_dir / "metrics.json")
    print(f"test mean Dice {100 * res.mean['dice']:.2f}; run folder: {run.run_dir} (metrics.json, config.json, "
          f"best.pt, last.pt, tb/)")
    if cfg["preset"] == "smoke":
        print("smoke preset: a pipeline check, not a result (the networks learn little beyond background in so few "
              "steps); use --preset cpu (CPU) or --preset paper (GPU) for numbers")
    return rec.to_dict()


# ----------------------------------------------------------------------------- metrics
def case_metrics(pred: np.ndarray, gt: np.ndarray, num_classes: int, full: bool = True) -> Dict[str, Any]:
    """Per-class metrics of one volume (``pred``, ``gt``: label maps): ``{"dice": [c1, ...],
    "jaccard", "hd95", "asd": [...], "empty": n}`` (``dice`` and ``empty`` alone when not
    ``full``), in voxels. Empty masks: see the module docstring."""
    from medpy.metric import binary as mb

    diag = float(math.sqrt(sum(s * s for s in gt.shape)))
    res: Dict[str, Any] = {m: [] for m in (METRICS if full else ("dice",))}
    empty = 0
    for c in range(1, num_classes):
        p, g = pred == c, gt == c
        if p.any() and g.any():
            vals = {"dice": mb.dc(p, g)}
            if full:
                vals.update(jaccard=mb.jc(p, g), hd95=mb.hd95(p, g), asd=mb.asd(p, g))
        else:
            empty += 1
            both = not p.any() and not g.any()
            vals = dict(dice=float(both), jaccard=float(both), hd95=0.0 if both else diag, asd=0.0 if both else diag)
        for m in res:
            res[m].append(float(vals[m]))
    res["empty"] = empty
    return res


def test_result(class_names: Sequence[str], per_case: Dict[str, dict], evaluation: str) -> TestResult:
    """The record of :func:`case_metrics` per volume: means over the volumes, then over the classes."""
    empty = sum(c.pop("empty") for c in per_case.values())
    return TestResult.from_cases(list(class_names), per_case, empty_cases=empty, evaluation=evaluation,
                                 empty_convention=EMPTY_CONVENTION)


def format_table(res: TestResult, title: str) -> str:
    """Rows: the classes and their mean; columns: Dice, Jaccard (%), HD95, ASD."""
    names = [m for m in METRICS if res.mean.get(m) is not None]
    wc = max([6] + [len(c) + 1 for c in res.classes])
    head = f"{'class':<{wc}}" + "".join(f"{m:>10}" for m in names)
    scale = {"dice": 100.0, "jaccard": 100.0}
    rows = [f"{c:<{wc}}" + "".join(f"{res.per_class[m][c] * scale.get(m, 1.0):>10.2f}" for m in names)
            for c in res.classes]
    return "\n".join([f"{title}: {res.num_cases} volumes", head, "-" * len(head), *rows,
                      f"{'mean':<{wc}}" + "".join(f"{res.mean[m] * scale.get(m, 1.0):>10.2f}" for m in names),
                      "(Dice, Jaccard in %; HD95, ASD in voxels)"])


def cli(task: Task) -> None:
    """``if __name__ == "__main__"`` of a dataset script: a data error is one line, no traceback."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    from get_data import ArchiveError, DownloadError

    try:
        main(task)
    except (FileExistsError, DownloadError, ArchiveError, *task.data_error) as e:
        sys.exit(f"error: {e}")
