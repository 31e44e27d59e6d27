"""Input checks shared by the functional core and the modules.

Every check raises :class:`ValueError` naming the argument, what was expected and what was
received, in the style of MONAI's losses. Checks that need the values of a tensor (finite
features, labels in range) cost one host synchronisation each; the modules let you switch
them off with ``validate=False`` once a pipeline is trusted.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = [
    "check_float",
    "check_labels",
    "check_rank",
    "check_finite",
    "check_ks",
    "check_positive",
]


def check_rank(name: str, x: torch.Tensor, ranks: Sequence[int], layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() not in ranks:
        raise ValueError(
            f"{name}: expected a tensor of shape {layout} (rank {' or '.join(map(str, ranks))}), "
            f"got shape {tuple(x.shape)} (rank {x.dim()})"
        )


def check_float(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating point tensor, got dtype {x.dtype}")


def check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or inf in a tensor of shape {tuple(x.shape)}")


def check_labels(
    name: str,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: Optional[int] = None,
    check_values: bool = True,
) -> None:
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor (torch.long), got dtype {labels.dtype}")
    if check_values and labels.numel() > 0:
        bad = (labels < 0) | (labels >= num_classes)
        if ignore_index is not None:
            bad &= labels != ignore_index
        if bool(bad.any()):
            lo, hi = int(labels[bad].min()), int(labels[bad].max())
            allowed = f"[0, {num_classes})" + (f" or ignore_index={ignore_index}" if ignore_index is not None else "")
            raise ValueError(f"{name}: expected values in {allowed}, got values in [{lo}, {hi}]")


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ks, int):
        ks = (ks,)
    ks = tuple(ks)
    if len(ks) == 0 or any((not isinstance(k, int)) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks: expected a non-empty sequence of ints >= 1, got {ks!r}")
    return ks


def check_positive(name: str, value: float) -> None:
    if not (value > 0):
        raise ValueError(f"{name}: expected a value > 0, got {value!r}")
