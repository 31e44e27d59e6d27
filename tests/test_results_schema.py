"""The one results schema (examples/results_schema.py): round trip, the two legacy layouts, and the
committed per-run records under benchmarks/results/records/."""

import json
import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import results_schema as rs  # noqa: E402

# Trimmed copies of what the two example scripts wrote before the shared engine (same keys and nesting).
LEGACY_2D = {
    "method": "dacl", "preset": "quick", "seed": 1, "labeled_patients": 7, "labeled_slices": 136, "steps": 300,
    "best_val_dice": 0.52, "best_step": 200, "val_volumes": 5, "val_volumes_in_split": 20,
    "val_metric": "mean 3D Dice over classes 1-3 of model a", "dataset": "ACDC", "reduced_evaluation": True,
    "val_history": [{"step": 200, "val_dice": 0.52}, {"step": 300, "val_dice": 0.5}],
    "dacl_diagnostics": [{"step": 10, "anchors/RV": 32.0}],
    "test": {"split": "test", "num_volumes": 2, "num_volumes_in_split": 40, "dataset": "ACDC",
             "class_names": ["RV", "Myo", "LV"], "cases": ["p1", "p2"], "model": "a", "input_size": 96,
             "units": "voxels (no spacing)", "empty_convention": "both empty: dice=1", "empty_cases": 1,
             "mean": {"dice": 0.5, "jaccard": 0.4, "hd95": 10.0, "asd": 3.0},
             "std_over_volumes": {"dice": 0.1, "jaccard": 0.1, "hd95": 1.0, "asd": 0.5},
             "per_class": {"dice": {"RV": 0.4, "Myo": 0.5, "LV": 0.6}, "jaccard": {"RV": 0.3, "Myo": 0.4, "LV": 0.5},
                           "hd95": {"RV": 12.0, "Myo": 10.0, "LV": 8.0}, "asd": {"RV": 4.0, "Myo": 3.0, "LV": 2.0}},
             "per_case": {"p1": {"dice": [0.4, 0.5, 0.6], "jaccard": [0.3, 0.4, 0.5], "hd95": [12.0, 10.0, 8.0],
                                 "asd": [4.0, 3.0, 2.0], "empty": 0},
                          "p2": {"dice": [0.4, 0.5, 0.6], "jaccard": [0.3, 0.4, 0.5], "hd95": [12.0, 10.0, 8.0],
                                 "asd": [4.0, 3.0, 2.0], "empty": 1}}},
    "train_seconds": 143.1, "wall_seconds": 153.2, "device": "cpu", "torch": "2.4.0", "threads": 1,
    "resumed_from": None,
}
LEGACY_3D = {
    "dataset": "chaos", "dataset_dir": "/data/CHAOS-T2", "method": "cps", "preset": "quick", "labeled": 4, "seed": 0,
    "device": "cpu", "amp": False, "channels_last": True, "torch_threads": 2, "config": {"patch": [16, 64, 64]},
    "reduced": "quick: ...", "split": {"test": ["10", "13"]}, "evaluation": "sliding window ...",
    "best_val": {"dice": 0.6, "iteration": 400},
    "history": [{"iteration": 200, "val_dice": 0.5, "loss": 1.0, "elapsed_s": 9.2},
                {"iteration": 400, "val_dice": 0.6, "loss": 0.8, "elapsed_s": 18.0}],
    "dacl_diagnostics": [{"iteration": 1, "anchors/liver": 64.0}], "iterations": 400,
    "test": {"mean_dice": 0.45, "mean_asd_vox": 5.0, "mean_asd_mm": 20.0,
             "per_organ": {"liver": {"dice": 0.8, "dice_std": 0.01, "asd_vox": 2.0, "asd_mm": 8.0, "asd_missing": 0},
                           "spleen": {"dice": 0.1, "dice_std": 0.1, "asd_vox": 8.0, "asd_mm": 32.0,
                                      "asd_missing": 1}}},
    "test_per_case": {"10": {"liver": {"dice": 0.79, "asd_vox": 2.0, "asd_mm": 8.0},
                             "spleen": {"dice": 0.2, "asd_vox": 8.0, "asd_mm": 32.0}},
                      "13": {"liver": {"dice": 0.81, "asd_vox": 2.0, "asd_mm": 8.0},
                             "spleen": {"dice": 0.0, "asd_vox": None, "asd_mm": None}}},
    "wall_time_s": {"total": 900.0, "load": 2.0, "train_and_val": 850.0, "validation": 40.0, "test": 30.0,
                    "per_iteration": 2.0},
    "command": "python examples/synapse_cps_dacl.py --preset quick --method cps", "png": "x.png",
}


def test_round_trip_is_exact(tmp_path):
    per_case = {"a": {"dice": [0.5, 1.0], "hd95": [3.0, None]}, "b": {"dice": [0.7, 0.0], "hd95": [1.0, 2.0]}}
    rec = rs.RunRecord(
        identity=rs.Identity("acdc", "dacl", "quick", 0, 7, "patients", 20, variant="VI"),
        config={"lr": 0.01, "size": [96, 96]},
        val_history=[rs.ValPoint(10, 0.4, {"RV": 0.3, "LV": 0.5}), rs.ValPoint(20, 0.5)],
        best=rs.Best(20, 0.5), test=rs.TestResult.from_cases(["RV", "LV"], per_case, empty_cases=1),
        diagnostics=[{"step": 10, "anchors/RV": 3.0}],
        timing=rs.Timing(wall_seconds=12.5, train_seconds=10.0, per_step=0.5),
        environment=rs.Environment("cpu", "2.4.0", 2, 1), command="python x.py", extra={"note": "n"})
    path = rec.save(tmp_path / "run" / "metrics.json")
    back = rs.load(path)
    assert back == rec
    assert json.loads(path.read_text())["schema_version"] == rs.SCHEMA_VERSION
    # the means: per class over cases (None left out), overall over classes; unmeasured metrics are None
    assert back.test.per_class["dice"] == {"RV": pytest.approx(0.6), "LV": pytest.approx(0.5)}
    assert back.test.per_class["hd95"] == {"RV": 2.0, "LV": 2.0}
    assert back.test.mean["dice"] == pytest.approx(0.55)
    assert back.test.mean["jaccard"] is None and set(rs.METRICS) <= set(back.test.mean)
    assert back.test.num_cases == 2


def test_nan_is_written_as_null(tmp_path):
    rec = rs.RunRecord(identity=rs.Identity("chaos", "cps", "smoke", 0, 2, "volumes", 8), best=rs.Best(None, None),
                       test=rs.TestResult.from_cases(["liver"], {"1": {"dice": [float("nan")]}}),
                       timing=rs.Timing(float("inf")), environment=rs.Environment("cpu"))
    text = rec.save(tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = rs.load(tmp_path / "m.json")
    assert back.test.mean["dice"] is None and back.timing.wall_seconds is None


def test_unknown_keys_and_newer_versions_are_refused():
    d = rs.from_dict(LEGACY_2D).to_dict()
    with pytest.raises(ValueError, match="unknown keys"):
        rs.from_dict({**d, "identity": {**d["identity"], "labeled_patients": 7}})
    with pytest.raises(ValueError, match="newer"):
        rs.from_dict({**d, "schema_version": rs.SCHEMA_VERSION + 1})
    with pytest.raises(ValueError, match="not a run record"):
        rs.from_dict({"rows": []})


def test_legacy_2d_layout(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(LEGACY_2D))
    (tmp_path / "config.json").write_text(json.dumps({"lr": 0.01, "method": "dacl"}))
    rec = rs.load(tmp_path / "metrics.json")
    assert rec.identity == rs.Identity("acdc", "dacl", "quick", 1, 7, "patients", 300)
    assert rec.config == {"lr": 0.01, "method": "dacl"}
    assert rec.best == rs.Best(200, 0.52)
    assert [(p.step, p.mean_dice) for p in rec.val_history] == [(200, 0.52), (300, 0.5)]
    assert rec.test.mean == LEGACY_2D["test"]["mean"] and rec.test.classes == ["RV", "Myo", "LV"]
    assert rec.test.per_class["hd95"]["LV"] == 8.0 and rec.test.num_cases == 2
    assert rec.test.per_case["p2"] == {"dice": [0.4, 0.5, 0.6], "jaccard": [0.3, 0.4, 0.5],
                                       "hd95": [12.0, 10.0, 8.0], "asd": [4.0, 3.0, 2.0]}
    assert rec.test.empty_cases == 1 and rec.test.units["hd95"] == "voxels"
    assert rec.timing == rs.Timing(wall_seconds=153.2, train_seconds=143.1)
    assert rec.environment == rs.Environment("cpu", "2.4.0", 1, 1)
    assert rec.diagnostics == [{"step": 10, "anchors/RV": 32.0}]
    assert rec.extra["labeled_slices"] == 136
    assert rs.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_legacy_3d_layout():
    rec = rs.from_dict(LEGACY_3D)
    assert rec.identity == rs.Identity("chaos", "cps", "quick", 0, 4, "volumes", 400)
    assert rec.best == rs.Best(400, 0.6)
    assert [(p.step, p.mean_dice, p.loss) for p in rec.val_history] == [(200, 0.5, 1.0), (400, 0.6, 0.8)]
    assert rec.test.mean == {"dice": 0.45, "jaccard": None, "hd95": None, "asd": 5.0, "asd_mm": 20.0}
    assert rec.test.per_class["dice"] == {"liver": 0.8, "spleen": 0.1}
    assert rec.test.per_case["13"]["asd"] == [2.0, None]
    assert rec.test.num_cases == 2 and rec.test.empty_cases == 1 and rec.test.units["asd_mm"] == "mm"
    assert "left out of ASD" in rec.test.empty_convention
    assert rec.timing.wall_seconds == 900.0 and rec.timing.per_step == 2.0 and rec.timing.phases["test"] == 30.0
    assert rec.environment.threads == 2 and rec.command.startswith("python examples/synapse_cps_dacl.py")
    assert rec.diagnostics == [{"step": 1, "anchors/liver": 64.0}]
    assert rs.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


RUNS = sorted((ROOT / "benchmarks" / "results" / "records").glob("*.json"))


@pytest.mark.parametrize("path", RUNS, ids=[p.stem for p in RUNS])
def test_committed_run_records_load_in_the_schema(path):
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == rs.SCHEMA_VERSION
    rec = rs.load(path)
    assert rec.to_dict() == raw
    t = rec.test
    assert t.num_cases == len(t.per_case) > 0 and set(rs.METRICS) <= set(t.mean)
    for m, v in t.mean.items():  # the stored mean is the mean over classes of the per-class means
        vals = [x for x in t.per_class[m].values() if x is not None]
        assert (v is None) == (not vals) and (v is None or math.isclose(v, sum(vals) / len(vals), rel_tol=1e-9))


def test_committed_objective_runs_match_their_summary():
    """benchmarks/results/acdc_objective_300steps.json summarises two runs whose full records are
    committed beside it; the summary's numbers are the records' numbers."""
    summary = json.loads((ROOT / "benchmarks" / "results" / "acdc_objective_300steps.json").read_text())
    for name, run in summary["runs"].items():
        rec = rs.load(ROOT / "benchmarks" / "results" / "records" / run["record"])
        assert rec.test.mean["dice"] == run["test_mean_dice"]
        assert rec.timing.train_seconds == run["train_seconds"]
        assert rec.command == run["command"]
