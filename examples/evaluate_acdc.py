"""Evaluate an ACDC segmenter on val/test volumes: 3D Dice, Jaccard, HD95, ASD (medpy).

Protocol (see docs: Design decisions, 4): each volume is predicted slice by slice (every slice resized
to the training input size, predicted, the logits resized back to the slice's original size
bilinearly, then argmax); per volume and per class 1..3 (RV, Myo, LV) the 3D metrics are
computed with ``medpy.metric.binary`` in voxel units (no spacing); the mean is taken over
volumes, then over classes.

Empty masks (medpy is undefined there; SSL4MIS returns 0 for every metric, which rewards
an empty prediction with a perfect HD95 / ASD). Our convention, recorded in the JSON:

* prediction and ground truth both empty: Dice = Jaccard = 1, HD95 = ASD = 0;
* exactly one of them empty: Dice = Jaccard = 0, HD95 = ASD = the volume's diagonal in
  voxels, ``sqrt(Z^2 + H^2 + W^2)`` (the largest possible distance: a worst-case penalty).

The number of such cases is reported (``empty_cases``).

Standalone use on a checkpoint written by ``acdc_cps_dacl.py``::

    python examples/evaluate_acdc.py runs/acdc_dacl_quick_seed0/best.pt --split test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see acdc_cps_dacl.py; before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from acdc_data import CLASS_NAMES, NUM_CLASSES, ACDCVolumes, find_acdc_dir, resolve_data_root  # noqa: E402
from acdc_model import build_wrapper, predict_logits  # noqa: E402

__all__ = ["case_metrics", "predict_volume", "evaluate", "format_table", "EMPTY_CONVENTION"]

METRICS = ("dice", "jaccard", "hd95", "asd")
EMPTY_CONVENTION = ("both empty: dice=jaccard=1, hd95=asd=0; exactly one empty: dice=jaccard=0, "
                    "hd95=asd=volume diagonal in voxels (worst case)")


def case_metrics(pred: np.ndarray, gt: np.ndarray, full: bool = True, num_classes: int = NUM_CLASSES
                 ) -> Dict[str, object]:
    """Per-class metrics of one volume. ``pred``, ``gt``: ``(Z, H, W)`` int label maps.

    Returns ``{"dice": [c1, c2, c3], "jaccard": [...], "hd95": [...], "asd": [...],
    "empty": int}`` (only ``dice`` and ``empty`` when ``full`` is False); one entry per class
    ``1..num_classes-1``.
    """
    from medpy.metric import binary as mb

    diag = float(math.sqrt(sum(s * s for s in gt.shape)))
    res: Dict[str, list] = {m: [] for m in (METRICS if full else ("dice",))}
    empty = 0
    for c in range(1, num_classes):
        p, g = pred == c, gt == c
        ps, gs = bool(p.any()), bool(g.any())
        if ps and gs:
            vals = {"dice": mb.dc(p, g)}
            if full:
                vals.update(jaccard=mb.jc(p, g), hd95=mb.hd95(p, g), asd=mb.asd(p, g))
        else:
            empty += 1
            both = not ps and not gs
            vals = {"dice": 1.0 if both else 0.0, "jaccard": 1.0 if both else 0.0,
                    "hd95": 0.0 if both else diag, "asd": 0.0 if both else diag}
        for m in res:
            res[m].append(float(vals[m]))
    out: Dict[str, object] = dict(res)
    out["empty"] = empty
    return out


@torch.no_grad()
def predict_volume(wrapper, image: np.ndarray, size: int, device: torch.device, which: str = "a",
                   amp_dtype: Optional[torch.dtype] = None, batch: int = 32) -> np.ndarray:
    """Predict ``image (Z, H, W)`` (or ``(Z, C, H, W)``, several channels) slice by slice at
    ``size x size``; returns ``(Z, H, W)`` int64."""
    z, h, w = image.shape[0], image.shape[-2], image.shape[-1]
    preds = []
    for s in range(0, z, batch):
        x = torch.from_numpy(np.ascontiguousarray(image[s:s + batch])).float()
        x = (x.unsqueeze(1) if x.dim() == 3 else x).to(device)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = predict_logits(wrapper, x, which)
        logits = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
        preds.append(logits.argmax(1).cpu())
    return torch.cat(preds).numpy().astype(np.int64)


def evaluate(wrapper, acdc_dir: Path, split: str, size: int, device: torch.device, which: str = "a",
             limit: Optional[int] = None, full: bool = True, amp_dtype: Optional[torch.dtype] = None,
             keep_predictions: Sequence[str] = (), progress: bool = False) -> dict:
    """Evaluate on ``split`` (``"val"`` or ``"test"``), optionally on ``limit`` evenly spaced
    volumes. Returns a JSON-ready dict (``mean``, ``per_class``, ``per_case``, ...) and, under
    the key ``"_predictions"``, the predicted volumes of the cases named in ``keep_predictions``.
    """
    was_training = wrapper.training
    wrapper.eval()
    # acdc_dir: the ACDC folder, or a prepared nnU-Net dataset (nnunet_data.Prepared: its volumes and classes)
    source = acdc_dir if hasattr(acdc_dir, "volumes") else None
    ds = source.volumes(split, limit) if source is not None else ACDCVolumes(acdc_dir, split, limit=limit)
    class_names = list(source.class_names[1:]) if source is not None else list(CLASS_NAMES)
    t0 = time.time()
    per_case: Dict[str, dict] = {}
    kept: Dict[str, dict] = {}
    it = range(len(ds))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"eval {split}", leave=False, dynamic_ncols=True)
    for i in it:
        item = ds[i]
        pred = predict_volume(wrapper, item["image"], size, device, which, amp_dtype)
        per_case[item["name"]] = case_metrics(pred, item["label"], full=full, num_classes=len(class_names) + 1)
        if item["name"] in keep_predictions:  # (the first channel of a multi-channel image)
            img = item["image"] if item["image"].ndim == 3 else item["image"][:, 0]
            kept[item["name"]] = {"image": img, "label": item["label"], "pred": pred}
    wrapper.train(was_training)
    names = list(METRICS if full else ("dice",))
    arr = {m: np.array([per_case[c][m] for c in per_case], dtype=np.float64) for m in names}  # (V, 3)
    per_class = {m: {class_names[k]: float(arr[m][:, k].mean()) for k in range(len(class_names))} for m in names}
    mean = {m: float(arr[m].mean(0).mean()) for m in names}
    std_over_cases = {m: float(arr[m].mean(1).std()) for m in names}
    return {
        "split": split,
        "num_volumes": len(ds),
        "num_volumes_in_split": len((source.volumes(split) if source is not None else ACDCVolumes(acdc_dir, split)).cases),
        "dataset": source.info.name if source is not None else "ACDC",
        "class_names": class_names,
        "cases": list(ds.cases),
        "model": which,
        "input_size": size,
        "units": "voxels (no spacing)",
        "empty_convention": EMPTY_CONVENTION,
        "empty_cases": int(sum(per_case[c]["empty"] for c in per_case)),
        "mean": mean,
        "std_over_volumes": std_over_cases,
        "per_class": per_class,
        "per_case": per_case,
        "seconds": round(time.time() - t0, 2),
        "_predictions": kept,
    }


def format_table(result: dict) -> str:
    """A plain-text table: rows RV / Myo / LV / mean, columns Dice, Jaccard, HD95, ASD."""
    names = [m for m in METRICS if m in result["mean"]]
    classes = result.get("class_names", CLASS_NAMES)
    wc = max([6] + [len(c) + 1 for c in classes])
    head = f"{'class':<{wc}}" + "".join(f"{m:>10}" for m in names)
    lines = [f"{result.get('dataset', 'ACDC')} {result['split']}: {result['num_volumes']}/{result['num_volumes_in_split']} volumes, "
             f"model {result['model']}, input {result['input_size']}", head, "-" * len(head)]
    scale = {"dice": 100.0, "jaccard": 100.0, "hd95": 1.0, "asd": 1.0}
    for cname in classes:
        lines.append(f"{cname:<{wc}}" + "".join(f"{result['per_class'][m][cname] * scale[m]:>10.2f}" for m in names))
    lines.append(f"{'mean':<{wc}}" + "".join(f"{result['mean'][m] * scale[m]:>10.2f}" for m in names))
    lines.append("(Dice, Jaccard in %; HD95, ASD in voxels)")
    return "\n".join(lines)


def strip_private(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def load_wrapper(checkpoint: Path, device: torch.device):
    """Rebuild the co-training pair of a checkpoint written by ``acdc_cps_dacl.py``."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = ckpt["config"]
    wrapper = build_wrapper(cfg)
    wrapper.load_state_dict(ckpt["model"])
    return wrapper.to(device).eval(), cfg, ckpt


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="best.pt / last.pt written by acdc_cps_dacl.py")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--limit", type=int, default=None, help="evaluate only this many evenly spaced volumes")
    p.add_argument("--model", choices=("a", "b", "ensemble"), default=None, help="default: the run's --eval-model")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", type=Path, default=None, help="JSON file (default: <checkpoint dir>/eval_<split>.json)")
    args = p.parse_args(argv)
    if not args.checkpoint.is_file():
        p.error(f"checkpoint {str(args.checkpoint)!r} does not exist")
    device = torch.device(args.device)
    wrapper, cfg, _ = load_wrapper(args.checkpoint, device)
    if cfg.get("dataset_dir"):  # a run on an nnU-Net raw folder: that folder with the run's split
        import nnunet_data

        acdc = nnunet_data.prepare(cfg["dataset_dir"], 2, args.checkpoint.parent / "split.json",
                                   slice_axis=cfg.get("slice_axis"), input_size=int(cfg["size"]))
    else:
        acdc = find_acdc_dir(resolve_data_root(args.data_root or cfg.get("data_root_arg")))
    res = evaluate(wrapper, acdc, args.split, int(cfg["size"]), device, which=args.model or cfg.get("eval_model", "a"),
                   limit=args.limit, progress=True)
    res = strip_private(res)
    res["checkpoint"] = str(args.checkpoint)
    print(format_table(res))
    out = args.output or args.checkpoint.parent / f"eval_{args.split}.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
