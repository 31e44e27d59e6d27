r"""Helpers for ``torch.distributed``; every function is a no-op without a process group.

"Distributed" here means: a default process group exists and has more than one rank. With a
single process, or a group of one rank, every helper returns its input unchanged (no
communication, no host synchronisation), so code written for DDP runs as is on one device.

Semantics (see ``docs/distributed.rst``):

* :func:`all_gather_cat` and :func:`all_gather_with_grad` concatenate along dim 0 in rank
  order. With a ``DistributedSampler`` that gives rank ``r`` the ``r``-th block of the global
  batch, the result is the global batch in its single-process order.
* :func:`all_gather_with_grad` sums the gradient over ranks in its backward, so that after
  DDP divides parameter gradients by the world size the result is the gradient of the
  single-process loss on the global batch (derivation in its docstring).
* :func:`shared_seed` gives every rank the same seed (one broadcast), and
  :func:`shared_generator` the same random stream, so random choices made on gathered data
  (negative keys, random anchors) agree across ranks.
  :class:`~torch_dacl.SoftDensityContrastiveLoss` draws its seed once and keeps it in its
  state (see :class:`~torch_dacl.stages.RandomStream`).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "all_gather_cat",
    "all_gather_with_grad",
    "gather_sizes",
    "shared_seed",
    "shared_generator",
]


def is_distributed() -> bool:
    """True when a default process group with more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """World size of the default process group; 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank in the default process group; 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def gather_sizes(n: int, device: torch.device, uniform: bool = False) -> List[int]:
    """Dim-0 size ``n`` of every rank, in rank order: one small all-gather and a host sync,
    unless ``uniform`` (every rank has ``n``). ``[n]`` without a process group.

    Example:
        >>> from torch_dacl.distributed import gather_sizes
        >>> gather_sizes(3, torch.device("cpu"))  # no process group
        [3]
    """
    if not is_distributed():
        return [n]
    ws = dist.get_world_size()
    if uniform:
        return [n] * ws
    t = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(t) for _ in range(ws)]
    dist.all_gather(sizes, t)
    return [int(s) for s in sizes]


def _gather_padded(t: torch.Tensor, sizes: List[int]) -> torch.Tensor:
    """All-gather ``t`` (dim 0 of ``sizes[rank]``) padded to ``max(sizes)``; concatenate trimmed."""
    top = max(sizes)
    dtype = t.dtype
    if dtype == torch.bool:  # not every backend reduces / gathers bool
        t = t.to(torch.uint8)
    if t.shape[0] < top:
        t = torch.cat([t, t.new_zeros((top - t.shape[0],) + tuple(t.shape[1:]))], 0)
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t)
    out = torch.cat([p[:s] for p, s in zip(parts, sizes)], 0)
    return out.to(dtype) if dtype == torch.bool else out


@torch.no_grad()
def all_gather_cat(*tensors: torch.Tensor, uniform: bool = False) -> Tuple[torch.Tensor, ...]:
    """All-gather tensors along dim 0 and concatenate them in rank order (no gradient).

    All tensors passed in one call must have the same dim-0 size on a rank; that size may
    differ between ranks (sizes are exchanged first, the tensors padded to the largest and
    trimmed after the gather). Pass ``uniform=True`` when every rank has the same size to
    skip the exchange and its host synchronisation.

    Args:
        *tensors: tensors of shape ``(n_r, *rest)`` with ``rest`` equal on all ranks.
        uniform: every rank passes the same ``n_r``.

    Returns:
        A tuple of ``(sum_r n_r, *rest)`` tensors, rank 0's rows first; the inputs themselves
        (a tuple) without a process group.

    Example:
        >>> a, b = all_gather_cat(torch.zeros(2, 3), torch.ones(2))  # no process group: no-op
        >>> a.shape
        torch.Size([2, 3])
    """
    if not is_distributed() or not tensors:
        return tuple(tensors)
    n = tensors[0].shape[0]
    for t in tensors[1:]:
        if t.shape[0] != n:
            raise ValueError(f"all_gather_cat: expected the same dim-0 size in all tensors, "
                             f"got {[tuple(x.shape) for x in tensors]}")
    sizes = gather_sizes(n, tensors[0].device, uniform)
    return tuple(_gather_padded(t.detach(), sizes) for t in tensors)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: List[int]) -> torch.Tensor:  # type: ignore[override]
        r = dist.get_rank()
        ctx.start = sum(sizes[:r])
        ctx.n = sizes[r]
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # dL/dx_r of the DDP objective (1/W) sum_r' L_r' is (1/W) sum_r' dL_r'/dG[r]; DDP
        # supplies the 1/W, this sum supplies the rest (see all_gather_with_grad).
        g = grad.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[ctx.start: ctx.start + ctx.n], None


def all_gather_with_grad(x: torch.Tensor, uniform: bool = False, sizes: Optional[List[int]] = None) -> torch.Tensor:
    r"""All-gather ``x`` along dim 0 in rank order, keeping the gradient path.

    Returns ``G = cat(x_0, ..., x_{W-1})``. The dim-0 size may differ between ranks unless
    ``uniform=True`` (which skips the size exchange). Every rank must run the backward of a
    loss that depends on the output (the backward is a collective, as is the forward).

    Gradient: the backward returns, on rank ``r``,
    :math:`\sum_{r'} \partial L_{r'}/\partial G[r]` (an all-reduce **sum** of the incoming
    gradients, then this rank's slice). Derivation: DDP minimises
    :math:`\bar L = \frac{1}{W}\sum_{r'} L_{r'}` by averaging the parameter gradients of the
    ranks, where :math:`L_{r'}` is the loss computed on rank :math:`r'` from the gathered
    batch. The exact gradient of :math:`\bar L` for rank ``r``'s rows is
    :math:`\frac{1}{W}\sum_{r'}\partial L_{r'}/\partial G[r]`; DDP's average supplies the
    :math:`\frac{1}{W}`, so the local backward must supply the **sum**. When every rank
    computes the same loss :math:`L` (as :class:`~torch_dacl.SoftDensityContrastiveLoss`
    does), the local gradient is :math:`W\,\partial L/\partial x_r`, and the averaged
    parameter gradient equals the single-process gradient of :math:`L` on the global batch.
    Returning only the local gradient, without the sum, would make it :math:`1/W` too small.

    Args:
        x: ``(n_r, *rest)`` with ``rest`` equal on all ranks.
        uniform: every rank passes the same ``n_r``.
        sizes: the ``n_r`` of every rank when the caller knows them (from
            :func:`gather_sizes`); skips the exchange.

    Returns:
        ``(sum_r n_r, *rest)``; ``x`` itself without a process group.
    """
    if not is_distributed():
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device, uniform)
    if not x.requires_grad:
        return _gather_padded(x.detach(), sizes)
    return _GatherWithGrad.apply(x, sizes)


def shared_seed(device: torch.device) -> int:
    """A seed in ``[0, 2**62)`` drawn from the global CPU random stream, the same on every rank.

    Every rank draws (so the global streams of all ranks advance alike) and rank 0's draw is
    broadcast: one small broadcast and one host synchronisation. Without a process group it
    is this process's draw.

    Args:
        device: device of the broadcast; it must suit the backend (a CUDA device for NCCL).
    """
    seed = torch.randint(0, 2**62, (1,), dtype=torch.long)
    if is_distributed():
        seed = seed.to(device)
        dist.broadcast(seed, src=0)
    return int(seed.item())


def shared_generator(device: torch.device) -> Optional[torch.Generator]:
    """A random generator seeded identically on every rank; None without a process group.

    Seeded with :func:`shared_seed` (one broadcast per call). Random choices made with the
    returned generator on gathered, identical data are identical on every rank.

    Args:
        device: device of the generator (and of the broadcast, so it must suit the backend:
            a CUDA device for NCCL).
    """
    if not is_distributed():
        return None
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(shared_seed(device))
    return gen
