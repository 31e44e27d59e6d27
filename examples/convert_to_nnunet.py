#!/usr/bin/env python
"""Convert the datasets the 3D example knows by name into nnU-Net's raw format.

After conversion a dataset is one more nnU-Net raw folder: both examples read it with
``--dataset-dir`` like any user's own dataset (``nnunet_data``), with no class list or
file naming of its own in the training code. Each conversion also writes ``split.json``
beside ``dataset.json``: the project's fixed split (``examples/splits/``) with the case
ids renamed, which the examples use by default, so that a converted dataset trains on the
same cases as the named one (``--labeled 2`` / ``4`` pick the same labeled sets).

::

    python examples/get_data.py chaos   &&  python examples/convert_to_nnunet.py chaos ~/.cache/torch-dacl/data/CHAOS-T2 data/Dataset501_CHAOS_T2
    python examples/convert_to_nnunet.py btcv /data/Synapse/RawData/Training data/Dataset502_BTCV
    python examples/convert_to_nnunet.py dhc_npy /data/synapse_data data/Dataset503_BTCV_DHC
    python examples/synapse_cps_dacl.py --dataset-dir data/Dataset501_CHAOS_T2 --preset smoke --labeled 2

* ``chaos``: ``image_<id>.nii.gz`` / ``label_<id>.nii.gz`` (CHAOS-T2, SSL-ALPNet
  preprocessing) -> ``CHAOS_<id, 3 digits>``; one channel ``T2`` (z-scored per image); the
  images are copied unchanged, the labels stored as uint8.
* ``btcv``: ``img/imgXXXX.nii.gz`` / ``label/labelXXXX.nii.gz`` -> ``BTCV_XXXX``; channel
  ``CT`` (nnU-Net's CT normalisation); copied unchanged.
* ``dhc_npy``: ``npy/XXXX_image.npy`` / ``_label.npy`` (DHC's resized ``(Z, Y, X)`` HU
  arrays) -> ``BTCV_XXXX`` NIfTI files with spacing 1 mm (the npy files carry none);
  channel ``CT``.

The preprocessing differs from the named datasets' (``synapse_data``): nnU-Net-style
normalisation and resampling (see ``nnunet_data``) instead of DHC's HU window and fixed
resize or CHAOS's percentile min-max and zoom.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synapse_data as sd  # noqa: E402

__all__ = ["chaos_case_id", "chaos_source_id", "btcv_case_id", "converted_split", "convert", "main"]


def chaos_case_id(source_id: str) -> str:
    """``"36"`` -> ``"CHAOS_036"``."""
    return f"CHAOS_{int(source_id):03d}"


def chaos_source_id(case_id: str) -> str:
    """``"CHAOS_036"`` -> ``"36"`` (the id of ``examples/splits/chaos_t2.json``)."""
    return str(int(case_id.rsplit("_", 1)[1]))


def btcv_case_id(source_id: str) -> str:
    """``"0001"`` -> ``"BTCV_0001"``."""
    return f"BTCV_{source_id}"


SPLITS = {"chaos": ("chaos_t2", chaos_case_id), "btcv": ("synapse_dhc", btcv_case_id),
          "dhc_npy": ("synapse_dhc", btcv_case_id)}


def converted_split(kind: str, keep: Optional[Sequence[str]] = None) -> dict:
    """The fixed split of ``kind`` with the converted case ids (train in its fixed order,
    ``labeled_N`` sets, ``labeled`` = the 4-labeled set, the default of the named dataset).
    ``keep``: converted ids to keep (a partial conversion)."""
    name, rename = SPLITS[kind]
    with open(sd.SPLITS_DIR / f"{name}.json") as f:
        s = json.load(f)
    out: Dict[str, object] = {"how": f"examples/splits/{name}.json with ids renamed ({kind}): " + s.get("how", "")}
    for k, v in s.items():
        if k in ("train", "val", "test") or k.startswith("labeled_"):
            ids = [rename(i) for i in v]
            out[k] = [i for i in ids if keep is None or i in keep]
    out["labeled"] = list(out["labeled_4"])
    return out


def _save_label(src: Path, dst: Path) -> None:
    import nibabel as nib

    img = nib.load(str(src))
    lab = np.rint(np.asanyarray(img.dataobj)).astype(np.uint8)
    hdr = img.header.copy()
    hdr.set_data_dtype(np.uint8)
    nib.save(nib.Nifti1Image(lab, img.affine, hdr), str(dst))


def _save_npy(arr_zyx: np.ndarray, dst: Path, dtype) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr_zyx.transpose(2, 1, 0)).astype(dtype), np.eye(4)), str(dst))


def convert(kind: str, src: Path, dst: Path, cases: Optional[Sequence[str]] = None, overwrite: bool = False) -> Path:
    """Convert ``src`` (a ``kind`` dataset) into the nnU-Net raw folder ``dst``; returns ``dst``."""
    src, dst = Path(src), Path(dst)
    if kind not in SPLITS:
        raise ValueError(f"kind: expected one of {sorted(SPLITS)}, got {kind!r}")
    if not src.is_dir():
        raise SystemExit(f"error: source folder {src} does not exist")
    if (dst / "dataset.json").exists() and not overwrite:
        raise SystemExit(f"error: {dst} already holds a dataset (dataset.json); pass --overwrite to replace it")
    if kind == "chaos":
        ids = sd.list_generic_cases(src)
    elif kind == "btcv":
        ids = sd.list_btcv_cases(src)
    else:
        ids = sd.list_dhc_npy_cases(src)
    if cases:
        missing = [c for c in cases if c not in ids]
        if missing:
            raise SystemExit(f"error: case(s) {missing} not found in {src}")
        ids = [i for i in ids if i in cases]
    if not ids:
        raise SystemExit(f"error: no {kind} case found in {src}")
    (dst / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dst / "labelsTr").mkdir(parents=True, exist_ok=True)
    name, rename = SPLITS[kind]
    with open(sd.SPLITS_DIR / f"{name}.json") as f:
        classes: List[str] = json.load(f)["classes"]
    done = []
    for i in ids:
        cid = rename(i)
        img_dst, lab_dst = dst / "imagesTr" / f"{cid}_0000.nii.gz", dst / "labelsTr" / f"{cid}.nii.gz"
        if kind == "chaos":
            shutil.copyfile(src / f"image_{i}.nii.gz", img_dst)
            _save_label(src / f"label_{i}.nii.gz", lab_dst)
        elif kind == "btcv":
            shutil.copyfile(src / "img" / f"img{i}.nii.gz", img_dst)
            _save_label(src / "label" / f"label{i}.nii.gz", lab_dst)
        else:
            _save_npy(np.load(src / "npy" / f"{i}_image.npy"), img_dst, np.float32)
            _save_npy(np.load(src / "npy" / f"{i}_label.npy"), lab_dst, np.uint8)
        done.append(cid)
    ds = {"channel_names": {"0": "T2" if kind == "chaos" else "CT"},
          "labels": {c: k for k, c in enumerate(classes)}, "numTraining": len(done), "file_ending": ".nii.gz",
          "name": {"chaos": "CHAOS_T2", "btcv": "BTCV", "dhc_npy": "BTCV_DHC"}[kind],
          "description": f"converted by examples/convert_to_nnunet.py {kind} from {src}"}
    (dst / "dataset.json").write_text(json.dumps(ds, indent=1))
    (dst / "split.json").write_text(json.dumps(converted_split(kind, None if cases is None else set(done)), indent=1))
    return dst


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=sorted(SPLITS))
    p.add_argument("src", type=Path, help="the dataset folder in its own layout")
    p.add_argument("dst", type=Path, help="the nnU-Net raw folder to write (e.g. Dataset501_CHAOS_T2)")
    p.add_argument("--cases", nargs="+", default=None, help="convert only these source ids (a quick test)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out = convert(args.kind, args.src, args.dst, args.cases, args.overwrite)
    n = len(list((out / "labelsTr").glob("*.nii.gz")))
    print(f"wrote {out}: {n} cases, dataset.json, split.json; train with\n"
          f"  python examples/synapse_cps_dacl.py --dataset-dir {out} --preset smoke")
    return out


if __name__ == "__main__":
    main()
