"""The end-to-end DACL term: Eq. 2-10 from pixel embeddings and labels, composed of the
stages of :mod:`torch_dacl.stages`."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import (check_finite, check_float, check_int, check_ks, check_labels, check_optional_int,
                          check_positive, check_rank, check_real, look_up_option)
from .ablation import table2_options
from . import functional as DF
from .bank import ClassMemoryBank
from .modules import MaskedAveragePool, MultiScaleDensity
from .options import ANCHOR_MODES, BANK_SOURCES, PRECISIONS, REDUCTIONS, SAMPLINGS, WEIGHTINGS
from .stages import AnchorKeyMiner, BankPolicy, PixelSampler, RandomStream, SoftContrastiveTerm, one_hot_maps

__all__ = ["SoftDensityContrastiveLoss", "DACLDetails", "paired_losses"]


def _option(stage: str, attr: str, check: Callable[[Any], Any]) -> property:
    """A constructor option of the loss kept by one of its stages: read from it, and written
    to it through ``check`` (the same check as in ``__init__``)."""
    def get(self):
        return getattr(getattr(self, stage), attr)

    def set_(self, value):
        setattr(getattr(self, stage), attr, check(value))

    return property(get, set_, doc=f"Kept by ``self.{stage}.{attr}``.")


class DACLDetails(NamedTuple):
    """Diagnostics of one forward pass (returned with ``return_details=True``).

    Every field is a tensor on the embeddings' device (no host synchronisation); the
    per-class ``(C,)`` summaries are what :class:`~torch_dacl.objective.DACLObjective` logs.

    Attributes:
        loss: the scalar loss (the ``(C, Q)`` terms with ``reduction="none"``).
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
        anchor / positive density, mean anchor-center cosine, bank fill (float tensors, float32 or
        float64: the means of half-precision fields are taken in float32)."""
        def mean(x, v):  # in at least float32, as the counts: a float16 count overflows at 65504
            v = v.to(torch.promote_types(x.dtype, torch.float32))
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


class SoftDensityContrastiveLoss(nn.Module):
    r"""Density-aware contrastive loss of DACL, end to end (Eq. 2-10), with its memory bank.

    One call does, for each class :math:`n`, without a Python loop over classes or pixels,
    each step a stage of :mod:`torch_dacl.stages` (the keywords below build them):

    1. sample at most ``max_samples_per_class`` labelled pixels (ignoring ``ignore_index``)
       (:class:`~torch_dacl.stages.PixelSampler`, with the per-image prototypes of Eq. 2 from
       :class:`~torch_dacl.MaskedAveragePool` when they are needed);
    2. multi-scale kNN density of each against the batch and the class memory
       :math:`\mathcal{G}_n \cup \mathcal{V}_n` (Eq. 3-5,
       :meth:`MultiScaleDensity.grouped <torch_dacl.MultiScaleDensity.grouped>`);
    3. anchors: the ``num_anchors`` (:math:`N_q`) lowest-density features (Eq. 6);
    4. positive keys: the ``num_positives/2`` highest-density batch features and the
       ``num_positives/2`` bank entries of highest stored density (Eq. 7), averaged into the
       class center (Eq. 8);
    5. negatives: ``num_negatives`` (:math:`N_p^-`) random batch features of other classes
       (3-5: :class:`~torch_dacl.stages.AnchorKeyMiner`);
    6. the soft contrastive loss with positiveness weights (Eq. 9-10,
       :class:`~torch_dacl.stages.SoftContrastiveTerm`);
    7. the bank update with detached vectors (per-image prototypes of Eq. 2, or pixels;
       :class:`~torch_dacl.stages.BankPolicy`).

    Table 2's ablation rows are named compositions: ``SoftDensityContrastiveLoss.from_table2("III",
    num_classes=..., dim=...)`` (see :mod:`torch_dacl.ablation`).

    **Randomness.** The pixel sample, the negatives, random rankings and pixel pushes draw
    from the loss's own :class:`~torch_dacl.stages.RandomStream`: a seed (``seed``, or drawn
    once from the global CPU stream at the first call) and a call counter, saved in the
    ``state_dict`` (``_extra_state``), so a loss restored from a checkpoint continues its
    random stream exactly.

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
        weighting: ``"paper"``, ``"scale"``, ``"none"`` (ablation V vs VI) or a callable, see
            :func:`~torch_dacl.functional.soft_density_contrastive_loss_grouped`.
        gamma: :math:`\gamma` of Eq. 9; None means ``1/N_q`` of the class.
        include_positive: add the positive to the denominator (not in Eq. 10).
        anchor_mode: ``"pixel"`` anchors are pixel embeddings (default); ``"class"`` anchors
            are per-image class prototypes (Eq. 2), the class-wise variant of Table 3.
        max_samples_per_class: pixel budget per class per call (our choice: 512 =
            :math:`N_q + N_p^+/2` at the paper's defaults, so that a class can give every anchor
            and batch positive; the paper does not say how pixels are subsampled). The kNN
            density of the sample is the loss's floor and grows with it: 1024 made the loss
            1.5x as slow for the same anchors at 4 classes (docs: Design decisions).
        threshold: :math:`\phi` of Eq. 2 when ``probs`` are passed.
        ignore_index: label value that takes no part (None: every label must be a class).
        reduction: ``"mean"`` over contributing anchors (default), ``"sum"`` (Eq. 10) or
            ``"none"``: the same values as the functional core; ``"none"`` gives the
            ``(C, Q)`` per-anchor terms grouped by class (the flat
            :func:`~torch_dacl.functional.soft_density_contrastive_loss` gives ``(A,)`` in its
            anchors' order).
        gather_distributed: under ``torch.distributed``, all-gather the sampled pixel
            features and the per-image prototypes (rank-major, i.e. in global batch order) so
            every rank computes the loss of the global batch, and draw the random choices
            (negatives, random anchors/positives, pixel pushes) from a generator seeded alike
            on all ranks (the seed is broadcast once, at the first call, unless ``seed`` is
            given): every rank gets the same loss and holds the same bank. Gradients
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
        seed: seed of the loss's random stream (an int >= 0); None draws one at the first
            call from the global CPU random stream (broadcast from rank 0 when distributed).
        precision: the kNN density's similarity matmul (the loss's floor), ``"float32"``
            (default) or ``"bfloat16"`` where the hardware has bfloat16 matmul units (see
            :func:`~torch_dacl.functional.knn_density_grouped`).

    Every option is checked once, here (names through
    :func:`~torch_dacl.options.look_up_option`, which suggests the nearest valid one). The
    options stay readable as attributes (``loss.ks``, ``loss.use_bank``, ...), read from the
    stages; setting one (``loss.ignore_index = 2``) sets it on its stage, checked alike.

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
        max_samples_per_class: int = 512,
        threshold: float = 0.5,
        ignore_index: Optional[int] = -100,
        reduction: str = "mean",
        gather_distributed: bool = False,
        validate: bool = True,
        update_bank_in_eval: bool = False,
        seed: Optional[int] = None,
        precision: str = "float32",
    ) -> None:
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes)
        self.dim = check_int("dim", dim)
        self.validate = bool(validate)
        self.pool = MaskedAveragePool(threshold)
        self.sampler = PixelSampler(num_classes, max_samples_per_class, ignore_index, gather_distributed)
        self.density = MultiScaleDensity(ks, precision)
        self.miner = AnchorKeyMiner(num_anchors, num_positives, num_negatives, sampling, anchor_mode)
        self.term = SoftContrastiveTerm(temperature, weighting, gamma, include_positive, reduction)
        self.bank_policy = BankPolicy(bank_source, bank_push_per_class, update_bank_in_eval, use_bank)
        self.bank = ClassMemoryBank(num_classes, dim, check_int("bank_size", bank_size), gather_distributed=False)
        self.stream = RandomStream(seed)

    @classmethod
    def from_table2(cls, row: str, num_classes: int, dim: int, **overrides: Any) -> "SoftDensityContrastiveLoss":
        """The loss of Table 2's ``row`` (``"II"`` ... ``"VI"``, see :mod:`torch_dacl.ablation`),
        with ``overrides`` for the other options (budgets, ``bank_size``, ...).

        Example:
            >>> loss_fn = SoftDensityContrastiveLoss.from_table2("II", num_classes=3, dim=16, num_anchors=8)
            >>> loss_fn.sampling, loss_fn.use_bank, loss_fn.weighting, loss_fn.num_anchors
            ('random', False, 'none', 8)
        """
        return cls(num_classes, dim, **{**table2_options(row), **overrides})

    # the constructor's options, read from (and written to, checked) the stages that hold them
    temperature = _option("term", "temperature", lambda v: check_positive("temperature", v))
    weighting = _option("term", "weighting", lambda v: v if callable(v) else look_up_option("weighting", v, WEIGHTINGS))
    gamma = _option("term", "gamma", lambda v: None if v is None else check_positive("gamma", v))
    include_positive = _option("term", "include_positive", bool)
    reduction = _option("term", "reduction", lambda v: look_up_option("reduction", v, REDUCTIONS))
    ks = _option("density", "ks", check_ks)
    precision = _option("density", "precision", lambda v: look_up_option("precision", v, PRECISIONS))
    num_anchors = _option("miner", "num_anchors", lambda v: check_int("num_anchors", v))
    num_positives = _option("miner", "num_positives", lambda v: check_int("num_positives", v))
    num_negatives = _option("miner", "num_negatives", lambda v: check_int("num_negatives", v))
    sampling = _option("miner", "sampling", lambda v: look_up_option("sampling", v, SAMPLINGS))
    anchor_mode = _option("miner", "anchor_mode", lambda v: look_up_option("anchor_mode", v, ANCHOR_MODES))
    max_samples_per_class = _option("sampler", "max_per_class", lambda v: check_int("max_samples_per_class", v))
    ignore_index = _option("sampler", "ignore_index", lambda v: check_optional_int("ignore_index", v))
    gather_distributed = _option("sampler", "gather_distributed", bool)
    threshold = _option("pool", "threshold", lambda v: check_real("threshold", v))
    bank_source = _option("bank_policy", "source", lambda v: look_up_option("bank_source", v, BANK_SOURCES))
    bank_push_per_class = _option("bank_policy", "push_per_class", lambda v: check_int("bank_push_per_class", v))
    use_bank = _option("bank_policy", "enabled", bool)
    update_bank_in_eval = _option("bank_policy", "update_in_eval", bool)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, validate={self.validate}"

    # ------------------------------------------------------------------ state: the random stream
    def get_extra_state(self) -> torch.Tensor:
        """The random stream's ``int64 [seed, calls]`` (saved in the ``state_dict``)."""
        return self.stream.state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.stream.load_state(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # a checkpoint from before the stream was saved: keep this loss's stream, load the rest
        missing = prefix + "_extra_state" not in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if missing and prefix + "_extra_state" in missing_keys:
            missing_keys.remove(prefix + "_extra_state")

    # ------------------------------------------------------------------ input handling
    def _prepare(
        self, embeddings: torch.Tensor, labels: torch.Tensor, probs: Optional[torch.Tensor], head=None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Validate the inputs; resize labels (and probs) to the embeddings' spatial size."""
        check_rank("embeddings", embeddings, (4, 5), "(N, D, *spatial) with 2 or 3 spatial dims")
        check_float("embeddings", embeddings)
        n, d = embeddings.shape[:2]
        spatial = embeddings.shape[2:]
        if head is not None:
            if self.miner.anchor_mode == "class":
                raise ValueError("head: anchor_mode='class' takes its gradient through the prototypes of every "
                                 "pixel (Eq. 2), so it needs the dense embeddings: pass head(features), not head=")
            want = getattr(head, "in_channels", None)
            if want is not None and d != want:
                raise ValueError(f"embeddings: with head=, the feature map the head reads, expected {want} channels "
                                 f"(the head's in_channels) in shape (N, {want}, *spatial), got shape "
                                 f"{tuple(embeddings.shape)}")
        elif d != self.dim:
            raise ValueError(f"embeddings: expected {self.dim} channels (dim) in shape (N, {self.dim}, *spatial), "
                             f"got shape {tuple(embeddings.shape)}")
        if labels.dim() != embeddings.dim() - 1 or labels.shape[0] != n:
            raise ValueError(f"labels: expected shape (N, *spatial) with N = {n} and {len(spatial)} spatial dims "
                             f"(any size, resized to the embeddings' {tuple(spatial)}) for embeddings "
                             f"{tuple(embeddings.shape)}, got {tuple(labels.shape)}")
        check_labels("labels", labels, self.num_classes, self.ignore_index, check_values=self.validate)
        if labels.dtype != torch.long:  # any integer dtype (uint8 label maps, int32, ...)
            labels = labels.long()
        if self.validate:
            check_finite("embeddings", embeddings)
        # nearest from or to a zero-size map is undefined (interpolate refuses it): no labelled pixel (-1 is no class)
        if labels.shape[1:] != spatial and 0 in spatial + labels.shape[1:]:
            labels = labels.new_full((n, *spatial), -1)
        elif labels.shape[1:] != spatial:
            labels = F.interpolate(labels.unsqueeze(1).float(), size=spatial, mode="nearest").squeeze(1).long()
        if probs is not None:
            exp = (n, self.num_classes) + tuple(spatial)
            if probs.dim() != embeddings.dim() or probs.shape[:2] != exp[:2]:
                raise ValueError(f"probs: expected shape (N, C, *spatial) = ({n}, {self.num_classes}, *spatial) "
                                 f"with {len(spatial)} spatial dims (any size, resized to the embeddings' "
                                 f"{tuple(spatial)}), got {tuple(probs.shape)}")
            # Eq. 2's p > phi in at least float32 (float64 kept), resized or not: nearest keeps the values
            probs = probs.to(torch.promote_types(probs.dtype, torch.float32))
            if probs.shape[2:] != spatial and 0 in spatial + probs.shape[2:]:
                probs = probs.new_zeros((n, self.num_classes, *spatial))  # zero-size: no mask (as the labels)
            elif probs.shape[2:] != spatial:
                probs = F.interpolate(probs, size=spatial, mode="nearest")
        return labels, probs

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        probs: Optional[torch.Tensor] = None,
        return_details: bool = False,
        head: Optional[Callable[..., torch.Tensor]] = None,
    ):
        """Compute the DACL loss and update the memory bank.

        Args:
            embeddings: projection-head output ``(N, D, *spatial)`` (any float dtype); with
                ``head``, the feature map the head reads, ``(N, F, *spatial)``.
            labels: ``(N, *spatial')`` ground truth or pseudo labels (any integer dtype).
            probs: optional ``(N, C, *spatial)`` probabilities for the prototypes (Eq. 2).
            return_details: also return a :class:`DACLDetails`.
            head: the projection head, run here on the sampled pixels only (the *sparse
                head*, see below): a :class:`~torch_dacl.ProjectionHead` (its
                :meth:`~torch_dacl.ProjectionHead.embed_points`) or any pointwise module
                that maps ``(M, F)`` rows to ``(M, D)``.

        **Sparse head.** The loss reads the embeddings only at the pixels it samples, and the
        sample depends on the labels alone. With ``head``, the pixels are sampled first, the
        feature vectors gathered there and the head run on them, with gradient; the dense
        embedding map is never made. At the sampled pixels the loss and its gradient on the
        feature map are the dense path's (``head(features)`` passed as ``embeddings``) up
        to the head's normalisation (see :class:`~torch_dacl.ProjectionHead`), and the
        gradient is zero elsewhere, as in the dense path. Eq. 2's per-image prototypes
        (for the bank) are then the means over the *sampled* pixels of each image and class
        (:func:`~torch_dacl.stages.sampled_prototypes`): an estimate of the mean over all
        its pixels, and no prototype for an image whose class got no sampled pixel. This is
        a deviation from Eq. 2, which averages every pixel (docs: Design decisions). Not with
        ``anchor_mode="class"`` (its anchors take gradient through the dense prototypes).

        **Empty input.** An empty batch (``N = 0``) or a zero-size image (a spatial size 0, of the
        embeddings or of the labels) has no labelled pixel: the loss is exactly 0, connected to
        the embeddings (a zero gradient of their shape), the details have their usual shapes
        (nothing valid, nothing contributing) and the bank is left as it was.

        Returns:
            The scalar loss, or a :class:`DACLDetails` when ``return_details``.
        """
        batch, shared = self._sample(embeddings, labels, probs, head)
        # 2. multi-scale kNN density against the batch and the class memory (Eq. 3-5)
        memory = self.bank_policy.memory(self.bank)
        (density, proto_density), = _densities([self], [batch], [memory])
        # 3-5. anchors (Eq. 6), positive keys and their centers (Eq. 7-8), negative keys
        mined = self.miner(batch, density, proto_density, memory, generator=shared)
        # 6. the soft contrastive term (Eq. 9-10)
        loss, contributing = self.term(mined.anchors, mined.anchor_valid, mined.centers, mined.negatives,
                                       mined.negative_valid, mined.centers_valid)
        # 7. the bank update with detached vectors (FIFO); not in eval() unless asked
        self.bank_policy.update(self.bank, batch, density, proto_density, self.training, generator=shared)
        if return_details:
            return self._details(loss, batch.valid, density, mined, contributing)
        return loss

    def _sample(self, embeddings, labels, probs, head):
        """Steps 0-1: the inputs checked, Eq. 2's prototypes where needed, the per-class pixel
        sample (the sparse head runs here), gathered with the prototypes across ranks (one
        collective); and this call's shared generator."""
        labels, probs = self._prepare(embeddings, labels, probs, head)
        shared, local = self.stream.next(embeddings.device, self.sampler.distributed)
        # Eq. 2: per-image class prototypes, as class-wise anchors and/or for the bank
        class_anchors = self.miner.anchor_mode == "class"
        protos, pool = (None, None), None
        if head is not None:  # the sparse head: prototypes from the sampled pixels (in the sampler)
            if self.bank_policy.stores_prototypes:
                pool = probs if probs is not None else embeddings.new_zeros(0)
        elif class_anchors or self.bank_policy.stores_prototypes:
            maps = probs if probs is not None else one_hot_maps(labels, self.num_classes, self.ignore_index,
                                                                torch.bool)  # T_n itself: no float map to threshold
            protos = self.pool(embeddings if class_anchors else embeddings.detach(), maps)
        batch = self.sampler(embeddings, labels, *protos, generator=local, head=head, pool=pool,
                             threshold=self.pool.threshold)
        if head is not None and batch.features.shape[-1] != self.dim:
            raise ValueError(f"head: expected it to map the features to {self.dim} channels (dim), got "
                             f"{batch.features.shape[-1]}")
        return batch, shared

    def _signature(self) -> tuple:
        """What must agree for two losses to run as one grouped call (:func:`paired_losses`)."""
        return (self.num_classes, self.dim, self.bank.size, self.sampler.max_per_class, repr(self.density),
                repr(self.miner), repr(self.term), self.term.weighting, self.bank_policy.enabled,
                self.bank_policy.source, self.bank.features.device)

    def _details(self, loss, sample_valid, density, mined, contributing) -> DACLDetails:
        with torch.no_grad():
            cos = torch.einsum("cqd,cd->cq", F.normalize(mined.anchors.detach().float(), dim=-1),
                               F.normalize(mined.centers.float(), dim=-1)) * mined.anchor_valid
        fill = self.bank.count.clone() if self.use_bank else torch.zeros_like(self.bank.count)
        return DACLDetails(loss, density, sample_valid, mined.anchor_density, mined.anchor_valid, contributing.sum(),
                           mined.positive_density, mined.positive_valid, cos, mined.overlap, fill, contributing)


def _densities(losses, batches, memories):
    """``[(density, prototype density)]`` of each loss's sample against its memory (Eq. 3-5), in
    one grouped call: the groups of every loss side by side (``len * C`` groups, one batched
    matmul and one top-k), which gives each group what its own call gives. The losses share
    one :meth:`SoftDensityContrastiveLoss._signature`, so their shapes agree, except the per-image
    prototypes of batches of different sizes (those get one call each)."""
    def grouped(feats, valids, banks, bank_valids):  # (losses of one signature: their shapes agree)
        ks, precision = losses[0].density.ks, losses[0].density.precision
        if len(feats) == 1:
            return [DF.knn_density_grouped(feats[0], valids[0], ks, banks[0], bank_valids[0], precision=precision,
                                           validate_args=False)]
        if len({f.shape for f in feats}) > 1:  # per-image prototypes (C, N, D) of batches of different sizes
            return [DF.knn_density_grouped(f, v, ks, b, bv, precision=precision, validate_args=False)
                    for f, v, b, bv in zip(feats, valids, banks, bank_valids)]
        cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
        out = DF.knn_density_grouped(cat(feats), cat(valids), ks, cat(banks), cat(bank_valids), precision=precision,
                                     validate_args=False)
        return list(out.split(feats[0].shape[0]))

    banks = [None if m is None else m.features for m in memories]
    bank_valids = [None if m is None else m.valid for m in memories]
    dens = grouped([b.unit for b in batches], [b.valid for b in batches], banks, bank_valids)
    if batches[0].prototypes is None:
        return [(d, None) for d in dens]
    protos = grouped([b.prototypes for b in batches], [b.prototypes_valid for b in batches], banks, bank_valids)
    return list(zip(dens, protos))


def paired_losses(loss_a: SoftDensityContrastiveLoss, loss_b: SoftDensityContrastiveLoss,
                  embeddings_a: torch.Tensor, labels_a: torch.Tensor, embeddings_b: torch.Tensor,
                  labels_b: torch.Tensor, head_a=None, head_b=None) -> Tuple[DACLDetails, DACLDetails]:
    """Two models' DACL losses (each with its own bank and random stream) in one grouped call:
    the ``2C`` class groups of both go through one batched similarity matmul and one top-k
    (Eq. 3-5) and one Eq. 9-10 call; sampling, mining and the bank updates stay per model.
    Each loss gets what its own call ``loss_x(embeddings_x, labels_x, return_details=True,
    head=head_x)`` gives (the groups are independent), up to float rounding of the batched
    operations (bank densities may differ in the last bits); it *is* that, two calls, when the
    two losses' options or shapes differ or in ``anchor_mode="class"``. In the grouped call the
    two losses share one autograd graph: ``details_a.loss.backward()`` alone gives the second
    model's parameters a zero gradient rather than none (backpropagate the sum, as
    :class:`~torch_dacl.DACLObjective` does). Used by
    :class:`~torch_dacl.DACLObjective`; fewer, larger operations (half the launches on a GPU).

    Returns the two :class:`DACLDetails`.
    """
    if loss_a._signature() != loss_b._signature() or loss_a.miner.anchor_mode == "class":
        return (loss_a(embeddings_a, labels_a, return_details=True, head=head_a),
                loss_b(embeddings_b, labels_b, return_details=True, head=head_b))
    losses = (loss_a, loss_b)
    sampled = [loss._sample(e, y, None, h) for loss, e, y, h in
               zip(losses, (embeddings_a, embeddings_b), (labels_a, labels_b), (head_a, head_b))]
    batches = [b for b, _ in sampled]
    memories = [loss.bank_policy.memory(loss.bank) for loss in losses]
    dens = _densities(losses, batches, memories)
    mined = [loss.miner(b, d, pd, m, generator=g)
             for loss, b, (d, pd), m, (_, g) in zip(losses, batches, dens, memories, sampled)]
    term = loss_a.term  # one signature: the same options and shapes for both
    cat = lambda name: torch.cat([getattr(x, name) for x in mined])  # noqa: E731
    terms, contributing = DF.soft_density_contrastive_loss_grouped(
        cat("anchors"), cat("anchor_valid"), cat("centers"), cat("negatives"), cat("negative_valid"),
        temperature=term.temperature, weighting=term.weighting, gamma=term.gamma,
        include_positive=term.include_positive, centers_valid=cat("centers_valid"), validate_args=False)
    c = loss_a.num_classes
    results = [(DF.reduce_terms(terms[i * c:(i + 1) * c], contributing[i * c:(i + 1) * c], term.reduction),
                contributing[i * c:(i + 1) * c]) for i in range(2)]
    out = []
    for loss, b, (d, pd), x, (_, g), (value, contrib) in zip(losses, batches, dens, mined, sampled, results):
        loss.bank_policy.update(loss.bank, b, d, pd, loss.training, generator=g)
        out.append(loss._details(value, b.valid, d, x, contrib))
    return out[0], out[1]
