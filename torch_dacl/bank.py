"""Class-wise FIFO memory bank (the dynamic memory :math:`\\mathcal{G}_n` of the paper)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from . import distributed as _dist
from ._validation import check_float, check_int, check_rank

__all__ = ["ClassMemoryBank"]


class ClassMemoryBank(nn.Module):
    r"""Per-class first-in-first-out memory of feature vectors and their densities.

    The memory bank :math:`\mathcal{G}_n` of the Feature Density-Aware module: "for each
    class n, the feature memory is updated following a First-In, First-Out strategy while
    maintaining a fixed size L". Each entry also keeps the density it had when it entered,
    which the loss uses to pick the bank's high-density positive keys (Eq. 7).

    All state lives in persistent buffers (``features``, ``density``, ``ptr``, ``count``), so
    a ``state_dict`` round trip restores the bank exactly and resumed training continues
    identically. Filled slots are always ``0 .. count[c]-1`` (derived, not stored).

    Args:
        num_classes: ``C``.
        dim: feature dimension ``D``.
        size: ``L``, entries per class (1000 in the paper).
        gather_distributed: all-gather every push across the ranks of the default process
            group, so that every rank holds the same bank: rank 0's items enter first, then
            rank 1's, and so on, which is the order of one process pushing the concatenated
            items. The number of items may differ between ranks; every rank must call
            ``push`` (it is a collective). A no-op without a process group.

    Example:
        >>> bank = ClassMemoryBank(num_classes=2, dim=3, size=4)
        >>> bank.push(torch.randn(5, 3), torch.tensor([0, 0, 1, 0, 1]))
        >>> bank.count.tolist()
        [3, 2]
        >>> feats, dens = bank.entries(0)
        >>> feats.shape
        torch.Size([3, 3])
    """

    features: torch.Tensor
    density: torch.Tensor
    ptr: torch.Tensor
    count: torch.Tensor

    def __init__(self, num_classes: int, dim: int, size: int = 1000, gather_distributed: bool = False) -> None:
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes)
        self.dim = check_int("dim", dim)
        self.size = check_int("size", size)
        self.gather_distributed = bool(gather_distributed)
        # One extra "trash" slot per class takes the writes that FIFO overflow drops, so a
        # push needs no boolean indexing (no host synchronisation).
        self.register_buffer("features", torch.zeros(num_classes, size + 1, dim))
        self.register_buffer("density", torch.zeros(num_classes, size + 1))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, size={self.size}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # name the constructor arguments, not the spare slot's buffer shape
        feats = state_dict.get(prefix + "features")
        if feats is not None and feats.dim() == 3:
            got = (feats.shape[0], feats.shape[1] - 1, feats.shape[2])
            want = (self.num_classes, self.size, self.dim)
            if got != want:
                raise ValueError(
                    f"state_dict: the checkpoint's memory bank has num_classes={got[0]}, bank_size={got[1]}, "
                    f"dim={got[2]}; this one was built with num_classes={want[0]}, bank_size={want[1]}, "
                    f"dim={want[2]} (build it with the checkpoint's values)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def bank(self) -> torch.Tensor:
        """``(C, L, D)`` view of the slots (filled ones are ``valid``)."""
        return self.features[:, : self.size]

    @property
    def bank_density(self) -> torch.Tensor:
        """``(C, L)`` density of each slot when it entered."""
        return self.density[:, : self.size]

    @property
    def valid(self) -> torch.Tensor:
        """``(C, L)`` bool, True for filled slots."""
        return torch.arange(self.size, device=self.count.device).unsqueeze(0) < self.count.unsqueeze(1)

    def is_empty(self) -> bool:
        """True when no class holds an entry (one host synchronisation)."""
        return not bool(self.count.any())

    def reset(self) -> None:
        """Empty the bank."""
        self.features.zero_()
        self.density.zero_()
        self.ptr.zero_()
        self.count.zero_()

    def entries(self, c: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Entries of class ``c``, oldest first: ``(features (n_c, D), density (n_c,))``."""
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.num_classes:
            raise ValueError(f"c: expected an int class in [0, {self.num_classes}), got {c!r}")
        n = int(self.count[c])
        start = int(self.ptr[c]) if n == self.size else 0
        order = (torch.arange(n, device=self.count.device) + start) % self.size
        return self.features[c, order].clone(), self.density[c, order].clone()

    @torch.no_grad()
    def push(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        density: Optional[torch.Tensor] = None,
        valid: Optional[torch.Tensor] = None,
    ) -> None:
        """Enqueue vectors into the queues of their classes (FIFO, oldest dropped).

        Items of one class enter in input order; pushing more than ``size`` items of a class
        keeps the last ``size``. Vectorised over classes and items; no host synchronisation.

        Args:
            features: ``(M, D)`` vectors (stored detached, as float32).
            labels: ``(M,)`` int64 classes; values outside ``[0, C)`` are skipped.
            density: optional ``(M,)`` density of each vector (0 when omitted).
            valid: optional ``(M,)`` bool, items to push.
        """
        check_rank("features", features, (2,), "(M, D)")
        check_float("features", features)
        if features.shape[1] != self.dim:
            raise ValueError(f"features: expected shape (M, {self.dim}) for a bank of dim {self.dim}, "
                             f"got {tuple(features.shape)}")
        m = features.shape[0]
        if labels.shape != (m,):
            raise ValueError(f"labels: expected shape ({m},) to match features, got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels: expected an integer tensor (torch.long), got dtype {labels.dtype}")
        if density is not None and density.shape != (m,):
            raise ValueError(f"density: expected shape ({m},), got {tuple(density.shape)}")
        if valid is not None and valid.shape != (m,):
            raise ValueError(f"valid: expected shape ({m},), got {tuple(valid.shape)}")
        dev = self.features.device
        features = features.detach().to(dev, torch.float32)
        labels = labels.to(dev, torch.long)
        density = torch.zeros(m, device=dev) if density is None else density.detach().to(dev, torch.float32)
        valid = torch.ones(m, dtype=torch.bool, device=dev) if valid is None else valid.to(dev, torch.bool)
        if self.gather_distributed and _dist.is_distributed():
            features, labels, density, valid = _dist.all_gather_cat(features, labels, density, valid)
            m = features.shape[0]
        c, size = self.num_classes, self.size
        keep = valid & (labels >= 0) & (labels < c)
        eff = torch.where(keep, labels, torch.full_like(labels, c))
        order = torch.argsort(eff, stable=True)
        counts = torch.bincount(eff, minlength=c + 1)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(m, device=dev) - starts[eff[order]]
        overflow = (counts[eff] - size).clamp_min(0)  # items of the class that do not fit
        keep &= rank >= overflow
        lab = torch.where(keep, eff, torch.zeros_like(eff))
        slot = (self.ptr[lab] + rank - overflow) % size
        slot = torch.where(keep, slot, torch.full_like(slot, size))  # dropped -> trash slot
        self.features.index_put_((lab, slot), features)
        self.density.index_put_((lab, slot), density)
        self.features[:, size].zero_()
        self.density[:, size].zero_()
        added = counts[:c].clamp_max(size)
        self.ptr.copy_((self.ptr + added) % size)
        self.count.copy_((self.count + added).clamp_max(size))
