"""The folder of this module is what ``nnUNet_extTrainer`` points at (``python -m
torch_dacl.nnunet`` prints it): nnU-Net imports every module here and finds the trainers by name."""

from torch_dacl.nnunet import (nnUNetTrainerDACL, nnUNetTrainerDACL_5epochs, nnUNetTrainerDACL_10epochs,  # noqa: F401
                               nnUNetTrainerDACL_20epochs)
