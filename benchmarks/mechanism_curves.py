"""The mechanism through training (issue #27, item 1): the ``mechanism.json`` of runs made with
``--mechanism-every`` (``examples/probe.py``), as one figure and one JSON.

For each run: silhouette, Davies-Bouldin, the mean kNN density of each class's sparse tail
(its lowest 10 %) and L_CL on the probe's fixed validation pixels, against the training step,
in the projection head's space (what DACL acts on) and in the feature space the head reads
(what the segmentation head reads). If DACL does what the paper says, its curves in head space
separate from CPS's (higher silhouette and tail density, lower Davies-Bouldin and L_CL); H2
("the head absorbs it") is supported when they separate in head space and not in feature
space.

Usage::

    python benchmarks/mechanism_curves.py runs/hyp/acdc_cpu_cps_p7_seed0 runs/hyp/acdc_cpu_II_p7_seed0 \\
        runs/hyp/acdc_cpu_dacl_p7_seed0 --names CPS "II (plain contrastive)" DACL \\
        --out benchmarks/results/mechanism_training

(or the finished runs' records, ``benchmarks/results/hypotheses_runs/<run>``, which
``benchmarks/hypotheses.py`` keeps)

Writes ``<out>/mechanism_training.json`` (the per-step values of every run, the command) and
``<out>/mechanism_training.png``; runs still going are plotted as far as they got.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

METRICS = (("silhouette", "silhouette (cosine; higher: compact)"), ("davies_bouldin", "Davies-Bouldin (lower)"),
           ("tail_density_mean", "sparse-tail kNN density (higher)"), ("l_cl", "L_CL on the probe (lower)"))
SPACES = (("head", "head space (DACL acts here)"), ("feature", "feature space (the heads read it)"))


def load(folder: Path) -> List[dict]:
    path = folder / "mechanism.json" if folder.is_dir() else folder
    return json.loads(path.read_text())["records"] if path.is_file() else []


def plot(runs: List[dict], out: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the JSON is the result
        return None
    fig, axs = plt.subplots(len(SPACES), len(METRICS), figsize=(4.0 * len(METRICS), 3.2 * len(SPACES)),
                            squeeze=False)
    for i, (space, space_title) in enumerate(SPACES):
        for j, (key, title) in enumerate(METRICS):
            ax = axs[i, j]
            for r in runs:
                pts = [(rec["step"], rec[space][key]) for rec in r["records"] if key in rec[space]]
                if pts:
                    ax.plot(*zip(*pts), "o-", ms=3, label=r["name"])
            ax.set_title(f"{title}\n{space_title}", fontsize=8)
            ax.set_xlabel("training step", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    axs[0, 0].legend(fontsize=7)
    fig.suptitle("The mechanism through training: class compactness on fixed validation pixels (model a)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (or their mechanism.json)")
    p.add_argument("--names", nargs="+", default=None, help="one label per run (default: the folder names)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "mechanism_training")
    args = p.parse_args(argv)
    names = args.names or [r.name for r in args.runs]
    if len(names) != len(args.runs):
        p.error(f"argument --names: expected {len(args.runs)} names (one per run), got {len(names)}")
    runs = [{"name": n, "folder": str(r), "records": load(r)} for n, r in zip(names, args.runs)]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"what": "examples/probe.py on fixed validation pixels every --mechanism-every steps, model a; "
                      "silhouette and Davies-Bouldin against the ground truth, the mean kNN density of each class's "
                      "lowest 10 %, L_CL of a fresh bankless loss",
              "command": shlex.join(["python", "benchmarks/mechanism_curves.py", *(argv if argv is not None
                                                                                    else sys.argv[1:])]),
              "runs": runs}
    (args.out / "mechanism_training.json").write_text(json.dumps(result, indent=1))
    fig = plot(runs, args.out / "mechanism_training.png")
    for r in runs:
        last = r["records"][-1] if r["records"] else None
        if last:
            print(f"{r['name']}: step {last['step']}: " + "; ".join(
                f"{s} silhouette {last[s].get('silhouette', float('nan')):.3f}, tail {last[s]['tail_density_mean']:.3f},"
                f" L_CL {last[s]['l_cl']:.3f}" for s, _ in SPACES))
        else:
            print(f"{r['name']}: no records yet")
    print(f"wrote {args.out / 'mechanism_training.json'}" + (f" and {fig}" if fig else ""))
    return result


if __name__ == "__main__":
    main()
