"""Evaluate an ACDC segmenter on val/test volumes: 3D Dice, Jaccard, HD95, ASD (medpy).

Protocol (see docs: Design decisions, 4): each volume is predicted slice by slice (every slice resized
to the training input size, predicted, the logits resized back to the slice's original size
bilinearly, then argmax); per volume and per class 1..3 (RV, Myo, LV) the 3D metrics are
computed with ``medpy.metric.binary`` in voxel units (no spacing); the mean is taken over
volumes, then over classes.

Empty masks: the convention of both examples, ``engine.case_metrics`` (both empty: Dice 1,
HD95 = ASD = 0; exactly one empty: Dice 0, HD95 = ASD = the volume's diagonal in voxels);
the record counts such cases (``empty_cases``).

Standalone use on a checkpoint written by ``acdc_cps_dacl.py``::

    python examples/evaluate_acdc.py runs/acdc_dacl_cpu_seed0/best.pt --split test
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402
from acdc_data import CLASS_NAMES, NUM_CLASSES, ACDCVolumes, find_acdc_dir, resolve_data_root  # noqa: E402
from acdc_model import build_wrapper, predict_logits  # noqa: E402
from results_schema import TestResult  # noqa: E402
from _cli import int_range  # noqa: E402

case_metrics = functools.partial(engine.case_metrics, num_classes=NUM_CLASSES)  # ACDC's 4 classes by default


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
        preds.append(logits.max(1).indices.cpu())  # (= argmax(1); 8x faster on CPU)
    return torch.cat(preds).numpy().astype(np.int64)


def evaluate(wrapper, acdc_dir: Path, split: str, size: int, device: torch.device, which: str = "a",
             limit: Optional[int] = None, full: bool = True, amp_dtype: Optional[torch.dtype] = None,
             keep_predictions: Sequence[str] = (), progress: bool = False) -> Tuple[TestResult, Dict[str, dict]]:
    """Evaluate on ``split`` (``"val"`` or ``"test"``), optionally on ``limit`` evenly spaced
    volumes. Returns the record (``results_schema.TestResult``) and the predicted volumes of
    the cases named in ``keep_predictions``."""
    was_training = wrapper.training
    wrapper.eval()
    # acdc_dir: the ACDC folder, or a prepared nnU-Net dataset (nnunet_data.Prepared: its volumes and classes)
    prepared = hasattr(acdc_dir, "volumes")
    ds = acdc_dir.volumes(split, limit) if prepared else ACDCVolumes(acdc_dir, split, limit=limit)
    class_names = list(acdc_dir.class_names[1:]) if prepared else list(CLASS_NAMES)
    per_case: Dict[str, dict] = {}
    kept: Dict[str, dict] = {}
    for i in tqdm(range(len(ds)), desc=f"eval {split}", leave=False, dynamic_ncols=True, disable=not progress):
        item = ds[i]
        pred = predict_volume(wrapper, item["image"], size, device, which, amp_dtype)
        per_case[item["name"]] = engine.case_metrics(pred, item["label"], len(class_names) + 1, full=full)
        if item["name"] in keep_predictions:  # (the first channel of a multi-channel image)
            img = item["image"] if item["image"].ndim == 3 else item["image"][:, 0]
            kept[item["name"]] = {"image": img, "label": item["label"], "pred": pred}
    wrapper.train(was_training)
    return engine.test_result(class_names, per_case, f"{split} split, model {which}, every slice resized to "
                              f"{size}x{size} and back, 3D metrics per volume (medpy), mean over volumes"), kept


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
    p.add_argument("--limit", type=int_range(1), default=None, help="evaluate only this many evenly spaced volumes")
    p.add_argument("--model", choices=("a", "b", "ensemble"), default=None, help="default: the run's --eval-model")
    p.add_argument("--data-root", default=None, help="default: the folder the run read its data from (its "
                   "config.json), else the examples' lookup ($TORCH_DACL_DATA, the get_data cache)")
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
    elif not args.data_root and cfg.get("acdc_dir") and Path(cfg["acdc_dir"]).is_dir():
        acdc = Path(cfg["acdc_dir"])  # where the run read its data (its config), unless --data-root says otherwise
    else:
        acdc = find_acdc_dir(resolve_data_root(args.data_root or cfg.get("data_root")))
    res, _ = evaluate(wrapper, acdc, args.split, int(cfg["size"]), device,
                      which=args.model or cfg.get("eval_model", "a"), limit=args.limit, progress=True)
    print(engine.format_table(res, f"{args.checkpoint} {args.split}"))
    res = {**dataclasses.asdict(res), "checkpoint": str(args.checkpoint)}
    out = args.output or args.checkpoint.parent / f"eval_{args.split}.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
