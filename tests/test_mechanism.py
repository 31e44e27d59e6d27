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


def _train(steps=60, moves=None, seed=0):
    """Train the toy "image" of embeddings with the DACL loss alone (``moves=None``), or make
    the same steps without the loss: each point moves by the length it moved at that step of
    the run with the loss (``moves[t]``, per point), in a random direction.

    Returns the density gain of the sparse quarter and of all points, the losses, and the
    per-point step lengths.
    """
    torch.manual_seed(0)
    points, labels = _toy()
    emb = torch.nn.Parameter(points.T.reshape(1, 8, 12, 12).clone())  # (N, D, H, W) toy "image"
    lab = labels.reshape(1, 12, 12)
    before = _density(points, labels)
    sparse = before <= before.quantile(0.25)  # the low-density quarter
    loss_fn = SoftDensityContrastiveLoss(num_classes=3, dim=8, ks=(4, 8), num_anchors=16, num_positives=16,
                                         num_negatives=32, bank_size=64, max_samples_per_class=48)
    opt = torch.optim.SGD([emb], lr=10.0)  # raw norms are ~3-12: cosine gradients are small
    g = torch.Generator().manual_seed(seed)
    losses, lengths = [], []
    for t in range(steps):
        opt.zero_grad()
        loss = loss_fn(emb, lab)  # the control calls it too (same bank, same random draws)
        losses.append(loss.item())
        if moves is None:
            loss.backward()
            lengths.append(emb.grad.norm(dim=1, keepdim=True).clone())
        else:
            r = torch.randn(emb.shape, generator=g)
            emb.grad = r / r.norm(dim=1, keepdim=True) * moves[t]
        opt.step()
    after = _density(emb.detach().reshape(8, -1).T, labels)
    return after[sparse].mean() - before[sparse].mean(), after.mean() - before.mean(), losses, lengths


def test_training_makes_low_density_points_denser():
    gain_sparse, gain_all, losses, lengths = _train()
    assert gain_sparse > 0.1, gain_sparse
    assert gain_sparse > gain_all > 0  # the sparse points gain most: anchors are the low-density ones
    assert sum(losses[-10:]) < sum(losses[:10])
    assert sum(float((m > 0).sum()) for m in lengths) > 0


def test_without_the_loss_low_density_points_do_not_get_denser():
    """Control: the same points take steps of the same lengths, in random directions instead
    of the loss's. The sparse quarter then does not get denser (a selection effect, or mere
    movement, would show here), while with the loss it gains > 0.1 (test above)."""
    gain_with, _, _, lengths = _train()
    for seed in range(2):
        gain_sparse, gain_all, _, _ = _train(moves=lengths, seed=seed)
        assert gain_sparse < 0.03, gain_sparse
        assert abs(gain_all) < 0.03, gain_all
        assert gain_with - gain_sparse > 0.1
