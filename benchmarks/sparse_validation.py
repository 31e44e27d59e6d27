"""Issue #26, item 4: the new DACL default (sparse heads, 512 sampled pixels per class) against the
old one (dense heads, 1024 pixels per class) on the validation split, one seed, 2D and 3D.

The old default's numbers are its committed runs (seed 0 of ``benchmarks/results/acdc_cpu.json``
at 7 labelled patients and ``chaos_cpu.json`` at 4 labelled volumes: their best validation Dice,
the score that picked their tested checkpoint). The new default's are runs of the same presets
and seed made with today's defaults and ``--no-test`` (the test split is not read)::

    python examples/acdc_cps_dacl.py --preset cpu --method dacl --labeled 7 --seed 0 --threads 1 --no-test \\
        --output-dir runs/sparse/acdc_cpu_dacl_p7_seed0
    python examples/synapse_cps_dacl.py --preset cpu --method dacl --dataset chaos --labeled 4 --seed 0 \\
        --threads 1 --no-test --output-dir runs/sparse/chaos_cpu_dacl_l4_s0
    python benchmarks/sparse_validation.py      # -> benchmarks/results/sparse_validation.{json,md}

Seed 0 is always listed; another seed is listed (with the mean difference over the seeds)
where a run of the new default exists for it (``..._seed1``, ``..._s1``; same commands).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CASES = (("ACDC 2D, 7 labelled patients (10 validation volumes)", "acdc_cpu.json", 7, "acdc_cpu_dacl_p7_seed{}"),
         ("CHAOS-T2 3D, 4 labelled volumes (2 validation volumes)", "chaos_cpu.json", 4, "chaos_cpu_dacl_l4_s{}"))


def _new_run(folder: Path):
    """Best validation Dice (%), its step and the commit of a new-default run; Nones if absent."""
    hist_file = folder / "val_history.json"
    if not hist_file.is_file():
        return None, None, None
    hist = json.loads(hist_file.read_text())["history"]
    best = max(hist, key=lambda h: h["mean_dice"])
    commit = json.loads((folder / "config.json").read_text()).get("commit")
    return 100.0 * best["mean_dice"], best["step"], commit


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "sparse")
    p.add_argument("--out", type=Path, default=RESULTS / "sparse_validation")
    args = p.parse_args(argv)
    rows = []
    for what, table, labeled, folder in CASES:
        old_row = next(r for r in json.loads((RESULTS / table).read_text())["rows"]
                       if r["variant"] == "dacl" and r["labeled"] == labeled)["best_val_dice"]
        diffs = []
        for seed in sorted(old_row, key=int):  # seed 0 always listed; the others where a new run exists
            new, steps, commit = _new_run(args.runs / folder.format(seed))
            if new is None and seed != "0":
                continue
            old = old_row[seed]
            diff = None if new is None else new - old
            if diff is not None:
                diffs.append(diff)
            rows.append({"what": what, "seed": int(seed), "old_default_best_val_dice": old,
                         "new_default_best_val_dice": new, "new_at_step": steps, "difference": diff,
                         "within_1_point": None if diff is None else abs(diff) <= 1.0, "new_commit": commit})
        if len(diffs) > 1:
            olds = [r["old_default_best_val_dice"] for r in rows if r["what"] == what and r["difference"] is not None]
            news = [r["new_default_best_val_dice"] for r in rows if r["what"] == what and r["difference"] is not None]
            mean = sum(diffs) / len(diffs)
            rows.append({"what": what, "seed": f"mean of {len(diffs)}", "old_default_best_val_dice": sum(olds) / len(olds),
                         "new_default_best_val_dice": sum(news) / len(news), "new_at_step": None,
                         "difference": mean, "within_1_point": abs(mean) <= 1.0, "new_commit": None})
    table = {"what": "best validation Dice (%) of DACL, per seed, the old default (dense heads, 1024 pixels per "
                     "class, its committed run) against the new one (sparse heads, 512 pixels per class), paired "
                     "by seed",
             "command": "python benchmarks/sparse_validation.py", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    fmt = lambda v, sign=False: "–" if v is None else (f"{v:+.2f}" if sign else f"{v:.2f}")  # noqa: E731
    lines = ["# DACL's new default against the old one, on validation (issue #26)", "", table["what"] + ".", "",
             f"Command: `{table['command']}` (the runs: see its docstring).", "",
             "| data | seed | old default | new default | new − old | within 1 point |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['seed']} | {fmt(r['old_default_best_val_dice'])} | "
              f"{fmt(r['new_default_best_val_dice'])}{'' if r['new_at_step'] is None else ' (step %d)' % r['new_at_step']} "
              f"| {fmt(r['difference'], True)} | "
              f"{ {True: 'yes', False: 'no', None: '–'}[r['within_1_point']]} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return table


if __name__ == "__main__":
    main()
