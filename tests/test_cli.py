"""Every numeric flag of the scripts is checked at parse time: a bad value is argparse's
one-line error (exit 2) naming the flag, the allowed range and the value, with no traceback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

from _cli import ArgValueError, float_range, int_range  # noqa: E402


def _module(rel: str):
    path = REPO / rel
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _entry(rel: str):
    if rel in ("examples/acdc_cps_dacl.py", "examples/synapse_cps_dacl.py"):
        pytest.importorskip("segmentation_models_pytorch")
        pytest.importorskip("dynamic_network_architectures")
        mod = _module(rel)
        return lambda argv: mod.engine.make_config(mod.TASK, argv)
    return _module(rel).main


CASES = [  # (script, argv, words the error must hold)
    ("examples/acdc_cps_dacl.py", ["--steps", "-5"], ["--steps", "integer >= 1", "'-5'"]),
    ("examples/acdc_cps_dacl.py", ["--labeled-bs", "0"], ["--labeled-bs", ">= 1", "'0'"]),
    ("examples/acdc_cps_dacl.py", ["--labeled", "0"], ["--labeled", "count >= 1 or a fraction", "'0'"]),
    ("examples/acdc_cps_dacl.py", ["--labeled", "5"], ["--labeled", "3 or 7 patients", "5"]),
    ("examples/acdc_cps_dacl.py", ["--threads", "0"], ["--threads", ">= 1", "'0'"]),
    ("examples/acdc_cps_dacl.py", ["--size", "7"], ["--size", ">= 16", "'7'"]),
    ("examples/acdc_cps_dacl.py", ["--size", "64", "--crop", "96"], ["--crop", "at most --size (64)", "96"]),
    ("examples/acdc_cps_dacl.py", ["--method", "cps", "--unlabeled-bs", "0"], ["--unlabeled-bs", "cps", ">= 1"]),
    ("examples/acdc_cps_dacl.py", ["--lr", "0"], ["--lr", "> 0", "'0'"]),
    ("examples/acdc_cps_dacl.py", ["--pseudo-confidence", "1.5"], ["--pseudo-confidence", "<= 1", "'1.5'"]),
    ("examples/acdc_cps_dacl.py", ["--temperature", "nan"], ["--temperature", "> 0", "'nan'"]),
    ("examples/acdc_cps_dacl.py", ["--ks", "8", "0"], ["--ks", ">= 1", "'0'"]),
    ("examples/acdc_cps_dacl.py", ["--val-every", "x"], ["--val-every", "an integer", "'x'"]),
    ("examples/synapse_cps_dacl.py", ["--steps", "0"], ["--steps", ">= 1", "'0'"]),
    ("examples/synapse_cps_dacl.py", ["--patch", "16", "64", "4"], ["--patch", ">= 8", "'4'"]),
    ("examples/synapse_cps_dacl.py", ["--spacing", "1", "-1", "1"], ["--spacing", "> 0", "'-1'"]),
    ("examples/synapse_cps_dacl.py", ["--labeled", "-2"], ["--labeled", "count >= 1", "'-2'"]),
    ("examples/evaluate_acdc.py", ["x.pt", "--limit", "0"], ["--limit", ">= 1", "'0'"]),
    ("benchmarks/step_cost.py", ["--steps", "0"], ["--steps", ">= 1"]),
    ("benchmarks/step_cost.py", ["--warmup", "-1"], ["--warmup", ">= 0"]),
    ("benchmarks/loss_cost.py", ["--classes", "1"], ["--classes", ">= 2"]),
    ("benchmarks/collect.py", ["acdc", "--threads", "0"], ["--threads", ">= 1"]),
    ("benchmarks/mechanism.py", ["x.pt", "--pixels-per-class", "1"], ["--pixels-per-class", ">= 2"]),
    ("benchmarks/pack_acdc.py", ["pack", "--max-mib", "0"], ["--max-mib", "> 0"]),
    ("benchmarks/recipe_curves.py", ["run", "--target", "101"], ["--target", "<= 100"]),
    ("benchmarks/mutation.py", ["--max-children", "0"], ["--max-children", ">= 1"]),
]


@pytest.mark.parametrize("script,argv,words", CASES, ids=[f"{c[0].split('/')[1]}:{' '.join(c[1])}" for c in CASES])
def test_bad_value_is_a_one_line_argparse_error(script, argv, words, capsys):
    main = _entry(script)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"{Path(sys.argv[0]).name}: error: argument ") or ": error: argument " in err[-1]
    for w in words:
        assert w in err[-1], (w, err[-1])


def test_the_command_line_itself_prints_no_traceback(tmp_path):
    """As a user sees it: the script run as a program, a bad value, exit 2, one line of error."""
    r = subprocess.run([sys.executable, str(REPO / "examples" / "acdc_cps_dacl.py"), "--steps", "-5"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "acdc_cps_dacl.py: error: argument --steps/--iterations: expected an integer >= 1, got '-5'")


def test_range_types():
    assert int_range(1)("3") == 3 and int_range(0, 2)("2") == 2
    assert float_range(0, 1, lo_open=True)("1") == 1.0
    for conv, bad in ((int_range(1), "0"), (int_range(0, 2), "3"), (int_range(), "1.5"),
                      (float_range(0, 1, lo_open=True), "0"), (float_range(0, 1, hi_open=True), "1"),
                      (float_range(), "inf"), (float_range(), "x")):
        with pytest.raises(ArgValueError):
            conv(bad)
    with pytest.raises(ValueError):  # callers outside argparse catch it as a ValueError
        int_range(1)("0")
