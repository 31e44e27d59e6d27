"""The deterministic math of DACL (Tang et al., AAAI 2025), as pure functions.

Equation numbers refer to the paper ("Neighbor Does Matter: Density-Aware Contrastive
Learning for Medical Semi-supervised Segmentation", arXiv:2412.19871). The exact contracts
are those of the docs' Design decisions page, section 1.

Conventions
-----------
* All similarities are cosine similarities: functions that compare vectors
  (:func:`knn_density`, the contrastive loss) L2-normalise their inputs inside.
  :func:`masked_average_pool` averages the raw features.
* Every result is float32 whatever the input dtype; similarities and top-k run in float32
  with autocast disabled, gradients flow back to the input dtype.
* Two layouts. *Flat* functions take ``(Q, D)`` vectors with ``(Q,)`` labels and are the
  reference API (docs: Design decisions, 1). *Grouped* functions (``*_grouped``) take per-class padded
  tensors ``(C, S, D)`` with a validity mask ``(C, S)``; they have static shapes, no host
  synchronisation and compile with ``torch.compile(fullgraph=True)``. The flat functions
  group their input (one host synchronisation to size the padding) and call the grouped ones,
  so there is one implementation of each equation.
* Memory stays linear in the number of queries and in the bank size: similarity matrices
  are computed in chunks of queries (``chunk_elements`` bounds the elements of one chunk).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._validation import check_float, check_ks, check_labels, check_positive, check_rank, look_up_option
from .options import PRECISIONS, PSEUDO_POLICIES, REDUCTIONS, WEIGHTINGS

__all__ = [
    "masked_average_pool",
    "knn_density",
    "knn_density_grouped",
    "soft_density_contrastive_loss",
    "soft_density_contrastive_loss_grouped",
    "gaussian_rampup",
    "group_by_label",
    "sample_pixels_per_class",
    "cross_pseudo_supervision_loss",
    "dacl_labels",
    "reduce_terms",
]

WeightingFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_DEFAULT_CHUNK_ELEMENTS = 1 << 24  # 16M float32 = 64 MiB per similarity chunk (accelerators)
# on the CPU a chunk that stays in cache between the matmul and the top-k (8 MiB): with both models'
# groups in one call, 16M-element chunks were about 1.5x as slow on this project's CPU (one thread)
_CPU_CHUNK_ELEMENTS = 1 << 21
_INVALID_KEY = -3.0  # added to an invalid key's cosine: below any valid one (knn_density_grouped)


def _float32(device: torch.device):
    """Context in which matmuls run in float32 even inside an autocast region."""
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- Eq. 2
def masked_average_pool(
    features: torch.Tensor, probs: torch.Tensor, threshold: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Masked average pooling of class prototypes (Eq. 2).

    .. math:: v_n = \frac{\sum_{x} T_n(x)\, j(x)}{\sum_x T_n(x)},\qquad T_n = 1(M_n > \phi)

    Args:
        features: projected features ``j``, shape ``(N, D, *S)`` (2D ``S = (H, W)`` or 3D
            ``S = (D, H, W)``). Raw features are averaged (no normalisation).
        probs: class maps ``M``, shape ``(N, C, *S)``: probabilities or one-hot labels;
            or a bool map, taken as the masks :math:`T_n` themselves (no threshold).
        threshold: ``phi``; pixel ``x`` belongs to the mask of class ``n`` where
            ``probs[:, n, x] > threshold`` (float ``probs``).

    Returns:
        ``(prototypes, valid)``: prototypes ``(N, C, D)`` float32, where an empty mask gives
        a zero prototype, and ``valid (N, C)`` bool, False where the mask is empty.
        Gradients flow to ``features``. An empty batch (``N = 0``) gives ``(0, C, D)`` and
        ``(0, C)``; a zero-size image (a spatial size 0) gives zero prototypes, all invalid.

    Example:
        >>> feats = torch.randn(2, 8, 16, 16)
        >>> probs = torch.softmax(torch.randn(2, 4, 16, 16), dim=1)
        >>> protos, valid = masked_average_pool(feats, probs, threshold=0.3)
        >>> protos.shape, valid.shape
        (torch.Size([2, 4, 8]), torch.Size([2, 4]))
    """
    check_rank("features", features, (4, 5), "(N, D, *spatial)")
    check_rank("probs", probs, (4, 5), "(N, C, *spatial)")
    check_float("features", features)
    if probs.shape[0] != features.shape[0] or probs.shape[2:] != features.shape[2:]:
        raise ValueError(
            f"probs: expected shape (N, C, *spatial) = ({features.shape[0]}, C, "
            f"{', '.join(map(str, features.shape[2:]))}) to match features {tuple(features.shape)}, "
            f"got {tuple(probs.shape)}"
        )
    n, d = features.shape[:2]
    c = probs.shape[1]
    p = math.prod(features.shape[2:])  # not -1: ambiguous on an empty batch (N = 0)
    with _float32(features.device):
        mask = probs.reshape(n, c, p)
        mask = (mask if mask.dtype == torch.bool else mask > threshold).to(torch.float32)
        # (N, C, P) @ (N, P, D): the features' transposed view, no copy of the map (an einsum
        # copied it into (N, P, D) first: 3x the time at 8 x 32 x 128 x 128)
        sums = torch.bmm(mask, features.reshape(n, d, p).to(torch.float32).transpose(1, 2))
        counts = mask.sum(-1)
    prototypes = sums / counts.clamp_min(1.0).unsqueeze(-1)
    return prototypes, counts > 0


# ----------------------------------------------------------------------------- grouping
def group_by_label(
    labels: torch.Tensor,
    num_classes: int,
    max_per_class: int,
    valid: Optional[torch.Tensor] = None,
    shuffle: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Group the positions of a flat label vector by class into a padded index table.

    Vectorised (one stable sort, no loop over classes, no host synchronisation).

    Args:
        labels: ``(M,)`` integer labels.
        num_classes: ``C``. Labels outside ``[0, C)`` and positions where ``valid`` is False
            are left out.
        max_per_class: ``S``, the width of the table; a class with more members keeps the
            first ``S`` (in input order, or in random order when ``shuffle``).
        valid: optional ``(M,)`` bool mask of the positions to consider.
        shuffle: randomise the order within each class (uniform sampling without
            replacement). The random keys have ``31 - C.bit_length()`` bits below 128 classes
            (28 at 4 classes, 27 at 14), 31 above; tied keys, about ``m**2 / 2**(bits + 1)``
            pairs among ``m`` pixels of a class (32 at 131,072 pixels and 28 bits), keep an
            arbitrary order, which matters only where a tie straddles the ``S``-th place.
        generator: optional random generator for ``shuffle``.

    Returns:
        ``(index, mask)``: ``index (C, S)`` int64 positions into ``labels`` (0 where padded)
        and ``mask (C, S)`` bool, True for real entries.

    Example:
        >>> index, mask = group_by_label(torch.tensor([1, 0, 1, 2, 1]), num_classes=3, max_per_class=2)
        >>> index.tolist(), mask.tolist()
        ([[1, 0], [0, 2], [3, 0]], [[True, False], [True, True], [True, False]])
    """
    labels = labels.reshape(-1)
    m = labels.numel()
    device = labels.device
    wide = labels.long()  # a narrow dtype would wrap num_classes (uint8: 300 -> 44) in the comparison
    keep = (wide >= 0) & (wide < num_classes)
    if valid is not None:
        keep &= valid.reshape(-1).to(torch.bool)
    eff = torch.where(keep, wide, torch.full_like(labels, num_classes, dtype=torch.long))
    if shuffle:  # one sort of (class, random key): half the time of randperm + a stable sort
        # class and key packed in 31 bits (an int32 sort: half the time of an int64 one) while
        # that leaves the key 24 bits or more (up to 127 classes), else a 31-bit key in int64
        bits = 31 - num_classes.bit_length()
        dtype = torch.int32 if bits >= 24 else torch.int64
        bits = bits if bits >= 24 else 31
        rnd = torch.randint(0, 2 ** bits, (m,), device=device, generator=generator, dtype=dtype)
        order = torch.argsort(eff.to(dtype) * 2 ** bits + rnd)
    else:
        order = torch.argsort(eff, stable=True)
    counts = torch.bincount(eff, minlength=num_classes + 1)[:num_classes]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(max_per_class, device=device)
    pos = starts.unsqueeze(1) + slot.unsqueeze(0)  # (C, S)
    mask = slot.unsqueeze(0) < counts.unsqueeze(1)
    pos = torch.where(mask, pos, torch.zeros_like(pos)).clamp_max(max(m - 1, 0))
    index = order[pos] if m > 0 else torch.zeros_like(pos)
    index = torch.where(mask, index, torch.zeros_like(index))
    return index, mask


def sample_pixels_per_class(
    labels: torch.Tensor,
    num_classes: int,
    max_per_class: int,
    ignore_index: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample at most ``max_per_class`` pixels of each class uniformly without replacement.

    The pixel-sampling step before Eq. 3-6: dense label maps have far more pixels than a
    kNN graph can hold, so each class is subsampled to a fixed budget (static shapes).

    Args:
        labels: label map of any shape, e.g. ``(N, H, W)`` or ``(N, D, H, W)``; positions
            are returned as indices into ``labels.reshape(-1)``.
        num_classes: ``C``.
        max_per_class: ``S``.
        ignore_index: label value to skip (besides any value outside ``[0, C)``).
        generator: optional random generator.

    Returns:
        ``(index (C, S) int64, mask (C, S) bool)`` as :func:`group_by_label`.

    Example:
        >>> labels = torch.tensor([[0, 1, 1, 255]])
        >>> idx, mask = sample_pixels_per_class(labels, num_classes=2, max_per_class=3, ignore_index=255)
        >>> mask.tolist()
        [[True, False, False], [True, True, False]]
    """
    flat = labels.reshape(-1).long()  # int64: -100 compared with uint8 labels would wrap to 156
    valid = None if ignore_index is None else flat != ignore_index
    return group_by_label(flat, num_classes, max_per_class, valid=valid, shuffle=True, generator=generator)


def _scatter_back(values: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of grouping: place ``values (C, S)`` at ``index`` in a zero vector of ``size``."""
    out = values.new_zeros(size)
    src = torch.where(mask, values, torch.zeros_like(values))
    return out.index_add(0, index.reshape(-1), src.reshape(-1))


def _num_classes_from(labels: torch.Tensor, *others: Optional[torch.Tensor]) -> int:
    for t in others:
        if t is not None:
            return int(t.shape[0])
    return int(labels.max()) + 1 if labels.numel() else 1


# ----------------------------------------------------------------------------- Eq. 3-5
def _multi_scale_topk_mean(sims: torch.Tensor, num_valid: torch.Tensor, ks: Tuple[int, ...],
                           block: int = 0) -> torch.Tensor:
    """Mean over ``ks`` of the mean of the ``min(k, num_valid)`` largest entries (Eq. 3, 5).

    ``sims (..., M)`` ranks its invalid entries below the valid ones (any lower value: the
    first ``num_valid`` of the sorted top are the valid ones and only those are read);
    ``num_valid (...)`` counts the valid entries. ``block``: see :func:`_topk_values`.
    """
    kmax = min(max(ks), sims.shape[-1])
    if kmax == 0:
        return torch.full(num_valid.shape, -1.0, dtype=torch.float32, device=sims.device)
    top = _topk_values(sims, kmax, block)
    # entries past num_valid are never read; zero them so that the cumulative sum stays finite
    top = torch.where(torch.arange(kmax, device=sims.device) < num_valid.unsqueeze(-1), top, torch.zeros_like(top))
    csum = top.cumsum(-1)
    total = torch.zeros(num_valid.shape, dtype=torch.float32, device=sims.device)
    for k in ks:  # a handful of scales, not classes or pixels
        kk = num_valid.clamp(max=min(k, kmax))
        picked = csum.gather(-1, (kk - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
        total = total + picked / kk.clamp_min(1)
    density = total / len(ks)
    return torch.where(num_valid > 0, density, torch.full_like(density, -1.0))


def _topk_values(x: torch.Tensor, k: int, block: int = 0) -> torch.Tensor:
    """``x.topk(k, dim=-1).values``, exactly (the same values, sorted descending), through a
    pre-selection when ``block`` > 0 (:func:`_topk_plan` chooses it; ``x.shape[-1]`` must then
    be a multiple of ``block``).

    The pre-selection: the ``W`` columns of a row are split into ``W / block`` groups of
    ``block`` columns (group ``j``: columns ``j, j + W/block, j + 2W/block, ...``). The ``k``
    groups with the largest maxima (ties: any of them) hold every entry of the row's top ``k``,
    so one top-k over the ``W / block`` group maxima and one over those groups' ``k * block``
    entries give the row's top ``k``. Why: let ``t`` be the ``k``-th largest group maximum.
    Every entry above ``t`` lies in a group whose maximum is above ``t``, and all such groups
    are chosen; the chosen groups hold ``k`` entries (their maxima) of at least ``t``. So for
    each ``i <= k`` the chosen entries hold as many entries >= the row's ``i``-th largest value
    as the row does, and the sorted top ``k`` values agree, ties included.

    Why not one top-k: ATen's CPU top-k copies each row into a buffer of (value, index) pairs
    and selects there, about 5 ns per entry on this project's CPU; the group maxima are one
    vectorised pass. Measured with torch 2.14 on one thread, 1024 rows, ``k = 32``: 6.9 ms at
    1512 columns with ``block = 8`` against 13.9 ms for ``topk`` (10.3 ms when padded to 2048
    columns, its faster heap path).
    """
    w = x.shape[-1]
    if block < 2 or w % block or w // block < k:
        return x.topk(k, dim=-1).values
    lead = x.shape[:-1]
    groups = x.reshape(*lead, block, w // block)  # groups[..., i, j]: column j + i * W / block
    chosen = groups.amax(-2).topk(k, dim=-1).indices  # (..., k) groups with the largest maxima
    entries = groups.gather(-1, chosen.unsqueeze(-2).expand(*lead, block, k)).flatten(-2)
    return entries.topk(k, dim=-1).values


def _topk_plan(width: int, k: int, device: torch.device) -> Tuple[int, int]:
    """``(padding, block)`` of the top-``k`` over rows of ``width`` keys (:func:`_topk_values`).

    On the CPU, ``block`` is the power of two nearest ``sqrt(width / k)`` within ``[2, 16]``
    (it balances the two top-k's of the pre-selection, over ``width / block`` group maxima and
    ``k * block`` entries) and the keys are padded to a multiple of it (fewer than ``block``
    columns, masked out as invalid keys), for rows of at least ``16 k`` keys (at least ``4 k``
    groups); narrower rows get ``(0, 0)``: one plain top-k, as cheap there. On other
    devices the top-k kernels have no such cost (``(0, 0)``). The result is the same either
    way; only the time differs.
    """
    if device.type != "cpu" or k < 1 or width < 16 * k:
        return 0, 0
    block = 1 << max(1, min(4, round(math.log2(math.sqrt(width / k)))))
    return -width % block, block


def knn_density_grouped(
    features: torch.Tensor,
    valid: torch.Tensor,
    ks: Sequence[int],
    bank: Optional[torch.Tensor] = None,
    bank_valid: Optional[torch.Tensor] = None,
    chunk_elements: Optional[int] = None,
    *,
    precision: str = "float32",
    validate_args: bool = True,
) -> torch.Tensor:
    r"""Multi-scale kNN density of per-class groups of queries (Eq. 3-5), grouped layout.

    For query ``v`` of class ``n`` the neighbours are the other valid queries of group ``n``
    and the valid bank entries of class ``n`` (:math:`\mathcal{G}_n \cup \mathcal{V}_n`).
    :math:`d^k_v` is the mean cosine similarity to the ``min(k, #neighbours)`` most similar
    neighbours (Eq. 3), and :math:`d_v` the mean over ``ks`` (Eq. 4-5). A query with no
    neighbour gets -1. No gradient flows through the result. On the CPU the top-k of wide rows
    runs as an exact pre-selection of column groups (the values of ``torch.topk``, faster;
    docs: Design decisions, 3.12).

    Args:
        features: ``(C, S, D)`` queries grouped by class.
        valid: ``(C, S)`` bool, True for real queries.
        ks: neighbourhood sizes, e.g. ``(8, 16, 32)``.
        bank: optional ``(C, L, D)`` memory bank.
        bank_valid: optional ``(C, L)`` bool; all True when omitted.
        chunk_elements: bound on the elements of one similarity chunk (memory linear in
            ``S`` and ``L``); None: 2M on the CPU (a chunk that stays in cache from the matmul
            to the top-k), 16M elsewhere.
        precision: ``"float32"`` (default) or ``"bfloat16"``: the similarity matmul on
            bfloat16 inputs, accumulated in float32 by the matmul kernels, its output rounded
            to bfloat16 (a cosine to about 3 significant digits); the top-k and the means run
            in float32. Faster where the hardware has bfloat16 matmul units (GPUs, CPUs with
            AVX512-BF16 or AMX); elsewhere slower. Neighbours whose similarities tie after the
            rounding may swap ranks, so densities differ from float32 by about 1e-2.
        validate_args: check ``ks``; callers that checked it once (the modules, in
            ``__init__``) pass False.

    Returns:
        ``(C, S)`` float32 densities in ``[-1, 1]``; -1 at padded positions.

    Compiles with ``torch.compile(fullgraph=True)`` (static shapes, no host sync).

    Example:
        >>> feats = torch.randn(3, 5, 8)  # 3 classes, up to 5 queries each
        >>> valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [False] * 5])
        >>> dens = knn_density_grouped(feats, valid, ks=(2, 4), bank=torch.randn(3, 10, 8))
        >>> dens.shape, dens[1, 3:].tolist()
        (torch.Size([3, 5]), [-1.0, -1.0])
    """
    if validate_args:
        ks = check_ks(ks)
        look_up_option("precision", precision, PRECISIONS)
    c, s, d = features.shape
    dev = features.device
    with torch.no_grad(), _float32(dev):
        q = F.normalize(features.detach().to(torch.float32), dim=-1)
        valid = valid.to(torch.bool)
        keys, keys_valid = q, valid
        if bank is not None:  # one key set per class: the batch's queries, then the bank
            b = F.normalize(bank.detach().to(torch.float32), dim=-1)
            bvalid = torch.ones(b.shape[:2], dtype=torch.bool, device=dev) if bank_valid is None \
                else bank_valid.to(torch.bool)
            keys, keys_valid = torch.cat([q, b], 1), torch.cat([valid, bvalid], 1)
        # neighbours of a valid query: the other valid queries and the valid bank entries
        num_nb = (valid.sum(-1) - 1).clamp_min(0) + (keys_valid[:, s:].sum(-1) if bank is not None else 0)
        pad, block = _topk_plan(keys.shape[1], min(max(ks), keys.shape[1]), dev)
        if pad:  # padded keys are masked out below; see _topk_plan
            keys, keys_valid = F.pad(keys, (0, 0, 0, pad)), F.pad(keys_valid, (0, pad))
        width = keys.shape[1]
        # Invalid keys must rank below every valid one. One extra coordinate does it inside the
        # matmul: queries get a 1, keys 0 (valid) or -3 (invalid), so an invalid key's
        # similarity is its cosine - 3 < -1 <= any valid cosine. Only the top
        # min(k, #neighbours) entries of a row are ever read, all valid. (A broadcast -inf
        # bias made baddbmm copy the whole (C, S, width) bias first: 37 ms of 90.)
        q1 = F.pad(q, (0, 1), value=1.0)
        keys_t = torch.cat([keys, (~keys_valid).unsqueeze(-1).to(keys.dtype) * _INVALID_KEY], -1).transpose(1, 2)
        if precision == "bfloat16":
            q1, keys_t = q1.to(torch.bfloat16), keys_t.to(torch.bfloat16)
        if chunk_elements is None:
            chunk_elements = _CPU_CHUNK_ELEMENTS if dev.type == "cpu" else _DEFAULT_CHUNK_ELEMENTS
        chunk = max(1, min(s, chunk_elements // max(1, c * width)))
        out = []
        for start in range(0, s, chunk):  # chunks of queries bound the memory
            qc = q1[:, start:start + chunk]
            sims = torch.bmm(qc, keys_t).float()  # (C, chunk, width); float32 already unless bfloat16
            sims.diagonal(offset=start, dim1=1, dim2=2).fill_(_INVALID_KEY - 1.0)  # a query is not its neighbour
            nv = num_nb.unsqueeze(1).expand(c, qc.shape[1])
            out.append(_multi_scale_topk_mean(sims, nv, ks, block))
        dens = torch.cat(out, dim=1) if out else torch.zeros(c, 0, dtype=torch.float32, device=dev)
        return torch.where(valid, dens, torch.full_like(dens, -1.0))


def knn_density(
    features: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int],
    bank: Optional[torch.Tensor] = None,
    bank_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Multi-scale kNN feature density (Eq. 3-5), flat layout (docs: Design decisions, 1).

    .. math:: d^k_v = \frac{1}{|NN_k(v)|}\sum_{r\in NN_k(v)} \tilde f_r^\top \tilde f_v,
              \qquad d_v = \frac{1}{|ks|}\sum_{k\in ks} d^k_v

    The neighbours of query ``i`` are the other queries with the same label (never ``i``
    itself) and the valid bank entries of its label; ``|NN_k| = min(k, #neighbours)``.
    A query with no neighbour gets -1 (the lowest possible density). No gradient flows.

    Args:
        features: ``(Q, D)`` queries.
        labels: ``(Q,)`` int64 in ``[0, C)``.
        ks: sequence of ints >= 1 (``(8, 16, 32)`` in the paper's setting; see docs: Design decisions, 3.2).
        bank: optional ``(C, L, D)`` class memory bank.
        bank_valid: optional ``(C, L)`` bool mask of filled bank slots.

    Returns:
        ``(Q,)`` float32 densities in ``[-1, 1]``.

    Note:
        Grouping the queries by class costs one host synchronisation (to size the padding);
        :class:`~torch_dacl.SoftDensityContrastiveLoss` uses :func:`knn_density_grouped`
        with a fixed per-class budget instead.

    Example:
        >>> feats = torch.randn(10, 4)
        >>> labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
        >>> knn_density(feats, labels, ks=(1, 2)).shape
        torch.Size([10])
    """
    ks = check_ks(ks)
    check_rank("features", features, (2,), "(Q, D)")
    check_float("features", features)
    check_rank("labels", labels, (1,), "(Q,)")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels: expected shape ({features.shape[0]},) to match features {tuple(features.shape)}, "
                         f"got {tuple(labels.shape)}")
    if bank is not None:
        check_rank("bank", bank, (3,), "(C, L, D)")
        if bank.shape[-1] != features.shape[-1]:
            raise ValueError(f"bank: expected feature dim D={features.shape[-1]} as in features, "
                             f"got shape {tuple(bank.shape)}")
        if bank_valid is not None and bank_valid.shape != bank.shape[:2]:
            raise ValueError(f"bank_valid: expected shape {tuple(bank.shape[:2])}, got {tuple(bank_valid.shape)}")
    c = _num_classes_from(labels, bank)
    check_labels("labels", labels, c)
    q = features.shape[0]
    if q == 0:
        return torch.zeros(0, dtype=torch.float32, device=features.device)
    width = int(torch.bincount(labels, minlength=c).max())  # host sync: size of the padding
    index, mask = group_by_label(labels, c, width)
    dens = knn_density_grouped(features[index], mask, ks, bank, bank_valid)
    return _scatter_back(dens, index, mask, q)


# ----------------------------------------------------------------------------- Eq. 9-10
class _LogSumExp(torch.autograd.Function):
    """``torch.logsumexp(x, -1)`` whose backward reuses the forward's exponentials: the
    gradient is ``softmax(x) * grad``, one pass over ``x`` where the built-in recomputes the
    exponentials (two passes more over the ``(C, Q, P)`` negative logits of Eq. 10)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        mx = x.amax(-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))  # an all -inf row: lse -inf
        e = (x - mx).exp_()
        total = e.sum(-1, keepdim=True)
        ctx.save_for_backward(e, total)
        return (total.log() + mx).squeeze(-1)

    @staticmethod
    @once_differentiable  # (the saved exponentials carry no graph: no double backward)
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        e, total = ctx.saved_tensors
        scale = torch.where(total > 0, grad.unsqueeze(-1) / total, torch.zeros_like(total))  # all -inf row: 0
        return e * scale


def soft_density_contrastive_loss_grouped(
    anchors: torch.Tensor,
    anchors_valid: torch.Tensor,
    centers: torch.Tensor,
    negatives: torch.Tensor,
    negatives_valid: Optional[torch.Tensor] = None,
    temperature: float = 0.4,
    weighting: Union[str, WeightingFn] = "paper",
    gamma: Optional[float] = None,
    include_positive: bool = False,
    centers_valid: Optional[torch.Tensor] = None,
    *,
    validate_args: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Per-anchor terms of the soft density-guided contrastive loss (Eq. 9-10), grouped.

    For anchor :math:`m_i` of class :math:`n` (all vectors L2-normalised):

    .. math::
        s_i = m_i\cdot c_n/\tau,\qquad
        w_i = \frac{1}{\gamma}\,\mathrm{softmax}_{j\in\mathcal{M}^n}(m_j\cdot c_n)_i,\qquad
        \ell_i = -\log\frac{w_i\,e^{s_i}}{\sum_{p\in\mathcal{P}^{n,-}} e^{m_i\cdot p/\tau}}

    ``gamma=None`` means :math:`\gamma = 1/|\mathcal{M}^n|` so the weights of a class average
    1. ``weighting="paper"`` is Eq. 9-10 as written (gradient flows through :math:`w_i`);
    ``"scale"`` detaches :math:`w_i` and uses :math:`-w_i\log(e^{s_i}/\Sigma)`; ``"none"``
    sets :math:`w_i=1`. A callable ``weighting(log_w, log_ratio) -> terms`` plugs in another
    rule: it receives :math:`\log w_i` and :math:`\log(e^{s_i}/\Sigma)`, both ``(C, Q)``, and
    returns the ``(C, Q)`` terms (``"paper"`` is ``-(log_w + log_ratio)``).
    ``include_positive`` adds :math:`e^{s_i}` to the denominator (InfoNCE form; a deviation
    from Eq. 10, off by default).

    Args:
        anchors: ``(C, Q, D)`` anchors grouped by class (gradient flows).
        anchors_valid: ``(C, Q)`` bool.
        centers: ``(C, D)`` positive centers :math:`p^{n,+}_{center}` (Eq. 8).
        negatives: ``(C, P, D)`` negative keys of each class.
        negatives_valid: ``(C, P)`` bool; all True when omitted.
        temperature: :math:`\tau` (0.4 in the paper).
        weighting: ``"paper"``, ``"scale"``, ``"none"`` or a callable (see above).
        gamma: :math:`\gamma` or None.
        include_positive: add the positive to the denominator.
        centers_valid: ``(C,)`` bool; all True when omitted.
        validate_args: check ``weighting``, ``temperature`` and ``gamma``; callers that
            checked them once (the modules, in ``__init__``) pass False.

    Returns:
        ``(terms (C, Q) float32, contributing (C, Q) bool)``. An anchor contributes when it
        is valid, its class has a valid center and at least one valid negative; other terms
        are 0 (connected to the graph of ``anchors``).

    Compiles with ``torch.compile(fullgraph=True)``.

    Example:
        >>> anchors = torch.randn(2, 4, 8, requires_grad=True)  # 2 classes, 4 anchors each
        >>> terms, contributing = soft_density_contrastive_loss_grouped(
        ...     anchors, torch.ones(2, 4, dtype=torch.bool), torch.randn(2, 8), torch.randn(2, 6, 8))
        >>> terms.shape, int(contributing.sum())
        (torch.Size([2, 4]), 8)
    """
    if validate_args:
        if not callable(weighting):
            look_up_option("weighting", weighting, WEIGHTINGS)
        check_positive("temperature", temperature)
        if gamma is not None:
            check_positive("gamma", gamma)
    c, q, d = anchors.shape
    dev = anchors.device
    if negatives_valid is None:
        negatives_valid = torch.ones(negatives.shape[:2], dtype=torch.bool, device=dev)
    if centers_valid is None:
        centers_valid = torch.ones(c, dtype=torch.bool, device=dev)
    anchors_valid = anchors_valid.to(torch.bool)
    negatives_valid = negatives_valid.to(torch.bool)
    has_neg = negatives_valid.any(-1)  # (C,)
    # a class without any valid negative keeps finite logits (its terms are masked below)
    neg_mask = negatives_valid | ~has_neg.unsqueeze(-1)
    # invalid negatives enter through the bias of one fused matmul, which also divides by tau
    bias = torch.zeros(neg_mask.shape, dtype=torch.float32, device=dev).masked_fill_(~neg_mask, float("-inf")).unsqueeze(1)
    with _float32(dev):
        m = F.normalize(anchors.to(torch.float32), dim=-1)
        cen = F.normalize(centers.to(torch.float32), dim=-1)
        neg = F.normalize(negatives.to(torch.float32), dim=-1)
        cos_pos = torch.einsum("cqd,cd->cq", m, cen)
        s = cos_pos / temperature
        neg_logits = torch.baddbmm(bias, m, neg.transpose(1, 2), alpha=1.0 / temperature)  # (C, Q, P)
    if include_positive:
        neg_logits = torch.cat([s.unsqueeze(-1), neg_logits], dim=-1)
    lse = _LogSumExp.apply(neg_logits)  # (C, Q)
    contributing = anchors_valid & (has_neg & centers_valid).unsqueeze(-1)
    log_ratio = s - lse
    if weighting == "none":
        terms = -log_ratio
    else:
        n_anchor = anchors_valid.sum(-1, keepdim=True)  # (C, 1)
        logits = torch.where(anchors_valid, cos_pos, torch.full_like(cos_pos, float("-inf")))
        logits = torch.where(n_anchor > 0, logits, torch.zeros_like(logits))
        log_sm = torch.log_softmax(logits, dim=-1)
        log_inv_gamma = n_anchor.clamp_min(1).to(torch.float32).log() if gamma is None else -math.log(gamma)
        log_w = log_sm + log_inv_gamma
        if weighting == "paper":
            terms = -(log_w + log_ratio)
        elif weighting == "scale":
            terms = -torch.exp(log_w).detach() * log_ratio
        else:  # a callable
            terms = weighting(log_w, log_ratio)
    terms = torch.where(contributing, terms, torch.zeros_like(terms))
    return terms, contributing


def reduce_terms(terms: torch.Tensor, contributing: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Reduce per-anchor terms (any shape) over the contributing anchors.

    ``"mean"``: sum over the contributing anchors divided by their number (0 connected to
    the graph when none contributes); ``"sum"``: the sum (Eq. 10); ``"none"``: ``terms``
    unchanged (0 where an anchor does not contribute). ``reduction`` is not checked here
    (the callers check it once).

    Example:
        >>> terms, contributing = torch.tensor([[1.0, 3.0, 0.0]]), torch.tensor([[True, True, False]])
        >>> reduce_terms(terms, contributing, "mean").item(), reduce_terms(terms, contributing, "sum").item()
        (2.0, 4.0)
    """
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.sum() / contributing.sum().clamp_min(1)
    return terms


def soft_density_contrastive_loss(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    centers: torch.Tensor,
    negatives: torch.Tensor,
    negatives_valid: Optional[torch.Tensor] = None,
    temperature: float = 0.4,
    weighting: str = "paper",
    gamma: Optional[float] = None,
    include_positive: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Soft density-guided contrastive loss (Eq. 9-10), flat layout (docs: Design decisions, 1).

    .. math::
        \mathcal{L}_{contra} = -\sum_{n}\sum_{m_i\in\mathcal{M}^n}
        \log\frac{w_i \exp(m_i\cdot p^{n,+}_{center}/\tau)}
                 {\sum_{p\in\mathcal{P}^{n,-}}\exp(m_i\cdot p/\tau)}

    with :math:`w_i` of Eq. 9 (see :func:`soft_density_contrastive_loss_grouped` for the
    weighting options). All vectors are L2-normalised inside.

    Args:
        anchors: ``(A, D)`` anchors :math:`m_i` (low-density features, Eq. 6).
        anchor_labels: ``(A,)`` int64 class of each anchor, in ``[0, C)``.
        centers: ``(C, D)`` class centers from the positive keys (Eq. 7-8).
        negatives: ``(C, P, D)`` the negative set :math:`\mathcal{P}^{n,-}` of each class.
        negatives_valid: ``(C, P)`` bool mask; all True when omitted.
        temperature: :math:`\tau > 0`.
        weighting: ``"paper"`` (Eq. 9-10 as written), ``"scale"`` or ``"none"``.
        gamma: :math:`\gamma`; None means ``1 / (number of anchors of the class)``.
        include_positive: add :math:`\exp(s_i)` to the denominator (not in Eq. 10).
        reduction: ``"mean"`` over contributing anchors, ``"sum"`` (Eq. 10), or ``"none"``
            for ``(A,)`` terms with 0 for anchors that do not contribute.

    Returns:
        The loss (float32). A class with no valid negative contributes nothing; with no
        contributing anchor the result is a zero connected to the graph of ``anchors``.

    Note:
        Grouping the anchors costs one host synchronisation;
        :func:`soft_density_contrastive_loss_grouped` has none.

    Example:
        >>> anchors = torch.randn(6, 8, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 0, 1, 1, 1])
        >>> loss = soft_density_contrastive_loss(anchors, labels, torch.randn(2, 8), torch.randn(2, 5, 8))
        >>> loss.backward()
        >>> bool(torch.isfinite(anchors.grad).all())
        True
    """
    look_up_option("reduction", reduction, REDUCTIONS)
    check_rank("anchors", anchors, (2,), "(A, D)")
    check_float("anchors", anchors)
    check_rank("anchor_labels", anchor_labels, (1,), "(A,)")
    check_rank("centers", centers, (2,), "(C, D)")
    check_rank("negatives", negatives, (3,), "(C, P, D)")
    a, d = anchors.shape
    c = centers.shape[0]
    if anchor_labels.shape[0] != a:
        raise ValueError(f"anchor_labels: expected shape ({a},) to match anchors {tuple(anchors.shape)}, "
                         f"got {tuple(anchor_labels.shape)}")
    if centers.shape[1] != d:
        raise ValueError(f"centers: expected shape ({c}, {d}) (D as in anchors), got {tuple(centers.shape)}")
    if negatives.shape[0] != c or negatives.shape[2] != d:
        raise ValueError(f"negatives: expected shape ({c}, P, {d}), got {tuple(negatives.shape)}")
    if negatives_valid is not None and negatives_valid.shape != negatives.shape[:2]:
        raise ValueError(f"negatives_valid: expected shape {tuple(negatives.shape[:2])}, "
                         f"got {tuple(negatives_valid.shape)}")
    check_labels("anchor_labels", anchor_labels, c)
    width = int(torch.bincount(anchor_labels, minlength=c).max()) if a else 0  # host sync
    index, mask = group_by_label(anchor_labels, c, width)
    terms, contributing = soft_density_contrastive_loss_grouped(
        anchors[index], mask, centers, negatives, negatives_valid,
        temperature=temperature, weighting=weighting, gamma=gamma, include_positive=include_positive,
    )
    if reduction == "none":
        return _scatter_back(terms, index, mask, a)
    return reduce_terms(terms, contributing, reduction)


# ----------------------------------------------------------------------------- Eq. 1
def gaussian_rampup(step: float, total_steps: float, max_weight: float = 0.1, warmup_steps: float = 1000) -> float:
    r"""Gaussian ramp-up of :math:`\lambda_{CL}` (Eq. 1).

    .. math:: \lambda(t) = 0.1\, e^{-5(1 - t/t_{max})^2}

    0 while ``step < warmup_steps`` (the paper's first 1,000 iterations), else
    ``max_weight * exp(-5 * (1 - min(step / total_steps, 1)) ** 2)``.

    Example:
        >>> gaussian_rampup(30000, 30000)
        0.1
        >>> gaussian_rampup(500, 30000)
        0.0
    """
    if not total_steps > 0:  # (NaN too)
        raise ValueError(f"total_steps: expected a value > 0, got {total_steps!r}")
    if step < warmup_steps:
        return 0.0
    t = min(float(step) / float(total_steps), 1.0)
    return float(max_weight) * math.exp(-5.0 * (1.0 - t) ** 2)


# ----------------------------------------------------------------------------- DACL labels
def dacl_labels(
    labels: torch.Tensor,
    labeled: torch.Tensor,
    logits_other: torch.Tensor,
    policy: str = "fixed",
    confidence: float = 0.95,
    fraction: float = 0.5,
    ignore_index: int = -100,
    num_bins: int = 1000,
) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Labels for the DACL term of one model (the pseudo labels of Eq. 2's :math:`M_n`).

    Ground truth on the labeled samples; on the unlabeled ones, the *other* model's argmax
    where it is confident, else ``ignore_index``. The paper says only that unlabeled pixels
    take pseudo labels (its :math:`M_n` are "ground truth or pseudo labels"); the policy
    that decides "confident" is ours and an option:

    - ``"fixed"``: softmax confidence ``> confidence`` (0.95).
    - ``"class_fraction"``: also the most confident ``fraction`` of the pixels predicted as
      each class in this batch, whatever their confidence. With a fixed threshold the small
      foreground classes get no pseudo label at all early in training (the network is
      confident on background first); this keeps every predicted class represented. The
      per-class cut is taken on a ``num_bins``-bin confidence histogram (vectorised, no host
      synchronisation; pixels tied in the cut's bin are all kept).
    - ``"none"``: no pseudo labels; the unlabeled rows are ignored, DACL sees ground truth
      only.
    - ``"class_prior"``: for a class the other model does not (yet) predict anywhere, neither
      policy above gives a pixel. This one expects each class to cover about the share of
      pixels it has in the batch's *labeled* images (:math:`\pi_c`), and labels as ``c`` the
      ``fraction`` :math:`\times\,\pi_c \times U` unlabeled pixels with the highest
      probability of ``c`` (:math:`U` unlabeled pixels; histogram cut as above). A pixel that
      several classes claim takes the one whose probability exceeds its cut the most
      (:math:`p_c / t_c`); pixels no class claims keep the ``"fixed"`` rule. Needs at least one
      labeled sample in the batch (else it is ``"fixed"``).

    The confidence threshold is named apart from Eq. 2's :math:`\phi` (the prototype mask
    threshold, ``threshold`` of :class:`~torch_dacl.SoftDensityContrastiveLoss`).

    Args:
        labels: ``(N, *S)`` integer ground truth; rows of unlabeled samples are not read.
        labeled: ``(N,)`` bool, which samples are labeled.
        logits_other: ``(N, C, *S)`` logits of the other model (detached inside).
        policy: ``"fixed"``, ``"class_fraction"`` or ``"class_prior"``.
        confidence: the fixed confidence threshold in ``[0, 1]``.
        fraction: with ``"class_fraction"``, share of each predicted class kept; with
            ``"class_prior"``, share of each class's expected pixel count labeled; ``(0, 1]``.
        ignore_index: value of pixels that take no part.
        num_bins: histogram resolution of the per-class cut.

    Returns:
        ``(labels (N, *S) int64, confident (N, *S) bool)``; ``confident`` is True on the
        unlabeled pixels that received a pseudo label.

    Example:
        >>> logits = torch.tensor([[[[4.0, 0.0]], [[0.0, 0.3]]]])  # 1 image, 2 classes, 1x2 pixels
        >>> y, conf = dacl_labels(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([False]), logits)
        >>> y.tolist()
        [[[0, -100]]]
        >>> dacl_labels(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([False]), logits,
        ...             policy="class_fraction", fraction=1.0)[0].tolist()
        [[[0, 1]]]
    """
    look_up_option("policy", policy, PSEUDO_POLICIES)
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence: expected a value in [0, 1], got {confidence!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: expected a value in (0, 1], got {fraction!r}")
    check_rank("logits_other", logits_other, (4, 5), "(N, C, *spatial)")
    n, c = logits_other.shape[:2]
    spatial = tuple(logits_other.shape[2:])
    if tuple(labels.shape) != (n,) + spatial:
        raise ValueError(f"labels: expected shape {(n,) + spatial} to match logits_other "
                         f"{tuple(logits_other.shape)}, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected an integer tensor, got dtype {labels.dtype}")
    if labeled.shape != (n,):
        raise ValueError(f"labeled: expected a bool tensor of shape ({n},), got {tuple(labeled.shape)}")
    with torch.no_grad():
        labeled = labeled.to(torch.bool)
        out = labels.long().clone()
        confident = torch.zeros(out.shape, dtype=torch.bool, device=out.device)
        if policy == "none":
            lab = labeled.view((n,) + (1,) * len(spatial)).to(out.device)
            return torch.where(lab, out, torch.full_like(out, ignore_index)), confident
        if _pick_rows(labeled):
            # the unlabeled rows alone (picking rows by a CPU mask needs no device synchronisation):
            # the pseudo labels of the labeled rows would be thrown away
            rows = (~labeled).nonzero().squeeze(1).to(logits_other.device, non_blocking=True)
            if rows.numel() == 0:
                return out, confident
            logits_u, unl = logits_other.index_select(0, rows), None
        else:  # every row, the labeled ones masked (no host synchronisation)
            rows, logits_u = None, logits_other
            unl = (~labeled).view((n,) + (1,) * len(spatial)).to(logits_other.device)
        probs = logits_u.detach().float().softmax(1)  # (U, C, *S), once for every policy
        conf, pred = probs.max(1)
        keep = conf > confidence
        if policy == "class_fraction":
            bins = (conf * num_bins).long().clamp_(0, num_bins - 1)
            flat = pred * num_bins + bins
            if unl is not None:
                flat = torch.where(unl, flat, torch.full_like(flat, c * num_bins))
            hist = torch.zeros(c * num_bins + 1, device=conf.device).scatter_add_(
                0, flat.reshape(-1), torch.ones(flat.numel(), device=conf.device))[:-1].view(c, num_bins)
            count = hist.sum(1)
            # (C,) pixels to keep per predicted class: at least one where the class is predicted
            # (a tiny fraction must not underflow to none in float32)
            need = torch.maximum((count * fraction).ceil(), (count > 0).to(count.dtype))
            at_or_above = hist.flip(1).cumsum(1).flip(1)  # pixels with bin >= b
            cut = (at_or_above >= need.unsqueeze(1)).sum(1) - 1  # (C,) highest bin that keeps enough
            keep |= (bins >= cut[pred]) & (need[pred] > 0)
        elif policy == "class_prior":
            lab_rows = labeled.view((n,) + (1,) * len(spatial)).to(labels.device)
            pred, keep = _class_prior_labels(probs, labels, lab_rows, unl, pred, keep, fraction, num_bins)
        if unl is not None:
            keep &= unl
        pseudo = torch.where(keep, pred, torch.full_like(pred, ignore_index))
        if rows is None:
            out = torch.where(unl, pseudo, out)
            confident = keep
        else:
            out.index_copy_(0, rows, pseudo)
            confident.index_copy_(0, rows, keep)
    return out, confident


def _pick_rows(labeled: torch.Tensor) -> bool:
    """Whether :func:`dacl_labels` works on the unlabeled rows alone: when ``labeled`` is on the
    CPU (the rows are picked without a device synchronisation); otherwise on every row."""
    return labeled.device.type == "cpu"


def _class_prior_labels(probs, labels, lab, unl, pred, keep, fraction, num_bins):
    """The ``"class_prior"`` rule of :func:`dacl_labels` on ``probs (U, C, *S)`` (the softmax of
    the unlabeled rows, or of every row with ``unl`` marking the unlabeled ones):
    ``(pred, keep)`` updated."""
    c = probs.shape[1]
    labels = labels.long()  # compared with c in int64: a narrow label dtype must not wrap c around
    lab_px = lab & (labels >= 0) & (labels < c)  # the labeled pixels of the whole batch give the prior
    idx = torch.where(lab_px, labels, torch.full_like(labels, c)).reshape(-1)
    counts = torch.zeros(c + 1, device=probs.device).scatter_add_(
        0, idx.to(probs.device), torch.ones(idx.numel(), device=probs.device))[:c]
    prior = counts / counts.sum().clamp_min(1.0)
    n_unl = pred.numel() if unl is None else unl.expand_as(pred).sum()
    expected = prior * n_unl
    # (C,) pixels to label as each class: at least one for a class with a prior (no underflow)
    need = torch.maximum((expected * fraction).ceil(), (expected > 0).to(expected.dtype))
    scaled = probs * num_bins  # bin b of p: floor(p * num_bins), clamped to the last bin
    view = (1, c) + (1,) * (pred.dim() - 1)
    flat = scaled.long().clamp_(0, num_bins - 1) + (torch.arange(c, device=probs.device) * num_bins).view(view)
    if unl is not None:
        flat = torch.where(unl.unsqueeze(1), flat, torch.full_like(flat, c * num_bins))
    hist = torch.zeros(c * num_bins + 1, device=probs.device).scatter_add_(
        0, flat.reshape(-1), torch.ones(flat.numel(), device=probs.device))[:-1].view(c, num_bins)
    del flat
    at_or_above = hist.flip(1).cumsum(1).flip(1)
    cut = (at_or_above >= need.unsqueeze(1)).sum(1) - 1  # (C,) lowest bin of each class's top pixels
    # bin >= cut  <=>  p * num_bins >= cut (cut is an integer below num_bins)
    claims = (scaled >= cut.view(view)) & ((need > 0) & (cut >= 0)).view(view)
    ratio = torch.where(claims, probs / ((cut.clamp_min(0) + 1).float() / num_bins).view(view),
                        torch.full_like(probs, -1.0))
    best_ratio, best = ratio.max(1)
    claimed = best_ratio >= 0
    return torch.where(claimed, best, pred), keep | claimed


# ----------------------------------------------------------------------------- L_cross
def cross_pseudo_supervision_loss(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Cross pseudo supervision :math:`\mathcal{L}_{cross}` (Eq. 1; Chen et al., CVPR 2021).

    Each model learns the other's hard pseudo label:
    ``CE(logits_a, argmax(logits_b)) + CE(logits_b, argmax(logits_a))``, pseudo labels
    detached.

    Args:
        logits_a, logits_b: ``(N, C, *S)`` logits of the two models.
        mask: optional ``(N, *S)`` bool, pixels that take part (e.g. a confidence mask).

    Returns:
        Scalar float32 loss; 0 connected to the graph when the mask is empty, and on an empty
        batch (``N = 0``) or a zero-size image.

    Example:
        >>> logits_a = torch.randn(2, 4, 8, 8, requires_grad=True)
        >>> logits_b = torch.randn(2, 4, 8, 8, requires_grad=True)
        >>> confident = torch.softmax(logits_b, 1).amax(1) > 0.5
        >>> loss = cross_pseudo_supervision_loss(logits_a, logits_b, mask=confident)
        >>> loss.backward()
        >>> loss.ndim, logits_a.grad.shape
        (0, torch.Size([2, 4, 8, 8]))
    """
    check_rank("logits_a", logits_a, (4, 5), "(N, C, *spatial)")
    if logits_b.shape != logits_a.shape:
        raise ValueError(f"logits_b: expected shape {tuple(logits_a.shape)} as logits_a, got {tuple(logits_b.shape)}")
    # max(1).indices, not argmax(1): the same first maximal index, 8x faster over the class dim on
    # CPU (torch 2.14, one thread: 5 ms against 40 ms on (8, 4, 128, 128))
    pl_a = logits_a.detach().max(1).indices
    pl_b = logits_b.detach().max(1).indices
    ce_a = F.cross_entropy(logits_a.float(), pl_b, reduction="none")
    ce_b = F.cross_entropy(logits_b.float(), pl_a, reduction="none")
    if mask is None:
        if ce_a.numel() == 0:  # an empty batch or a zero-size image: 0 connected to the graph, not NaN
            return ce_a.sum() + ce_b.sum()
        return ce_a.mean() + ce_b.mean()
    if mask.shape != ce_a.shape:
        raise ValueError(f"mask: expected shape {tuple(ce_a.shape)}, got {tuple(mask.shape)}")
    m = mask.to(ce_a.dtype)
    return ((ce_a + ce_b) * m).sum() / m.sum().clamp_min(1.0)
