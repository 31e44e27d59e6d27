"""What DACL adds to a real training step: an example's ``cpu`` preset, measured side by side.

``--example acdc`` (the default) times the 2D ACDC example (7 labeled patients), ``--example
chaos`` the 3D CHAOS-T2 example (``synapse_cps_dacl.py --dataset chaos``, 4 labeled volumes).
For each variant the script builds the example's own run (data, the two networks, the library's
:class:`torch_dacl.DACLObjective`, SGD) through ``examples/engine.py`` and times whole
training steps (``Run.train_step``: forward, Eq. 1, backward, optimiser step). The variants run
in interleaved rounds, so that a noisy shared machine slows them alike, and the table reports
ratios measured in the same run:

- ``step / cps``: a variant's median step time over the CPS step's (the target of issue #26:
  at most 1.10 in 2D and 1.20 in 3D);
- ``objective``: the median time of the objective alone (CPS term, pseudo labels, both DACL
  losses and their banks, forward and backward) on the step's own logits and embeddings,
  detached, and its share of the whole step.

Variants: the preset as is (``cps``, ``dacl``: the library's defaults, sparse heads and 512
sampled pixels per class, with the preset's ``class_prior`` pseudo labels); the old default
(dense heads, 1024 pixels per class) and each of its two changes alone; DACL with the
fixed-threshold pseudo labels; CPS and DACL in bfloat16 autocast (``--amp bf16``), only where
the CPU has AVX512-BF16 (``torch.cpu._is_avx512_bf16_supported()``; without it bfloat16 is
emulated and slower than float32, and the run says it left them out).

Where the time goes (``--profile-steps N``, default 5; 0: off): after the timed rounds,
``torch.profiler`` records N more steps of each variant. The table ``stages`` gives the
milliseconds per step in each stage of ``engine.Run.train_step`` (forward of both networks and,
with DACL, the projection heads; the supervised loss; the objective; backward; optimiser), and
``ops_grown_most`` the operators whose self time per step grew most from CPS to each DACL
variant. The profiler's own overhead inflates these times: read them as shares.

Usage::

    python benchmarks/step_cost.py                 # ACDC, the cpu preset, 1 thread (~10 minutes)
    python benchmarks/step_cost.py --example chaos # CHAOS-T2 (3D), the cpu preset, 1 thread (~8 minutes)
    python benchmarks/step_cost.py --example acdc-ssl4mis   # SSL4MIS's CPS shape: batch 12 + 12
    python benchmarks/step_cost.py --preset paper --device cuda --profile-steps 0   # on a GPU
    python benchmarks/step_cost.py --quick         # the smoke preset, 2 steps (a pipeline check)

Writes ``benchmarks/results/step_cost.json`` (``--example chaos``: ``step_cost_chaos.json``,
``acdc-ssl4mis``: ``step_cost_acdc-ssl4mis.json``; on a GPU ``..._<preset>_cuda.json``;
``--quick``: ``step_cost[_chaos]_quick.json``) and prints Markdown tables. Nothing here is
asserted; compare the ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402

import acdc_cps_dacl  # noqa: E402
import engine  # noqa: E402
import synapse_cps_dacl  # noqa: E402
from _cli import int_range  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# name: the example's flags on top of the preset
VARIANTS = {
    "cps": ["--method", "cps"],
    "dacl": ["--method", "dacl"],
    "dacl, old default (dense heads, 1024 samples/class)": ["--method", "dacl", "--dense-heads",
                                                            "--max-samples-per-class", "1024"],
    "dacl, dense heads": ["--method", "dacl", "--dense-heads"],
    "dacl, 1024 samples/class": ["--method", "dacl", "--max-samples-per-class", "1024"],
    "dacl, fixed 0.95": ["--method", "dacl", "--pseudo-policy", "fixed"],
    "cps, bf16": ["--method", "cps", "--amp", "bf16"],
    "dacl, bf16": ["--method", "dacl", "--amp", "bf16"],
}


# the example: its task, the flags every variant shares, and the variants it runs by default
EXAMPLES = {
    "acdc": dict(task=acdc_cps_dacl.TASK, argv=["--labeled", "7"], what="the ACDC example (7 labeled patients)",
                 variants=[v for v in VARIANTS if "bf16" not in v or torch.cpu._is_avx512_bf16_supported()]),
    # SSL4MIS's CPS script's shape (issue #26): batch 12 + 12, its U-Net widths (MONAI's plain U-Net
    # 16-32-64-128-256, the cpu preset's network) on 128 px crops, DACL on every pixel (no stride)
    "acdc-ssl4mis": dict(task=acdc_cps_dacl.TASK, argv=["--labeled", "7", "--labeled-bs", "12", "--unlabeled-bs", "12",
                                                        "--cl-stride", "1"],
                         what="the ACDC example at SSL4MIS's CPS shape (batch 12 + 12, its U-Net widths, 128 px "
                              "crops, DACL on every pixel)",
                         variants=["cps", "dacl", "dacl, old default (dense heads, 1024 samples/class)"]),
    "chaos": dict(task=synapse_cps_dacl.TASK, argv=["--dataset", "chaos", "--labeled", "4"],
                  what="the CHAOS-T2 3D example (4 labeled volumes)",
                  variants=["cps", "dacl", "dacl, old default (dense heads, 1024 samples/class)", "dacl, dense heads",
                            "dacl, 1024 samples/class", "dacl, fixed 0.95"]),
}
STAGES = ("forward", "sup_loss", "objective", "backward", "optimizer")  # engine.Run.train_step's record_function names

SETTINGS = ("method", "dense_heads", "pseudo_policy", "max_samples_per_class", "bank_size", "amp")  # recorded per row


class Timed:
    """One variant: the example's run, its batch stream, and the times measured so far."""

    def __init__(self, name: str, task, argv: list, workdir: Path) -> None:
        cfg = engine.make_config(task, argv)
        run_dir = workdir / name.replace(" ", "_").replace(",", "").replace("/", "-")
        run_dir.mkdir(parents=True)
        self.name, self.run = name, engine.Run(task, cfg, run_dir)
        self.run.wrapper.train()
        self.batches = iter(self.run.data.batches(0, self.run.lbs, self.run.ubs))
        self.step_s: list = []
        self.objective_s: list = []

    def step(self, record: bool) -> None:
        x, y = next(self.batches)
        _sync(self.run.device)
        t0 = time.perf_counter()
        self.run.train_step(x, y)
        _sync(self.run.device)
        if record:
            self.step_s.append(time.perf_counter() - t0)
            self.objective_s.append(self.objective_alone(x, y))

    def objective_alone(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The objective on this batch's logits / embeddings (detached leaves, as ``train_step``
        passes them: logits in float32, embeddings in the autocast dtype), forward + backward.
        It runs on a copy of the objective, after an eval-mode forward, so that neither the
        banks nor the BatchNorm statistics of the timed run see this extra call."""
        run = self.run
        if run.cfg["method"] == "sup":
            return 0.0
        run.wrapper.eval()
        x = x.to(run.device)
        with torch.no_grad(), torch.autocast(run.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None):
            out = run.net(x)
        run.wrapper.train()
        emb = [out[2], out[3]] if run.cfg["method"] == "dacl" else [None, None]  # embeddings, or sparse heads' features
        leaves = [out.logits_a.detach().float(), out.logits_b.detach().float(),
                  *(None if e is None else e.detach() for e in emb)]
        for t in leaves:
            if t is not None:
                t.requires_grad_(True)
        objective = copy.deepcopy(run.objective)
        labeled = torch.arange(x.shape[0], device=run.device) < run.lbs
        y = y.to(run.device)
        _sync(run.device)
        t0 = time.perf_counter()
        res = objective(*leaves, y, labeled)
        res.loss.backward()
        _sync(run.device)
        return time.perf_counter() - t0

    def profile(self, steps: int) -> tuple:
        """``steps`` more steps under ``torch.profiler``: (ms per step in each stage of
        ``train_step``, {operator: self ms per step})."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                self.step(record=False)
        events = prof.key_averages()
        total = {e.key: e.cpu_time_total / 1e3 / steps for e in events}
        stages = {k: total.get(f"step.{k}", 0.0) for k in STAGES}
        ops = {e.key: e.self_cpu_time_total / 1e3 / steps for e in events if not e.key.startswith("step.")}
        return stages, ops


def _sync(device: torch.device) -> None:
    """Wait for the device (timing a GPU step needs it; a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def op_growth(ops: dict, unit: dict, top: int) -> list:
    """The operators whose self time per step grew most from ``unit`` (CPS) to ``ops``."""
    rows = [{"op": k, "cps_ms": unit.get(k, 0.0), "ms": v, "added_ms": v - unit.get(k, 0.0)} for k, v in ops.items()]
    return sorted(rows, key=lambda r: -r["added_ms"])[:top]


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--example", choices=list(EXAMPLES), default="acdc", help="which example's step")
    p.add_argument("--preset", default="cpu", help="the example's preset")
    p.add_argument("--steps", type=int_range(1), default=15, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int_range(1), default=3, help="interleaved rounds")
    p.add_argument("--warmup", type=int_range(0), default=3, help="untimed steps per variant first")
    p.add_argument("--threads", type=int_range(1), default=1, help="torch threads (the preset's runs use 1)")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), metavar="NAME",
                   help="which variants, by name (quoted; default: the example's list); 'cps' is the unit of the ratios")
    p.add_argument("--profile-steps", type=int_range(0), default=5, help="profiled steps per variant after the timing (0: none)")
    p.add_argument("--top-ops", type=int_range(1), default=10, help="operators listed per variant in the profile")
    p.add_argument("--quick", action="store_true", help="smoke preset, 2 steps, 1 round, cps and dacl")
    p.add_argument("--data-root", default=None, help="the examples' --data-root (default: their lookup)")
    p.add_argument("--example-args", default="", help="more flags for every variant's run, one string (e.g. a "
                   "smaller --size for a CPU check of the GPU job)")
    p.add_argument("--device", default="cpu", help="the examples' --device (cuda: the GPU job, benchmarks/gpu_acdc.sh)")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    ex = EXAMPLES[args.example]
    if args.quick:
        args.preset, args.steps, args.rounds, args.warmup, args.variants = "smoke", 2, 1, 1, ["cps", "dacl"]
        args.profile_steps = min(args.profile_steps, 1)
    left_out = [] if torch.cpu._is_avx512_bf16_supported() or args.variants else \
        [v for v in VARIANTS if "bf16" in v and v not in ex["variants"]]
    if left_out:
        print(f"left out {left_out}: this CPU has no AVX512-BF16 (bfloat16 would be emulated, slower than float32)")
    args.variants = args.variants or ex["variants"]
    args.variants = list(dict.fromkeys(["cps", *args.variants]))  # the unit first, each variant once
    torch.set_num_threads(args.threads)
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--preset", args.preset, *ex["argv"], "--seed", "0", "--threads", str(args.threads),
                  "--no-progress", "--no-test", "--device", args.device, *shlex.split(args.example_args),
                  *(["--data-root", args.data_root] if args.data_root else [])]
        runs = [Timed(name, ex["task"], common + VARIANTS[name], Path(tmp)) for name in args.variants]
        for r in runs:
            for _ in range(args.warmup):
                r.step(record=False)
        for _ in range(args.rounds):
            for r in runs:
                for _ in range(args.steps):
                    r.step(record=True)
        profiles = {r.name: r.profile(args.profile_steps) for r in runs} if args.profile_steps > 0 else {}
    med = {r.name: (statistics.median(r.step_s), statistics.median(r.objective_s)) for r in runs}
    unit = med["cps"][0]
    rows = [{"variant": name, "argv": VARIANTS[name], "settings": {k: r.run.cfg[k] for k in SETTINGS},
             "step_s": s, "step_ratio_to_cps": s / unit,
             "objective_s": o, "objective_share_of_step": o / s, "timed_steps": len(r.step_s)}
            for (name, (s, o)), r in zip(med.items(), runs)]
    lines = ["| variant | step (s) | step / cps | objective alone (s) | objective / step |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['step_s']:.3f} | {r['step_ratio_to_cps']:.2f} | {r['objective_s']:.3f} | "
              f"{100 * r['objective_share_of_step']:.0f} % |" for r in rows]
    print("\n".join(lines))
    stages, ops = [], {}
    if profiles:
        unit_ops = profiles["cps"][1]
        stages = [{"variant": name, **{f"{k}_ms": v for k, v in st.items()}, "sum_ms": sum(st.values())}
                  for name, (st, _) in profiles.items()]
        ops = {name: op_growth(o, unit_ops, args.top_ops) for name, (_, o) in profiles.items() if name != "cps"}
        slines = ["| variant | " + " | ".join(STAGES) + " | sum (ms per step, profiled) |",
                  "|---|" + "---|" * (len(STAGES) + 1)]
        slines += [f"| {r['variant']} | " + " | ".join(f"{r[k + '_ms']:.0f}" for k in STAGES) + f" | {r['sum_ms']:.0f} |"
                   for r in stages]
        print("\n" + "\n".join(slines))
        for name, rows_ in ops.items():
            print(f"\nself time per step, grown most from cps to {name!r} (ms):")
            print("\n".join(f"  {r['op']}: {r['cps_ms']:.1f} -> {r['ms']:.1f} (+{r['added_ms']:.1f})" for r in rows_))
    cmd = shlex.join(["python", "benchmarks/step_cost.py", *sys.argv[1:]])
    stem = "step_cost" + ("" if args.example == "acdc" else f"_{args.example}") + \
        ("" if args.device == "cpu" else f"_{args.preset}_{args.device.split(':')[0]}")
    out = args.output or RESULTS / (f"{stem}_quick.json" if args.quick else f"{stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "what": f"whole training steps of {ex['what']}, its {args.preset!r} preset, seed 0, "
                f"medians of {args.rounds} interleaved rounds x {args.steps} steps per variant; 'objective' is "
                "DACLObjective alone (forward + backward) on the step's detached logits and embeddings",
        "command": cmd, "device": args.device, "threads": args.threads, "torch": torch.__version__,
        "machine": platform.processor()
        or platform.machine(), "cpu_count": os.cpu_count(), "seconds": round(time.time() - t_start, 1),
        "rows": rows, "table": "\n".join(lines),
        **({"left_out": {"variants": left_out, "why": "no AVX512-BF16 on this CPU: bfloat16 is emulated"}}
           if left_out else {}),
        **({"profiled_steps": args.profile_steps, "stages": stages, "ops_grown_most": ops} if profiles else {})},
        indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
