r"""The rows of the paper's Table 2 (ablation) as named compositions of the loss's options.

Each row adds one component on top of the previous one; row I is the CPS baseline, without
a DACL term (``DACLObjective(contrastive=False)``, the examples' ``--method cps``).

=====  ================================================  =================================================
row    paper                                             options of :class:`~torch_dacl.SoftDensityContrastiveLoss`
=====  ================================================  =================================================
I      CPS baseline                                      no DACL term
II     + plain contrastive learning                      ``sampling="random", use_bank=False, weighting="none"``
                                                         (``ks`` is unused: nothing is ranked by density)
III    + density-aware sampling, one scale, mini-batch   ``sampling="density", ks=(8,), use_bank=False, weighting="none"``
IV     + multi-scale density                             ``ks=(8, 16, 32), use_bank=False, weighting="none"``
V      + memory bank (density and positive keys)         ``ks=(8, 16, 32), use_bank=True, weighting="none"``
VI     + positiveness weights :math:`w_i` (full DACL)    the defaults: ``weighting="paper"``
=====  ================================================  =================================================

Build a row with :meth:`SoftDensityContrastiveLoss.from_table2
<torch_dacl.SoftDensityContrastiveLoss.from_table2>`, or pass :func:`table2_options` on to
:class:`~torch_dacl.DACLObjective`:

>>> from torch_dacl.ablation import table2_options
>>> table2_options("III")
{'sampling': 'density', 'ks': (8,), 'use_bank': False, 'weighting': 'none'}
>>> from torch_dacl import DACLObjective
>>> objective = DACLObjective(num_classes=4, dim=16, total_steps=100, **table2_options("V"))
>>> objective.loss_a.weighting, objective.loss_a.use_bank
('none', True)
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Dict, Mapping

from ._validation import look_up_option

__all__ = ["TABLE2", "TABLE2_ROWS", "table2_options"]

#: Table 2's rows II-VI: each sets the same four options (the rest keep their defaults).
TABLE2: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "II": MappingProxyType(dict(sampling="random", ks=(8, 16, 32), use_bank=False, weighting="none")),
    "III": MappingProxyType(dict(sampling="density", ks=(8,), use_bank=False, weighting="none")),
    "IV": MappingProxyType(dict(sampling="density", ks=(8, 16, 32), use_bank=False, weighting="none")),
    "V": MappingProxyType(dict(sampling="density", ks=(8, 16, 32), use_bank=True, weighting="none")),
    "VI": MappingProxyType(dict(sampling="density", ks=(8, 16, 32), use_bank=True, weighting="paper")),
})

#: Every row name of Table 2, the CPS baseline "I" included.
TABLE2_ROWS = ("I",) + tuple(TABLE2)


def table2_options(row: str) -> Dict[str, Any]:
    """The loss options of Table 2's ``row`` (``"II"`` ... ``"VI"``, case-insensitive), a new dict.

    Row ``"I"`` has no DACL term and raises a ValueError that says so; an unknown name
    raises one that suggests the nearest row.
    """
    name = row.upper() if isinstance(row, str) else row
    if name == "I":
        raise ValueError("row: Table 2 row I is the CPS baseline, without a DACL term: use "
                         "DACLObjective(..., contrastive=False) (the examples' --method cps)")
    return dict(TABLE2[look_up_option("row", name, tuple(TABLE2))])
