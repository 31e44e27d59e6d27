"""The one validation layer shared by the functional core, the stages and the modules.

Every check raises :class:`ValueError` naming the argument, what was expected and what was
received, in the style of MONAI's losses. Option names go through :func:`look_up_option`,
which suggests the nearest valid name. The modules check their scalars once, in
``__init__``; checks that need the values of a tensor (finite features, labels in range) cost
one host synchronisation each, and the modules let you switch them off with
``validate=False`` once a pipeline is trusted.
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Optional, Sequence

import torch

__all__ = [
    "look_up_option",
    "check_int",
    "check_optional_int",
    "check_real",
    "check_positive",
    "check_float",
    "check_labels",
    "check_rank",
    "check_finite",
    "check_ks",
]


def look_up_option(name: str, value: Any, allowed: Sequence[str]) -> str:
    """Return ``value`` when it is one of ``allowed``, else raise a ValueError that names the
    argument, lists the allowed values and suggests the closest one (as MONAI's
    ``look_up_option`` does).

    Example:
        >>> from torch_dacl.options import look_up_option
        >>> look_up_option("weighting", "paper", ("paper", "scale", "none"))
        'paper'
        >>> look_up_option("weighting", "papr", ("paper", "scale", "none"))
        Traceback (most recent call last):
        ...
        ValueError: weighting: expected one of ('paper', 'scale', 'none'), got 'papr' (did you mean 'paper'?)
    """
    allowed = tuple(allowed)
    if isinstance(value, str) and value in allowed:
        return value
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value.lower(), [a.lower() for a in allowed], n=1, cutoff=0.5)
        if close:
            hint = f" (did you mean {allowed[[a.lower() for a in allowed].index(close[0])]!r}?)"
    raise ValueError(f"{name}: expected one of {allowed}, got {value!r}{hint}")


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """An int (not a bool) ``>= minimum``; returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value: Any) -> Optional[int]:
    """None or an int (not a bool); returns it."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name}: expected an int or None, got {value!r}")
    return value


def check_real(name: str, value: Any) -> float:
    """A finite real number (not a bool); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """A real number ``> 0`` (not a bool); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0):
        raise ValueError(f"{name}: expected a value > 0, got {value!r}")
    return float(value)


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
        labels = labels.long()  # in int64: a bound compared with uint8 / int8 labels wraps (300 -> 44 in uint8)
        bad = (labels < 0) | (labels >= num_classes)
        if ignore_index is not None:
            bad &= labels != ignore_index
        if bool(bad.any()):
            lo, hi = int(labels[bad].min()), int(labels[bad].max())
            allowed = f"[0, {num_classes})" + (f" or ignore_index={ignore_index}" if ignore_index is not None else "")
            raise ValueError(f"{name}: expected values in {allowed}, got values in [{lo}, {hi}]")


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ks, int) and not isinstance(ks, bool):
        ks = (ks,)
    try:
        ks = tuple(ks)
    except TypeError:
        raise ValueError(f"ks: expected a non-empty sequence of ints >= 1, got {ks!r}") from None
    if len(ks) == 0 or any((not isinstance(k, int)) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks: expected a non-empty sequence of ints >= 1, got {ks!r}")
    return ks
