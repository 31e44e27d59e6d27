"""The mechanism works, not just runs: training with the loss makes sparse points denser."""

import torch

import torch_dacl.functional as DF
from torch_dacl import SoftDensityContrastiveLoss


def _toy(seed=0, per_class=48, d=8):
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(3, d, generator=g), dim=-1) * 3
    labels = torch.arange(3).repeat_interleave(per_class)
    noise = torch.randn(3 * per_class, d, generator=g)
    spread = torch.ones(3 * per_class, 1)
    spread[torch.rand(3 * per_class, generator=g) < 0.25] = 4.0  # a quarter are scattered outliers
    points = centers[labels] + spread * noise
    return points, labels


def _density(points, labels):
    return DF.knn_density(points, labels, (4, 8))


def test_training_makes_low_density_points_denser():
    torch.manual_seed(0)
    points, labels = _toy()
    emb = torch.nn.Parameter(points.T.reshape(1, 8, 12, 12).clone())  # (N, D, H, W) toy "image"
    lab = labels.reshape(1, 12, 12)
    before = _density(points, labels)
    sparse = before <= before.quantile(0.25)  # the low-density quarter
    loss_fn = SoftDensityContrastiveLoss(num_classes=3, dim=8, ks=(4, 8), num_anchors=16, num_positives=16,
                                         num_negatives=32, bank_size=64, max_samples_per_class=48)
    opt = torch.optim.SGD([emb], lr=10.0)  # raw norms are ~3-12: cosine gradients are small
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(emb, lab)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = _density(emb.detach().reshape(8, -1).T, labels)
    gain_sparse = after[sparse].mean() - before[sparse].mean()
    gain_all = after.mean() - before.mean()
    assert gain_sparse > 0.1, (before[sparse].mean(), after[sparse].mean())
    assert gain_sparse > gain_all > 0  # the sparse points gain most: anchors are the low-density ones
    assert sum(losses[-10:]) < sum(losses[:10])


def test_without_the_loss_nothing_changes():
    """Control for the test above: the density change comes from the loss, not the measure."""
    points, labels = _toy()
    torch.testing.assert_close(_density(points, labels), _density(points.clone(), labels))
