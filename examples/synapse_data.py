"""Volume readers, preprocessing, patch sampling and sliding-window inference for the 3D
(Synapse-protocol) example of torch-dacl.

Three on-disk layouts (the ``--dataset`` choices of ``synapse_cps_dacl.py``) are read into one
in-memory form, a :class:`Volume` with ``(Z, Y, X)`` arrays (slices first, as the network sees
them) and a float32 image in ``[0, 1]``: the raw BTCV / Synapse layout with DHC's preprocessing
(:func:`read_btcv_case`), DHC's preprocessed ``npy`` files (:func:`read_dhc_npy_case`) and a
folder of ``image_<id>.nii.gz`` / ``label_<id>.nii.gz`` such as CHAOS-T2
(:func:`read_generic_case`, percentile normalisation for MR). Any other dataset (and these
three, converted by ``convert_to_nnunet.py``) is read in nnU-Net's raw format by
``nnunet_data``, which builds the same :class:`Volume` objects.

Nothing here depends on torch_dacl: the library is used by ``synapse_cps_dacl.py``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
CHAOS_CLASSES = ("background", "liver", "right_kidney", "left_kidney", "spleen")


@dataclass
class Volume:
    """One case in memory: ``image`` float32 ``(Z, Y, X)`` (in ``[0, 1]`` from the readers here,
    normalised per channel by ``nnunet_data``) or ``(C, Z, Y, X)`` with several input channels;
    ``label`` uint8 ``(Z, Y, X)`` (0 = background) or None (unlabeled); ``spacing`` ``(z, y, x)``
    in mm of the arrays as stored (after any resize), None when unknown (DHC's npy files)."""

    case_id: str  # the id of the split files
    image: np.ndarray
    label: Optional[np.ndarray]
    spacing: Optional[Tuple[float, float, float]] = None


# ----------------------------------------------------------------------------- basic ops
def load_nifti_zyx(path: os.PathLike) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    """Read a NIfTI file; return the array transposed to ``(Z, Y, X)`` and its spacing ``(z, y, x)``.

    nibabel returns arrays in ``(X, Y, Z)`` index order; SimpleITK (used by DHC) returns
    ``(Z, Y, X)``. We transpose so both agree.
    """
    import nibabel as nib

    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj)
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {arr.shape}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return np.ascontiguousarray(arr.transpose(2, 1, 0)), (zooms[2], zooms[1], zooms[0])


def clip_normalize_ct(image: np.ndarray, lo: float = -75.0, hi: float = 275.0) -> np.ndarray:
    """DHC's CT normalisation: clip HU to ``[lo, hi]`` then min-max to ``[0, 1]`` (float32)."""
    x = np.clip(image.astype(np.float32), lo, hi)
    mn, mx = float(x.min()), float(x.max())
    return ((x - mn) / max(mx - mn, 1e-8)).astype(np.float32)


def percentile_normalize(image: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """MR normalisation: clip to the ``lower`` / ``upper`` percentiles, then min-max to ``[0, 1]``."""
    x = image.astype(np.float32)
    lo, hi = np.percentile(x, [lower, upper])
    x = np.clip(x, lo, hi)
    return ((x - lo) / max(float(hi - lo), 1e-8)).astype(np.float32)


def resize_volume(image: np.ndarray, label: Optional[np.ndarray], shape: Sequence[int]
                  ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Resize ``(Z, Y, X)`` arrays to ``shape``: trilinear image (``(Z, Y, X)`` or ``(C, Z, Y, X)``),
    nearest label (as DHC)."""
    shape = tuple(int(s) for s in shape)
    if tuple(image.shape[-3:]) == shape:
        return image.astype(np.float32), label
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    img = F.interpolate(t[None] if t.dim() == 4 else t[None, None], size=shape, mode="trilinear",
                        align_corners=False)[0].numpy()
    img = img if image.ndim == 4 else img[0]
    lab = None
    if label is not None:
        tl = torch.from_numpy(np.ascontiguousarray(label).astype(np.float32))[None, None]
        lab = F.interpolate(tl, size=shape, mode="nearest")[0, 0].numpy().astype(np.uint8)
    return img, lab


def zoom_volume(image: np.ndarray, label: Optional[np.ndarray], zoom: Sequence[float]
                ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Resize by per-axis factors ``zoom (z, y, x)`` (to the nearest whole shape)."""
    return resize_volume(image, label, [max(1, int(round(s * f))) for s, f in zip(image.shape, zoom)])


def _scaled_spacing(spacing, old_shape, new_shape):
    return tuple(float(s) * o / n for s, o, n in zip(spacing, old_shape, new_shape))


# ----------------------------------------------------------------------------- BTCV raw layout
def list_btcv_cases(root: os.PathLike) -> List[str]:
    """Ids ``XXXX`` of ``root/img/imgXXXX.nii.gz`` (sorted)."""
    return sorted(p.name[3:-len(".nii.gz")] for p in (Path(root) / "img").glob("img*.nii.gz"))


def read_btcv_case(root: os.PathLike, case_id: str, resize_shape: Optional[Sequence[int]] = (80, 160, 160),
                   hu_range: Tuple[float, float] = (-75.0, 275.0)) -> Volume:
    """Read one BTCV case with the DHC preprocessing.

    Args:
        root: the folder holding ``img/`` and ``label/`` (``RawData/Training``).
        case_id: e.g. ``"0001"`` for ``img0001.nii.gz``.
        resize_shape: ``(Z, Y, X)`` of the whole resized volume (DHC: patch + patch // 4);
            None keeps the native grid.
        hu_range: the HU window (DHC: -75..275).
    """
    image, spacing = load_nifti_zyx(Path(root) / "img" / f"img{case_id}.nii.gz")
    lp = Path(root) / "label" / f"label{case_id}.nii.gz"
    label = load_nifti_zyx(lp)[0].astype(np.uint8) if lp.exists() else None
    if label is not None and label.shape != image.shape:
        raise ValueError(f"case {case_id}: label shape {label.shape} != image shape {image.shape}")
    native = image.shape
    image = clip_normalize_ct(image, *hu_range)
    if resize_shape is not None:
        image, label = resize_volume(image, label, resize_shape)
    return Volume(case_id, image, label, _scaled_spacing(spacing, native, image.shape))


# ----------------------------------------------------------------------------- DHC npy layout
def list_dhc_npy_cases(root: os.PathLike) -> List[str]:
    return sorted(p.name[:-len("_image.npy")] for p in (Path(root) / "npy").glob("*_image.npy"))


def read_dhc_split(root: os.PathLike, name: str) -> List[str]:
    """Ids of ``root/splits/<name>.txt`` (DHC: train, eval, test, labeled_10p, ...)."""
    with open(Path(root) / "splits" / f"{name}.txt") as f:
        return sorted(line.strip() for line in f if line.strip())


def read_dhc_npy_case(root: os.PathLike, case_id: str, hu_range: Optional[Tuple[float, float]] = (-75.0, 275.0),
                      zoom: Optional[Sequence[float]] = None) -> Volume:
    """Read ``root/npy/<id>_image.npy`` / ``_label.npy`` (DHC's preprocessed Synapse, ``(Z, Y, X)``).

    DHC stores raw HU (resized); its loader clips to ``hu_range`` and min-maxes at load
    time, which we do here (pass ``hu_range=None`` for files already in ``[0, 1]``).
    ``zoom`` optionally shrinks the volume further (CPU presets).
    """
    root = Path(root)
    image = np.load(root / "npy" / f"{case_id}_image.npy")
    lp = root / "npy" / f"{case_id}_label.npy"
    label = np.load(lp).astype(np.uint8) if lp.exists() else None
    if image.ndim != 3:
        raise ValueError(f"case {case_id}: expected a (Z, Y, X) array, got shape {image.shape}")
    image = clip_normalize_ct(image, *hu_range) if hu_range is not None else image.astype(np.float32)
    if zoom is not None:
        image, label = zoom_volume(image, label, zoom)
    return Volume(case_id, image, label)


# ----------------------------------------------------------------------------- generic NIfTI folder
def list_generic_cases(root: os.PathLike, image_prefix: str = "image_", suffix: str = ".nii.gz") -> List[str]:
    ids = [p.name[len(image_prefix):-len(suffix)] for p in Path(root).glob(f"{image_prefix}*{suffix}")]
    return sorted(ids, key=lambda s: (len(s), s))


def read_generic_case(root: os.PathLike, case_id: str, image_pattern: str = "image_{id}.nii.gz",
                      label_pattern: str = "label_{id}.nii.gz", normalization: str = "percentile",
                      zoom: Optional[Sequence[float]] = None) -> Volume:
    """Read one case of a folder of ``image_<id>.nii.gz`` / ``label_<id>.nii.gz`` (CHAOS-T2).

    Args:
        normalization: ``"percentile"`` (MR, default), ``"ct"`` (HU clip -75..275 + min-max)
            or ``"minmax"``.
        zoom: per-axis factors ``(z, y, x)``, e.g. ``(1, 0.5, 0.5)`` to halve the in-plane size.
    """
    root = Path(root)
    image, spacing = load_nifti_zyx(root / image_pattern.format(id=case_id))
    lp = root / label_pattern.format(id=case_id)
    label = None
    if lp.exists():
        label = np.rint(load_nifti_zyx(lp)[0]).astype(np.uint8)
        if label.shape != image.shape:
            raise ValueError(f"case {case_id}: label shape {label.shape} != image shape {image.shape}")
    norms = {"percentile": percentile_normalize, "ct": clip_normalize_ct,
             "minmax": lambda x: percentile_normalize(x, 0.0, 100.0)}
    if normalization not in norms:
        raise ValueError(f"normalization: expected 'percentile', 'ct' or 'minmax', got {normalization!r}")
    native, image = image.shape, norms[normalization](image)
    if zoom is not None:
        image, label = zoom_volume(image, label, zoom)
    return Volume(case_id, image, label, _scaled_spacing(spacing, native, image.shape))


# ----------------------------------------------------------------------------- splits
def load_split(name: str, labeled: int) -> Dict[str, List[str]]:
    """A committed split (``examples/splits/<name>.json``) as lists ``labeled``,
    ``unlabeled``, ``val``, ``test`` and the class names."""
    with open(SPLITS_DIR / f"{name}.json") as f:
        s = json.load(f)
    key = f"labeled_{labeled}"
    if key not in s:
        raise ValueError(f"split {name}: no {key!r}; available: {[k for k in s if k.startswith('labeled_')]}")
    lab = list(s[key])
    return {"labeled": lab, "unlabeled": [i for i in s["train"] if i not in lab], "val": list(s["val"]),
            "test": list(s["test"]), "classes": list(s["classes"])}


# ----------------------------------------------------------------------------- patch sampling
class PatchSampler:
    """Random ``(Z, Y, X)`` patches from in-memory volumes, nnU-Net style.

    Images are ``(Z, Y, X)`` or ``(C, Z, Y, X)`` (several input channels; every volume of a
    sampler has the same number). Volumes smaller than the patch are zero-padded (labels
    padded with 0). With probability ``foreground_prob`` (nnU-Net: 1/3) a labeled patch is centred on a random
    foreground voxel of a random present class; otherwise the corner is uniform.
    Augmentation (training only): random flips along ``flip_axes`` (by default Z and Y only:
    an X (left-right) flip would swap the meaning of the left/right kidney labels), a random
    intensity scale/shift and Gaussian noise.

    The sampler owns a ``numpy.random.Generator``; its state is saved with
    :meth:`state_dict` so a resumed run draws the same patches.
    """

    def __init__(self, volumes: Sequence[Volume], patch_size: Sequence[int], foreground_prob: float = 1 / 3,
                 flip_axes: Sequence[int] = (0, 1), augment: bool = True, seed: int = 0) -> None:
        if not volumes:
            raise ValueError("PatchSampler: no volumes")
        self.volumes = list(volumes)
        self.patch = tuple(int(p) for p in patch_size)
        self.foreground_prob = foreground_prob
        self.flip_axes = tuple(flip_axes)
        self.augment = augment
        self.rng = np.random.default_rng(seed)
        self._fg: List[Dict[int, np.ndarray]] = []  # foreground coordinates per volume and class, for oversampling
        for v in self.volumes:
            classes = [c for c in np.unique(v.label) if c != 0] if v.label is not None else []
            coords = {int(c): np.argwhere(v.label == c) for c in classes}
            # a subsample of a large class is enough to pick centres from
            self._fg.append({c: x[np.random.default_rng(0).choice(len(x), 5000, replace=False)] if len(x) > 5000 else x
                             for c, x in coords.items()})

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]

    def _crop(self, arr: np.ndarray, start: Sequence[int], fill=0) -> np.ndarray:
        """Crop the last three axes (leading channel axes are kept)."""
        out = np.full(arr.shape[:-3] + self.patch, fill, dtype=arr.dtype)
        src, dst = [Ellipsis], [Ellipsis]
        for s, p, n in zip(start, self.patch, arr.shape[-3:]):
            a, b = max(s, 0), min(s + p, n)
            src.append(slice(a, b))
            dst.append(slice(a - s, b - s))
        out[tuple(dst)] = arr[tuple(src)]
        return out

    def sample_one(self) -> Tuple[np.ndarray, np.ndarray]:
        i = int(self.rng.integers(len(self.volumes)))
        v = self.volumes[i]
        shape = v.image.shape[-3:]
        fg = self._fg[i]
        if fg and self.rng.random() < self.foreground_prob:
            c = list(fg)[int(self.rng.integers(len(fg)))]
            centre = fg[c][int(self.rng.integers(len(fg[c])))]
            start = [int(ct) - p // 2 for ct, p in zip(centre, self.patch)]
            # keep the patch inside the volume where it fits
            start = [min(max(s, 0), max(n - p, 0)) if n >= p else -((p - n) // 2)
                     for s, p, n in zip(start, self.patch, shape)]
        else:
            start = [int(self.rng.integers(0, n - p + 1)) if n >= p else -int(self.rng.integers(0, p - n + 1))
                     for p, n in zip(self.patch, shape)]
        img = self._crop(v.image, start)
        lab = self._crop(v.label, start) if v.label is not None else np.zeros(self.patch, np.uint8)
        if self.augment:
            for ax in self.flip_axes:
                if self.rng.random() < 0.5:
                    img, lab = np.flip(img, ax - 3), np.flip(lab, ax - 3)
            if self.rng.random() < 0.5:
                img = img * self.rng.uniform(0.9, 1.1) + self.rng.uniform(-0.1, 0.1)
            if self.rng.random() < 0.2:
                img = img + self.rng.normal(0.0, 0.03, size=img.shape)
        return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(lab, dtype=np.int64)

    def sample(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, *patch)`` float32 images (C = 1 for ``(Z, Y, X)`` volumes) and ``(B, *patch)`` int64 labels."""
        images, labels = zip(*(self.sample_one() for _ in range(batch_size)))
        x = torch.from_numpy(np.stack(images))
        return (x[:, None] if x.dim() == 4 else x), torch.from_numpy(np.stack(labels))


# ----------------------------------------------------------------------------- sliding window
def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8,
                            dtype=torch.float32, device=None) -> torch.Tensor:
    """nnU-Net's Gaussian patch weighting: a Gaussian centred on the patch with
    ``sigma = sigma_scale * patch_size`` per axis, scaled to a maximum of 1, with no zero
    (zeros replaced by the smallest positive value) so every voxel gets some weight."""
    g = torch.ones((), dtype=torch.float64)
    for p in patch_size:  # the outer product of one Gaussian per axis
        r = torch.arange(p, dtype=torch.float64)
        g = g[..., None] * torch.exp(-0.5 * ((r - (p - 1) / 2.0) / max(p * sigma_scale, 1e-6)) ** 2)
    g = g / g.max()
    return torch.where(g > 0, g, g[g > 0].min()).to(dtype=dtype, device=device)


def _starts(n: int, p: int, step: float) -> List[int]:
    if n <= p:
        return [0]
    k = int(math.ceil((n - p) / (p * step))) + 1
    return [int(round(i * (n - p) / (k - 1))) for i in range(k)]


@torch.no_grad()
def sliding_window_inference(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                             patch_size: Sequence[int], num_classes: int, overlap: float = 0.5,
                             gaussian: bool = True, sigma_scale: float = 1.0 / 8, batch_size: int = 1
                             ) -> torch.Tensor:
    """Class probabilities of a whole volume from patch predictions, nnU-Net style.

    Tiles start on a regular grid with step ``(1 - overlap) * patch`` (the last tile flush
    with the border), each tile's softmax is weighted by the Gaussian importance map
    (uniform with ``gaussian=False``) and the weighted sum is divided by the summed
    weights. Volumes smaller than the patch are zero-padded and cropped back.

    Args:
        predict: maps ``(B, C_in, *patch)`` to logits ``(B, C, *patch)``.
        image: ``(Z, Y, X)`` (one channel), ``(C_in, Z, Y, X)`` or ``(1, C_in, Z, Y, X)``.

    Returns:
        ``(C, Z, Y, X)`` float32 probabilities (they sum to 1 over C).
    """
    if image.dim() == 5:
        if image.shape[0] != 1:
            raise ValueError(f"image: expected one volume, got shape {tuple(image.shape)}")
        image = image[0]
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4:
        raise ValueError(f"image: expected (Z, Y, X) or (C, Z, Y, X), got shape {tuple(image.shape)}")
    patch, shape = tuple(int(p) for p in patch_size), tuple(image.shape[1:])
    pad = [max(p - n, 0) for p, n in zip(patch, shape)]
    before = [q // 2 for q in pad]
    image = F.pad(image, [x for q, b in zip(pad[::-1], before[::-1]) for x in (b, q - b)])  # F.pad: last axis first
    full, dev = tuple(image.shape[1:]), image.device
    w = gaussian_importance_map(patch, sigma_scale, device=dev) if gaussian else torch.ones(patch, device=dev)
    acc = torch.zeros((num_classes,) + full, dtype=torch.float32, device=dev)
    norm = torch.zeros(full, dtype=torch.float32, device=dev)
    corners = list(itertools.product(*(_starts(n, p, 1.0 - overlap) for n, p in zip(full, patch))))
    for i in range(0, len(corners), batch_size):
        tiles = [tuple(slice(c, c + p) for c, p in zip(corner, patch)) for corner in corners[i:i + batch_size]]
        probs = torch.softmax(predict(torch.stack([image[(slice(None), *t)] for t in tiles])).float(), dim=1)
        if probs.shape[1] != num_classes:
            raise ValueError(f"predict: expected {num_classes} channels, got shape {tuple(probs.shape)}")
        for t, p in zip(tiles, probs):
            acc[(slice(None), *t)] += p * w
            norm[t] += w
    return (acc / norm)[(slice(None), *(slice(b, b + n) for b, n in zip(before, shape)))]


# ----------------------------------------------------------------------------- nnU-Net-like planning
def poolings(size: Sequence[int], spacing: Sequence[float], min_size: int = 4, max_stages: int = 99
             ) -> List[List[int]]:
    """Per-stage strides by nnU-Net's rule (any number of axes), the first stage all 1: at each
    further stage an axis is downsampled by 2 when its current spacing is at most twice the
    smallest current spacing and its feature map stays >= ``min_size``; until no axis can be
    pooled or there are ``max_stages`` stages."""
    sp, sz = [float(s) for s in spacing], [int(s) for s in size]
    strides = [[1] * len(sz)]
    while len(strides) < max_stages:
        m = min(sp)
        st = [2 if (sp[a] <= 2 * m and sz[a] // 2 >= min_size) else 1 for a in range(len(sz))]
        if 2 not in st:
            break
        strides.append(st)
        sz = [n // t for n, t in zip(sz, st)]
        sp = [v * t for v, t in zip(sp, st)]
    return strides


def plan_unet(patch_size: Sequence[int], spacing: Optional[Sequence[float]], n_stages: int,
              min_size: int = 4) -> Tuple[List[List[int]], List[List[int]]]:
    """Per-stage strides (:func:`poolings`, stride 1 for the stages beyond) and kernel sizes in
    the spirit of nnU-Net's planner: a 3x3x3 kernel becomes 1 along an axis whose spacing is
    more than twice the smallest at that stage (anisotropic MR such as CHAOS-T2: 7.7 mm slices
    vs 1.25 mm pixels).

    Returns:
        ``(strides, kernel_sizes)``, one ``[z, y, x]`` list per stage.
    """
    sp = [1.0, 1.0, 1.0] if spacing is None else [float(s) for s in spacing]
    strides = poolings(patch_size, sp, min_size, n_stages)
    strides += [[1, 1, 1] for _ in range(n_stages - len(strides))]
    kernels = []
    for st in strides:
        sp = [v * t for v, t in zip(sp, st)]
        kernels.append([1 if v > 2 * min(sp) else 3 for v in sp])
    return strides, kernels
