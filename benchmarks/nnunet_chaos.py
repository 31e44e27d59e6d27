"""nnU-Net's default trainer against ``nnUNetTrainerDACL`` on CHAOS-T2, one fold, a short schedule
(issue #28, item 5), with nnU-Net's own commands.

1. ``examples/convert_to_nnunet.py chaos`` writes CHAOS-T2 (the examples' data lookup finds it)
   in nnU-Net's raw format (``Dataset501_CHAOS_T2``).
2. ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` with the target spacing of the 3D example's
   ``cpu`` preset (7.7 x 5 x 5 mm, 4x coarser in plane than CHAOS-T2's 1.25 mm; plans
   ``nnUNetPlans_5mm``), so that a CPU trains it.
3. ``nnUNetv2_train 501 3d_fullres FOLD`` with nnU-Net's default trainer and with
   ``nnUNetTrainerDACL``, both shortened to the same schedule (``--schedule``, default
   ``10x25``: 10 epochs of 25 iterations, from ``benchmarks/nnunet_trainers``; nnU-Net's own
   ``nnUNetTrainer_<E>epochs`` run 250 iterations per epoch, too long for a CPU session) and
   everything else nnU-Net's, on the CPU, side by side.
4. Collects each fold's validation Dice (nnU-Net's own ``validation/summary.json``: the mean over
   the foreground classes and per class), the epochs and the time per epoch (its training log)
   into ``benchmarks/results/nnunet_chaos.json`` and ``.md``.

Usage::

    python benchmarks/nnunet_chaos.py                          # both trainers, fold 0, 10 x 25 iterations
    python benchmarks/nnunet_chaos.py --collect-only           # the tables from finished runs

Everything goes to ``--work`` (default ``runs/nnunet_chaos``); a finished trainer is not run
again. nnU-Net's training on the CPU uses every core (``torch.set_num_threads``); the two
trainers share them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "examples"))
from _cli import int_range  # noqa: E402

DATASET, NAME, PLANS = 501, "Dataset501_CHAOS_T2", "nnUNetPlans_5mm"
SPACING = ("7.7", "5", "5")  # (z, y, x) mm: the 3D example's cpu preset grid
CLASSES = {"1": "liver", "2": "right kidney", "3": "left kidney", "4": "spleen"}


def env_for(work: Path) -> Dict[str, str]:
    from torch_dacl.nnunet import trainer_folder

    env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(work / "results"), nnUNet_compile="f",
               nnUNet_extTrainer=os.pathsep.join([str(trainer_folder()), str(ROOT / "benchmarks" / "nnunet_trainers")]),
               nnUNet_def_n_proc="1", OMP_WAIT_POLICY="PASSIVE")
    env.pop("nnUNet_n_proc_DA", None)
    return env


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def prepare(work: Path, data_root: Optional[str], env: Dict[str, str]) -> None:
    from _data import resolve_data_root

    raw = work / "raw" / NAME
    if not (raw / "dataset.json").is_file():
        src = resolve_data_root(data_root, "chaos", download=True) / "CHAOS-T2"
        subprocess.run([sys.executable, str(ROOT / "examples" / "convert_to_nnunet.py"), "chaos", str(src), str(raw)],
                       check=True, env=env)
    if not (work / "preprocessed" / NAME / f"{PLANS}.json").is_file():
        subprocess.run([_bin("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET), "-c", "3d_fullres", "-np", "1",
                        "--verify_dataset_integrity", "-overwrite_target_spacing", *SPACING,
                        "-overwrite_plans_name", PLANS], check=True, env=env)


def fold_dir(work: Path, trainer: str, fold: int) -> Path:
    return work / "results" / NAME / f"{trainer}__{PLANS}__3d_fullres" / f"fold_{fold}"


def train(work: Path, trainers: Sequence[str], fold: int, env: Dict[str, str]) -> None:
    procs = []
    for trainer in trainers:
        if (fold_dir(work, trainer, fold) / "validation" / "summary.json").is_file():
            print(f"[skip] {trainer}: finished")
            continue
        cmd = [_bin("nnUNetv2_train"), str(DATASET), "3d_fullres", str(fold), "-tr", trainer, "-p", PLANS,
               "-device", "cpu"]
        if (fold_dir(work, trainer, fold) / "checkpoint_latest.pth").is_file():
            cmd.append("--c")
        log = open(work / f"{trainer}_fold{fold}.log", "a")
        print("[run]", shlex.join(cmd[1:]), flush=True)
        procs.append((trainer, subprocess.Popen(cmd, env={**env, "nnUNet_n_proc_DA": "0"}, stdout=log,
                                                stderr=subprocess.STDOUT)))
    for trainer, p in procs:
        if p.wait() != 0:
            raise SystemExit(f"{trainer} failed: see {work / f'{trainer}_fold{fold}.log'}")


def collect(work: Path, trainers: Sequence[str], fold: int, epochs: int, iterations: int, out: Path,
            command: str) -> dict:
    rows = []
    for trainer in trainers:
        d = fold_dir(work, trainer, fold)
        summary = d / "validation" / "summary.json"
        logs = sorted(d.glob("training_log_*.txt"))
        text = "\n".join(p.read_text() for p in logs)
        times = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", text)]
        row = {"trainer": trainer, "fold": fold, "epochs_done": len(times),
               "seconds_per_epoch": statistics.median(times) if times else None, "val_dice": None,
               "per_class_dice": {}}
        if summary.is_file():
            s = json.loads(summary.read_text())
            row["val_dice"] = 100.0 * s["foreground_mean"]["Dice"]
            row["per_class_dice"] = {CLASSES.get(k, k): 100.0 * v["Dice"] for k, v in s["mean"].items()}
            row["val_cases"] = len(s.get("metric_per_case", []))
        dacl = re.findall(r"dacl_loss ([0-9.]+), lambda_CL ([0-9.]+)", text)
        if dacl:
            row["dacl_loss_first_last"] = [float(dacl[0][0]), float(dacl[-1][0])]
        rows.append(row)
    table = {"what": f"CHAOS-T2 (examples/convert_to_nnunet.py) in nnU-Net v2, 3d_fullres at 7.7 x 5 x 5 mm "
                     f"({PLANS}), fold {fold}, {epochs} epochs of {iterations} iterations (batch 2), on the CPU; validation "
                     f"Dice from nnU-Net's "
                     f"validation/summary.json (its own evaluation, mean over the 4 organs)",
             "command": command, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(table, indent=1))
    lines = [f"# nnU-Net v2 on CHAOS-T2: its default trainer and the DACL trainer", "", table["what"] + ".", "",
             f"Command: `{command}`", "",
             "| trainer | epochs | s / epoch | validation Dice (%) | " + " | ".join(CLASSES.values()) + " |",
             "|---|---|---|---|" + "---|" * len(CLASSES)]
    for r in rows:
        vd = f"{r['val_dice']:.2f}" if r["val_dice"] is not None else "–"
        spe = f"{r['seconds_per_epoch']:.0f}" if r["seconds_per_epoch"] else "–"
        lines.append(f"| {r['trainer']} | {r['epochs_done']} | {spe} | {vd} | "
                     + " | ".join(f"{r['per_class_dice'].get(c, float('nan')):.2f}" if r["per_class_dice"] else "–"
                                  for c in CLASSES.values()) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return table


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", choices=("10x25", "5x250", "10x250", "20x250"), default="10x25",
                   help="EPOCHSxITERATIONS of both trainers: 10x25 (default) from benchmarks/nnunet_trainers "
                        "(fits a CPU session); the others are nnU-Net's nnUNetTrainer_<E>epochs and ours")
    p.add_argument("--fold", type=int_range(0, 4), default=0)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "nnunet_chaos")
    p.add_argument("--data-root", default=None, help="the examples' --data-root (default: their lookup)")
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "nnunet_chaos")
    args = p.parse_args(argv)
    command = shlex.join(["python", "benchmarks/nnunet_chaos.py", *(argv if argv is not None else sys.argv[1:])])
    epochs, iterations = (int(x) for x in args.schedule.split("x"))
    suffix = f"{epochs}epochs" if iterations == 250 else args.schedule
    trainers = [f"nnUNetTrainer_{suffix}", f"nnUNetTrainerDACL_{suffix}"]
    env = env_for(args.work)
    if not args.collect_only:
        t0 = time.time()
        args.work.mkdir(parents=True, exist_ok=True)
        prepare(args.work, args.data_root, env)
        train(args.work, trainers, args.fold, env)
        print(f"trained in {time.time() - t0:.0f} s")
    return collect(args.work, trainers, args.fold, epochs, iterations, args.out, command)


if __name__ == "__main__":
    main()
