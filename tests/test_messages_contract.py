"""The exact error messages of the public API of ``torch_dacl.functional``, ``torch_dacl.loss`` and
``torch_dacl.cotraining``, anchored at both ends, and the boundary of each guarding condition: the
smallest bad input raises, the nearest good one does not. (The messages that the tests of
``test_functional.py`` already match in full are not repeated here.)"""

import math
import re

import pytest
import torch
from torch import nn

import torch_dacl.functional as DF
from torch_dacl import CoTrainingWrapper, ProjectionHead, SegmentationWithEmbeddings, SoftDensityContrastiveLoss

LONG = torch.long


def raises(message: str, exc=ValueError):
    return pytest.raises(exc, match="^" + re.escape(message) + "$")


def _loss(**kw):
    opts = dict(ks=(2,), num_anchors=2, num_positives=2, num_negatives=2, bank_size=4, max_samples_per_class=8,
                seed=0)
    opts.update(kw)
    return SoftDensityContrastiveLoss(3, 8, **opts)


def _labels(n=2, h=4, w=4):
    return (torch.arange(n * h * w) % 3).reshape(n, h, w)


def _finite_scalar(x):
    assert x.ndim == 0 and bool(torch.isfinite(x))


# ============================================================================= functional
# ----------------------------------------------------------------------------- masked_average_pool
def test_masked_average_pool_rank_and_dtype_messages():
    probs = torch.rand(2, 3, 4, 4)
    with raises("features: expected a tensor of shape (N, D, *spatial) (rank 4 or 5), got shape (2, 3, 4) (rank 3)"):
        DF.masked_average_pool(torch.randn(2, 3, 4), probs, 0.5)
    with raises("features: expected a tensor of shape (N, D, *spatial) (rank 4 or 5), "
                "got shape (1, 1, 1, 1, 1, 1) (rank 6)"):
        DF.masked_average_pool(torch.randn(1, 1, 1, 1, 1, 1), probs, 0.5)
    with raises("features: expected a torch.Tensor of shape (N, D, *spatial), got list"):
        DF.masked_average_pool([[1.0]], probs, 0.5)
    with raises("probs: expected a tensor of shape (N, C, *spatial) (rank 4 or 5), got shape (2, 3) (rank 2)"):
        DF.masked_average_pool(torch.randn(2, 3, 4, 4), torch.rand(2, 3), 0.5)
    with raises("features: expected a floating point tensor, got dtype torch.int64"):
        DF.masked_average_pool(torch.ones(2, 3, 4, 4, dtype=LONG), probs, 0.5)


def test_masked_average_pool_batch_mismatch_message_and_accepted_shapes():
    with raises("probs: expected shape (N, C, *spatial) = (2, C, 4, 5) to match features (2, 3, 4, 5), "
                "got (3, 2, 4, 5)"):
        DF.masked_average_pool(torch.randn(2, 3, 4, 5), torch.rand(3, 2, 4, 5), 0.5)
    with raises("probs: expected shape (N, C, *spatial) = (1, C, 2, 3, 4) to match features (1, 2, 2, 3, 4), "
                "got (1, 2, 2, 3, 5)"):
        DF.masked_average_pool(torch.randn(1, 2, 2, 3, 4), torch.rand(1, 2, 2, 3, 5), 0.5)
    # any number of classes, ranks 4 and 5 are accepted
    protos, valid = DF.masked_average_pool(torch.randn(2, 3, 4, 5), torch.rand(2, 7, 4, 5), 0.5)
    assert protos.shape == (2, 7, 3) and valid.shape == (2, 7)
    protos, valid = DF.masked_average_pool(torch.randn(1, 2, 2, 3, 4), torch.ones(1, 1, 2, 3, 4), 0.5)
    assert protos.shape == (1, 1, 2) and valid.tolist() == [[True]]


# ----------------------------------------------------------------------------- knn_density
@pytest.mark.parametrize("ks, shown", [((), "()"), (0, "(0,)"), ((2, 0), "(2, 0)"), ((2.0,), "(2.0,)"),
                                       ((True,), "(True,)"), (None, "None")])
def test_knn_density_ks_message(ks, shown):
    with raises(f"ks: expected a non-empty sequence of ints >= 1, got {shown}"):
        DF.knn_density(torch.randn(3, 2), torch.zeros(3, dtype=LONG), ks)


def test_knn_density_smallest_ks_is_accepted_as_int_and_sequence():
    feats, labels = torch.randn(4, 2), torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(DF.knn_density(feats, labels, 1), DF.knn_density(feats, labels, [1]))
    assert DF.knn_density(feats, labels, (1,)).shape == (4,)


def test_knn_density_shape_and_dtype_messages():
    labels = torch.zeros(5, dtype=LONG)
    with raises("features: expected a tensor of shape (Q, D) (rank 2), got shape (5,) (rank 1)"):
        DF.knn_density(torch.randn(5), labels, (2,))
    with raises("features: expected a floating point tensor, got dtype torch.int64"):
        DF.knn_density(torch.ones(5, 4, dtype=LONG), labels, (2,))
    with raises("labels: expected a tensor of shape (Q,) (rank 1), got shape (5, 1) (rank 2)"):
        DF.knn_density(torch.randn(5, 4), labels.view(5, 1), (2,))
    with raises("labels: expected shape (5,) to match features (5, 4), got (4,)"):
        DF.knn_density(torch.randn(5, 4), torch.zeros(4, dtype=LONG), (2,))
    with raises("labels: expected an integer tensor (torch.long), got dtype torch.float32"):
        DF.knn_density(torch.randn(5, 4), torch.zeros(5), (2,))


def test_knn_density_label_range_messages():
    with raises("labels: expected values in [0, 1), got values in [-2, -1]"):  # C from the labels: max + 1
        DF.knn_density(torch.randn(3, 4), torch.tensor([-1, 0, -2]), (2,))
    with raises("labels: expected values in [0, 2), got values in [2, 3]"):  # C from the bank
        DF.knn_density(torch.randn(3, 4), torch.tensor([2, 3, 1]), (2,), bank=torch.randn(2, 3, 4))
    out = DF.knn_density(torch.randn(3, 4), torch.tensor([1, 0, 1]), (2,), bank=torch.randn(2, 3, 4))
    assert out.shape == (3,)


def test_knn_density_bank_messages_and_accepted_bank():
    feats, labels = torch.randn(5, 4), torch.zeros(5, dtype=LONG)
    with raises("bank: expected a tensor of shape (C, L, D) (rank 3), got shape (3, 4) (rank 2)"):
        DF.knn_density(feats, labels, (2,), bank=torch.randn(3, 4))
    with raises("bank: expected feature dim D=4 as in features, got shape (1, 3, 6)"):
        DF.knn_density(feats, labels, (2,), bank=torch.randn(1, 3, 6))
    with raises("bank: expected feature dim D=4 as in features, got shape (1, 3, 3)"):
        DF.knn_density(feats, labels, (2,), bank=torch.randn(1, 3, 3))
    out = DF.knn_density(feats, labels, (2,), bank=torch.randn(1, 3, 4), bank_valid=torch.ones(1, 3, dtype=torch.bool))
    assert out.shape == (5,) and bool(((out >= -1) & (out <= 1)).all())


# ----------------------------------------------------------------------------- knn_density_grouped
def test_knn_density_grouped_validates_ks_and_precision_only_when_asked():
    feats, valid = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    with raises("precision: expected one of ('float32', 'bfloat16'), got 'bfloat' (did you mean 'bfloat16'?)"):
        DF.knn_density_grouped(feats, valid, (2,), precision="bfloat")
    with raises("precision: expected one of ('float32', 'bfloat16'), got 'half'"):
        DF.knn_density_grouped(feats, valid, (2,), precision="half")
    with raises("ks: expected a non-empty sequence of ints >= 1, got (0,)"):
        DF.knn_density_grouped(feats, valid, (0,))
    checked = DF.knn_density_grouped(feats, valid, (2,))
    # validate_args=False: the caller checked them; an unknown precision runs as float32
    unchecked = DF.knn_density_grouped(feats, valid, (2,), precision="half", validate_args=False)
    torch.testing.assert_close(unchecked, checked)


# ----------------------------------------------------------------------------- soft_density_contrastive_loss
def _sdcl_args(a=4, d=3, c=2, p=5):
    return (torch.randn(a, d), torch.arange(a) % c, torch.randn(c, d), torch.randn(c, p, d))


def test_sdcl_reduction_rank_and_dtype_messages():
    anchors, labels, centers, negatives = _sdcl_args()
    with raises("reduction: expected one of ('mean', 'sum', 'none'), got 'avg'"):
        DF.soft_density_contrastive_loss(anchors, labels, centers, negatives, reduction="avg")
    with raises("anchors: expected a tensor of shape (A, D) (rank 2), got shape (4, 3, 1) (rank 3)"):
        DF.soft_density_contrastive_loss(anchors[..., None], labels, centers, negatives)
    with raises("anchors: expected a floating point tensor, got dtype torch.int64"):
        DF.soft_density_contrastive_loss(anchors.long(), labels, centers, negatives)
    with raises("anchor_labels: expected a tensor of shape (A,) (rank 1), got shape (4, 1) (rank 2)"):
        DF.soft_density_contrastive_loss(anchors, labels[:, None], centers, negatives)
    with raises("centers: expected a tensor of shape (C, D) (rank 2), got shape (6,) (rank 1)"):
        DF.soft_density_contrastive_loss(anchors, labels, centers.reshape(-1), negatives)
    with raises("negatives: expected a tensor of shape (C, P, D) (rank 3), got shape (2, 15) (rank 2)"):
        DF.soft_density_contrastive_loss(anchors, labels, centers, negatives.reshape(2, -1))


def test_sdcl_shape_messages_and_accepted_shapes():
    anchors, labels, centers, negatives = _sdcl_args()
    with raises("anchor_labels: expected shape (4,) to match anchors (4, 3), got (3,)"):
        DF.soft_density_contrastive_loss(anchors, labels[:3], centers, negatives)
    with raises("centers: expected shape (2, 3) (D as in anchors), got (2, 4)"):
        DF.soft_density_contrastive_loss(anchors, labels, torch.randn(2, 4), negatives)
    with raises("negatives_valid: expected shape (2, 5), got (2, 4)"):
        DF.soft_density_contrastive_loss(anchors, labels, centers, negatives, torch.ones(2, 4, dtype=torch.bool))
    with raises("negatives_valid: expected shape (2, 5), got (5, 2)"):
        DF.soft_density_contrastive_loss(anchors, labels, centers, negatives, torch.ones(5, 2, dtype=torch.bool))
    # any number of negatives P, with a mask of that shape
    nv = torch.ones(2, 1, dtype=torch.bool)
    _finite_scalar(DF.soft_density_contrastive_loss(anchors, labels, centers, negatives[:, :1], nv))


def test_sdcl_anchor_label_messages():
    anchors, labels, centers, negatives = _sdcl_args()
    with raises("anchor_labels: expected an integer tensor (torch.long), got dtype torch.float32"):
        DF.soft_density_contrastive_loss(anchors, labels.float(), centers, negatives)
    with raises("anchor_labels: expected values in [0, 2), got values in [-1, 2]"):
        DF.soft_density_contrastive_loss(anchors, torch.tensor([0, -1, 2, 1]), centers, negatives)
    _finite_scalar(DF.soft_density_contrastive_loss(anchors, torch.tensor([0, 1, 1, 0]), centers, negatives))


def test_sdcl_option_messages_and_boundaries():
    args = _sdcl_args()
    with raises("temperature: expected a value > 0, got 0.0"):
        DF.soft_density_contrastive_loss(*args, temperature=0.0)
    with raises("temperature: expected a value > 0, got -1"):
        DF.soft_density_contrastive_loss(*args, temperature=-1)
    with raises("gamma: expected a value > 0, got 0"):
        DF.soft_density_contrastive_loss(*args, gamma=0)
    with raises("weighting: expected one of ('paper', 'scale', 'none'), got 'papr' (did you mean 'paper'?)"):
        DF.soft_density_contrastive_loss(*args, weighting="papr")
    _finite_scalar(DF.soft_density_contrastive_loss(*args, temperature=1e-3, gamma=1e-3))
    _finite_scalar(DF.soft_density_contrastive_loss(*args, gamma=None))


def test_sdcl_grouped_checks_options_only_when_asked():
    anchors, valid = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool)
    centers, negatives = torch.randn(2, 4), torch.randn(2, 5, 4)
    with raises("temperature: expected a value > 0, got 0"):
        DF.soft_density_contrastive_loss_grouped(anchors, valid, centers, negatives, temperature=0)
    with raises("gamma: expected a value > 0, got -0.5"):
        DF.soft_density_contrastive_loss_grouped(anchors, valid, centers, negatives, gamma=-0.5)
    with raises("weighting: expected one of ('paper', 'scale', 'none'), got 'scal' (did you mean 'scale'?)"):
        DF.soft_density_contrastive_loss_grouped(anchors, valid, centers, negatives, weighting="scal")
    terms, contributing = DF.soft_density_contrastive_loss_grouped(
        anchors, valid, centers, negatives, weighting=lambda log_w, log_ratio: -log_ratio)
    assert terms.shape == (2, 3) and bool(contributing.all())
    # validate_args=False: a negative temperature is the caller's business
    terms, _ = DF.soft_density_contrastive_loss_grouped(anchors, valid, centers, negatives, temperature=-1.0,
                                                        validate_args=False)
    assert bool(torch.isfinite(terms).all())


# ----------------------------------------------------------------------------- gaussian_rampup
@pytest.mark.parametrize("total", [0, -1, 0.0, -2.5, float("nan")])
def test_gaussian_rampup_total_steps_message(total):
    with raises(f"total_steps: expected a value > 0, got {total!r}"):
        DF.gaussian_rampup(5, total)


@pytest.mark.parametrize("total", [1, 0.5])
def test_gaussian_rampup_smallest_total_steps_accepted(total):
    assert DF.gaussian_rampup(5, total, warmup_steps=0) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- dacl_labels
def _dl_args(n=1, c=2, h=2, w=2):
    return torch.zeros(n, h, w, dtype=LONG), torch.zeros(n, dtype=torch.bool), torch.randn(n, c, h, w)


def test_dacl_labels_policy_message():
    with raises("policy: expected one of ('fixed', 'class_fraction', 'class_prior', 'none'), got 'fix' "
                "(did you mean 'fixed'?)"):
        DF.dacl_labels(*_dl_args(), policy="fix")


@pytest.mark.parametrize("value", [-0.1, 1.1, -1e-9, 1.0 + 1e-9, math.nan])
def test_dacl_labels_confidence_message(value):
    with raises(f"confidence: expected a value in [0, 1], got {value!r}"):
        DF.dacl_labels(*_dl_args(), confidence=value)


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, 1.0 + 1e-9, math.nan])
def test_dacl_labels_fraction_message(value):
    with raises(f"fraction: expected a value in (0, 1], got {value!r}"):
        DF.dacl_labels(*_dl_args(), fraction=value)


def test_dacl_labels_interval_ends():
    logits = torch.tensor([[[[4.0, 0.0]], [[0.0, 0.3]]]])  # one image, 2 classes, 1x2 pixels
    labels, labeled = torch.zeros(1, 1, 2, dtype=LONG), torch.tensor([False])
    y, conf = DF.dacl_labels(labels, labeled, logits, confidence=0.0)
    assert y.tolist() == [[[0, 1]]] and conf.tolist() == [[[True, True]]]
    y, conf = DF.dacl_labels(labels, labeled, logits, confidence=1.0)
    assert y.tolist() == [[[-100, -100]]] and not conf.any()
    y, _ = DF.dacl_labels(labels, labeled, logits, policy="class_fraction", fraction=1.0)
    assert y.tolist() == [[[0, 1]]]
    y, _ = DF.dacl_labels(labels, labeled, logits, policy="class_fraction", fraction=1e-6)
    assert y.tolist() == [[[0, 1]]]  # a positive fraction keeps at least one pixel of each predicted class


def test_dacl_labels_shape_and_dtype_messages():
    labels, labeled, logits = _dl_args()
    with raises("logits_other: expected a tensor of shape (N, C, *spatial) (rank 4 or 5), "
                "got shape (2, 2, 2) (rank 3)"):
        DF.dacl_labels(labels, labeled, logits[0])
    with raises("labels: expected shape (1, 2, 2) to match logits_other (1, 2, 2, 2), got (1, 2, 3)"):
        DF.dacl_labels(torch.zeros(1, 2, 3, dtype=LONG), labeled, logits)
    with raises("labels: expected shape (1, 2, 2) to match logits_other (1, 2, 2, 2), got (2, 2)"):
        DF.dacl_labels(labels[0], labeled, logits)
    with raises("labels: expected an integer tensor, got dtype torch.float32"):
        DF.dacl_labels(labels.float(), labeled, logits)
    with raises("labels: expected an integer tensor, got dtype torch.bool"):
        DF.dacl_labels(labels.bool(), labeled, logits)
    with raises("labeled: expected a bool tensor of shape (1,), got (2,)"):
        DF.dacl_labels(labels, torch.zeros(2, dtype=torch.bool), logits)
    with raises("labeled: expected a bool tensor of shape (1,), got ()"):
        DF.dacl_labels(labels, torch.tensor(False), logits)
    y, _ = DF.dacl_labels(labels.to(torch.uint8), labeled, logits)  # any integer dtype
    assert y.dtype == LONG and y.shape == (1, 2, 2)


# ----------------------------------------------------------------------------- cross_pseudo_supervision_loss
def test_cps_logits_rank_message():
    with raises("logits_a: expected a tensor of shape (N, C, *spatial) (rank 4 or 5), got shape (2, 3, 4) (rank 3)"):
        DF.cross_pseudo_supervision_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    _finite_scalar(DF.cross_pseudo_supervision_loss(torch.randn(1, 2, 2, 2, 2), torch.randn(1, 2, 2, 2, 2)))


# ============================================================================= SoftDensityContrastiveLoss
@pytest.mark.parametrize("name", ["num_classes", "dim", "bank_size"])
@pytest.mark.parametrize("value", [0, -1, True, 2.0])
def test_loss_constructor_int_messages(name, value):
    kw = dict(num_classes=3, dim=8, bank_size=4)
    kw[name] = value
    with raises(f"{name}: expected an int >= 1, got {value!r}"):
        SoftDensityContrastiveLoss(**kw)


def test_loss_constructor_smallest_sizes_accepted():
    loss = SoftDensityContrastiveLoss(1, 1, bank_size=1)
    assert (loss.num_classes, loss.dim, loss.bank.size) == (1, 1, 1)


@pytest.mark.parametrize("name, bad, message, good", [
    ("temperature", 0, "temperature: expected a value > 0, got 0", 0.1),
    ("weighting", "papr", "weighting: expected one of ('paper', 'scale', 'none'), got 'papr' (did you mean 'paper'?)",
     "scale"),
    ("gamma", 0.0, "gamma: expected a value > 0, got 0.0", 2.0),
    ("reduction", "avg", "reduction: expected one of ('mean', 'sum', 'none'), got 'avg'", "sum"),
    ("ks", (), "ks: expected a non-empty sequence of ints >= 1, got ()", (1, 3)),
    ("precision", "bfloat", "precision: expected one of ('float32', 'bfloat16'), got 'bfloat' "
     "(did you mean 'bfloat16'?)", "bfloat16"),
    ("num_anchors", 0, "num_anchors: expected an int >= 1, got 0", 1),
    ("num_positives", 0, "num_positives: expected an int >= 1, got 0", 1),
    ("num_negatives", 0, "num_negatives: expected an int >= 1, got 0", 1),
    ("sampling", "rand", "sampling: expected one of ('density', 'random'), got 'rand' (did you mean 'random'?)",
     "random"),
    ("anchor_mode", "classes", "anchor_mode: expected one of ('pixel', 'class'), got 'classes' "
     "(did you mean 'class'?)", "class"),
    ("max_samples_per_class", 0, "max_samples_per_class: expected an int >= 1, got 0", 1),
    ("ignore_index", 1.5, "ignore_index: expected an int or None, got 1.5", None),
    ("threshold", math.inf, "threshold: expected a finite number, got inf", -0.5),
    ("bank_source", "pixels", "bank_source: expected one of ('prototype', 'pixel'), got 'pixels' "
     "(did you mean 'pixel'?)", "pixel"),
    ("bank_push_per_class", 0, "bank_push_per_class: expected an int >= 1, got 0", 1),
])
def test_loss_option_setters_check_like_the_constructor(name, bad, message, good):
    loss = _loss()
    before = getattr(loss, name)
    with raises(message):
        setattr(loss, name, bad)
    assert getattr(loss, name) == before  # a refused value leaves the option as it was
    setattr(loss, name, good)
    assert getattr(loss, name) == good


def test_loss_callable_weighting_and_gamma_none_are_accepted_by_the_setters():
    loss = _loss(gamma=1.0)
    fn = lambda log_w, log_ratio: -log_ratio  # noqa: E731
    loss.weighting = fn
    loss.gamma = None
    assert loss.weighting is fn and loss.term.weighting is fn and loss.gamma is None and loss.term.gamma is None


# ----------------------------------------------------------------------------- forward: input messages
def test_loss_embeddings_rank_dtype_and_channel_messages():
    loss, y = _loss(), _labels()
    with raises("embeddings: expected a tensor of shape (N, D, *spatial) with 2 or 3 spatial dims (rank 4 or 5), "
                "got shape (2, 8, 4) (rank 3)"):
        loss(torch.randn(2, 8, 4), y)
    with raises("embeddings: expected a floating point tensor, got dtype torch.int64"):
        loss(torch.ones(2, 8, 4, 4, dtype=LONG), y)
    with raises("embeddings: expected 8 channels (dim) in shape (N, 8, *spatial), got shape (2, 7, 4, 4)"):
        loss(torch.randn(2, 7, 4, 4), y)
    with raises("embeddings: expected 8 channels (dim) in shape (N, 8, *spatial), got shape (2, 9, 4, 4)"):
        loss(torch.randn(2, 9, 4, 4), y)


def test_loss_labels_shape_messages_and_resized_labels_accepted():
    loss, emb = _loss(), torch.randn(2, 8, 4, 4)
    with raises("labels: expected shape (N, *spatial) with N = 2 and 2 spatial dims (any size, resized to the "
                "embeddings' (4, 4)) for embeddings (2, 8, 4, 4), got (3, 4, 4)"):
        loss(emb, _labels(n=3))
    with raises("labels: expected shape (N, *spatial) with N = 2 and 2 spatial dims (any size, resized to the "
                "embeddings' (4, 4)) for embeddings (2, 8, 4, 4), got (2, 16)"):
        loss(emb, _labels().reshape(2, 16))
    with raises("labels: expected shape (N, *spatial) with N = 2 and 2 spatial dims (any size, resized to the "
                "embeddings' (4, 4)) for embeddings (2, 8, 4, 4), got (2, 1, 4, 4)"):
        loss(emb, _labels().unsqueeze(1))
    _finite_scalar(loss(emb, _labels(h=8, w=8)))  # another spatial size is resized, not refused


def test_loss_label_values_and_dtype_messages():
    emb = torch.randn(2, 8, 4, 4)
    bad = _labels()
    bad[0, 0, 0], bad[1, 0, 0] = 3, 5
    with raises("labels: expected values in [0, 3) or ignore_index=-100, got values in [3, 5]"):
        _loss()(emb, bad)
    with raises("labels: expected values in [0, 3), got values in [-100, -100]"):
        _loss(ignore_index=None)(emb, torch.where(bad > 2, -100, bad))
    with raises("labels: expected an integer tensor (torch.long), got dtype torch.float32"):
        _loss(validate=False)(emb, _labels().float())
    ok = torch.where(bad > 2, -100, bad)
    ok[0, 1, 1] = 2  # the largest class and the ignore_index are fine
    _finite_scalar(_loss()(emb, ok))


def test_loss_finite_check_message_and_validate_off():
    emb = torch.randn(2, 8, 4, 4)
    emb[1, 2, 3, 0] = math.nan
    with raises("embeddings: expected finite values, got NaN or inf in a tensor of shape (2, 8, 4, 4)"):
        _loss()(emb, _labels())
    emb[1, 2, 3, 0] = math.inf
    with raises("embeddings: expected finite values, got NaN or inf in a tensor of shape (2, 8, 4, 4)"):
        _loss()(emb, _labels())
    out = _loss(validate=False)(emb, _labels())  # not checked: no error (the value is the caller's business)
    assert out.ndim == 0


@pytest.mark.parametrize("shape", [(2, 3, 16), (2, 2, 4, 4), (3, 3, 4, 4), (2, 4, 4, 4)])
def test_loss_probs_shape_message(shape):
    with raises(f"probs: expected shape (N, C, *spatial) = (2, 3, *spatial) with 2 spatial dims (any size, "
                f"resized to the embeddings' (4, 4)), got {shape}"):
        _loss()(torch.randn(2, 8, 4, 4), _labels(), probs=torch.rand(shape))


def test_loss_probs_of_another_spatial_size_are_resized():
    probs = torch.softmax(torch.randn(2, 3, 8, 8), 1)
    _finite_scalar(_loss()(torch.randn(2, 8, 4, 4), _labels(), probs=probs))


# ----------------------------------------------------------------------------- forward: head= messages
def test_loss_head_with_class_anchors_message():
    head = ProjectionHead(6, 8)
    with raises("head: anchor_mode='class' takes its gradient through the prototypes of every pixel (Eq. 2), so it "
                "needs the dense embeddings: pass head(features), not head="):
        _loss(anchor_mode="class")(torch.randn(2, 6, 4, 4), _labels(), head=head)


def test_loss_head_input_channel_message_and_accepted_feature_width():
    head = ProjectionHead(6, 8)
    with raises("embeddings: with head=, the feature map the head reads, expected 6 channels (the head's "
                "in_channels) in shape (N, 6, *spatial), got shape (2, 8, 4, 4)"):
        _loss()(torch.randn(2, 8, 4, 4), _labels(), head=head)  # D channels: the dense embeddings, not features
    with raises("embeddings: with head=, the feature map the head reads, expected 6 channels (the head's "
                "in_channels) in shape (N, 6, *spatial), got shape (2, 5, 4, 4)"):
        _loss()(torch.randn(2, 5, 4, 4), _labels(), head=head)
    _finite_scalar(_loss()(torch.randn(2, 6, 4, 4), _labels(), head=head))  # F != dim is what a head takes


def test_loss_head_output_width_message():
    with raises("head: expected it to map the features to 8 channels (dim), got 7"):
        _loss()(torch.randn(2, 5, 4, 4), _labels(), head=nn.Linear(5, 7))
    with raises("head: expected it to map the features to 8 channels (dim), got 9"):
        _loss()(torch.randn(2, 5, 4, 4), _labels(), head=nn.Linear(5, 9))
    # a pointwise head without in_channels: the feature width is not checked up front
    _finite_scalar(_loss()(torch.randn(2, 5, 4, 4), _labels(), head=nn.Linear(5, 8)))


# ============================================================================= cotraining
@pytest.mark.parametrize("dims", [1, 4, 0, "2"])
def test_projection_head_spatial_dims_message(dims):
    with raises(f"spatial_dims: expected 2 or 3, got {dims!r}"):
        ProjectionHead(4, 8, spatial_dims=dims)


def test_projection_head_spatial_dims_and_point_norm_accepted():
    assert isinstance(ProjectionHead(4, 8, spatial_dims=2).net[0], nn.Conv2d)
    assert isinstance(ProjectionHead(4, 8, spatial_dims=3).net[0], nn.Conv3d)
    assert ProjectionHead(4, 8, point_norm="frozen").point_norm == "frozen"
    with raises("point_norm: expected one of ('sample', 'frozen'), got 'froze' (did you mean 'frozen'?)"):
        ProjectionHead(4, 8, point_norm="froze")


def test_projection_head_forward_message():
    head = ProjectionHead(4, 8)
    msg = "ProjectionHead input: expected 4 channels (in_channels) in shape (N, 4, *spatial) with 2 spatial dims " \
          "(spatial_dims), got {}"
    for shape in [(4,), (2, 5, 3, 3), (2, 3, 3, 3), (2, 4), (4, 3, 3), (2, 4, 3, 3, 3)]:  # rank or channels wrong
        with raises(msg.format(shape)):
            head(torch.randn(shape))
    with raises(msg.replace("2 spatial", "3 spatial").format((2, 4, 3, 3))):
        ProjectionHead(4, 8, spatial_dims=3)(torch.randn(2, 4, 3, 3))
    assert ProjectionHead(4, 8, spatial_dims=3)(torch.randn(2, 4, 2, 3, 3)).shape == (2, 8, 2, 3, 3)
    assert head(torch.randn(2, 4, 3, 3)).shape == (2, 8, 3, 3)


def test_projection_head_embed_points_message():
    head = ProjectionHead(4, 8)
    with raises("embed_points: expected x of shape (M, 4) (in_channels), got (3, 4, 1)"):
        head.embed_points(torch.randn(3, 4, 1))
    with raises("embed_points: expected x of shape (M, 4) (in_channels), got (4,)"):
        head.embed_points(torch.randn(4))
    with raises("embed_points: expected x of shape (M, 4) (in_channels), got (3, 5)"):
        head.embed_points(torch.randn(3, 5))
    with raises("embed_points: expected x of shape (M, 4) (in_channels), got (3, 3)"):
        head.embed_points(torch.randn(3, 3))
    assert head.embed_points(torch.randn(3, 4)).shape == (3, 8)


# ----------------------------------------------------------------------------- wrappers: hooks and layers
def _net(feat=8):
    return nn.Sequential(nn.Conv2d(1, feat, 3, padding=1), nn.ReLU(), nn.Conv2d(feat, 3, 1))


class _Skips(nn.Module):
    """A model whose ``unused`` layer never runs (a hook on it does not fire)."""

    def __init__(self):
        super().__init__()
        self.body = _net()
        self.unused = nn.Identity()

    def forward(self, x):
        return self.body(x)


class _FlatFeature(nn.Module):
    """A model whose ``feat`` layer returns ``(N, 8, H*W)``: 8 channels, one spatial dim."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.feat = nn.Flatten(2)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        h = self.conv(x)
        self.feat(h)
        return self.out(h)


def test_wrappers_unknown_feature_layer_message():
    with raises("feature_layer: expected the name of a submodule of model_a (children: ['0', '1', '2']; "
                "torch_dacl.feature_layers(model, example_input) lists every layer with its channels and "
                "resolution), got 'decoder'"):
        CoTrainingWrapper(_net(), _net(), feature_layer="decoder", feature_channels=8)
    with raises("feature_layer: expected the name of a submodule of model_b (children: ['0', '1', '2']; "
                "torch_dacl.feature_layers(model, example_input) lists every layer with its channels and "
                "resolution), got 'unused'"):
        CoTrainingWrapper(_Skips(), _net(), feature_layer="unused", feature_channels=8)
    with raises("feature_layer: expected the name of a submodule of model (children: ['body', 'unused']; "
                "torch_dacl.feature_layers(model, example_input) lists every layer with its channels and "
                "resolution), got 'body.9'"):
        SegmentationWithEmbeddings(_Skips(), feature_layer="body.9", feature_channels=8)
    assert isinstance(SegmentationWithEmbeddings(_Skips(), feature_layer="body.1", feature_channels=8), nn.Module)


def test_cotraining_hook_that_does_not_fire_message():
    x = torch.randn(1, 1, 4, 4)
    wrapper = CoTrainingWrapper(_Skips(), _Skips(), feature_layer="unused", feature_channels=8)
    with raises("the hook on 'unused' of model_a did not fire during forward", RuntimeError):
        wrapper(x)

    class Uses(_Skips):  # the same layers; its ``unused`` layer runs (8 channels, as feature_channels)
        def forward(self, inp):
            h = self.body[1](self.body[0](inp))
            return self.body[2](self.unused(h))

    wrapper = CoTrainingWrapper(Uses(), _Skips(), feature_layer="unused", feature_channels=8)
    with raises("the hook on 'unused' of model_b did not fire during forward", RuntimeError):
        wrapper(x)
    wrapper = CoTrainingWrapper(Uses(), Uses(), feature_layer="unused", feature_channels=8)
    assert wrapper(x).features_b.shape == (1, 8, 4, 4)


def test_segmentation_hook_that_does_not_fire_message():
    model = SegmentationWithEmbeddings(_Skips(), feature_layer="unused", feature_channels=8)
    with raises("the hook on 'unused' did not fire during the model's forward", RuntimeError):
        model(torch.randn(1, 1, 4, 4))


def test_cotraining_feature_rank_and_channel_messages():
    x = torch.randn(2, 1, 4, 4)
    wrapper = CoTrainingWrapper(_FlatFeature(), _FlatFeature(), feature_layer="feat", feature_channels=8)
    with raises("feature_layer output: expected shape (N, C, *spatial) with 2 spatial dims, got (2, 8, 16)"):
        wrapper(x)
    wrapper = CoTrainingWrapper(_net(), _net(), feature_layer="1", feature_channels=8, spatial_dims=3)
    with raises("feature_layer output: expected shape (N, C, *spatial) with 3 spatial dims, got (2, 8, 4, 4)"):
        wrapper(x)
    wrapper = CoTrainingWrapper(_net(), _net(), feature_layer="1", feature_channels=6)
    with raises("feature_channels: the output of feature_layer '1' of model_a has 8 channels (shape (2, 8, 4, 4)), "
                "but feature_channels=6; pass feature_channels=8 (torch_dacl.feature_layers(model, example_input) "
                "lists every layer with its channels)"):
        wrapper(x)
    wrapper = CoTrainingWrapper(_net(), _net(feat=5), feature_layer="1", feature_channels=8)
    with raises("feature_channels: the output of feature_layer '1' of model_b has 5 channels (shape (2, 5, 4, 4)), "
                "but feature_channels=8; pass feature_channels=5 (torch_dacl.feature_layers(model, example_input) "
                "lists every layer with its channels)"):
        wrapper(x)
    out = CoTrainingWrapper(_net(), _net(), feature_layer="1", feature_channels=8)(x)
    assert out.features_a.shape == out.features_b.shape == (2, 8, 4, 4)


def test_segmentation_feature_shape_messages():
    x = torch.randn(2, 1, 4, 4)
    with raises("feature_channels: the output of feature_layer '1' has shape (2, 8, 4, 4); expected (N, 6, *spatial) "
                "with 2 spatial dims (feature_channels=6, spatial_dims=2); torch_dacl.feature_layers(model, "
                "example_input) lists every layer with its channels"):
        SegmentationWithEmbeddings(_net(), feature_layer="1", feature_channels=6)(x)
    with raises("feature_channels: the output of feature_layer 'feat' has shape (2, 8, 16); expected (N, 8, *spatial) "
                "with 2 spatial dims (feature_channels=8, spatial_dims=2); torch_dacl.feature_layers(model, "
                "example_input) lists every layer with its channels"):
        SegmentationWithEmbeddings(_FlatFeature(), feature_layer="feat", feature_channels=8)(x)
    logits, emb = SegmentationWithEmbeddings(_net(), feature_layer="1", feature_channels=8, embed_dim=4,
                                             sparse_head=False)(x)
    assert logits.shape == (2, 3, 4, 4) and emb.shape == (2, 4, 4, 4)
