"""torch-dacl: Density-Aware Contrastive Learning (DACL, AAAI 2025) for PyTorch.

Standalone modules on a pure functional core (:mod:`torch_dacl.functional`) that add the
DACL term to an existing semi-supervised segmentation loop, for 2D ``(N, C, H, W)`` and 3D
``(N, C, D, H, W)`` data.
"""

from . import distributed, functional
from .bank import ClassMemoryBank
from .cotraining import CoTrainingOutput, CoTrainingWrapper, ProjectionHead
from .functional import cross_pseudo_supervision_loss, sample_pixels_per_class
from .loss import DACLDetails, SoftDensityContrastiveLoss
from .modules import GaussianRampUp, MaskedAveragePool, MultiScaleDensity

__version__ = "0.1.0"

__all__ = [
    "ClassMemoryBank",
    "CoTrainingOutput",
    "CoTrainingWrapper",
    "DACLDetails",
    "GaussianRampUp",
    "MaskedAveragePool",
    "MultiScaleDensity",
    "ProjectionHead",
    "SoftDensityContrastiveLoss",
    "cross_pseudo_supervision_loss",
    "distributed",
    "functional",
    "sample_pixels_per_class",
    "__version__",
]
