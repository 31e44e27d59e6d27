"""benchmarks/hypotheses.py (issue #27's table) and benchmarks/mechanism_curves.py on synthetic
run folders: the score, the pairing by seed, the 'moves' rule, the figure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import hypotheses  # noqa: E402
import mechanism_curves  # noqa: E402


def _run(runs: Path, variant: str, seed: int, dice: list, steps: int = 3000) -> None:
    folder = hypotheses.run_dir(runs, variant, seed)
    folder.mkdir(parents=True)
    hist = [{"step": 500 * (i + 1), "mean_dice": d} for i, d in enumerate(dice)]
    (folder / "val_history.json").write_text(json.dumps({"history": hist}))
    (folder / "config.json").write_text(json.dumps({"steps": steps, "commit": "abc1234"}))


def test_scores_pairs_and_the_moves_rule(tmp_path):
    runs = tmp_path / "runs"
    for seed, (c, d, h) in enumerate([(0.80, 0.79, 0.85), (0.81, 0.82, 0.86)]):
        _run(runs, "cps", seed, [0.5, 0.6, 0.7, c, c, c])
        _run(runs, "dacl", seed, [0.5, 0.6, 0.7, d, d, d])
        _run(runs, "H5-constant", seed, [0.5, 0.6, 0.7, h - 0.01, h, h + 0.01])
    _run(runs, "H3-agree", 0, [0.5, 0.6, 0.7])  # not finished: no score, its progress shown
    _run(runs, "H4-stage2", 0, [0.5, 0.6, 0.7, 0.95, 0.95, 0.95])  # one seed, however good: undecided
    table = hypotheses.main(["collect", "--runs", str(runs), "--records", str(tmp_path / "none"),
                             "--out", str(tmp_path / "out" / "hyp")])
    rows = {r["variant"]: r for r in table["rows"]}
    assert rows["cps"]["scores"] == {"0": pytest.approx(80.0), "1": pytest.approx(81.0)}
    assert rows["H5-constant"]["score"]["mean"] == pytest.approx(85.5)
    assert rows["H5-constant"]["minus_cps"]["mean"] == pytest.approx(5.0)
    assert rows["H5-constant"]["minus_dacl"]["mean"] == pytest.approx(5.0)
    assert rows["H5-constant"]["moves"] is True and "moves" not in rows["cps"]
    assert rows["H3-agree"]["score"]["n"] == 0 and rows["H3-agree"]["steps_done"] == {"0": 1500}
    assert rows["H4-stage2"]["minus_cps"]["mean"] == pytest.approx(15.0) and rows["H4-stage2"].get("moves") is None
    md = (tmp_path / "out" / "hyp.md").read_text()
    assert "| H5: lambda_CL constant 0.5 after the warm-up | 7 | 85.50 ± 0.71 (2) |" in md
    assert "0: step 1500" in md and "abc1234" in md
    # one seed: its std is unknown, not 0, and a variant cannot be said to move
    one = tmp_path / "one"
    _run(one, "cps", 0, [0.5, 0.6, 0.7, 0.80, 0.80, 0.80])
    _run(one, "dacl", 0, [0.5, 0.6, 0.7, 0.79, 0.79, 0.79])
    _run(one, "H5-constant", 0, [0.5, 0.6, 0.7, 0.90, 0.90, 0.90])
    table = hypotheses.main(["collect", "--runs", str(one), "--records", str(tmp_path / "none"),
                             "--out", str(tmp_path / "out" / "hyp1")])
    rows = {r["variant"]: r for r in table["rows"]}
    assert rows["cps"]["score"]["std"] is None and rows["H5-constant"].get("moves") is None
    md = (tmp_path / "out" / "hyp1.md").read_text()
    assert "| CPS (baseline) | 7 | 80.00 (1) |" in md and "| +10.00 |" in md


def test_finished_runs_are_recorded_and_a_record_wins_over_runs(tmp_path, monkeypatch):
    runs, records = tmp_path / "runs", tmp_path / "records"
    _run(runs, "cps", 0, [0.5, 0.6, 0.7, 0.8, 0.8, 0.8])  # finished: recorded, not run again
    (hypotheses.run_dir(runs, "cps", 0) / "last.pt").write_text("big")
    (hypotheses.run_dir(runs, "cps", 0) / "mechanism.json").write_text('{"records": []}')
    started = []
    monkeypatch.setattr(hypotheses.subprocess, "run", lambda cmd, **kw: started.append(cmd))
    hypotheses.main(["run", "--variants", "cps", "--seeds", "0", "--runs", str(runs), "--records", str(records)])
    rec = records / "acdc_cpu_cps_p7_seed0"
    assert started == [] and sorted(p.name for p in rec.iterdir()) == ["config.json", "mechanism.json",
                                                                       "val_history.json"]
    # the runs folder is gone (a new machine): the record still gives the score, and run skips it
    import shutil

    shutil.rmtree(runs)
    hypotheses.main(["run", "--variants", "cps", "--seeds", "0", "--runs", str(runs), "--records", str(records)])
    assert started == []
    table = hypotheses.main(["collect", "--runs", str(runs), "--records", str(records),
                             "--out", str(tmp_path / "out" / "hyp")])
    assert {r["variant"]: r for r in table["rows"]}["cps"]["scores"] == {"0": pytest.approx(80.0)}
    # a record wins over an unfinished folder of the same run
    _run(runs, "cps", 0, [0.1])
    table = hypotheses.main(["collect", "--runs", str(runs), "--records", str(records),
                             "--out", str(tmp_path / "out" / "hyp")])
    assert {r["variant"]: r for r in table["rows"]}["cps"]["scores"] == {"0": pytest.approx(80.0)}


def test_mechanism_curves_writes_json_and_figure(tmp_path):
    rec = lambda step, s: {"step": step, "pixels": 8, "lambda_cl": 0.1, **{  # noqa: E731
        space: {"silhouette": s, "davies_bouldin": 1 / s, "tail_density_mean": s / 2, "tail_density": {"RV": s / 2},
                "l_cl": 2 - s} for space in ("head", "feature")}}
    for name, s in (("cps", 0.2), ("dacl", 0.4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mechanism.json").write_text(json.dumps({"records": [rec(500, s), rec(1000, s + 0.1)]}))
    (tmp_path / "empty").mkdir()
    res = mechanism_curves.main([str(tmp_path / "cps"), str(tmp_path / "dacl"), str(tmp_path / "empty"),
                                 "--names", "CPS", "DACL", "none", "--out", str(tmp_path / "out")])
    assert [len(r["records"]) for r in res["runs"]] == [2, 2, 0]
    saved = json.loads((tmp_path / "out" / "mechanism_training.json").read_text())
    assert saved["runs"][1]["records"][1]["head"]["silhouette"] == pytest.approx(0.5)
    assert (tmp_path / "out" / "mechanism_training.png").stat().st_size > 5000
    with pytest.raises(SystemExit):
        mechanism_curves.main([str(tmp_path / "cps"), "--names", "a", "b"])


def test_nnunet_chaos_collects_nnunets_own_validation(tmp_path):
    """benchmarks/nnunet_chaos.py reads nnU-Net's validation/summary.json and training log."""
    import nnunet_chaos

    for trainer, dice, times in (("nnUNetTrainer_5epochs", 0.6, [100.0, 110.0, 120.0]),
                                 ("nnUNetTrainerDACL_5epochs", 0.65, [130.0, 140.0, 150.0])):
        d = nnunet_chaos.fold_dir(tmp_path, trainer, 0)
        (d / "validation").mkdir(parents=True)
        (d / "validation" / "summary.json").write_text(json.dumps({
            "foreground_mean": {"Dice": dice}, "mean": {str(c): {"Dice": dice} for c in range(1, 5)},
            "metric_per_case": [{}, {}, {}, {}]}))
        log = "".join(f"Epoch time: {t} s\n" for t in times)
        if "DACL" in trainer:
            log += "dacl_loss 3.5000, lambda_CL 0.0100, anchors per step 900\ndacl_loss 2.5000, lambda_CL 0.0900\n"
        (d / "training_log_2026.txt").write_text(log)
    table = nnunet_chaos.collect(tmp_path, ["nnUNetTrainer_5epochs", "nnUNetTrainerDACL_5epochs"], 0, 5, 250,
                                 tmp_path / "out" / "nnunet_chaos", "cmd")
    assert "5 epochs of 250 iterations" in table["what"]
    base, dacl = table["rows"]
    assert base["val_dice"] == pytest.approx(60.0) and base["seconds_per_epoch"] == 110.0 and base["epochs_done"] == 3
    assert dacl["per_class_dice"]["spleen"] == pytest.approx(65.0) and dacl["dacl_loss_first_last"] == [3.5, 2.5]
    assert "| nnUNetTrainerDACL_5epochs | 3 | 140 | 65.00 |" in (tmp_path / "out" / "nnunet_chaos.md").read_text()


def test_nnunet_chaos_short_schedules_are_found_by_nnunet(monkeypatch, capsys):
    """The benchmark's short schedule pair is found by nnU-Net's own trainer lookup through the
    nnUNet_extTrainer the benchmark sets, and both trainers get the same run length."""
    pytest.importorskip("nnunetv2")
    import nnunet_chaos
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from torch_dacl.nnunet import nnUNetTrainerDACL

    monkeypatch.setenv("nnUNet_extTrainer", nnunet_chaos.env_for(Path("unused"))["nnUNet_extTrainer"])
    base = recursive_find_trainer_class_by_name("nnUNetTrainer_10x25")
    dacl = recursive_find_trainer_class_by_name("nnUNetTrainerDACL_10x25")
    assert issubclass(dacl, nnUNetTrainerDACL) and not issubclass(base, nnUNetTrainerDACL)
    for cls in (base, dacl):
        obj = object.__new__(cls)
        cls.__init__.__globals__["_shorten"](obj, "10x25")  # (nnU-Net drops the module from sys.modules)
        assert (obj.num_epochs, obj.num_iterations_per_epoch, obj.num_val_iterations_per_epoch) == (10, 25, 5)


def test_sparse_validation_compares_with_the_committed_dense_runs(tmp_path):
    import sparse_validation

    folder = tmp_path / "runs" / "acdc_cpu_dacl_p7_seed0"
    folder.mkdir(parents=True)
    (folder / "val_history.json").write_text(json.dumps({"history": [{"step": 500, "mean_dice": 0.6},
                                                                     {"step": 1000, "mean_dice": 0.81}]}))
    (folder / "config.json").write_text(json.dumps({"commit": "fe2423e"}))
    table = sparse_validation.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "sv")])
    acdc, chaos = table["rows"]
    assert acdc["new_default_best_val_dice"] == pytest.approx(81.0) and acdc["new_at_step"] == 1000
    assert acdc["old_default_best_val_dice"] == pytest.approx(81.39, abs=0.01) and acdc["within_1_point"] is True
    assert chaos["new_default_best_val_dice"] is None and "| – |" in (tmp_path / "sv.md").read_text()


def test_sparse_validation_pairs_further_seeds_by_seed(tmp_path):
    import sparse_validation

    for seed, best in ((0, 0.80), (1, 0.805)):
        folder = tmp_path / "runs" / f"acdc_cpu_dacl_p7_seed{seed}"
        folder.mkdir(parents=True)
        (folder / "val_history.json").write_text(json.dumps({"history": [{"step": 500, "mean_dice": best}]}))
        (folder / "config.json").write_text("{}")
    table = sparse_validation.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "sv")])
    acdc = [r for r in table["rows"] if r["what"].startswith("ACDC")]
    assert [r["seed"] for r in acdc] == [0, 1, "mean of 2"]  # no seed-2 run: not listed
    old0, old1 = acdc[0]["old_default_best_val_dice"], acdc[1]["old_default_best_val_dice"]
    assert acdc[1]["difference"] == pytest.approx(80.5 - old1)
    assert acdc[2]["difference"] == pytest.approx((80.0 - old0 + 80.5 - old1) / 2)
    assert acdc[2]["within_1_point"] == (abs(acdc[2]["difference"]) <= 1.0)
    assert len([r for r in table["rows"] if r["what"].startswith("CHAOS")]) == 1  # seed 0 only, no run


def test_run_uses_the_given_checkout_and_h1_runs_in_bf16(tmp_path, monkeypatch):
    # --checkout: the example, the working directory and the import path are that checkout's
    checkout = tmp_path / "pinned"
    seen = []
    monkeypatch.setattr(hypotheses.subprocess, "run", lambda cmd, **kw: seen.append((cmd, kw)))
    hypotheses.main(["run", "--variants", "H1-long-dacl", "cps", "--seeds", "1", "--runs", str(tmp_path / "runs"),
                     "--records", str(tmp_path / "rec"), "--checkout", str(checkout)])
    assert len(seen) == 2
    for cmd, kw in seen:
        assert cmd[1] == str(checkout / "examples" / "acdc_cps_dacl.py") and kw["cwd"] == checkout
        assert kw["env"]["PYTHONPATH"].split(hypotheses.os.pathsep)[0] == str(checkout)
    h1, cps = seen[0][0], seen[1][0]
    assert h1[h1.index("--amp") + 1] == "bf16" and h1[h1.index("--labeled") + 1] == "3"
    assert "--amp" not in cps and cps[cps.index("--labeled") + 1] == "7"


def test_h1_rows_are_paired_within_their_own_budget(tmp_path):
    """The H1 rows are compared with the CPS of their own budget (3 patients, bf16), never with
    the 7-patient baselines, and the table states DACL - CPS at both budgets."""
    runs = tmp_path / "runs"
    for seed in (0, 1):
        _run(runs, "cps", seed, [0.5, 0.6, 0.7, 0.80, 0.80, 0.80])
        _run(runs, "H1-short-cps", seed, [0.5, 0.6, 0.7, 0.70, 0.70, 0.70])
        _run(runs, "H1-short-dacl", seed, [0.5, 0.6, 0.7, 0.71, 0.71, 0.71])
        _run(runs, "H1-long-cps", seed, [0.74] * 18, steps=9000)
        _run(runs, "H1-long-dacl", seed, [0.70 + 0.01 * seed] * 18, steps=9000)
    table = hypotheses.main(["collect", "--runs", str(runs), "--records", str(tmp_path / "none"),
                             "--out", str(tmp_path / "out" / "hyp")])
    rows = {r["variant"]: r for r in table["rows"]}
    assert rows["H1-short-dacl"]["baselines"] == ["H1-short-cps", "H1-short-dacl"]
    assert rows["H1-short-dacl"]["minus_cps"]["mean"] == pytest.approx(1.0)
    assert rows["H1-long-dacl"]["minus_cps"]["mean"] == pytest.approx(-3.5)
    assert rows["H1-long-cps"]["minus_dacl"]["mean"] == pytest.approx(3.5) and "minus_cps" not in rows["H1-long-cps"]
    assert table["h1"]["short"]["mean"] == pytest.approx(1.0) and table["h1"]["long"]["n"] == 2
    md = (tmp_path / "out" / "hyp.md").read_text()
    assert "+1.00 ± 0.00 (2 seeds) at 3000 steps, -3.50 ± 0.71 (2 seeds) at 9000 steps. H1: not supported." in md
    assert table["h1"]["verdict"] == "not supported"


@pytest.mark.parametrize("short, long, expected", [
    ([1.0, 1.0], [4.0, 5.0], "supported"),        # grows by 3.5 > 0.71, and 4.5 > 0.71
    ([0.0, 2.0], [1.5, 2.5], "not supported"),    # grows by 1.0, within the short gap's spread (1.41)
    ([-3.0, -3.0], [-1.0, 2.0], "not supported"),  # grows by 3.5 > 2.12, but 0.5 is within its own spread
    ([0.0, 0.0], [-1.0, -2.0], "not supported"),  # shrinks
    ([1.0], [5.0, 5.0], None),                    # one seed of the short pair: undecided
    ([1.0, 1.0], [5.0], None),                    # one seed of the long pair: undecided
])
def test_h1_verdict_needs_two_seeds_and_a_gap_that_grows_beyond_the_spread(short, long, expected):
    stat = hypotheses._stat
    assert hypotheses.h1_verdict(stat(short), stat(long)) == expected
