"""Issue #27: where DACL's effect goes. Runs the hypotheses' variants of the ACDC ``cpu`` preset
on the validation split only, and tabulates them.

Every run validates on all 20 validation volumes every 500 steps and stops before the test
split (``--val-volumes 0 --no-test``). Its **score** is the mean validation Dice of its last
three validations (steps 2000, 2500, 3000 of the preset; 8000, 8500, 9000 of ``H1-long``): less
noisy than the best single checkpoint on 10 volumes, and not chosen by looking at the curve.

Variants (the examples' flags; ``--hypothesis`` names are defined once, in
``examples/engine.py``'s ``HYPOTHESES``):

==============  =======================================================  ==========
variant         what                                                      patients
==============  =======================================================  ==========
cps, dacl       the baselines                                             7
II              Table 2's row II (plain contrastive), for the mechanism   7
H3-labeled      DACL on labeled pixels only (no pseudo labels)            7
H3-agree        pseudo labels only where both models agree                7
H4-stage2       heads one decoder stage earlier (half resolution)        7
H5-constant     lambda_CL constant 0.5 after the warm-up (Fig. 5a)        7
H1-long-cps     CPS, 3x longer (9000 steps), bfloat16 autocast            3
H1-long-dacl    DACL, 3x longer (9000 steps), bfloat16 autocast           3
H1-short-cps    CPS, the preset's 3000 steps, bfloat16 autocast           3
H1-short-dacl   DACL, the preset's 3000 steps, bfloat16 autocast          3
==============  =======================================================  ==========

Each row's "− CPS" and "− DACL" are paired by seed with the baselines *of its own budget*: the
7-patient rows with ``cps`` and ``dacl``, the ``H1-long`` rows with each other, the ``H1-short``
rows with each other. H1 reads the two budgets' DACL − CPS side by side: the short pair is the
same protocol as the long one (3 patients, bfloat16, one commit) at the preset's 3000 steps, so
the only difference between the two gaps is the budget. H1's verdict (``h1_verdict``) is fixed
in advance: supported when the 9000-step gap is positive beyond its spread and grows beyond the
larger of the two gaps' spreads, on two seeds of each pair.

The two ``H1-long`` runs use bfloat16 autocast (``--amp bf16``), both of them, so the pair
stays paired: on this project's CPU (AVX512-BF16) a DACL step takes 0.67x the float32 one
(``benchmarks/step_cost.py --variants dacl "dacl, bf16"``): a 3000-step float32 run took about
70 minutes on one core beside another run, so 9000 steps take about 2.3 hours instead of 3.5;
the recipe sweep found bf16 level with float32 on validation. ``--checkout`` runs another
checkout's example (a worktree of one pinned commit: the table's runs share commit ``e1f4b6e``).

Usage::

    python benchmarks/hypotheses.py run --variants cps dacl --seeds 0 1     # missing runs (resumes)
    python benchmarks/hypotheses.py collect    # -> benchmarks/results/acdc_hypotheses.{json,md}

A finished run's small files (``config.json``, ``val_history.json``, ``mechanism.json``) are
copied to ``benchmarks/results/hypotheses_runs/<run>/`` (``--records``), to be committed: the
run folders under ``runs/`` do not outlive the machine, the records do. ``run`` skips a run
that has a record; ``collect`` reads the records and, for runs not recorded, ``runs/``.

Runs of seed 0 of ``cps``, ``dacl`` and ``II`` also record the mechanism through training
(``--mechanism-every 500``; ``benchmarks/mechanism_curves.py`` plots it). A variant *moves*
when its mean score beats both baselines' by more than their larger seed spread (std), decided
once the variant and both baselines have two seeds each; only those would get test seeds
(issue #27, item 3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "examples"))
from _cli import int_range  # noqa: E402

VARIANTS: Dict[str, dict] = {
    "cps": dict(flags=["--method", "cps"], patients=7, what="CPS (baseline)"),
    "dacl": dict(flags=["--method", "dacl"], patients=7, what="DACL (baseline)"),
    "II": dict(flags=["--method", "dacl", "--table2-row", "II"], patients=7, what="Table 2 II: plain contrastive"),
    "H3-labeled": dict(flags=["--method", "dacl", "--hypothesis", "H3-labeled"], patients=7,
                       what="H3: DACL on labeled pixels only"),
    "H3-agree": dict(flags=["--method", "dacl", "--hypothesis", "H3-agree"], patients=7,
                     what="H3: pseudo labels where both models agree"),
    "H4-stage2": dict(flags=["--method", "dacl", "--hypothesis", "H4-stage2"], patients=7,
                      what="H4: heads one decoder stage earlier"),
    "H5-constant": dict(flags=["--method", "dacl", "--hypothesis", "H5-constant"], patients=7,
                        what="H5: lambda_CL constant 0.5 after the warm-up"),
    "H1-long-cps": dict(flags=["--method", "cps", "--hypothesis", "H1-long", "--amp", "bf16"], patients=3,
                        what="H1: CPS, 3x longer (3 patients, bf16)"),
    "H1-long-dacl": dict(flags=["--method", "dacl", "--hypothesis", "H1-long", "--amp", "bf16"], patients=3,
                         what="H1: DACL, 3x longer (3 patients, bf16)"),
    "H1-short-cps": dict(flags=["--method", "cps", "--amp", "bf16"], patients=3,
                         what="H1: CPS, the preset's budget (3 patients, bf16)"),
    "H1-short-dacl": dict(flags=["--method", "dacl", "--amp", "bf16"], patients=3,
                          what="H1: DACL, the preset's budget (3 patients, bf16)"),
}
MECHANISM = ("cps", "dacl", "II")  # seed 0 of these records the mechanism through training
# the (CPS, DACL) pair each variant is compared with: the baselines of its own budget
PAIRS = (("H1-long-cps", "H1-long-dacl"), ("H1-short-cps", "H1-short-dacl"))
BASELINES = {v: next((p for p in PAIRS if v in p), ("cps", "dacl")) for v in VARIANTS}
COMMON = ["--preset", "cpu", "--val-volumes", "0", "--val-every", "500", "--no-test", "--threads", "1",
          "--no-progress"]
LAST = 3  # the score: mean of the last three validations
RECORDS = RESULTS / "hypotheses_runs"  # finished runs' small files, committed
KEEP = ("config.json", "val_history.json", "mechanism.json")


def run_dir(runs: Path, variant: str, seed: int) -> Path:
    return runs / f"acdc_cpu_{variant}_p{VARIANTS[variant]['patients']}_seed{seed}"


def history(folder: Path) -> Optional[dict]:
    """The run's validation history and config, from ``val_history.json`` (finished runs) or
    ``last.pt`` (runs still going); None where the folder holds neither."""
    vh = folder / "val_history.json"
    if vh.is_file():
        d = json.loads(vh.read_text())
        cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        return {"history": d["history"], "config": cfg, "finished": True}
    if (folder / "last.pt").is_file():
        import torch

        ck = torch.load(folder / "last.pt", map_location="cpu", weights_only=False)
        return {"history": ck["history"], "config": ck["config"], "finished": ck["step"] >= ck["config"]["steps"]}
    return None


def score(hist: List[dict], steps: int) -> Optional[float]:
    """Mean validation Dice (%) of the last three validations, once the run has them all."""
    if len(hist) < LAST or hist[-1]["step"] < steps:
        return None
    return 100.0 * statistics.mean(h["mean_dice"] for h in hist[-LAST:])


def keep(out: Path, records: Path) -> Path:
    """Copy a finished run's small files (``KEEP``) to ``records/<run>/``."""
    dest = records / out.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        if (out / name).is_file():
            shutil.copy2(out / name, dest / name)
    return dest


def run(args) -> None:
    for variant in args.variants:
        for seed in args.seeds:
            out = run_dir(args.runs, variant, seed)
            if (args.records / out.name / "val_history.json").is_file():
                print(f"[skip] {out.name}: recorded in {args.records}")
                continue
            h = history(out)
            if h is not None and h["finished"]:
                print(f"[skip] {out.name}: finished; recorded in {keep(out, args.records)}")
                continue
            cmd = [sys.executable, str(args.checkout / "examples" / "acdc_cps_dacl.py"), *COMMON,
                   *VARIANTS[variant]["flags"],
                   "--labeled", str(VARIANTS[variant]["patients"]), "--seed", str(seed), "--output-dir", str(out)]
            if variant in MECHANISM and seed == 0:
                cmd += ["--mechanism-every", "500"]
            if (out / "last.pt").is_file():
                cmd += ["--resume"]
            print("[run]", " ".join(cmd[1:]), flush=True)
            t0 = time.time()
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(args.checkout),
                                                                             os.environ.get("PYTHONPATH")])))
            subprocess.run(cmd, check=True, cwd=args.checkout, env=env)
            print(f"[done] {out.name} in {time.time() - t0:.0f} s; recorded in {keep(out, args.records)}", flush=True)


def _stat(xs: Sequence[float]) -> dict:
    """Mean, std and count; the std of one seed is None (unknown, not 0)."""
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)} if xs \
        else {"mean": None, "std": None, "n": 0}


def h1_verdict(short: dict, long: dict) -> Optional[str]:
    """H1 (the budget), decided like the rows' "moves": on two seeds of each pair, never fewer.

    "supported" when DACL − CPS at 9000 steps is positive beyond its own spread (its mean exceeds
    its standard deviation over seeds) *and* exceeds DACL − CPS at 3000 steps by more than the
    larger of the two gaps' standard deviations: a longer budget lets DACL pull ahead of CPS.
    "not supported" otherwise; None (undecided) while either gap has fewer than two seeds.
    The rule was fixed before any 9000-step run had finished.
    """
    if min((short or {}).get("n", 0), (long or {}).get("n", 0)) < 2:
        return None
    margin = max(short["std"], long["std"])
    grows = long["mean"] - short["mean"] > margin and long["mean"] > long["std"]
    return "supported" if grows else "not supported"


def collect(args) -> dict:
    rows = []
    for variant, spec in VARIANTS.items():
        per_seed, steps_done, commits = {}, {}, set()
        pattern = f"acdc_cpu_{variant}_p{spec['patients']}_seed*"
        folders = {f.name: f for f in args.runs.glob(pattern)}
        folders.update({f.name: f for f in args.records.glob(pattern)})  # a record wins over runs/
        for _, folder in sorted(folders.items()):
            h = history(folder)
            if h is None:
                continue
            seed = folder.name.rsplit("seed", 1)[1]
            steps_done[seed] = h["history"][-1]["step"] if h["history"] else 0
            commits.add(h["config"].get("commit") or "unknown")
            s = score(h["history"], h["config"]["steps"])
            if s is not None:
                per_seed[seed] = s
        rows.append({"variant": variant, "what": spec["what"], "patients": spec["patients"], "scores": per_seed,
                     "score": _stat(list(per_seed.values())), "steps_done": steps_done, "commits": sorted(commits)})
    by = {r["variant"]: r for r in rows}
    for r in rows:  # paired by seed with the baselines of its own budget ("minus_cps", "minus_dacl")
        pair = BASELINES[r["variant"]]
        r["baselines"] = list(pair)
        for key, base in zip(("minus_cps", "minus_dacl"), pair):
            if base == r["variant"]:
                continue
            common = sorted(set(r["scores"]) & set(by[base]["scores"]))
            r[key] = _stat([r["scores"][s] - by[base]["scores"][s] for s in common])
        bases = [by[b]["score"] for b in pair]
        # decided on two seeds of the variant and of each baseline (a spread needs two); with fewer,
        # "moves" stays undecided: one lucky seed is not a variant that moves
        if r["variant"] not in pair and r["score"]["n"] > 1 and all(b["n"] > 1 for b in bases):
            margin = max(b["std"] for b in bases)
            r["moves"] = r["score"]["mean"] - max(b["mean"] for b in bases) > margin
    # H1: DACL - CPS at the 3x budget against the same at the preset's budget (3 patients, bf16, both)
    h1 = {budget: by[f"H1-{budget}-dacl"]["minus_cps"] for budget in ("short", "long")}
    h1["verdict"] = h1_verdict(h1["short"], h1["long"])
    table = {"what": "ACDC cpu preset, validation split only (all 20 volumes); score = mean validation Dice (%) of "
                     f"the last {LAST} validations (every 500 steps); differences paired by seed, each row against "
                     "the CPS and DACL of its own budget",
             "command": "python benchmarks/hypotheses.py collect", "rows": rows, "h1": h1}
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    out.with_suffix(".md").write_text(markdown(table))
    print(markdown(table))
    return table


def _fmt(st: Optional[dict], signed: bool = False) -> str:
    if not st or st.get("n", 0) == 0 or st["mean"] is None:
        return "–"
    mean = f"{st['mean']:+.2f}" if signed else f"{st['mean']:.2f}"
    return mean if st["std"] is None else f"{mean} ± {st['std']:.2f}"


def markdown(table: dict) -> str:
    lines = [f"# Where DACL's effect goes: the hypotheses on validation (issue #27)", "",
             table["what"] + ".", "", f"Command: `{table['command']}` (runs: `python benchmarks/hypotheses.py run`).", "",
             "| variant | patients | score, mean ± std (seeds) | per seed | − CPS | − DACL | beats both beyond the "
             "spread | commit |", "|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        per = ", ".join(f"{s}: {v:.2f}" for s, v in sorted(r["scores"].items())) or \
            ", ".join(f"{s}: step {n}" for s, n in sorted(r["steps_done"].items())) or "not run"
        moves = {True: "yes", False: "no"}.get(r.get("moves"), "–")
        lines.append(f"| {r['what']} | {r['patients']} | {_fmt(r['score'])} ({r['score']['n']}) | {per} | "
                     f"{_fmt(r.get('minus_cps'), True)} | {_fmt(r.get('minus_dacl'), True)} | {moves} | "
                     f"{', '.join(r['commits']) or '–'} |")
    h1 = table["h1"]
    gaps = ", ".join(f"{_fmt(h1[b], True)} ({h1[b]['n']} seed{'' if h1[b]['n'] == 1 else 's'}) at {steps} steps"
                     for b, steps in (("short", 3000), ("long", 9000)))
    verdict = h1.get("verdict") or "undecided (two seeds of each pair decide it)"
    lines += ["", f"H1 (budget), DACL − CPS paired by seed at 3 patients: {gaps}. H1: {verdict}."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("run", "collect"))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int_range(0), default=[0, 1])
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "hyp")
    p.add_argument("--checkout", type=Path, default=ROOT,
                   help="the checkout whose example and library the runs use (default: this one); e.g. a git worktree "
                        "of one pinned commit, so that every run of the table shares it")
    p.add_argument("--records", type=Path, default=RECORDS,
                   help="finished runs' small files, committed (default benchmarks/results/hypotheses_runs)")
    p.add_argument("--out", type=Path, default=RESULTS / "acdc_hypotheses")
    args = p.parse_args(argv)
    if args.action == "run":
        run(args)
        return None
    return collect(args)


if __name__ == "__main__":
    main()
