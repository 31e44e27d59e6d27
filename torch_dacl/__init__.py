"""torch-dacl: Density-Aware Contrastive Learning (DACL, AAAI 2025) for PyTorch.

Standalone modules on a pure functional core (:mod:`torch_dacl.functional`) that add the
DACL term to an existing semi-supervised segmentation loop, for 2D ``(N, C, H, W)`` and 3D
``(N, C, D, H, W)`` data.
"""

from . import distributed, functional
from .bank import ClassMemoryBank
from .cotraining import CoTrainingOutput, CoTrainingWrapper, ProjectionHead, SegmentationWithEmbeddings, scale_gradient
from .functional import cross_pseudo_supervision_loss, dacl_labels, sample_pixels_per_class
from .loss import DACLDetails, SoftDensityContrastiveLoss
from .modules import GaussianRampUp, MaskedAveragePool, MultiScaleDensity
from .objective import DACLObjective, DACLObjectiveOutput, gradient_share

__version__ = "0.1.0"

__all__ = [
    "ClassMemoryBank",
    "CoTrainingOutput",
    "CoTrainingWrapper",
    "DACLDetails",
    "DACLObjective",
    "DACLObjectiveOutput",
    "GaussianRampUp",
    "MaskedAveragePool",
    "MultiScaleDensity",
    "ProjectionHead",
    "SegmentationWithEmbeddings",
    "SoftDensityContrastiveLoss",
    "cross_pseudo_supervision_loss",
    "dacl_labels",
    "gradient_share",
    "distributed",
    "functional",
    "sample_pixels_per_class",
    "scale_gradient",
    "__version__",
]
