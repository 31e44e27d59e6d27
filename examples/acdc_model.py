"""Model construction for the ACDC example: two smp U-Nets in a :class:`CoTrainingWrapper`."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from torch_dacl import CoTrainingWrapper


def build_unet(encoder: str, decoder_channels: Sequence[int], num_classes: int = 4, in_channels: int = 1) -> nn.Module:
    """An smp U-Net with random weights (``encoder_weights=None``: nothing is downloaded).

    ``encoder_depth`` follows ``len(decoder_channels)``; the decoder output (the feature map
    the projection head reads) has ``decoder_channels[-1]`` channels at input resolution.
    ``encoder="basicunet"`` builds MONAI's plain ``BasicUNet`` instead (two 3x3 conv + BN +
    LeakyReLU per level, widths 16-32-64-128-256 as SSL4MIS's 2D U-Net, and
    ``decoder_channels[-1]`` channels at the last up-sampling level, which the head reads).
    """
    if encoder == "basicunet":
        from monai.networks.nets import BasicUNet

        return BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
                         features=(16, 32, 64, 128, 256, int(decoder_channels[-1])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # smp/timm deprecation chatter
        import segmentation_models_pytorch as smp

        return smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=num_classes,
                        encoder_depth=len(decoder_channels), decoder_channels=tuple(decoder_channels))


def build_wrapper(cfg: dict) -> CoTrainingWrapper:
    """The co-training pair of a run configuration (keys ``encoder``, ``decoder_channels``,
    ``embed_dim``, ``seed``; ``num_classes`` / ``in_channels`` for an nnU-Net dataset, default
    ACDC's 4 / 1); the two nets get different initialisations (CPS needs that)."""
    torch.manual_seed(int(cfg.get("seed", 0)))
    dec = list(cfg["decoder_channels"])
    k, c = int(cfg.get("num_classes") or 4), int(cfg.get("in_channels") or 1)
    a = build_unet(cfg["encoder"], dec, k, c)
    b = build_unet(cfg["encoder"], dec, k, c)
    layer, channels = feature_layer(cfg, a, c)
    return CoTrainingWrapper(a, b, feature_layer=layer, feature_channels=channels, embed_dim=int(cfg["embed_dim"]),
                             sparse_heads=not cfg.get("dense_heads", False), point_norm=cfg.get("point_norm", "sample"))


def feature_layer(cfg: dict, model: nn.Module, in_channels: int = 1) -> tuple:
    """``(name, channels)`` of the decoder stage the heads read: ``feature_stage`` 1 (default) is
    the last one, at full resolution (``upcat_1`` of MONAI's U-Net, smp's whole ``decoder``),
    2 the one before it (half resolution), and so on; the channels are read off the model
    (:func:`torch_dacl.feature_layers` on a small input)."""
    from torch_dacl import feature_layers

    stage = int(cfg.get("feature_stage") or 1)
    if cfg["encoder"] == "basicunet":
        name = f"upcat_{stage}"
    else:
        n = len(cfg["decoder_channels"])
        name = "decoder" if stage == 1 else f"decoder.blocks.{n - stage}"
    found = {ly.name: ly for ly in feature_layers(model, torch.zeros(1, in_channels, 64, 64))}
    if name not in found:
        raise ValueError(f"feature_stage: no decoder stage {stage} ({name!r}) in this network; its layers: "
                         f"{[n_ for n_ in found if n_.startswith(('upcat', 'decoder'))]}")
    return name, found[name].channels


@torch.no_grad()
def predict_logits(wrapper: CoTrainingWrapper, x: torch.Tensor, which: str = "a") -> torch.Tensor:
    """Logits of model ``a``, ``b``, or the mean of both softmaxes (``"ensemble"``, returned as
    log-probabilities) for ``x (N, 1, H, W)``."""
    if which not in ("a", "b", "ensemble"):
        raise ValueError(f"which: expected 'a', 'b' or 'ensemble', got {which!r}")
    if which == "ensemble":
        probs = (wrapper.model_a(x).float().softmax(1) + wrapper.model_b(x).float().softmax(1)) / 2
        out = probs.clamp_min(1e-8).log()
    else:
        out = getattr(wrapper, f"model_{which}")(x)
    # calling a sub-model directly fires the wrapper's feature hook; drop what it stored
    getattr(wrapper, "_features", {}).clear()
    return out.float()
