"""Qualitative figures of both examples: test slices with the ground truth and predictions overlaid.

Every training run writes ``test_slices.npz`` (a few test slices: image, ground truth and
its prediction) and its own ``test_predictions.png``. To put several runs side by side on
the same slices (e.g. CPS vs DACL)::

    python examples/acdc_plot.py runs/acdc_cps_cpu_seed0 runs/acdc_dacl_cpu_seed0 -o compare.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

# background transparent; RV, Myo, LV
COLORS = np.array([[0, 0, 0, 0], [0.90, 0.20, 0.20, 0.5], [0.20, 0.80, 0.20, 0.5], [0.20, 0.40, 1.00, 0.5]])


def select_slices(kept: Dict[str, dict]) -> Dict[str, dict]:
    """For each kept case, the slice with the most ground-truth foreground (a rule that does
    not depend on the model, so every run shows the same slices)."""
    out = {}
    for name, v in sorted(kept.items()):
        z = int((v["label"] > 0).reshape(v["label"].shape[0], -1).sum(1).argmax())
        out[f"{name}_z{z}"] = {"image": v["image"][z], "label": v["label"][z], "pred": v["pred"][z]}
    return out


def save_slices(path: Path, slices: Dict[str, dict]) -> None:
    np.savez_compressed(path, **{f"{key}/{f}": v[f] for key, v in slices.items() for f in ("image", "label", "pred")})


def load_slices(path: Path) -> Dict[str, dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "test_slices.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: pass a run folder written by an example")
    data = np.load(path)
    out: Dict[str, dict] = {}
    for k in data.files:
        key, field = k.rsplit("/", 1)
        out.setdefault(key, {})[field] = data[k]
    return out


def render(runs: Sequence[Tuple[str, Dict[str, dict]]], out: Path, max_rows: int = 4,
           class_names: Optional[Sequence[str]] = None) -> Path:
    """One row per slice: image, ground truth, then each run's prediction (overlays).

    ``class_names`` (background first; an nnU-Net dataset's classes) picks one colour per
    class; without it, ACDC's RV / Myo / LV colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(set.intersection(*[set(r[1]) for r in runs]))[:max_rows]
    if not keys:
        raise ValueError("the runs share no test slice (they were evaluated on different test volumes)")
    ref = runs[0][1]
    colors, legend = COLORS, "ACDC test slices (red RV, green Myo, blue LV)"
    if class_names is not None and tuple(class_names[1:]) != ("RV", "Myo", "LV"):
        import matplotlib.colors as mcolors

        tab = ["blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan"]
        names = [tab[i % 10] for i in range(len(class_names) - 1)]
        colors = np.array([[0, 0, 0, 0]] + [mcolors.to_rgba(f"tab:{c}", 0.5) for c in names])
        legend = "test slices (" + ", ".join(f"{c} {n}" for c, n in zip(names, class_names[1:])) + ")"
    cols = 2 + len(runs)
    fig, axes = plt.subplots(len(keys), cols, figsize=(2.6 * cols, 2.6 * len(keys)), squeeze=False)
    for r, key in enumerate(keys):
        img = ref[key]["image"]
        panels = [("image", None), ("ground truth", ref[key]["label"])]
        panels += [(name, data[key]["pred"]) for name, data in runs]
        for c, (title, lab) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray")
            if lab is not None:
                ax.imshow(colors[np.clip(lab, 0, len(colors) - 1)], interpolation="nearest")
            ax.set(xticks=[], yticks=[])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(key, fontsize=7)
    fig.suptitle(legend, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Optional[List[str]] = None) -> Path:
    p = argparse.ArgumentParser(description="Render GT and each run's predictions on the same ACDC test slices.")
    p.add_argument("runs", nargs="+", type=Path, help="run folders (or their test_slices.npz)")
    p.add_argument("-o", "--output", type=Path, default=Path("acdc_compare.png"))
    p.add_argument("--names", nargs="*", default=None, help="column titles (default: run folder names)")
    args = p.parse_args(argv)
    names = args.names or [r.name if r.is_dir() else r.parent.name for r in args.runs]
    if len(names) != len(args.runs):
        p.error("--names: give one name per run")
    runs = [(n, load_slices(r)) for n, r in zip(names, args.runs)]
    out = render(runs, args.output)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
