"""The mechanism through training: how compact each class is, in the projection head's space and
in the feature space the head reads, measured every N steps of a run (``--mechanism-every N``).

The paper's claim (Fig. 1b, "more compact class clusters") is about the features; DACL acts
on the head's embeddings. A :class:`MechanismProbe` holds a fixed, class-balanced set of
validation pixels (the same in every run of a dataset and seed-independent: drawn with a
fixed seed from evenly spaced validation slices that hold foreground) and measures, for model
a, in both spaces:

* ``silhouette``: the cosine silhouette against the ground-truth classes (higher = classes
  more compact and separated; scikit-learn);
* ``davies_bouldin``: the Davies-Bouldin index of the L2-normalised vectors (lower = better);
* ``tail_density``: per class, the mean multi-scale kNN density (Eq. 3-5, ks 8/16/32, cosine,
  among the probe's pixels of the class) of its sparse tail, the 10 % of its pixels with the
  lowest density: the pixels DACL's anchors are chosen from. Higher = the tail is pulled in;
* ``l_cl``: the DACL loss (Eq. 10 with the run's temperature, mean reduction) on the probe's
  pixels, with a fresh loss of fixed seed and no memory bank, so that it changes only when
  the geometry does.

Nothing of the run changes: the networks are evaluated in ``eval()`` mode under ``no_grad``,
the heads with their running statistics, and the objective's losses, banks and random
streams are not touched.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from torch_dacl import SoftDensityContrastiveLoss
from torch_dacl.functional import knn_density, sample_pixels_per_class

TAIL = 0.10  # the sparse tail: the lowest 10 % of a class's densities
KS = (8, 16, 32)


class MechanismProbe:
    """A fixed set of probe pixels and the measurements on it.

    Args:
        images: ``(P, C_in, H, W)`` the probe slices (what the model is fed).
        labels: ``(P, H, W)`` their ground truth (int64).
        per_class: probe pixels per class (fewer where a class has fewer).
        num_classes: ``C``, background included.
        class_names: names for the per-class entries (default ``"0"``, ``"1"``, ...).
        seed: the pixel draw's seed (fixed: every run of a dataset gets the same probe).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, per_class: int = 256, num_classes: int = 4,
                 class_names: Optional[Sequence[str]] = None, seed: int = 0) -> None:
        self.images, self.labels = images, labels.long()
        self.num_classes = num_classes
        self.class_names = list(class_names or [str(c) for c in range(num_classes)])
        self.per_class, self.seed = per_class, seed

    def _pick(self, labels: torch.Tensor) -> torch.Tensor:
        """Flat indices of up to ``per_class`` pixels of each class of ``labels`` (fixed seed)."""
        index, valid = sample_pixels_per_class(labels, self.num_classes, self.per_class,
                                               generator=torch.Generator().manual_seed(self.seed))
        return index[valid]

    @torch.no_grad()
    def measure(self, wrapper, temperature: float = 0.4, device: Optional[torch.device] = None,
                batch: int = 8) -> Dict[str, Dict]:
        """``{"feature": {...}, "head": {...}, "pixels": n}`` for model a of ``wrapper`` (a
        :class:`torch_dacl.CoTrainingWrapper`)."""
        device = device or next(wrapper.parameters()).device
        was_training = wrapper.training
        wrapper.eval()
        store: Dict[str, torch.Tensor] = {}
        layer = wrapper.model_a.get_submodule(wrapper.feature_layer)
        handle = layer.register_forward_hook(
            lambda m, i, o: store.__setitem__("f", o[-1] if isinstance(o, (tuple, list)) else o))
        try:
            feats = []
            for start in range(0, len(self.images), batch):
                wrapper.model_a(self.images[start:start + batch].to(device))
                feats.append(store["f"].float().cpu())
        finally:
            handle.remove()
            getattr(wrapper, "_features", {}).clear()
            wrapper.train(was_training)
        f = torch.cat(feats)  # (P, F, h, w) at the feature layer's resolution
        lab = F.interpolate(self.labels.unsqueeze(1).float(), size=f.shape[2:], mode="nearest").squeeze(1).long()
        idx = self._pick(lab)
        y = lab.reshape(-1)[idx]
        x_feat = f.movedim(1, -1).reshape(-1, f.shape[1])[idx]
        head = wrapper.head_a
        head_was_training = head.training
        head.eval()
        try:
            x_head = head.embed_points(x_feat.to(next(head.parameters()).device,
                                                 next(head.parameters()).dtype)).float().cpu()
        finally:
            head.train(head_was_training)
        return {"pixels": int(len(y)), "feature": self.metrics(x_feat, y, temperature),
                "head": self.metrics(x_head, y, temperature)}

    def metrics(self, x: torch.Tensor, y: torch.Tensor, temperature: float) -> Dict:
        """The four measurements of one space (see the module docstring)."""
        from sklearn.metrics import davies_bouldin_score, silhouette_score

        unit = F.normalize(x.float(), dim=1)
        yn = y.numpy()
        present = np.unique(yn)
        out: Dict = {}
        if len(present) > 1:
            out["silhouette"] = float(silhouette_score(unit.numpy(), yn, metric="cosine"))
            out["davies_bouldin"] = float(davies_bouldin_score(unit.numpy(), yn))
        dens = knn_density(unit, y, KS)
        tails: Dict[str, float] = {}
        for c in present.tolist():  # a handful of classes
            d = dens[y == c]
            k = max(1, int(round(TAIL * d.numel())))
            tails[self.class_names[c]] = float(d.sort().values[:k].mean())
        out["tail_density"] = tails
        out["tail_density_mean"] = float(np.mean(list(tails.values())))
        loss = SoftDensityContrastiveLoss(self.num_classes, x.shape[1], temperature=temperature, use_bank=False,
                                          seed=0, max_samples_per_class=max(2, self.per_class), validate=False)
        loss.eval()
        out["l_cl"] = float(loss(x.float().t().reshape(1, x.shape[1], 1, -1), y.reshape(1, 1, -1)))
        return out


def probe_slices(volumes, size: int, num_slices: int, resize) -> tuple:
    """``(images (P, 1, size, size), labels (P, size, size))``: ``num_slices`` evenly spaced
    slices with foreground of ``volumes`` (an ``ACDCVolumes``-like sequence of ``{"image",
    "label"}`` volumes ``(Z, H, W)``), resized by ``resize(image, label, size)``."""
    cands: List[tuple] = []
    for i in range(len(volumes)):
        v = volumes[i]
        for z in range(v["image"].shape[0]):
            if (np.asarray(v["label"][z]) > 0).any():
                cands.append((v["image"][z], v["label"][z]))
    n = min(num_slices, len(cands))
    pick = [cands[int(round(j * (len(cands) - 1) / max(1, n - 1)))] for j in range(n)] if n else []
    xs, ys = zip(*(resize(img, lab, size) for img, lab in pick)) if pick else ((), ())
    return torch.stack([torch.as_tensor(x).reshape(1, size, size) for x in xs]).float(), \
        torch.stack([torch.as_tensor(y).reshape(size, size) for y in ys]).long()
