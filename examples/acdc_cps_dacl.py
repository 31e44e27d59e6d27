"""Semi-supervised cardiac segmentation on ACDC: supervised baseline, CPS, and CPS + DACL.

Protocol (see docs: Design decisions, 4): SSL4MIS split; labeled = the first 68 (3 patients) or 136
(7 patients) lines of ``train_slices.list``, the rest unlabeled; two smp U-Nets trained by
cross pseudo supervision (CPS); DACL adds one :class:`SoftDensityContrastiveLoss` per model
(two memory banks) weighted by the Gaussian ramp-up of Eq. 1; SGD + poly decay; best
checkpoint by mean val Dice; test on the test volumes slice by slice with 3D Dice, Jaccard,
HD95 and ASD (see ``evaluate_acdc.py``). The loop, checkpoints, resume, DDP and the metrics
record are the shared engine's (``engine.py``); this script holds ACDC's data, model,
evaluation and presets.

Your own data: ``--dataset-dir <nnU-Net raw folder>`` trains on it instead of ACDC (2D
images, or 3D volumes cut into slices along ``--slice-axis``); classes, input channels,
split (``--split``, ``--labeled`` count or fraction) from the folder (``nnunet_data.py``,
docs/tutorials/own_data.rst).

Loss: ``L = L_sup(a) + L_sup(b) + lambda_cross * L_cross + lambda_CL(t) * (L_CL(a) + L_CL(b))``
with ``L_sup = CE + Dice`` (smp's ``DiceLoss``) on the labeled half of the batch; everything
after ``L_sup`` is the library's :class:`torch_dacl.DACLObjective`: labels of model a's DACL
term are the ground truth on the labeled half and, on the unlabeled half, model b's
confident argmax (``--pseudo-policy``, ``--pseudo-confidence``), else ignored; symmetric for
model b.

Examples::

    python examples/acdc_cps_dacl.py --preset smoke                 # a pipeline check (see the README)
    python examples/acdc_cps_dacl.py --preset cpu --method cps      # 40-55 min on one CPU thread
    python examples/acdc_cps_dacl.py --preset paper --device cuda   # the paper's protocol
    torchrun --standalone --nproc_per_node=4 examples/acdc_cps_dacl.py --preset paper  # DDP, 4 GPUs
    python examples/acdc_cps_dacl.py --preset cpu --table2-row III    # Table 2's rows II-VI by name
    # (the individual flags: --sampling, --ks, --no-bank, --weighting); Table 3: --anchor-mode class

Distributed: see ``engine.py`` and docs/distributed.rst; the preset's batch sizes stay the
global batch (``--labeled-bs`` and ``--unlabeled-bs`` must be multiples of the number of
processes); CPU/gloo runs keep per-rank BatchNorm (torch has no CPU SyncBatchNorm).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads)
import _dist  # noqa: E402
from _cli import ArgValueError, int_range  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from acdc_data import (CLASS_NAMES, LABELED_SLICES, ACDCDataError, ACDCSlices, TwoStreamBatchSampler,  # noqa: E402
                       evenly_spaced, find_acdc_dir, read_list, resolve_data_root)
from acdc_model import build_wrapper  # noqa: E402
import evaluate_acdc  # noqa: E402
import nnunet_data  # noqa: E402

# Everything a preset sets can be overridden by the flag of the same name.
PRESETS: Dict[str, dict] = {
    # end to end in about a minute on 2 CPU cores: tiny input, a handful of steps,
    # val on 2 volumes, test on 3 volumes. A pipeline check, not a result: after 30 steps
    # the nets still predict background only (test Dice 0).
    "smoke": dict(size=64, labeled_bs=2, unlabeled_bs=2, steps=30, encoder="tu-regnetx_002",
                  decoder_channels=[64, 32, 16, 16], embed_dim=32, val_every=15, val_volumes=2,
                  test_volumes=3, workers=0, amp="none", max_samples_per_class=512, cl_stride=2),
    # the CPU preset, chosen on the validation split only (benchmarks/results/recipe/): MONAI's plain
    # U-Net (SSL4MIS widths, 1.9M parameters), slices resized to 256 and trained on random 128x128
    # windows (inference on whole slices), batch 4 + 4, 3000 steps. Supervised at 7 patients, one
    # thread: val Dice 79.4 % at step 2000, where the same recipe with the RegNetX-200MF U-Net of
    # the former quick preset reached 53.6 % after 4000 steps. sup and CPS val curves peak at step
    # 2000 and end 2 points lower at 3000 (the best val checkpoint is tested). One thread beside
    # another run: sup 20-30, CPS 40-55, DACL 50-65 training minutes. DACL's settings from a
    # one-seed sweep on validation (benchmarks/results/sweep/): lambda_CL 0.1 (mean) with the
    # class_prior pseudo labels, best val Dice 81.4 %, against 79.9 % (fixed 0.95), 80.1 %
    # (lambda 1.0, fixed) and 79.0 % (lambda 1.0, class_prior).
    "cpu": dict(size=256, crop=128, labeled_bs=4, unlabeled_bs=4, steps=3000, encoder="basicunet",
                decoder_channels=[16], embed_dim=32, val_every=500, val_volumes=10, test_volumes=None, workers=0,
                amp="none", max_samples_per_class=512, cl_stride=2, pseudo_policy="class_prior"),
    # the paper's protocol (GPU): 256x256, batch 12 + 12, 30k steps, val on all 20 volumes
    "paper": dict(size=256, labeled_bs=12, unlabeled_bs=12, steps=30000, encoder="resnet18",
                  decoder_channels=[256, 128, 64, 32, 16], embed_dim=64, val_every=200, val_volumes=None,
                  test_volumes=None, workers=4, amp="bf16", max_samples_per_class=512, cl_stride=1),
}


class ACDCSliceData:
    """The training slices (two streams), the val / test volumes: ACDC, or an nnU-Net folder."""

    def __init__(self, cfg: dict, run_dir: Path) -> None:
        self.cfg = cfg
        if cfg["dataset_dir"]:  # an nnU-Net raw folder: classes, channels, split and slices from it
            self.source = prep = nnunet_data.open_2d(cfg, run_dir)
            self.train, n_lab, test = prep.train_slices, prep.train_slices.n_labeled, prep.split["test"]
            self.class_names, self.name, self.kind, self.labeled_unit = prep.class_names, prep.info.name, "nnunet", "cases"
            self.labeled, n_val = len(prep.split["labeled"]), len(prep.split["val"])
        else:
            self.source = acdc = find_acdc_dir(resolve_data_root(cfg["data_root"], download=not cfg["no_download"]))
            cfg["acdc_dir"] = str(acdc)  # (config.json: where the data came from)
            slices, n_val = read_list(acdc, "train_slices.list"), len(read_list(acdc, "val.list"))
            test, n_lab = read_list(acdc, "test.list"), cfg["labeled_slices"]
            if len(slices) <= n_lab:
                raise ACDCDataError(f"{str(acdc / 'train_slices.list')!r} has {len(slices)} lines; "
                                    f"{n_lab} labeled slices plus unlabeled ones are needed")
            self.train = ACDCSlices(acdc, cfg["size"], augment=True, cases=slices, crop=cfg["crop"])
            self.class_names, self.name, self.kind = ["background", *CLASS_NAMES], "ACDC", "acdc"
            self.labeled, self.labeled_unit = cfg["labeled"], "patients"
        self.n_lab, self.n_test = n_lab, len(test)
        self.keep_for_plot = evenly_spaced(evenly_spaced(test, cfg["test_volumes"]) if cfg["test_volumes"] else test, 4)
        of = lambda limit, n: f"{limit} of {n}" if limit else f"all {n}"  # noqa: E731
        self.summary = (f"{self.source if self.kind == 'acdc' else cfg['dataset_dir']}: {n_lab} labeled + "
                        f"{len(self.train) - n_lab} unlabeled training slices"
                        + (f" ({cfg['labeled']} labeled patients)" if self.kind == "acdc" else "")
                        + f"; validation on {of(cfg['val_volumes'], n_val)} val volumes, test on "
                        f"{of(cfg['test_volumes'], self.n_test)} test volumes")

    def batches(self, start_step: int, lbs: int, ubs: int):
        cfg = self.cfg  # the sampler splits the global batch over the ranks itself
        sampler = TwoStreamBatchSampler(range(self.n_lab), range(self.n_lab, len(self.train)), cfg["labeled_bs"],
                                        cfg["unlabeled_bs"], num_steps=cfg["steps"], seed=cfg["seed"],
                                        start_step=start_step, rank=_dist.rank(), world_size=_dist.world_size())
        # its own generator: creating the iterator must not draw from the global RNG, or a resumed
        # run would diverge (the data order is the sampler's)
        loader = torch.utils.data.DataLoader(self.train, batch_sampler=sampler, num_workers=cfg["workers"],
                                             pin_memory=cfg["device"].startswith("cuda"),
                                             generator=torch.Generator().manual_seed(cfg["seed"]))
        return ((b["image"], b["label"]) for b in loader)


class ACDC(engine.Task):
    name, doc, presets = "acdc", __doc__, PRESETS
    paper_labeled, labeled_default = tuple(sorted(LABELED_SLICES)), 7
    summary_keys = ("size", "crop", "encoder")
    data_error = (ACDCDataError, nnunet_data.NnUNetDataError)

    def add_arguments(self, g) -> None:
        g.add_argument("--slice-axis", type=int, choices=(0, 1, 2), default=None,
                       help="--dataset-dir with 3D volumes: the voxel axis to cut slices along (default: the "
                            "coarsest-spacing axis)")
        g.add_argument("--workers", type=int_range(0), default=0, help="DataLoader worker processes")
        g.add_argument("--size", type=int_range(16), default=256,
                       help="input side, at least 16 (slices are resized to size x size)")
        g.add_argument("--crop", type=int_range(16), default=None,
                       help="train on random crop x crop windows of the resized slices, 16 to --size (inference sees "
                            "whole slices)")
        g.add_argument("--encoder", default="resnet18",
                       help="smp encoder name (random init), or basicunet for MONAI's plain U-Net")
        g.add_argument("--decoder-channels", type=int_range(1), nargs="+", default=[256, 128, 64, 32, 16])

    def configure(self, cfg: dict, args: dict) -> None:
        if not cfg["dataset_dir"]:
            cfg["labeled"] = cfg["labeled"] or self.labeled_default
            if cfg["labeled"] not in LABELED_SLICES:
                raise ArgValueError(f"argument --labeled: on ACDC the paper's {' or '.join(map(str, self.paper_labeled))}"
                                    f" patients, got {cfg['labeled']}")
            cfg["labeled_slices"] = LABELED_SLICES[cfg["labeled"]]
        if cfg["crop"] is not None and cfg["crop"] > cfg["size"]:
            raise ArgValueError(f"argument --crop: at most --size ({cfg['size']}), got {cfg['crop']}")

    def build_data(self, cfg: dict, run_dir: Path) -> ACDCSliceData:
        return ACDCSliceData(cfg, run_dir)

    def build_model(self, cfg: dict, data):
        return build_wrapper(cfg)

    def sup_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "dice"):
            import segmentation_models_pytorch as smp

            self.dice = smp.losses.DiceLoss(mode="multiclass", from_logits=True)
        return F.cross_entropy(logits, labels) + self.dice(logits, labels)

    def evaluate(self, wrapper, data, split, cfg, device, amp, full, keep=()):
        return evaluate_acdc.evaluate(wrapper, data.source, split, cfg["size"], device, which=cfg["eval_model"],
                                      limit=cfg[f"{split}_volumes"], full=full, amp_dtype=amp,
                                      keep_predictions=keep, progress=full and not cfg["no_progress"])

    has_probe = True

    def probe(self, cfg: dict, data):
        """The mechanism probe: ``--probe-pixels`` pixels per class from 24 evenly spaced
        validation slices with foreground of ACDC's val split (the built-in data only)."""
        from acdc_data import ACDCVolumes, resize_image
        from probe import MechanismProbe, probe_slices

        if data.kind != "acdc":
            return None
        images, labels = probe_slices(ACDCVolumes(data.source, "val"), cfg["size"], 24,
                                      lambda img, lab, size: resize_image(img, lab, size))
        return MechanismProbe(images, labels, cfg["probe_pixels"], len(data.class_names), data.class_names)

    def record_extra(self, cfg: dict, data) -> dict:
        return {"labeled_slices": data.n_lab, "test_volumes_in_split": data.n_test,
                "reduced_evaluation": bool(cfg["val_volumes"] or cfg["test_volumes"]),
                **({"dataset_dir": str(cfg["dataset_dir"]), "nnunet": cfg["nnunet"]} if cfg["dataset_dir"] else {})}


TASK = ACDC()


def build_parser():
    return engine.build_parser(TASK)


def make_config(argv: Optional[List[str]] = None) -> dict:
    return engine.make_config(TASK, argv)


def main(argv: Optional[List[str]] = None) -> dict:
    return engine.main(TASK, argv)


if __name__ == "__main__":
    engine.cli(TASK)
