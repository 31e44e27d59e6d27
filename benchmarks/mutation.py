"""Mutation score of the core tests over the library's core files (mutmut 3).

Not part of CI (it takes tens of minutes). It never touches the checkout it is run from:
the committed tree (``--ref``, default HEAD) is exported with ``git archive`` into a scratch
folder, the mutmut configuration is appended to that copy's ``pyproject.toml``, and mutmut
runs there.

Two parts:

* ``mutmut``: every mutant mutmut makes of ``--files`` (default: the six core files, ``FILES``),
  each run against the core unit tests (``TESTS``) that cover the mutated function; writes the
  counts and the diff of every surviving mutant. Mutants of a function that runs only when the
  module is imported (``loss._option``, which builds class properties) cannot be killed by
  mutmut's forked runner (it imports before it activates a mutant): the script runs those
  survivors again with ``MUTANT_UNDER_TEST`` set before Python starts (``IMPORT_TIME``).
* ``named``: the seven one-line mutations of issue #16 (which survived the tests before it),
  applied by hand one at a time to a fresh copy; reports the first test that fails for each.

Usage::

    pip install mutmut            # 3.x; not a dependency of the project or of CI
    python benchmarks/mutation.py                      # both parts
    python benchmarks/mutation.py --part named         # the seven mutations only (~2 min)
    python benchmarks/mutation.py --files torch_dacl/loss.py --max-children 2

Results of a run are summarised, with a reason for every survivor, in
``benchmarks/results/mutation.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
from _cli import int_range  # noqa: E402
FILES = ["torch_dacl/loss.py", "torch_dacl/stages.py", "torch_dacl/functional.py", "torch_dacl/cotraining.py",
         "torch_dacl/objective.py", "torch_dacl/bank.py"]
# tests/test_distributed.py is left out: it spawns gloo process ranks (about 15 s per mutant that
# reaches it, hours in all); tests/test_stages_contract.py simulates 2 and 3 ranks in process instead.
TESTS = ["tests/test_functional.py", "tests/test_modules.py", "tests/test_properties.py",
         "tests/test_module_reference.py", "tests/test_mechanism.py", "tests/test_stages.py",
         "tests/test_objective.py", "tests/test_sparse_heads.py",
         "tests/test_objective_contract.py", "tests/test_stages_contract.py", "tests/test_messages_contract.py",
         "tests/test_cotraining_contract.py", "tests/test_loss_contract.py", "tests/test_functional_contract.py",
         "tests/test_device_contract.py", "tests/test_miner_stream_contract.py",
         "tests/test_bank_contract.py", "tests/test_density_contract.py"]
# functions that run only while the module is imported (loss._option builds class properties)
IMPORT_TIME = r"\.x__option__mutmut_\d+$"
PYTEST_ARGS = ["-p", "no:cacheprovider", "-q", "--hypothesis-seed=0"]
# torch.compile cannot trace mutmut's trampolines (a ContextVar.set in each mutated function).
# mutmut runs xfail tests as plain tests: deselect any strict xfail here while one exists.
MUTMUT_DESELECT = ["--deselect", "tests/test_modules.py::test_grouped_functional_math_compiles_fullgraph"]

# (name, file, original line fragment, mutated fragment): the surviving mutations of issue #16
NAMED = [
    ("batch positives = lowest density (pixel anchors)", "torch_dacl/stages.py",
     "high_idx = order.gather(1, (n - 1 - high_rank).clamp_min(0))",
     "high_idx = order.gather(1, high_rank.expand(c, -1))"),
    ("batch positives = lowest density (class anchors)", "torch_dacl/stages.py",
     "batch.valid, half, largest=True)", "batch.valid, half, largest=False)"),
    ("bank positives = lowest stored density", "torch_dacl/stages.py",
     "self.num_positives - half, largest=True)", "self.num_positives - half, largest=False)"),
    ("negatives also from the anchor's own class", "torch_dacl/stages.py",
     "ok = valid.reshape(1, c * s) & (pool_cls.unsqueeze(0) != torch.arange(c, device=unit.device).unsqueeze(1))",
     "ok = valid.reshape(1, c * s).expand(c, -1)"),
    ("module passes temperature=0.4 whatever it was given", "torch_dacl/stages.py",
     "temperature=self.temperature,", "temperature=0.4,"),
    ('"scale" weight left attached to the graph', "torch_dacl/functional.py",
     "terms = -torch.exp(log_w).detach() * log_ratio", "terms = -torch.exp(log_w) * log_ratio"),
    ("centers_valid ignored when counting contributing anchors", "torch_dacl/functional.py",
     "contributing = anchors_valid & (has_neg & centers_valid).unsqueeze(-1)",
     "contributing = anchors_valid & has_neg.unsqueeze(-1)"),
    ("CPS masked mean divides by all pixels", "torch_dacl/functional.py",
     "return ((ce_a + ce_b) * m).sum() / m.sum().clamp_min(1.0)", "return ((ce_a + ce_b) * m).sum() / m.numel()"),
]


def export(ref: str, dest: Path) -> None:
    """The tree of ``ref`` (committed files only) into ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tempfile.TemporaryFile() as f:
        subprocess.run(["git", "-C", str(REPO), "archive", ref], stdout=f, check=True)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(dest)


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env.pop("TORCH_DACL_DATA", None)
    return env


def run_named(ref: str, workdir: Path, tests) -> list:
    rows = []
    for name, path, old, new in NAMED:
        copy = workdir / "named"
        export(ref, copy)
        src = (copy / path).read_text()
        if src.count(old) != 1:
            rows.append((name, path, "NOT APPLIED (pattern not found once)", 0.0))
            continue
        (copy / path).write_text(src.replace(old, new))
        t = time.time()
        r = subprocess.run([sys.executable, "-m", "pytest", *PYTEST_ARGS, "-rf", *tests], cwd=copy,
                           capture_output=True, text=True, env=_env())
        failed = re.findall(r"^FAILED (\S+?)(?: - |$)", r.stdout, flags=re.M)
        verdict = f"killed by {len(failed)} tests: " + ", ".join(failed) if r.returncode != 0 and failed else (
            "SURVIVED" if r.returncode == 0 else f"error (rc {r.returncode}): {r.stdout[-300:]}")
        rows.append((name, path, verdict, time.time() - t))
        print(f"{name}: {verdict}", flush=True)
    return rows


def run_mutmut(ref: str, workdir: Path, files, tests, max_children: int, resume: bool = False) -> dict:
    copy = workdir / "mutmut"
    stamp = workdir / "commit"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", ref], capture_output=True, text=True,
                            check=True).stdout.strip()
    if resume and not (stamp.is_file() and stamp.read_text().strip() == commit and (copy / "mutants").is_dir()):
        raise SystemExit(f"--resume: {workdir} holds no run of {commit[:7]} to resume")
    if not resume:  # a fresh copy; with --resume mutmut keeps the verdicts it has and runs the rest
        export(ref, copy)
        stamp.write_text(commit + "\n")
        _configure(copy, files, tests)
    mutmut = shutil.which("mutmut") or str(Path(sys.executable).parent / "mutmut")
    t = time.time()
    r = subprocess.run([mutmut, "run", "--max-children", str(max_children)], cwd=copy, env=_env(),
                       capture_output=True, text=True)
    wall = time.time() - t
    (workdir / "mutmut-run.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:])
        raise SystemExit(f"mutmut run failed (rc {r.returncode}); log in {workdir / 'mutmut-run.log'}")
    res = subprocess.run([mutmut, "results", "--all", "true"], cwd=copy, env=_env(), capture_output=True, text=True)
    status = dict(re.findall(r"^\s+(\S+): (.+)$", res.stdout, flags=re.M))
    counts: dict = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    for m in [m for m, s in status.items() if s == "survived" and re.search(IMPORT_TIME, m)]:
        # mutmut's forked runner imported the module before activating the mutant: run it again
        # with the mutant active from the start (the trampoline reads MUTANT_UNDER_TEST at call time)
        r = subprocess.run([sys.executable, "-m", "pytest", *PYTEST_ARGS, "-x", *tests], cwd=copy / "mutants",
                           env=dict(_env(), MUTANT_UNDER_TEST=m), capture_output=True, text=True)
        if r.returncode == 1:
            status[m] = "killed"
    survivors = [m for m, s in status.items() if s not in ("killed", "caught by type check")]
    diffs = mutant_diffs(copy, survivors)
    with open(workdir / "survivors.tsv", "w") as f:
        for m in survivors:
            f.write(f"{m}\t{status[m]}\t{category(m, diffs[m])}\t{diffs[m]}\n")
    return dict(wall=wall, counts=counts, total=len(status), survivors=survivors, status=status)


def _configure(copy: Path, files, tests) -> None:
    q = lambda xs: "[" + ", ".join(f'"{x}"' for x in xs) + "]"  # noqa: E731
    with open(copy / "pyproject.toml", "a") as f:
        f.write(f"""
[tool.mutmut]
source_paths = ["torch_dacl"]
only_mutate = {q(files)}
also_copy = ["examples", "benchmarks"]
pytest_add_cli_args = {q(PYTEST_ARGS + MUTMUT_DESELECT)}
pytest_add_cli_args_test_selection = {q(tests)}
""")


def mutant_diffs(copy: Path, names) -> dict:
    """``name -> "old line => new line"`` from mutmut's trampolined sources (one pass over the
    files; ``mutmut show`` costs a second per mutant)."""
    import difflib

    blocks = {}
    for path in (copy / "mutants").rglob("*.py"):
        cur, buf = None, []
        for line in path.read_text().splitlines():
            m = re.match(r"\s*def (x\S*?__mutmut_(?:orig|\d+))\(", line)
            if m or (cur and line and not line.startswith((" ", "\t")) and not line.startswith(")")):
                if cur:
                    blocks[cur] = buf
                cur, buf = (m.group(1), [line]) if m else (None, [])
            elif cur:
                buf.append(line)
        if cur:
            blocks[cur] = buf
    out = {}
    for name in names:
        fn = name.rsplit(".", 1)[-1]
        orig, mut = blocks.get(re.sub(r"__mutmut_\d+$", "__mutmut_orig", fn)), blocks.get(fn)
        if orig is None or mut is None:
            out[name] = "?"
            continue
        same_name = lambda b: [re.sub(r"__mutmut_(?:orig|\d+)\(", "(", b[0])] + b[1:]  # noqa: E731 (defaults sit on the def line)
        d = [x for x in difflib.unified_diff(same_name(orig), same_name(mut), lineterm="", n=0)
             if x[:1] in "-+" and x[:3] not in ("---", "+++")]
        out[name] = " => ".join(x[1:].strip() for x in d)[:300]
    return out


CATEGORIES = [  # (label, test on "name diff"): first match wins
    ("distributed-only branch (tests/test_distributed.py)", r"_dist\.|distributed|generator=None|, generator=gen\)|gen = "),
    ("device argument (equal on CPU)", r"device=None|device=(dev|x\.device|features\.device|a_idx\.device|embeddings\.device), \)|dev = None|\(dev\)|device=dev\)"),
    ("error-message / argument-name text", r"raise |XX|check_(rank|float|labels|finite|positive|ks)\(|ValueError|f\"|\"[A-Z_]+\""),
    ("spelling of a constant the callee reads case-insensitively", r"INF|einsum\(\"[A-Z]"),
]


def category(name: str, diff: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name + " " + diff):
            return label
    return "to review"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", default="HEAD", help="commit to test (exported with git archive)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "torch-dacl-mutation"))
    ap.add_argument("--part", choices=["all", "mutmut", "named"], default="all")
    ap.add_argument("--files", nargs="+", default=FILES)
    ap.add_argument("--tests", nargs="+", default=TESTS)
    ap.add_argument("--max-children", type=int_range(1), default=os.cpu_count() or 2)
    ap.add_argument("--resume", action="store_true",
                    help="go on with the unfinished run of --ref in --workdir (mutmut keeps each verdict as it goes)")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.ref], capture_output=True,
                            text=True, check=True).stdout.strip()
    print(f"commit {commit}; scratch {workdir}", flush=True)
    lines = [f"# mutation run of {commit}", ""]
    if args.part in ("all", "named"):
        rows = run_named(args.ref, workdir, args.tests)
        lines += ["| mutation | file | result | s |", "| --- | --- | --- | --- |"]
        lines += [f"| {n} | {p} | {v} | {t:.0f} |" for n, p, v, t in rows] + [""]
    if args.part in ("all", "mutmut"):
        res = run_mutmut(args.ref, workdir, args.files, args.tests, args.max_children, resume=args.resume)
        killed = res["counts"].get("killed", 0)
        lines += [f"mutmut over {', '.join(args.files)}: {res['total']} mutants, {killed} killed "
                  f"({100 * killed / max(res['total'], 1):.1f} %), wall {res['wall']:.0f} s",
                  "", "counts: " + ", ".join(f"{k} {v}" for k, v in sorted(res["counts"].items())), "",
                  "survivors (diffs in survivors.diff):"] + [f"- {m}: {res['status'][m]}" for m in res["survivors"]]
    report = workdir / "mutation-report.md"
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"report: {report}")


if __name__ == "__main__":
    main()
