"""Validation curves of recipe-search and sweep runs: validation Dice against training minutes, one per run.

Reads whatever exists in each run folder (``val_history.json`` of a finished ``--no-test`` run,
else the history inside ``last.pt`` of a run still going or interrupted) and writes
``curves.json`` (every point), ``curves.md`` and ``table.json`` (the table) and ``curves.png``
into ``--out``. It reads the validation split only; the runs it is meant for stop before the
test set (``--no-test``).

Examples::

    python benchmarks/recipe_curves.py runs/recipe/* --out benchmarks/results/recipe
    python benchmarks/recipe_curves.py runs/sweep/* --out benchmarks/results/sweep --title "DACL sweep"

DACL runs get a column with their objective's settings (max lambda_CL, reduction, pseudo-label
policy, head weight, sampling budget, bank size, and the autocast dtype where one is set).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _cli import float_range  # noqa: E402

KEYS = ("method", "encoder", "size", "crop", "labeled_bs", "unlabeled_bs", "lr", "steps", "labeled", "seed",
        "threads", "lambda_cl", "reduction", "pseudo_policy", "pseudo_confidence", "head_weight",
        "max_samples_per_class", "bank_size", "amp", "patch", "features")


def network(c: dict) -> str:
    """The network cell: the 2D example's encoder, or the 3D example's U-Net features per stage."""
    if c.get("encoder"):
        return str(c["encoder"])
    return f"PlainConvUNet {'-'.join(map(str, c['features']))}" if c.get("features") else "-"


def input_size(c: dict) -> str:
    """The input cell: the 2D example's size / crop, or the 3D example's patch."""
    if c.get("patch"):
        return "patch " + "x".join(map(str, c["patch"]))
    return f"{c.get('size')} / {c.get('crop') or '-'}"


def dacl_settings(c: dict) -> str:
    """The objective's settings of a DACL run, in one cell ("-" for sup / cps)."""
    if c.get("method") != "dacl":
        return "-"
    policy = c.get("pseudo_policy")
    policy = f"{policy} {c.get('pseudo_confidence')}" if policy == "fixed" else policy
    amp = f", {c['amp']} autocast" if c.get("amp") not in (None, "none") else ""
    return (f"λ {c.get('lambda_cl')} ({c.get('reduction')}), {policy}, head weight {c.get('head_weight') or 'λ'}, "
            f"{c.get('max_samples_per_class')}/class, bank {c.get('bank_size')}{amp}")


def read_run(folder: Path) -> Optional[dict]:
    """``{"name", "config", "history", "finished"}`` of a run folder, or None if it has no history."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        return None
    cfg = json.loads(cfg_file.read_text())
    hist, finished = None, False
    if (folder / "val_history.json").is_file():
        hist, finished = json.loads((folder / "val_history.json").read_text())["history"], True
    elif (folder / "last.pt").is_file():
        import torch

        hist = torch.load(folder / "last.pt", map_location="cpu", weights_only=False).get("history")
    if not hist:
        return None
    return {"name": folder.name, "config": {k: cfg.get(k) for k in KEYS}, "finished": finished,
            "history": [{"step": h["step"], "val_dice": h["mean_dice"], "per_class": h.get("per_class", {}),
                         "train_minutes": round((h.get("train_seconds") or 0) / 60, 2)} for h in hist]}


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (others are skipped)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="Recipe search", help="the table's and the figure's title")
    p.add_argument("--target", type=float_range(0, 100), default=75.0, help="a dashed line at this validation Dice (%%) in the figure")
    args = p.parse_args(argv)
    runs = [r for r in (read_run(f) for f in args.runs if f.is_dir()) if r]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curves.json").write_text(json.dumps(runs, indent=1))
    classes = list(dict.fromkeys(k for r in runs for h in r["history"] for k in h["per_class"]))  # first-seen order
    mean_of = f"mean of {', '.join(classes)}" if classes else "mean over the foreground classes"
    lines = [f"# {args.title}: validation Dice ({mean_of}; 3D, on the val volumes) by training time",
             "", "Validation split only: no test result is read. Training minutes exclude validation, on",
             "one thread of a 2-core machine shared with other jobs (so absolute minutes are noisy).", "",
             "| run | method | DACL settings | network | input | batch | lr | steps done | best val Dice "
             "| at step | minutes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for r in runs:
        c, h = r["config"], r["history"]
        best = max(h, key=lambda x: x["val_dice"])
        rows.append({"run": r["name"], "method": c["method"], "DACL settings": dacl_settings(c),
                     "steps done": f"{h[-1]['step']} of {c['steps']}"
                                   + ("" if r["finished"] else " (running or stopped)"),
                     "best val Dice (%)": round(100 * best["val_dice"], 1),
                     "at step": best["step"], "last val Dice (%)": round(100 * h[-1]["val_dice"], 1),
                     "training minutes": round(h[-1]["train_minutes"])})
        lines.append(f"| {r['name']} | {c['method']} | {dacl_settings(c)} | {network(c)} | {input_size(c)} | "
                     f"{c['labeled_bs']}+{c['unlabeled_bs'] if c['method'] != 'sup' else 0} | {c['lr']} | "
                     f"{h[-1]['step']} of {c['steps']}{'' if r['finished'] else ' (running or stopped)'} | "
                     f"{100 * best['val_dice']:.1f} % | {best['step']} | {h[-1]['train_minutes']:.0f} |")
    given = [str(a) for a in (argv if argv is not None else sys.argv[1:])]
    cmd = shlex.join(["python", "benchmarks/recipe_curves.py", *(a for a in given if not a.endswith(".log"))])
    lines += ["", f"Curves: `curves.png`; every point in `curves.json`. Made by `{cmd}`."]
    (args.out / "curves.md").write_text("\n".join(lines) + "\n")
    (args.out / "table.json").write_text(json.dumps({"what": f"{args.title}: validation split only", "command": cmd,
                                                     "rows": rows}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        h = r["history"]
        ax.plot([x["train_minutes"] for x in h], [100 * x["val_dice"] for x in h], marker="o", label=r["name"])
    ax.axhline(args.target, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("training minutes (one thread, validation excluded)")
    ax.set_ylabel("validation Dice (%)")
    ax.set_title(args.title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "curves.png", dpi=110)
    plt.close(fig)
    print("\n".join(lines))
    return runs


if __name__ == "__main__":
    main()
