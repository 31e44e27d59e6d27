"""What DACL buys on ACDC: the reproduction table, measured with the example's presets.

Runs ``examples/acdc_cps_dacl.py`` for each method / ablation variant and seed (skipping runs
whose ``metrics.json`` already exists, so the script resumes), then collects the test metrics
into ``benchmarks/results/acdc_<preset>.json`` and ``.md``: mean +- std over seeds of Dice,
Jaccard, HD95 and ASD, next to the paper's Table 1 and Table 2 rows, plus a figure of test
slices (ground truth and each method's prediction) and the validation curves.

Model selection is by validation Dice inside each run (never by the test split).

Usage::

    python benchmarks/acdc_table.py                          # sup, cps, dacl; seeds 0 1 2; 7 patients
    python benchmarks/acdc_table.py --variants cps dacl --seeds 0
    python benchmarks/acdc_table.py --variants II III IV V --seeds 0   # Table 2 ablation
    python benchmarks/acdc_table.py --collect-only           # rebuild the tables from run folders

Variants: ``sup``, ``cps``, ``dacl`` (= Table 2 VI), and the Table 2 ablation ``II`` (plain
contrastive: random anchors and positives, no bank, no w_i), ``III`` (density-aware, one
scale, no bank, no w_i), ``IV`` (multi-scale, no bank, no w_i), ``V`` (+ bank, no w_i).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "acdc_cps_dacl.py"
RESULTS = ROOT / "benchmarks" / "results"

VARIANTS: Dict[str, List[str]] = {
    "sup": ["--method", "sup"],
    "cps": ["--method", "cps"],
    "II": ["--method", "dacl", "--sampling", "random", "--no-bank", "--weighting", "none"],
    "III": ["--method", "dacl", "--ks", "8", "--no-bank", "--weighting", "none"],
    "IV": ["--method", "dacl", "--no-bank", "--weighting", "none"],
    "V": ["--method", "dacl", "--weighting", "none"],
    "dacl": ["--method", "dacl"],
}
LABELS = {"sup": "supervised only (labeled slices)", "cps": "CPS (Table 2 I)", "II": "II: + plain contrastive",
          "III": "III: + density-aware, single scale", "IV": "IV: + multi-scale", "V": "V: + memory bank",
          "dacl": "DACL (Table 2 VI: + w_i)"}

# The paper's numbers (arXiv:2412.19871 Table 1, ACDC; Table 2, ACDC column), for comparison.
# Table 1 gives no HD95. Its supervised rows use a V-Net; ours is the example's smp U-Net.
PAPER_T1 = {
    7: {"sup": (79.62, 1.5, 68.11, 1.88, 2.94, 1.2), "cps": (85.71, 0.9, 70.53, 0.6, 4.00, 0.9),
        "dacl": (90.91, 0.5, 79.12, 1.0, 0.38, 0.2)},
    3: {"sup": (43.30, 8.6, 37.01, 6.90, 12.41, 0.8), "cps": (57.67, 0.5, 44.02, 0.6, 3.75, 1.8),
        "dacl": (90.12, 0.4, 76.12, 1.6, 0.55, 0.2)},
}
PAPER_T2 = {"cps": (85.71, 0.9), "II": (87.50, 0.8), "III": (88.60, 0.7), "IV": (89.30, 0.6), "V": (89.80, 0.5),
            "dacl": (90.91, 0.5)}


def run_dir(runs: Path, preset: str, variant: str, patients: int, seed: int) -> Path:
    return runs / f"acdc_{preset}_{variant}_p{patients}_seed{seed}"


def run_one(args, variant: str, patients: int, seed: int) -> Path:
    out = run_dir(args.runs, args.preset, variant, patients, seed)
    if (out / "metrics.json").is_file():
        print(f"[skip] {out.name}: metrics.json exists")
        return out
    cmd = [sys.executable, str(EXAMPLE), "--preset", args.preset, *VARIANTS[variant], "--seed", str(seed),
           "--labeled-patients", str(patients), "--output-dir", str(out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if (out / "last.pt").is_file():
        cmd += ["--resume"]
    print("[run]", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"[done] {out.name} in {time.time() - t0:.0f} s", flush=True)
    return out


def _mean_std(xs: List[float]):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def collect(args) -> Dict:
    rows = []
    for patients in args.patients:
        for variant in VARIANTS:
            found = []
            for seed in sorted(set(args.seeds) | set(range(10))):
                f = run_dir(args.runs, args.preset, variant, patients, seed) / "metrics.json"
                if f.is_file():
                    found.append(json.loads(f.read_text()))
            if not found:
                continue
            agg = {}
            for m, scale in (("dice", 100), ("jaccard", 100), ("hd95", 1), ("asd", 1)):
                agg[m] = _mean_std([r["test"]["mean"][m] * scale for r in found])
            per_class = {c: _mean_std([r["test"]["per_class"]["dice"][c] * 100 for r in found])
                         for c in found[0]["test"]["per_class"]["dice"]}
            rows.append(dict(variant=variant, label=LABELS[variant], labeled_patients=patients,
                             seeds=[r["seed"] for r in found], n_seeds=len(found),
                             test_volumes=found[0]["test"]["num_volumes"],
                             metrics={m: {"mean": v[0], "std": v[1]} for m, v in agg.items()},
                             dice_per_class={c: {"mean": v[0], "std": v[1]} for c, v in per_class.items()},
                             dice_per_seed={str(r["seed"]): r["test"]["mean"]["dice"] * 100 for r in found},
                             best_val_dice=[r["best_val_dice"] for r in found],
                             wall_seconds=[r["wall_seconds"] for r in found],
                             paper_table1=PAPER_T1.get(patients, {}).get(variant),
                             paper_table2_dice=PAPER_T2.get(variant) if patients == 7 else None))
    return dict(preset=args.preset, protocol="docs: Design decisions, 4, reduced by the preset (see config.json of each run)",
                command="python benchmarks/acdc_table.py " + " ".join(sys.argv[1:]), rows=rows,
                paired=paired_differences(rows))


def paired_differences(rows: List[Dict]) -> List[Dict]:
    """Test Dice of DACL minus CPS (and CPS minus supervised), paired by seed: the seeds share
    the split and the initialisation, so the paired difference is the fairer comparison."""
    out = []
    for patients in sorted({r["labeled_patients"] for r in rows}, reverse=True):
        by = {r["variant"]: r["dice_per_seed"] for r in rows if r["labeled_patients"] == patients}
        paper = PAPER_T1.get(patients, {})
        for a, b in (("dacl", "cps"), ("cps", "sup")):
            if a not in by or b not in by:
                continue
            seeds = sorted(set(by[a]) & set(by[b]), key=int)
            if not seeds:
                continue
            diffs = [by[a][s] - by[b][s] for s in seeds]
            m, sd = _mean_std(diffs)
            paper_diff = paper[a][0] - paper[b][0] if a in paper and b in paper else None
            out.append(dict(labeled_patients=patients, a=a, b=b, seeds=[int(s) for s in seeds], diffs=diffs,
                            mean=m, std=sd, wins=sum(d > 0 for d in diffs), paper=paper_diff))
    return out


def write_markdown(result: Dict, path: Path) -> None:
    def pm(v, n):
        return f"{v['mean']:.2f}" if n == 1 else f"{v['mean']:.2f} ± {v['std']:.2f}"

    lines = [f"# ACDC, `{result['preset']}` preset: measured next to the paper", "",
             f"Generated by `{result['command']}` from the run folders' `metrics.json`; do not edit by hand.",
             "Test split: ACDC test volumes (40 in the split); model chosen by validation Dice.",
             "Dice and Jaccard in %, HD95 and ASD in voxels; mean ± std over seeds (a single value: one seed).",
             f"Each run: `python examples/acdc_cps_dacl.py --preset {result['preset']} <variant flags> "
             "--labeled-patients P --seed S` (flags in `benchmarks/acdc_table.py` VARIANTS); wall time "
             "on 2 shared CPU cores. The paper's columns: Table 1 (its supervised row is a V-Net, ours an "
             "smp U-Net; it reports no HD95) or, for the ablation rows, Table 2.", ""]
    for patients in sorted({r["labeled_patients"] for r in result["rows"]}, reverse=True):
        lines += [f"## {patients} labeled patients", "",
                  "| method | seeds | test vols | wall (s) | Dice | Jaccard | HD95 | ASD | paper Dice | paper Jaccard | paper ASD |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in [r for r in result["rows"] if r["labeled_patients"] == patients]:
            m = r["metrics"]
            p = r["paper_table1"]
            if p is None and r["paper_table2_dice"]:
                paper = f"{r['paper_table2_dice'][0]:.2f} ± {r['paper_table2_dice'][1]} (Table 2) | – | –"
            elif p is None:
                paper = "– | – | –"
            else:
                paper = f"{p[0]:.2f} ± {p[1]} | {p[2]:.2f} ± {p[3]} | {p[4]:.2f} ± {p[5]}"
            n = r["n_seeds"]
            wall = "/".join(f"{w:.0f}" for w in r["wall_seconds"])
            lines.append(f"| {r['label']} | {n} | {r['test_volumes']} | {wall} | {pm(m['dice'], n)} | "
                         f"{pm(m['jaccard'], n)} | {pm(m['hd95'], n)} | {pm(m['asd'], n)} | {paper} |")
        lines.append("")
        pairs = [d for d in result.get("paired", []) if d["labeled_patients"] == patients]
        if pairs:
            lines += ["Test Dice differences paired by seed (same split and initialisation):", ""]
            for d in pairs:
                per = ", ".join(f"seed {s}: {x:+.2f}" for s, x in zip(d["seeds"], d["diffs"]))
                paper = f"; the paper: {d['paper']:+.2f}" if d["paper"] is not None else ""
                lines.append(f"- {LABELS[d['a']].split(' (')[0]} − {LABELS[d['b']].split(' (')[0]}: "
                             f"{d['mean']:+.2f} ± {d['std']:.2f} ({per}; better in {d['wins']} of "
                             f"{len(d['diffs'])}){paper}")
            lines.append("")
    path.write_text("\n".join(lines))


def write_figures(result: Dict, args) -> None:
    """Test slices (GT + each method's prediction, seed 0) and validation Dice curves."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from acdc_plot import load_slices, render  # type: ignore
    except Exception as e:  # pragma: no cover - optional
        print(f"[figures skipped] {e}")
        return
    patients = max(args.patients)
    runs = []
    for variant in ("sup", "cps", "dacl"):
        d = run_dir(args.runs, args.preset, variant, patients, min(args.seeds))
        if (d / "test_slices.npz").is_file():
            runs.append((variant, load_slices(d / "test_slices.npz")))
    if runs:
        render(runs, RESULTS / f"acdc_{args.preset}_overlays.png")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for variant in VARIANTS:  # mean over the seeds found, band from the lowest to the highest seed
        curves = []
        for seed in sorted(set(args.seeds) | set(range(10))):
            d = run_dir(args.runs, args.preset, variant, patients, seed)
            if (d / "metrics.json").is_file():
                hist = json.loads((d / "metrics.json").read_text()).get("val_history", [])
                if hist:
                    curves.append({h["step"]: 100 * h["val_dice"] for h in hist})
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        ys = [[c[t] for c in curves] for t in steps]
        line, = ax.plot(steps, [statistics.mean(y) for y in ys], marker="o",
                        label=f"{variant} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        if len(curves) > 1:
            ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation Dice (%)")
    ax.set_title(f"ACDC {args.preset}, {patients} labeled patients: mean over seeds, band = min-max", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"acdc_{args.preset}_val_curves.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick")
    p.add_argument("--variants", nargs="+", default=["sup", "cps", "dacl"], choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--patients", nargs="+", type=int, default=[7], choices=[3, 7])
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "table", help="where the run folders go")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--collect-only", action="store_true")
    args = p.parse_args()
    if not args.collect_only:
        for patients in args.patients:
            for seed in args.seeds:
                for variant in args.variants:
                    run_one(args, variant, patients, seed)
    result = collect(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"acdc_{args.preset}.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, RESULTS / f"acdc_{args.preset}.md")
    write_figures(result, args)
    print((RESULTS / f"acdc_{args.preset}.md").read_text())


if __name__ == "__main__":
    main()
