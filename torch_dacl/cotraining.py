"""Two segmentation networks trained by cross pseudo supervision, with projection heads."""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn

import torch.nn.functional as F

from . import functional as DF
from ._validation import look_up_option
from .options import POINT_NORMS

__all__ = ["CoTrainingWrapper", "CoTrainingOutput", "CoTrainingFeatures", "FeatureLayer", "ProjectionHead",
           "SegmentationWithEmbeddings", "feature_layers", "scale_gradient"]


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward.

    :class:`ProjectionHead` puts it on its input so that the projection head and the network
    below it can learn from the DACL term at different rates (see
    :class:`~torch_dacl.objective.DACLObjective`'s ``head_weight``).

    Example:
        >>> x = torch.ones(3, requires_grad=True)
        >>> scale_gradient(x, 0.5).sum().backward()
        >>> x.grad.tolist()
        [0.5, 0.5, 0.5]
    """
    if scale == 1.0:
        return x
    return _ScaleGradient.apply(x, float(scale))


class CoTrainingOutput(NamedTuple):
    """Outputs of :class:`CoTrainingWrapper`: logits and embeddings of both models.

    Example:
        >>> out = CoTrainingOutput(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8),
        ...                        torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 8, 8))
        >>> logits_a, logits_b, emb_a, emb_b = out  # a NamedTuple
        >>> out.embeddings_a.shape
        torch.Size([1, 16, 8, 8])
    """

    logits_a: torch.Tensor
    logits_b: torch.Tensor
    embeddings_a: torch.Tensor
    embeddings_b: torch.Tensor


class CoTrainingFeatures(NamedTuple):
    """Outputs of :class:`CoTrainingWrapper` with ``sparse_heads=True``: logits of both models
    and the feature maps their projection heads read (the heads run later, at the pixels the
    loss samples: pass these to :class:`~torch_dacl.DACLObjective` built with the heads, or
    to :class:`~torch_dacl.SoftDensityContrastiveLoss` with ``head=``). Unpacks like
    :class:`CoTrainingOutput`.

    Example:
        >>> out = CoTrainingFeatures(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8),
        ...                          torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 8, 8))
        >>> logits_a, logits_b, feat_a, feat_b = out
        >>> out.features_a.shape
        torch.Size([1, 16, 8, 8])
    """

    logits_a: torch.Tensor
    logits_b: torch.Tensor
    features_a: torch.Tensor
    features_b: torch.Tensor


class ProjectionHead(nn.Module):
    r"""Projection head ``z`` of the paper: conv 1x1 - BN - ReLU - conv 1x1 (2D or 3D).

    The head is pointwise: applied to a feature map (``forward``) it maps every pixel alone,
    so it can also be applied to the feature vectors of a few sampled pixels
    (:meth:`embed_points`). :class:`~torch_dacl.SoftDensityContrastiveLoss` does that with
    ``head=``: it samples the pixels from the labels first and runs the head, with gradient,
    only where the loss looks (the *sparse head*; the loss's gradient reaches the feature map
    at those pixels only, as it does through the dense head). The one difference between the
    two paths is the normalisation, :math:`z` being otherwise the same function:

    * ``forward`` (dense): BatchNorm over every pixel of the batch (in ``train()``: batch
      statistics, running statistics updated; in ``eval()``: the running statistics).
    * :meth:`embed_points` with ``point_norm="sample"`` (default): BatchNorm over the valid
      sampled points, in ``train()`` the batch statistics of those points (gradient through
      them, as in BatchNorm) with the running statistics updated from them; in ``eval()``
      the running statistics. The sample is class-balanced (at most ``max_samples_per_class``
      pixels per class), so its statistics are those of the balanced sample, not of all
      pixels. ``point_norm="frozen"``: always the running statistics, never updated (a
      normalisation without batch statistics: the affine map of the BatchNorm alone while the
      running statistics are at their initial values); the dense head in ``eval()`` gives the
      same values, which is how the two paths are tested equal.

    Args:
        in_channels: channels of the feature map ``f``.
        out_channels: embedding dimension ``D``.
        hidden_channels: width of the hidden layer (default: ``max(in_channels, out_channels)``).
        spatial_dims: 2 or 3.
        point_norm: the normalisation of :meth:`embed_points`: ``"sample"`` or ``"frozen"``.

    Example:
        >>> head = ProjectionHead(in_channels=16, out_channels=64, spatial_dims=3)
        >>> head(torch.randn(2, 16, 4, 8, 8)).shape
        torch.Size([2, 64, 4, 8, 8])
        >>> head.embed_points(torch.randn(100, 16)).shape  # 100 sampled pixels' features
        torch.Size([100, 64])
    """

    def __init__(self, in_channels: int, out_channels: int = 64, hidden_channels: Optional[int] = None,
                 spatial_dims: int = 2, point_norm: str = "sample") -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims: expected 2 or 3, got {spatial_dims!r}")
        hidden = hidden_channels or max(in_channels, out_channels)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.spatial_dims = spatial_dims
        self.point_norm = look_up_option("point_norm", point_norm, POINT_NORMS)
        self.net = nn.Sequential(conv(in_channels, hidden, 1), norm(hidden), nn.ReLU(inplace=True),
                                 conv(hidden, out_channels, 1))
        #: multiplies the gradient that flows back through the head into the network below it
        #: (1: plain backpropagation); set by :class:`~torch_dacl.objective.DACLObjective`
        self.input_grad_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"ProjectionHead input: expected {self.in_channels} channels (in_channels) in shape "
                             f"(N, {self.in_channels}, *spatial) with {self.spatial_dims} spatial dims "
                             f"(spatial_dims), got {tuple(x.shape)}")
        return self.net(scale_gradient(x, self.input_grad_scale))

    def embed_points(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The head on point features: ``x (M, in_channels)`` -> ``(M, out_channels)``.

        ``valid (M,)`` bool marks the rows that hold a sampled pixel (padding rows are
        mapped too, but take no part in the normalisation statistics); all rows when
        omitted. Vectorised, no host synchronisation. See the class docstring for the
        normalisation (``point_norm``).
        """
        if x.dim() != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"embed_points: expected x of shape (M, {self.in_channels}) (in_channels), "
                             f"got {tuple(x.shape)}")
        conv1, bn, _, conv2 = self.net
        x = x.to(conv1.weight.dtype)  # e.g. half-precision features from an autocast forward
        h = F.linear(scale_gradient(x, self.input_grad_scale), conv1.weight.flatten(1), conv1.bias)
        # the normalisation in at least float32 (as BatchNorm runs under autocast); a float64 head keeps float64
        h = h.to(torch.promote_types(h.dtype, torch.float32))
        if self.point_norm == "sample" and bn.training:
            w = torch.ones_like(h[:, :1]) if valid is None else valid.to(h.dtype).reshape(-1, 1)
            n = w.sum()
            mean = (h * w).sum(0) / n.clamp_min(1.0)
            var = ((h - mean).square() * w).sum(0) / n.clamp_min(1.0)
            if bn.track_running_stats:
                _update_running_stats(bn, mean.detach(), var.detach(), n.detach())
        else:
            mean, var = bn.running_mean, bn.running_var
        h = (h - mean) * torch.rsqrt(var + bn.eps)
        if bn.affine:
            h = h * bn.weight + bn.bias
        # back to the head's dtype (a bfloat16 / float16 model; under autocast F.linear casts anyway)
        return F.linear(F.relu(h).to(conv2.weight.dtype), conv2.weight.flatten(1), conv2.bias)


def _update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                          n: torch.Tensor) -> None:
    """BatchNorm's running-statistics update from a batch of ``n`` points (unbiased variance),
    as ``nn.BatchNorm`` does it in training, without a host synchronisation."""
    with torch.no_grad():
        keep = (n > 1).to(mean.dtype)  # a sample of fewer than 2 points leaves the statistics as they were
        bn.num_batches_tracked.add_((n > 1).to(bn.num_batches_tracked.dtype))
        # momentum=None (a cumulative average) needs the count on the host: one sync, only then
        momentum = bn.momentum if bn.momentum is not None else 1.0 / max(1, bn.num_batches_tracked.item())
        unbiased = var * n / (n - 1).clamp_min(1.0)
        bn.running_mean.add_(momentum * keep * (mean - bn.running_mean))
        bn.running_var.add_(momentum * keep * (unbiased - bn.running_var))


class CoTrainingWrapper(nn.Module):
    r"""Two segmentation networks for co-training (CPS), each with a projection head.

    The features ``f`` are taken by a forward hook on a named submodule of each model
    (``feature_layer``, e.g. ``"decoder"`` for segmentation-models-pytorch models;
    :func:`feature_layers` lists the candidates of a model), so any ``nn.Module`` whose
    forward returns logits works unchanged. A projection head maps them to the embeddings
    ``j = z(f)`` that DACL contrasts. The heads are created on the device and in the floating
    dtype of the models' parameters.

    Args:
        model_a, model_b: segmentation networks returning logits ``(N, C, *S)``.
        feature_layer: dotted name of the submodule whose output is ``f`` (the same name in
            both models). A tuple/list output takes its last element.
        feature_channels: channels of ``f`` (16 for smp's U-Net default decoder).
        embed_dim: embedding dimension ``D``.
        hidden_dim: hidden width of the projection heads.
        spatial_dims: 2 for ``(N, C, H, W)``, 3 for ``(N, C, D, H, W)``.
        sparse_heads: True (default): ``forward`` returns :class:`CoTrainingFeatures`, the
            feature maps ``f`` instead of the embeddings, and the heads run inside the DACL
            loss at the sampled pixels only (:class:`~torch_dacl.DACLObjective` built with
            ``heads=wrapper.heads``, or :meth:`DACLObjective.from_wrapper`); see
            :class:`ProjectionHead` for what differs from the dense heads (their
            normalisation statistics). False: :class:`CoTrainingOutput` with the dense
            embeddings, the heads over every pixel.
        point_norm: the heads' normalisation on sampled pixels (:class:`ProjectionHead`).

    Example:
        >>> import torch.nn as nn
        >>> def net():
        ...     return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> wrapper = CoTrainingWrapper(net(), net(), feature_layer="1", feature_channels=8, embed_dim=16,
        ...                             sparse_heads=False)
        >>> out = wrapper(torch.randn(2, 1, 32, 32))
        >>> out.logits_a.shape, out.embeddings_b.shape
        (torch.Size([2, 4, 32, 32]), torch.Size([2, 16, 32, 32]))
        >>> wrapper.cross_loss(out.logits_a, out.logits_b).ndim
        0
        >>> wrapper.sparse_heads = True  # the default: features for the sparse heads
        >>> wrapper(torch.randn(2, 1, 32, 32)).features_a.shape
        torch.Size([2, 8, 32, 32])
    """

    def __init__(
        self,
        model_a: nn.Module,
        model_b: nn.Module,
        feature_layer: str,
        feature_channels: int,
        embed_dim: int = 64,
        hidden_dim: Optional[int] = None,
        spatial_dims: int = 2,
        sparse_heads: bool = True,
        point_norm: str = "sample",
    ) -> None:
        super().__init__()
        self.model_a = model_a
        self.model_b = model_b
        self.feature_layer = feature_layer
        self.spatial_dims = spatial_dims
        self.sparse_heads = bool(sparse_heads)
        self.head_a = _follow(ProjectionHead(feature_channels, embed_dim, hidden_dim, spatial_dims, point_norm),
                              model_a)
        self.head_b = _follow(ProjectionHead(feature_channels, embed_dim, hidden_dim, spatial_dims, point_norm),
                              model_b)
        self._features: dict = {}
        self._capturing = False  # the hooks keep features only during this wrapper's forward
        for key, model in (("a", model_a), ("b", model_b)):  # (a partial of a bound method: deepcopy-safe)
            _submodule(model, feature_layer, f"model_{key}").register_forward_hook(functools.partial(self._hook, key))

    @property
    def heads(self) -> Tuple["ProjectionHead", "ProjectionHead"]:
        """``(head_a, head_b)``, e.g. for :class:`~torch_dacl.DACLObjective`'s ``heads``."""
        return self.head_a, self.head_b

    def _hook(self, key: str, module, inputs, output) -> None:
        if not self._capturing:  # e.g. model_a(x) called alone at inference
            return
        if isinstance(output, (tuple, list)):
            output = output[-1]
        self._features[key] = output

    def _feature(self, key: str, head: "ProjectionHead") -> torch.Tensor:
        f = self._features.pop(key, None)
        if f is None:
            raise RuntimeError(f"the hook on {self.feature_layer!r} of model_{key} did not fire during forward")
        if f.dim() != self.spatial_dims + 2:
            raise ValueError(f"feature_layer output: expected shape (N, C, *spatial) with {self.spatial_dims} "
                             f"spatial dims, got {tuple(f.shape)}")
        if f.shape[1] != head.in_channels:
            raise ValueError(f"feature_channels: the output of feature_layer {self.feature_layer!r} of model_{key} "
                             f"has {f.shape[1]} channels (shape {tuple(f.shape)}), but feature_channels="
                             f"{head.in_channels}; pass feature_channels={f.shape[1]} (torch_dacl.feature_layers("
                             f"model, example_input) lists every layer with its channels)")
        return f

    def forward(self, x: torch.Tensor):
        self._capturing = True
        try:
            logits_a = self.model_a(x)
            f_a = self._feature("a", self.head_a)
            if not self.sparse_heads:
                f_a = self.head_a(f_a)
            logits_b = self.model_b(x)
            f_b = self._feature("b", self.head_b)
            if not self.sparse_heads:
                f_b = self.head_b(f_b)
        finally:
            self._capturing = False
            self._features.clear()
        if self.sparse_heads:
            return CoTrainingFeatures(logits_a, logits_b, f_a, f_b)
        return CoTrainingOutput(logits_a, logits_b, f_a, f_b)

    @staticmethod
    def cross_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cross pseudo supervision :math:`\\mathcal{L}_{cross}`, see
        :func:`torch_dacl.functional.cross_pseudo_supervision_loss`."""
        return DF.cross_pseudo_supervision_loss(logits_a, logits_b, mask)


class SegmentationWithEmbeddings(nn.Module):
    r"""One segmentation network and a projection head on one of its layers.

    For loops that are not two identical models (a mean teacher, two different
    architectures, a single model with pseudo labels): the features ``f`` are taken by a
    forward hook on ``feature_layer`` and mapped to embeddings ``j = z(f)``; the forward
    returns ``(logits, embeddings)``. The model itself is unchanged and can still be called
    alone. The head is created on the device and in the floating dtype of the model's
    parameters.

    Args:
        model: segmentation network returning logits ``(N, C, *S)``.
        feature_layer: dotted name of the submodule whose output is ``f`` (a tuple/list
            output takes its last element); :func:`feature_layers` lists the candidates with
            their channels and resolution.
        feature_channels: channels of ``f``; checked at the first forward.
        embed_dim: embedding dimension ``D``.
        hidden_dim: hidden width of the projection head.
        spatial_dims: 2 or 3.
        sparse_head: True (default): the forward returns ``(logits, features)``, the feature
            map ``f`` the head reads, for ``dacl(features, labels, head=model.head)`` (the
            head runs at the sampled pixels only, see :class:`ProjectionHead`). False:
            ``(logits, embeddings)``, the head over every pixel.
        point_norm: the head's normalisation on sampled pixels (:class:`ProjectionHead`).

    Example:
        >>> import torch.nn as nn
        >>> from torch_dacl import SoftDensityContrastiveLoss
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> model = SegmentationWithEmbeddings(net, feature_layer="1", feature_channels=8, embed_dim=16)
        >>> logits, features = model(torch.randn(2, 1, 32, 32))
        >>> logits.shape, features.shape
        (torch.Size([2, 4, 32, 32]), torch.Size([2, 8, 32, 32]))
        >>> dacl = SoftDensityContrastiveLoss(num_classes=4, dim=16, num_anchors=8, num_positives=8, num_negatives=8)
        >>> dacl(features, logits.argmax(1), head=model.head).ndim
        0
    """

    def __init__(self, model: nn.Module, feature_layer: str, feature_channels: int, embed_dim: int = 64,
                 hidden_dim: Optional[int] = None, spatial_dims: int = 2, sparse_head: bool = True,
                 point_norm: str = "sample") -> None:
        super().__init__()
        self.model = model
        self.head = _follow(ProjectionHead(feature_channels, embed_dim, hidden_dim, spatial_dims, point_norm), model)
        self.feature_layer = feature_layer
        self.spatial_dims = spatial_dims
        self.sparse_head = bool(sparse_head)
        self._feature: Optional[torch.Tensor] = None
        self._capturing = False
        _submodule(model, feature_layer, "model").register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self._capturing:
            self._feature = output[-1] if isinstance(output, (tuple, list)) else output

    def forward(self, x: torch.Tensor):
        self._capturing = True
        try:
            logits = self.model(x)
            f = self._feature
        finally:
            self._capturing = False
            self._feature = None
        if f is None:
            raise RuntimeError(f"the hook on {self.feature_layer!r} did not fire during the model's forward")
        if f.dim() != self.spatial_dims + 2 or f.shape[1] != self.head.in_channels:
            raise ValueError(f"feature_channels: the output of feature_layer {self.feature_layer!r} has shape "
                             f"{tuple(f.shape)}; expected (N, {self.head.in_channels}, *spatial) with "
                             f"{self.spatial_dims} spatial dims (feature_channels={self.head.in_channels}, "
                             f"spatial_dims={self.spatial_dims}); torch_dacl.feature_layers(model, example_input) "
                             f"lists every layer with its channels")
        return logits, (f if self.sparse_head else self.head(f))


class FeatureLayer(NamedTuple):
    """One candidate of :func:`feature_layers`: a submodule's name, the channels and spatial
    shape of its output, and that resolution as a fraction of the input's."""

    name: str
    channels: int
    spatial: Tuple[int, ...]
    scale: float


def feature_layers(model: nn.Module, example_input: torch.Tensor) -> List[FeatureLayer]:
    """The submodules of ``model`` whose output could feed a projection head: every named
    submodule whose output (or the last element of a tuple/list output) has the rank of
    ``example_input`` (``(N, C, *spatial)``), in the order they run, with its channels and
    resolution. Runs one forward pass in ``eval()`` mode without gradient (the model's mode
    and its BatchNorm statistics are kept).

    DACL contrasts pixel embeddings, so a layer at the input's full resolution (``scale``
    1.0, e.g. the last decoder block, as the examples use) keeps the most pixels; a coarser,
    more semantic layer is an option (labels are resized to it).

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> [(c.name, c.channels, c.scale) for c in feature_layers(net, torch.randn(1, 1, 16, 16))]
        [('0', 8, 1.0), ('1', 8, 1.0), ('2', 4, 1.0)]
    """
    found: List[FeatureLayer] = []
    seen = set()
    in_spatial = tuple(example_input.shape[2:])

    def hook(name):
        def fn(module, inputs, output):
            if isinstance(output, (tuple, list)) and output:
                output = output[-1]
            if torch.is_tensor(output) and output.dim() == example_input.dim() and name not in seen:
                seen.add(name)
                sp = tuple(output.shape[2:])
                found.append(FeatureLayer(name, int(output.shape[1]), sp, sp[-1] / in_spatial[-1]))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    was_training = model.training
    model.eval()  # no BatchNorm statistics move
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


def made_by(x: torch.Tensor, head: "ProjectionHead") -> bool:
    """Whether ``x`` is the output of ``head``'s dense forward (its last 1x1 conv is the
    operation that made it): one look at the autograd graph, no computation."""
    fn = getattr(x, "grad_fn", None)
    weight = head.net[3].weight
    if fn is not None and type(fn).__name__.startswith("ToCopy"):  # x cast after the head (e.g. .float())
        fn = fn.next_functions[0][0] if fn.next_functions else None
    if fn is None:
        return False
    for nf, _ in fn.next_functions:
        if nf is not None and type(nf).__name__.startswith("ToCopy") and nf.next_functions:
            nf = nf.next_functions[0][0]  # the weight cast by autocast
        if nf is not None and getattr(nf, "variable", None) is weight:
            return True
    return False


def _follow(head: nn.Module, model: nn.Module) -> nn.Module:
    """``head`` moved to the device and floating dtype of ``model``'s first parameter."""
    p = next(model.parameters(), None)
    if p is None:
        return head
    return head.to(device=p.device, dtype=p.dtype if p.is_floating_point() else None)


def _submodule(model: nn.Module, name: str, arg: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        names = [n for n, _ in model.named_children()]
        raise ValueError(f"feature_layer: expected the name of a submodule of {arg} "
                         f"(children: {names}; torch_dacl.feature_layers(model, example_input) lists every "
                         f"layer with its channels and resolution), got {name!r}") from e
