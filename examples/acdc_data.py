"""ACDC data for the example: the SSL4MIS h5 layout, augmentation, a two-stream sampler.

Layout expected under the ACDC folder (``<data-root>/ACDC``)::

    ACDC/
      train_slices.list   one training slice name a line, e.g. patient099_frame01_slice_15
      val.list            one volume name a line, e.g. patient028_frame01
      test.list           one volume name a line
      data/<name>.h5      keys 'image' (float32 in [0, 1]) and 'label' (uint8, 0..3);
                          2D (H, W) for training slices, 3D (slices, H, W) for volumes

Labeled subset: the first 68 (3 patients) or 136 (7 patients) lines of
``train_slices.list``, the rest is unlabeled (the SSL4MIS convention).

Randomness is a pure function of ``(seed, step)``: the sampler yields ``(index, aug_seed)``
pairs and the dataset derives its augmentation from ``aug_seed``. Data order and
augmentation are therefore identical for any number of loader workers and a resumed run
continues exactly where it stopped, without replaying the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

NUM_CLASSES = 4
CLASS_NAMES = ("RV", "Myo", "LV")  # classes 1..3
LABELED_SLICES = {3: 68, 7: 136}  # patients -> first N lines of train_slices.list

LAYOUT_HELP = (
    "expected the SSL4MIS ACDC layout: <data-root>/ACDC/{train_slices.list, val.list, test.list} "
    "and <data-root>/ACDC/data/<case>.h5 with datasets 'image' (float32) and 'label' (uint8 0..3), "
    "2D (H, W) for training slices and 3D (slices, H, W) for val/test volumes "
    "(get it with `python examples/get_data.py acdc`, or set --data-root or TORCH_DACL_DATA)"
)


class ACDCDataError(RuntimeError):
    """The ACDC data are missing or malformed; the message names the path and the layout."""


def resolve_data_root(arg: Optional[str] = None, download: bool = False) -> Path:
    """``--data-root``, else ``$TORCH_DACL_DATA``, else the cache of ``get_data.py``
    (``_data.resolve_data_root``; ``download=True`` fetches ACDC into the cache when none of
    them holds it); raises :class:`ACDCDataError` naming ``python examples/get_data.py acdc``
    otherwise.
    """
    import _data

    try:
        return _data.resolve_data_root(arg, "acdc", download=download)
    except _data.DataNotFoundError as e:
        raise ACDCDataError(str(e)) from None


def find_acdc_dir(data_root: Path) -> Path:
    """The ACDC folder: ``data_root/ACDC``, or ``data_root`` itself if it is one."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise ACDCDataError(f"data root {str(data_root)!r} does not exist or is not a directory; {LAYOUT_HELP}")
    for cand in (data_root / "ACDC", data_root):
        if (cand / "train_slices.list").is_file() or (cand / "data").is_dir():
            acdc = cand
            break
    else:
        raise ACDCDataError(f"no ACDC folder in data root {str(data_root)!r} "
                            f"(looked for {str(data_root / 'ACDC')!r}); {LAYOUT_HELP}")
    if not (acdc / "data").is_dir():
        raise ACDCDataError(f"missing folder {str(acdc / 'data')!r}; {LAYOUT_HELP}")
    return acdc


def read_list(acdc_dir: Path, name: str, check_files: bool = True) -> List[str]:
    """Case names of ``<acdc_dir>/<name>`` (e.g. ``"test.list"``); checks each h5 exists."""
    path = Path(acdc_dir) / name
    if not path.is_file():
        raise ACDCDataError(f"missing list file {str(path)!r}; {LAYOUT_HELP}")
    cases = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not cases:
        raise ACDCDataError(f"list file {str(path)!r} is empty; {LAYOUT_HELP}")
    if check_files:
        missing = [c for c in cases if not (Path(acdc_dir) / "data" / f"{c}.h5").is_file()]
        if missing:
            raise ACDCDataError(
                f"{len(missing)} case(s) named in {str(path)!r} have no h5 file, first: "
                f"{str(Path(acdc_dir) / 'data' / (missing[0] + '.h5'))!r}; {LAYOUT_HELP}")
    return cases


def read_case(path: Path, ndim: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(image float32, label int64)`` of one h5 file, with a clear error if unreadable."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise ACDCDataError(f"missing h5 file {str(path)!r}; {LAYOUT_HELP}")
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f or "label" not in f:
                raise ACDCDataError(f"h5 file {str(path)!r} lacks the dataset(s) "
                                    f"{[k for k in ('image', 'label') if k not in f]} (has {list(f.keys())}); "
                                    f"{LAYOUT_HELP}")
            image = np.asarray(f["image"][()], dtype=np.float32)
            label = np.asarray(f["label"][()]).astype(np.int64)
    except ACDCDataError:
        raise
    except Exception as e:  # h5py raises OSError for corrupt files, others for bad datasets
        raise ACDCDataError(f"cannot read h5 file {str(path)!r} ({type(e).__name__}: {e}); {LAYOUT_HELP}") from e
    if image.ndim != ndim or image.shape != label.shape:
        kind = "a 2D training slice" if ndim == 2 else "a 3D volume (slices, H, W)"
        raise ACDCDataError(f"h5 file {str(path)!r}: expected {kind} with image.shape == label.shape, got "
                            f"image {image.shape} and label {label.shape}; {LAYOUT_HELP}")
    if label.size and (label.min() < 0 or label.max() >= NUM_CLASSES):
        raise ACDCDataError(f"h5 file {str(path)!r}: labels must lie in 0..{NUM_CLASSES - 1}, "
                            f"got {label.min()}..{label.max()}; {LAYOUT_HELP}")
    return image, label


def resize_image(image: np.ndarray, label: Optional[np.ndarray], size: int
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Resize a 2D slice, ``image (H, W)`` or ``(C, H, W)``, to ``(C, size, size)`` (bilinear; C = 1 for
    ``(H, W)``) and ``label (H, W)`` to ``(size, size)`` (nearest)."""
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    img = F.interpolate(img[None] if img.dim() == 3 else img[None, None], size=(size, size), mode="bilinear",
                        align_corners=False)[0]
    lab = None
    if label is not None:
        lab = torch.from_numpy(np.ascontiguousarray(label))[None, None].float()
        lab = F.interpolate(lab, size=(size, size), mode="nearest")[0, 0].long()
    return img, lab


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """SSL4MIS ``RandomGenerator`` on ``image (H, W)`` or ``(C, H, W)`` and ``label (H, W)``: with
    p=0.5 a random rot90 + flip, else (p=0.5) a random rotation in [-20, 20] degrees (image
    linear, label nearest, zero padding)."""
    axes = (image.ndim - 2, image.ndim - 1)  # the image's two spatial axes
    if rng.random() > 0.5:
        k = int(rng.integers(0, 4))
        axis = int(rng.integers(0, 2))
        image = np.flip(np.rot90(image, k, axes=axes), axis=axes[axis])
        label = np.flip(np.rot90(label, k), axis=axis)
    elif rng.random() > 0.5:
        from scipy import ndimage

        angle = float(rng.uniform(-20, 20))
        image = ndimage.rotate(image, angle, axes=axes[::-1], order=1, reshape=False)
        label = ndimage.rotate(label, angle, order=0, reshape=False)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


class ACDCSlices(Dataset):
    """Training slices named by ``train_slices.list``; items are ``(index, aug_seed)`` pairs.

    Returns a dict ``image (1, S, S)`` float32, ``label (S, S)`` int64, ``index``.
    ``aug_seed=None`` (or an int index) gives the un-augmented slice.

    Args:
        acdc_dir: the ACDC folder.
        size: output side ``S``.
        augment: apply :func:`augment`.
        cache: keep decoded slices in memory (per process).
        cases: slice names (default: all of ``train_slices.list``).
        crop: train on ``crop x crop`` windows of the resized slice (a random window per
            augmented item, the central one otherwise); None keeps the whole slice. Inference
            always sees the whole ``size x size`` slice, so a crop keeps the resolution of
            ``size`` at a fraction of the cost per step.
    """

    def __init__(self, acdc_dir: Path, size: int, augment: bool = True, cache: bool = True,
                 cases: Optional[Sequence[str]] = None, crop: Optional[int] = None) -> None:
        self.acdc_dir = Path(acdc_dir)
        self.cases = list(cases) if cases is not None else read_list(self.acdc_dir, "train_slices.list")
        self.size = int(size)
        self.augment = augment
        self.crop = int(crop) if crop and crop < self.size else None
        self.cache = cache
        self._cache: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        if index in self._cache:
            return self._cache[index]
        item = read_case(self.acdc_dir / "data" / f"{self.cases[index]}.h5", ndim=2)
        if self.cache:
            self._cache[index] = item
        return item

    def __getitem__(self, item) -> Dict[str, torch.Tensor]:
        index, aug_seed = item if isinstance(item, tuple) else (item, None)
        image, label = self.load(int(index))
        if self.augment and aug_seed is not None:
            image, label = augment(image, label, np.random.default_rng(int(aug_seed)))
        img, lab = resize_image(image, label, self.size)
        if self.crop:
            c, free = self.crop, self.size - self.crop
            if self.augment and aug_seed is not None:
                oy, ox = (int(v) for v in np.random.default_rng([int(aug_seed), 1]).integers(0, free + 1, size=2))
            else:
                oy = ox = free // 2
            img, lab = img[:, oy:oy + c, ox:ox + c].contiguous(), lab[oy:oy + c, ox:ox + c].contiguous()
        return {"image": img, "label": lab, "index": torch.tensor(int(index))}


class ACDCVolumes(Dataset):
    """Validation / test volumes (``val.list`` / ``test.list``), un-resized.

    Returns a dict ``name``, ``image (Z, H, W)`` float32 numpy, ``label (Z, H, W)`` int64.
    """

    def __init__(self, acdc_dir: Path, split: str = "test", limit: Optional[int] = None) -> None:
        if split not in ("val", "test"):
            raise ValueError(f"split: expected 'val' or 'test', got {split!r}")
        self.acdc_dir = Path(acdc_dir)
        cases = read_list(self.acdc_dir, f"{split}.list")
        self.cases = cases if limit is None else evenly_spaced(cases, limit)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        name = self.cases[index]
        image, label = read_case(self.acdc_dir / "data" / f"{name}.h5", ndim=3)
        return {"name": name, "image": image, "label": label}


def evenly_spaced(items: Sequence, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when ``n >= len(items)``)."""
    if n >= len(items):
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


class TwoStreamBatchSampler(Sampler):
    """Batches of ``primary_bs`` labeled then ``secondary_bs`` unlabeled indices.

    Each stream walks through its own sequence of seeded permutations (one per pass), so
    batch ``t`` is a pure function of ``(seed, t)``: ``start_step`` resumes exactly.
    Every element is an ``(index, aug_seed)`` pair for :class:`ACDCSlices`.
    ``secondary_bs = 0`` gives labeled-only batches (the supervised baseline).

    Distributed (``world_size > 1``): ``primary_bs`` and ``secondary_bs`` are the *global*
    batch sizes; rank ``r`` gets the ``r``-th contiguous block of each stream's part of
    the batch (``primary_bs // world_size`` labeled, then ``secondary_bs // world_size``
    unlabeled items), like ``DistributedSampler`` does with one stream. The union over the
    ranks is the single-process batch, augmentation seeds included (each position in a
    stream has its own seed, so the ranks augment differently).
    """

    def __init__(self, primary: Sequence[int], secondary: Sequence[int], primary_bs: int, secondary_bs: int,
                 num_steps: int, seed: int = 0, start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if primary_bs < 1 or len(primary) == 0:
            raise ValueError("TwoStreamBatchSampler: the labeled stream needs indices and a batch size >= 1")
        if secondary_bs > 0 and len(secondary) == 0:
            raise ValueError("TwoStreamBatchSampler: no unlabeled indices for an unlabeled batch size > 0")
        if primary_bs % world_size or secondary_bs % world_size or not 0 <= rank < world_size:
            raise ValueError(f"TwoStreamBatchSampler: the batch sizes ({primary_bs}, {secondary_bs}) must be "
                             f"multiples of world_size = {world_size} (rank {rank})")
        self.streams = [(np.asarray(primary), primary_bs, 0), (np.asarray(secondary), secondary_bs, 1)]
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_steps = int(num_steps)
        self.seed = int(seed)
        self.start_step = int(start_step)
        self._perm_cache: Dict[Tuple[int, int], np.ndarray] = {}

    def _perm(self, stream: int, epoch: int, n: int) -> np.ndarray:
        key = (stream, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 8:
                self._perm_cache.clear()
            self._perm_cache[key] = np.random.default_rng([self.seed, stream, epoch]).permutation(n)
        return self._perm_cache[key]

    def batch(self, step: int) -> List[Tuple[int, int]]:
        out = []
        for ids, bs, sid in self.streams:
            n = len(ids)
            per = bs // self.world_size  # this rank's block of the stream's global batch
            for j in range(self.rank * per, (self.rank + 1) * per):
                pos = step * bs + j
                idx = int(ids[self._perm(sid, pos // n, n)[pos % n]])
                aug_seed = int(np.random.default_rng([self.seed, 7919, sid, pos]).integers(2**31))
                out.append((idx, aug_seed))
        return out

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for step in range(self.start_step, self.num_steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.num_steps - self.start_step)
