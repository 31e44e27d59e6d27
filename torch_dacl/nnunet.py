r"""DACL inside nnU-Net v2: :class:`nnUNetTrainerDACL`, a trainer nnU-Net's own commands run.

Needs the ``nnunet`` extra (``pip install "torch-dacl[nnunet]"``: ``nnunetv2>=2.8``, the first
release that loads trainers from outside its package). nnU-Net finds the trainer through its
``nnUNet_extTrainer`` environment variable, a folder this package ships with one module in it
(:func:`trainer_folder`; ``python -m torch_dacl.nnunet`` prints it)::

    export nnUNet_extTrainer=$(python -m torch_dacl.nnunet)
    nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres --verify_dataset_integrity
    nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerDACL
    nnUNetv2_predict -i imagesTs -o predictions -d 501 -c 3d_fullres -f 0 -tr nnUNetTrainerDACL

What the trainer adds to nnU-Net's default one (everything else, planning, preprocessing,
augmentation, deep supervision, the poly learning rate, folds, inference, stays nnU-Net's):

* a :class:`~torch_dacl.ProjectionHead` reading the decoder's highest-resolution stage
  (``decoder.stages[-1]`` of nnU-Net's U-Nets, by a forward hook; the network itself is
  unchanged, so its checkpoints predict as nnU-Net's do);
* the :class:`~torch_dacl.SoftDensityContrastiveLoss` of every training patch with its
  ground truth at full resolution (nnU-Net's ignore label, where the dataset has one, is
  ignored), the head run at the sampled voxels only (the sparse head, docs: Design
  decisions 3.8), added to nnU-Net's loss with :math:`\lambda_{CL}(t)` of Eq. 1 over the run's
  iterations (:class:`~torch_dacl.GaussianRampUp`, warm-up 1/30 of the run as in the paper);
* the head's parameters in nnU-Net's optimizer (its own learning rate schedule);
* the memory bank, the loss's random stream, the schedule and the head in nnU-Net's
  checkpoints, so ``nnUNetv2_train ... --c`` continues with them as they were (nnU-Net's own
  data loading restarts its random streams on a resume, as it does for its own trainer);
* the DACL loss, :math:`\lambda_{CL}`, the anchors and the bank fill per epoch in nnU-Net's
  log (``training_log_*.txt``).

One process only (``nnUNetv2_train`` without several GPUs), and never compiled (its hook stays
on the plain module). It is fully supervised (the DACL term on labelled patches): nnU-Net's data loading serves
labelled cases only (preprocessing and the loader need a segmentation for every case; see
docs: DACL in nnU-Net for what a semi-supervised variant would need). Change the settings by
subclassing (the class attributes below), in a module of your own in ``nnUNet_extTrainer``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

try:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
except ImportError as e:  # pragma: no cover - the optional extra
    raise ImportError("torch_dacl.nnunet needs nnU-Net v2 (>= 2.8): pip install 'torch-dacl[nnunet]'") from e

from .checkpoint import save_atomic
from .cotraining import ProjectionHead
from .loss import SoftDensityContrastiveLoss
from .modules import GaussianRampUp

__all__ = ["nnUNetTrainerDACL", "nnUNetTrainerDACL_5epochs", "nnUNetTrainerDACL_10epochs",
           "nnUNetTrainerDACL_20epochs", "trainer_folder"]


def trainer_folder() -> Path:
    """The folder to put in ``nnUNet_extTrainer``: it holds one module that imports the trainers
    of this package (nnU-Net imports every module of that folder)."""
    return Path(__file__).resolve().parent / "nnunet_trainers"


def _bare(network: torch.nn.Module) -> torch.nn.Module:
    """The network under nnU-Net's DDP and ``torch.compile`` wrappers."""
    net = getattr(network, "module", network)
    return getattr(net, "_orig_mod", net)


class nnUNetTrainerDACL(nnUNetTrainer):
    """nnU-Net's trainer plus the DACL term (see the module docstring).

    Class attributes (subclass to change them):

    * ``dacl_lambda`` (0.1): the peak of :math:`\\lambda_{CL}(t)` (Eq. 1);
    * ``dacl_warmup`` (1/30): the warm-up, a fraction of the run's iterations (the paper's
      1,000 of 30,000);
    * ``dacl_embed_dim`` (64): the head's output dimension ``D``;
    * ``dacl_loss_options``: keywords of :class:`~torch_dacl.SoftDensityContrastiveLoss`
      (the paper's defaults when empty).
    """

    dacl_lambda: float = 0.1
    dacl_warmup: float = 1 / 30
    dacl_embed_dim: int = 64
    dacl_loss_options: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.dacl_head: Optional[ProjectionHead] = None
        self.dacl_loss: Optional[SoftDensityContrastiveLoss] = None
        self.dacl_ramp: Optional[GaussianRampUp] = None
        self._dacl_feature: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ set-up
    def configure_optimizers(self):
        """nnU-Net's optimizer and schedule, with the projection head's parameters added; the
        head, its hook, the loss and the schedule are built here (after the network)."""
        if self.label_manager.has_regions:
            raise ValueError("nnUNetTrainerDACL: region-based training has no class per voxel for DACL's labels")
        if self.is_ddp:  # the head sits outside nnU-Net's DDP wrapper, the bank would be per rank
            raise ValueError("nnUNetTrainerDACL: one process only for now (nnUNetv2_train without -num_gpus > 1)")
        stage = _bare(self.network).decoder.stages[-1]
        channels = int(getattr(stage, "output_channels", 0)) or self._probe_channels(stage)
        spatial_dims = len(self.configuration_manager.patch_size)
        self.dacl_head = ProjectionHead(channels, self.dacl_embed_dim, spatial_dims=spatial_dims).to(self.device)
        stage.register_forward_hook(self._capture)
        ignore = self.label_manager.ignore_label
        self.dacl_loss = SoftDensityContrastiveLoss(
            self.label_manager.num_segmentation_heads, self.dacl_embed_dim,
            ignore_index=ignore if ignore is not None else -100, validate=False,
            **self.dacl_loss_options).to(self.device)
        self.dacl_ramp = GaussianRampUp(total_steps=self.num_epochs * self.num_iterations_per_epoch,
                                        max_weight=self.dacl_lambda, warmup_steps=self.dacl_warmup)
        optimizer, lr_scheduler = super().configure_optimizers()
        optimizer.add_param_group({"params": list(self.dacl_head.parameters())})
        self.print_to_log_file(f"DACL: projection head on decoder.stages[-1] ({channels} channels -> "
                               f"{self.dacl_embed_dim}), lambda_CL {self.dacl_lambda} (warm-up "
                               f"{self.dacl_ramp.warmup_steps} of {self.dacl_ramp.total_steps} iterations), "
                               f"{self.dacl_loss}")
        return optimizer, lr_scheduler

    def _do_i_compile(self) -> bool:
        """Never ``torch.compile`` (nnU-Net compiles on CUDA by default): the forward hook that
        hands the decoder features to DACL stays on the plain module."""
        return False

    def _probe_channels(self, stage) -> int:
        out = {}
        handle = stage.register_forward_hook(lambda m, i, o: out.__setitem__("c", o.shape[1]))
        try:
            with torch.no_grad():
                x = torch.zeros(1, self.num_input_channels, *self.configuration_manager.patch_size, device=self.device)
                self.network(x)
        finally:
            handle.remove()
        return int(out["c"])

    def _capture(self, module, inputs, output) -> None:
        if self.network.training:
            self._dacl_feature = output

    # ------------------------------------------------------------------ training
    def train_step(self, batch: dict) -> dict:
        """nnU-Net's training step with the DACL term added to its loss."""
        from nnunetv2.utilities.helpers import dummy_context
        from torch import autocast

        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        full = target[0] if isinstance(target, list) else target  # (B, 1, *patch): the highest resolution
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            l_seg = self.loss(output, target)
        features, self._dacl_feature = self._dacl_feature, None
        l_cl = self.dacl_loss(features, full[:, 0].long(), head=self.dacl_head, return_details=True)
        lam = self.dacl_ramp.value
        loss = l_seg + lam * l_cl.loss
        params = [*self.network.parameters(), *self.dacl_head.parameters()]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.optimizer.step()
        self.dacl_ramp.step()
        return {"loss": loss.detach().cpu().numpy(), "dacl_loss": l_cl.loss.detach().cpu().numpy(),
                "dacl_anchors": l_cl.anchor_valid.sum().detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        if self.local_rank == 0:
            cl = float(np.mean([o["dacl_loss"] for o in train_outputs]))
            anchors = float(np.mean([o["dacl_anchors"] for o in train_outputs]))
            self.print_to_log_file(f"dacl_loss {cl:.4f}, lambda_CL {self.dacl_ramp.value:.4f}, anchors per step "
                                   f"{anchors:.0f}, bank fill {self.dacl_loss.bank.count.tolist()}")

    # ------------------------------------------------------------------ checkpoints
    def _dacl_state(self) -> dict:
        return {"head": self.dacl_head.state_dict(), "loss": self.dacl_loss.state_dict(),
                "ramp": self.dacl_ramp.state_dict()}

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint with the head, the memory bank, the loss's random stream and the
        schedule under ``"dacl"`` (its network weights alone predict, as nnU-Net's do). nnU-Net
        writes its part to a temporary file; ``filename`` is replaced once, atomically, with both
        (a run stopped in between keeps the previous checkpoint whole)."""
        if self.dacl_head is None:
            return super().save_checkpoint(filename)
        tmp = f"{filename}.nnunet.tmp"
        super().save_checkpoint(tmp)
        if self.local_rank == 0 and not self.disable_checkpointing:
            checkpoint = torch.load(tmp, map_location="cpu", weights_only=False)
            checkpoint["dacl"] = self._dacl_state()
            save_atomic(checkpoint, filename)
            os.remove(tmp)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's ``load_checkpoint`` (``--c``, ``--val``), then the DACL state saved beside."""
        if isinstance(filename_or_checkpoint, dict):  # nnU-Net 2.8 reads a checkpoint from a file only
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "checkpoint.pth")
                torch.save(filename_or_checkpoint, path)
                return self.load_checkpoint(path)
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False)
        if "dacl" in checkpoint:
            self.dacl_head.load_state_dict(checkpoint["dacl"]["head"])
            self.dacl_loss.load_state_dict(checkpoint["dacl"]["loss"])
            self.dacl_ramp.load_state_dict(checkpoint["dacl"]["ramp"])
        else:
            import warnings

            warnings.warn(f"{filename_or_checkpoint}: no DACL state in this checkpoint (one of nnU-Net's own "
                          "trainers?); the projection head, memory bank and lambda_CL schedule start afresh")


class nnUNetTrainerDACL_5epochs(nnUNetTrainerDACL):
    """:class:`nnUNetTrainerDACL` for 5 epochs, beside nnU-Net's ``nnUNetTrainer_5epochs``."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class nnUNetTrainerDACL_10epochs(nnUNetTrainerDACL):
    """:class:`nnUNetTrainerDACL` for 10 epochs, beside nnU-Net's ``nnUNetTrainer_10epochs``."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 10


class nnUNetTrainerDACL_20epochs(nnUNetTrainerDACL):
    """:class:`nnUNetTrainerDACL` for 20 epochs, beside nnU-Net's ``nnUNetTrainer_20epochs``."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 20


def main(argv=None) -> None:
    """``python -m torch_dacl.nnunet``: print the folder for ``nnUNet_extTrainer``."""
    print(trainer_folder())


if __name__ == "__main__":
    main(sys.argv[1:])
