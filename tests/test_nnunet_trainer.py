"""DACL inside nnU-Net v2, end to end with nnU-Net's own commands on a tiny synthetic dataset in
the raw format: plan and preprocess, train ``nnUNetTrainerDACL`` (2 short epochs, on the CPU),
resume from its checkpoint (the memory bank comes back equal), predict a case.

Needs the ``nnunet`` extra (CI installs it, as the README does). Marked ``nnunet`` and
``slow``: a few minutes on 2 shared cores (``pytest --durations`` reports it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")
nib = pytest.importorskip("nibabel")

pytestmark = [pytest.mark.slow, pytest.mark.nnunet]

TEST_TRAINER = '''
from torch_dacl.nnunet import nnUNetTrainerDACL


class nnUNetTrainerDACL_test(nnUNetTrainerDACL):
    """2 epochs of 2 iterations, small DACL budgets, no final validation: a pipeline check."""

    dacl_embed_dim = 16
    dacl_warmup = 0.0
    dacl_loss_options = dict(num_anchors=32, num_positives=32, num_negatives=32, bank_size=40,
                             max_samples_per_class=64)

    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 2, 1

    def perform_actual_validation(self, save_probabilities=False):
        self.print_to_log_file("final validation skipped (test trainer)")
'''


def _dataset(raw: Path) -> Path:
    """Dataset999_Tiny: 6 training and 1 test volume of 32^3, a sphere in a shell (3 classes)."""
    root = raw / "Dataset999_Tiny"
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:32, :32, :32]

    def case():
        c, r = rng.integers(12, 20, 3), int(rng.integers(6, 9))
        d2 = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2
        lab = np.zeros((32, 32, 32), np.uint8)
        lab[d2 <= r * r], lab[d2 <= (r // 2) ** 2] = 1, 2
        return (lab * 1.5 + rng.normal(0, 0.5, lab.shape) + 1.0).astype(np.float32), lab

    for i in range(6):
        img, lab = case()
        nib.save(nib.Nifti1Image(img, np.eye(4)), root / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "labelsTr" / f"tiny_{i:03d}.nii.gz")
    nib.save(nib.Nifti1Image(case()[0], np.eye(4)), root / "imagesTs" / "tiny_100_0000.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "shell": 1, "core": 2},
        "numTraining": 6, "file_ending": ".nii.gz"}))
    return root


def _command(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_nnunet_plan_train_resume_predict(tmp_path):
    from torch_dacl.nnunet import trainer_folder

    raw, pre, res, ext = (tmp_path / n for n in ("raw", "preprocessed", "results", "ext"))
    ext.mkdir()
    (ext / "dacl_test_trainers.py").write_text(TEST_TRAINER)
    root = _dataset(raw)
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res),
               nnUNet_extTrainer=os.pathsep.join([str(ext), str(trainer_folder())]), nnUNet_def_n_proc="1",
               nnUNet_compile="f", OMP_NUM_THREADS="1")
    env.pop("nnUNet_n_proc_DA", None)  # (0 breaks planning)

    def run(*cmd, **extra):
        r = subprocess.run(list(cmd), env={**env, **extra}, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{cmd[0]}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    run(_command("nnUNetv2_plan_and_preprocess"), "-d", "999", "-c", "3d_fullres", "-np", "1",
        "--verify_dataset_integrity")
    train = [_command("nnUNetv2_train"), "999", "3d_fullres", "0", "-tr", "nnUNetTrainerDACL_test", "-device", "cpu"]
    run(*train, nnUNet_n_proc_DA="0")
    fold = res / "Dataset999_Tiny" / "nnUNetTrainerDACL_test__nnUNetPlans__3d_fullres" / "fold_0"
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    dacl = final["dacl"]
    assert int(dacl["ramp"]["step_count"]) == 4  # 2 epochs x 2 iterations
    assert int(dacl["loss"]["bank.count"].sum()) > 0 and "net.0.weight" in dacl["head"]
    assert final["trainer_name"] == "nnUNetTrainerDACL_test"
    assert any(k.startswith("param_groups") or k == "param_groups" for k in final["optimizer_state"])
    assert len(final["optimizer_state"]["param_groups"]) == 2  # nnU-Net's and the head's
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "DACL: projection head on decoder.stages[-1]" in log and "dacl_loss" in log

    # --c: nnU-Net's own resume loads the checkpoint; the bank, stream and schedule come back equal
    run(*train, "--c", nnUNet_n_proc_DA="0")
    again = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["dacl"]
    for part in ("loss", "ramp", "head"):
        for k, v in dacl[part].items():
            assert torch.equal(v, again[part][k]), (part, k)

    # nnU-Net's predictor: the network weights alone (the head stays outside the network)
    out = tmp_path / "pred"
    run(_command("nnUNetv2_predict"), "-i", str(root / "imagesTs"), "-o", str(out), "-d", "999", "-c", "3d_fullres",
        "-f", "0", "-tr", "nnUNetTrainerDACL_test", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1",
        "-chk", "checkpoint_final.pth")
    pred = np.asarray(nib.load(out / "tiny_100.nii.gz").dataobj)
    assert pred.shape == (32, 32, 32) and set(np.unique(pred)) <= {0, 1, 2}


def test_trainer_folder_holds_only_importable_modules():
    """nnU-Net imports every module of nnUNet_extTrainer's folders: ours has one, and it imports."""
    import importlib.util

    from torch_dacl.nnunet import nnUNetTrainerDACL, trainer_folder

    mods = sorted(p.name for p in trainer_folder().glob("*.py"))
    assert mods == ["dacl_trainers.py"]
    spec = importlib.util.spec_from_file_location("dacl_trainers", trainer_folder() / mods[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.nnUNetTrainerDACL is nnUNetTrainerDACL
    r = subprocess.run([sys.executable, "-m", "torch_dacl.nnunet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and Path(r.stdout.strip()) == trainer_folder()
