r"""The vocabulary of options: every named choice of the library, in one place.

Each choice is a :data:`typing.Literal` (for type checkers and the API reference) and a tuple
of its values (for run-time checks). Every constructor and function checks its option names
through :func:`look_up_option`, which suggests the nearest valid name:

>>> from torch_dacl.options import look_up_option, WEIGHTINGS
>>> look_up_option("weighting", "none", WEIGHTINGS)
'none'

============  =====================================  ============================================
option        values                                 where
============  =====================================  ============================================
sampling      ``"density"``, ``"random"``            how anchors and positive keys are ranked
weighting     ``"paper"``, ``"scale"``, ``"none"``   the positiveness weights :math:`w_i` (Eq. 9)
anchor_mode   ``"pixel"``, ``"class"``               pixel anchors or per-image prototypes
bank_source   ``"prototype"``, ``"pixel"``           what the memory bank stores
reduction     ``"mean"``, ``"sum"``, ``"none"``      how the per-anchor terms are reduced
policy        ``"fixed"``, ``"class_fraction"``,     the pseudo-label policy of
              ``"class_prior"``, ``"none"``          :func:`~torch_dacl.functional.dacl_labels`
point_norm    ``"sample"``, ``"frozen"``             a projection head's normalisation on sampled
                                                     pixels (:meth:`~torch_dacl.ProjectionHead.embed_points`)
precision     ``"float32"``, ``"bfloat16"``          the similarity matmul of the kNN density (Eq. 3)
ramp_shape    ``"gaussian"``, ``"constant"``         :math:`\lambda_{CL}(t)` after the warm-up
                                                     (:class:`~torch_dacl.GaussianRampUp`)
============  =====================================  ============================================
"""

from __future__ import annotations

from typing import Literal, get_args

from ._validation import look_up_option

__all__ = [
    "Sampling", "Weighting", "AnchorMode", "BankSource", "Reduction", "PseudoPolicy", "PointNorm", "Precision", "RampShape",
    "SAMPLINGS", "WEIGHTINGS", "ANCHOR_MODES", "BANK_SOURCES", "REDUCTIONS", "PSEUDO_POLICIES", "POINT_NORMS", "PRECISIONS", "RAMP_SHAPES",
    "look_up_option",
]

Sampling = Literal["density", "random"]
Weighting = Literal["paper", "scale", "none"]
AnchorMode = Literal["pixel", "class"]
BankSource = Literal["prototype", "pixel"]
Reduction = Literal["mean", "sum", "none"]
PseudoPolicy = Literal["fixed", "class_fraction", "class_prior", "none"]
PointNorm = Literal["sample", "frozen"]
Precision = Literal["float32", "bfloat16"]
RampShape = Literal["gaussian", "constant"]

SAMPLINGS = get_args(Sampling)
WEIGHTINGS = get_args(Weighting)
ANCHOR_MODES = get_args(AnchorMode)
BANK_SOURCES = get_args(BankSource)
REDUCTIONS = get_args(Reduction)
PSEUDO_POLICIES = get_args(PseudoPolicy)
POINT_NORMS = get_args(PointNorm)
PRECISIONS = get_args(Precision)
RAMP_SHAPES = get_args(RampShape)
