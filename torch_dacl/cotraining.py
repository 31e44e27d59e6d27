"""Two segmentation networks trained by cross pseudo supervision, with projection heads."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from . import functional as DF

__all__ = ["CoTrainingWrapper", "CoTrainingOutput", "ProjectionHead", "SegmentationWithEmbeddings", "scale_gradient"]


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


class ProjectionHead(nn.Module):
    """Projection head ``z`` of the paper: conv 1x1 - BN - ReLU - conv 1x1 (2D or 3D).

    Args:
        in_channels: channels of the feature map ``f``.
        out_channels: embedding dimension ``D``.
        hidden_channels: width of the hidden layer (default: ``in_channels``... at least
            ``out_channels``).
        spatial_dims: 2 or 3.

    Example:
        >>> head = ProjectionHead(in_channels=16, out_channels=64, spatial_dims=3)
        >>> head(torch.randn(2, 16, 4, 8, 8)).shape
        torch.Size([2, 64, 4, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int = 64, hidden_channels: Optional[int] = None,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims: expected 2 or 3, got {spatial_dims!r}")
        hidden = hidden_channels or max(in_channels, out_channels)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.in_channels = in_channels
        self.net = nn.Sequential(conv(in_channels, hidden, 1), norm(hidden), nn.ReLU(inplace=True),
                                 conv(hidden, out_channels, 1))
        #: multiplies the gradient that flows back through the head into the network below it
        #: (1: plain backpropagation); set by :class:`~torch_dacl.objective.DACLObjective`
        self.input_grad_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"ProjectionHead input: expected {self.in_channels} channels (in_channels) in shape "
                             f"(N, {self.in_channels}, *spatial), got {tuple(x.shape)}")
        return self.net(scale_gradient(x, self.input_grad_scale))


class CoTrainingWrapper(nn.Module):
    r"""Two segmentation networks for co-training (CPS), each with a projection head.

    The features ``f`` are taken by a forward hook on a named submodule of each model
    (``feature_layer``, e.g. ``"decoder"`` for segmentation-models-pytorch models), so any
    ``nn.Module`` whose forward returns logits works unchanged. A projection head maps them
    to the embeddings ``j = z(f)`` that DACL contrasts.

    Args:
        model_a, model_b: segmentation networks returning logits ``(N, C, *S)``.
        feature_layer: dotted name of the submodule whose output is ``f`` (the same name in
            both models). A tuple/list output takes its last element.
        feature_channels: channels of ``f`` (16 for smp's U-Net default decoder).
        embed_dim: embedding dimension ``D``.
        hidden_dim: hidden width of the projection heads.
        spatial_dims: 2 for ``(N, C, H, W)``, 3 for ``(N, C, D, H, W)``.

    Example:
        >>> import torch.nn as nn
        >>> def net():
        ...     return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> wrapper = CoTrainingWrapper(net(), net(), feature_layer="1", feature_channels=8, embed_dim=16)
        >>> out = wrapper(torch.randn(2, 1, 32, 32))
        >>> out.logits_a.shape, out.embeddings_b.shape
        (torch.Size([2, 4, 32, 32]), torch.Size([2, 16, 32, 32]))
        >>> wrapper.cross_loss(out.logits_a, out.logits_b).ndim
        0
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
    ) -> None:
        super().__init__()
        self.model_a = model_a
        self.model_b = model_b
        self.feature_layer = feature_layer
        self.spatial_dims = spatial_dims
        self.head_a = ProjectionHead(feature_channels, embed_dim, hidden_dim, spatial_dims)
        self.head_b = ProjectionHead(feature_channels, embed_dim, hidden_dim, spatial_dims)
        self._features: dict = {}
        self._capturing = False  # the hooks keep features only during this wrapper's forward
        for key, model in (("a", model_a), ("b", model_b)):
            _submodule(model, feature_layer, f"model_{key}").register_forward_hook(self._hook(key))

    def _hook(self, key: str):
        def hook(module, inputs, output):
            if not self._capturing:  # e.g. model_a(x) called alone at inference
                return
            if isinstance(output, (tuple, list)):
                output = output[-1]
            self._features[key] = output
        return hook

    def _embed(self, key: str, head: "ProjectionHead") -> torch.Tensor:
        f = self._features.pop(key, None)
        if f is None:
            raise RuntimeError(f"the hook on {self.feature_layer!r} of model_{key} did not fire during forward")
        if f.dim() != self.spatial_dims + 2:
            raise ValueError(f"feature_layer output: expected shape (N, C, *spatial) with {self.spatial_dims} "
                             f"spatial dims, got {tuple(f.shape)}")
        if f.shape[1] != head.in_channels:
            raise ValueError(f"feature_channels: the output of feature_layer {self.feature_layer!r} of model_{key} "
                             f"has {f.shape[1]} channels (shape {tuple(f.shape)}), but feature_channels="
                             f"{head.in_channels}; pass feature_channels={f.shape[1]}")
        return head(f)

    def forward(self, x: torch.Tensor) -> CoTrainingOutput:
        self._capturing = True
        try:
            logits_a = self.model_a(x)
            emb_a = self._embed("a", self.head_a)
            logits_b = self.model_b(x)
            emb_b = self._embed("b", self.head_b)
        finally:
            self._capturing = False
            self._features.clear()
        return CoTrainingOutput(logits_a, logits_b, emb_a, emb_b)

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
    alone.

    Args:
        model: segmentation network returning logits ``(N, C, *S)``.
        feature_layer: dotted name of the submodule whose output is ``f`` (a tuple/list
            output takes its last element); ``[n for n, _ in model.named_modules()]`` lists them.
        feature_channels: channels of ``f``; checked at the first forward.
        embed_dim: embedding dimension ``D``.
        hidden_dim: hidden width of the projection head.
        spatial_dims: 2 or 3.

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> model = SegmentationWithEmbeddings(net, feature_layer="1", feature_channels=8, embed_dim=16)
        >>> logits, emb = model(torch.randn(2, 1, 32, 32))
        >>> logits.shape, emb.shape
        (torch.Size([2, 4, 32, 32]), torch.Size([2, 16, 32, 32]))
    """

    def __init__(self, model: nn.Module, feature_layer: str, feature_channels: int, embed_dim: int = 64,
                 hidden_dim: Optional[int] = None, spatial_dims: int = 2) -> None:
        super().__init__()
        self.model = model
        self.head = ProjectionHead(feature_channels, embed_dim, hidden_dim, spatial_dims)
        self.feature_layer = feature_layer
        self.spatial_dims = spatial_dims
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
                             f"spatial_dims={self.spatial_dims})")
        return logits, self.head(f)


def _submodule(model: nn.Module, name: str, arg: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        names = [n for n, _ in model.named_children()]
        raise ValueError(f"feature_layer: expected the name of a submodule of {arg} "
                         f"(children: {names}), got {name!r}") from e
