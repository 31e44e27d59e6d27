"""The one results aggregator: run the examples per variant and seed, collect their records.

For each variant and seed it runs the example (skipping runs whose ``metrics.json`` exists, so
it resumes), reads every run with ``examples/results_schema.py`` (any layout it knows) and writes
``benchmarks/results/<dataset>_<preset>.json`` (a :class:`results_schema.Table`: mean +- std over
seeds of test Dice, Jaccard, HD95, ASD, per-class Dice, the per-seed values and the differences
paired by seed), ``.md`` beside it (with the paper's numbers from ``benchmarks/paper_numbers.json``)
and the figures (test slices, validation curves). Model selection is by validation Dice inside
each run, never by the test split.

Usage::

    python benchmarks/collect.py acdc                              # sup, cps, dacl; seeds 0 1 2; 7 and 3 patients
    python benchmarks/collect.py acdc --collect-only               # rebuild the tables from run folders
    python benchmarks/collect.py acdc --variants II III IV V --patients 7   # Table 2 ablation rows (10 %)
    python benchmarks/collect.py chaos                              # the 3D example on CHAOS-T2: cps, dacl; seeds 0 1 2
    python benchmarks/collect.py render benchmarks/results/acdc_cpu.json     # the .md again from a table

Variants: ``sup``, ``cps`` (Table 2 I), ``dacl`` (Table 2 VI) and the Table 2 ablation rows ``II``
(plain contrastive: random anchors and positives, no bank, no w_i), ``III`` (density-aware, one
scale, no bank, no w_i), ``IV`` (multi-scale, no bank, no w_i), ``V`` (+ bank, no w_i); their
flags (:data:`VARIANTS`) are built from ``torch_dacl.ablation.TABLE2``. CHAOS-T2 stands in for Synapse: its numbers are not comparable with the paper's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAPER = ROOT / "benchmarks" / "paper_numbers.json"
sys.path.insert(0, str(ROOT / "examples"))
import results_schema as rs  # noqa: E402
from _cli import int_range  # noqa: E402

from torch_dacl.ablation import TABLE2  # noqa: E402  (Table 2's rows as the library defines them)


def _flags(options: Dict) -> List[str]:
    """The examples' command-line flags that set a Table 2 row's loss options."""
    out: List[str] = []
    for k, v in options.items():
        if k == "use_bank":
            out += [] if v else ["--no-bank"]
        else:
            out += [f"--{k.replace('_', '-')}", *map(str, v if isinstance(v, (tuple, list)) else [v])]
    return out


VARIANTS: Dict[str, List[str]] = {"sup": ["--method", "sup"], "cps": ["--method", "cps"],
                                  **{row: ["--method", "dacl", *_flags(TABLE2[row])] for row in ("II", "III", "IV", "V")},
                                  "dacl": ["--method", "dacl"]}
LABELS = {"sup": "supervised only", "cps": "CPS (Table 2 I)", "II": "II: + plain contrastive",
          "III": "III: + density-aware, single scale", "IV": "IV: + multi-scale", "V": "V: + memory bank",
          "dacl": "DACL (Table 2 VI: + w_i)"}
# (a, b): a − b paired by seed. Table 2's rows against CPS, and its last step: V → VI (the soft weights w_i).
PAIRS = (("dacl", "cps"), ("cps", "sup"), *((row, "cps") for row in ("II", "III", "IV", "V")), ("dacl", "V"))
NAMES = {"dice": "Dice", "jaccard": "Jaccard", "hd95": "HD95", "asd": "ASD"}

# Per dataset: the example, the run folders, the flags that set labeled count / output / threads,
# the defaults of this command, and which of the paper's datasets it is compared with (None: not comparable).
DATASETS = {
    "acdc": dict(example="examples/acdc_cps_dacl.py", runs="runs/table", folder="acdc_{preset}_{variant}_p{labeled}_seed{seed}",
                 flags=lambda labeled, out: ["--labeled-patients", str(labeled), "--output-dir", str(out)],
                 labeled=[7, 3], labeled_choices=[3, 7], variants=["sup", "cps", "dacl"], seeds=[0, 1, 2], paper="acdc",
                 threads=1, preset="cpu"),
    "chaos": dict(example="examples/synapse_cps_dacl.py", runs="runs/synapse", folder="chaos_{preset}_{variant}_l{labeled}_s{seed}",
                  flags=lambda labeled, out: ["--dataset", "chaos", "--labeled", str(labeled), "--out", str(out),
                                              "--no-progress"],
                  labeled=[4], labeled_choices=[2, 4], variants=["cps", "dacl"], seeds=[0, 1, 2], paper=None, threads=1,
                  preset="cpu"),
}


def run_dir(runs: Path, dataset: str, preset: str, variant: str, labeled: int, seed: int) -> Path:
    return runs / DATASETS[dataset]["folder"].format(preset=preset, variant=variant, labeled=labeled, seed=seed)


def run_one(args, variant: str, labeled: int, seed: int) -> Path:
    spec = DATASETS[args.dataset]
    out = run_dir(args.runs, args.dataset, args.preset, variant, labeled, seed)
    if (out / "metrics.json").is_file():
        print(f"[skip] {out.name}: metrics.json exists")
        return out
    cmd = [sys.executable, str(ROOT / spec["example"]), "--preset", args.preset, *VARIANTS[variant],
           "--seed", str(seed), *spec["flags"](labeled, out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if (out / "last.pt").is_file():
        cmd += ["--resume"]
    print("[run]", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"[done] {out.name} in {time.time() - t0:.0f} s", flush=True)
    return out


# ----------------------------------------------------------------------------- aggregation
def _stat(per_seed: Dict[str, Optional[float]]) -> rs.Stat:
    xs = [v for v in per_seed.values() if v is not None]
    return rs.Stat(statistics.mean(xs) if xs else None, (statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else None,
                   {s: v for s, v in per_seed.items() if v is not None})


def _scale(metric: str) -> float:
    return 100.0 if rs.TABLE_UNITS.get(metric) == "%" else 1.0


def row_from_records(variant: str, records: Sequence[rs.RunRecord]) -> rs.TableRow:
    """One table row from the runs of one variant and labeled count (one record per seed)."""
    first = records[0]
    by_seed = {str(r.identity.seed): r for r in records}

    def scaled(m: str, v: Optional[float]) -> Optional[float]:
        return None if v is None else v * _scale(m)

    return rs.TableRow(
        dataset=first.identity.dataset, variant=variant, method=first.identity.method, labeled=first.identity.labeled,
        labeled_unit=first.identity.labeled_unit, seeds=[int(s) for s in by_seed],
        num_test_cases=first.test.num_cases,
        metrics={m: _stat({s: scaled(m, r.test.mean.get(m)) for s, r in by_seed.items()}) for m in rs.METRICS},
        per_class={m: {c: _stat({s: scaled(m, r.test.per_class[m].get(c)) for s, r in by_seed.items()})
                       for c in first.test.classes} for m in rs.METRICS},
        best_val_dice={s: 100 * r.best.val_mean_dice for s, r in by_seed.items() if r.best.val_mean_dice is not None},
        wall_seconds={s: r.timing.wall_seconds for s, r in by_seed.items()},
        train_seconds={s: t for s, r in by_seed.items() if (t := _train_seconds(r)) is not None},
        empty_cases={s: r.test.empty_cases for s, r in by_seed.items() if r.test.empty_cases is not None},
        empty_convention=first.test.empty_convention,
        commands={s: r.command for s, r in by_seed.items() if r.command})


def _train_seconds(r: rs.RunRecord) -> Optional[float]:
    """Seconds in training steps over the whole run: the validation history counts them across
    resumes (records written by a resumed run before this was fixed hold only the last process's)."""
    last = r.val_history[-1].train_seconds if r.val_history else None
    return last if last else r.timing.train_seconds


def paired_differences(rows: Sequence[rs.TableRow]) -> List[rs.Paired]:
    """Test Dice differences of the :data:`PAIRS` found in ``rows``, paired by seed (the seeds share
    the split and the initialisation, so the paired difference is the fairer comparison)."""
    out = []
    for labeled in sorted({r.labeled for r in rows}, reverse=True):
        by = {r.variant: r.metrics["dice"].per_seed for r in rows if r.labeled == labeled}
        for a, b in PAIRS:
            seeds = sorted(set(by.get(a, {})) & set(by.get(b, {})), key=int)
            if seeds:
                diffs = [by[a][s] - by[b][s] for s in seeds]
                st = _stat(dict(zip(seeds, diffs)))
                out.append(rs.Paired(labeled, a, b, [int(s) for s in seeds], diffs, st.mean, st.std,
                                     sum(d > 0 for d in diffs)))
    return out


def collect(args) -> rs.Table:
    """Every run record under ``args.runs`` of this dataset and preset, whatever this call ran: all variants
    and all label counts found (the ones asked for first), so running a subset (``--variants II --patients 7``)
    never drops the other rows from the written table."""
    spec, rows = DATASETS[args.dataset], []
    for labeled in dict.fromkeys([*args.labeled, *spec["labeled"], *spec["labeled_choices"]]):
        for variant in VARIANTS:
            records = []
            for seed in sorted(set(args.seeds) | set(range(10))):
                f = run_dir(args.runs, args.dataset, args.preset, variant, labeled, seed) / "metrics.json"
                if f.is_file():
                    records.append(rs.load(f))
            if records:
                rows.append(row_from_records(variant, records))
    notes = sorted({n for r in rows for n in [r.empty_convention] if n})
    return rs.Table(dataset=args.dataset, preset=args.preset, rows=rows, paired=paired_differences(rows),
                    command=collect_command(args),
                    notes=[f"empty masks: {n}" for n in notes])


def collect_command(args) -> str:
    """The command that rewrites the table from the run folders alone (whatever ran to make them)."""
    spec, cmd = DATASETS[args.dataset], ["python", "benchmarks/collect.py", args.dataset, "--collect-only"]
    if args.preset != spec["preset"]:
        cmd += ["--preset", args.preset]
    if Path(args.runs).resolve() != (ROOT / spec["runs"]).resolve():
        cmd += ["--runs", str(args.runs)]
    return " ".join(cmd)


# ----------------------------------------------------------------------------- the paper's numbers
def paper() -> Dict:
    return json.loads(PAPER.read_text())


def paper_row(dataset: Optional[str], labeled: int, variant: str) -> Optional[Dict[str, str]]:
    """The paper's numbers for a row, as printed ("90.91+-0.5"): Table 1 (Dice, Jaccard, ASD) for
    sup / cps / dacl, else Table 2's Dice; None when the paper has no such row."""
    if dataset is None:
        return None
    p = paper()
    setting = next((k for k, v in p["settings"][dataset].items() if v == labeled), None)
    name = p["methods"]["table1"].get(variant)
    t1 = p["table1"][dataset].get(setting, {}) if setting else {}
    if name in t1:
        return {"source": "Table 1", **dict(zip(("dice", "jaccard", "asd"), t1[name]))}
    row = p["methods"]["table2"].get(variant)
    if row and setting == p["methods"]["table2_setting"]:
        col = p["table2"]["columns"].index("ACDC" if dataset == "acdc" else "Synapse")
        return {"source": "Table 2", "dice": p["table2"]["rows"][row][col]}
    return None


def _value(s: str) -> float:
    return float(s.split("+-")[0])


# ----------------------------------------------------------------------------- markdown
def _pm(st: rs.Stat, n: int) -> str:
    if st.mean is None:
        return "–"
    return f"{st.mean:.2f}" if n == 1 else f"{st.mean:.2f} ± {st.std:.2f}"


def paired_mean(d: rs.Paired) -> str:
    """A paired difference's mean with its spread over seeds; one seed has none and says so."""
    return f"{d.mean:+.2f} ± {d.std:.2f}" if len(d.diffs) > 1 else f"{d.mean:+.2f} (one seed: no spread)"


def pair_name(d: rs.Paired) -> str:
    """``"a − b"`` with the rows' names; a Table 2 row subtracted is named by its number ("DACL − V")."""
    return f"{LABELS[d.a].split(' (')[0]} − {LABELS[d.b].split(' (')[0].split(':')[0]}"


def paired_text(d: rs.Paired) -> str:
    """A paired difference as the tables print it: mean, spread, each seed's value and the win count."""
    per = ", ".join(f"seed {s}: {x:+.2f}" for s, x in zip(d.seeds, d.diffs))
    return f"{paired_mean(d)} ({per}; better in {d.wins} of {len(d.diffs)})"


def class_names(rows: Sequence[rs.TableRow]) -> List[str]:
    """The foreground classes of these rows (those with a per-class Dice), in first-seen order."""
    return list(dict.fromkeys(c for r in rows for c in r.per_class.get("dice", {})))


def markdown(table: rs.Table) -> str:
    comparable = DATASETS.get(table.dataset, {}).get("paper")
    u = table.units
    metrics = [m for m in rs.METRICS if any(r.metrics[m].mean is not None for r in table.rows)]
    lines = [f"# {table.dataset.upper()}, `{table.preset}` preset" + (": measured next to the paper" if comparable else ""),
             "", f"Generated by `{table.command}` from the run records; do not edit by hand.",
             "Model chosen by validation Dice; " + ", ".join(f"{NAMES[m]} in {u[m]}" for m in metrics)
             + "; mean ± std over seeds (a single value: one seed). Variant flags: `benchmarks/collect.py` VARIANTS.",
             ""]
    if comparable:
        lines += ["The paper's columns: Table 1 (its supervised row is a V-Net; it reports no HD95) or, for the "
                  "ablation rows, Table 2's Dice; from `benchmarks/paper_numbers.json`.", ""]
    lines += [f"- {n}" for n in table.notes] + ([""] if table.notes else [])
    for labeled in sorted({r.labeled for r in table.rows}, reverse=True):
        rows = [r for r in table.rows if r.labeled == labeled]
        classes = class_names(rows)
        minutes = any(r.train_seconds for r in rows)  # tables collected before train_seconds: wall seconds
        head = ["method", "seeds", "test cases", "train (min)" if minutes else "wall (s)",
                *(NAMES[m] for m in metrics), *(f"{c} Dice" for c in classes)]
        if comparable:
            head += ["paper Dice", "paper Jaccard", "paper ASD"]
        lines += [f"## {labeled} labeled {rows[0].labeled_unit}", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for r in rows:
            n = len(r.seeds)
            cells = [LABELS.get(r.variant, r.variant), str(n), str(r.num_test_cases or "–"),
                     ("/".join(f"{t / 60:.0f}" for t in r.train_seconds.values()) if minutes else
                      "/".join(f"{w:.0f}" for w in r.wall_seconds.values())) or "–",
                     *(_pm(r.metrics[m], n) for m in metrics), *(_pm(r.per_class.get("dice", {}).get(c, rs.Stat(None, None)), n) for c in classes)]
            if comparable:
                p = paper_row(comparable, labeled, r.variant) or {}
                cells += [p.get(k, "–").replace("+-", " ± ") + (" (Table 2)" if k == "dice" and p.get("source") == "Table 2"
                                                                  else "") for k in ("dice", "jaccard", "asd")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        pairs = [d for d in table.paired if d.labeled == labeled]
        if pairs:
            lines += ["Test Dice differences paired by seed (same split and initialisation):", ""]
            for d in pairs:
                pa, pb = (paper_row(comparable, labeled, v) for v in (d.a, d.b))
                ptxt = f"; the paper: {_value(pa['dice']) - _value(pb['dice']):+.2f}" if pa and pb else ""
                lines.append(f"- {pair_name(d)}: {paired_text(d)}{ptxt}")
            lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures
def write_figures(table: rs.Table, args) -> None:
    """Test slices (ground truth and each method's prediction, lowest seed; the legend names the
    table's classes) and the validation curves."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - optional
        print("[figures skipped] matplotlib is not installed")
        return
    labeled, seed0 = max(args.labeled), min(args.seeds)
    stem = args.results / f"{args.dataset}_{args.preset}"
    slices = [(v, run_dir(args.runs, args.dataset, args.preset, v, labeled, seed0) / "test_slices.npz")
              for v in ("sup", "cps", "dacl")]
    if any(f.is_file() for _, f in slices):
        from acdc_plot import load_slices, render  # type: ignore

        classes = class_names(table.rows)
        render([(v, load_slices(f)) for v, f in slices if f.is_file()], Path(f"{stem}_overlays.png"),
               class_names=["background", *classes] if classes else None)  # the dataset's legend
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for variant in VARIANTS:  # mean over the seeds found, band from the lowest to the highest seed
        curves = []
        for seed in sorted(set(args.seeds) | set(range(10))):
            f = run_dir(args.runs, args.dataset, args.preset, variant, labeled, seed) / "metrics.json"
            if f.is_file() and (hist := rs.load(f).val_history):
                curves.append({p.step: 100 * p.mean_dice for p in hist})
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        ys = [[c[t] for c in curves] for t in steps]
        line, = ax.plot(steps, [statistics.mean(y) for y in ys], marker="o",
                        label=f"{variant} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        if len(curves) > 1:
            ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.15)
    if ax.lines:
        ax.set(xlabel="training step", ylabel="validation Dice (%)")
        ax.set_title(f"{args.dataset} {args.preset}, {labeled} labeled: mean over seeds, band = min-max", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{stem}_val_curves.png", dpi=120)
    plt.close(fig)


def write(table: rs.Table, results: Path) -> Path:
    stem = results / f"{table.dataset}_{table.preset}"
    table.save(stem.with_suffix(".json"))
    stem.with_suffix(".md").write_text(markdown(table))
    return stem.with_suffix(".md")


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=[*DATASETS, "render"], help="which example to run and collect; render: "
                   "write the .md of the table JSON files given as --tables")
    p.add_argument("tables", nargs="*", type=Path, help="render: table JSON files")
    p.add_argument("--preset", default=None, help="default: cpu (both datasets)")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), help="default: the dataset's")
    p.add_argument("--seeds", nargs="+", type=int_range(0), default=None, help="default: acdc 0 1 2, chaos 0 1")
    p.add_argument("--labeled", "--patients", nargs="+", type=int_range(1), default=None, dest="labeled",
                   help="labeled patients (acdc: 7 3) or volumes (chaos: 4 2); default acdc 7 3, chaos 4")
    p.add_argument("--runs", type=Path, default=None, help="where the run folders are (default runs/table, runs/synapse)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the tables and figures go")
    p.add_argument("--threads", type=int_range(1), default=None, help="torch threads per run (default: 1)")
    p.add_argument("--collect-only", action="store_true", help="run nothing, only collect the run folders")
    args = p.parse_args(argv)
    if args.dataset == "render":
        for t in args.tables:
            print(write(rs.load_table(t), t.parent).read_text())
        return
    spec = DATASETS[args.dataset]
    args.preset = args.preset or spec["preset"]
    args.variants = args.variants or spec["variants"]
    args.seeds = args.seeds or spec["seeds"]
    args.labeled = args.labeled or spec["labeled"]
    args.runs = args.runs or ROOT / spec["runs"]
    args.threads = args.threads or spec["threads"]
    bad = [n for n in args.labeled if n not in spec["labeled_choices"]]
    if bad:
        p.error(f"{args.dataset}: --labeled {bad} not in {spec['labeled_choices']}")
    if not args.collect_only:
        for labeled in args.labeled:
            for seed in args.seeds:
                for variant in args.variants:
                    run_one(args, variant, labeled, seed)
    table = collect(args)
    if not table.rows:
        print(f"no run records under {args.runs} for {args.dataset} {args.preset}; nothing written")
        return
    args.results.mkdir(parents=True, exist_ok=True)
    md = write(table, args.results)
    write_figures(table, args)
    print(md.read_text())


if __name__ == "__main__":
    main()
