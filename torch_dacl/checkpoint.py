"""Save and restore a training loop's state in one call: networks and heads, the DACL
objective (memory banks, schedule, random streams), optimizers, schedulers, plain values."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Union

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "save_atomic"]


def _stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def save_atomic(obj: Any, path: Union[str, os.PathLike]) -> None:
    """``torch.save(obj, path)`` through a temporary file and a rename: an interrupted save
    never leaves a torn ``path``, and a failed one leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def save_checkpoint(path: Union[str, os.PathLike], **objects: Any) -> None:
    """Write the state of every keyword to ``path``, atomically (a temporary file, renamed).

    Objects with a ``state_dict`` (modules, :class:`~torch_dacl.DACLObjective` with its banks,
    schedule and random streams, optimizers, LR schedulers, ``GradScaler``) are saved by it;
    anything else (a step count, a dict of metrics) as it is. The global random states are
    saved too (torch's CPU and CUDA generators, Python's ``random``, NumPy's global one), so a
    loop that draws from those draws on as it would have; a ``DataLoader``'s worker processes
    and samplers keep their own state, which a loop checkpoints itself if it needs it.

    Example:
        >>> import tempfile, torch
        >>> from torch_dacl import GaussianRampUp, save_checkpoint, load_checkpoint
        >>> net, ramp = torch.nn.Linear(2, 2), GaussianRampUp(total_steps=10, warmup_steps=0)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> ramp.step()
        >>> path = tempfile.mkdtemp() + "/ckpt.pt"
        >>> save_checkpoint(path, net=net, ramp=ramp, optimizer=opt, step=1)
        >>> ramp2 = GaussianRampUp(total_steps=10, warmup_steps=0)
        >>> load_checkpoint(path, net=net, ramp=ramp2, optimizer=opt)
        {'step': 1}
        >>> ramp2.value == ramp.value
        True
    """
    import random

    import numpy as np

    state: Dict[str, Any] = {"_rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                      "numpy": np.random.get_state()}}
    if torch.cuda.is_available():
        state["_rng"]["cuda"] = torch.cuda.get_rng_state_all()
    for name, obj in objects.items():
        if name.startswith("_"):
            raise ValueError(f"{name}: names starting with '_' are reserved, got {name!r}")
        state[name] = {"state_dict": obj.state_dict()} if _stateful(obj) else {"value": obj}
    save_atomic(state, path)


def load_checkpoint(path: Union[str, os.PathLike], map_location: Any = "cpu", restore_rng: bool = True,
                    **objects: Any) -> Dict[str, Any]:
    """Restore every keyword object from ``path`` (written by :func:`save_checkpoint`) by its
    ``load_state_dict``, and the global random state (``restore_rng``); returns the plain
    values saved beside them (``{"step": ...}``). A keyword the checkpoint does not hold is a
    ``KeyError`` naming what it holds."""
    state = torch.load(path, map_location=map_location, weights_only=False)
    for name, obj in objects.items():
        if name not in state or "state_dict" not in state[name]:
            held = sorted(k for k in state if not k.startswith("_"))
            raise KeyError(f"{name}: not a saved state in {str(path)!r} (it holds {held})")
        if not _stateful(obj):
            raise ValueError(f"{name}: expected an object with load_state_dict, got {type(obj).__name__}")
        obj.load_state_dict(state[name]["state_dict"])
    if restore_rng and "_rng" in state:
        import random

        import numpy as np

        torch.set_rng_state(state["_rng"]["torch"].cpu())  # (map_location may have moved it)
        if "python" in state["_rng"]:
            random.setstate(state["_rng"]["python"])
            np.random.set_state(state["_rng"]["numpy"])
        if "cuda" in state["_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["_rng"]["cuda"]])
    return {k: v["value"] for k, v in state.items() if not k.startswith("_") and "value" in v}
