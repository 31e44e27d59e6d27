"""What DACL costs: time and peak memory of SoftDensityContrastiveLoss, measured side by side.

Four tables, each printed and written to ``benchmarks/results/loss_cost.json``:

1. ``ratio``: forward + backward of the loss at the library's defaults (N_q 256, N_p 512,
   L 1000 with a full bank, ks 8/16/32, 512 sampled pixels per class) as a ratio to one CPS
   training step of the ACDC ``cpu`` preset (``--quick``: the ``smoke`` preset): the preset's
   two U-Nets on its training crop, SGD step (``benchmarks/step_cost.py`` times the example's
   real step), both timed in the same run, for 4 classes (ACDC) and 14 (Synapse); and the
   speed-up over a deliberately naive reference written below from the equations with a
   per-class Python loop, as DGCL-style code does it.
2. ``training_step``: that CPS step with the two DACL terms added (the heads run at the
   sampled pixels), bracketed by CPS steps.
3. ``floor``: the loss against the two operations no implementation can skip, timed alone on
   the same sizes: the S x (S + L) similarity matmul of each class and one top-k of max(ks)
   (the issue #26 target: at most 1.5x at 4 classes).
4. ``scaling``: time and peak memory as the bank grows (L), the classes (C) and the sampled
   pixels per class (S) grow. Each point runs in a fresh subprocess and reports its peak
   resident memory above the process's baseline (``ru_maxrss``), so memory is real, not
   estimated.

Usage::

    python benchmarks/loss_cost.py            # full (under 5 minutes on 2 CPU cores)
    python benchmarks/loss_cost.py --quick    # under 1 minute, for CI

Timings are medians of repeated runs; compare the ratios, not absolute times (shared, noisy
machine). Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

# Spinning OpenMP threads make a shared CPU crawl; must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from torch_dacl import SoftDensityContrastiveLoss  # noqa: E402
sys.path.insert(0, str(ROOT / "examples"))
from _cli import int_range  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------- timing
def median_time(fn: Callable[[], None], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- inputs
def make_batch(n: int, d: int, h: int, w: int, c: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, h, w, generator=g)
    # blocky label maps (a few regions per class), like segmentation masks
    coarse = torch.randint(0, c, (n, 1, max(1, h // 8), max(1, w // 8)), generator=g).float()
    labels = F.interpolate(coarse, size=(h, w), mode="nearest").squeeze(1).long()
    return emb, labels


def filled_loss(c: int, d: int, bank_size: int, **kw) -> SoftDensityContrastiveLoss:
    loss = SoftDensityContrastiveLoss(num_classes=c, dim=d, bank_size=bank_size, validate=False, **kw)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(c * bank_size, d, generator=g)
    labels = torch.arange(c).repeat_interleave(bank_size)
    loss.bank.push(feats, labels, torch.rand(c * bank_size, generator=g))
    return loss


# ----------------------------------------------------------------------------- naive reference
def naive_dacl_loss(emb, labels, bank_feats, bank_dens, num_classes, ks=(8, 16, 32), n_q=256, n_p=512,
                    n_neg=512, tau=0.4, max_samples=512, ignore_index=-100):
    """DGCL-style reference from Eq. 3-10: one Python iteration per class, boolean masking,
    host-side sizes, the full similarity matrix of each class (no chunking)."""
    n, d = emb.shape[:2]
    flat = emb.permute(0, 2, 3, 1).reshape(-1, d)  # a full copy of the embeddings
    lab = labels.reshape(-1)
    feats, dens = {}, {}
    for c in range(num_classes):  # sample and estimate density class by class
        idx = (lab == c).nonzero().flatten()
        if idx.numel() == 0:
            continue
        idx = idx[torch.randperm(idx.numel())[:max_samples]]
        f = flat[idx]
        fn = F.normalize(f.detach(), dim=-1)
        bn = F.normalize(bank_feats[c], dim=-1)
        sims = torch.cat([fn @ fn.T - 3 * torch.eye(len(fn)), fn @ bn.T], 1)  # self excluded
        top = sims.sort(dim=1, descending=True).values
        per_k = [top[:, : min(k, sims.shape[1] - 1)].mean(1) for k in ks]
        feats[c], dens[c] = f, torch.stack(per_k).mean(0)
    total, count = emb.sum() * 0, 0
    for c in feats:  # anchors, positives, negatives, loss class by class
        order = dens[c].argsort()
        anchors = F.normalize(feats[c][order[:n_q]], dim=-1)
        pos_b = F.normalize(feats[c][order.flip(0)[: n_p // 2]].detach(), dim=-1)
        pos_g = F.normalize(bank_feats[c][bank_dens[c].argsort(descending=True)[: n_p // 2]], dim=-1)
        center = F.normalize(torch.cat([pos_b, pos_g]).mean(0), dim=0)
        others = torch.cat([feats[o].detach() for o in feats if o != c]) if len(feats) > 1 else None
        if others is None:
            continue
        neg = F.normalize(others[torch.randperm(len(others))[:n_neg]], dim=-1)
        cos = anchors @ center
        w = len(anchors) * torch.softmax(cos, 0)
        denom = torch.exp(anchors @ neg.T / tau).sum(1)
        total = total - torch.log(w * torch.exp(cos / tau) / denom).sum()  # Eq. 10 for class c
        count += len(anchors)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- CPS step
def read_preset(name: str) -> Dict:
    """An ACDC example preset (model, input size, batch), read from the example itself."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import acdc_cps_dacl as ex  # type: ignore

        cfg = dict(ex.PRESETS[name])
        cfg["source"] = f"examples/acdc_cps_dacl.py PRESETS[{name!r}]"
        return cfg
    except Exception as e:  # pragma: no cover - the example is optional for the library
        raise SystemExit(f"cannot read the ACDC {name} preset from examples/acdc_cps_dacl.py: {e}")


def cps_step(cfg: Dict, dacl: bool = False):
    """One CPS training step of the preset: both U-Nets forward, L_sup (CE) + L_cross, SGD.

    With ``dacl`` the step also computes both models' DACL terms (paper defaults, full banks,
    no pixel stride) on their embeddings, with label maps in which every class is present.
    """
    from acdc_model import build_wrapper  # type: ignore  # the example's own model builder

    model = build_wrapper(dict(cfg, seed=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    size, lb, ub = cfg.get("crop") or cfg["size"], cfg["labeled_bs"], cfg["unlabeled_bs"]  # the training input
    x = torch.randn(lb + ub, 1, size, size)
    y = torch.randint(0, 4, (lb, size, size))
    d = int(cfg["embed_dim"])
    losses = (filled_loss(4, d, 1000), filled_loss(4, d, 1000)) if dacl else None
    # DACL labels shaped like real label maps (every class present); the argmax of untrained
    # nets would often hold a single class and make the loss look free
    _, y_cl = make_batch(lb + ub, 1, size, size, 4, seed=2)

    def step():
        out = model(x)
        sup = F.cross_entropy(out.logits_a[:lb], y) + F.cross_entropy(out.logits_b[:lb], y)
        loss = sup + model.cross_loss(out.logits_a, out.logits_b)
        if losses is not None:
            # the wrapper's default: the heads run in the loss, at the sampled pixels
            loss = loss + 0.1 * (losses[0](out.features_a, y_cl, head=model.head_a)
                                 + losses[1](out.features_b, y_cl, head=model.head_b))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step, (lb + ub, int(cfg["embed_dim"]), size, size)


# ----------------------------------------------------------------------------- the floor
def floor_rows(emb_shape, cases=((4, 512), (4, 1024), (14, 512)), repeats: int = 5) -> List[Dict]:
    """The loss against its floor: forward + backward of one call of the loss (full bank) against
    the two operations no implementation of Eq. 3-7 can skip, timed on the same sizes, in the
    same interleaved rounds: the similarity matmul of each class's S sampled pixels with its
    S + L keys (batch and bank) and one ``torch.topk`` of max(ks) over its rows, both in the
    loss's cache-sized chunks of queries. ``torch.topk`` is timed at its fastest width: the
    S + L keys, or, where ATen's CPU top-k takes its faster heap path at 64 k columns, padded
    up to it (``floor_topk_s`` is the faster of the two). ``cases``: (classes, sampled pixels
    per class).

    The loss itself selects its top-k with a pre-selection that is faster than ``torch.topk``
    on the CPU and gives the same values (``torch_dacl.functional._topk_values``), so this
    floor is no longer a lower bound of the loss's own two operations; those are timed too, as
    the loss runs them (``own_matmul_s``, ``own_topk_s``), and ``loss_over_own_floor`` is the
    loss against them: what the loss spends besides its similarity matmul and its top-k.

    Also timed, as a third part no loss on a dense map can skip: reading its ``C x S`` sampled
    pixels and handing back the gradient of the whole map (zeros but at those pixels), forward
    and backward of ``emb[pixels].sum()`` after ``zero_grad(set_to_none=True)``, so the
    gradient is a fresh map-sized allocation, page faults included (``gradient_write_s``).
    The issue's floor leaves it out; ``loss_over_floor_with_gradient_write`` counts it in."""
    from torch_dacl.functional import _CPU_CHUNK_ELEMENTS, _topk_plan, _topk_values

    rows = []
    n, d, h, w = emb_shape
    for c, s in cases:
        emb, labels = make_batch(n, d, h, w, c)
        emb.requires_grad_()
        loss = filled_loss(c, d, 1000, max_samples_per_class=s)
        bank, k = loss.bank.size, max(loss.ks)
        g = torch.Generator().manual_seed(3)
        q = F.normalize(torch.randn(c, s, d, generator=g), dim=-1)
        width = s + bank
        heap = 64 * k if 2 * width > 64 * k > width else width  # torch.topk's heap path, where padding reaches it
        pad, block = _topk_plan(width, min(k, width), q.device)  # as the loss runs it
        keys = {wd: F.normalize(torch.randn(c, wd, d, generator=g), dim=-1).transpose(1, 2)
                for wd in {width, heap, width + pad}}
        chunks = {wd: max(1, min(s, _CPU_CHUNK_ELEMENTS // (c * wd))) for wd in keys}

        def matmul(wd):
            return [torch.bmm(q[:, i:i + chunks[wd]], keys[wd]) for i in range(0, s, chunks[wd])]

        sims = {wd: matmul(wd) for wd in keys}

        def loss_step():  # as after an optimizer's zero_grad(set_to_none=True)
            emb.grad = None
            loss(emb, labels).backward()

        where = [torch.randint(0, size, (c * s,), generator=g) for size in (n, h, w)]

        def gather_step():  # read C x S pixels of the map and hand back the map's gradient
            emb.grad = None
            emb[where[0], :, where[1], where[2]].sum().backward()

        fns = dict(loss=loss_step, matmul=lambda: matmul(width),
                   topk=lambda: [x.topk(k, dim=-1) for x in sims[width]],
                   topk_heap=lambda: [x.topk(k, dim=-1) for x in sims[heap]],
                   own_matmul=lambda: matmul(width + pad),
                   own_topk=lambda: [_topk_values(x, k, block) for x in sims[width + pad]],
                   grad=gather_step)
        times = {name: [] for name in fns}
        for f in fns.values():  # warm-up
            f()
        for _ in range(repeats):  # interleaved, so that the machine's drift hits all alike
            for name, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
        t = {name: statistics.median(ts) for name, ts in times.items()}
        t_topk = min(t["topk"], t["topk_heap"])
        floor = t["matmul"] + t_topk
        rows.append(dict(classes=c, samples_per_class=s, bank=bank, keys=width, dim=d, k=k, query_chunk=chunks[width],
                         loss_fwd_bwd_s=t["loss"], floor_matmul_s=t["matmul"], floor_topk_s=t_topk,
                         floor_topk_width=heap if t["topk_heap"] < t["topk"] else width, floor_s=floor,
                         loss_over_floor=t["loss"] / floor, gradient_write_s=t["grad"],
                         loss_over_floor_with_gradient_write=t["loss"] / (floor + t["grad"]),
                         own_keys=width + pad, own_topk_block=block, own_matmul_s=t["own_matmul"],
                         own_topk_s=t["own_topk"],
                         loss_over_own_floor=t["loss"] / (t["own_matmul"] + t["own_topk"])))
    return rows


# ----------------------------------------------------------------------------- one scaling point
def one_point(args) -> Dict:
    torch.set_num_threads(args.threads)
    c, L, s, d = args.classes, args.bank, args.samples, 64
    pixels = c * s  # every class gets exactly s pixels
    side = int(pixels ** 0.5) + 1
    emb, _ = make_batch(1, d, side, side, c)
    labels = (torch.arange(side * side) * c // (side * side)).reshape(1, side, side)  # c equal blocks
    emb.requires_grad_()
    loss = filled_loss(c, d, L, max_samples_per_class=s)
    # warm-up on a small crop: thread pools, allocator and lazy init stay out of the measure,
    # without paying a second full call at the largest sizes
    loss(emb[..., :64, :64], labels[..., :64, :64]).backward()
    emb.grad = None
    rss0 = _status_mb("VmRSS")
    _reset_peak()
    t = median_time(lambda: loss(emb, labels).backward(), repeats=args.repeats, warmup=0)
    peak = _status_mb("VmHWM")
    return dict(classes=c, bank=L, samples=s, time_s=t, peak_extra_mb=max(0.0, peak - rss0))


def _status_mb(key: str) -> float:
    """Resident (VmRSS) or peak resident (VmHWM) memory of this process, MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset the peak resident size (VmHWM) so it measures only what follows (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_point(c: int, L: int, s: int, repeats: int, threads: int) -> Dict:
    cmd = [sys.executable, __file__, "--point", "--classes", str(c), "--bank", str(L), "--samples", str(s),
           "--repeats", str(repeats), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- figure
def write_scaling_figure(scaling: List[Dict], path: Path):
    """Time and peak extra memory along each scaling axis (log-log), with a linear guide."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib comes with the examples extra; the JSON is the result
        return None
    axes_info = (("bank", "bank L per class", "bank"), ("classes", "classes C", "classes"),
                 ("samples", "sampled pixels per class S", "samples"))
    fig, axs = plt.subplots(2, 3, figsize=(12, 6.5))
    for j, (axis, xlabel, key) in enumerate(axes_info):
        pts = [r for r in scaling if r["axis"] == axis]
        if not pts:
            continue
        x = [r[key] for r in pts]
        for i, (metric, ylabel) in enumerate((("time_s", "forward + backward (s)"),
                                               ("peak_extra_mb", "peak extra memory (MiB)"))):
            ax = axs[i, j]
            y = [max(r[metric], 1e-6) for r in pts]
            ax.loglog(x, y, "o-", label="measured")
            ax.loglog(x, [y[0] * xi / x[0] for xi in x], ":", color="grey", label="linear from the first point")
            if axis == "samples" and metric == "time_s":
                ax.loglog(x, [y[0] * (xi / x[0]) ** 2 for xi in x], "--", color="grey", label="quadratic")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            fixed = []  # the other two parameters, per point where they change along the axis
            for other, sym in (("classes", "C"), ("bank", "L"), ("samples", "S")):
                if other != key:
                    vals = [r[other] for r in pts]
                    fixed.append(f"{sym} = {vals[0]}" if len(set(vals)) == 1 else f"{sym}: " + ", ".join(map(str, vals)))
            ax.set_title("; ".join(fixed), fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle("SoftDensityContrastiveLoss: scaling (benchmarks/loss_cost.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small version for CI (under 1 minute): the smoke preset's CPS step, fewer points")
    p.add_argument("--preset", default=None, help="ACDC preset whose CPS step is the unit (default: cpu and "
                   "paper; smoke with --quick)")
    p.add_argument("--threads", type=int_range(1), default=2)
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--classes", type=int_range(2), default=4, help=argparse.SUPPRESS)
    p.add_argument("--bank", type=int_range(1), default=1000, help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int_range(2), default=512, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int_range(1), default=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.point:
        print(json.dumps(one_point(args)))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.time()
    reps = 1 if args.quick else 5

    # 1. ratio to one CPS step and speed-up over the naive reference
    names = [args.preset] if args.preset else (["smoke"] if args.quick else ["cpu", "paper"])
    ratio_rows: List[Dict] = []
    step_row: Dict = {}
    for i, name in enumerate(names):
        cfg = read_preset(name)
        step, emb_shape = cps_step(cfg)
        emb_shape_0 = emb_shape if i == 0 else emb_shape_0
        # the paper preset's step takes ~25 s on a CPU: one timed call, no warm-up call (its
        # one-off start-up costs are a few percent of such a step, and this keeps the script
        # under 5 minutes)
        r = reps if name != "paper" else 1
        t_cps = median_time(step, repeats=r, warmup=1 if name != "paper" else 0)
        if i == 0:  # the whole step with both DACL terms, bracketed by CPS steps (noise check)
            dacl_step, _ = cps_step(cfg, dacl=True)
            t_dacl_step = median_time(dacl_step, repeats=r)
            t_cps_again = median_time(step, repeats=r)
            step_row = dict(preset=name, cps_step_s=t_cps, dacl_step_s=t_dacl_step, cps_step_again_s=t_cps_again,
                            dacl_step_overhead=t_dacl_step / ((t_cps + t_cps_again) / 2) - 1)
        del step
        for c in (4, 14):
            emb, labels = make_batch(emb_shape[0], emb_shape[1], emb_shape[2], emb_shape[3], c)
            emb.requires_grad_()
            loss = filled_loss(c, emb_shape[1], 1000)
            t_loss = median_time(lambda: loss(emb, labels).backward(), repeats=r)
            row = dict(preset=name, classes=c, embeddings=list(emb_shape), loss_fwd_bwd_s=t_loss, cps_step_s=t_cps,
                       ratio_to_cps_step=t_loss / t_cps, naive_s=None, speedup_vs_naive=None)
            if i == 0:
                bf, bd = loss.bank.bank.clone(), loss.bank.bank_density.clone()
                row["naive_s"] = median_time(lambda: naive_dacl_loss(emb, labels, bf, bd, c).backward(),
                                             repeats=max(1, reps // 2))
                row["speedup_vs_naive"] = row["naive_s"] / t_loss
            ratio_rows.append(row)

    # 2. the loss against its floor, on the first preset's embeddings
    floor = floor_rows(emb_shape_0, repeats=reps)

    # 3. scaling (fresh subprocess per point: peak memory is real)
    if args.quick:
        grid = dict(bank=[1000, 4000], classes=[4, 16], samples=[1024, 2048])
    else:
        grid = dict(bank=[1000, 4000, 16000, 64000], classes=[4, 14, 32, 100], samples=[1024, 4096, 16384, 65536])
    scaling: List[Dict] = []
    sreps = min(reps, 3)  # median of 3 per point: each point already pays a process start
    for L in grid["bank"]:
        scaling.append(dict(axis="bank", **run_point(4, L, 1024, sreps, args.threads)))
    for c in grid["classes"]:
        scaling.append(dict(axis="classes", **run_point(c, 1000, 1024 if c <= 32 else 256, sreps, args.threads)))
    for s in grid["samples"]:
        scaling.append(dict(axis="samples", **run_point(2 if s > 16384 else 4, 1000, s, 1, args.threads)))

    env = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
               threads=args.threads, cpu_count=os.cpu_count(), device="cpu",
               command="python benchmarks/loss_cost.py" + (" --quick" if args.quick else ""))
    result = dict(environment=env, presets={n: read_preset(n) for n in names}, ratio=ratio_rows, training_step=step_row,
                  floor=floor, scaling=scaling,
                  targets=dict(ratio_to_cps_step="<= 0.05", speedup_vs_naive_at_14_classes=">= 5",
                               loss_over_floor_at_4_classes="<= 1.5"),
                  wall_s=time.time() - t_start)

    print(f"\nDACL loss cost ({env['command']}, torch {env['torch']}, {args.threads} CPU threads)\n")
    print(f"{'preset':>7} {'classes':>7} {'loss f+b (s)':>13} {'CPS step (s)':>13} {'ratio':>7} {'naive (s)':>10} "
          f"{'speed-up':>9}")
    for r in ratio_rows:
        naive = f"{r['naive_s']:>10.4f} {r['speedup_vs_naive']:>8.1f}x" if r["naive_s"] else f"{'-':>10} {'-':>9}"
        print(f"{r['preset']:>7} {r['classes']:>7} {r['loss_fwd_bwd_s']:>13.4f} {r['cps_step_s']:>13.4f} "
              f"{r['ratio_to_cps_step']:>7.3f} {naive}")
    sr = step_row
    print(f"\nwhole training step of the {sr['preset']} preset: CPS {sr['cps_step_s']:.3f} s / "
          f"{sr['cps_step_again_s']:.3f} s (before/after), CPS + 2 DACL terms {sr['dacl_step_s']:.3f} s: "
          f"overhead {100 * sr['dacl_step_overhead']:.1f} %")
    print(f"\nthe loss against its floor (S x (S+L) similarity matmul + one top-k), embeddings {list(emb_shape_0)}:")
    print(f"{'classes':>7} {'S':>5} {'keys':>5} {'loss f+b (s)':>13} {'matmul (s)':>11} {'top-k (s)':>10} {'loss/floor':>11}"
          f" {'grad write (s)':>15} {'with it':>8} {'own top-k (s)':>14} {'loss/own floor':>15}")
    for r in floor:
        print(f"{r['classes']:>7} {r['samples_per_class']:>5} {r['keys']:>5} {r['loss_fwd_bwd_s']:>13.4f} "
              f"{r['floor_matmul_s']:>11.4f} {r['floor_topk_s']:>10.4f} {r['loss_over_floor']:>10.2f}x"
              f" {r['gradient_write_s']:>15.4f} {r['loss_over_floor_with_gradient_write']:>7.2f}x"
              f" {r['own_topk_s']:>14.4f} {r['loss_over_own_floor']:>14.2f}x")
    print(f"\n{'axis':>8} {'classes':>7} {'bank L':>7} {'pixels/class':>12} {'time (s)':>9} {'peak extra MiB':>15}")
    for r in scaling:
        print(f"{r['axis']:>8} {r['classes']:>7} {r['bank']:>7} {r['samples']:>12} {r['time_s']:>9.4f} "
              f"{r['peak_extra_mb']:>15.1f}")
    out = args.output or RESULTS / ("loss_cost_quick.json" if args.quick else "loss_cost.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    fig = write_scaling_figure(scaling, out.with_name(out.stem + "_scaling.png"))
    if fig:
        print(f"wrote {fig.relative_to(ROOT) if fig.is_relative_to(ROOT) else fig}")
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
