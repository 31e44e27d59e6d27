"""torch-dacl: Density-Aware Contrastive Learning (DACL, AAAI 2025) for PyTorch.

Standalone modules on a pure functional core (:mod:`torch_dacl.functional`) that add the
DACL term to an existing semi-supervised segmentation loop, for 2D ``(N, C, H, W)`` and 3D
``(N, C, D, H, W)`` data.

Public API (everything importable from ``torch_dacl``; the submodules are implementation):

- ``SoftDensityContrastiveLoss``: the DACL loss, Eq. 2-10 end to end, with its memory bank.
- ``DACLObjective``: everything of Eq. 1 beyond the supervised loss (CPS, two DACL losses,
  the ramp-up, the pseudo labels); ``dacl_labels``, ``gradient_share``.
- ``ClassMemoryBank``, ``MultiScaleDensity``, ``MaskedAveragePool``, ``GaussianRampUp``:
  the building blocks (memory bank, Eq. 3-5, Eq. 2, Eq. 1's lambda_CL(t)).
- ``CoTrainingWrapper``, ``SegmentationWithEmbeddings``, ``ProjectionHead``,
  ``cross_pseudo_supervision_loss``: two networks with projection heads, L_cross;
  ``feature_layers`` lists the layers a head can read; ``save_checkpoint`` /
  ``load_checkpoint`` keep the state of a loop (heads, objective, optimizers).
- ``torch_dacl.stages``: the stages the loss is composed of (pixel sampler, anchor/key
  miner, the Eq. 9-10 term, the bank policy, the random stream); ``torch_dacl.ablation``:
  Table 2's rows (``TABLE2``, ``table2_options``, ``SoftDensityContrastiveLoss.from_table2``);
  ``torch_dacl.options``: the vocabulary of option names.
- ``torch_dacl.functional``: the math as pure functions; ``torch_dacl.distributed``: the
  DDP helpers.

Documentation: the ``docs/`` folder of the repository (build it with
``python -m sphinx -b html docs docs/_build/html``): a paper-to-code map of every equation,
the design decisions the paper leaves open, tutorials and the API reference.
"""

from . import ablation, distributed, functional, options, stages
from .ablation import TABLE2, table2_options
from .bank import ClassMemoryBank
from .checkpoint import load_checkpoint, save_checkpoint
from .cotraining import (CoTrainingFeatures, CoTrainingOutput, CoTrainingWrapper, FeatureLayer, ProjectionHead,
                         SegmentationWithEmbeddings, feature_layers, scale_gradient)
from .functional import cross_pseudo_supervision_loss, dacl_labels, sample_pixels_per_class
from .loss import DACLDetails, SoftDensityContrastiveLoss
from .modules import GaussianRampUp, MaskedAveragePool, MultiScaleDensity
from .objective import DACLObjective, DACLObjectiveOutput, gradient_share

__version__ = "0.1.0"

__all__ = [
    "ClassMemoryBank",
    "CoTrainingFeatures",
    "CoTrainingOutput",
    "CoTrainingWrapper",
    "DACLDetails",
    "DACLObjective",
    "DACLObjectiveOutput",
    "FeatureLayer",
    "GaussianRampUp",
    "MaskedAveragePool",
    "MultiScaleDensity",
    "ProjectionHead",
    "SegmentationWithEmbeddings",
    "SoftDensityContrastiveLoss",
    "cross_pseudo_supervision_loss",
    "dacl_labels",
    "feature_layers",
    "gradient_share",
    "load_checkpoint",
    "save_checkpoint",
    "TABLE2",
    "ablation",
    "distributed",
    "functional",
    "options",
    "stages",
    "table2_options",
    "sample_pixels_per_class",
    "scale_gradient",
    "__version__",
]
