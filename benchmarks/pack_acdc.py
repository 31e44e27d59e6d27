"""Pack the ACDC data (SSL4MIS layout) small enough to travel with a GPU job, and unpack it.

``pack`` writes one ``acdc_pack.npz.xz``: every file of the split lists (training slices,
val and test volumes) with images quantised to uint8 (ACDC's images lie in [0, 1]; an error of
at most 1/510 per pixel) and uint8 labels, xz-compressed: about 53 MiB for the whole of ACDC.
Measured alternatives: the h5 files as they are, 130 MiB; float16 h5 with gzip 9, 110 MiB;
uint8 h5 with gzip 9, 72 MiB; a uint8 npz with zip deflate, 63 MiB. ``unpack`` recreates the
SSL4MIS layout (``ACDC/data/*.h5`` with float32 images in [0, 1], the four lists), which the
ACDC example reads as usual.

Example::

    python benchmarks/pack_acdc.py pack --out .devdata          # .devdata/acdc_pack.npz.xz
    python benchmarks/pack_acdc.py unpack .devdata/acdc_pack.npz.xz --out /tmp/data   # /tmp/data/ACDC
"""

from __future__ import annotations

import argparse
import io
import lzma
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
from _cli import float_range, int_range  # noqa: E402
LISTS = ("train_slices.list", "train.list", "val.list", "test.list")


def pack(src: Path, dst: Path, limit: Optional[int] = None) -> Path:
    """Write ``dst/acdc_pack.npz.xz`` from the ACDC folder ``src`` (``limit``: at most that many
    files of each list, for tests)."""
    import h5py

    lists = {n: [ln.strip() for ln in (src / n).read_text().splitlines() if ln.strip()]
             for n in LISTS if (src / n).is_file()}  # train.list (volumes) is not read by the examples
    if limit:
        lists = {n: v[:limit] for n, v in lists.items()}
    arrays: Dict[str, np.ndarray] = {}
    for n in ("train_slices.list", "val.list", "test.list"):
        for name in lists.get(n, []):
            with h5py.File(src / "data" / f"{name}.h5", "r") as f:
                image, label = np.asarray(f["image"][()], dtype=np.float64), np.asarray(f["label"][()])
            arrays[f"{name}/image"] = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
            arrays[f"{name}/label"] = label.astype(np.uint8)
    for n, v in lists.items():
        arrays[f"list/{n}"] = np.array(v)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    dst.mkdir(parents=True, exist_ok=True)
    out = dst / "acdc_pack.npz.xz"
    out.write_bytes(lzma.compress(buf.getvalue(), preset=6))
    return out


def unpack(pack_file: Path, dst: Path) -> Path:
    """Recreate ``dst/ACDC`` (SSL4MIS layout, float32 images) from a pack; returns that folder."""
    import h5py

    data = np.load(io.BytesIO(lzma.decompress(Path(pack_file).read_bytes())))
    acdc = dst / "ACDC"
    (acdc / "data").mkdir(parents=True, exist_ok=True)
    for key in data.files:
        if key.startswith("list/"):
            (acdc / key[5:]).write_text("\n".join(data[key].tolist()) + "\n")
        elif key.endswith("/image"):
            name = key[: -len("/image")]
            with h5py.File(acdc / "data" / f"{name}.h5", "w") as f:
                f.create_dataset("image", data=data[key].astype(np.float32) / 255.0, compression="gzip")
                f.create_dataset("label", data=data[f"{name}/label"], compression="gzip")
    return acdc


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="write <out>/acdc_pack.npz.xz")
    a.add_argument("--data-root", default=None, help="folder holding ACDC/ (the examples' lookup by default)")
    a.add_argument("--out", type=Path, default=REPO / ".devdata")
    a.add_argument("--limit", type=int_range(1), default=None, help="at most this many files per list (tests)")
    a.add_argument("--max-mib", type=float_range(0, lo_open=True), default=56.0, help="fail above this size (the device's tree limit)")
    b = sub.add_parser("unpack", help="recreate <out>/ACDC from a pack")
    b.add_argument("pack", type=Path)
    b.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.cmd == "unpack":
        print(f"unpacked {unpack(args.pack, args.out)}")
        return 0
    from _data import resolve_data_root
    from acdc_data import find_acdc_dir

    src = find_acdc_dir(resolve_data_root(args.data_root))
    out = pack(src, args.out, args.limit)
    mib = out.stat().st_size / 2**20
    print(f"packed {src} -> {out}: {mib:.1f} MiB")
    if mib > args.max_mib:
        print(f"error: {mib:.1f} MiB > --max-mib {args.max_mib}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
