"""Helpers for ``torch.distributed``; every function is a no-op without a process group."""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "all_gather_cat", "all_gather_with_grad"]


def is_distributed() -> bool:
    """True when a default process group with more than one rank exists."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def all_gather_cat(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """All-gather tensors along dim 0 and concatenate them in rank order (no gradient).

    The first dimension may differ between ranks: sizes are exchanged first and the
    tensors padded to the largest, then trimmed.
    """
    if not is_distributed():
        return tensors
    ws = world_size()
    dev = tensors[0].device
    n = torch.tensor([tensors[0].shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n)
    sizes_i = [int(s) for s in sizes]
    top = max(sizes_i)
    out = []
    for t in tensors:
        pad = t.new_zeros((top - t.shape[0],) + tuple(t.shape[1:]))
        buf = torch.cat([t, pad], 0).contiguous()
        parts: List[torch.Tensor] = [torch.empty_like(buf) for _ in range(ws)]
        dist.all_gather(parts, buf)
        out.append(torch.cat([p[:s] for p, s in zip(parts, sizes_i)], 0))
    return tuple(out)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Every rank computed the same global loss; the gradient of that loss with respect to
        # this rank's input is the sum over ranks of their gradients for this slice. Summing
        # (not averaging) matches one process on the concatenated batch; DDP's gradient
        # averaging over ranks is then undone by the 1/world_size of the summed copies.
        g = torch.stack(grads).contiguous()
        dist.all_reduce(g)
        return g[dist.get_rank()]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (same shape on every rank) along dim 0, keeping the gradient path.

    Returns ``x`` unchanged without a process group.
    """
    if not is_distributed():
        return x
    return torch.cat(_GatherWithGrad.apply(x), 0)
