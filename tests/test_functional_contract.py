"""The contract of ``torch_dacl.functional`` beyond tests/test_functional.py and
tests/test_messages_contract.py: the histogram cuts of ``dacl_labels``' ``"class_fraction"`` and
``"class_prior"`` policies on hand-made probabilities (bin edges, the default 1000 bins, ties
in the cut's bin, the strict confidence threshold, the prior from the labeled pixels, the
``p_c / t_c`` choice between two claiming classes), inputs of other dtypes (an integer ``labeled``,
a float mask for the CPS loss), inputs on another device than ``labeled`` and
a default device other than the inputs' (``meta`` stands in for an accelerator), NaN logits,
and the empty edge cases of the flat functions."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import torch_dacl.functional as DF

LONG = torch.long
IGN = -100  # the default ignore_index
POLICIES = ("fixed", "class_fraction", "class_prior", "none")


def _two_class_logits(p0):
    """``(1, 2, 1, W)`` logits whose softmax gives class 0 the probabilities ``p0`` (1.0 and
    0.0 exactly for the entries 1 and 0, 1/2 exactly for 0.5)."""
    rows = []
    for p in p0:
        if p == 1.0:
            rows.append((0.0, -200.0))
        elif p == 0.0:
            rows.append((-200.0, 0.0))
        else:
            rows.append((math.log(p), math.log1p(-p)))
    return torch.tensor(rows).T.reshape(1, 2, 1, len(p0))


def _unlabeled(p0, **kw):
    """Pseudo labels of one unlabeled 1 x W image with class-0 probabilities ``p0``."""
    w = len(p0)
    y, _ = DF.dacl_labels(torch.zeros(1, 1, w, dtype=LONG), torch.tensor([False]), _two_class_logits(p0), **kw)
    return y[0, 0].tolist()


def _prior(labeled_row, p1, **kw):
    """``"class_prior"`` labels of the unlabeled image of a batch of two 1 x W images: the
    first labeled with ``labeled_row``, the second unlabeled with class-1 probabilities
    ``p1``. ``confidence=1.0`` keeps the fixed rule out of the way (no softmax exceeds 1)."""
    labels = torch.tensor([labeled_row, [0] * len(p1)]).reshape(2, 1, len(p1))
    logits = torch.cat([torch.zeros(1, 2, 1, len(p1)), _two_class_logits([1.0 - p for p in p1])])
    kw = dict(dict(confidence=1.0, num_bins=4), **kw)
    y, _ = DF.dacl_labels(labels, torch.tensor([True, False]), logits, "class_prior", **kw)
    assert torch.equal(y[0], labels[0])  # ground truth kept on the labeled image
    return y[1, 0].tolist()



# ----------------------------------------------------------------------------- dacl_labels, "fixed"
def test_fixed_policy_needs_a_confidence_strictly_above_the_threshold():
    # equal logits: softmax confidence exactly 0.5
    assert _unlabeled([0.5], confidence=0.5) == [IGN]
    assert _unlabeled([0.5], confidence=0.49) == [0]


# ----------------------------------------------------------------------------- dacl_labels, "class_fraction"
def test_class_fraction_keeps_every_pixel_tied_in_the_cut_bin_of_the_default_1000_bins():
    # 0.90005 and 0.9005 share the 1/1000 bin 900 (but not a 1/1001 bin): with fraction 0.5
    # one pixel is needed and both are kept; below the 0.95 threshold, so by the cut alone
    p0 = [0.90005, 0.9005]
    assert _unlabeled(p0, policy="class_fraction", fraction=0.5) == [0, 0]
    assert _unlabeled(p0, policy="class_fraction", fraction=0.5, num_bins=1000) == [0, 0]
    assert _unlabeled(p0, policy="class_fraction", fraction=0.5, num_bins=1001) == [IGN, 0]


def test_class_fraction_cut_is_the_highest_bin_that_keeps_enough_pixels():
    # 4 bins: 0.6 in bin 2, 0.9 in bin 3
    kw = dict(policy="class_fraction", num_bins=4)
    assert _unlabeled([0.6, 0.9], fraction=0.5, **kw) == [IGN, 0]
    assert _unlabeled([0.6, 0.9], fraction=1.0, **kw) == [0, 0]


def test_class_fraction_bins_span_zero_to_one_both_ends_included():
    # a certain pixel (confidence exactly 1.0) is in its class's top bin, not past it
    assert _unlabeled([1.0, 0.0], policy="class_fraction", confidence=1.0, fraction=0.5) == [0, 1]
    assert _unlabeled([1.0, 0.6], policy="class_fraction", confidence=1.0, fraction=0.5, num_bins=4) == [0, IGN]
    # bin 0 holds the confidences below 1/num_bins (5 classes: class 0 at 0.22 and at 0.40)
    logits = torch.zeros(1, 5, 1, 2)
    logits[0, 0, 0] = torch.tensor([0.1, 1.0])
    y, _ = DF.dacl_labels(torch.zeros(1, 1, 2, dtype=LONG), torch.tensor([False]), logits, "class_fraction",
                          fraction=0.5, num_bins=4)
    assert y.tolist() == [[[IGN, 0]]]


# ----------------------------------------------------------------------------- dacl_labels, "class_prior"
def test_class_prior_labels_the_prior_share_of_the_top_pixels():
    # one labeled pixel, of class 1: prior 1 for class 1, 0 for class 0; 4 unlabeled pixels
    # in the 4 bins of p1 (0.0 exactly in bin 0)
    row, p1 = [1, IGN, IGN, IGN], [0.0, 0.3, 0.6, 0.9]
    assert _prior(row, p1, fraction=1.0) == [1, 1, 1, 1]  # every pixel, the p1 = 0 one too
    assert _prior(row, p1, fraction=0.5) == [IGN, IGN, 1, 1]
    assert _prior(row, p1, fraction=0.25) == [IGN, IGN, IGN, 1]
    # the prior is the class's share of the labeled pixels: two of four labeled pixels for
    # each class, two pixels each (p0 = 1.0 and 0.7 in class 0's bins 3 and 2)
    assert _prior([1, 1, 0, 0], p1, fraction=1.0) == [0, 0, 1, 1]


def test_class_prior_cut_bin_edges():
    # p1 = 0.5 is exactly the lower edge of bin 2 (the cut): claimed
    assert _prior([1, IGN], [0.5, 0.2], fraction=0.5) == [1, IGN]
    # p1 = 1.0 is in the top bin, not past it: the cut is that bin, the 0.6 pixel is left
    assert _prior([1, IGN], [1.0, 0.6], fraction=0.5) == [1, IGN]


def test_class_prior_only_classes_with_a_prior_claim_pixels():
    # class 0 has no labeled pixel: its 0.8 pixel (top bin) stays unlabeled; class 1 needs one
    # pixel and claims its 0.6 one
    assert _prior([1, IGN], [0.2, 0.6], fraction=0.5) == [IGN, 1]


def test_class_prior_pixel_claimed_by_two_classes_goes_to_the_larger_p_over_cut():
    # classes 0 and 1 each need one pixel; p0 = (0.78, 0.9): class 0's cut is bin 3
    # (t_0 = 1), class 1's bin 0 (t_1 = 1/4). Pixel 0: 0.78 / 1 < 0.22 / (1/4) -> class 1,
    # though class 0 is its argmax; pixel 1: 0.9 > 0.1 * 4 -> class 0
    assert _prior([0, 1], [0.22, 0.1], fraction=1.0) == [1, 0]


def test_class_prior_every_row_path_ignores_the_labeled_rows_in_the_histogram(monkeypatch):
    # labeled not on the CPU: every row is computed and the labeled ones are masked out of the
    # histogram (here with 2 bins and 2 classes); the same labels as on the unlabeled row alone
    labels = torch.tensor([[[0, 0]], [[0, 0]]])
    logits = torch.cat([torch.zeros(1, 2, 1, 2), _two_class_logits([0.3, 0.4])])
    args = (labels, torch.tensor([True, False]), logits, "class_prior")
    rows = DF.dacl_labels(*args, confidence=1.0, fraction=0.5, num_bins=2)
    monkeypatch.setattr(DF, "_pick_rows", lambda labeled: False)
    every = DF.dacl_labels(*args, confidence=1.0, fraction=0.5, num_bins=2)
    assert rows[0].tolist() == every[0].tolist() == [[[0, 0]], [[0, 0]]]
    assert rows[1].tolist() == every[1].tolist() == [[[False, False]], [[True, True]]]


# ----------------------------------------------------------------------------- dacl_labels, all policies
def test_pick_rows_picks_the_unlabeled_rows_when_labeled_is_on_the_cpu():
    # (the pseudo labels are then computed on the unlabeled rows alone, without a device sync)
    assert DF._pick_rows(torch.tensor([True, False])) is True
    assert DF._pick_rows(torch.zeros(2, dtype=torch.bool, device="meta")) is False


@pytest.mark.parametrize("policy", POLICIES)
def test_integer_labeled_mask_acts_as_bool(policy):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 3, 2, 2, generator=g) * 3
    labels = torch.randint(0, 3, (3, 2, 2), generator=g)
    ref = DF.dacl_labels(labels, torch.tensor([True, False, False]), logits, policy, confidence=0.6)
    for mask in (torch.tensor([1, 0, 0]), torch.tensor([1, 0, 0], dtype=torch.uint8)):
        got = DF.dacl_labels(labels, mask, logits, policy, confidence=0.6)
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


@pytest.mark.parametrize("policy", ["class_fraction", "class_prior"])
def test_nan_logits_do_not_break_the_histogram(policy):
    # a NaN pixel falls into some bin of the histogram, never outside it; confident pixels
    # keep their pseudo labels
    logits = torch.zeros(2, 2, 1, 3)
    logits[:, 0, 0] = torch.tensor([8.0, -8.0, float("nan")])
    labels = torch.tensor([[[0, 1, 1]], [[0, 0, 0]]])
    y, conf = DF.dacl_labels(labels, torch.tensor([True, False]), logits, policy, confidence=0.9)
    assert y.shape == (2, 1, 3) and y[1, 0, :2].tolist() == [0, 1] and conf[1, 0, :2].all()


@pytest.mark.parametrize("policy", POLICIES)
def test_dacl_labels_inputs_on_another_device_than_labeled(policy):
    # labeled on the CPU, labels and logits elsewhere (meta stands in for an accelerator)
    labels = torch.zeros(2, 3, 3, dtype=LONG, device="meta")
    logits = torch.zeros(2, 3, 3, 3, device="meta")
    y, conf = DF.dacl_labels(labels, torch.tensor([True, False]), logits, policy)
    assert (y.device.type, y.dtype, y.shape) == ("meta", LONG, (2, 3, 3))
    assert (conf.device.type, conf.dtype, conf.shape) == ("meta", torch.bool, (2, 3, 3))


@pytest.mark.parametrize("labeled", [[True, False], [True, True]])
@pytest.mark.parametrize("policy", POLICIES)
def test_dacl_labels_under_another_default_device(policy, labeled):
    # every tensor is made on the inputs' device: a default device elsewhere changes nothing
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 3, 4, generator=g) * 3
    labels = torch.randint(0, 3, (2, 3, 4), generator=g)
    labeled = torch.tensor(labeled)
    ref = DF.dacl_labels(labels, labeled, logits, policy, confidence=0.99, fraction=0.5)
    if policy in ("class_fraction", "class_prior") and not labeled.all():  # the histograms decide pixels
        assert ref[1].sum() > DF.dacl_labels(labels, labeled, logits, "fixed", confidence=0.99)[1].sum()
    with torch.device("meta"):
        got = DF.dacl_labels(labels, labeled, logits, policy, confidence=0.99, fraction=0.5)
    assert got[0].device.type == got[1].device.type == "cpu"
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


# ----------------------------------------------------------------------------- knn_density
def test_knn_density_of_no_query_is_on_the_features_device_under_another_default_device():
    feats, labels = torch.randn(0, 3), torch.zeros(0, dtype=LONG)
    with torch.device("meta"):
        dens = DF.knn_density(feats, labels, (1,))
    assert dens.device.type == "cpu" and dens.shape == (0,)


# ----------------------------------------------------------------------------- soft_density_contrastive_loss
def test_contrastive_loss_with_no_class_and_no_anchor_is_zero():
    anchors = torch.zeros(0, 4, requires_grad=True)
    args = (torch.zeros(0, dtype=LONG), torch.zeros(0, 4), torch.zeros(0, 3, 4))
    loss = DF.soft_density_contrastive_loss(anchors, *args)
    assert loss.item() == 0.0 and loss.requires_grad
    assert DF.soft_density_contrastive_loss(anchors, *args, reduction="sum").item() == 0.0
    assert DF.soft_density_contrastive_loss(anchors, *args, reduction="none").shape == (0,)


# ----------------------------------------------------------------------------- cross_pseudo_supervision_loss
def test_cps_loss_takes_a_float64_mask_as_its_bool_mask_and_stays_float32():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    mask = torch.rand(2, 4, 4, generator=g) > 0.5
    ref = DF.cross_pseudo_supervision_loss(a, b, mask)
    got = DF.cross_pseudo_supervision_loss(a, b, mask.to(torch.float64))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


# ----------------------------------------------------------------------------- defects the review found
@pytest.mark.parametrize("every_row", [False, True])
def test_class_prior_reads_narrow_label_dtypes_without_wrapping_the_class_count(monkeypatch, every_row):
    # 300 classes and uint8 labels: the prior's "label < C" must not compare with C mod 256
    monkeypatch.setattr(DF, "_pick_rows", lambda labeled: not every_row)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 300, 2, 3, generator=g)
    labels = torch.full((2, 2, 3), 44, dtype=torch.uint8)
    labeled = torch.tensor([True, False])
    ref, ref_conf = DF.dacl_labels(labels.long(), labeled, logits, policy="class_prior", fraction=1.0)
    out, conf = DF.dacl_labels(labels, labeled, logits, policy="class_prior", fraction=1.0)
    assert torch.equal(out, ref) and torch.equal(conf, ref_conf)
    assert (out[1] == 44).all()  # the prior is all class 44: every unlabeled pixel goes to it


@pytest.mark.parametrize("policy", ["class_fraction", "class_prior"])
def test_a_tiny_fraction_still_keeps_a_pixel_per_class(policy):
    # fraction 1e-46 is positive (accepted) but underflows to 0 in float32: still one pixel each
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    labels = (torch.arange(32) % 3).reshape(2, 4, 4)
    labeled = torch.tensor([True, False])
    out, conf = DF.dacl_labels(labels, labeled, logits, policy=policy, confidence=1.0, fraction=1e-46)
    got = set(out[1][conf[1]].tolist())
    expected = set(logits[1].argmax(0).unique().tolist()) if policy == "class_fraction" else {0, 1, 2}
    assert got == expected


def test_knn_density_is_float32_under_a_float64_default_dtype():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        feats = torch.randn(6, 4, dtype=torch.float32)
        labels = torch.tensor([0, 0, 1, 1, 2, 2])
        assert DF.knn_density(feats, labels, (2,)).dtype == torch.float32
        assert DF.knn_density(feats[:0], labels[:0], (2,)).dtype == torch.float32
        assert DF.knn_density(feats[:1], labels[:1], (2,)).dtype == torch.float32  # one point: no neighbour
    finally:
        torch.set_default_dtype(before)


# ----------------------------------------------------------------------------- review of the f7d386b run
@pytest.mark.parametrize("policy", ["fixed", "class_fraction", "class_prior"])
def test_dacl_labels_every_row_path_puts_its_result_on_the_inputs_device(monkeypatch, policy):
    # labeled off the CPU takes the every-row path (no host sync); there the unlabeled mask must
    # follow the logits (here labeled stays on the CPU, labels and logits are on meta)
    monkeypatch.setattr(DF, "_pick_rows", lambda labeled: False)
    labels = torch.zeros(2, 3, 3, dtype=LONG, device="meta")
    logits = torch.zeros(2, 3, 3, 3, device="meta")
    y, conf = DF.dacl_labels(labels, torch.tensor([True, False]), logits, policy)
    assert (y.device.type, y.dtype, y.shape) == ("meta", LONG, (2, 3, 3))
    assert (conf.device.type, conf.dtype, conf.shape) == ("meta", torch.bool, (2, 3, 3))


def test_a_tiny_fraction_keeps_a_pixel_of_a_class_predicted_or_expected_on_one_pixel():
    # fraction 1e-46 underflows to 0 in float32; a class on a single pixel still gets it
    # "class_fraction": class 1 is predicted on one pixel (p0 = 0.2), class 0 keeps its top one
    assert _unlabeled([0.6, 0.7, 0.2], policy="class_fraction", fraction=1e-46) == [IGN, 0, 1]
    # "class_prior": one labeled pixel of each class and two unlabeled pixels: each class is
    # expected on exactly one pixel (p0 = 0.8 in class 0's top bin, p1 = 0.6 in class 1's bin 2)
    assert _prior([1, 0], [0.2, 0.6], fraction=1e-46) == [0, 1]


def test_class_prior_pixel_claimed_by_two_classes_compares_p_over_cut_however_small_p():
    # classes 0 and 1 each need one of the two unlabeled pixels, class 2 has no prior. Both
    # pixels are almost surely class 2 (p0 = e^-100, p1 = e^-98, subnormal in float32), so
    # the cuts of classes 0 and 1 are bin 0 (t = 1/1000) and both claim both pixels:
    # p1 / t > p0 / t gives them to class 1
    labels = torch.tensor([[[0, 1]], [[0, 0]]])
    logits = torch.zeros(2, 3, 1, 2)
    logits[1, :, 0] = torch.tensor([[-100.0, -100.0], [-98.0, -98.0], [0.0, 0.0]])
    probs = logits[1].softmax(0)
    assert 0 < probs[0, 0, 0] < probs[1, 0, 0] < 1e-42  # the premise: tiny but not zero
    y, conf = DF.dacl_labels(labels, torch.tensor([True, False]), logits, "class_prior", confidence=1.0,
                             fraction=1.0)
    assert y[1].tolist() == [[1, 1]] and conf[1].all()


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 3, 0, 5), (0, 3, 2, 4, 5), (1, 3, 2, 0, 5)])
@pytest.mark.parametrize("masked", [False, True])
def test_cps_of_an_empty_batch_or_zero_size_image_is_a_zero_connected_to_the_graph(shape, masked):
    # degenerate input gets a defined, finite result: no pixel gives 0 (a mean over no pixel is NaN)
    a = torch.randn(shape, requires_grad=True)
    b = torch.randn(shape, requires_grad=True)
    mask = torch.ones((shape[0],) + shape[2:], dtype=torch.bool) if masked else None
    loss = DF.cross_pseudo_supervision_loss(a, b, mask=mask)
    assert loss.dtype == torch.float32 and loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape


# ----------------------------------------------------------------------------- review of the f7d386b run (2)
def test_reduce_terms_takes_the_mean_over_the_contributing_anchors_by_default():
    terms = torch.tensor([[1.0, 3.0, 0.0]], requires_grad=True)
    contributing = torch.tensor([[True, True, False]])
    out = DF.reduce_terms(terms, contributing)
    assert out.shape == () and out.item() == 2.0
    assert torch.equal(out, DF.reduce_terms(terms, contributing, "mean"))


def test_topk_plan_groups_cpu_rows_of_16k_or_more_by_the_power_of_two_nearest_sqrt_width_over_k():
    # block = 2 ** round(log2(sqrt(width / k))) within [2, 16]; the row padded to a multiple of it;
    # rows narrower than 16 k, k = 0, and other devices: (0, 0), one plain top-k
    cpu = torch.device("cpu")
    assert DF._topk_plan(1512, 32, cpu) == (0, 8)  # sqrt(47.25) = 6.9 -> 8 (the loss's default keys)
    assert DF._topk_plan(1500, 32, cpu) == (4, 8)  # padded to 1504
    assert DF._topk_plan(512, 32, cpu) == (0, 4)  # exactly 16 k; sqrt(16) = 4
    assert DF._topk_plan(511, 32, cpu) == (0, 0)
    assert DF._topk_plan(8192, 32, cpu) == (0, 16)  # sqrt(256) = 16
    assert DF._topk_plan(100000, 32, cpu) == (-100000 % 16, 16)  # capped at 16
    assert DF._topk_plan(33, 2, cpu) == (3, 4)  # sqrt(16.5) = 4.06 -> 4; padded to 36
    assert DF._topk_plan(16, 1, cpu) == (0, 4)  # sqrt(16) = 4
    assert DF._topk_plan(16, 0, cpu) == (0, 0)
    assert DF._topk_plan(1512, 32, torch.device("meta")) == (0, 0)


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 6), k=st.integers(1, 12), extra=st.integers(0, 400), block=st.sampled_from([2, 4, 8, 16]),
       ties=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_pruned_topk_values_equal_torch_topk_values_exactly(rows, k, extra, block, ties, seed):
    # the pre-selection gives the very values of torch.topk, sorted, ties and invalid keys included
    width = block * max(k, (k + extra) // block)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 3, (rows, width), generator=g).float() if ties else torch.randn(rows, width, generator=g)
    x[:, ::5] = DF._INVALID_KEY - 1.0  # a query's own column and invalid keys rank below every cosine
    assert torch.equal(DF._topk_values(x, k, block), x.topk(k, dim=-1).values)
    assert torch.equal(DF._topk_values(x, k, 0), x.topk(k, dim=-1).values)


def test_pruned_topk_is_used_by_knn_density_on_the_cpu_and_matches_the_reference(monkeypatch):
    # 30 queries + a bank of 60 per class: 90 keys >= 16 * 4, so the pruned top-k runs (groups
    # of 4, padded to 92); the density is the naive loop reference's
    from naive import naive_knn_density

    g = torch.Generator().manual_seed(2)
    feats, bank = torch.randn(2, 30, 8, generator=g), torch.randn(2, 60, 8, generator=g)
    valid = torch.rand(2, 30, generator=g) > 0.2
    bank_valid = torch.rand(2, 60, generator=g) > 0.3
    assert DF._topk_plan(90, 4, feats.device) == (2, 4)
    blocks, real = [], DF._topk_values
    monkeypatch.setattr(DF, "_topk_values", lambda x, k, block=0: blocks.append(block) or real(x, k, block))
    dens = DF.knn_density_grouped(feats, valid, (2, 4), bank, bank_valid)
    assert blocks and set(blocks) == {4}
    labels = torch.arange(2).unsqueeze(1).expand(2, 30)
    ref = naive_knn_density(feats[valid], labels[valid], (2, 4), bank, bank_valid)
    torch.testing.assert_close(dens[valid].double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.all(dens[~valid] == -1)


def test_grouped_functions_under_another_default_device():
    # every tensor is made on the inputs' device: a default device elsewhere changes nothing
    g = torch.Generator().manual_seed(5)
    feats, bank = torch.randn(2, 5, 4, generator=g), torch.randn(2, 7, 4, generator=g)
    valid = torch.tensor([[True, True, True, False, True], [True, False, False, False, False]])
    ref = DF.knn_density_grouped(feats, valid, (1, 3), bank)
    anchors = torch.randn(3, 4, 5, generator=g)
    anchors_valid = torch.rand(3, 4, generator=g) > 0.3
    centers, negatives = torch.randn(3, 5, generator=g), torch.randn(3, 6, 5, generator=g)
    ref_terms, ref_contributing = DF.soft_density_contrastive_loss_grouped(anchors, anchors_valid, centers, negatives)
    with torch.device("meta"):
        dens = DF.knn_density_grouped(feats, valid, (1, 3), bank)
        terms, contributing = DF.soft_density_contrastive_loss_grouped(anchors, anchors_valid, centers, negatives)
    assert dens.device.type == terms.device.type == contributing.device.type == "cpu"
    assert torch.equal(dens, ref)
    assert torch.equal(terms, ref_terms) and torch.equal(contributing, ref_contributing)


@pytest.mark.parametrize("weighting", ["paper", "scale", "none"])
def test_contrastive_loss_grouped_is_float32_under_a_float64_default_dtype(weighting):
    g = torch.Generator().manual_seed(6)
    anchors = torch.randn(3, 4, 5, generator=g)
    anchors_valid = torch.rand(3, 4, generator=g) > 0.3
    args = (anchors, anchors_valid, torch.randn(3, 5, generator=g), torch.randn(3, 6, 5, generator=g))
    ref = DF.soft_density_contrastive_loss_grouped(*args, weighting=weighting)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        terms, contributing = DF.soft_density_contrastive_loss_grouped(*args, weighting=weighting)
    finally:
        torch.set_default_dtype(before)
    assert terms.dtype == torch.float32
    assert torch.equal(terms, ref[0]) and torch.equal(contributing, ref[1])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.long, torch.float32])
def test_contrastive_loss_grouped_takes_integer_and_float_validity_masks_as_bool(dtype):
    g = torch.Generator().manual_seed(7)
    anchors = torch.randn(3, 4, 5, generator=g)
    anchors_valid = torch.rand(3, 4, generator=g) > 0.3
    negatives_valid = torch.tensor([[True] * 6, [True, False] * 3, [False] * 6])
    args = (anchors, anchors_valid, torch.randn(3, 5, generator=g), torch.randn(3, 6, 5, generator=g))
    ref = DF.soft_density_contrastive_loss_grouped(*args, negatives_valid)
    assert ref[1][:2].any() and not ref[1][2].any()  # the masks matter
    got = DF.soft_density_contrastive_loss_grouped(anchors, anchors_valid.to(dtype), *args[2:],
                                                   negatives_valid.to(dtype))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# ----------------------------------------------------------------------------- review of the f7d386b run (3)
def test_float32_context_disables_autocast_on_every_autocast_device_type():
    # "similarities and top-k run in float32 with autocast disabled": inside a user's autocast
    # region on cuda, cpu, xpu or mps the library's matmuls leave it (the flag is thread-local,
    # so it can be set without the device)
    for kind in ("cuda", "cpu", "xpu", "mps"):
        before = torch.is_autocast_enabled(kind)
        torch.set_autocast_enabled(kind, True)
        try:
            with DF._float32(torch.device(kind)):
                assert not torch.is_autocast_enabled(kind), kind
            assert torch.is_autocast_enabled(kind)
        finally:
            torch.set_autocast_enabled(kind, before)


@pytest.mark.parametrize("shuffle", [False, True])
def test_group_by_label_under_another_default_device(shuffle):
    # every tensor is made on the labels' device: a default device elsewhere changes nothing
    labels = torch.arange(30) % 4
    valid = torch.arange(30) % 5 != 0
    ref = DF.group_by_label(labels, 3, 6, valid, shuffle, torch.Generator().manual_seed(8))
    with torch.device("meta"):
        got = DF.group_by_label(labels, 3, 6, valid, shuffle, torch.Generator().manual_seed(8))
    assert got[0].device.type == got[1].device.type == "cpu"
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_group_by_label_keeps_the_first_members_in_input_order_for_long_inputs():
    # 300 positions in 3 classes (beyond any small-input sort that happens to be stable)
    labels = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(9))
    index, mask = DF.group_by_label(labels, 3, 40)
    for c in range(3):
        members = (labels == c).nonzero().flatten()
        assert index[c].tolist() == members[:40].tolist() and mask[c].all()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.long, torch.float32])
def test_group_by_label_takes_integer_and_float_valid_masks_as_bool(dtype):
    labels = torch.arange(12) % 3
    valid = torch.tensor([True, False, True] * 4)
    ref = DF.group_by_label(labels, 3, 5, valid)
    got = DF.group_by_label(labels, 3, 5, valid.to(dtype))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("shuffle", [False, True])
def test_group_by_label_reads_narrow_label_dtypes_with_more_classes_than_they_hold(shuffle):
    # 300 classes and uint8 labels: the positions left out must not land in a real class
    labels = torch.tensor([0, 44, 255, 44, 7, 255, 44], dtype=torch.uint8)
    valid = torch.tensor([True, True, False, False, True, True, True])
    ref = DF.group_by_label(labels.long(), 300, 4, valid, shuffle, torch.Generator().manual_seed(1))
    got = DF.group_by_label(labels, 300, 4, valid, shuffle, torch.Generator().manual_seed(1))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert got[1].sum().item() == 5 and got[1][44].sum().item() == 2


def test_sample_pixels_per_class_does_not_wrap_a_negative_ignore_index_into_narrow_labels():
    # uint8 labels of 200 classes with the default-style ignore_index -100: class 156 is a real
    # class (-100 is 156 in uint8), and no pixel can equal -100
    labels = torch.tensor([[156, 156, 3, 0]], dtype=torch.uint8)
    index, mask = DF.sample_pixels_per_class(labels, 200, 4, ignore_index=-100)
    assert mask.sum(1).nonzero().flatten().tolist() == [0, 3, 156] and mask[156].sum().item() == 2
    assert sorted(index[156][mask[156]].tolist()) == [0, 1]


@pytest.mark.parametrize("num_classes", [4, 100, 200])
def test_group_by_label_shuffles_by_the_documented_random_keys_of_the_generator(num_classes):
    # shuffle draws one key per position from the generator, 31 - C.bit_length() bits below 128
    # classes, 31 above, and takes each class's members by increasing key
    m = 64
    labels = torch.arange(m) % 3
    bits = 31 - num_classes.bit_length() if num_classes < 128 else 31
    keys = torch.randint(0, 2 ** bits, (m,), generator=torch.Generator().manual_seed(2))
    index, mask = DF.group_by_label(labels, num_classes, 8, shuffle=True, generator=torch.Generator().manual_seed(2))
    for c in range(3):
        members = (labels == c).nonzero().flatten()
        assert keys[members].unique().numel() == members.numel()  # no tie: one order
        expected = members[keys[members].argsort()][:8]
        assert index[c].tolist() == expected.tolist() and mask[c].all()
    assert not mask[3:].any()
