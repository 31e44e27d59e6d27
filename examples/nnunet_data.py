"""Your own dataset, in nnU-Net's raw format, for both examples of torch-dacl.

A dataset folder looks like this (nnU-Net v2's raw format; the MSD / MONAI Decathlon
datasets are the same idea)::

    MyDataset/
      dataset.json         {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "heart": 1},
                            "numTraining": 20, "file_ending": ".nii.gz"}
      imagesTr/            CASE_0000.nii.gz (channel 0), CASE_0001.nii.gz (channel 1), ...
      labelsTr/            CASE.nii.gz (integer labels, the values listed in dataset.json)
      imagesTs/            optional, not used for training or scoring (no labels)

* ``channel_names`` gives the input channels (one file per channel, suffix ``_XXXX`` with
  four digits) and chooses each channel's intensity normalisation (below).
* ``labels`` maps class names to the consecutive integers ``0..K-1`` (0 = background);
  the number of classes ``K`` and the class names of every metric, loss and picture come
  from it. Region-based labels (lists of values) are not supported.
* ``file_ending``: ``.nii.gz`` / ``.nii`` (nibabel), ``.nrrd`` / ``.mha`` (SimpleITK, if
  installed), ``.png`` / ``.bmp`` / ``.tif`` (Pillow, 2D grayscale only).
* 2D datasets: PNG/TIFF/BMP files, or NIfTI files with a singleton third axis
  (``(X, Y, 1)``). Only the 2D example (``acdc_cps_dacl.py``) trains on them; it also
  trains on 3D volumes cut into slices along ``--slice-axis``.

Arrays are handled in ``(Z, Y, X)`` order (nibabel's ``(i, j, k)`` transposed, as
``synapse_data`` does), images as ``(C, Z, Y, X)``; 2D images are ``(C, 1, Y, X)`` with
spacing 999 along the dummy axis (nnU-Net's convention).

Validation (:func:`check_dataset`, run before training) fails with a
:class:`NnUNetDataError` that names the file and what was expected: a missing
``dataset.json``; a file name that is not ``CASE_XXXX<file_ending>``; a channel file
missing or not listed in ``channel_names``; an image without its label (or a label without
its image); image / label / channel shapes (or spacings) that differ; a label value not
listed in ``labels``.

Splits (:func:`resolve_split`): a split JSON file has the lists ``train``, ``val`` and
``test`` (case identifiers) and optionally ``labeled`` (a subset of ``train``) and fixed
labeled sets ``labeled_N``. ``--labeled N`` (a count) takes the file's ``labeled_N`` if it
has one, else the first N cases of ``train`` in the file's order; ``--labeled 0.25`` (a
fraction of ``train``) the first ``round(0.25 * len(train))``; without ``--labeled`` the
file's ``labeled`` list is used (else a quarter of ``train``). Without a split file, ``<dataset>/split.json`` is
used if present, else a split is generated from ``--split-seed``: the sorted case ids are
permuted once with ``numpy.random.default_rng(seed)``; 20 % test, 10 % val (at least one
each), the rest train. The resolved split (labeled and unlabeled lists included) is saved
as ``split.json`` in the run folder, so any run can be repeated with ``--split`` on it.

Preprocessing, in the spirit of nnU-Net's fingerprint:

* intensity normalisation per channel, from ``channel_names``: ``CT`` clips to the 0.5 and
  99.5 percentiles of the foreground (label > 0) intensities of the labeled training cases
  and z-scores with their mean and standard deviation (nnU-Net's CTNormalization;
  up to 10,000 foreground voxels sampled per case); ``noNorm`` leaves the values as they
  are; ``rescale_to_0_1`` min-maxes each image; any other name (MRI, T1, T2, ...) z-scores
  each image with its own mean and standard deviation.
* resampling (3D example) to a target spacing: the median spacing of the training cases;
  when the preset sets a volume budget (the CPU presets), the finer axes are coarsened
  (never beyond the coarsest axis) until the median volume fits it. Images are resampled
  trilinearly, labels by nearest neighbour (``torch.nn.functional.interpolate``).
* patch size and network depth (:func:`plan_patch`): the patch starts as the median shape
  at the target spacing; while it has more voxels than the preset's patch budget, the axis
  with the largest physical extent (voxels x spacing) loses one voxel; each axis is then
  rounded down to a multiple of ``2 ** (poolings along it)``. Poolings follow nnU-Net's
  rule (:func:`synapse_data.poolings`): an axis is pooled at a stage while its spacing
  is at most twice the finest and its feature map stays >= 4 voxels, so the first poolings
  of anisotropic data skip the coarse axis. The depth is ``1 + the number of stages that
  pool any axis``, capped by the preset's number of stages. The values are printed and
  saved in the run's ``config.json``.

Metrics convention for a class absent from a test case (both examples): Dice is 1.0 when the
class is absent from both the ground truth and the prediction (distances 0), and 0.0 when
it is in exactly one of them (HD95 and ASD: the volume's diagonal, ``engine.case_metrics``);
every class of ``dataset.json`` is scored in every case and the means run over all cases and
classes.

Command line: ``python examples/nnunet_data.py <dataset folder>`` checks a dataset and
prints its fingerprint and plan.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acdc_data import ACDCSlices, evenly_spaced  # noqa: E402  (the 2D example's slices and picks)
from synapse_data import Volume, poolings, resize_volume  # noqa: E402  (the 3D example's volumes, pooling rule)

LAYOUT_HELP = ("expected an nnU-Net raw dataset folder: dataset.json (channel_names, labels, file_ending), "
               "imagesTr/CASE_XXXX<file_ending> (one file per channel), labelsTr/CASE<file_ending>; "
               "see docs/tutorials/own_data.rst")
NIFTI_ENDINGS = (".nii.gz", ".nii")
ITK_ENDINGS = (".nrrd", ".mha", ".mhd")
PIL_ENDINGS = (".png", ".bmp", ".tif", ".tiff")
DUMMY_SPACING = 999.0  # along the dummy axis of 2D images (nnU-Net's convention)


class NnUNetDataError(ValueError):
    """The dataset folder is missing or malformed; the message names the file and what was expected."""


# ----------------------------------------------------------------------------- dataset.json
@dataclass
class DatasetInfo:
    """What ``dataset.json`` says about a dataset."""

    root: Path
    name: str
    channel_names: List[str]  # index order
    class_names: List[str]  # index = label value; class_names[0] is the background
    file_ending: str
    num_training: Optional[int] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)

    def to_json(self) -> dict:
        return {"root": str(self.root), "name": self.name, "channel_names": self.channel_names,
                "class_names": self.class_names, "num_classes": self.num_classes,
                "in_channels": self.in_channels, "file_ending": self.file_ending}


def read_dataset_json(root: os.PathLike) -> DatasetInfo:
    """Read and check ``<root>/dataset.json``."""
    root = Path(root)
    if not root.is_dir():
        raise NnUNetDataError(f"dataset folder {str(root)!r} does not exist or is not a directory; {LAYOUT_HELP}")
    path = root / "dataset.json"
    if not path.is_file():
        raise NnUNetDataError(f"missing dataset.json: expected {str(path)!r} with the keys channel_names, labels "
                              f"and file_ending; {LAYOUT_HELP} (a CHAOS-T2 / BTCV folder in its own layout: pass "
                              f"--dataset chaos|btcv|dhc_npy to the 3D example, or convert it with "
                              f"examples/convert_to_nnunet.py)")
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NnUNetDataError(f"{str(path)!r} is not valid JSON ({e}); {LAYOUT_HELP}") from e
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in d]
    if missing:
        raise NnUNetDataError(f"{str(path)!r} lacks the key(s) {missing}: expected channel_names, labels and "
                              f"file_ending; {LAYOUT_HELP}")
    ch = d["channel_names"]
    if not isinstance(ch, dict) or not ch or sorted(ch, key=str) != sorted(str(i) for i in range(len(ch))):
        raise NnUNetDataError(f"{str(path)!r}: channel_names must map the consecutive indices \"0\", \"1\", ... to "
                              f"names, got {ch!r}")
    channel_names = [str(ch[str(i)] if str(i) in ch else ch[i]) for i in range(len(ch))]
    labels = d["labels"]
    if not isinstance(labels, dict) or not labels:
        raise NnUNetDataError(f"{str(path)!r}: labels must map class names to integers, got {labels!r}")
    by_value: Dict[int, str] = {}
    for name, v in labels.items():
        if isinstance(v, (list, tuple)):
            raise NnUNetDataError(f"{str(path)!r}: label {name!r} is a region {v!r}; region-based labels are not "
                                  f"supported (expected one integer per class)")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
            raise NnUNetDataError(f"{str(path)!r}: label {name!r} has value {v!r}; expected an integer")
        if int(v) in by_value:
            raise NnUNetDataError(f"{str(path)!r}: labels {by_value[int(v)]!r} and {name!r} share the value {int(v)}")
        by_value[int(v)] = str(name)
    if sorted(by_value) != list(range(len(by_value))):
        raise NnUNetDataError(f"{str(path)!r}: label values must be the consecutive integers 0..{len(by_value) - 1} "
                              f"(0 = background), got {sorted(by_value)}")
    if len(by_value) < 2:
        raise NnUNetDataError(f"{str(path)!r}: labels must list the background (0) and at least one class")
    fe = d["file_ending"]
    if not isinstance(fe, str) or not fe.startswith("."):
        raise NnUNetDataError(f"{str(path)!r}: file_ending must be a string such as \".nii.gz\", got {fe!r}")
    if fe.lower() not in NIFTI_ENDINGS + ITK_ENDINGS + PIL_ENDINGS:
        raise NnUNetDataError(f"{str(path)!r}: file_ending {fe!r} is not supported; expected one of "
                              f"{list(NIFTI_ENDINGS + ITK_ENDINGS + PIL_ENDINGS)}")
    nt = d.get("numTraining")
    return DatasetInfo(root, str(d.get("name") or root.name), channel_names,
                       [by_value[i] for i in range(len(by_value))], fe, int(nt) if nt is not None else None)


_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def list_cases(info: DatasetInfo) -> Dict[str, dict]:
    """The training cases of ``imagesTr`` / ``labelsTr``: ``{case: {"images": [paths], "label": path}}``.

    Checks the file names, that every case has every channel of ``channel_names`` and its
    label, that every label has its image, and ``numTraining``.
    """
    fe = info.file_ending
    img_dir, lab_dir = info.root / "imagesTr", info.root / "labelsTr"
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise NnUNetDataError(f"missing folder {str(d)!r}; {LAYOUT_HELP}")
    chans: Dict[str, Dict[int, Path]] = {}
    for p in sorted(img_dir.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if not p.name.endswith(fe):
            raise NnUNetDataError(f"{str(p)!r}: expected an image file named CASE_XXXX{fe} (file_ending {fe!r} of "
                                  f"dataset.json)")
        m = _CHANNEL_RE.match(p.name[: -len(fe)])
        if not m:
            raise NnUNetDataError(f"{str(p)!r}: expected the name CASE_XXXX{fe}, XXXX the 4-digit channel index "
                                  f"(e.g. CASE_0000{fe})")
        c = int(m.group("ch"))
        if c >= info.in_channels:
            raise NnUNetDataError(f"{str(p)!r}: channel {c:04d} is not listed in channel_names of dataset.json "
                                  f"(expected channels 0000..{info.in_channels - 1:04d})")
        chans.setdefault(m.group("case"), {})[c] = p
    if not chans:
        raise NnUNetDataError(f"no image in {str(img_dir)!r}: expected files CASE_XXXX{fe}; {LAYOUT_HELP}")
    cases: Dict[str, dict] = {}
    for case in sorted(chans):
        have = chans[case]
        miss = [c for c in range(info.in_channels) if c not in have]
        if miss:
            raise NnUNetDataError(f"case {case!r}: missing channel file {str(img_dir / f'{case}_{miss[0]:04d}{fe}')!r} "
                                  f"(dataset.json lists {info.in_channels} channel(s): {info.channel_names})")
        lab = lab_dir / f"{case}{fe}"
        if not lab.is_file():
            raise NnUNetDataError(f"image without its label: {str(have[0])!r} has no label file {str(lab)!r}")
        cases[case] = {"images": [have[c] for c in range(info.in_channels)], "label": lab}
    for p in sorted(lab_dir.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        case = p.name[: -len(fe)] if p.name.endswith(fe) else None
        if case not in cases:
            raise NnUNetDataError(f"label without its image: {str(p)!r} has no image "
                                  f"{str(img_dir / ((case or p.name) + '_0000' + fe))!r}")
    if info.num_training is not None and info.num_training != len(cases):
        raise NnUNetDataError(f"{str(info.root / 'dataset.json')!r}: numTraining is {info.num_training} but "
                              f"{str(img_dir)!r} holds {len(cases)} case(s)")
    return cases


# ----------------------------------------------------------------------------- file I/O
def _ending(path: Path) -> str:
    n = path.name.lower()
    for e in NIFTI_ENDINGS + ITK_ENDINGS + PIL_ENDINGS:
        if n.endswith(e):
            return e
    raise NnUNetDataError(f"{str(path)!r}: unsupported file type; expected one of "
                          f"{list(NIFTI_ENDINGS + ITK_ENDINGS + PIL_ENDINGS)}")


def _to_zyx(shape_xyz, zooms_xyz, path) -> Tuple[Tuple[int, int, int], Tuple[float, float, float]]:
    shape = list(shape_xyz)
    zooms = [float(z) for z in zooms_xyz] + [1.0] * 3
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 2:
        return (1, shape[1], shape[0]), (DUMMY_SPACING, zooms[1], zooms[0])
    if len(shape) != 3:
        raise NnUNetDataError(f"{str(path)!r}: expected a 2D or 3D single-channel image, got shape {tuple(shape_xyz)} "
                              f"(one file per channel, suffix _XXXX)")
    sp = (zooms[2], zooms[1], zooms[0])
    if shape[2] == 1:  # 2D data stored as NIfTI with a singleton third axis
        sp = (DUMMY_SPACING, zooms[1], zooms[0])
    return (shape[2], shape[1], shape[0]), sp


def read_header(path: os.PathLike) -> Tuple[Tuple[int, int, int], Tuple[float, float, float]]:
    """Shape ``(Z, Y, X)`` and spacing ``(z, y, x)`` of an image file, without reading its voxels."""
    path = Path(path)
    e = _ending(path)
    try:
        if e in NIFTI_ENDINGS:
            import nibabel as nib

            img = nib.load(str(path))
            return _to_zyx(img.shape, img.header.get_zooms()[:3], path)
        if e in ITK_ENDINGS:
            import SimpleITK as sitk

            r = sitk.ImageFileReader()
            r.SetFileName(str(path))
            r.ReadImageInformation()
            return _to_zyx(r.GetSize(), r.GetSpacing(), path)
        from PIL import Image

        with Image.open(path) as im:
            if im.mode not in ("L", "I", "I;16", "F", "1", "P"):
                raise NnUNetDataError(f"{str(path)!r}: expected a grayscale 2D image, got mode {im.mode!r} "
                                      f"(store each channel in its own file, suffix _XXXX)")
            w, h = im.size
        return (1, h, w), (DUMMY_SPACING, 1.0, 1.0)
    except NnUNetDataError:
        raise
    except Exception as ex:  # unreadable / corrupt file
        raise NnUNetDataError(f"cannot read {str(path)!r} ({type(ex).__name__}: {ex})") from ex


def read_image(path: os.PathLike) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    """Voxels as a ``(Z, Y, X)`` array (``(1, Y, X)`` for 2D) and the spacing ``(z, y, x)``."""
    path = Path(path)
    e = _ending(path)
    try:
        if e in NIFTI_ENDINGS:
            import nibabel as nib

            img = nib.load(str(path))
            arr = np.asanyarray(img.dataobj)
            shape, sp = _to_zyx(arr.shape, img.header.get_zooms()[:3], path)
            while arr.ndim > 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            arr = arr[:, :, None] if arr.ndim == 2 else arr
            return np.ascontiguousarray(arr.transpose(2, 1, 0)), sp
        if e in ITK_ENDINGS:
            import SimpleITK as sitk

            img = sitk.ReadImage(str(path))
            arr = sitk.GetArrayFromImage(img)  # already (Z, Y, X)
            shape, sp = _to_zyx(img.GetSize(), img.GetSpacing(), path)
            return arr.reshape(shape), sp
        from PIL import Image

        shape, sp = read_header(path)
        with Image.open(path) as im:
            arr = np.asarray(im)
        return arr.reshape(shape), sp
    except NnUNetDataError:
        raise
    except Exception as ex:
        raise NnUNetDataError(f"cannot read {str(path)!r} ({type(ex).__name__}: {ex})") from ex


def _check_label_values(label: np.ndarray, path: Path, info: DatasetInfo) -> np.ndarray:
    if label.dtype.kind == "f":
        r = np.rint(label)
        if not np.array_equal(r, label):
            raise NnUNetDataError(f"label file {str(path)!r}: expected integer label values, found non-integers")
        label = r
    values = np.unique(label)
    bad = [v for v in values.tolist() if not (0 <= v < info.num_classes)]
    if bad:
        listed = ", ".join(f"{i} {n}" for i, n in enumerate(info.class_names))
        raise NnUNetDataError(f"label file {str(path)!r}: value(s) {[int(b) if float(b).is_integer() else b for b in bad]} "
                              f"not listed in labels of dataset.json (expected 0..{info.num_classes - 1}: {listed})")
    return label.astype(np.uint8)


def _same_geometry(sp_a, sp_b) -> bool:
    return all(abs(a - b) <= 1e-3 * max(abs(a), abs(b), 1e-6) for a, b in zip(sp_a, sp_b))


def check_dataset(info: DatasetInfo, cases: Dict[str, dict], read_labels: bool = True) -> Dict[str, dict]:
    """Check every case: channel and label shapes (file headers) and, with ``read_labels``,
    the label values. Returns ``{case: {"shape": (Z, Y, X), "spacing": (z, y, x)}}``."""
    out = {}
    for case, files in cases.items():
        shape, sp = read_header(files["images"][0])
        for p in files["images"][1:]:
            s2, sp2 = read_header(p)
            if s2 != shape or not _same_geometry(sp, sp2):
                raise NnUNetDataError(f"case {case!r}: channel file {str(p)!r} has shape {s2} / spacing {sp2}, expected "
                                      f"those of {str(files['images'][0])!r}: shape {shape} / spacing {sp}")
        ls, lsp = read_header(files["label"])
        if ls != shape:
            raise NnUNetDataError(f"case {case!r}: label file {str(files['label'])!r} has shape {ls}, expected the "
                                  f"image's shape {shape} ({str(files['images'][0])!r}); shapes are (Z, Y, X)")
        if read_labels:
            _check_label_values(read_image(files["label"])[0], files["label"], info)
        out[case] = {"shape": tuple(int(s) for s in shape), "spacing": tuple(float(s) for s in sp)}
    return out


@dataclass
class Case:
    """One case as read from disk: ``image (C, Z, Y, X)`` (raw values), ``label (Z, Y, X)`` uint8."""

    case_id: str
    image: np.ndarray
    label: Optional[np.ndarray]
    spacing: Tuple[float, float, float]
    files: Dict[str, object] = field(default_factory=dict)


def load_case(info: DatasetInfo, case_id: str, files: dict, with_label: bool = True) -> Case:
    """Read one case's channels and label; checks shapes and label values."""
    chans, sp = [], None
    for p in files["images"]:
        a, s = read_image(p)
        if chans and a.shape != chans[0].shape:
            raise NnUNetDataError(f"case {case_id!r}: channel file {str(p)!r} has shape {a.shape}, expected "
                                  f"{chans[0].shape} like {str(files['images'][0])!r}")
        sp = sp or s
        chans.append(a.astype(np.float32))
    image = np.stack(chans)
    label = None
    if with_label:
        lab, _ = read_image(files["label"])
        if lab.shape != image.shape[1:]:
            raise NnUNetDataError(f"case {case_id!r}: label file {str(files['label'])!r} has shape {lab.shape}, "
                                  f"expected the image's shape {image.shape[1:]}")
        label = _check_label_values(lab, Path(files["label"]), info)
    return Case(case_id, image, label, sp, {"images": [str(p) for p in files["images"]], "label": str(files["label"])})


# ----------------------------------------------------------------------------- preprocessing
def _norm_scheme(name: str) -> str:
    n = name.strip().lower()
    if n == "ct":
        return "ct"
    if n in ("nonorm", "none"):
        return "none"
    if n in ("rescale_to_0_1", "rgb_to_0_1"):
        return "rescale"
    return "zscore"


def intensity_fingerprint(info: DatasetInfo, labeled_cases: Sequence[Case], per_case: int = 10000,
                          seed: int = 1234) -> List[Optional[dict]]:
    """Per channel: foreground (label > 0) intensity statistics of the labeled cases
    (mean, std, 0.5 / 99.5 percentiles), for the CT channels only (None for the others)."""
    rng = np.random.default_rng(seed)
    out: List[Optional[dict]] = []
    for c, name in enumerate(info.channel_names):
        if _norm_scheme(name) != "ct":
            out.append(None)
            continue
        vals = []
        for case in labeled_cases:
            fg = case.image[c][case.label > 0] if case.label is not None else np.empty(0, np.float32)
            if fg.size == 0:
                continue
            if fg.size > per_case:
                fg = fg[rng.choice(fg.size, per_case, replace=False)]
            vals.append(fg)
        if not vals:
            raise NnUNetDataError(f"channel {c} ({name!r}) is CT but the labeled training cases have no foreground "
                                  f"voxel to take its intensity statistics from")
        v = np.concatenate(vals).astype(np.float64)
        out.append({"mean": float(v.mean()), "std": float(v.std()), "percentile_00_5": float(np.percentile(v, 0.5)),
                    "percentile_99_5": float(np.percentile(v, 99.5)), "voxels": int(v.size)})
    return out


def normalize(image: np.ndarray, channel_names: Sequence[str], fingerprint: Sequence[Optional[dict]]) -> np.ndarray:
    """Normalise ``image (C, ...)`` channel by channel (see the module docstring)."""
    out = np.empty(image.shape, np.float32)
    for c, name in enumerate(channel_names):
        x = image[c].astype(np.float32)
        s = _norm_scheme(name)
        if s == "ct":
            fp = fingerprint[c]
            x = np.clip(x, fp["percentile_00_5"], fp["percentile_99_5"])
            x = (x - fp["mean"]) / max(fp["std"], 1e-8)
        elif s == "rescale":
            lo, hi = float(x.min()), float(x.max())
            x = (x - lo) / max(hi - lo, 1e-8)
        elif s == "zscore":
            x = (x - float(x.mean())) / max(float(x.std()), 1e-8)
        out[c] = x
    return out


def target_spacing(median_spacing: Sequence[float], median_shape: Sequence[int],
                   volume_budget: Optional[int] = None) -> Tuple[float, ...]:
    """The median spacing, coarsened along the finer axes (never beyond the coarsest axis,
    then along all axes) until the median volume has at most ``volume_budget`` voxels."""
    sp = [float(s) for s in median_spacing]
    if not volume_budget:
        return tuple(sp)
    extent = [s * n for s, n in zip(sp, median_shape)]

    def voxels(spc):
        return math.prod(max(1, int(round(e / s))) for e, s in zip(extent, spc))

    if voxels(sp) <= volume_budget:
        return tuple(sp)
    coarse = max(sp)
    fine = [a for a in range(len(sp)) if sp[a] * 2 <= coarse]  # anisotropic: coarsen the fine axes first
    if fine:
        f = (voxels(sp) / volume_budget) ** (1.0 / len(fine))
        f = min(f, min(coarse / sp[a] for a in fine))
        for a in fine:
            sp[a] *= f
    if voxels(sp) > volume_budget:
        f = (voxels(sp) / volume_budget) ** (1.0 / len(sp))
        sp = [s * f for s in sp]
    return tuple(sp)


def plan_patch(median_shape: Sequence[int], spacing: Sequence[float], patch_budget: int, max_stages: int,
               min_size: int = 4) -> dict:
    """Patch size and depth from the median shape and spacing (rule in the module docstring).

    Returns ``{"patch", "n_stages", "strides", "rule"}``; axes of size 1 (2D data) stay 1.
    """
    patch = [max(1, int(n)) for n in median_shape]
    sp = [float(s) for s in spacing]
    while math.prod(patch) > patch_budget:
        a = max((i for i in range(len(patch)) if patch[i] > min_size), key=lambda i: patch[i] * sp[i], default=None)
        if a is None:
            break
        patch[a] -= 1
    active = [i for i in range(len(patch)) if patch[i] > 1]
    strides = poolings([patch[i] for i in active], [sp[i] for i in active], min_size, max_stages)
    for i_act, i in enumerate(active):
        unit = 2 ** sum(1 for st in strides if st[i_act] == 2)
        patch[i] = max(unit, patch[i] // unit * unit)
    full = []
    for st in strides:
        row = [1] * len(patch)
        for i_act, i in enumerate(active):
            row[i] = st[i_act]
        full.append(row)
    return {"patch": patch, "n_stages": len(full), "strides": full,
            "rule": f"patch = median shape {list(median_shape)} at the target spacing, the axis with the largest "
                    f"extent shrunk while over {patch_budget} voxels, each axis a multiple of 2**poolings; "
                    f"poolings while spacing <= 2x the finest and the map stays >= {min_size}; "
                    f"depth capped at {max_stages} stages"}


# ----------------------------------------------------------------------------- splits
def parse_labeled(text: Union[str, int, float, None]) -> Optional[Union[int, float]]:
    """``--labeled``: a count (``4``) or a fraction of the training cases (``0.25``); a bad value
    raises :class:`_cli.ArgValueError` (a ``ValueError`` that argparse reports in one line)."""
    from _cli import ArgValueError

    if text is None:
        return None
    try:
        v = float(text)
    except ValueError:
        raise ArgValueError(f"expected a count (e.g. 4) or a fraction 0<x<1 (e.g. 0.25), got {text!r}") from None
    if v.is_integer() and v >= 1:
        return int(v)
    if 0 < v < 1:
        return v
    raise ArgValueError(f"expected a count >= 1 or a fraction 0<x<1, got {text!r}")


def make_split(case_ids: Sequence[str], seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> dict:
    """A split of ``case_ids``: sorted, permuted with ``default_rng(seed)``; test, val, the rest train."""
    ids = sorted(case_ids)
    n = len(ids)
    if n < 3:
        raise NnUNetDataError(f"{n} case(s): a generated split needs at least 3 (train, val, test)")
    perm = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    n_test = max(1, int(round(test_fraction * n)))
    n_val = max(1, int(round(val_fraction * n)))
    while n - n_test - n_val < 1:
        n_test -= 1 if n_test > 1 else 0
        n_val -= 1 if n_val > 1 and n - n_test - n_val < 1 else 0
    return {"train": perm[: n - n_test - n_val], "val": perm[n - n_test - n_val: n - n_test], "test": perm[n - n_test:],
            "seed": int(seed),
            "how": f"case ids sorted, permuted with numpy.random.default_rng({seed}).permutation({n}); the last "
                   f"{n_test} = test, the {n_val} before = val, the rest = train (in permutation order); labeled = "
                   f"the first N train ids"}


def resolve_split(case_ids: Sequence[str], split_file: Optional[os.PathLike], labeled, seed: int = 0,
                  default_fraction: float = 0.25) -> dict:
    """The run's split: ``train, labeled, unlabeled, val, test`` (+ where it came from)."""
    if split_file is not None:
        path = Path(split_file)
        if not path.is_file():
            raise NnUNetDataError(f"split file {str(path)!r} does not exist")
        try:
            s = json.loads(path.read_text())
        except ValueError as e:
            raise NnUNetDataError(f"split file {str(path)!r} is not valid JSON ({e})") from e
        miss = [k for k in ("train", "val", "test") if k not in s]
        if miss:
            raise NnUNetDataError(f"split file {str(path)!r} lacks {miss}: expected lists train, val, test "
                                  f"(and optionally labeled)")
        known = set(case_ids)
        for k in ("train", "val", "test", "labeled"):
            unknown = [c for c in s.get(k, []) if c not in known]
            if unknown:
                raise NnUNetDataError(f"split file {str(path)!r}: {k} names case(s) {unknown[:3]} that are not in "
                                      f"imagesTr/labelsTr")
        seen: Dict[str, str] = {}
        for k in ("train", "val", "test"):
            for c in s[k]:
                if c in seen:
                    raise NnUNetDataError(f"split file {str(path)!r}: case {c!r} is in both {seen[c]} and {k}")
                seen[c] = k
        for k in [k for k in s if k == "labeled" or k.startswith("labeled_")]:
            if any(c not in s["train"] for c in s[k]):
                raise NnUNetDataError(f"split file {str(path)!r}: {k} must be a subset of train")
        source = str(path)
    else:
        s = make_split(case_ids, seed)
        source = f"generated (seed {seed})"
    train = list(s["train"])
    if not train:
        raise NnUNetDataError(f"split ({source}): train is empty")
    if labeled is None:
        lab = list(s["labeled"]) if s.get("labeled") else train[: max(1, int(round(default_fraction * len(train))))]
    elif isinstance(labeled, int) and f"labeled_{labeled}" in s:  # a fixed labeled set of that size (DHC's splits)
        lab = list(s[f"labeled_{labeled}"])
    else:
        n = labeled if isinstance(labeled, int) else max(1, int(round(labeled * len(train))))
        if n > len(train):
            raise NnUNetDataError(f"--labeled {labeled}: the split ({source}) has only {len(train)} training cases")
        lab = train[:n]
    return {"train": train, "labeled": lab, "unlabeled": [c for c in train if c not in lab], "val": list(s["val"]),
            **{k: list(v) for k, v in s.items() if k.startswith("labeled_")},
            "test": list(s["test"]), "source": source, "how": s.get("how", ""),
            **({"seed": s["seed"]} if "seed" in s else {})}


# ----------------------------------------------------------------------------- the whole preparation
@dataclass
class Prepared:
    """A checked dataset with its split, fingerprint and plan, ready for one example."""

    info: DatasetInfo
    cases: Dict[str, dict]
    split: dict
    fingerprint: dict
    plan: dict
    ndim: int

    def __repr__(self) -> str:
        return f"Prepared({str(self.root)!r}, ndim={self.ndim})"

    def __str__(self) -> str:  # where the data came from, as a path (start-up summaries, config.json)
        return str(self.root)

    @property
    def class_names(self) -> List[str]:
        return self.info.class_names

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def in_channels(self) -> int:
        return self.info.in_channels

    @property
    def root(self) -> Path:
        return self.info.root

    def summary(self) -> dict:
        return {"dataset": self.info.to_json(), "split_source": self.split["source"],
                "split_sizes": {k: len(self.split[k]) for k in ("labeled", "unlabeled", "val", "test")},
                "fingerprint": self.fingerprint, "plan": self.plan}

    def describe(self) -> str:
        p, f = self.plan, self.fingerprint
        s = self.split
        if self.ndim == 3:
            geo = (f"median shape {f['median_shape']} spacing {_fmt(f['median_spacing'])} -> target spacing "
                   f"{_fmt(p['target_spacing'])}, patch {p['patch']}, {p['n_stages']} stages, strides {p['strides'][1:]}")
        else:
            geo = (f"slices along array axis {p['slice_axis_zyx']} (file axis {p['slice_axis']}), median slice "
                   f"{p['median_slice_shape']}, input {p['input_size']}x{p['input_size']}, {p['poolings']} poolings")
        return (f"dataset {self.info.name} ({self.root}): {self.num_classes} classes {self.class_names}, "
                f"{self.in_channels} channel(s) {self.info.channel_names} (normalisation "
                f"{[_norm_scheme(c) for c in self.info.channel_names]}); split {s['source']}: {len(s['labeled'])} "
                f"labeled / {len(s['unlabeled'])} unlabeled / {len(s['val'])} val / {len(s['test'])} test; {geo}")

    def read(self, case_id: str, with_label: bool = True) -> Case:
        case = load_case(self.info, case_id, self.cases[case_id], with_label=with_label)
        case.image = normalize(case.image, self.info.channel_names, self.fingerprint["intensity"])
        return case

    # -- 3D example
    def load(self, ids: Sequence[str]) -> list:
        """3D volumes (``synapse_data.Volume``): normalised, resampled to the target spacing."""
        out = []
        tsp = self.plan["target_spacing"]
        for cid in ids:
            c = self.read(cid)
            shape = [max(1, int(round(n * s / t))) for n, s, t in zip(c.image.shape[1:], c.spacing, tsp)]
            img, lab = resize_volume(c.image, c.label, shape)  # trilinear image, nearest label
            img = img[0] if img.shape[0] == 1 else img
            out.append(Volume(cid, np.ascontiguousarray(img, dtype=np.float32), lab, tuple(float(t) for t in tsp)))
        return out

    # -- 2D example
    def slices(self, ids: Sequence[str], with_label: bool = True) -> List[Tuple[str, np.ndarray, Optional[np.ndarray]]]:
        """``(name, image (C, H, W), label (H, W))`` of every slice of ``ids`` along the slice axis."""
        out = []
        for cid in ids:
            img, lab = self.volume_2d(cid, with_label)
            for z in range(img.shape[0]):
                out.append((f"{cid}_slice_{z}", img[z], None if lab is None else lab[z]))
        return out

    def volume_2d(self, cid: str, with_label: bool = True) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """``image (S, C, H, W)`` and ``label (S, H, W)``: the case cut along the slice axis."""
        c = self.read(cid, with_label)
        ax = self.plan["slice_axis_zyx"]
        img = np.moveaxis(c.image, ax + 1, 1).transpose(1, 0, 2, 3)
        lab = None if c.label is None else np.moveaxis(c.label, ax, 0)
        return np.ascontiguousarray(img), None if lab is None else np.ascontiguousarray(lab)

    def train_dataset(self, size: int, augment: bool = True, crop: Optional[int] = None) -> "Slices2D":
        """Slices of the labeled, then the unlabeled training cases (indices ``0..n_labeled-1``
        are the labeled stream); its ``n_labeled`` attribute splits the two. ``crop``: random
        ``crop x crop`` training windows of the resized slices, as for ACDC."""
        lab = self.slices(self.split["labeled"])
        unl = self.slices(self.split["unlabeled"], with_label=False)
        return Slices2D(lab + unl, size, augment, n_labeled=len(lab), crop=crop)

    def volumes(self, split: str, limit: Optional[int] = None) -> "Volumes2D":
        cases = list(self.split[split])
        return Volumes2D(self, evenly_spaced(cases, limit) if limit else cases)

    def save(self, run_dir: os.PathLike) -> Path:
        """Write the resolved split to ``<run_dir>/split.json``."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "split.json"
        path.write_text(json.dumps({k: self.split[k] for k in ("train", "labeled", "unlabeled", "val", "test", "source",
                                                               "how") if k in self.split}
                                   | ({"seed": self.split["seed"]} if "seed" in self.split else {}), indent=1))
        return path


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in v) + ")"


def _median(values: Sequence[Sequence[float]]) -> List[float]:
    return [float(v) for v in np.median(np.asarray(values, dtype=np.float64), axis=0)]


def prepare(dataset_dir: os.PathLike, ndim: int, split_file: Optional[os.PathLike] = None, labeled=None,
            split_seed: int = 0, patch_budget: int = 16 * 64 * 64, max_stages: int = 5,
            volume_budget: Optional[int] = None, spacing: Optional[Sequence[float]] = None,
            slice_axis: Optional[int] = None, input_size: int = 256, verbose: bool = True) -> Prepared:
    """Check the dataset, resolve the split, take the fingerprint and plan the network.

    Args:
        ndim: 3 for the 3D example (volumes, resampled), 2 for the 2D example (slices).
        split_file: a split JSON (default: ``<dataset_dir>/split.json`` if present, else generated).
        labeled: ``--labeled`` (count, fraction or None).
        patch_budget, max_stages, volume_budget: the preset's limits (3D).
        spacing: an explicit target spacing ``(z, y, x)`` (3D; default: the rule above).
        slice_axis: 2D example: the file's voxel axis (0, 1, 2 = nibabel's i, j, k) to slice along
            (default: the coarsest-spacing axis, k on ties).
        input_size: 2D example: the side the slices are resized to (the preset's ``size``).
    """
    info = read_dataset_json(dataset_dir)
    cases = list_cases(info)
    geo = check_dataset(info, cases)
    if split_file is None and (info.root / "split.json").is_file():
        split_file = info.root / "split.json"
    split = resolve_split(list(cases), split_file, labeled, split_seed)
    train = split["train"]
    shapes = [geo[c]["shape"] for c in train]
    spacings = [geo[c]["spacing"] for c in train]
    is_2d = all(s[0] == 1 for s in shapes)
    med_sp, med_shape = _median(spacings), [int(round(v)) for v in _median(shapes)]
    need_ct = any(_norm_scheme(n) == "ct" for n in info.channel_names)
    intensity = (intensity_fingerprint(info, [load_case(info, c, cases[c]) for c in split["labeled"]])
                 if need_ct else [None] * info.in_channels)
    fp = {"median_spacing": med_sp, "median_shape": med_shape, "is_2d": is_2d, "intensity": intensity,
          "normalization": [_norm_scheme(n) for n in info.channel_names], "cases_measured": len(train)}
    if ndim == 3:
        if is_2d:
            raise NnUNetDataError(f"dataset {str(info.root)!r} holds 2D images: train it with the 2D example "
                                  f"(examples/acdc_cps_dacl.py --dataset-dir {info.root})")
        tsp = tuple(float(s) for s in spacing) if spacing is not None else target_spacing(med_sp, med_shape,
                                                                                          volume_budget)
        shape_t = [max(1, int(round(n * s / t))) for n, s, t in zip(med_shape, med_sp, tsp)]
        plan = plan_patch(shape_t, tsp, patch_budget, max_stages)
        plan.update(target_spacing=list(tsp), median_shape_at_target=shape_t,
                    volume_budget=volume_budget, patch_budget=patch_budget)
    else:
        if is_2d:
            ax_zyx = 0
        elif slice_axis is not None:
            if slice_axis not in (0, 1, 2):
                raise NnUNetDataError(f"--slice-axis: expected 0, 1 or 2 (the file's voxel axes i, j, k), got {slice_axis}")
            ax_zyx = 2 - int(slice_axis)
        else:
            ax_zyx = int(np.argmax(med_sp))  # (z, y, x) order: ties go to z = the file's k axis
        inplane = [med_shape[a] for a in range(3) if a != ax_zyx]
        in_sp = [med_sp[a] for a in range(3) if a != ax_zyx]
        strides = poolings([input_size, input_size], [1.0, 1.0], 4)
        plan = {"slice_axis": 2 - ax_zyx, "slice_axis_zyx": ax_zyx, "median_slice_shape": inplane,
                "median_slice_spacing": in_sp, "input_size": int(input_size), "poolings": len(strides) - 1,
                "rule": "every slice resized to input_size x input_size (the SSL4MIS protocol); poolings: halve "
                        "while the feature map stays >= 4 pixels"}
    prep = Prepared(info, cases, split, fp, plan, ndim)
    if verbose:
        print(prep.describe(), flush=True)
    return prep


def open_2d(cfg: dict, run_dir: os.PathLike) -> Prepared:
    """The 2D example's side: prepare ``cfg["dataset_dir"]`` (``ndim=2``), save the split in
    ``run_dir``, set ``cfg``'s ``num_classes``, ``in_channels``, ``class_names`` and ``nnunet``
    (the summary that config.json keeps) and load the training slices
    (``prep.train_slices``, a :class:`Slices2D`)."""
    prep = prepare(cfg["dataset_dir"], 2, cfg.get("split"), parse_labeled(cfg.get("labeled")),
                   int(cfg.get("split_seed") or 0), slice_axis=cfg.get("slice_axis"), input_size=int(cfg["size"]))
    dec = list(cfg["decoder_channels"])
    if prep.plan["poolings"] < len(dec):  # no feature map below 4 pixels: a shallower encoder
        cfg["decoder_channels"] = dec[len(dec) - prep.plan["poolings"]:]
    prep.plan["encoder_depth"] = len(cfg["decoder_channels"])
    cfg.update(num_classes=prep.num_classes, in_channels=prep.in_channels, class_names=prep.class_names,
               nnunet=prep.summary())
    prep.save(run_dir)
    prep.train_slices = prep.train_dataset(int(cfg["size"]), crop=cfg.get("crop"))
    print(f"2D plan: input {cfg['size']}x{cfg['size']}, encoder depth {prep.plan['encoder_depth']}; "
          f"{prep.train_slices.n_labeled} labeled + {len(prep.train_slices) - prep.train_slices.n_labeled} unlabeled "
          f"training slices (saved in config.json; split in {Path(run_dir) / 'split.json'})", flush=True)
    return prep


# ----------------------------------------------------------------------------- 2D datasets
class Slices2D(ACDCSlices):
    """In-memory training slices ``(name, image (C, H, W), label (H, W) or None)``, served as
    ``acdc_data.ACDCSlices`` serves ACDC's (same augmentation and resizing; items
    ``(index, aug_seed)``; ``image (C, S, S)``, ``label (S, S)``, zeros for unlabeled slices)."""

    def __init__(self, slices: Sequence[Tuple[str, np.ndarray, Optional[np.ndarray]]], size: int,
                 augment: bool = True, n_labeled: int = 0, crop: Optional[int] = None) -> None:
        slices = list(slices)
        # the slices are already in memory: no folder to read and nothing to cache
        super().__init__(Path("."), size, augment=augment, cache=False,
                         cases=[s[0] for s in slices], crop=crop)
        self.slices, self.n_labeled = slices, int(n_labeled)

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        _, image, label = self.slices[index]
        return image, np.zeros(image.shape[1:], np.uint8) if label is None else label


class Volumes2D(torch.utils.data.Dataset):
    """Val / test cases for the 2D example, like ``acdc_data.ACDCVolumes``: items ``name``,
    ``image`` ``(S, H, W)`` (one channel) or ``(S, C, H, W)``, ``label (S, H, W)`` int64."""

    def __init__(self, prep: Prepared, cases: Sequence[str]) -> None:
        self.prep = prep
        self.cases = list(cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        name = self.cases[index]
        img, lab = self.prep.volume_2d(name)
        if img.shape[1] == 1:
            img = img[:, 0]
        return {"name": name, "image": img, "label": lab.astype(np.int64)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Check an nnU-Net raw dataset and print its fingerprint and plan.")
    p.add_argument("dataset_dir")
    p.add_argument("--ndim", type=int, choices=(2, 3), default=3)
    p.add_argument("--split", default=None)
    p.add_argument("--labeled", default=None)
    args = p.parse_args(argv)
    try:
        prep = prepare(args.dataset_dir, args.ndim, args.split, parse_labeled(args.labeled))
    except NnUNetDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(prep.summary(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
