"""Reference tests: each functional op against the naive loop implementation of tests/naive.py."""

import math

import pytest
import torch

import torch_dacl.functional as DF
from torch_dacl.stages import one_hot_maps
from naive import (naive_cps, naive_knn_density, naive_masked_average_pool, naive_rampup, naive_sdcl,
                   naive_sdcl_autograd)


@pytest.mark.parametrize("spatial", [(5, 4), (3, 4, 2)])
@pytest.mark.parametrize("one_hot", [False, True])
def test_masked_average_pool_matches_reference(spatial, one_hot):
    g = torch.Generator().manual_seed(0)
    n, d, c = 3, 6, 4
    feats = torch.randn((n, d) + spatial, generator=g)
    if one_hot:
        lab = torch.randint(0, c - 1, (n,) + spatial, generator=g)  # class c-1 always empty
        probs = torch.nn.functional.one_hot(lab, c).movedim(-1, 1).float()
    else:
        probs = torch.softmax(3 * torch.randn((n, c) + spatial, generator=g), 1)
    protos, valid = DF.masked_average_pool(feats, probs, 0.4)
    ref_p, ref_v = naive_masked_average_pool(feats, probs, 0.4)
    assert protos.dtype == torch.float32
    assert torch.equal(valid, ref_v)
    torch.testing.assert_close(protos.double(), ref_p, atol=1e-5, rtol=1e-5)
    if one_hot:
        assert not valid[:, c - 1].any() and torch.all(protos[:, c - 1] == 0)


def _clustered(q, d, c, generator):
    labels = torch.randint(0, c, (q,), generator=generator)
    centers = torch.randn(c, d, generator=generator)
    return centers[labels] + 0.7 * torch.randn(q, d, generator=generator), labels


@pytest.mark.parametrize("with_bank", [False, True])
@pytest.mark.parametrize("ks", [(1,), (2, 5), (3, 8, 50)])
def test_knn_density_matches_reference(with_bank, ks):
    g = torch.Generator().manual_seed(1)
    q, d, c, L = 23, 5, 4, 6
    feats, labels = _clustered(q, d, c, g)
    labels[labels == 3] = 2  # class 3 has no query
    labels[0] = 3  # ... except one: no batch neighbour
    bank = bank_valid = None
    if with_bank:
        bank = torch.randn(c, L, d, generator=g)
        bank_valid = torch.rand(c, L, generator=g) > 0.3
        bank_valid[3] = False  # the lone query of class 3 has no neighbour at all
    dens = DF.knn_density(feats, labels, ks, bank, bank_valid)
    ref = naive_knn_density(feats, labels, ks, bank, bank_valid)
    assert dens.dtype == torch.float32
    torch.testing.assert_close(dens.double(), ref, atol=1e-5, rtol=1e-5)
    assert dens[0] == -1.0


def test_knn_density_with_ties_and_tiny_classes():
    # duplicated vectors (exact ties) and a class of size 1 and 2
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    feats = torch.cat([base, base, base[:1], torch.tensor([[-1.0, 0.0], [0.0, -1.0]])])
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 2])
    dens = DF.knn_density(feats, labels, (1, 2, 3))
    ref = naive_knn_density(feats, labels, (1, 2, 3))
    torch.testing.assert_close(dens.double(), ref, atol=1e-6, rtol=1e-6)
    assert dens[7] == -1.0 and dens[8] == -1.0


def test_knn_density_grouped_chunking_is_exact():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, 8, generator=g)
    valid = torch.rand(3, 40, generator=g) > 0.2
    bank = torch.randn(3, 17, 8, generator=g)
    full = DF.knn_density_grouped(x, valid, (4, 9), bank)
    tiny = DF.knn_density_grouped(x, valid, (4, 9), bank, chunk_elements=1)
    torch.testing.assert_close(full, tiny)
    assert torch.all(full[~valid] == -1)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 500])
def test_knn_density_padded_topk_path_matches_reference(chunk_elements):
    # ks max 4: 100 queries + a bank of 120 make 220 keys, which the CPU's pruned top-k pads to
    # 224 (groups of 8), so the padding columns and the pre-selection are exercised
    assert DF._topk_plan(220, 4, torch.device("cpu")) == (4, 8)
    assert DF._topk_plan(63, 4, torch.device("cpu")) == (0, 0)  # narrower than 16 k: plain top-k
    assert DF._topk_plan(220, 4, torch.device("meta")) == (0, 0)  # only the CPU
    g = torch.Generator().manual_seed(5)
    c, s, L, d = 3, 100, 120, 6
    feats, _ = _clustered(c * s, d, c, g)
    labels = torch.arange(c).repeat_interleave(s)  # exactly s queries per class
    bank = torch.randn(c, L, d, generator=g)
    bank_valid = torch.rand(c, L, generator=g) > 0.4
    dens = DF.knn_density(feats, labels, (1, 2, 4), bank, bank_valid)
    ref = naive_knn_density(feats, labels, (1, 2, 4), bank, bank_valid)
    torch.testing.assert_close(dens.double(), ref, atol=1e-5, rtol=1e-5)
    grouped = DF.knn_density_grouped(feats.view(c, s, d), torch.ones(c, s, dtype=torch.bool), (1, 2, 4), bank,
                                     bank_valid, chunk_elements=chunk_elements)
    torch.testing.assert_close(grouped.flatten().double(), ref, atol=1e-5, rtol=1e-5)
    # two opposite queries and no bank: each one's only neighbour has similarity -1, so a
    # padding column that leaked into the top-k (similarity 0) would show as -0.x here
    x = feats.view(c, s, d).clone()
    x[2, 0], x[2, 1] = torch.ones(d), -torch.ones(d)
    valid = torch.ones(c, s, dtype=torch.bool)
    valid[2, 2:] = False
    bank_valid[2] = False
    dens = DF.knn_density_grouped(x, valid, (1, 2, 4), bank, bank_valid, chunk_elements=chunk_elements)
    torch.testing.assert_close(dens[2, :2], torch.tensor([-1.0, -1.0]))


@pytest.mark.parametrize("weighting", ["paper", "scale", "none"])
@pytest.mark.parametrize("gamma", [None, 0.5])
@pytest.mark.parametrize("include_positive", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sdcl_matches_reference(weighting, gamma, include_positive, reduction):
    g = torch.Generator().manual_seed(3)
    a, d, c, p = 11, 6, 4, 5
    anchors = torch.randn(a, d, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 0, 3, 3])
    centers = torch.randn(c, d, generator=g)
    negatives = torch.randn(c, p, d, generator=g)
    neg_valid = torch.rand(c, p, generator=g) > 0.3
    neg_valid[3] = False  # class 3 has no valid negative: contributes nothing
    neg_valid[0, 0] = True
    loss = DF.soft_density_contrastive_loss(anchors, labels, centers, negatives, neg_valid, temperature=0.3,
                                            weighting=weighting, gamma=gamma, include_positive=include_positive,
                                            reduction=reduction)
    ref = naive_sdcl(anchors, labels, centers, negatives, neg_valid, temperature=0.3, weighting=weighting,
                     gamma=gamma, include_positive=include_positive, reduction=reduction)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, atol=1e-4, rtol=1e-5)
    if reduction == "none":
        assert torch.all(loss[labels == 3] == 0)


def test_sdcl_gradient_matches_reference_autograd():
    """Gradients through w_i ('paper') equal those of a double-precision autograd reference."""
    g = torch.Generator().manual_seed(4)
    anchors = torch.randn(7, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    centers = torch.randn(3, 5, generator=g, dtype=torch.float64)
    negs = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)

    a1 = anchors.clone().float().requires_grad_()
    DF.soft_density_contrastive_loss(a1, labels, centers.float(), negs.float(), reduction="sum").backward()

    a2 = anchors.clone().requires_grad_()
    m = torch.nn.functional.normalize(a2, dim=-1)
    cn = torch.nn.functional.normalize(centers, dim=-1)
    ng = torch.nn.functional.normalize(negs, dim=-1)
    total = 0
    for i in range(7):
        n = int(labels[i])
        same = (labels == n).nonzero().flatten()
        w = len(same) * torch.softmax(m[same] @ cn[n], 0)[(same == i).nonzero().item()]
        s = m[i] @ cn[n] / 0.4
        total = total - torch.log(w * torch.exp(s) / torch.exp(ng[n] @ m[i] / 0.4).sum())
    total.backward()
    torch.testing.assert_close(a1.grad.double(), a2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("weighting", ["paper", "scale", "none"])
@pytest.mark.parametrize("include_positive", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sdcl_gradient_matches_float64_reference_every_option(weighting, include_positive, reduction):
    """Loss and gradient of every weighting against a float64 autograd loop, with partially
    valid negatives (and a class with none), a non-default temperature and gamma."""
    g = torch.Generator().manual_seed(6)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 3])
    anchors = torch.randn(9, 5, generator=g, dtype=torch.float64)
    centers = torch.randn(4, 5, generator=g, dtype=torch.float64)
    negs = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    neg_valid = torch.tensor([[1, 0, 1, 0, 1, 1], [0, 0, 0, 1, 0, 0], [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]],
                             dtype=torch.bool)  # one valid negative for class 1, none for class 3
    kw = dict(temperature=0.25, weighting=weighting, include_positive=include_positive, reduction=reduction)
    a1 = anchors.clone().requires_grad_()
    loss = DF.soft_density_contrastive_loss(a1, labels, centers, negs, neg_valid, **kw)
    loss.backward()
    a2 = anchors.clone().requires_grad_()
    ref, k = naive_sdcl_autograd(a2, labels, centers, negs, neg_valid, **kw)
    ref.backward()
    assert k == 8
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a1.grad, a2.grad, atol=1e-5, rtol=1e-4)
    assert torch.all(a1.grad[8] == 0)  # the anchor of class 3 (no negative) gets no gradient
    assert a1.grad.dtype == torch.float64


@pytest.mark.parametrize("weighting", ["paper", "scale", "none"])
def test_sdcl_grouped_gradient_with_gamma_and_invalid_centers(weighting):
    """The grouped function: padded anchors, a class without a valid center, gamma=0.5."""
    g = torch.Generator().manual_seed(7)
    anchors = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    centers = torch.randn(3, 5, generator=g, dtype=torch.float64)
    centers_valid = torch.tensor([True, False, True])
    negs = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    neg_valid = torch.rand(3, 5, generator=g) > 0.4
    neg_valid[:, 0] = True
    a1 = anchors.clone().requires_grad_()
    terms, contributing = DF.soft_density_contrastive_loss_grouped(
        a1, valid, centers, negs, neg_valid, temperature=0.35, weighting=weighting, gamma=0.5,
        centers_valid=centers_valid)
    assert contributing.tolist() == [[True] * 3 + [False], [False] * 4, [True] * 4]
    assert torch.all(terms[~contributing] == 0)
    terms.sum().backward()
    flat_valid = valid.reshape(-1)
    a2 = anchors.clone().requires_grad_()
    labels = torch.arange(3).repeat_interleave(4)[flat_valid]
    ref, k = naive_sdcl_autograd(a2.reshape(12, 5)[flat_valid], labels, centers, negs, neg_valid, temperature=0.35,
                                 weighting=weighting, gamma=0.5, reduction="sum", centers_valid=centers_valid)
    ref.backward()
    assert k == int(contributing.sum()) == 7
    torch.testing.assert_close(terms.sum().double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a1.grad, a2.grad, atol=1e-5, rtol=1e-4)
    assert torch.all(a1.grad[1] == 0) and torch.all(a1.grad[0, 3] == 0)


def test_sdcl_scale_weight_carries_no_gradient():
    """'scale' detaches w_i: its gradient is that of -w_i * log ratio with w_i a constant,
    which differs from the gradient through w_i (a 'scale' whose weight stayed attached)."""
    g = torch.Generator().manual_seed(8)
    anchors = torch.randn(4, 3, generator=g, dtype=torch.float64)
    labels = torch.zeros(4, dtype=torch.long)
    centers, negs = torch.randn(1, 3, generator=g, dtype=torch.float64), torch.randn(1, 3, 3, generator=g,
                                                                                      dtype=torch.float64)
    a1 = anchors.clone().requires_grad_()
    DF.soft_density_contrastive_loss(a1, labels, centers, negs, weighting="scale", reduction="sum").backward()
    m = torch.nn.functional.normalize(anchors, dim=-1)
    w = 4 * torch.softmax(m @ torch.nn.functional.normalize(centers[0], dim=0), 0)  # a constant
    a2 = anchors.clone().requires_grad_()
    m2 = torch.nn.functional.normalize(a2, dim=-1)
    c2, n2 = torch.nn.functional.normalize(centers[0], dim=0), torch.nn.functional.normalize(negs[0], dim=-1)
    log_ratio = m2 @ c2 / 0.4 - torch.logsumexp(m2 @ n2.T / 0.4, dim=1)
    (-(w * log_ratio).sum()).backward()
    torch.testing.assert_close(a1.grad, a2.grad, atol=1e-5, rtol=1e-4)
    a3 = anchors.clone().requires_grad_()
    m3 = torch.nn.functional.normalize(a3, dim=-1)
    w3 = 4 * torch.softmax(m3 @ c2, 0)
    (-(w3 * (m3 @ c2 / 0.4 - torch.logsumexp(m3 @ n2.T / 0.4, dim=1))).sum()).backward()
    assert (a3.grad - a2.grad).abs().max() > 1e-3  # the two gradients are distinguishable


def test_sdcl_nothing_contributes_gives_connected_zero():
    anchors = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    loss = DF.soft_density_contrastive_loss(anchors, labels, torch.randn(2, 3), torch.randn(2, 2, 3),
                                            torch.zeros(2, 2, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(anchors.grad == 0)


@pytest.mark.parametrize("step", [0, 999, 1000, 1500, 15000, 29999, 30000, 45000])
def test_gaussian_rampup_matches_formula(step):
    assert math.isclose(DF.gaussian_rampup(step, 30000), naive_rampup(step, 30000), rel_tol=1e-12, abs_tol=0)


def test_gaussian_rampup_is_monotone_and_capped():
    vals = [DF.gaussian_rampup(s, 100, 0.1, 10) for s in range(0, 200)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert max(vals) == pytest.approx(0.1)
    assert vals[:10] == [0.0] * 10


def test_group_by_label_layout():
    labels = torch.tensor([2, 0, 2, 5, 0, 2, -1, 2])
    idx, mask = DF.group_by_label(labels, num_classes=3, max_per_class=3)
    assert mask.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert idx[0, :2].tolist() == [1, 4] and idx[2].tolist() == [0, 2, 5]


@pytest.mark.parametrize("num_classes", [2, 127, 128, 300])  # int32 keys below 128 classes, int64 above
def test_sample_pixels_per_class_is_uniform_without_replacement(num_classes):
    top = num_classes - 1  # the last class: the largest packed key
    labels = torch.tensor([top] * 10 + [0] * 3 + [num_classes] * 2)  # the last two: out of range, left out
    seen = torch.zeros(10)
    for seed in range(200):
        idx, mask = DF.sample_pixels_per_class(labels, num_classes, 4, generator=torch.Generator().manual_seed(seed))
        assert mask[top].all() and mask[0].tolist() == [True, True, True, False] and mask.sum() == 7
        assert len(set(idx[top].tolist())) == 4 and set(idx[top].tolist()) <= set(range(10))
        assert set(idx[0, :3].tolist()) == {10, 11, 12}
        seen[idx[top]] += 1
    # each of the 10 pixels is drawn with probability 0.4: 80 of 200 on average
    assert seen.min() > 50 and seen.max() < 110


def test_cross_pseudo_supervision_is_symmetric_ce():
    g = torch.Generator().manual_seed(5)
    la = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    lb = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    loss = DF.cross_pseudo_supervision_loss(la, lb)
    ref = torch.nn.functional.cross_entropy(la, lb.argmax(1)) + torch.nn.functional.cross_entropy(lb, la.argmax(1))
    torch.testing.assert_close(loss, ref)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    assert DF.cross_pseudo_supervision_loss(la, lb, mask).item() == 0.0


@pytest.mark.parametrize("spatial", [(4, 5), (2, 3, 4)])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_masked_cross_pseudo_supervision_matches_reference(spatial, fraction):
    """The masked mean over the pixels that take part (not over all pixels), and its gradient."""
    from torch_dacl import CoTrainingWrapper

    g = torch.Generator().manual_seed(9)
    la = torch.randn((2, 4) + spatial, generator=g, dtype=torch.float64)
    lb = torch.randn((2, 4) + spatial, generator=g, dtype=torch.float64)
    mask = torch.rand((2,) + spatial, generator=g) < fraction
    if 0 < fraction < 1:
        assert 0 < int(mask.sum()) < mask.numel()
    a1, b1 = la.clone().requires_grad_(), lb.clone().requires_grad_()
    loss = DF.cross_pseudo_supervision_loss(a1, b1, mask)
    a2, b2 = la.clone().requires_grad_(), lb.clone().requires_grad_()
    ref = naive_cps(a2, b2, mask)
    torch.testing.assert_close(loss.double(), ref.detach(), atol=1e-6, rtol=1e-6)
    assert loss.requires_grad
    (loss + 0 * a1.sum()).backward()
    (ref + 0 * a2.sum()).backward()
    torch.testing.assert_close(a1.grad, a2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b1.grad, b2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(CoTrainingWrapper.cross_loss(la, lb, mask), loss)
    torch.testing.assert_close(CoTrainingWrapper.cross_loss(la, lb), DF.cross_pseudo_supervision_loss(la, lb))


# --------------------------------------------------------------------------- edge values (mutation survivors)
def test_pool_threshold_is_strict_and_a_one_pixel_mask_is_that_pixel():
    feats = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    probs = torch.zeros(2, 2, 2, 2)
    probs[:, 0, 0, 0] = 0.5  # exactly phi: not in the mask (T = M > phi)
    probs[:, 1, 1, 1] = 0.6  # one pixel above phi
    protos, valid = DF.masked_average_pool(feats, probs, 0.5)
    assert valid.tolist() == [[False, True], [False, True]]
    torch.testing.assert_close(protos[:, 1], feats[:, :, 1, 1])
    assert torch.all(protos[:, 0] == 0)


@pytest.mark.parametrize("threshold", [0.5, 0.99, 1.0, -0.5])
def test_pool_takes_a_bool_map_as_the_masks_themselves_whatever_the_threshold(threshold):
    # bool maps are T_n (the loss's labels, docs: 'threshold applies when probs are passed'):
    # the reference's float one-hot at a threshold in [0, 1), at any threshold
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(3, 5, 6, 7, generator=g, dtype=torch.float64)
    lab = torch.randint(-1, 3, (3, 6, 7), generator=g)  # -1: no class; class 3 of 4 empty
    hot = lab.unsqueeze(1) == torch.arange(4).view(1, 4, 1, 1)
    protos, valid = DF.masked_average_pool(feats, hot, threshold)
    ref_p, ref_v = naive_masked_average_pool(feats, hot.double(), 0.5)
    assert torch.equal(valid, ref_v) and valid[:, :3].all() and not valid[:, 3].any()
    torch.testing.assert_close(protos.double(), ref_p, atol=1e-6, rtol=1e-6)
    assert torch.equal(hot, one_hot_maps(lab, 4, dtype=torch.bool))
    assert torch.equal(hot.float(), one_hot_maps(lab, 4))


def test_sample_pixels_per_class_skips_ignore_index_and_follows_the_generator():
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    idx, mask = DF.sample_pixels_per_class(labels, 2, 4, ignore_index=1)  # a real class id ignored
    assert mask.sum(1).tolist() == [3, 0] and set(idx[0, :3].tolist()) == {0, 3, 5}
    a = DF.sample_pixels_per_class(torch.arange(20) % 2, 2, 3, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)  # the global generator must not matter when one is passed
    b = DF.sample_pixels_per_class(torch.arange(20) % 2, 2, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0])
    draws = {tuple(DF.sample_pixels_per_class(torch.arange(20) % 2, 2, 3,
                                              generator=torch.Generator().manual_seed(s))[0][0].tolist())
             for s in range(5)}
    assert len(draws) > 1


def test_knn_density_empty_input_and_a_bank_with_more_classes_than_labels():
    assert DF.knn_density(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), (2,)).shape == (0,)
    g = torch.Generator().manual_seed(11)
    feats, labels = torch.randn(6, 3, generator=g), torch.tensor([0, 0, 1, 1, 0, 1])  # classes 0 and 1 only
    bank = torch.randn(4, 5, 3, generator=g)  # C = 4 from the bank
    dens = DF.knn_density(feats, labels, (2, 3), bank)
    torch.testing.assert_close(dens.double(), naive_knn_density(feats, labels, (2, 3), bank), atol=1e-5, rtol=1e-5)


def test_gaussian_rampup_edge_steps():
    assert DF.gaussian_rampup(5, 1, warmup_steps=0) == pytest.approx(0.1)  # total_steps = 1 is valid
    with pytest.raises(ValueError, match=r"total_steps: expected a value > 0, got 0"):
        DF.gaussian_rampup(5, 0)


def test_cps_single_pixel_mask_is_that_pixel():
    g = torch.Generator().manual_seed(12)
    la, lb = torch.randn(1, 3, 2, 2, generator=g), torch.randn(1, 3, 2, 2, generator=g)
    mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    mask[0, 1, 0] = True
    torch.testing.assert_close(DF.cross_pseudo_supervision_loss(la, lb, mask).double(), naive_cps(la, lb, mask).double())


@pytest.mark.parametrize("make, match", [
    (lambda: DF.masked_average_pool(torch.randn(2, 3, 4), torch.rand(2, 2, 4, 4), 0.5),
     r"^features: expected .*\(N, D, \*spatial\)"),
    (lambda: DF.masked_average_pool(torch.randn(2, 3, 4, 4), torch.rand(2, 2, 4), 0.5),
     r"^probs: expected .*\(N, C, \*spatial\)"),
    (lambda: DF.masked_average_pool(torch.zeros(2, 3, 4, 4, dtype=torch.long), torch.rand(2, 2, 4, 4), 0.5),
     r"^features: expected a floating point"),
    (lambda: DF.masked_average_pool(torch.randn(2, 3, 4, 5), torch.rand(2, 2, 4, 4), 0.5),
     r"^probs: expected shape \(N, C, \*spatial\) = \(2, C, 4, 5\) to match features \(2, 3, 4, 5\), "
     r"got \(2, 2, 4, 4\)"),
    (lambda: DF.cross_pseudo_supervision_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4)),
     r"^logits_a: expected .*\(N, C, \*spatial\)"),
    (lambda: DF.cross_pseudo_supervision_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5)),
     r"^logits_b: expected shape \(2, 3, 4, 4\) as logits_a, got \(2, 3, 4, 5\)"),
    (lambda: DF.cross_pseudo_supervision_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4),
                                              torch.ones(2, 4, 5, dtype=torch.bool)),
     r"^mask: expected shape \(2, 4, 4\), got \(2, 4, 5\)"),
    (lambda: DF.soft_density_contrastive_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 3),
                                              torch.randn(3, 5, 3)),
     r"^negatives: expected shape \(2, P, 3\), got \(3, 5, 3\)"),
    (lambda: DF.soft_density_contrastive_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 3),
                                              torch.randn(2, 5, 4)),
     r"^negatives: expected shape \(2, P, 3\), got \(2, 5, 4\)"),
    (lambda: DF.knn_density(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), (2,), bank=torch.randn(1, 3, 4),
                            bank_valid=torch.ones(1, 2, dtype=torch.bool)),
     r"^bank_valid: expected shape \(1, 3\), got \(1, 2\)"),
])
def test_functional_bad_input_messages(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_group_by_label_edge_sizes_and_out_of_range_labels():
    idx, mask = DF.group_by_label(torch.tensor([1]), 2, 3)  # one position
    assert mask.tolist() == [[False] * 3, [True, False, False]] and idx[1, 0] == 0
    idx, mask = DF.group_by_label(torch.zeros(0, dtype=torch.long), 2, 3, shuffle=True)  # none
    assert not mask.any() and idx.shape == (2, 3)
    labels = torch.tensor([0, 5, 1, -1, 0])  # 5 and -1 are not classes, even where valid says True
    idx, mask = DF.group_by_label(labels, 2, 3, valid=torch.tensor([True, True, True, True, False]))
    assert mask.sum(1).tolist() == [1, 1] and idx[0, 0] == 0 and idx[1, 0] == 2


def test_sdcl_default_temperature_is_04():
    g = torch.Generator().manual_seed(13)
    args = (torch.randn(5, 3, generator=g), torch.tensor([0, 0, 1, 1, 1]), torch.randn(2, 3, generator=g),
            torch.randn(2, 4, 3, generator=g))
    torch.testing.assert_close(DF.soft_density_contrastive_loss(*args),
                               DF.soft_density_contrastive_loss(*args, temperature=0.4))
    a, v = args[0].reshape(1, 5, 3), torch.ones(1, 5, dtype=torch.bool)
    torch.testing.assert_close(DF.soft_density_contrastive_loss_grouped(a, v, args[2][:1], args[3][:1])[0],
                               DF.soft_density_contrastive_loss_grouped(a, v, args[2][:1], args[3][:1], temperature=0.4)[0])


def test_logsumexp_with_reused_exponentials_matches_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 9, generator=g, dtype=torch.float64)
    x[0, 1, :4] = float("-inf")
    x[1, 2] = float("-inf")  # a whole row: -inf, no NaN in the gradient of the rest
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    w[1, 2] = 0.0
    ours, ref = DF._LogSumExp.apply(a), torch.logsumexp(b, -1)
    torch.testing.assert_close(ours, ref)
    (ours[torch.isfinite(ours)] * w[torch.isfinite(ours)]).sum().backward()
    (ref[torch.isfinite(ref)] * w[torch.isfinite(ref)]).sum().backward()
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1, 2] = False  # torch's own gradient is NaN on an all -inf row; ours is 0 there
    torch.testing.assert_close(a.grad[keep], b.grad[keep])
    assert torch.isfinite(a.grad).all() and (a.grad[1, 2] == 0).all()


def test_knn_density_bfloat16_similarities_within_tolerance_of_float64():
    """``precision="bfloat16"``: the similarity matmul on bfloat16 inputs; densities within the
    documented ~1e-2 of the float64 reference, padding and -1 for no neighbour kept."""
    g = torch.Generator().manual_seed(4)
    c, s, L, d = 3, 60, 50, 16
    feats, _ = _clustered(c * s, d, c, g)
    feats = feats.view(c, s, d)
    valid = torch.rand(c, s, generator=g) > 0.2
    valid[2] = False
    valid[2, 0] = True  # one query, no batch neighbour
    bank = torch.randn(c, L, d, generator=g)
    bank_valid = torch.rand(c, L, generator=g) > 0.3
    bank_valid[2] = False
    ref = DF.knn_density_grouped(feats.double(), valid, (4, 8), bank.double(), bank_valid)
    bf = DF.knn_density_grouped(feats, valid, (4, 8), bank, bank_valid, precision="bfloat16")
    assert bf.dtype == torch.float32
    torch.testing.assert_close(bf[valid], ref[valid].float(), rtol=0, atol=2e-2)
    assert torch.all(bf[~valid] == -1) and float(bf[2, 0]) == -1.0
    with pytest.raises(ValueError, match="precision"):
        DF.knn_density_grouped(feats, valid, (4,), precision="half")
