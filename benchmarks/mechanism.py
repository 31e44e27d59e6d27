"""The mechanism of Fig. 1b on your own checkpoints: how compact each class is in feature space.

For each checkpoint of the ACDC example (``<run>/best.pt``; e.g. a CPS run and a DACL run):

1. the decoder features ``f`` (the layer the projection head reads, L2-normalised) of a fixed,
   class-balanced sample of test-set pixels: ``--pixels-per-class`` pixels of each class drawn
   with a fixed seed from evenly spaced test slices (ground-truth labels at the model's input
   resolution). The decoder features, not the head's embeddings, because a CPS model's head is
   never trained; ``--space embedding`` uses the heads instead.
2. cluster metrics from scikit-learn on that sample, against the ground-truth classes:
   silhouette (cosine; higher = more compact and separated), Davies-Bouldin (lower = better)
   and the V-measure of a k-means clustering with one cluster per class (higher = the classes
   are what the geometry finds).
3. a 2D t-SNE of the sample, the checkpoints side by side (``mechanism_tsne.png``).
4. a density map: every foreground pixel's multi-scale kNN density (Eq. 3-5, ks 8/16/32,
   :func:`torch_dacl.functional.knn_density`) among the pixels of its class on the same slice,
   on ``--map-slices`` test slices, zoomed on the foreground, one colour range for all maps
   (``mechanism_density.png``): the dark pixels are the sparse
   ones DACL pulls towards its class center.

Writes ``mechanism.json`` (metrics, sample sizes, the command) and the two figures into
``--out``. Example::

    python benchmarks/mechanism.py runs/acdc_cps_cpu_seed0/best.pt runs/acdc_dacl_cpu_seed0/best.pt \\
        --names CPS DACL --out benchmarks/results/mechanism
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

from acdc_data import ACDCVolumes, evenly_spaced, find_acdc_dir, resize_image  # noqa: E402
from evaluate_acdc import load_wrapper  # noqa: E402
from _cli import int_range  # noqa: E402

from torch_dacl.functional import knn_density  # noqa: E402

CLASS_NAMES = ("background", "RV", "Myo", "LV")


def data_root(arg: Optional[str]) -> Path:
    """The examples' data lookup (``--data-root``, ``$TORCH_DACL_DATA``, the cache, the dev copy)."""
    try:
        from _data import resolve_data_root  # the examples' one lookup
    except ImportError:  # pragma: no cover - older checkouts
        from acdc_data import resolve_data_root
    return resolve_data_root(arg)


def test_slices(acdc_dir: Path, num_slices: int, size: int) -> List[dict]:
    """``num_slices`` evenly spaced test slices that hold foreground, resized to ``size``."""
    vols = ACDCVolumes(acdc_dir, "test")
    cands = []
    for i in range(len(vols)):
        v = vols[i]
        for z in range(v["image"].shape[0]):
            if (v["label"][z] > 0).any():
                cands.append((v["name"], z, v["image"][z], v["label"][z]))
    out = []
    for name, z, img, lab in evenly_spaced(cands, min(num_slices, len(cands))):
        x, y = resize_image(img, lab, size)
        out.append({"name": f"{name}:{z}", "image": x, "label": y})
    return out


@torch.no_grad()
def features(wrapper, x: torch.Tensor, space: str) -> torch.Tensor:
    """``(N, D, H, W)`` L2-normalised decoder features (or head embeddings) of model a."""
    store = {}
    layer = wrapper.model_a.get_submodule(wrapper.feature_layer)
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("f", o[-1] if isinstance(o, (tuple, list))
                                                                          else o))
    try:
        wrapper.model_a(x)
    finally:
        handle.remove()
        getattr(wrapper, "_features", {}).clear()
    f = store["f"]
    if space == "embedding":
        f = wrapper.head_a(f)
    return torch.nn.functional.normalize(f.float(), dim=1)


def balanced_sample(labels: torch.Tensor, per_class: int, seed: int, num_classes: int) -> torch.Tensor:
    """Flat indices of up to ``per_class`` pixels of each class (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    flat = labels.reshape(-1)
    idx = []
    for c in range(num_classes):  # a handful of classes, once: not a hot path
        where = (flat == c).nonzero().squeeze(1)
        idx.append(where[torch.randperm(where.numel(), generator=g)[:per_class]])
    return torch.cat(idx)


def cluster_metrics(x: np.ndarray, y: np.ndarray, seed: int) -> Dict[str, float]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import davies_bouldin_score, silhouette_score, v_measure_score

    k = len(np.unique(y))
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return {"silhouette": float(silhouette_score(x, y, metric="cosine")),
            "davies_bouldin": float(davies_bouldin_score(x, y)),
            "v_measure": float(v_measure_score(y, pred))}


def density_map(f: torch.Tensor, label: torch.Tensor) -> np.ndarray:
    """Per-pixel multi-scale kNN density among the pixels of the same class (NaN on background)."""
    d, h, w = f.shape
    fg = label.reshape(-1) > 0
    out = np.full(h * w, np.nan, dtype=np.float32)
    if fg.any():
        feats = f.reshape(d, -1).t()[fg]
        out[fg.numpy()] = knn_density(feats, label.reshape(-1)[fg], ks=(8, 16, 32)).numpy()
    return out.reshape(h, w)


def zoom(label: np.ndarray) -> tuple:
    """The slices of a box around the foreground of ``label`` with a margin (all of it if empty)."""
    ys, xs = np.nonzero(label)
    if not len(ys):
        return slice(None), slice(None)
    m = max(16, int(np.ptp(ys) + np.ptp(xs)) // 2)
    return slice(max(ys.min() - m, 0), ys.max() + m + 1), slice(max(xs.min() - m, 0), xs.max() + m + 1)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path, help="best.pt / last.pt of the ACDC example")
    p.add_argument("--names", nargs="+", default=None, help="one label per checkpoint (default: the run folders)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--slices", type=int_range(1), default=40, help="evenly spaced test slices with foreground")
    p.add_argument("--pixels-per-class", type=int_range(2), default=500)
    p.add_argument("--map-slices", type=int_range(0), default=3, help="slices shown in the density map")
    p.add_argument("--space", choices=("decoder", "embedding"), default="decoder")
    p.add_argument("--seed", type=int_range(0), default=0)
    p.add_argument("--no-tsne", action="store_true", help="skip the t-SNE (the slow part)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "mechanism")
    args = p.parse_args(argv)
    names = args.names or [c.parent.name for c in args.checkpoints]
    if len(names) != len(args.checkpoints):
        p.error(f"--names: expected {len(args.checkpoints)} names, got {len(names)}")
    t0 = time.time()
    acdc_dir = find_acdc_dir(data_root(args.data_root))
    args.out.mkdir(parents=True, exist_ok=True)
    results, samples, maps = {}, {}, {}
    slices = None
    for name, ck in zip(names, args.checkpoints):
        wrapper, cfg, state = load_wrapper(ck, torch.device("cpu"))
        if slices is None or slices[0]["image"].shape[-1] != cfg["size"]:
            slices = test_slices(acdc_dir, args.slices, int(cfg["size"]))
        x = torch.stack([s["image"] for s in slices])
        y = torch.stack([s["label"] for s in slices])
        f = torch.cat([features(wrapper, x[i:i + 8], args.space) for i in range(0, len(x), 8)])
        idx = balanced_sample(y, args.pixels_per_class, args.seed, len(CLASS_NAMES))
        flat = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        xs, ys = flat[idx].numpy(), y.reshape(-1)[idx].numpy()
        results[name] = {"checkpoint": str(ck), "step": state.get("step"), "of_steps": cfg.get("steps"),
                         "method": cfg.get("method"),
                         "pixels": {CLASS_NAMES[c]: int((ys == c).sum()) for c in range(len(CLASS_NAMES))},
                         **cluster_metrics(xs, ys, args.seed)}
        samples[name] = (xs, ys)
        pick = evenly_spaced(list(range(len(slices))), min(args.map_slices, len(slices)))
        maps[name] = [(x[i, 0].numpy(), y[i].numpy(), density_map(f[i], y[i])) for i in pick]
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items() if isinstance(v, float)))
    plot(samples, maps, args.out, args.seed, tsne=not args.no_tsne)
    report = {"space": args.space, "slices": len(slices), "pixels_per_class": args.pixels_per_class,
              "seed": args.seed, "metrics": results, "seconds": round(time.time() - t0, 1),
              "command": " ".join(["python", "benchmarks/mechanism.py", *map(str, argv if argv is not None
                                                                             else sys.argv[1:])])}
    (args.out / "mechanism.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'mechanism.json'} and the figures in {time.time() - t0:.0f} s")
    return report


def plot(samples, maps, out: Path, seed: int, tsne: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = np.array([[0.6, 0.6, 0.6], [0.85, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.3, 0.85]])
    if tsne:
        from sklearn.manifold import TSNE

        fig, axes = plt.subplots(1, len(samples), figsize=(4.5 * len(samples), 4.2), squeeze=False)
        for ax, (name, (xs, ys)) in zip(axes[0], samples.items()):
            emb = TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(xs)
            ax.scatter(emb[:, 0], emb[:, 1], s=3, c=colors[ys])
            ax.set_title(f"{name}: t-SNE of test pixels")
            ax.set_xticks([]), ax.set_yticks([])
        for c, cname in enumerate(CLASS_NAMES):
            axes[0][-1].scatter([], [], s=12, c=[colors[c]], label=cname)
        axes[0][-1].legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "mechanism_tsne.png", dpi=110)
        plt.close(fig)
    rows = len(next(iter(maps.values())))
    # one colour range for every map: the densities sit near 1 (a pixel's nearest same-class
    # neighbours on a slice are close), so a fixed 0-1 range shows no contrast
    pooled = np.concatenate([np.ones(0)] + [d[2][np.isfinite(d[2])] for m in maps.values() for d in m])
    lo, hi = (float(v) for v in np.percentile(pooled, [2, 100])) if pooled.size else (0.0, 1.0)
    fig, axes = plt.subplots(rows, 1 + len(maps), figsize=(3.2 * (1 + len(maps)) + 1, 3.0 * rows), squeeze=False,
                             constrained_layout=True)
    for r in range(rows):
        img, lab, _ = next(iter(maps.values()))[r]
        axes[r][0].imshow(img[zoom(lab)], cmap="gray")
        axes[r][0].imshow(np.ma.masked_equal(lab[zoom(lab)], 0), cmap="jet", alpha=0.35, vmin=0, vmax=3)
        axes[r][0].set_title("image + ground truth" if r == 0 else "")
        for j, (name, mp) in enumerate(maps.items(), start=1):
            box = zoom(mp[r][1])  # each checkpoint's own slice (its input size may differ)
            axes[r][j].imshow(mp[r][0][box], cmap="gray")
            im = axes[r][j].imshow(mp[r][2][box], cmap="magma", vmin=lo, vmax=max(hi, lo + 1e-6))
            axes[r][j].set_title(f"{name}: kNN density" if r == 0 else "")
        for ax in axes[r]:
            ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="kNN density, cosine (dark = sparse);\n"
                 "range: 2nd percentile to maximum of the maps shown")
    fig.savefig(out / "mechanism_density.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
