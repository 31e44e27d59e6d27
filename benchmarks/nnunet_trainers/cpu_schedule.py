"""Short nnU-Net schedules for ``benchmarks/nnunet_chaos.py``: nnU-Net's default trainer and
``nnUNetTrainerDACL`` with the same, CPU-sized run length and everything else unchanged.

nnU-Net's own ``nnUNetTrainer_5epochs`` still runs 250 iterations per epoch and 50 validation
iterations; a 3D U-Net step at CHAOS-T2's 5 mm plans (patch 40 x 64 x 64, batch 2) takes
several seconds on one CPU core, so even 5 of those epochs do not fit a session here. The
pairs below shorten the epochs instead, identically for both trainers. This folder goes into
``nnUNet_extTrainer`` beside the library's (``benchmarks/nnunet_chaos.py`` sets it).
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from torch_dacl.nnunet import nnUNetTrainerDACL

# name: (epochs, iterations per epoch, validation iterations per epoch)
SCHEDULES = {"10x25": (10, 25, 5)}


def _shorten(trainer, schedule: str) -> None:
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = SCHEDULES[schedule]


class nnUNetTrainer_10x25(nnUNetTrainer):
    """nnU-Net's default trainer for 10 epochs of 25 iterations (5 validation iterations)."""

    # nnU-Net records its trainers' __init__ arguments by name: the signature must be spelled out
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _shorten(self, "10x25")


class nnUNetTrainerDACL_10x25(nnUNetTrainerDACL):
    """``nnUNetTrainerDACL`` for 10 epochs of 25 iterations (5 validation iterations)."""

    # nnU-Net records its trainers' __init__ arguments by name: the signature must be spelled out
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _shorten(self, "10x25")
