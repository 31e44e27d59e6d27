"""A fast real-data check that supervised training learns: a small U-Net overfits 4 labeled
ACDC slices. A run that learns nothing (or a broken data pipeline) fails the Dice bar.

Skipped only when the data is absent (lookup in conftest.py: --data-root, TORCH_DACL_DATA,
the get_data cache); about 10 s on one CPU thread.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("h5py")
pytest.importorskip("segmentation_models_pytorch")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import acdc_data  # noqa: E402
import acdc_model  # noqa: E402

STEPS = 160
DICE_BAR = 0.85  # mean foreground Dice (RV, Myo, LV) on the 4 training slices, model in eval()


def _foreground_dice(pred, target):
    scores = []
    for c in (1, 2, 3):
        p, t = pred == c, target == c
        scores.append(float(2 * (p & t).sum() / (p.sum() + t.sum()).clamp_min(1)))
    return sum(scores) / 3


def test_supervised_unet_overfits_four_labeled_slices(acdc_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        names = acdc_data.read_list(acdc_dir, "train_slices.list")[:200:50]  # 4 slices, 4 patients
        ds = acdc_data.ACDCSlices(acdc_dir, size=64, augment=False, cases=names)
        items = [ds[i] for i in range(len(ds))]
        x = torch.stack([it["image"] for it in items])
        y = torch.stack([it["label"] for it in items])
        assert x.shape == (4, 1, 64, 64) and set(y.unique().tolist()) == {0, 1, 2, 3}
        torch.manual_seed(0)
        net = acdc_model.build_unet("resnet18", (32, 16, 8))
        net.eval()
        with torch.no_grad():
            before = _foreground_dice(net(x).argmax(1), y)
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        onehot = F.one_hot(y, 4).movedim(-1, 1).float()
        for _ in range(STEPS):  # CE + soft Dice, the supervised loss of the examples
            out = net(x)
            prob = out.softmax(1)
            dice = (2 * (prob * onehot).sum((0, 2, 3)) + 1) / (prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
            loss = F.cross_entropy(out, y) + 1 - dice.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            after = _foreground_dice(net(x).argmax(1), y)
    finally:
        torch.set_num_threads(threads)
    assert before < 0.3, before  # the untrained net does not pass the bar by chance
    assert after > DICE_BAR, (before, after)
