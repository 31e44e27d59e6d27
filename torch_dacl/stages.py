r"""The stages of :class:`~torch_dacl.SoftDensityContrastiveLoss`, each usable and tested alone.

As pytorch-metric-learning builds a loss from a distance, a miner and a reducer, the DACL
loss is a composition of these stages (the module's keywords are a shorthand that builds
them); its ``forward`` calls them in the paper's order:

==========================================  =========================================================================
stage                                       step
==========================================  =========================================================================
:class:`~torch_dacl.MaskedAveragePool`      per-image class prototypes (Eq. 2)
:class:`PixelSampler`                       per-class pixel sample; the only place that gathers across ranks
:class:`~torch_dacl.MultiScaleDensity`      kNN density against batch and memory (Eq. 3-5), its ``grouped`` call
:class:`AnchorKeyMiner`                     anchors (Eq. 6), positive keys and their centers (Eq. 7-8), negative keys
:class:`SoftContrastiveTerm`                the soft contrastive term with its weighting (Eq. 9-10), the reduction
:class:`BankPolicy`                         what enters the :class:`~torch_dacl.ClassMemoryBank`, and when
:class:`RandomStream`                       the loss's random state (seeded once, saved in its ``state_dict``)
==========================================  =========================================================================

Every stage checks its scalars once, in ``__init__``; their tensors use the grouped layout
``(C, S, ...)`` with a ``(C, S)`` validity mask, static shapes and no host synchronisation.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as _dist
from . import functional as DF
from ._validation import check_int, check_optional_int, check_positive, look_up_option
from .bank import ClassMemoryBank
from .options import ANCHOR_MODES, BANK_SOURCES, REDUCTIONS, SAMPLINGS, WEIGHTINGS

__all__ = [
    "Sample",
    "Memory",
    "Mined",
    "PixelSampler",
    "AnchorKeyMiner",
    "SoftContrastiveTerm",
    "BankPolicy",
    "RandomStream",
    "one_hot_maps",
    "gather_points",
    "sampled_prototypes",
    "apply_head",
    "gather_rows",
    "select_top",
    "split_by_rank",
    "masked_mean",
    "count_shared",
]


# ----------------------------------------------------------------------------- small tensor helpers
def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x (C, S, D)``, ``index (C, K)`` -> ``(C, K, D)``: row ``index[c, k]`` of group ``c``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def select_top(score: torch.Tensor, valid: torch.Tensor, k: int, largest: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(C, min(k, S))`` of the ``k`` largest (or smallest) valid scores of each row
    of ``score (C, S)``, and their validity (False where a row has fewer valid entries)."""
    k = min(k, score.shape[1])
    fill = float("-inf") if largest else float("inf")
    masked = torch.where(valid, score, torch.full_like(score, fill))
    idx = masked.topk(k, dim=1, largest=largest).indices
    return idx, valid.gather(1, idx)


def split_by_rank(
    key: torch.Tensor, valid: torch.Tensor, num_low: int, num_high: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint low and high ends of one ranking of each row (anchors and batch positives).

    The valid entries of each row of ``key (C, S)`` are sorted ascending (ties by position).
    With ``n`` valid entries, the ``q = num_low`` lowest and the ``h = num_high`` highest
    are taken when ``n >= num_low + num_high``; otherwise ``q = min(num_low, n // 2)`` and
    ``h = min(num_high, n - q)``, so the two sets never share an entry.

    Returns ``(low_idx (C, min(num_low, S)), low_valid, high_idx (C, min(num_high, S)),
    high_valid)``; vectorised, no host synchronisation.

    Example:
        >>> from torch_dacl.stages import split_by_rank
        >>> key = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7]])
        >>> lo, lo_ok, hi, hi_ok = split_by_rank(key, torch.ones(1, 5, dtype=torch.bool), 4, 4)
        >>> lo[lo_ok].tolist(), hi[hi_ok].tolist()  # 5 entries: 2 low, 3 high
        ([1, 3], [2, 4, 0])
    """
    c, s = key.shape
    dev = key.device
    order = torch.where(valid, key, torch.full_like(key, float("inf"))).argsort(dim=1, stable=True)
    n = valid.sum(1, keepdim=True)  # (C, 1)
    enough = n >= num_low + num_high
    q = torch.where(enough, torch.full_like(n, num_low), torch.clamp(n // 2, max=num_low))
    h = torch.where(enough, torch.full_like(n, num_high), torch.clamp(n - q, max=num_high))
    ql, hl = min(num_low, s), min(num_high, s)
    low_rank = torch.arange(ql, device=dev).unsqueeze(0)
    high_rank = torch.arange(hl, device=dev).unsqueeze(0)
    low_idx = order[:, :ql]
    high_idx = order.gather(1, (n - 1 - high_rank).clamp_min(0))
    return low_idx, low_rank < q, high_idx, high_rank < h


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean over dim 1 of the valid rows of ``x (C, K, D)``: ``(C, D)`` and ``(C,)`` any-valid."""
    w = valid.to(x.dtype).unsqueeze(-1)
    n = w.sum(1)
    return (x * w).sum(1) / n.clamp_min(1.0), n.squeeze(-1) > 0


def count_shared(a_idx: torch.Tensor, a_valid: torch.Tensor, b_idx: torch.Tensor, b_valid: torch.Tensor,
                 width: int) -> torch.Tensor:
    """``(C,)`` number of positions in ``[0, width)`` chosen (validly) in both index tables."""
    c = a_idx.shape[0]
    in_a = torch.zeros(c, width, dtype=torch.bool, device=a_idx.device).scatter_(1, a_idx, a_valid)
    in_b = torch.zeros(c, width, dtype=torch.bool, device=a_idx.device).scatter_(1, b_idx, b_valid)
    return (in_a & in_b).sum(1)


def gather_points(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x (N, D, *S)``, ``index (...)`` flat positions into ``(N, *S)`` -> ``(..., D)``: the
    feature vectors at those pixels.

    Indexes the tensor in place (any memory layout: contiguous, channels-last, or a strided
    view such as a pixel grid), so only the indexed vectors are copied; the gradient flows
    back to those pixels alone. The indexing follows the layout: autograd builds the dense
    gradient contiguous in the indexed tensor's shape, so a channels-last ``x`` is indexed as
    ``(N, *S, D)`` and any other as ``(N, D, *S)``, and the gradient comes back in ``x``'s own
    layout (the other way it costs a strided copy of the whole map, several times the gather).

    A map without pixels (``N = 0`` or a spatial size 0) has no position to read: every index
    then reads a zero vector connected to ``x``'s graph (a zero gradient of ``x``'s shape), as
    the padded entries of an empty :func:`~torch_dacl.functional.group_by_label` table expect.
    """
    if x.shape[0] == 0 or 0 in x.shape[2:]:  # static shapes: no host sync
        # the sum over the empty dims is a (1, D, 1, ...) zero pixel that backpropagates into x
        x = x.sum(dim=(0, *range(2, x.dim())), keepdim=True)
        index = torch.zeros_like(index)
    coords, rest = [], index
    for size in reversed(tuple(x.shape[2:])):  # the spatial dims, last first (2 or 3 of them)
        coords.append(rest % size)
        rest = rest // size
    coords.reverse()
    last = x.movedim(1, -1)
    if last.is_contiguous():  # channels-last memory
        return last[(rest, *coords)]
    return x[(rest, slice(None), *coords)]  # (..., D): the advanced indices are split by the slice


def sampled_prototypes(features: torch.Tensor, valid: torch.Tensor, image: torch.Tensor, masks: torch.Tensor,
                       num_images: int) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Eq. 2 on the sampled pixels: per-image class prototypes ``(C, N, D)`` and their
    validity ``(C, N)``.

    Prototype :math:`v_n` of image :math:`i` is the mean of the features of the sampled pixels
    of image :math:`i` whose mask :math:`T_n` is set. Args: ``features (M, D)`` of the sampled
    pixels (rows where ``valid (M,)`` is False take no part), ``image (M,)`` their image
    index, ``masks (M, C)`` bool :math:`T_n` at each pixel. Vectorised (one ``index_add``).
    A class no sampled pixel of an image carries gives that image no prototype. With the labels'
    one-hot masks (the loss's default) the sample is uniform within each class, so each
    prototype is an unbiased estimate of Eq. 2's; with soft maps ``probs`` it is not (the
    pixels are sampled per label class, at different rates).
    """
    if features.dtype in (torch.float16, torch.bfloat16):  # sums in float32, as masked_average_pool's
        features = features.float()
    m, d = features.shape
    c = masks.shape[1]
    w = (masks & valid.unsqueeze(1)).to(features.dtype)  # (M, C)
    # at least one image row: with num_images = 0 (an empty batch) the padded rows' image 0 has
    # somewhere to go (their weight is 0); the extra row is dropped
    rows = max(num_images, 1)
    sums = features.new_zeros(rows, c, d).index_add_(0, image, w.unsqueeze(-1) * features.unsqueeze(1))[:num_images]
    counts = features.new_zeros(rows, c).index_add_(0, image, w)[:num_images]
    protos = sums / counts.clamp_min(1.0).unsqueeze(-1)
    return protos.transpose(0, 1), (counts > 0).transpose(0, 1)


def apply_head(head, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``head`` on grouped point features ``(C, S, F)`` -> ``(C, S, D)``: its
    ``embed_points(x, valid)`` when it has one (:class:`~torch_dacl.ProjectionHead`), else
    ``head(x)`` on the ``(C*S, F)`` rows (any pointwise module, e.g. ``nn.Linear`` layers)."""
    c, s, f = features.shape
    rows = features.reshape(c * s, f)
    out = head.embed_points(rows, valid.reshape(-1)) if hasattr(head, "embed_points") else head(rows)
    return out.reshape(c, s, out.shape[-1])


def one_hot_maps(labels: torch.Tensor, num_classes: int, ignore_index: Optional[int] = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(N, *S)`` labels -> ``(N, C, *S)`` one-hot class maps (Eq. 2's :math:`M_n` from
    labels) in ``dtype`` (float32; ``torch.bool`` gives the masks :math:`T_n`, which
    :func:`~torch_dacl.functional.masked_average_pool` takes without a threshold); pixels
    outside ``[0, C)`` or equal to ``ignore_index`` are all-zero."""
    # one comparison per class straight into the (N, C, *S) layout (a label outside [0, C)
    # matches none): F.one_hot would build an int64 (N, *S, C + 1) map, 8x the bytes, and
    # then copy it channel-first
    cls = torch.arange(num_classes, device=labels.device).view((1, num_classes) + (1,) * (labels.dim() - 1))
    hot = labels.unsqueeze(1) == cls
    if ignore_index is not None:  # in int64: -100 compared with uint8 labels would wrap to 156
        hot &= (labels.long() != ignore_index).unsqueeze(1)
    return hot.to(dtype)


# ----------------------------------------------------------------------------- records passed between stages
class Sample(NamedTuple):
    """What :class:`PixelSampler` hands on: the batch's pixels (and prototypes) by class.

    Under ``torch.distributed`` (``gather_distributed=True``) these hold the global batch:
    every rank's rows, rank-major.

    Attributes:
        features: ``(C, S, D)`` sampled pixel embeddings (gradient flows to the input).
        valid: ``(C, S)`` bool, sampled positions that hold a pixel.
        unit: ``(C, S, D)`` the same, detached, float32 and L2-normalised (the keys).
        prototypes: ``(C, N, D)`` per-image class prototypes (Eq. 2), or None.
        prototypes_valid: ``(C, N)`` bool, or None.
    """

    features: torch.Tensor
    valid: torch.Tensor
    unit: torch.Tensor
    prototypes: Optional[torch.Tensor] = None
    prototypes_valid: Optional[torch.Tensor] = None


class Memory(NamedTuple):
    """A view of the memory bank for one call: ``features (C, L, D)``, ``valid (C, L)`` and
    the ``density (C, L)`` each entry had when it entered."""

    features: torch.Tensor
    valid: torch.Tensor
    density: torch.Tensor


class Mined(NamedTuple):
    """What :class:`AnchorKeyMiner` hands on.

    Attributes:
        anchors: ``(C, Q, D)`` anchors (gradient flows), ``anchor_valid (C, Q)``,
            ``anchor_density (C, Q)``.
        centers: ``(C, D)`` class centers of the positive keys (Eq. 8), ``centers_valid (C,)``.
        negatives: ``(C, P, D)`` negative keys, ``negative_valid (C, P)``.
        positive_density: ``(C, H)`` density of the batch positive keys,
            ``positive_valid (C, H)``.
        overlap: ``(C,)`` batch pixels chosen both as anchor and as positive key.
    """

    anchors: torch.Tensor
    anchor_valid: torch.Tensor
    anchor_density: torch.Tensor
    centers: torch.Tensor
    centers_valid: torch.Tensor
    negatives: torch.Tensor
    negative_valid: torch.Tensor
    positive_density: torch.Tensor
    positive_valid: torch.Tensor
    overlap: torch.Tensor


# ----------------------------------------------------------------------------- 1. sampling (and the one gather)
class PixelSampler(nn.Module):
    r"""Step 1: sample at most ``max_per_class`` labelled pixels of each class, uniformly
    without replacement, and (under ``torch.distributed``) gather the sample of every rank.

    This is the loss's only distributed stage. With ``gather_distributed=True`` and a process
    group of more than one rank, the sampled pixels and the per-image prototypes passed in
    are all-gathered in **one** collective, rank-major (in global batch order), with the
    gradient path of :func:`~torch_dacl.distributed.all_gather_with_grad`; every later stage
    then sees the global batch. ``max_per_class`` is a per-rank budget. Without a process
    group the gather is a no-op.

    Args:
        num_classes: ``C``.
        max_per_class: ``S``, the per-class pixel budget (512 in the loss).
        ignore_index: label value that takes no part (None: none); any label outside
            ``[0, C)`` is left out too.
        gather_distributed: gather across the ranks of the default process group.

    Example:
        >>> from torch_dacl.stages import PixelSampler
        >>> sampler = PixelSampler(num_classes=2, max_per_class=3)
        >>> labels = torch.tensor([[[0, 1], [1, -100]]])
        >>> s = sampler(torch.randn(1, 4, 2, 2), labels, generator=torch.Generator().manual_seed(0))
        >>> s.features.shape, s.valid.sum(1).tolist()
        (torch.Size([2, 3, 4]), [1, 2])
    """

    def __init__(self, num_classes: int, max_per_class: int = 512, ignore_index: Optional[int] = -100,
                 gather_distributed: bool = False) -> None:
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes)
        self.max_per_class = check_int("max_samples_per_class", max_per_class)
        self.ignore_index = check_optional_int("ignore_index", ignore_index)
        self.gather_distributed = bool(gather_distributed)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, max_per_class={self.max_per_class}, "
                f"ignore_index={self.ignore_index}, gather_distributed={self.gather_distributed}")

    @property
    def distributed(self) -> bool:
        """True when this sampler gathers (``gather_distributed`` and a process group of > 1 rank)."""
        return self.gather_distributed and _dist.is_distributed()

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        prototypes: Optional[torch.Tensor] = None,
        prototypes_valid: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        *,
        head=None,
        pool: Optional[torch.Tensor] = None,
        threshold: float = 0.5,
    ) -> Sample:
        """Sample ``embeddings (N, D, *S)`` by ``labels (N, *S)`` (int64, same spatial size).

        ``prototypes (N, C, D)`` and ``prototypes_valid (N, C)`` (from
        :class:`~torch_dacl.MaskedAveragePool`) travel with the sample; ``generator`` (on
        the labels' device) drives the shuffle.

        With ``head`` (the sparse head), ``embeddings`` is the feature map the head reads
        ``(N, F, *S)``: the pixels are chosen from the labels alone, their feature vectors
        gathered, and ``head`` run on them (:func:`apply_head`), so the head works, with
        gradient, at the sampled pixels only. ``pool`` then asks for the prototypes of
        Eq. 2 from the sampled pixels (:func:`sampled_prototypes`): ``pool`` is a
        ``(N, C, *S)`` probability map (:math:`T_n` = its value ``> threshold`` at each
        sampled pixel) or an empty tensor for the labels' one-hot masks.
        """
        n = embeddings.shape[0]
        p = math.prod(embeddings.shape[2:])
        flat = labels.reshape(-1).long()  # int64: an ignore_index of -100 would wrap against uint8 labels
        keep = None if self.ignore_index is None else flat != self.ignore_index
        idx, valid = DF.group_by_label(flat, self.num_classes, self.max_per_class, valid=keep, shuffle=True,
                                       generator=generator)
        feats = gather_points(embeddings, idx)  # (C, S, D or F): gradient flows to the sampled pixels only
        if prototypes is not None:
            prototypes, prototypes_valid = prototypes.transpose(0, 1), prototypes_valid.transpose(0, 1)
        if head is not None:
            feats = apply_head(head, feats, valid)
            if pool is not None:
                c, s = valid.shape
                if pool.numel():
                    masks = gather_points(pool, idx).reshape(c * s, -1) > threshold
                else:  # one-hot: a sampled pixel of group c has T_c set
                    masks = torch.eye(c, dtype=torch.bool, device=idx.device).repeat_interleave(s, 0)
                prototypes, prototypes_valid = sampled_prototypes(
                    feats.detach().reshape(c * s, -1), valid.reshape(-1), (idx // max(p, 1)).reshape(-1), masks, n)
        if self.distributed:
            feats, valid, prototypes, prototypes_valid = self._gather(feats, valid, prototypes, prototypes_valid)
        unit = F.normalize(feats.detach().float(), dim=-1)
        return Sample(feats, valid, unit, prototypes, prototypes_valid)

    @staticmethod
    def _gather(feats, valid, protos, pvalid):
        """One all-gather of everything this rank contributes, packed into one flat float32
        vector: ``[features (C*S*D) | valid (C*S) | prototypes (C*N*D) | valid (C*N)]``.

        The per-image prototypes make the vector's length differ between ranks when their
        local batches differ, so their sizes are exchanged first (one host synchronisation);
        without prototypes the length is the same on every rank and nothing is exchanged."""
        c, s, d = feats.shape
        parts = [feats.float().reshape(-1), valid.float().reshape(-1)]
        if protos is not None:
            parts += [protos.float().reshape(-1), pvalid.float().reshape(-1)]
        packed = torch.cat(parts)
        sizes = _dist.gather_sizes(packed.shape[0], packed.device, uniform=protos is None)
        out = _dist.all_gather_with_grad(packed, sizes=sizes)
        f, v, pf, pv = [], [], [], []
        for chunk in out.split(sizes):  # a loop over ranks
            f.append(chunk[:c * s * d].view(c, s, d))
            v.append(chunk[c * s * d:c * s * (d + 1)].view(c, s) > 0.5)
            if protos is not None:
                rest = chunk[c * s * (d + 1):]
                m = rest.shape[0] // (c * (d + 1))
                pf.append(rest[:c * m * d].view(c, m, d))
                pv.append(rest[c * m * d:].view(c, m) > 0.5)
        feats, valid = torch.cat(f, 1), torch.cat(v, 1)
        if protos is not None:
            protos, pvalid = torch.cat(pf, 1), torch.cat(pv, 1)
        return feats, valid, protos, pvalid


# ----------------------------------------------------------------------------- 3-5. anchors and keys
class AnchorKeyMiner(nn.Module):
    r"""Steps 3-5: anchors (Eq. 6), positive keys and their class centers (Eq. 7-8) and
    negative keys, from a :class:`Sample`, its density and the memory.

    * ``sampling="density"``: anchors are the ``num_anchors`` lowest-density candidates,
      batch positives the ``num_positives // 2`` highest-density sampled pixels, bank
      positives the ``num_positives - num_positives // 2`` entries of highest stored density.
      ``"random"``: the same counts from a random ranking (plain contrastive learning).
    * ``anchor_mode="pixel"``: anchors and batch positives are the two ends of **one**
      ranking of each class's sampled pixels (:func:`split_by_rank`), so they never coincide,
      even for a class with few pixels. ``"class"``: the anchors are the per-image class
      prototypes (Eq. 2) of the sample, ranked by their own density.
    * negatives: ``num_negatives`` sampled pixels of the other classes, drawn at random
      without replacement.

    Only the anchors carry a gradient; keys and centers are detached, L2-normalised.

    Example:
        >>> from torch_dacl.stages import AnchorKeyMiner, Sample
        >>> miner = AnchorKeyMiner(num_anchors=2, num_positives=4, num_negatives=3)
        >>> feats = torch.randn(2, 6, 4)
        >>> sample = Sample(feats, torch.ones(2, 6, dtype=torch.bool), torch.nn.functional.normalize(feats, dim=-1))
        >>> mined = miner(sample, torch.rand(2, 6))
        >>> mined.anchors.shape, mined.negatives.shape, mined.overlap.tolist()
        (torch.Size([2, 2, 4]), torch.Size([2, 3, 4]), [0, 0])
    """

    def __init__(self, num_anchors: int = 256, num_positives: int = 512, num_negatives: int = 512,
                 sampling: str = "density", anchor_mode: str = "pixel") -> None:
        super().__init__()
        self.num_anchors = check_int("num_anchors", num_anchors)
        self.num_positives = check_int("num_positives", num_positives)
        self.num_negatives = check_int("num_negatives", num_negatives)
        self.sampling = look_up_option("sampling", sampling, SAMPLINGS)
        self.anchor_mode = look_up_option("anchor_mode", anchor_mode, ANCHOR_MODES)

    def extra_repr(self) -> str:
        return (f"num_anchors={self.num_anchors}, num_positives={self.num_positives}, "
                f"num_negatives={self.num_negatives}, sampling={self.sampling!r}, anchor_mode={self.anchor_mode!r}")

    def _rank(self, density: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """The ranking key: the density, or uniform noise with ``sampling="random"``."""
        if self.sampling == "density":
            return density
        return torch.rand(density.shape, device=density.device, generator=generator)

    def forward(
        self,
        batch: Sample,
        density: torch.Tensor,
        prototype_density: Optional[torch.Tensor] = None,
        memory: Optional[Memory] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Mined:
        """Mine from ``batch`` with its ``density (C, S)``, the prototypes' density ``(C, N)``
        (``anchor_mode="class"``) and the memory (None: no bank positives)."""
        half = max(1, self.num_positives // 2)
        rank = self._rank(density, generator)
        if self.anchor_mode == "class":
            a_idx, a_valid = select_top(self._rank(prototype_density, generator), batch.prototypes_valid,
                                        self.num_anchors, largest=False)
            p_idx, p_valid = select_top(rank, batch.valid, half, largest=True)
            anchors, a_dens = gather_rows(batch.prototypes, a_idx), prototype_density.gather(1, a_idx)
            overlap = torch.zeros(density.shape[0], dtype=torch.long, device=density.device)  # protos vs pixels
        else:
            a_idx, a_valid, p_idx, p_valid = split_by_rank(rank, batch.valid, self.num_anchors, half)
            anchors, a_dens = gather_rows(batch.features, a_idx), density.gather(1, a_idx)
            overlap = count_shared(a_idx, a_valid, p_idx, p_valid, density.shape[1])
        pos, pos_valid = gather_rows(batch.unit, p_idx), p_valid
        if memory is not None:  # the bank's positives: highest stored density (Eq. 7)
            g_idx, g_valid = select_top(self._rank(memory.density, generator), memory.valid,
                                        self.num_positives - half, largest=True)
            pos = torch.cat([pos, F.normalize(gather_rows(memory.features, g_idx), dim=-1)], 1)
            pos_valid = torch.cat([pos_valid, g_valid], 1)
        centers, centers_valid = masked_mean(pos, pos_valid)  # Eq. 8
        negatives, neg_valid = self.negatives(batch.unit, batch.valid, generator)
        return Mined(anchors, a_valid, a_dens, centers, centers_valid, negatives, neg_valid,
                     density.gather(1, p_idx), p_valid, overlap)

    def negatives(self, unit: torch.Tensor, valid: torch.Tensor,
                  generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``num_negatives`` keys of the other classes for each class, without replacement:
        ``(C, P, D)`` and their validity ``(C, P)``."""
        c, s, d = unit.shape
        pool = unit.reshape(c * s, d)
        pool_cls = torch.arange(c, device=unit.device).repeat_interleave(s)
        ok = valid.reshape(1, c * s) & (pool_cls.unsqueeze(0) != torch.arange(c, device=unit.device).unsqueeze(1))
        k = min(self.num_negatives, c * s)
        keys = torch.rand(c, c * s, device=unit.device, generator=generator).masked_fill(~ok, -1.0)
        top = keys.topk(k, dim=1)
        return pool[top.indices], top.values >= 0


# ----------------------------------------------------------------------------- 6. Eq. 9-10
class SoftContrastiveTerm(nn.Module):
    r"""Step 6: the soft density-guided contrastive term (Eq. 9-10) and its reduction.

    Calls :func:`~torch_dacl.functional.soft_density_contrastive_loss_grouped` (options
    checked once, here) and :func:`~torch_dacl.functional.reduce_terms`.

    Args:
        temperature: :math:`\tau` (0.4).
        weighting: the positiveness weights :math:`w_i` of Eq. 9: ``"paper"`` (as written),
            ``"scale"`` (detached), ``"none"`` (:math:`w_i = 1`, Table 2 V), or a callable
            ``weighting(log_w, log_ratio) -> terms`` for another rule.
        gamma: :math:`\gamma`; None means ``1/N_q`` of the class.
        include_positive: add the positive to the denominator (not in Eq. 10).
        reduction: ``"mean"`` over contributing anchors, ``"sum"`` (Eq. 10) or ``"none"``
            (the ``(C, Q)`` terms, 0 where an anchor does not contribute).

    Example:
        >>> from torch_dacl.stages import SoftContrastiveTerm
        >>> term = SoftContrastiveTerm(weighting="none", reduction="sum")
        >>> loss, contributing = term(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool),
        ...                           torch.randn(2, 4), torch.randn(2, 5, 4))
        >>> loss.shape, int(contributing.sum())
        (torch.Size([]), 6)
    """

    def __init__(self, temperature: float = 0.4, weighting: Union[str, DF.WeightingFn] = "paper",
                 gamma: Optional[float] = None, include_positive: bool = False, reduction: str = "mean") -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.weighting = weighting if callable(weighting) else look_up_option("weighting", weighting, WEIGHTINGS)
        self.gamma = None if gamma is None else check_positive("gamma", gamma)
        self.include_positive = bool(include_positive)
        self.reduction = look_up_option("reduction", reduction, REDUCTIONS)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, weighting={self.weighting!r}, gamma={self.gamma}, "
                f"include_positive={self.include_positive}, reduction={self.reduction!r}")

    def forward(
        self,
        anchors: torch.Tensor,
        anchors_valid: torch.Tensor,
        centers: torch.Tensor,
        negatives: torch.Tensor,
        negatives_valid: Optional[torch.Tensor] = None,
        centers_valid: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loss, contributing (C, Q) bool)`` for grouped ``anchors (C, Q, D)``, ``centers
        (C, D)`` and ``negatives (C, P, D)``."""
        terms, contributing = DF.soft_density_contrastive_loss_grouped(
            anchors, anchors_valid, centers, negatives, negatives_valid, temperature=self.temperature,
            weighting=self.weighting, gamma=self.gamma, include_positive=self.include_positive,
            centers_valid=centers_valid, validate_args=False)
        return DF.reduce_terms(terms, contributing, self.reduction), contributing


# ----------------------------------------------------------------------------- 7. the bank's policy
class BankPolicy(nn.Module):
    r"""Step 7 and the bank's part in steps 2 and 4: what the loss reads from its
    :class:`~torch_dacl.ClassMemoryBank` and what it pushes, when.

    The policy holds no state (the bank does, in the loss's ``state_dict``).

    Args:
        source: ``"prototype"`` pushes the per-image class prototypes of the sample (Eq. 2);
            ``"pixel"`` pushes ``push_per_class`` randomly chosen sampled pixels per class
            (DGCL-style).
        push_per_class: pixels pushed per class per call with ``source="pixel"``.
        update_in_eval: push also in ``eval()`` mode (default False: a loss evaluated on
            validation data leaves its bank as it was).
        enabled: False is the loss without memory (Table 2 II-IV): :meth:`memory` is None
            and nothing is pushed.

    Example:
        >>> from torch_dacl import ClassMemoryBank
        >>> from torch_dacl.stages import BankPolicy, Sample
        >>> bank, policy = ClassMemoryBank(2, 4, size=8), BankPolicy(source="pixel", push_per_class=2)
        >>> feats = torch.randn(2, 3, 4)
        >>> sample = Sample(feats, torch.ones(2, 3, dtype=torch.bool), torch.nn.functional.normalize(feats, dim=-1))
        >>> policy.update(bank, sample, torch.zeros(2, 3), training=True)
        >>> bank.count.tolist(), policy.memory(bank).features.shape
        ([2, 2], torch.Size([2, 8, 4]))
    """

    def __init__(self, source: str = "prototype", push_per_class: int = 64, update_in_eval: bool = False,
                 enabled: bool = True) -> None:
        super().__init__()
        self.source = look_up_option("bank_source", source, BANK_SOURCES)
        self.push_per_class = check_int("bank_push_per_class", push_per_class)
        self.update_in_eval = bool(update_in_eval)
        self.enabled = bool(enabled)

    def extra_repr(self) -> str:
        return (f"source={self.source!r}, push_per_class={self.push_per_class}, "
                f"update_in_eval={self.update_in_eval}, enabled={self.enabled}")

    @property
    def stores_prototypes(self) -> bool:
        """True when the bank is used and takes prototypes (they must then be pooled)."""
        return self.enabled and self.source == "prototype"

    def memory(self, bank: ClassMemoryBank) -> Optional[Memory]:
        """The bank as the other stages read it, or None when the bank is off."""
        return Memory(bank.bank, bank.valid, bank.bank_density) if self.enabled else None

    def update(self, bank: ClassMemoryBank, batch: Sample, density: torch.Tensor,
               prototype_density: Optional[torch.Tensor] = None, training: bool = True,
               generator: Optional[torch.Generator] = None) -> None:
        """Push detached vectors and their densities (FIFO); a no-op when the bank is off or
        in evaluation (``training=False``) unless ``update_in_eval``."""
        if not self.enabled or not (training or self.update_in_eval):
            return
        c, s, d = batch.unit.shape
        if self.source == "prototype":
            feats, dens, valid = batch.prototypes.detach(), prototype_density, batch.prototypes_valid
        else:  # k pixels per class, drawn at random among the valid ones
            k = min(self.push_per_class, s)
            keys = torch.rand(batch.valid.shape, device=batch.valid.device, generator=generator)
            pick = keys.masked_fill(~batch.valid, -1.0).topk(k, dim=1).indices
            feats, dens, valid = gather_rows(batch.unit, pick), density.gather(1, pick), batch.valid.gather(1, pick)
        cls = torch.arange(c, device=valid.device).unsqueeze(1).expand_as(valid)
        bank.push(feats.reshape(-1, d), cls.reshape(-1), dens.reshape(-1), valid.reshape(-1))


# ----------------------------------------------------------------------------- the random state
_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A 63-bit hash of integers (splitmix64 finaliser), for seeding generators."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


class RandomStream:
    r"""The random state of a loss: a seed, set once, and a call counter.

    Call :math:`t` (the :math:`t`-th :meth:`next`) draws from generators seeded with a hash
    of ``(seed, t)``: the *shared* one, identical on every rank (negatives, random rankings,
    pixel pushes on the gathered sample), and, under ``torch.distributed``, a *local* one
    hashed with the rank too (each rank's own pixel sample). So the stream is a function of
    ``(seed, t, rank)``: :meth:`state` / :meth:`load_state` (the loss's
    ``get_extra_state`` / ``set_extra_state``) save and restore it exactly, on any device, and
    no call after the first communicates.

    The seed is ``seed`` when given, else drawn at the first call from the global CPU random
    stream (so ``torch.manual_seed`` before the first call fixes it); when distributed, rank
    0's draw is broadcast once (:func:`~torch_dacl.distributed.shared_seed`).

    Example:
        >>> from torch_dacl.stages import RandomStream
        >>> stream = RandomStream(seed=7)
        >>> a, _ = stream.next(torch.device("cpu"))
        >>> x = torch.rand(2, generator=a)
        >>> other = RandomStream()
        >>> other.load_state(RandomStream(seed=7).state())
        >>> b, _ = other.next(torch.device("cpu"))
        >>> torch.equal(x, torch.rand(2, generator=b)), stream.state().tolist()
        (True, [7, 1])
    """

    def __init__(self, seed: Optional[int] = None) -> None:
        self.seed = None if seed is None else check_int("seed", seed, minimum=0)
        self.calls = 0
        self._generators: dict = {}

    def __repr__(self) -> str:
        return f"RandomStream(seed={self.seed}, calls={self.calls})"

    def _generator(self, device: torch.device, role: str, seed: int) -> torch.Generator:
        key = (role, str(device))
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = torch.Generator(device=device)
        return gen.manual_seed(seed)

    def next(self, device: torch.device, distributed: bool = False) -> Tuple[torch.Generator, torch.Generator]:
        """``(shared, local)`` generators on ``device`` for one call (the same object unless
        ``distributed``); advances the counter."""
        device = torch.device(device)
        if self.seed is None:
            self.seed = _dist.shared_seed(device) if distributed else int(torch.randint(0, 2**62, (1,)))
        t, self.calls = self.calls, self.calls + 1
        shared = self._generator(device, "shared", _mix(self.seed, t))
        if not distributed:
            return shared, shared
        return shared, self._generator(device, "local", _mix(self.seed, t, _dist.rank() + 1))

    def state(self) -> torch.Tensor:
        """``int64 [seed, calls]`` (seed -1 before the first call without a ``seed``)."""
        return torch.tensor([-1 if self.seed is None else self.seed, self.calls], dtype=torch.long)

    def load_state(self, state: torch.Tensor) -> None:
        seed, calls = (int(v) for v in torch.as_tensor(state).reshape(-1).tolist())
        self.seed, self.calls = (None if seed < 0 else seed), calls
