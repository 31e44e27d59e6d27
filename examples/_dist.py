"""Helpers for launching the examples with ``torchrun`` (DistributedDataParallel).

Every helper is a no-op in a single process (``WORLD_SIZE`` unset or 1): the examples then
run exactly as without this module. Under ``torchrun --nproc_per_node=N``:

* :func:`setup` initialises the default process group from the ``torchrun`` environment
  (``gloo`` on CPU, ``nccl`` on CUDA) and pins process ``LOCAL_RANK`` to ``cuda:LOCAL_RANK``;
* :func:`rank_seed` gives each rank its own data / augmentation / sampling seed
  (``seed + rank``; rank 0 uses the single-process seed) while the model initialisation
  stays the same on all ranks (DDP broadcasts rank 0's parameters anyway);
* :func:`wrap_ddp` converts BatchNorm to SyncBatchNorm on CUDA (``SyncBatchNorm`` has no
  CPU implementation, so CPU runs keep per-rank BatchNorm) and wraps the module in DDP;
* rank 0 logs, checkpoints and evaluates; the other ranks wait at :func:`barrier`.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

# the library's own no-op-without-a-group helpers; not written again here
from torch_dacl.distributed import is_distributed as is_dist
from torch_dacl.distributed import rank, world_size

# rank 0 evaluates (validation, test with HD95) while the others wait at a barrier; the
# default collective timeout (10-30 min) could be too short for a long evaluation
TIMEOUT = datetime.timedelta(hours=2)


def launched() -> bool:
    """True when started by ``torchrun`` (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: Optional[str] = None) -> torch.device:
    """Initialise the process group if launched with ``WORLD_SIZE > 1``; returns the device.

    ``device``: the requested device (``None``: CUDA if available, else CPU). Under torchrun
    a CUDA request becomes ``cuda:LOCAL_RANK``.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not launched():
        return dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if dev.type == "cuda":  # device_id: NCCL knows this rank's GPU (barrier, object collectives)
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=dev)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
    return dev


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def rank_seed(seed: int) -> int:
    """``seed + rank``: the per-rank seed of data order, augmentation and loss sampling."""
    return int(seed) + rank()


def split_batch(batch: int, name: str) -> int:
    """The per-rank share of a global batch size (which must be a multiple of the world size)."""
    ws = world_size()
    if batch % ws:
        raise SystemExit(f"error: {name} = {batch} is not a multiple of the world size {ws}; the global batch "
                         f"is split over the ranks (set {name} to a multiple of {ws})")
    return batch // ws


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """SyncBatchNorm (CUDA only) + DistributedDataParallel; ``module`` itself in one process.

    The module is converted in place where possible; use :func:`unwrap` to reach it.
    """
    if not is_dist():
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return DDP(module, device_ids=[device.index], output_device=device.index,
                   find_unused_parameters=find_unused_parameters)
    return DDP(module, find_unused_parameters=find_unused_parameters)


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def mean_scalars(vals: Dict[str, float]) -> Dict[str, float]:
    """Average a dict of floats over the ranks (one small all-reduce); unchanged in one process.

    Every rank must call it with the same keys in the same order.
    """
    if not is_dist():
        return vals
    keys = list(vals)
    t = torch.tensor([float(vals[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t = (t / dist.get_world_size()).cpu()
    return {k: float(v) for k, v in zip(keys, t)}


def gather_objects(obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``[obj]`` in one process."""
    if not is_dist():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class NullWriter:
    """Stands in for a TensorBoard ``SummaryWriter`` on ranks other than 0."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    flush = close = add_scalar
