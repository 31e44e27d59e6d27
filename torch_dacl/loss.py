"""The end-to-end DACL term: Eq. 2-10 from pixel embeddings and labels."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as _dist
from . import functional as DF
from ._validation import check_finite, check_float, check_ks, check_labels, check_positive, check_rank
from .bank import ClassMemoryBank

__all__ = ["SoftDensityContrastiveLoss", "DACLDetails"]

_BANK_SOURCES = ("prototype", "pixel")
_ANCHOR_MODES = ("pixel", "class")
_SAMPLINGS = ("density", "random")


class DACLDetails(NamedTuple):
    """Diagnostics of one forward pass (returned with ``return_details=True``).

    Every field is a tensor on the embeddings' device (no host synchronisation); the
    per-class ``(C,)`` summaries are what :class:`~torch_dacl.objective.DACLObjective` logs.

    Attributes:
        loss: the scalar loss.
        density: ``(C, S)`` density of the sampled batch features (-1 where padded).
        sample_valid: ``(C, S)`` bool, sampled positions that hold a feature.
        anchor_density: ``(C, Q)`` density of the selected anchors.
        anchor_valid: ``(C, Q)`` bool.
        num_contributing: number of anchors that entered the loss.
        positive_density: ``(C, H)`` density of the selected batch positive keys.
        positive_valid: ``(C, H)`` bool.
        anchor_center_cosine: ``(C, Q)`` cosine between each anchor and its class center
            (Eq. 8), 0 where the anchor is not valid.
        overlap: ``(C,)`` number of batch pixels chosen both as anchor and as positive key
            (0 by construction with ``anchor_mode="pixel"``, see the class docstring).
        bank_fill: ``(C,)`` filled bank slots after the update (0 without a bank).
        contributing: ``(C, Q)`` bool, anchors that entered the loss.
    """

    loss: torch.Tensor
    density: torch.Tensor
    sample_valid: torch.Tensor
    anchor_density: torch.Tensor
    anchor_valid: torch.Tensor
    num_contributing: torch.Tensor
    positive_density: Optional[torch.Tensor] = None
    positive_valid: Optional[torch.Tensor] = None
    anchor_center_cosine: Optional[torch.Tensor] = None
    overlap: Optional[torch.Tensor] = None
    bank_fill: Optional[torch.Tensor] = None
    contributing: Optional[torch.Tensor] = None

    def per_class(self) -> dict:
        """Per-class ``(C,)`` summaries: sampled pixels, anchors, positives, overlap, mean
        anchor / positive density, mean anchor-center cosine, bank fill (float tensors)."""
        def mean(x, v):
            v = v.to(x.dtype)
            return (x * v).sum(1) / v.sum(1).clamp_min(1)
        out = {
            "sampled": self.sample_valid.sum(1).float(),
            "anchors": self.anchor_valid.sum(1).float(),
            "anchor_density": mean(self.anchor_density, self.anchor_valid),
        }
        if self.positive_valid is not None:
            out["positives"] = self.positive_valid.sum(1).float()
            out["positive_density"] = mean(self.positive_density, self.positive_valid)
        if self.anchor_center_cosine is not None:
            out["anchor_center_cosine"] = mean(self.anchor_center_cosine, self.anchor_valid)
        if self.overlap is not None:
            out["overlap"] = self.overlap.float()
        if self.bank_fill is not None:
            out["bank_fill"] = self.bank_fill.float()
        return out


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x (C, S, D)``, ``index (C, K)`` -> ``(C, K, D)``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _select(score: torch.Tensor, valid: torch.Tensor, k: int, largest: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``k`` largest/smallest valid scores per row, and their validity."""
    k = min(k, score.shape[1])
    fill = float("-inf") if largest else float("inf")
    masked = torch.where(valid, score, torch.full_like(score, fill))
    idx = masked.topk(k, dim=1, largest=largest).indices
    return idx, valid.gather(1, idx)


def _split_by_rank(
    key: torch.Tensor, valid: torch.Tensor, num_low: int, num_high: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint low and high ends of one ranking of each row (anchors and batch positives).

    The valid entries of each row of ``key (C, S)`` are sorted ascending (ties by position).
    With ``n`` valid entries, the ``q = num_low`` lowest and the ``h = num_high`` highest
    are taken when ``n >= num_low + num_high``; otherwise ``q = min(num_low, n // 2)`` and
    ``h = min(num_high, n - q)``, so the two sets never share an entry.

    Returns ``(low_idx (C, min(num_low, S)), low_valid, high_idx (C, min(num_high, S)),
    high_valid)``; vectorised, no host synchronisation.
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


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean over dim 1 of the valid rows of ``x (C, K, D)``: ``(C, D)`` and ``(C,)`` any-valid."""
    w = valid.to(x.dtype).unsqueeze(-1)
    n = w.sum(1)
    return (x * w).sum(1) / n.clamp_min(1.0), n.squeeze(-1) > 0


class SoftDensityContrastiveLoss(nn.Module):
    r"""Density-aware contrastive loss of DACL, end to end (Eq. 2-10), with its memory bank.

    One call does, for each class :math:`n`, without a Python loop over classes or pixels:

    1. sample at most ``max_samples_per_class`` labelled pixels (ignoring ``ignore_index``);
    2. multi-scale kNN density of each against the batch and the class memory
       :math:`\mathcal{G}_n \cup \mathcal{V}_n` (Eq. 3-5);
    3. anchors: the ``num_anchors`` (:math:`N_q`) lowest-density features (Eq. 6);
    4. positive keys: the ``num_positives/2`` highest-density batch features and the
       ``num_positives/2`` bank entries of highest stored density (Eq. 7), averaged into the
       class center (Eq. 8);
    5. negatives: ``num_negatives`` (:math:`N_p^-`) random batch features of other classes;
    6. the soft contrastive loss with positiveness weights (Eq. 9-10);
    7. the bank update with detached vectors (per-image prototypes of Eq. 2, or pixels).

    Gradients reach the embeddings through the anchors only; positives, negatives and
    densities carry none.

    **Anchors and positives never coincide** (a decision the paper leaves open). Steps 3 and
    4 take the two ends of one density ranking of a class's sampled pixels. With :math:`S_n`
    sampled pixels of class :math:`n`, :math:`Q` = ``num_anchors`` and :math:`H` =
    ``num_positives // 2``: when :math:`S_n \ge Q + H` the :math:`Q` lowest are anchors and
    the :math:`H` highest are batch positives, exactly as Eq. 6-7; when a class has fewer
    pixels, they are split by rank into :math:`q = \min(Q, \lfloor S_n/2 \rfloor)` anchors
    (the low end) and :math:`\min(H, S_n - q)` positives (the high end). Without this rule a
    small class would see its pixels be both anchor and positive, and the density-aware
    selection of Table 2's rows III-VI would reduce to row II. To get the paper's
    :math:`N_q` anchors for a class, ``max_samples_per_class`` (and the class's labelled or
    pseudo-labelled pixels) must reach :math:`N_q + N_p^+/2` = 512 at the defaults. With
    ``sampling="random"`` the ranking is a random one (still disjoint); with
    ``anchor_mode="class"`` anchors are prototypes and positives are pixels, so nothing is
    shared.

    Args:
        num_classes: ``C`` (background counts as a class; see docs: Design decisions, 3.3).
        dim: embedding dimension ``D``.
        temperature: :math:`\tau` of Eq. 10 (0.4).
        ks: kNN scales of Eq. 4 (``(8, 16, 32)``); ``(k,)`` for single scale (ablation III).
        num_anchors: :math:`N_q` (256).
        num_positives: :math:`N_p^+` (512), half from the batch, half from the bank.
        num_negatives: :math:`N_p^-` (512).
        bank_size: ``L`` (1000).
        bank_source: ``"prototype"`` stores per-image class prototypes (Eq. 2, default);
            ``"pixel"`` stores sampled pixel embeddings (DGCL-style).
        bank_push_per_class: with ``bank_source="pixel"``, pixels pushed per class per step.
        use_bank: False disables the memory bank (ablations II-IV): density and positives
            use the batch only.
        sampling: ``"density"`` (Eq. 6-7) or ``"random"`` anchors and positives (plain
            contrastive learning, ablation II).
        weighting: ``"paper"``, ``"scale"`` or ``"none"`` (ablation V vs VI), see
            :func:`~torch_dacl.functional.soft_density_contrastive_loss_grouped`.
        gamma: :math:`\gamma` of Eq. 9; None means ``1/N_q`` of the class.
        include_positive: add the positive to the denominator (not in Eq. 10).
        anchor_mode: ``"pixel"`` anchors are pixel embeddings (default); ``"class"`` anchors
            are per-image class prototypes (Eq. 2), the class-wise variant of Table 3.
        max_samples_per_class: pixel budget per class per call (our choice: 1024; the paper
            does not say how pixels are subsampled).
        threshold: :math:`\phi` of Eq. 2 when ``probs`` are passed.
        ignore_index: label value that takes no part (None: every label must be a class).
        reduction: ``"mean"`` over contributing anchors (default) or ``"sum"`` (Eq. 10).
        gather_distributed: under ``torch.distributed``, all-gather the sampled pixel
            features and the per-image prototypes (rank-major, i.e. in global batch order) so
            every rank computes the loss of the global batch, and draw the random choices
            (negatives, random anchors/positives, pixel pushes) from a generator seeded alike
            on all ranks: every rank gets the same loss and holds the same bank. Gradients
            reach each rank's embeddings through
            :func:`~torch_dacl.distributed.all_gather_with_grad`, summed over ranks, so that
            DDP's averaging gives the single-process gradient. ``max_samples_per_class`` is a
            per-rank budget (the gathered sample holds up to ``world_size`` times as many);
            ``num_anchors``, ``num_positives``, ``num_negatives`` apply to the gathered batch.
            Every rank must call the loss and its backward (they are collectives). A no-op
            without a process group. See ``docs/distributed.rst``.
        validate: check values (finite embeddings, labels in range), one host sync each.
        update_bank_in_eval: push into the bank also in ``eval()`` mode (default False: a
            loss evaluated in eval mode, e.g. on validation data, leaves the bank as it was).

    Shape:
        - embeddings: ``(N, D, H, W)`` or ``(N, D, Z, H, W)``.
        - labels: ``(N, H', W')`` / ``(N, Z', H', W')``, any integer dtype; resized with nearest
          neighbour to the embeddings' spatial size when it differs.
        - probs (optional): ``(N, C, *spatial)`` class probabilities for the prototypes of
          Eq. 2; one-hot labels when omitted.
        - output: scalar float32.

    Compilation: the module has data-dependent control only in its optional validation;
    with ``validate=False`` its math runs on static shapes, but the random sampling and the
    in-place bank update make ``torch.compile`` of the whole module a poor fit. Compile the
    grouped functions of :mod:`torch_dacl.functional` instead.

    Example:
        >>> loss_fn = SoftDensityContrastiveLoss(num_classes=3, dim=16, num_anchors=8,
        ...                                      num_positives=8, num_negatives=8, bank_size=32)
        >>> emb = torch.randn(2, 16, 8, 8, requires_grad=True)
        >>> labels = torch.randint(0, 3, (2, 8, 8))
        >>> loss = loss_fn(emb, labels)
        >>> loss.backward()
        >>> bool(torch.isfinite(emb.grad).all())
        True
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        temperature: float = 0.4,
        ks: Sequence[int] = (8, 16, 32),
        num_anchors: int = 256,
        num_positives: int = 512,
        num_negatives: int = 512,
        bank_size: int = 1000,
        bank_source: str = "prototype",
        bank_push_per_class: int = 64,
        use_bank: bool = True,
        sampling: str = "density",
        weighting: str = "paper",
        gamma: Optional[float] = None,
        include_positive: bool = False,
        anchor_mode: str = "pixel",
        max_samples_per_class: int = 1024,
        threshold: float = 0.5,
        ignore_index: Optional[int] = -100,
        reduction: str = "mean",
        gather_distributed: bool = False,
        validate: bool = True,
        update_bank_in_eval: bool = False,
    ) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("dim", dim), ("num_anchors", num_anchors),
                        ("num_positives", num_positives), ("num_negatives", num_negatives),
                        ("bank_size", bank_size), ("bank_push_per_class", bank_push_per_class),
                        ("max_samples_per_class", max_samples_per_class)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        check_positive("temperature", temperature)
        if gamma is not None:
            check_positive("gamma", gamma)
        for name, v, allowed in (("bank_source", bank_source, _BANK_SOURCES), ("anchor_mode", anchor_mode, _ANCHOR_MODES),
                                 ("sampling", sampling, _SAMPLINGS), ("weighting", weighting, DF._WEIGHTINGS),
                                 ("reduction", reduction, ("mean", "sum"))):
            if v not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {v!r}")
        self.num_classes = num_classes
        self.dim = dim
        self.temperature = float(temperature)
        self.ks = check_ks(ks)
        self.num_anchors = num_anchors
        self.num_positives = num_positives
        self.num_negatives = num_negatives
        self.bank_source = bank_source
        self.bank_push_per_class = bank_push_per_class
        self.use_bank = use_bank
        self.sampling = sampling
        self.weighting = weighting
        self.gamma = gamma
        self.include_positive = include_positive
        self.anchor_mode = anchor_mode
        self.max_samples_per_class = max_samples_per_class
        self.threshold = float(threshold)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.gather_distributed = gather_distributed
        self.validate = validate
        self.update_bank_in_eval = bool(update_bank_in_eval)
        self.bank = ClassMemoryBank(num_classes, dim, bank_size, gather_distributed=False)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, temperature={self.temperature}, ks={self.ks}, "
                f"num_anchors={self.num_anchors}, num_positives={self.num_positives}, "
                f"num_negatives={self.num_negatives}, bank_source={self.bank_source!r}, use_bank={self.use_bank}, "
                f"sampling={self.sampling!r}, weighting={self.weighting!r}, anchor_mode={self.anchor_mode!r}")

    # ------------------------------------------------------------------ input handling
    def _prepare(
        self, embeddings: torch.Tensor, labels: torch.Tensor, probs: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Validate the inputs; resize labels (and probs) to the embeddings' spatial size."""
        check_rank("embeddings", embeddings, (4, 5), "(N, D, *spatial) with 2 or 3 spatial dims")
        check_float("embeddings", embeddings)
        n, d = embeddings.shape[:2]
        spatial = embeddings.shape[2:]
        if d != self.dim:
            raise ValueError(f"embeddings: expected {self.dim} channels (dim) in shape (N, {self.dim}, *spatial), "
                             f"got shape {tuple(embeddings.shape)}")
        if labels.dim() != embeddings.dim() - 1 or labels.shape[0] != n:
            raise ValueError(f"labels: expected shape (N, *spatial) = ({n}, {', '.join(map(str, spatial))}) "
                             f"for embeddings {tuple(embeddings.shape)}, got {tuple(labels.shape)}")
        check_labels("labels", labels, self.num_classes, self.ignore_index, check_values=self.validate)
        if labels.dtype != torch.long:  # any integer dtype (uint8 label maps, int32, ...)
            labels = labels.long()
        if self.validate:
            check_finite("embeddings", embeddings)
        if labels.shape[1:] != spatial:
            labels = F.interpolate(labels.unsqueeze(1).float(), size=spatial, mode="nearest").squeeze(1).long()
        if probs is not None:
            exp = (n, self.num_classes) + tuple(spatial)
            if probs.dim() != embeddings.dim() or probs.shape[:2] != exp[:2]:
                raise ValueError(f"probs: expected shape {exp}, got {tuple(probs.shape)}")
            if probs.shape[2:] != spatial:
                probs = F.interpolate(probs.float(), size=spatial, mode="nearest")
        return labels, probs

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        probs: Optional[torch.Tensor] = None,
        return_details: bool = False,
    ):
        """Compute the DACL loss and update the memory bank.

        Args:
            embeddings: projection-head output ``(N, D, *spatial)`` (any float dtype).
            labels: ``(N, *spatial')`` ground truth or pseudo labels (any integer dtype).
            probs: optional ``(N, C, *spatial)`` probabilities for the prototypes (Eq. 2).
            return_details: also return a :class:`DACLDetails`.

        Returns:
            The scalar loss, or a :class:`DACLDetails` when ``return_details``.
        """
        labels, probs = self._prepare(embeddings, labels, probs)
        n, d = embeddings.shape[:2]
        c = self.num_classes
        dev = embeddings.device
        p = math.prod(embeddings.shape[2:])

        # 1. sample pixels per class, gather only those (no copy of the whole tensor)
        flat = labels.reshape(-1)
        valid_pix = None if self.ignore_index is None else flat != self.ignore_index
        idx, svalid = DF.group_by_label(flat, c, self.max_samples_per_class, valid=valid_pix, shuffle=True)
        if embeddings.is_contiguous():  # (N, D, P) is a view
            feats = embeddings.reshape(n, d, p)[idx // p, :, idx % p]  # (C, S, D), gradient flows
        else:  # channels-last: (N, P, D) is the view; any other layout pays one copy here
            feats = embeddings.movedim(1, -1).reshape(n, p, d)[idx // p, idx % p]
        # distributed: every rank gathers the sampled features of all ranks (rank-major along
        # S) and draws its random choices from a generator seeded alike on all ranks, so all
        # ranks compute the same loss on the global batch and push the same bank entries
        distributed = self.gather_distributed and _dist.is_distributed()
        gen = _dist.shared_generator(dev) if distributed else None
        if distributed:
            feats = _dist.all_gather_with_grad(feats.transpose(0, 1), uniform=True).transpose(0, 1)
            svalid = _dist.all_gather_cat(svalid.transpose(0, 1), uniform=True)[0].transpose(0, 1)
        x = F.normalize(feats.detach().float(), dim=-1)

        use_bank = self.use_bank
        bank, bank_valid = (self.bank.bank, self.bank.valid) if use_bank else (None, None)

        # 2. density of batch features against batch U bank (Eq. 3-5)
        dens = DF.knn_density_grouped(x, svalid, self.ks, bank, bank_valid)

        # prototypes (Eq. 2): class-wise anchors and/or the bank update
        protos = pvalid = pdens = None
        if self.anchor_mode == "class" or (use_bank and self.bank_source == "prototype"):
            src = embeddings if self.anchor_mode == "class" else embeddings.detach()
            maps = probs if probs is not None else self._one_hot(labels)
            protos, pvalid = DF.masked_average_pool(src, maps, self.threshold)  # (N, C, D)
            protos, pvalid = protos.transpose(0, 1), pvalid.transpose(0, 1)  # (C, N, D)
            if distributed:  # per-image prototypes of all ranks, in global batch order
                protos = _dist.all_gather_with_grad(protos.transpose(0, 1)).transpose(0, 1)
                pvalid = _dist.all_gather_cat(pvalid.transpose(0, 1))[0].transpose(0, 1)
            pdens = DF.knn_density_grouped(protos, pvalid, self.ks, bank, bank_valid)

        # 3-4. anchors (Eq. 6) and positive keys (Eq. 7); in pixel mode both come from one
        # ranking of the sampled pixels, the low end (anchors) and the high end (batch
        # positives), disjoint even for a class with few pixels
        half = max(1, self.num_positives // 2)
        rand_key = None if self.sampling == "density" else torch.rand(dens.shape, device=dev, generator=gen)
        if self.anchor_mode == "class":
            cand, cand_dens = protos, pdens
            a_key = cand_dens if rand_key is None else torch.rand(pvalid.shape, device=dev, generator=gen)
            a_idx, a_valid = _select(a_key, pvalid, self.num_anchors, largest=False)
            pb_idx, pb_valid = _select(dens if rand_key is None else rand_key, svalid, half, largest=True)
            overlap = torch.zeros(c, dtype=torch.long, device=dev)  # prototypes vs pixels
        else:
            cand, cand_dens = feats, dens
            a_idx, a_valid, pb_idx, pb_valid = _split_by_rank(
                dens if rand_key is None else rand_key, svalid, self.num_anchors, half)
            overlap = self._overlap(a_idx, a_valid, pb_idx, pb_valid, svalid.shape[1])
        anchors = _gather_rows(cand, a_idx)
        pos, pos_valid = _gather_rows(x, pb_idx), pb_valid
        if use_bank:
            bnk_valid = bank_valid
            key_g = self.bank.bank_density if self.sampling == "density" else \
                torch.rand(bnk_valid.shape, device=dev, generator=gen)
            pg_idx, pg_valid = _select(key_g, bnk_valid, self.num_positives - half, largest=True)
            pos_g = F.normalize(_gather_rows(bank, pg_idx), dim=-1)
            pos, pos_valid = torch.cat([pos, pos_g], 1), torch.cat([pos_valid, pg_valid], 1)
        centers, centers_valid = _masked_mean(pos, pos_valid)

        # 5. negatives: random batch features of the other classes, no gradient
        negatives, neg_valid = self._negatives(x, svalid, gen)

        # 6. loss (Eq. 9-10)
        terms, contributing = DF.soft_density_contrastive_loss_grouped(
            anchors, a_valid, centers, negatives, neg_valid, temperature=self.temperature,
            weighting=self.weighting, gamma=self.gamma, include_positive=self.include_positive,
            centers_valid=centers_valid,
        )
        loss = DF._reduce(terms, contributing, self.reduction)

        # 7. bank update with detached vectors (FIFO); not in eval() unless asked
        if use_bank and (self.training or self.update_bank_in_eval):
            if self.bank_source == "prototype":
                cls = torch.arange(c, device=dev).unsqueeze(1).expand_as(pvalid)
                self.bank.push(protos.detach().reshape(-1, d), cls.reshape(-1), pdens.reshape(-1), pvalid.reshape(-1))
            else:
                k = min(self.bank_push_per_class, x.shape[1])  # the first k of a random order
                px, pd, pv = x[:, :k], dens[:, :k], svalid[:, :k]
                if distributed:  # the gathered rows are rank-major: draw k at random instead
                    keys = torch.rand(svalid.shape, device=dev, generator=gen).masked_fill(~svalid, -1.0)
                    pick = keys.topk(k, dim=1).indices
                    px, pd, pv = _gather_rows(x, pick), dens.gather(1, pick), svalid.gather(1, pick)
                cls = torch.arange(c, device=dev).unsqueeze(1).expand(c, k)
                self.bank.push(px.reshape(-1, d), cls.reshape(-1), pd.reshape(-1), pv.reshape(-1))

        if return_details:
            with torch.no_grad():
                cos = torch.einsum("cqd,cd->cq", F.normalize(anchors.detach().float(), dim=-1),
                                   F.normalize(centers.float(), dim=-1)) * a_valid
            fill = self.bank.count.clone() if use_bank else torch.zeros(c, dtype=torch.long, device=dev)
            return DACLDetails(loss, dens, svalid, cand_dens.gather(1, a_idx), a_valid, contributing.sum(),
                               dens.gather(1, pb_idx), pb_valid, cos, overlap, fill, contributing)
        return loss

    @staticmethod
    def _overlap(a_idx: torch.Tensor, a_valid: torch.Tensor, p_idx: torch.Tensor, p_valid: torch.Tensor,
                 width: int) -> torch.Tensor:
        """``(C,)`` number of sampled positions chosen both as anchor and as batch positive."""
        c = a_idx.shape[0]
        in_a = torch.zeros(c, width, dtype=torch.bool, device=a_idx.device).scatter_(1, a_idx, a_valid)
        in_p = torch.zeros(c, width, dtype=torch.bool, device=a_idx.device).scatter_(1, p_idx, p_valid)
        return (in_a & in_p).sum(1)

    def _one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """``(N, *S)`` labels -> ``(N, C, *S)`` float one-hot; ignored pixels are all-zero."""
        c = self.num_classes
        lab = torch.where((labels >= 0) & (labels < c), labels, torch.full_like(labels, c))
        oh = F.one_hot(lab, c + 1)[..., :c]
        return oh.movedim(-1, 1).float()

    def _negatives(
        self, x: torch.Tensor, svalid: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample ``num_negatives`` features of other classes for each class, without replacement."""
        c, s, d = x.shape
        pool = x.reshape(c * s, d)
        pool_cls = torch.arange(c, device=x.device).repeat_interleave(s)
        ok = svalid.reshape(1, c * s) & (pool_cls.unsqueeze(0) != torch.arange(c, device=x.device).unsqueeze(1))
        k = min(self.num_negatives, c * s)
        keys = torch.rand(c, c * s, device=x.device, generator=generator).masked_fill(~ok, -1.0)
        top = keys.topk(k, dim=1)
        return pool[top.indices], top.values >= 0
