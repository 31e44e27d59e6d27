r"""The semi-supervised DACL objective of Eq. 1, beyond the user's supervised loss.

.. math::
    \mathcal{L} = \mathcal{L}_{sup} + \lambda_{cross}\,\mathcal{L}_{cross}
                  + \lambda_{CL}(t)\,\big(\mathcal{L}^{soft}_{CL}(a) + \mathcal{L}^{soft}_{CL}(b)\big)

:class:`DACLObjective` owns everything after :math:`\mathcal{L}_{sup}`: one
:class:`~torch_dacl.SoftDensityContrastiveLoss` per model (each model has its own embedding
space and memory bank), the Gaussian schedule :math:`\lambda_{CL}(t)`, :math:`\lambda_{cross}`
and the cross pseudo supervision term, and the pseudo-label policy that gives DACL its labels
on unlabeled images (:func:`torch_dacl.functional.dacl_labels`).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as DF
from ._validation import check_int, look_up_option
from .cotraining import ProjectionHead, made_by
from .loss import SoftDensityContrastiveLoss, paired_losses
from .modules import GaussianRampUp
from .options import PSEUDO_POLICIES, RAMP_SHAPES

__all__ = ["DACLObjective", "DACLObjectiveOutput", "gradient_share"]


class DACLObjectiveOutput(NamedTuple):
    """What :meth:`DACLObjective.forward` returns.

    Attributes:
        loss: ``cross_term + cl_term``, to add to the user's supervised loss.
        cross_term: :math:`\\lambda_{cross}\\,\\mathcal{L}_{cross}`.
        cl_term: the contrastive part of ``loss``: :math:`\\lambda_{CL}(t)(\\mathcal{L}_{CL}(a)
            + \\mathcal{L}_{CL}(b))`, or ``head_weight`` times the sum when the heads learn at
            their own rate (the backbone still receives :math:`\\lambda_{CL}(t)` times its
            gradient).
        cross: :math:`\\mathcal{L}_{cross}` unweighted.
        cl_a, cl_b: the two DACL losses unweighted (0 when ``contrastive=False``).
        lambda_cl: :math:`\\lambda_{CL}(t)` used in this step.
        stats: per-class ``(C,)`` float tensors (no host synchronisation): ``pseudo_pixels``
            (confident pseudo-labelled pixels on the unlabeled images), ``sampled``,
            ``anchors``, ``positives``, ``overlap`` (anchor/positive overlap),
            ``anchor_density``, ``positive_density``, ``anchor_center_cosine``,
            ``bank_fill``; each the mean of the two models' values.
    """

    loss: torch.Tensor
    cross_term: torch.Tensor
    cl_term: torch.Tensor
    cross: torch.Tensor
    cl_a: torch.Tensor
    cl_b: torch.Tensor
    lambda_cl: float
    stats: Dict[str, torch.Tensor]


class DACLObjective(nn.Module):
    r"""Eq. 1 without :math:`\mathcal{L}_{sup}`: CPS cross supervision plus the DACL term of
    each of the two co-trained models, with the schedule and the pseudo labels.

    Per step, for model :math:`a` (and symmetrically :math:`b`): its DACL labels are the
    ground truth on the labeled samples and model :math:`b`'s confident prediction on the
    unlabeled ones (:func:`~torch_dacl.functional.dacl_labels`); its embeddings and those
    labels go through its own :class:`~torch_dacl.SoftDensityContrastiveLoss`. The loss runs
    at every step, during the warm-up too (where :math:`\lambda_{CL} = 0`), so the memory
    banks are full when the term switches on; the 2D and 3D examples share this policy.

    **Loss scale.** Eq. 10 *sums* over the classes and their :math:`N_q` anchors (up to
    :math:`C \times 256` terms); the default ``reduction="mean"`` averages over the
    contributing anchors, so one unit of :math:`\lambda_{CL}` weighs about
    :math:`1/(C N_q)` of what it weighs under the sum. The paper's schedule peaks at
    :math:`\lambda_{CL} = 0.1` and its Fig. 5a calls a constant 0.5 "low", which suggests the
    paper's term is large; under the mean reduction ``lambda_cl = 0.1`` makes DACL's gradient
    on the shared weights a few percent of the others' (measure it with
    :func:`gradient_share`). ``lambda_cl`` and ``reduction`` are therefore options, to be
    chosen on validation data.

    **Sparse heads.** Given the two projection heads (``heads=(head_a, head_b)``, e.g.
    ``CoTrainingWrapper.heads``; :meth:`from_wrapper` does it), the objective runs them itself,
    inside each loss, at the pixels the loss samples only (``SoftDensityContrastiveLoss(...,
    head=)``): the third and fourth arguments of :meth:`forward` are then the feature maps
    the heads read (what :class:`~torch_dacl.CoTrainingWrapper` returns with
    ``sparse_heads=True``, its default). ``sparse_heads=False`` keeps the dense path (the
    arguments are the embeddings; ``heads`` are then only for ``head_weight``).
    ``anchor_mode="class"`` (Table 3) always runs the heads densely: its anchors take
    gradient through the prototypes of every pixel.

    **Which rows each term covers.** The CPS term (:math:`\mathcal{L}_{cross}`,
    :func:`~torch_dacl.functional.cross_pseudo_supervision_loss`) covers every row of the
    batch, labeled and unlabeled, at every step with the constant ``lambda_cross``. A loop
    that keeps its own CPS term (its own ramp, on its unlabeled rows) passes ``cross=False``:
    the objective then neither computes nor returns a CPS term, and ``loss`` is the DACL term
    alone. Each DACL term covers every row: ground truth on the labeled rows, pseudo labels on
    the unlabeled ones.

    **Heads.** The projection heads' only gradient is the DACL term's, so with the paper's
    schedule they learn at :math:`\lambda_{CL}(t)` times the learning rate (nothing in the
    warm-up). With ``head_weight`` set (and the two :class:`~torch_dacl.ProjectionHead`\ s
    passed as ``heads``), the heads learn from ``head_weight`` times the DACL loss at every
    step, warm-up included, while the networks below them still receive exactly
    :math:`\lambda_{CL}(t)` times its gradient (the heads scale the gradient at their input by
    :math:`\lambda_{CL}(t)/\mathrm{head\_weight}`, see :func:`~torch_dacl.scale_gradient`).
    ``head_weight=None`` (default) is the paper as written. Either way, the heads'
    parameters must be in the optimizer (:meth:`head_parameters`).

    Args:
        num_classes: ``C`` (background included).
        dim: embedding dimension ``D`` (None: the heads' ``out_channels``, which must be equal;
            with ``heads`` and a ``dim``, both heads must map to ``dim``).
        total_steps: :math:`t_{max}` of the schedule.
        lambda_cl: the peak of :math:`\lambda_{CL}(t)` (0.1 in Eq. 1).
        lambda_cross: :math:`\lambda_{cross}` (1).
        warmup: steps with :math:`\lambda_{CL} = 0`: an int (steps) or a float in
            ``[0, 1)`` (a fraction of ``total_steps``; default ``1/30``, the paper's 1,000 of
            30,000). Warns when it covers the whole run.
        contrastive: False gives plain CPS (no DACL term, nothing sampled).
        pseudo_policy: ``"fixed"``, ``"class_fraction"`` or ``"class_prior"``, see
            :func:`~torch_dacl.functional.dacl_labels`.
        pseudo_confidence: the pseudo labels' confidence threshold (0.95), named apart from
            Eq. 2's :math:`\phi` (``threshold``).
        pseudo_fraction: share of each predicted class kept by ``"class_fraction"`` (0.5).
        pixel_stride: DACL sees the pixels of a regular grid with this stride and a random
            offset per step (1 = every pixel); cheaper on a CPU.
        head_weight: see "Heads" above; None = the paper.
        heads: the two :class:`~torch_dacl.ProjectionHead` modules (not registered here, they
            stay the model's): run sparsely by the losses (see "Sparse heads"), and needed
            with ``head_weight``.
        sparse_heads: with ``heads``, run them at the sampled pixels (default True) or take
            dense embeddings (False).
        cross: compute the CPS term (default True); False for a loop that keeps its own.
        pseudo_agree: keep a pseudo label only where the two models' argmax agree (on top of
            ``pseudo_policy``; default False, the paper's rule is silent).
        ramp_shape: ``"gaussian"`` (Eq. 1) or ``"constant"`` (``lambda_cl`` from the end of
            the warm-up on, as Fig. 5a's constant :math:`\lambda_{CL}`), see
            :class:`~torch_dacl.GaussianRampUp`.
        ignore_index: label value that takes no part.
        **loss_options: passed to both :class:`~torch_dacl.SoftDensityContrastiveLoss`
            (``temperature``, ``ks``, ``num_anchors``, ``bank_size``, ``weighting``,
            ``reduction`` (``"mean"`` or ``"sum"``), ...); a Table 2 row is
            ``**table2_options("IV")`` (:mod:`torch_dacl.ablation`). With ``seed=s``, model
            :math:`a`'s loss draws from ``s`` and model :math:`b`'s from ``s + 1``.

    Shape:
        - logits: ``(N, C, *S)`` of each model; embeddings ``(N, D, *S')`` of each model.
        - labels: ``(N, *S)`` any integer dtype; only the rows where ``labeled`` is True are
          read.
        - labeled: ``(N,)`` bool.

    Example:
        >>> import torch.nn as nn
        >>> from torch_dacl import CoTrainingWrapper
        >>> def net():
        ...     return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
        >>> wrapper = CoTrainingWrapper(net(), net(), feature_layer="1", feature_channels=8, embed_dim=16)
        >>> objective = DACLObjective.from_wrapper(wrapper, num_classes=3, total_steps=100, num_anchors=8,
        ...                                        num_positives=8, num_negatives=8, bank_size=16)
        >>> x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 3, (4, 16, 16), dtype=torch.uint8)
        >>> labeled = torch.tensor([True, True, False, False])
        >>> out = wrapper(x)
        >>> res = objective(*out, labels=y, labeled=labeled)
        >>> sup = nn.functional.cross_entropy(out.logits_a[:2], y[:2].long())  # your L_sup
        >>> (sup + res.loss).backward()
        >>> objective.step()
        >>> sorted(res.stats)[:3]
        ['anchor_center_cosine', 'anchor_density', 'anchors']
    """

    def __init__(
        self,
        num_classes: int,
        dim: Optional[int] = None,
        total_steps: Optional[int] = None,
        lambda_cl: float = 0.1,
        lambda_cross: float = 1.0,
        warmup: Union[int, float] = 1 / 30,
        contrastive: bool = True,
        pseudo_policy: str = "fixed",
        pseudo_confidence: float = 0.95,
        pseudo_fraction: float = 0.5,
        pixel_stride: int = 1,
        head_weight: Optional[float] = None,
        heads: Optional[Sequence[ProjectionHead]] = None,
        ignore_index: int = -100,
        sparse_heads: bool = True,
        cross: bool = True,
        pseudo_agree: bool = False,
        ramp_shape: str = "gaussian",
        **loss_options,
    ) -> None:
        super().__init__()
        if total_steps is None:
            raise ValueError("total_steps: expected the number of training steps (t_max of Eq. 1's schedule), got None")
        if heads is not None and (len(heads) != 2 or not all(isinstance(h, ProjectionHead) for h in heads)):
            raise ValueError(f"heads: expected the two ProjectionHead modules, heads=(head_a, head_b), got {heads!r}")
        if dim is None:
            if heads is None:
                raise ValueError("dim: expected the embedding dimension D (or heads=, whose out_channels give it), "
                                 "got None")
            dim = heads[0].out_channels
        if heads is not None and [h.out_channels for h in heads] != [dim, dim]:
            raise ValueError(f"heads: expected both heads to map to dim={dim} channels, got out_channels "
                             f"{[h.out_channels for h in heads]}")
        look_up_option("pseudo_policy", pseudo_policy, PSEUDO_POLICIES)
        look_up_option("ramp_shape", ramp_shape, RAMP_SHAPES)
        if loss_options.get("reduction") == "none":
            raise ValueError("reduction: expected 'mean' or 'sum' in DACLObjective (its terms are scalars), got 'none'")
        if not 0.0 <= pseudo_confidence <= 1.0:
            raise ValueError(f"pseudo_confidence: expected a value in [0, 1], got {pseudo_confidence!r}")
        if not 0.0 < pseudo_fraction <= 1.0:
            raise ValueError(f"pseudo_fraction: expected a value in (0, 1], got {pseudo_fraction!r}")
        check_int("pixel_stride", pixel_stride)
        for name, v in (("lambda_cl", lambda_cl), ("lambda_cross", lambda_cross)):
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name}: expected a finite value >= 0, got {v!r}")
        if head_weight is not None:
            if not head_weight > 0:
                raise ValueError(f"head_weight: expected a value > 0 or None, got {head_weight!r}")
            if heads is None:
                raise ValueError("heads: head_weight needs the two ProjectionHead modules, "
                                 f"heads=(head_a, head_b); got {heads!r}")
        self.num_classes = num_classes
        self.lambda_cross = float(lambda_cross)
        self.contrastive = bool(contrastive)
        self.pseudo_policy = pseudo_policy
        self.pseudo_confidence = float(pseudo_confidence)
        self.pseudo_fraction = float(pseudo_fraction)
        self.pixel_stride = pixel_stride
        self.head_weight = head_weight
        self.ignore_index = ignore_index
        self.sparse_heads = bool(sparse_heads) and heads is not None
        self.cross = bool(cross)
        self.pseudo_agree = bool(pseudo_agree)
        self.ramp = GaussianRampUp(total_steps, max_weight=lambda_cl, warmup_steps=warmup, shape=ramp_shape)
        seed = loss_options.pop("seed", None)  # one seed: the two losses get distinct streams from it
        self.loss_a = SoftDensityContrastiveLoss(num_classes, dim, ignore_index=ignore_index, seed=seed,
                                                 **loss_options)
        self.loss_b = SoftDensityContrastiveLoss(num_classes, dim, ignore_index=ignore_index,
                                                 seed=None if seed is None else seed + 1, **loss_options)
        self._heads: List[ProjectionHead] = list(heads) if heads is not None else []  # not registered
        self._sync_heads()

    @classmethod
    def from_wrapper(cls, wrapper, num_classes: int, total_steps: int, **options) -> "DACLObjective":
        """The objective for a :class:`~torch_dacl.CoTrainingWrapper`: its heads (run sparsely
        when the wrapper has ``sparse_heads``), the embedding size from them.

        Example:
            >>> import torch.nn as nn
            >>> from torch_dacl import CoTrainingWrapper
            >>> def net():
            ...     return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
            >>> wrapper = CoTrainingWrapper(net(), net(), feature_layer="1", feature_channels=8, embed_dim=16)
            >>> objective = DACLObjective.from_wrapper(wrapper, num_classes=3, total_steps=100, num_anchors=8)
            >>> objective.loss_a.dim, objective.sparse_heads
            (16, True)
        """
        options.setdefault("sparse_heads", getattr(wrapper, "sparse_heads", False))
        options.setdefault("heads", wrapper.heads)
        return cls(num_classes, options.pop("dim", None), total_steps, **options)

    def extra_repr(self) -> str:
        return (f"lambda_cross={self.lambda_cross}, contrastive={self.contrastive}, "
                f"pseudo_policy={self.pseudo_policy!r}, pseudo_confidence={self.pseudo_confidence}, "
                f"pseudo_fraction={self.pseudo_fraction}, pixel_stride={self.pixel_stride}, "
                f"head_weight={self.head_weight}, sparse_heads={self.sparse_heads}, cross={self.cross}"
                + (", pseudo_agree=True" if self.pseudo_agree else ""))

    # ------------------------------------------------------------------ schedule and heads
    @property
    def lambda_cl(self) -> float:
        """:math:`\\lambda_{CL}(t)` of the current step."""
        return self.ramp.value

    def step(self) -> None:
        """Advance the schedule; call once per optimisation step, after ``optimizer.step()``."""
        self.ramp.step()
        self._sync_heads()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the heads passed as ``heads`` (put them in the optimizer)."""
        for h in self._heads:
            yield from h.parameters()

    def _sync_heads(self) -> None:
        if self.head_weight is not None:
            for h in self._heads:
                h.input_grad_scale = self.ramp.value / self.head_weight

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        res = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._sync_heads()
        return res

    # ------------------------------------------------------------------ forward
    def labels_for(self, labels: torch.Tensor, labeled: torch.Tensor, logits_other: torch.Tensor):
        """DACL labels of one model from the other model's logits (see
        :func:`~torch_dacl.functional.dacl_labels`)."""
        return DF.dacl_labels(labels, labeled, logits_other, self.pseudo_policy, self.pseudo_confidence,
                              self.pseudo_fraction, self.ignore_index)

    def forward(
        self,
        logits_a: torch.Tensor,
        logits_b: torch.Tensor,
        embeddings_a: Optional[torch.Tensor],
        embeddings_b: Optional[torch.Tensor],
        labels: torch.Tensor,
        labeled: torch.Tensor,
    ) -> DACLObjectiveOutput:
        """One step of Eq. 1 beyond :math:`\\mathcal{L}_{sup}` (see the class docstring).

        ``embeddings_a``, ``embeddings_b``: each model's embeddings ``(N, D, *S')``, or, with
        sparse heads (``heads=`` given), the feature maps the heads read ``(N, F, *S')``. They
        may be None with ``contrastive=False`` (plain CPS)."""
        lam = self.ramp.value
        if self.cross:
            cross = DF.cross_pseudo_supervision_loss(logits_a, logits_b)
            cross_term = self.lambda_cross * cross
        else:  # the loop keeps its own CPS term
            cross = cross_term = logits_a.new_zeros((), dtype=torch.float32)
        zero = logits_a.new_zeros((), dtype=torch.float32)
        if not self.contrastive:
            return DACLObjectiveOutput(cross_term, cross_term, zero, cross, zero, zero, lam, {})
        if embeddings_a is None or embeddings_b is None:
            raise ValueError("embeddings_a, embeddings_b: expected the two models' embeddings (N, D, *S), got None "
                             "(only contrastive=False runs without them)")
        labeled = labeled.to(device=logits_a.device, dtype=torch.bool)
        ya, conf_a = self.labels_for(labels, labeled, logits_b)
        yb, conf_b = self.labels_for(labels, labeled, logits_a)
        if self.pseudo_agree:  # only where both models predict the same class
            with torch.no_grad():
                agree = logits_a.detach().max(1).indices == logits_b.detach().max(1).indices
            ya = torch.where(conf_a & ~agree, torch.full_like(ya, self.ignore_index), ya)
            yb = torch.where(conf_b & ~agree, torch.full_like(yb, self.ignore_index), yb)
            conf_a, conf_b = conf_a & agree, conf_b & agree
        pseudo = (self._count(ya, conf_a) + self._count(yb, conf_b)) / 2
        ea, eb = embeddings_a, embeddings_b
        head_a = head_b = None
        if self.sparse_heads:
            head_a, head_b = self._heads
            if made_by(ea, head_a) or made_by(eb, head_b):
                raise ValueError("embeddings_a, embeddings_b: these are the heads' dense output, and the objective runs "
                                 "the heads itself (sparse_heads): pass the feature maps the heads read "
                                 "(CoTrainingWrapper(sparse_heads=True)), or build the objective with sparse_heads=False")
            for name, e, head in (("embeddings_a", ea, head_a), ("embeddings_b", eb, head_b)):
                if e.dim() >= 2 and e.shape[1] != head.in_channels:
                    raise ValueError(f"{name}: with sparse heads, expected the feature map the head reads, "
                                     f"{head.in_channels} channels (N, {head.in_channels}, *S), got shape "
                                     f"{tuple(e.shape)}; pass CoTrainingWrapper(sparse_heads=True)'s features, or "
                                     f"build the objective with sparse_heads=False for dense embeddings")
            if self.loss_a.anchor_mode == "class":  # class anchors: gradient through every pixel's prototype
                ea, eb, head_a, head_b = head_a(ea), head_b(eb), None, None
        s = self.pixel_stride
        if s > 1 and ya.shape[1:] != ea.shape[2:]:  # the grid needs the labels at the features' resolution
            ya, yb = (F.interpolate(y.unsqueeze(1).float(), size=ea.shape[2:], mode="nearest").squeeze(1).long()
                      for y in (ya, yb))  # (without a grid the loss resizes them itself)
        if s > 1:  # a regular grid with a random offset (drawn on the CPU: no device sync)
            off = [int(v) for v in torch.randint(s, (ea.dim() - 2,))]
            grid = (Ellipsis,) + tuple(slice(o, None, s) for o in off)
            ea, eb, ya, yb = ea[grid], eb[grid], ya[grid], yb[grid]
        det_a, det_b = paired_losses(self.loss_a, self.loss_b, ea, ya, eb, yb, head_a, head_b)  # one grouped call
        weight = lam if self.head_weight is None else self.head_weight
        cl_term = weight * (det_a.loss + det_b.loss)
        stats = {k: (v + det_b.per_class()[k]) / 2 for k, v in det_a.per_class().items()}
        stats["pseudo_pixels"] = pseudo
        return DACLObjectiveOutput(cross_term + cl_term, cross_term, cl_term, cross, det_a.loss, det_b.loss, lam,
                                   stats)

    def _count(self, y: torch.Tensor, confident: torch.Tensor) -> torch.Tensor:
        """``(C,)`` confident pseudo-labelled pixels per class (no host sync)."""
        c = self.num_classes
        idx = torch.where(confident, y, torch.full_like(y, c)).reshape(-1)
        return torch.zeros(c + 1, device=y.device).scatter_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))[:c]

    @staticmethod
    def summarize(stats: Mapping[str, torch.Tensor], class_names: Optional[Sequence[str]] = None) -> Dict[str, float]:
        """Flatten ``stats`` to ``{"name/class": float}`` for logging (one host sync)."""
        out: Dict[str, float] = {}
        for key, v in stats.items():
            vals = v.detach().float().cpu().tolist()
            names = class_names or [str(i) for i in range(len(vals))]
            for name, x in zip(names, vals):
                out[f"{key}/{name}"] = float(x)
        return out


def gradient_share(
    terms: Mapping[str, torch.Tensor], params: Iterable[torch.Tensor], numerator: str = "cl",
) -> Dict[str, float]:
    r"""Gradient norms of loss terms on shared parameters, and the share of one of them.

    For each term :math:`T`, :math:`\lVert\nabla_\theta T\rVert_2` over ``params`` (e.g. the
    networks without their projection heads); ``share`` is the norm of ``terms[numerator]``
    divided by the sum of the others' norms, the measure of how much the DACL term can act:
    ``gradient_share({"cl": out.cl_term, "sup": sup, "cross": out.cross_term}, params)``.
    Runs one extra backward pass per term (the graph is retained): call it every N steps.

    Example:
        >>> w = torch.ones(3, requires_grad=True)
        >>> r = gradient_share({"cl": (0.1 * w).sum(), "sup": w.sum()}, [w])
        >>> round(r["share"], 3)
        0.1
    """
    params = [p for p in params if p.requires_grad]
    norms: Dict[str, float] = {}
    for name, t in terms.items():
        if not t.requires_grad:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(t, params, retain_graph=True, allow_unused=True)
        sq = sum(float(g.detach().float().pow(2).sum()) for g in grads if g is not None)
        norms[name] = math.sqrt(sq)
    others = sum(v for k, v in norms.items() if k != numerator)
    out = {f"grad_norm/{k}": v for k, v in norms.items()}
    out["share"] = norms.get(numerator, 0.0) / others if others > 0 else 0.0
    return out
