"""The benchmarks: the one aggregator (benchmarks/collect.py) on run records of both layouts and the
committed tables; the cost benchmark runs (--quick, as CI does) and writes a well-formed JSON."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import collect  # noqa: E402
import results_schema as rs  # noqa: E402


def _record(method, seed, dice, variant=None, dataset="acdc", labeled=7):
    per_case = {f"c{i}": {"dice": [dice, dice + 0.1], "jaccard": [dice / 2] * 2, "hd95": [5.0, 7.0],
                          "asd": [1.0, 3.0]} for i in range(3)}
    return rs.RunRecord(identity=rs.Identity(dataset, method, "quick", seed, labeled, "patients", 20, variant),
                        best=rs.Best(20, dice), test=rs.TestResult.from_cases(["RV", "LV"], per_case, empty_cases=0),
                        timing=rs.Timing(100.0 + seed), environment=rs.Environment("cpu"),
                        val_history=[rs.ValPoint(10, dice - 0.1),
                                     rs.ValPoint(20, dice, train_seconds=600.0 * (seed + 1))],
                        command=f"run {seed}")


def test_collect_acdc_from_run_folders(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    for seed in (0, 1, 2):
        for variant, method, dice in (("cps", "cps", 0.40), ("dacl", "dacl", 0.42), ("V", "dacl", 0.41)):
            _record(method, seed, dice + 0.01 * seed, variant).save(
                collect.run_dir(runs, "acdc", "cpu", variant, 7, seed) / "metrics.json")
    # a run in the legacy 2D layout is read through the schema too
    legacy = json.loads(json.dumps(__import__("test_results_schema").LEGACY_2D))
    legacy.update(method="sup", seed=0)
    d = collect.run_dir(runs, "acdc", "cpu", "sup", 7, 0)
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(legacy))
    collect.main(["acdc", "--collect-only", "--runs", str(runs), "--results", str(out), "--patients", "7"])
    table = rs.load_table(out / "acdc_cpu.json")
    assert [r.variant for r in table.rows] == ["sup", "cps", "V", "dacl"]
    dacl = table.rows[-1]
    assert dacl.seeds == [0, 1, 2] and dacl.metrics["dice"].per_seed == pytest.approx({"0": 47.0, "1": 48.0, "2": 49.0})
    assert dacl.metrics["dice"].mean == pytest.approx(48.0) and dacl.metrics["dice"].std == pytest.approx(1.0)
    assert dacl.metrics["hd95"].mean == pytest.approx(6.0) and dacl.per_class["dice"]["LV"].mean == pytest.approx(53.0)
    assert dacl.num_test_cases == 3 and dacl.wall_seconds == {"0": 100.0, "1": 101.0, "2": 102.0}
    assert dacl.train_seconds == {"0": 600.0, "1": 1200.0, "2": 1800.0}  # from the validation history
    pairs = {(p.a, p.b): p for p in table.paired}
    assert pairs["dacl", "cps"].diffs == pytest.approx([2.0, 2.0, 2.0]) and pairs["dacl", "cps"].wins == 3
    assert pairs["cps", "sup"].seeds == [0]
    assert pairs["V", "cps"].diffs == pytest.approx([1.0, 1.0, 1.0]) and ("II", "cps") not in pairs  # no II runs
    assert pairs["dacl", "V"].diffs == pytest.approx([1.0, 1.0, 1.0]) and pairs["dacl", "V"].wins == 3
    md = (out / "acdc_cpu.md").read_text()
    assert "| DACL (Table 2 VI: + w_i) | 3 | 3 | 10/20/30 |" in md
    assert "90.91 ± 0.5" in md and "89.80 ± 0.5 (Table 2)" in md
    assert "DACL − CPS: +2.00 ± 0.00" in md and "the paper: +5.20" in md
    assert "CPS − supervised only: " in md and "(one seed: no spread)" in md  # no ± 0.00 from one seed
    assert "- V: + memory bank − CPS: +1.00 ± 0.00" in md and "the paper: +4.09" in md  # Table 2: V 89.80, I 85.71
    assert "- DACL − V: +1.00 ± 0.00" in md and "the paper: +1.11" in md  # VI 90.91, V 89.80
    if __import__("importlib").util.find_spec("matplotlib"):
        assert (out / "acdc_cpu_val_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_collect_of_a_subset_keeps_the_other_label_counts(tmp_path):
    # running only Table 2's rows at 7 patients must not drop the 3-patient rows from the written table
    runs, out = tmp_path / "runs", tmp_path / "results"
    for variant, method, labeled in (("cps", "cps", 3), ("dacl", "dacl", 3), ("II", "dacl", 7)):
        _record(method, 0, 0.4, variant, labeled=labeled).save(
            collect.run_dir(runs, "acdc", "cpu", variant, labeled, 0) / "metrics.json")
    collect.main(["acdc", "--collect-only", "--variants", "II", "--runs", str(runs), "--results", str(out),
                  "--patients", "7"])
    table = rs.load_table(out / "acdc_cpu.json")
    assert [(r.labeled, r.variant) for r in table.rows] == [(7, "II"), (3, "cps"), (3, "dacl")]
    assert table.command == f"python benchmarks/collect.py acdc --collect-only --runs {runs}"


def test_collect_figure_legend_names_the_tables_classes(tmp_path, monkeypatch):
    # the overlay figure of a CHAOS table must not carry ACDC's RV / Myo / LV legend
    pytest.importorskip("matplotlib")
    import acdc_plot
    import numpy as np

    runs, out, seen = tmp_path / "runs", tmp_path / "results", {}
    rec = _record("cps", 0, 0.5, "cps", dataset="chaos", labeled=4)
    rec.test = rs.TestResult.from_cases(["liver", "spleen"], {"c0": {m: [0.5, 0.6] for m in rs.METRICS}}, empty_cases=0)
    d = collect.run_dir(runs, "chaos", "cpu", "cps", 4, 0)
    rec.save(d / "metrics.json")
    slices = {"c0_z0": {"image": np.zeros((4, 4), "float32"), "label": np.zeros((4, 4), "uint8"),
                        "pred": np.zeros((4, 4), "uint8")}}
    acdc_plot.save_slices(d / "test_slices.npz", slices)
    monkeypatch.setattr(acdc_plot, "render", lambda runs_, path, class_names=None: seen.setdefault("names", class_names))
    collect.main(["chaos", "--collect-only", "--runs", str(runs), "--results", str(out)])
    assert seen["names"] == ["background", "liver", "spleen"]


def test_collect_writes_nothing_without_runs(tmp_path, capsys):
    collect.main(["chaos", "--collect-only", "--runs", str(tmp_path), "--results", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists() and "nothing written" in capsys.readouterr().out


def test_paper_numbers_come_from_one_file():
    assert collect.paper_row("acdc", 7, "dacl") == {"source": "Table 1", "dice": "90.91+-0.5", "jaccard": "79.12+-1.0",
                                                    "asd": "0.38+-0.2"}
    assert collect.paper_row("acdc", 3, "sup")["dice"] == "43.30+-8.6"
    assert collect.paper_row("acdc", 7, "III") == {"source": "Table 2", "dice": "88.60+-0.7"}
    assert collect.paper_row("acdc", 3, "III") is None  # Table 2 is at 10 % only
    assert collect.paper_row("synapse", 4, "cps")["dice"] == "31.46+-2.5"
    assert collect.paper_row(None, 4, "cps") is None
    assert not (ROOT / "docs" / "paper_numbers.json").exists()


@pytest.mark.parametrize("name", ["acdc_quick", "chaos_quick", "acdc_cpu", "chaos_cpu"])
def test_committed_tables_are_in_the_schema_and_their_markdown_is_generated(name):
    table = rs.load_table(ROOT / "benchmarks" / "results" / f"{name}.json")
    assert table.rows and all(set(rs.METRICS) <= set(r.metrics) for r in table.rows)
    assert collect.markdown(table) == (ROOT / "benchmarks" / "results" / f"{name}.md").read_text()
    for p in table.paired:  # the stored paired differences are those of the stored per-seed Dice
        rows = {r.variant: r for r in table.rows if r.labeled == p.labeled}
        assert p.diffs == pytest.approx([rows[p.a].metrics["dice"].per_seed[str(s)]
                                         - rows[p.b].metrics["dice"].per_seed[str(s)] for s in p.seeds])


def test_cli_keeps_the_old_commands():
    help_ = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "collect.py"), "--help"], capture_output=True,
                           text=True, check=True).stdout
    for flag in ("--patients", "--variants", "--seeds", "--collect-only", "--runs", "--threads", "--preset"):
        assert flag in help_
    assert not (ROOT / "benchmarks" / "acdc_table.py").exists() and not (ROOT / "benchmarks" / "chaos_table.py").exists()


@pytest.mark.slow
@pytest.mark.parametrize("example", ["acdc", "chaos"])
def test_step_cost_quick_writes_json(tmp_path, request, example):
    """benchmarks/step_cost.py times the example's real steps (smoke preset), profiles where the
    time goes, and writes its tables."""
    data_dir = request.getfixturevalue(f"{example}_dir")
    out = tmp_path / "step.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), "--quick", "--example", example,
                    "--data-root", str(data_dir.parent), "--output", str(out)], check=True, cwd=ROOT, timeout=600)
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["rows"]] == ["cps", "dacl"] and data["rows"][0]["step_ratio_to_cps"] == 1.0
    assert all(r["step_s"] > 0 and r["timed_steps"] == 2 for r in data["rows"])
    assert data["rows"][1]["objective_s"] > data["rows"][0]["objective_s"] > 0  # DACL's losses on top of CPS
    assert "--quick" in data["command"] and "| dacl |" in data["table"]
    assert ("CHAOS-T2" in data["what"]) == (example == "chaos")
    # the profile: every stage of train_step was seen, and DACL's objective costs more than CPS's
    stages = {r["variant"]: r for r in data["stages"]}
    assert set(stages) == {"cps", "dacl"} and data["profiled_steps"] == 1
    for r in stages.values():
        assert all(r[f"{k}_ms"] > 0 for k in ("forward", "sup_loss", "objective", "backward", "optimizer"))
    assert stages["dacl"]["objective_ms"] > stages["cps"]["objective_ms"]
    grown = data["ops_grown_most"]["dacl"]
    assert grown and all(g["added_ms"] == pytest.approx(g["ms"] - g["cps_ms"]) for g in grown)
    assert [g["added_ms"] for g in grown] == sorted((g["added_ms"] for g in grown), reverse=True)


@pytest.mark.slow
def test_loss_cost_quick_writes_json(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    out = tmp_path / "cost.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loss_cost.py"), "--quick", "--threads", "1",
                    "--output", str(out)], check=True, cwd=ROOT, timeout=600)
    data = json.loads(out.read_text())
    assert [r["classes"] for r in data["ratio"]] == [4, 14]
    for r in data["ratio"]:
        assert r["loss_fwd_bwd_s"] > 0 and r["cps_step_s"] > 0 and r["speedup_vs_naive"] > 0
    assert {r["axis"] for r in data["scaling"]} == {"bank", "classes", "samples"}
    assert all(r["peak_extra_mb"] >= 0 for r in data["scaling"])
    assert data["training_step"]["dacl_step_s"] > 0
    for r in data["floor"]:  # the gradient write is a third part of the floor: the ratio with it is lower
        assert r["gradient_write_s"] > 0 and r["loss_over_floor_with_gradient_write"] < r["loss_over_floor"]
    pytest.importorskip("matplotlib")
    fig = tmp_path / "cost_scaling.png"
    assert fig.is_file() and fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mutation_resume_refuses_a_workdir_without_that_run(tmp_path):
    """--resume goes on only with a run of the same commit; otherwise it says so and stops
    before mutmut is started (no export, nothing written)."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mutation.py"), "--part", "mutmut", "--resume",
                        "--workdir", str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "holds no run of" in r.stderr
    assert not (tmp_path / "w" / "mutmut").exists()
    (tmp_path / "w" / "commit").write_text("0" * 40 + "\n")  # another commit's run
    (tmp_path / "w" / "mutmut" / "mutants").mkdir(parents=True)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mutation.py"), "--part", "mutmut", "--resume",
                        "--workdir", str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "holds no run of" in r.stderr
