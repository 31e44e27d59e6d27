#!/usr/bin/env python
"""Download a dataset of the examples from its official source and prepare it.

    python examples/get_data.py acdc     # ACDC (2D cardiac MRI) -> SSL4MIS h5 layout
    python examples/get_data.py chaos    # CHAOS, MR T2-SPIR (3D abdominal MRI) -> NIfTI pairs

The archive is downloaded into ``<cache>/downloads/`` (resumed where a previous attempt
stopped, with a progress bar), verified (the published MD5 where the source publishes one,
else the archive's structure), and converted into ``<cache>/data/ACDC`` or
``<cache>/data/CHAOS-T2``, where the examples look for it. ``<cache>`` is
``$TORCH_DACL_CACHE``, else ``$XDG_CACHE_HOME/torch-dacl``, else ``~/.cache/torch-dacl``
(``--cache`` overrides). ``--url`` downloads from a mirror of the same file instead (the
same checks apply), and so does ``$TORCH_DACL_MIRROR``, a folder URL that holds the archives
under their file names (``ACDC.zip``, ``CHAOS_Train_Sets.zip``); ``--archive`` prepares a
file or an unpacked folder you already have.

Offline, or when the server cannot be reached at all (the name does not resolve, the
connection is refused, no route), it stops at once, naming the page to download the archive
from by hand and ``--archive FILE``; a transfer that broke off, a timeout or a server error
is retried, resuming where it stopped. The training scripts call :func:`fetch` themselves when they find
no data (``--no-download`` refuses).

ACDC (Bernard et al., IEEE TMI 2018): the official database at CREATIS, research use; the
archive is the database folder as one zip (``database/training/patientXXX/...``, NIfTI).
The preparation writes the layout of SSL4MIS that the semi-supervised literature uses:
``data/patientXXX_frameYY.h5`` volumes ``(slices, H, W)`` and
``data/patientXXX_frameYY_slice_Z.h5`` training slices, each with ``image`` (float32,
min-max normalised per volume to [0, 1]) and ``label`` (uint8: 0 background, 1 right
ventricle, 2 myocardium, 3 left ventricle); ``frame01`` is the end-diastolic and ``frame02``
the end-systolic frame (``Info.cfg``), slices are numbered from 1. The split lists come from
``examples/splits/acdc/`` (the standard SSL4MIS split of the 100 training patients: 70
train, 10 val, 20 test).

CHAOS (Kavur et al., MedIA 2021; CC BY-NC-SA 4.0 as the Zenodo record states): ``CHAOS_Train_Sets.zip``
of the Zenodo record 3431873. Of its MR part, the 20 T2-SPIR series (DICOM) and their
ground-truth PNGs become ``image_<id>.nii.gz`` (float32, scanner intensities) and
``label_<id>.nii.gz`` (uint8: 0 background, 1 liver, 2 right kidney, 3 left kidney,
4 spleen), oriented L-A-S and, by default, resampled to 1.25 x 1.25 x 7.7 mm and centred in
256 x 256 in-plane (the geometry of the SSL-ALPNet preprocessing that the examples' presets
were sized on; ``--native`` keeps the scanner geometry).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import http.client
import io
import os
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import DATASET_DIRS, cache_dir  # noqa: E402

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
ACDC_LISTS = ("train_slices.list", "train.list", "val.list", "test.list")


@dataclass(frozen=True)
class Source:
    """One pinned archive: where it comes from and what it must be."""

    url: str
    filename: str
    md5: Optional[str]  # published checksum, None where the source publishes none
    size: Optional[int]  # published size in bytes, None where unknown
    provenance: str  # where the URL and checksum are taken from
    page: str  # where a person downloads it by hand
    what: str  # what the archive is, in words


SOURCES: Dict[str, Source] = {
    # The official ACDC database on the CREATIS "humanheart-project" Girder server, linked from
    # https://www.creatis.insa-lyon.fr/Challenge/acdc/ ; the URL downloads the folder
    # "ACDC" (id 637218e573e9f0047faa00fc) as one zip made on the fly. The server publishes
    # no checksum for it, so the archive's structure is verified instead (every patient of
    # the split, its two annotated frames and Info.cfg; zip CRCs on reading).
    "acdc": Source(
        url="https://humanheart-project.creatis.insa-lyon.fr/database/api/v1/folder/637218e573e9f0047faa00fc/download",
        filename="ACDC.zip", md5=None, size=None,
        provenance="CREATIS ACDC database (https://www.creatis.insa-lyon.fr/Challenge/acdc/); no published checksum",
        page="https://www.creatis.insa-lyon.fr/Challenge/acdc/ (the database folder 'ACDC', as one zip)",
        what="the ACDC database (cardiac cine MRI, NIfTI); the server zips it on the fly and publishes no "
             "size"),
    # Zenodo record 3431873, "CHAOS - Combined (CT-MR) Healthy Abdominal Organ Segmentation
    # Challenge Data" (https://doi.org/10.5281/zenodo.3431873). MD5 and size as the record
    # lists them for CHAOS_Train_Sets.zip.
    "chaos": Source(
        url="https://zenodo.org/records/3431873/files/CHAOS_Train_Sets.zip?download=1",
        filename="CHAOS_Train_Sets.zip", md5="df21053002a1cc86df918a87da3b2c19", size=890_771_694,
        provenance="Zenodo record 3431873 (MD5 and size as listed on the record)",
        page="https://doi.org/10.5281/zenodo.3431873 (CHAOS_Train_Sets.zip)",
        what="the CHAOS training sets (CT and MR, DICOM and PNG ground truth), 850 MiB"),
}

# The 20 MR cases of the CHAOS training set (the ids of its Train_Sets/MR folders)
CHAOS_MR_IDS = ("1", "2", "3", "5", "8", "10", "13", "15", "19", "20",
                "21", "22", "31", "32", "33", "34", "36", "37", "38", "39")
# Ground-truth PNG intensity ranges of the CHAOS MR labels (the challenge's documentation):
# liver 63 (55-70), right kidney 126 (110-135), left kidney 189 (175-200), spleen 252 (240-255)
CHAOS_LABEL_RANGES = ((1, 55, 70), (2, 110, 135), (3, 175, 200), (4, 240, 255))
CHAOS_SPACING = (1.25, 1.25, 7.7)  # x, y, z in mm (the SSL-ALPNet geometry)
CHAOS_INPLANE = 256


class DownloadError(RuntimeError):
    """The download failed, or the file is not the one pinned (size or checksum)."""


class UnreachableError(DownloadError):
    """The server could not be reached at all (offline, name not resolved, refused, timed out)."""


class ArchiveError(RuntimeError):
    """The archive (or folder) does not have the structure of the official release."""


def manual_route(dataset: str) -> str:
    """How to get ``dataset`` without this machine downloading it."""
    return (f"download it by hand from {SOURCES[dataset].page}, then run "
            f"`python examples/get_data.py {dataset} --archive FILE` (FILE: the zip, or the folder it unpacks to)")


# ----------------------------------------------------------------------------- download
def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _bar(total: Optional[int], initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, dynamic_ncols=True)


def download(url: str, dest: Path, md5: Optional[str] = None, size: Optional[int] = None, *,
             progress: bool = True, retries: int = 5, timeout: float = 30.0, chunk: int = 1 << 20,
             log: Callable[[str], None] = print) -> Path:
    """Download ``url`` to ``dest``, resuming an interrupted transfer, and verify it.

    The bytes go to ``<dest>.part``; a later call (or a retry after a dropped connection)
    asks the server for the rest with an HTTP ``Range`` request and appends, or starts over
    when the server answers with the whole file. Once complete, the size and the MD5 (where
    given) are checked and the file is renamed to ``dest``. A file that fails the check is
    deleted and :class:`DownloadError` is raised. An existing ``dest`` that passes the checks
    is not downloaded again.

    When the server cannot be reached at all (the name does not resolve, the connection is
    refused, no route) on the first try, :class:`UnreachableError` is raised at once: offline,
    retrying would only wait. Everything else is retried (``retries`` times, with back-off,
    resuming): a transfer that broke off, a timeout, a reset, an HTTP 5xx answer.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if dest.is_file():
        _verify(dest, md5, size, log)
        log(f"{dest} already downloaded and verified")
        return dest
    attempt = 0
    while True:
        have = part.stat().st_size if part.is_file() else 0
        req = urllib.request.Request(url, headers={"User-Agent": "torch-dacl-get-data"})
        if have:
            req.add_header("Range", f"bytes={have}-")
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have and (size is None or have >= size):
                break  # nothing left to fetch: the part file is complete (checked below)
            if e.code == 416:
                part.unlink()  # the part file is longer than the remote file: start over
            elif e.code < 500:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            attempt += 1  # 5xx: the server is there but failed this time
            if attempt > retries:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason} after {retries} retries") from e
            time.sleep(min(2.0 ** attempt, 30.0))
            continue
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            where = urllib.parse.urlsplit(url).netloc or url
            if _offline(reason) and attempt == 0 and not have:
                # no network, or no such server: retrying would only wait
                raise UnreachableError(f"cannot reach {where} ({type(reason).__name__}: {reason})") from e
            attempt += 1  # a timeout, a reset, or a resume that failed to connect: retry
            if attempt > retries:
                raise DownloadError(f"{url}: {type(reason).__name__}: {reason} after {retries} retries"
                                    + (f"; {have} bytes kept in {part}, run the command again to resume" if have
                                       else "")) from e
            log(f"no answer from {where} ({reason!r}); retrying ({attempt}/{retries})")
            time.sleep(min(2.0 ** attempt, 30.0))
            continue
        try:
            with resp:
                status = resp.status
                if have and status == 206:
                    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != have:
                        raise DownloadError(f"{url}: the server resumed at the wrong offset "
                                            f"({resp.headers.get('Content-Range')!r}, expected {have})")
                    mode = "ab"
                    log(f"resuming {dest.name} at {have} bytes")
                else:  # 200: the whole file (the server ignores or refused the range)
                    if have:
                        log(f"the server does not resume; downloading {dest.name} from the start")
                    have, mode = 0, "wb"
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else size
                with open(part, mode) as f, _bar(total, have, dest.name, progress) as bar:
                    for block in iter(lambda: resp.read(chunk), b""):
                        f.write(block)
                        bar.update(len(block))
                if length is not None and part.stat().st_size < total:
                    raise http.client.IncompleteRead(b"", total - part.stat().st_size)
            break
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
                TimeoutError) as e:  # the transfer started and broke off: retry, resuming
            attempt += 1
            got = part.stat().st_size if part.is_file() else 0
            if not got:
                part.unlink(missing_ok=True)
            kept = (f"{got} bytes kept in {part}, run the command again to resume" if got
                    else "nothing was kept")
            if attempt > retries:
                raise DownloadError(f"{url}: {e!r} after {retries} retries; {kept}") from e
            log(f"transfer interrupted at {got} bytes ({e!r}); retrying ({attempt}/{retries})")
            time.sleep(min(2.0 ** attempt, 30.0) if attempt > 1 else 0.0)
    try:
        _verify(part, md5, size, log)
    except DownloadError:
        part.unlink()
        raise
    part.replace(dest)
    return dest


def _offline(reason: BaseException) -> bool:
    """An error that says the server cannot be reached from here at all: the name does not
    resolve, the connection is refused, or there is no route (a timeout is not one of them)."""
    import errno

    return isinstance(reason, (socket.gaierror, ConnectionRefusedError)) or \
        getattr(reason, "errno", None) in (errno.ENETUNREACH, errno.EHOSTUNREACH)


def _verify(path: Path, md5: Optional[str], size: Optional[int], log: Callable[[str], None]) -> None:
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        raise DownloadError(f"{path}: {got_size} bytes, expected {size}; the file was deleted, run the command "
                            f"again to download it anew")
    if md5 is not None:
        log(f"checking the MD5 of {path.name} ...")
        got = md5sum(path)
        if got != md5:
            raise DownloadError(f"{path}: MD5 {got} does not match the published {md5} (a corrupt or different "
                                f"file); it was deleted, run the command again to download it anew")


# ----------------------------------------------------------------------------- archive access
class _Tree:
    """Uniform read access to a zip archive or an unpacked folder."""

    def __init__(self, source: Path):
        self.source = Path(source)
        if self.source.is_dir():
            self.zip = None
            self.names = sorted(p.relative_to(self.source).as_posix() for p in self.source.rglob("*") if p.is_file())
        elif zipfile.is_zipfile(self.source):
            self.zip = zipfile.ZipFile(self.source)
            self.names = sorted(n for n in self.zip.namelist() if not n.endswith("/"))
        else:
            raise ArchiveError(f"{str(self.source)!r} is neither a zip archive nor a folder")

    def read(self, name: str) -> bytes:
        try:
            if self.zip is not None:
                return self.zip.read(name)  # checks the member's CRC
            return (self.source / name).read_bytes()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ArchiveError(f"{str(self.source)!r}: cannot read {name!r} ({e}); the archive is damaged, "
                               f"delete it and download it again") from e

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _load_nifti(data: bytes):
    import nibabel as nib

    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return nib.Nifti1Image.from_bytes(data)


@contextlib.contextmanager
def _staged(out_dir: Path):
    """A fresh sibling folder to prepare into: renamed onto ``out_dir`` when the block completes,
    removed when it raises (a half-finished preparation never looks like usable data)."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)


# ----------------------------------------------------------------------------- ACDC
_ACDC_FILE = re.compile(r"(?:^|/)training/(patient\d{3})/(patient\d{3})_frame(\d{2})(_gt)?\.nii(?:\.gz)?$")
_ACDC_INFO = re.compile(r"(?:^|/)training/(patient\d{3})/Info\.cfg$")


def read_lists(splits_dir: Path) -> Dict[str, List[str]]:
    out = {}
    for name in ACDC_LISTS:
        path = Path(splits_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"split list {str(path)!r} is missing")
        out[name] = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    return out


def _acdc_index(tree: _Tree) -> Tuple[Dict[str, Dict[int, Dict[str, str]]], Dict[str, str]]:
    frames: Dict[str, Dict[int, Dict[str, str]]] = {}
    infos: Dict[str, str] = {}
    for name in tree.names:
        m = _ACDC_FILE.search(name)
        if m and m.group(1) == m.group(2):
            kind = "gt" if m.group(4) else "image"
            frames.setdefault(m.group(1), {}).setdefault(int(m.group(3)), {})[kind] = name
            continue
        m = _ACDC_INFO.search(name)
        if m:
            infos[m.group(1)] = name
    return frames, infos


def _ed_es(info_text: str) -> Tuple[int, int]:
    vals = dict(re.findall(r"^\s*(ED|ES)\s*:\s*(\d+)", info_text, flags=re.M))
    if "ED" not in vals or "ES" not in vals:
        raise ArchiveError("Info.cfg has no ED / ES line")
    return int(vals["ED"]), int(vals["ES"])


def acdc_volume_arrays(image_nii, label_nii) -> Tuple[np.ndarray, np.ndarray]:
    """``(image float32 in [0, 1], label uint8)``, both ``(slices, H, W)``, from the NIfTI pair.

    The NIfTI arrays are ``(X, Y, Z)``; the SSL4MIS layout stores ``(Z, Y, X)`` (the order
    SimpleITK reads). The image is min-max normalised over the whole volume.
    """
    image = np.asarray(image_nii.dataobj, dtype=np.float32).transpose(2, 1, 0)
    label = np.rint(np.asarray(label_nii.dataobj)).astype(np.uint8).transpose(2, 1, 0)
    if image.shape != label.shape:
        raise ArchiveError(f"image {image.shape} and label {label.shape} differ in shape")
    if label.max() > 3:
        raise ArchiveError(f"label values {np.unique(label).tolist()} outside 0..3")
    lo, hi = float(image.min()), float(image.max())
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("label", data=label)


def prepare_acdc(source: Path, out_dir: Path, splits_dir: Optional[Path] = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> Dict[str, int]:
    """Convert the official ACDC release (zip or unpacked folder) into the SSL4MIS layout.

    ``splits_dir`` holds the four lists (default ``examples/splits/acdc``). Writes
    ``out_dir/{train_slices.list, train.list, val.list, test.list}`` and
    ``out_dir/data/*.h5``: every volume of the lists, and the slices of the training volumes.
    Raises :class:`ArchiveError` when a patient of the lists, one of its two annotated frames
    or its ``Info.cfg`` is missing, or when the slices do not match ``train_slices.list``.
    Returns the counts written.
    """
    from tqdm import tqdm

    splits_dir = Path(splits_dir) if splits_dir is not None else SPLITS_DIR / "acdc"
    lists = read_lists(splits_dir)
    volumes = list(dict.fromkeys(lists["train.list"] + lists["val.list"] + lists["test.list"]))
    patients = sorted({v.split("_")[0] for v in volumes})
    tree = _Tree(source)
    try:
        frames, infos = _acdc_index(tree)
        missing = [p for p in patients if p not in frames or p not in infos]
        if missing:
            raise ArchiveError(
                f"{str(source)!r} is not the official ACDC release: {len(missing)} patient(s) of the split "
                f"missing (first: {missing[0]}; expected database/training/<patient>/ with Info.cfg and "
                f"<patient>_frameXX.nii.gz / _frameXX_gt.nii.gz)")
        with _staged(Path(out_dir)) as tmp:
            (tmp / "data").mkdir()
            train_volumes = set(lists["train.list"])
            written_slices: List[str] = []
            n_volumes = 0
            for patient in tqdm(patients, desc="ACDC", disable=not progress, dynamic_ncols=True):
                ed, es = _ed_es(tree.read(infos[patient]).decode("utf-8", "replace"))
                for tag, frame in (("frame01", ed), ("frame02", es)):
                    pair = frames[patient].get(frame, {})
                    if "image" not in pair or "gt" not in pair:
                        raise ArchiveError(f"{str(source)!r}: {patient} frame {frame:02d} (Info.cfg) lacks its image or "
                                           f"its _gt file")
                    name = f"{patient}_{tag}"
                    if name not in volumes:
                        continue
                    try:
                        image, label = acdc_volume_arrays(_load_nifti(tree.read(pair["image"])),
                                                          _load_nifti(tree.read(pair["gt"])))
                    except ArchiveError as e:
                        raise ArchiveError(f"{str(source)!r}: {name}: {e}") from e
                    except Exception as e:  # a NIfTI that nibabel cannot parse
                        raise ArchiveError(f"{str(source)!r}: {name}: unreadable NIfTI ({e})") from e
                    _write_h5(tmp / "data" / f"{name}.h5", image, label)
                    n_volumes += 1
                    if name in train_volumes:
                        for z in range(image.shape[0]):
                            _write_h5(tmp / "data" / f"{name}_slice_{z + 1}.h5", image[z], label[z])
                            written_slices.append(f"{name}_slice_{z + 1}")
            absent = sorted(set(lists["train_slices.list"]) - set(written_slices))
            if absent:
                raise ArchiveError(f"{str(source)!r}: {len(absent)} slice(s) of train_slices.list do not exist in the "
                                   f"volumes (first: {absent[0]}); not the official ACDC release")
            for name in ACDC_LISTS:
                shutil.copyfile(Path(splits_dir) / name, tmp / name)
    finally:
        tree.close()
    counts = {"patients": len(patients), "volumes": n_volumes, "slices": len(written_slices)}
    log(f"ACDC prepared in {out_dir}: {counts['patients']} patients, {counts['volumes']} volumes, "
        f"{counts['slices']} training slices")
    return counts


# ----------------------------------------------------------------------------- CHAOS
_CHAOS_DCM = re.compile(r"(?:^|/)MR/(\d+)/T2SPIR/DICOM_anon/([^/]+)\.dcm$", re.I)
_CHAOS_PNG = re.compile(r"(?:^|/)MR/(\d+)/T2SPIR/Ground/([^/]+)\.png$", re.I)


def _chaos_index(tree: _Tree) -> Dict[str, Dict[str, Dict[str, str]]]:
    cases: Dict[str, Dict[str, Dict[str, str]]] = {}
    for name in tree.names:
        for kind, rx in (("dcm", _CHAOS_DCM), ("png", _CHAOS_PNG)):
            m = rx.search(name)
            if m:
                cases.setdefault(m.group(1), {"dcm": {}, "png": {}})[kind][m.group(2)] = name
    return cases


def png_to_label(png: np.ndarray) -> np.ndarray:
    """CHAOS MR ground-truth intensities -> 0 background, 1 liver, 2 R kidney, 3 L kidney, 4 spleen."""
    png = np.asarray(png)
    if png.ndim == 3:
        png = png[..., 0]
    out = np.zeros(png.shape, np.uint8)
    for value, lo, hi in CHAOS_LABEL_RANGES:
        out[(png >= lo) & (png <= hi)] = value
    return out


def chaos_series(tree: _Tree, case: Dict[str, Dict[str, str]]):
    """One T2-SPIR series as a NIfTI image pair (float32 image, uint8 label) in L-A-S order.

    Slices are ordered along the slice normal by ``ImagePositionPatient``; the affine is the
    one the DICOM geometry gives (LPS turned into NIfTI's RAS), then reoriented to L-A-S.
    """
    import nibabel as nib
    import pydicom
    from PIL import Image

    slices = []
    for stem, name in case["dcm"].items():
        ds = pydicom.dcmread(io.BytesIO(tree.read(name)))
        if stem not in case["png"]:
            raise ArchiveError(f"{name}: no ground-truth PNG {stem}.png")
        label = png_to_label(np.asarray(Image.open(io.BytesIO(tree.read(case["png"][stem])))))
        pixels = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1) \
            + float(getattr(ds, "RescaleIntercept", 0) or 0)
        if label.shape != pixels.shape:
            raise ArchiveError(f"{name}: image {pixels.shape} and ground truth {label.shape} differ in shape")
        slices.append((ds, pixels, label))
    iop = np.array([float(v) for v in slices[0][0].ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]  # direction of increasing column index / row index
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(np.dot(normal, [float(v) for v in s[0].ImagePositionPatient])))
    first, last = slices[0][0], slices[-1][0]
    p0 = np.array([float(v) for v in first.ImagePositionPatient])
    if len(slices) > 1:
        step = (np.array([float(v) for v in last.ImagePositionPatient]) - p0) / (len(slices) - 1)
    else:
        step = normal * float(getattr(first, "SpacingBetweenSlices", None) or first.SliceThickness)
    dy, dx = (float(v) for v in first.PixelSpacing)  # row spacing, column spacing
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * dx, col_dir * dy, step, p0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    # arrays (rows, cols) per slice -> NIfTI (i = column, j = row, k = slice)
    image = np.stack([s[1].T for s in slices], axis=-1)
    label = np.stack([s[2].T for s in slices], axis=-1)
    target = nib.orientations.axcodes2ornt(("L", "A", "S"))
    xform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), target)
    img = nib.Nifti1Image(image.astype(np.float32), affine).as_reoriented(xform)
    lab = nib.Nifti1Image(label.astype(np.uint8), affine).as_reoriented(xform)
    return img, lab


def resample_las(img, lab, spacing: Sequence[float] = CHAOS_SPACING, inplane: int = CHAOS_INPLANE):
    """Resample an L-A-S pair to ``spacing`` (linear for the image, nearest for the label) and
    centre-crop / zero-pad the in-plane axes to ``inplane`` x ``inplane``."""
    import nibabel as nib
    from scipy import ndimage

    zooms = np.array(img.header.get_zooms()[:3], dtype=np.float64)
    ratio = np.asarray(spacing, dtype=np.float64) / zooms  # old voxels per new voxel
    image = np.asarray(img.dataobj, dtype=np.float32)
    label = np.asarray(lab.dataobj, dtype=np.uint8)
    shape = tuple(max(1, int(round(n / r))) for n, r in zip(image.shape, ratio))
    # new voxel i sits at old voxel (i + 0.5) * ratio - 0.5: the two grids share their outer corner
    offset = 0.5 * ratio - 0.5
    image = ndimage.affine_transform(image, ratio, offset=offset, output_shape=shape, order=1, mode="nearest")
    label = ndimage.affine_transform(label, ratio, offset=offset, output_shape=shape, order=0, mode="nearest")
    affine = img.affine.copy()
    affine[:3, :3] = img.affine[:3, :3] * ratio[None, :]
    affine[:3, 3] = img.affine[:3, 3] + img.affine[:3, :3] @ offset
    out_img = np.zeros((inplane, inplane, image.shape[2]), np.float32)
    out_lab = np.zeros((inplane, inplane, image.shape[2]), np.uint8)
    src, dst, offset = [], [], np.zeros(3)
    for ax in (0, 1):
        n = image.shape[ax]
        if n >= inplane:
            a = (n - inplane) // 2
            src.append(slice(a, a + inplane))
            dst.append(slice(0, inplane))
            offset[ax] = a
        else:
            a = (inplane - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
            offset[ax] = -a
    out_img[dst[0], dst[1]] = image[src[0], src[1]]
    out_lab[dst[0], dst[1]] = label[src[0], src[1]]
    affine[:3, 3] = affine[:3, 3] + affine[:3, :3] @ offset
    return nib.Nifti1Image(out_img, affine), nib.Nifti1Image(out_lab, affine)


def prepare_chaos(source: Path, out_dir: Path, ids: Optional[Sequence[str]] = None, resample: bool = True,
                  progress: bool = True, log: Callable[[str], None] = print) -> Dict[str, int]:
    """Convert the CHAOS training release (zip or unpacked ``Train_Sets`` folder): each MR
    T2-SPIR series of ``ids`` (default: all 20) becomes ``image_<id>.nii.gz`` /
    ``label_<id>.nii.gz``.

    Raises :class:`ArchiveError` when a case of ``ids`` is missing or a DICOM slice has no
    ground-truth PNG. Returns the counts written.
    """
    import nibabel as nib
    from tqdm import tqdm

    ids = tuple(CHAOS_MR_IDS if ids is None else ids)
    tree = _Tree(source)
    try:
        cases = _chaos_index(tree)
        missing = [i for i in ids if i not in cases or not cases[i]["dcm"]]
        if missing:
            raise ArchiveError(
                f"{str(source)!r} is not the official CHAOS training release: MR case(s) {missing} missing "
                f"(expected Train_Sets/MR/<id>/T2SPIR/DICOM_anon/*.dcm and T2SPIR/Ground/*.png)")
        with _staged(Path(out_dir)) as tmp:
            n_slices = 0
            for cid in tqdm(list(ids), desc="CHAOS T2-SPIR", disable=not progress, dynamic_ncols=True):
                img, lab = chaos_series(tree, cases[cid])
                if resample:
                    img, lab = resample_las(img, lab)
                nib.save(img, str(tmp / f"image_{cid}.nii.gz"))
                nib.save(lab, str(tmp / f"label_{cid}.nii.gz"))
                n_slices += img.shape[2]
    finally:
        tree.close()
    counts = {"volumes": len(ids), "slices": n_slices}
    log(f"CHAOS-T2 prepared in {out_dir}: {counts['volumes']} volumes, {counts['slices']} slices")
    return counts


# ----------------------------------------------------------------------------- command line
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("dataset", choices=sorted(SOURCES), help="which dataset")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache folder (default: $TORCH_DACL_CACHE, else ~/.cache/torch-dacl); the archive goes to "
                        "<cache>/downloads, the prepared data to <cache>/data")
    p.add_argument("--url", default=None, help="download from this mirror of the pinned file instead (default: "
                   "$TORCH_DACL_MIRROR/<file name> if set, else the official source)")
    p.add_argument("--archive", type=Path, default=None,
                   help="prepare this archive (or unpacked folder) instead of downloading")
    p.add_argument("--force", action="store_true", help="prepare again even if the prepared data exist")
    p.add_argument("--keep-archive", dest="keep_archive", action="store_true", default=True,
                   help="keep the downloaded archive (default)")
    p.add_argument("--delete-archive", dest="keep_archive", action="store_false",
                   help="delete the downloaded archive once the data are prepared")
    p.add_argument("--native", action="store_true", help="chaos: keep the scanner geometry (no resampling)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def archive_url(dataset: str, url: Optional[str] = None) -> str:
    """``url``, else ``$TORCH_DACL_MIRROR/<file name>``, else the official source."""
    mirror = os.environ.get("TORCH_DACL_MIRROR")
    src = SOURCES[dataset]
    return url or (f"{mirror.rstrip('/')}/{src.filename}" if mirror else src.url)


def fetch(dataset: str, *, cache: Optional[Path] = None, url: Optional[str] = None, archive: Optional[Path] = None,
          force: bool = False, native: bool = False, keep_archive: bool = True, progress: bool = True,
          reason: Optional[str] = None, log: Callable[[str], None] = print) -> Path:
    """Download (or take ``archive``), verify and prepare ``dataset`` into ``<cache>/data``;
    returns the prepared folder. Before downloading it says what it fetches, how large it is
    and where it goes (``reason``: why, e.g. the examples found no data). Download errors
    carry the manual route (:func:`manual_route`)."""
    src = SOURCES[dataset]
    cache = Path(cache or cache_dir()).expanduser()
    out_dir = cache / "data" / DATASET_DIRS[dataset]
    if out_dir.is_dir() and not force:
        log(f"{out_dir} exists; nothing to do (--force prepares it again)")
        return out_dir
    if archive is not None:
        archive = Path(archive).expanduser()
        if not archive.exists():
            raise DownloadError(f"--archive {str(archive)!r} does not exist")
    else:
        url = archive_url(dataset, url)
        archive = cache / "downloads" / src.filename
        size = f"{src.size:,} bytes ({src.size / 2 ** 20:.0f} MiB)" if src.size else "not published"
        log("\n".join(([f"{reason}: downloading it now (--no-download refuses)"] if reason else []) + [
            f"downloading {dataset}: {src.what}",
            f"  from  {url}", f"  size  {size}", f"  into  {archive}, prepared into {out_dir}",
            f"  check {'MD5 ' + src.md5 if src.md5 else 'archive structure'} ({src.provenance})"]))
        try:
            download(url, archive, md5=src.md5, size=src.size, progress=progress, log=log)
        except DownloadError as e:
            raise type(e)(f"{e}; {manual_route(dataset)}") from e
    if dataset == "acdc":
        prepare_acdc(archive, out_dir, progress=progress, log=log)
    else:
        prepare_chaos(archive, out_dir, resample=not native, progress=progress, log=log)
    if not keep_archive and archive.parent == cache / "downloads":
        archive.unlink()
    log(f"done: the examples find it in {out_dir.parent} (the default data root; or pass --data-root "
        f"{out_dir.parent})")
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    return fetch(args.dataset, cache=args.cache, url=args.url, archive=args.archive, force=args.force,
                 native=args.native, keep_archive=args.keep_archive, progress=not args.no_progress)


if __name__ == "__main__":
    try:
        main()
    except (DownloadError, ArchiveError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; run the same command again to resume the download")
