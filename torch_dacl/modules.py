"""Thin module faces of the functional core: configuration and state, no math."""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import functional as DF
from ._validation import check_int, check_ks, check_real, look_up_option
from .options import PRECISIONS, RAMP_SHAPES

__all__ = ["MaskedAveragePool", "MultiScaleDensity", "GaussianRampUp"]


class MaskedAveragePool(nn.Module):
    r"""Class prototypes by masked average pooling (Eq. 2).

    Calls :func:`torch_dacl.functional.masked_average_pool`.

    Args:
        threshold: :math:`\phi`, the reliability threshold of the 0-1 seed mask. The paper
            reports results insensitive to it (Fig. 5c) and gives no default; 0.5 is our
            choice (with one-hot labels any value in ``[0, 1)`` gives the same masks).

    Example:
        >>> pool = MaskedAveragePool(threshold=0.5)
        >>> protos, valid = pool(torch.randn(2, 8, 4, 4, 4), torch.rand(2, 3, 4, 4, 4))
        >>> protos.shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = check_real("threshold", threshold)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"

    def forward(self, features: torch.Tensor, probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return DF.masked_average_pool(features, probs, self.threshold)


class MultiScaleDensity(nn.Module):
    r"""Multi-scale kNN density (Eq. 3-5); the density stage of
    :class:`~torch_dacl.SoftDensityContrastiveLoss`.

    Calling the module uses the flat layout (:func:`torch_dacl.functional.knn_density`,
    ``(Q, D)`` features with ``(Q,)`` labels); :meth:`grouped` uses the grouped layout
    (:func:`torch_dacl.functional.knn_density_grouped`, ``(C, S, D)`` with a validity mask),
    static shapes and no host synchronisation, which is what the loss calls. ``ks=(k,)``
    gives the single-scale density of ablation III. ``ks`` is checked once, here.

    Args:
        ks: neighbourhood sizes (``(8, 16, 32)``; see docs: Design decisions, 3.2).
        precision: the similarity matmul of :meth:`grouped`, ``"float32"`` or ``"bfloat16"``
            (see :func:`~torch_dacl.functional.knn_density_grouped`).

    Example:
        >>> density = MultiScaleDensity(ks=(2, 4))
        >>> d = density(torch.randn(12, 16), torch.randint(0, 3, (12,)), bank=torch.randn(3, 5, 16))
        >>> bool(((d >= -1) & (d <= 1)).all())
        True
        >>> density.grouped(torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool)).shape
        torch.Size([3, 5])
    """

    def __init__(self, ks: Sequence[int] = (8, 16, 32), precision: str = "float32") -> None:
        super().__init__()
        self.ks = check_ks(ks)
        self.precision = look_up_option("precision", precision, PRECISIONS)

    def extra_repr(self) -> str:
        return f"ks={self.ks}, precision={self.precision!r}"

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        bank: Optional[torch.Tensor] = None,
        bank_valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return DF.knn_density(features, labels, self.ks, bank, bank_valid)

    def grouped(
        self,
        features: torch.Tensor,
        valid: torch.Tensor,
        bank: Optional[torch.Tensor] = None,
        bank_valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``(C, S)`` density of ``features (C, S, D)`` grouped by class (-1 where ``valid``
        is False) against the other valid members of their group and the valid bank entries
        ``bank (C, L, D)`` of their class."""
        return DF.knn_density_grouped(features, valid, self.ks, bank, bank_valid, precision=self.precision,
                                      validate_args=False)


def resolve_warmup(warmup: Union[int, float], total_steps: int) -> int:
    """Warm-up in steps from an int (steps) or a float in ``[0, 1)`` (fraction of the run).

    Warns when the warm-up is as long as the run (the weight would stay 0 throughout).

    Example:
        >>> resolve_warmup(1 / 30, 3000), resolve_warmup(200, 3000)
        (100, 200)
    """
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)):
        raise ValueError(f"warmup_steps: expected an int >= 0 or a float in [0, 1), got {warmup!r}")
    if isinstance(warmup, float):
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup_steps: a float is a fraction of the run, expected [0, 1), got {warmup!r}")
        steps = int(round(warmup * total_steps))
    else:
        if warmup < 0:
            raise ValueError(f"warmup_steps: expected an int >= 0, got {warmup!r}")
        steps = int(warmup)
    if steps >= total_steps:
        warnings.warn(f"warmup_steps={steps} >= total_steps={total_steps}: lambda_CL stays 0 for the whole run "
                      f"(give the warm-up as a fraction, e.g. warmup_steps=1/30)", stacklevel=3)
    return steps


class GaussianRampUp(nn.Module):
    r"""Gaussian warm-up schedule of :math:`\lambda_{CL}` (Eq. 1), as a stateful scheduler.

    Holds the step counter in a buffer (saved in ``state_dict``). Use it like an LR
    scheduler: read :attr:`value` (or call the module) for the current weight and call
    :meth:`step` once per optimisation step.

    Args:
        total_steps: :math:`t_{max}` (30,000 in the paper).
        max_weight: the factor 0.1 of Eq. 1.
        warmup_steps: steps with weight 0 (1,000 in the paper, "to prevent model collapse
            caused by the initialized prototypes"): an int counts steps, a float in
            ``[0, 1)`` is a fraction of ``total_steps`` (the paper's is ``1000 / 30000``).
            A warning is issued when the warm-up covers the whole run.
        shape: ``"gaussian"`` (Eq. 1) or ``"constant"``: ``max_weight`` from the end of the
            warm-up on (the constant :math:`\lambda_{CL}` of the paper's Fig. 5a; not Eq. 1).

    Example:
        >>> ramp = GaussianRampUp(total_steps=100, warmup_steps=10)
        >>> ramp.value
        0.0
        >>> for _ in range(100):
        ...     ramp.step()
        >>> round(ramp.value, 4)
        0.1
    """

    step_count: torch.Tensor

    def __init__(self, total_steps: int, max_weight: float = 0.1, warmup_steps: Union[int, float] = 1000,
                 shape: str = "gaussian") -> None:
        super().__init__()
        self.total_steps = check_int("total_steps", total_steps)
        self.max_weight = float(max_weight)
        self.warmup_steps = resolve_warmup(warmup_steps, self.total_steps)
        self.shape = look_up_option("shape", shape, RAMP_SHAPES)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        # the step on the host too: reading the schedule never waits for the device
        self._step = 0

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # (a method, not a hook: the module pickles)
        super()._load_from_state_dict(*args, **kwargs)
        self._step = int(self.step_count)

    def extra_repr(self) -> str:
        return (f"total_steps={self.total_steps}, max_weight={self.max_weight}, warmup_steps={self.warmup_steps}"
                + ("" if self.shape == "gaussian" else f", shape={self.shape!r}"))

    @property
    def value(self) -> float:
        """Current weight :math:`\\lambda_{CL}(t)`."""
        if self.shape == "constant":
            return self.max_weight if self._step >= self.warmup_steps else 0.0
        return DF.gaussian_rampup(self._step, self.total_steps, self.max_weight, self.warmup_steps)

    def step(self) -> None:
        """Advance the schedule by one optimisation step."""
        self.step_count += 1
        self._step += 1

    def forward(self) -> float:
        return self.value
