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
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CASES = (("ACDC 2D, 7 labelled patients (10 validation volumes)", "acdc_cpu.json", 7, "acdc_cpu_dacl_p7_seed0"),
         ("CHAOS-T2 3D, 4 labelled volumes (2 validation volumes)", "chaos_cpu.json", 4, "chaos_cpu_dacl_l4_s0"))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "sparse")
    p.add_argument("--out", type=Path, default=RESULTS / "sparse_validation")
    args = p.parse_args(argv)
    rows = []
    for what, table, labeled, folder in CASES:
        old = next(r for r in json.loads((RESULTS / table).read_text())["rows"]
                   if r["variant"] == "dacl" and r["labeled"] == labeled)["best_val_dice"]["0"]
        hist_file = args.runs / folder / "val_history.json"
        new = steps = commit = None
        if hist_file.is_file():
            hist = json.loads(hist_file.read_text())["history"]
            best = max(hist, key=lambda h: h["mean_dice"])
            new, steps = 100.0 * best["mean_dice"], best["step"]
            cfg = json.loads((args.runs / folder / "config.json").read_text())
            commit = cfg.get("commit")
        rows.append({"what": what, "old_default_best_val_dice": old, "new_default_best_val_dice": new,
                     "new_at_step": steps, "difference": None if new is None else new - old,
                     "within_1_point": None if new is None else abs(new - old) <= 1.0, "new_commit": commit})
    table = {"what": "best validation Dice (%) of DACL seed 0, the old default (dense heads, 1024 pixels per class, "
                     "its committed run) against the new one (sparse heads, 512 pixels per class)",
             "command": "python benchmarks/sparse_validation.py", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    fmt = lambda v, sign=False: "–" if v is None else (f"{v:+.2f}" if sign else f"{v:.2f}")  # noqa: E731
    lines = ["# DACL's new default against the old one, on validation (issue #26)", "", table["what"] + ".", "",
             f"Command: `{table['command']}` (the runs: see its docstring).", "",
             "| data | old default | new default | new − old | within 1 point |", "|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {fmt(r['old_default_best_val_dice'])} | {fmt(r['new_default_best_val_dice'])} "
              f"(step {r['new_at_step']}) | {fmt(r['difference'], True)} | "
              f"{ {True: 'yes', False: 'no', None: '–'}[r['within_1_point']]} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return table


if __name__ == "__main__":
    main()
