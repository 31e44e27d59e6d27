"""Module behaviour: bad input, degenerate input, options, state, compilation, co-training."""

import pytest
import torch
from torch import nn

import torch_dacl.functional as DF
from torch_dacl import (ClassMemoryBank, CoTrainingFeatures, CoTrainingOutput, CoTrainingWrapper, GaussianRampUp,
                        MaskedAveragePool, MultiScaleDensity, ProjectionHead, SoftDensityContrastiveLoss)
from torch_dacl.ablation import table2_options


def small(**kw):
    base = dict(num_classes=3, dim=8, ks=(2, 4), num_anchors=8, num_positives=8, num_negatives=8, bank_size=16,
                max_samples_per_class=32)
    base.update(kw)
    return SoftDensityContrastiveLoss(**base)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: small()(torch.randn(2, 8, 4), torch.zeros(2, 4, dtype=torch.long)), r"embeddings: expected .*rank"),
        (lambda: small()(torch.randn(2, 7, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)), r"embeddings: expected 8 channels"),
        (lambda: small()(torch.randn(2, 8, 4, 4), torch.zeros(3, 4, 4, dtype=torch.long)), r"labels: expected shape \(N, \*spatial\) with N = 2 and 2 spatial dims"),
        (lambda: small()(torch.randn(2, 8, 4, 4), torch.zeros(2, 4, 4)), r"labels: expected an integer tensor.*float32"),
        (lambda: small()(torch.randn(2, 8, 4, 4), torch.full((2, 4, 4), 3)), r"labels: expected values in \[0, 3\) or ignore_index=-100, got values in \[3, 3\]"),
        (lambda: small()(torch.full((2, 8, 4, 4), float("nan")), torch.zeros(2, 4, 4, dtype=torch.long)), r"embeddings: expected finite"),
        (lambda: small()(torch.randn(2, 8, 4, 4, dtype=torch.float64).int(), torch.zeros(2, 4, 4, dtype=torch.long)), r"embeddings: expected a floating point"),
        (lambda: small()(torch.randn(2, 8, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), probs=torch.rand(2, 2, 4, 4)), r"probs: expected shape \(N, C, \*spatial\) = \(2, 3, \*spatial\)"),
        (lambda: small(temperature=0.0), r"temperature: expected a value > 0, got 0.0"),
        (lambda: small(ks=(4, 0)), r"ks: expected .* >= 1"),
        (lambda: small(weighting="soft"), r"weighting: expected one of"),
        (lambda: small(num_anchors=0), r"num_anchors: expected an int >= 1"),
        (lambda: DF.knn_density(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), (2,), bank=torch.randn(1, 3, 6)), r"bank: expected feature dim D=4.*\(1, 3, 6\)"),
        (lambda: DF.knn_density(torch.randn(5, 4), torch.zeros(4, dtype=torch.long), (2,)), r"labels: expected shape \(5,\)"),
        (lambda: DF.knn_density(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), ()), r"ks: expected a non-empty"),
        (lambda: DF.masked_average_pool(torch.randn(2, 4, 3, 3), torch.rand(2, 2, 3, 4), 0.5), r"probs: expected shape"),
        (lambda: DF.soft_density_contrastive_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 3), torch.randn(2, 5, 3), temperature=-1), r"temperature: expected a value > 0"),
        (lambda: DF.soft_density_contrastive_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 4), torch.randn(2, 5, 3)), r"centers: expected shape \(2, 3\)"),
        (lambda: DF.soft_density_contrastive_loss(torch.randn(4, 3), torch.full((4,), 2), torch.randn(2, 3), torch.randn(2, 5, 3)), r"anchor_labels: expected values in \[0, 2\)"),
        (lambda: ClassMemoryBank(2, 4, 5).push(torch.randn(3, 6), torch.zeros(3, dtype=torch.long)), r"features: expected shape \(M, 4\) for a bank of dim 4, got \(3, 6\)"),
        (lambda: GaussianRampUp(0), r"total_steps: expected an int >= 1"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------------------------------- degenerate input
@pytest.mark.parametrize("anchor_mode", ["pixel", "class"])
@pytest.mark.parametrize(
    "labels",
    [
        torch.full((2, 4, 4), -100),  # all pixels ignored
        torch.zeros(2, 4, 4, dtype=torch.long),  # one class: no negatives
        torch.tensor([[[1] + [-100] * 15], [[-100] * 16]]).reshape(2, 4, 4),  # a class with one pixel
        torch.tensor([[[1] + [2] * 15], [[2] * 16]]).reshape(2, 4, 4),  # one-pixel class beside another
    ],
)
def test_degenerate_input_gives_finite_connected_result(labels, anchor_mode):
    loss_fn = small(anchor_mode=anchor_mode)
    assert loss_fn.bank.is_empty()
    emb = torch.randn(2, 8, 4, 4, requires_grad=True)
    loss = loss_fn(emb, labels)
    assert loss is not None and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert torch.isfinite(emb.grad).all()


def test_all_ignored_gives_exact_zero():
    emb = torch.randn(2, 8, 4, 4, requires_grad=True)
    loss = small()(emb, torch.full((2, 4, 4), -100))
    assert loss.item() == 0.0


@pytest.mark.parametrize("anchor_mode", ["pixel", "class"])
def test_one_class_batch_gives_exact_zero_and_no_contributing_anchor(anchor_mode):
    """No other class: no negative, so no anchor contributes, and the loss is exactly 0."""
    loss_fn = small(anchor_mode=anchor_mode)
    for _ in range(2):  # also once the bank holds entries of that class
        emb = torch.randn(2, 8, 4, 4, requires_grad=True)
        out = loss_fn(emb, torch.ones(2, 4, 4, dtype=torch.long), return_details=True)
        assert out.loss.item() == 0.0 and int(out.num_contributing) == 0
        assert out.anchor_valid.any()  # there were anchors; they had no negative
        out.loss.backward()
        assert torch.all(emb.grad == 0)
    assert int(loss_fn.bank.count[1]) > 0


def test_class_with_prototypes_but_no_labelled_pixel_contributes_nothing():
    """probs give class 2 a prototype in each image, but no pixel is labelled 2: with an empty
    bank class 2 has no positive key, hence no center, and its anchors do not count."""
    torch.manual_seed(0)
    emb = torch.randn(2, 8, 4, 4)
    lab = torch.tensor([[0] * 8 + [1] * 8]).reshape(1, 4, 4).repeat(2, 1, 1)
    probs = torch.nn.functional.one_hot(lab, 3).movedim(-1, 1).float()
    with_2 = probs.clone()
    with_2[:, 2, :2] = 0.9  # above phi: class 2 has a prototype in both images
    # one seed: the same draws, so the same summation order and an exactly equal loss
    a = small(anchor_mode="class", num_negatives=64, seed=0)(emb, lab, probs=probs, return_details=True)
    b = small(anchor_mode="class", num_negatives=64, seed=0)(emb, lab, probs=with_2, return_details=True)
    assert b.anchor_valid[2].sum() == 2  # class 2 had two prototype anchors ...
    assert int(a.num_contributing) == int(b.num_contributing) == 4  # ... and neither counts
    assert a.loss.item() == b.loss.item() != 0.0


def test_all_ignored_gives_zero_connected_to_the_embeddings():
    emb = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = small()(emb, torch.full((2, 4, 4), -100), return_details=True)
    assert out.loss.item() == 0.0 and int(out.num_contributing) == 0
    assert out.loss.requires_grad and out.loss.grad_fn is not None
    out.loss.backward()
    assert emb.grad is not None and torch.all(emb.grad == 0)


def test_empty_bank_density_and_loss_are_defined():
    d = DF.knn_density(torch.randn(3, 4), torch.tensor([0, 1, 2]), (4,), bank=torch.zeros(3, 5, 4),
                       bank_valid=torch.zeros(3, 5, dtype=torch.bool))
    assert torch.all(d == -1)


def _filled(loss_fn, spatial):
    """``loss_fn`` after one ordinary step (its bank holds entries), and a copy of its bank's state."""
    loss_fn(torch.randn(2, 8, *[4] * len(spatial)), torch.randint(0, 3, (2, *[4] * len(spatial))))
    assert loss_fn.bank.is_empty() != loss_fn.use_bank
    return {k: v.clone() for k, v in loss_fn.bank.state_dict().items()}


def _assert_empty_result(loss_fn, bank_before, emb, out, anchors_per_class):
    """Exact zero, finite, connected (zero gradient of emb's shape), empty details, bank unchanged."""
    assert out.loss.item() == 0.0 and torch.isfinite(out.loss) and out.loss.requires_grad
    out.loss.backward()
    assert emb.grad is not None and emb.grad.shape == emb.shape and torch.all(emb.grad == 0)
    c, s = 3, loss_fn.max_samples_per_class
    assert out.density.shape == out.sample_valid.shape == (c, s) and not out.sample_valid.any()
    assert out.anchor_valid.shape == out.anchor_density.shape == (c, anchors_per_class)
    assert not out.anchor_valid.any() and not out.contributing.any() and int(out.num_contributing) == 0
    assert not out.positive_valid.any() and torch.all(out.overlap == 0)
    for field in out:
        assert field is not None and torch.isfinite(field.float()).all()
    for v in out.per_class().values():
        assert v.shape == (c,) and torch.isfinite(v).all()
    assert all(torch.equal(bank_before[k], v) for k, v in loss_fn.bank.state_dict().items())


# (N, *spatial) of the embeddings: an empty batch or a zero-size image, 2D and 3D
EMPTY_SHAPES = [(0, 4, 4), (2, 0, 4), (2, 4, 0), (0, 2, 4, 4), (2, 0, 4, 4), (2, 2, 4, 0)]


@pytest.mark.parametrize("with_probs", [False, True])
@pytest.mark.parametrize("opts", [{}, {"anchor_mode": "class"}, {"use_bank": False}, {"bank_source": "pixel"}])
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_batch_or_zero_size_image_gives_exact_zero(shape, opts, with_probs):
    """N = 0 or a spatial size 0 (crashed: masked_average_pool's reshape(n, d, -1), gather_points'
    index % 0): loss exactly 0 with a zero gradient, finite empty details, the bank unchanged."""
    torch.manual_seed(0)
    loss_fn = small(seed=0, **opts)
    before = _filled(loss_fn, shape[1:])
    emb = torch.randn(shape[0], 8, *shape[1:], requires_grad=True)
    probs = torch.rand(shape[0], 3, *shape[1:]) if with_probs else None
    out = loss_fn(emb, torch.zeros(shape, dtype=torch.long), probs=probs, return_details=True)
    # class anchors are per-image prototypes: min(num_anchors, N) of them
    q = min(8, shape[0]) if opts.get("anchor_mode") == "class" else 8
    _assert_empty_result(loss_fn, before, emb, out, q)


@pytest.mark.parametrize("with_probs", [False, True])
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_batch_or_zero_size_image_with_sparse_head_gives_exact_zero(shape, with_probs):
    torch.manual_seed(0)
    loss_fn = small(seed=0)
    before = _filled(loss_fn, shape[1:])
    head = ProjectionHead(5, 8, spatial_dims=len(shape) - 1)
    feats = torch.randn(shape[0], 5, *shape[1:], requires_grad=True)
    probs = torch.rand(shape[0], 3, *shape[1:]) if with_probs else None
    out = loss_fn(feats, torch.zeros(shape, dtype=torch.long), probs=probs, return_details=True, head=head)
    _assert_empty_result(loss_fn, before, feats, out, 8)
    assert all(torch.isfinite(b).all() for b in head.buffers())


@pytest.mark.parametrize("emb_hw, label_hw", [((0, 4), (8, 8)), ((4, 4), (0, 8)), ((4, 0), (4, 8))])
def test_zero_size_labels_or_embeddings_at_another_resolution_give_exact_zero(emb_hw, label_hw):
    """Labels (and probs) are resized to the embeddings; from or to a zero-size map there is no
    labelled pixel (interpolate refused it)."""
    loss_fn = small(seed=0)
    before = _filled(loss_fn, emb_hw)
    emb = torch.randn(2, 8, *emb_hw, requires_grad=True)
    out = loss_fn(emb, torch.zeros(2, *label_hw, dtype=torch.long), probs=torch.rand(2, 3, *label_hw),
                  return_details=True)
    _assert_empty_result(loss_fn, before, emb, out, 8)


@pytest.mark.parametrize("spatial", [(4, 4), (2, 4, 4)])
def test_functional_core_on_an_empty_batch_or_zero_size_image(spatial):
    from torch_dacl.stages import gather_points
    feats = torch.randn(0, 8, *spatial, requires_grad=True)
    protos, valid = DF.masked_average_pool(feats, torch.rand(0, 3, *spatial), 0.5)
    assert protos.shape == (0, 3, 8) and valid.shape == (0, 3)
    flat = torch.randn(2, 8, 0, *spatial[1:], requires_grad=True)  # a zero-size image
    protos, valid = DF.masked_average_pool(flat, torch.rand(2, 3, 0, *spatial[1:]), 0.5)
    assert protos.shape == (2, 3, 8) and torch.all(protos == 0) and not valid.any()
    protos.sum().backward()
    assert flat.grad.shape == flat.shape
    for x in (feats, flat):  # an empty map: every index reads a zero vector, zero gradient back
        x.grad = None
        got = gather_points(x, torch.zeros(3, 5, dtype=torch.long))
        assert got.shape == (3, 5, 8) and torch.all(got == 0)
        got.sum().backward()
        assert x.grad.shape == x.shape
    assert DF.knn_density(torch.randn(0, 8), torch.zeros(0, dtype=torch.long), (2, 4)).shape == (0,)
    anchors = torch.randn(0, 8, requires_grad=True)
    loss = DF.soft_density_contrastive_loss(anchors, torch.zeros(0, dtype=torch.long), torch.randn(3, 8),
                                            torch.randn(3, 5, 8))
    assert loss.item() == 0.0
    loss.backward()
    assert anchors.grad.shape == (0, 8)


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("spatial", [(6, 6), (2, 4, 4)])
@pytest.mark.parametrize(
    "opts",
    [
        # Table 2's rows, from the library's one mapping (scales shrunk to this small batch)
        table2_options("II"),
        {**table2_options("III"), "ks": (2,)},
        {**table2_options("IV"), "ks": (2, 4)},
        {**table2_options("V"), "ks": (2, 4)},
        {**table2_options("VI"), "ks": (2, 4)},
        dict(weighting="scale", bank_source="pixel"),
        dict(anchor_mode="class"),  # Table 3, class-wise
        dict(include_positive=True, gamma=0.5, reduction="sum"),
    ],
)
def test_every_option_runs_in_2d_and_3d(spatial, opts):
    loss_fn = small(**opts)
    for _ in range(2):
        emb = torch.randn((2, 8) + spatial, requires_grad=True)
        lab = torch.randint(0, 3, (2,) + spatial)
        out = loss_fn(emb, lab, return_details=True)
        assert torch.isfinite(out.loss) and out.num_contributing > 0
        out.loss.backward()
        assert emb.grad.abs().sum() > 0
    assert loss_fn.bank.is_empty() == (not loss_fn.use_bank)


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.channels_last_3d])
def test_channels_last_embeddings_give_the_same_loss_and_gradient(fmt):
    spatial = (4, 4) if fmt is torch.channels_last else (2, 4, 4)
    kw = dict(max_samples_per_class=64, num_anchors=64, num_positives=64, num_negatives=64)
    emb = torch.randn((2, 8) + spatial)
    lab = torch.randint(0, 3, (2,) + spatial)
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().contiguous(memory_format=fmt).requires_grad_()
    assert not e2.is_contiguous()
    l1, l2 = small(**kw)(e1, lab), small(**kw)(e2, lab)
    torch.testing.assert_close(l1, l2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(e1.grad, e2.grad)


def test_density_sampling_picks_the_lowest_density_anchors():
    loss_fn = small(num_anchors=3, max_samples_per_class=64, use_bank=False)
    out = loss_fn(torch.randn(2, 8, 4, 4), torch.randint(0, 3, (2, 4, 4)), return_details=True)
    for c in range(3):
        dens = out.density[c][out.sample_valid[c]]
        chosen = out.anchor_density[c][out.anchor_valid[c]]
        torch.testing.assert_close(chosen.sort().values, dens.sort().values[: chosen.numel()])


def test_labels_are_resized_to_the_embedding_resolution():
    torch.manual_seed(0)
    lab = torch.randint(0, 3, (2, 4, 4))
    emb = torch.randn(2, 8, 4, 4)
    la = small(max_samples_per_class=64, num_anchors=64, num_positives=64, num_negatives=64)(emb, lab)
    big = lab.repeat_interleave(2, 1).repeat_interleave(2, 2)  # nearest downsampling gives `lab` back
    lb = small(max_samples_per_class=64, num_anchors=64, num_positives=64, num_negatives=64)(emb, big)
    torch.testing.assert_close(la, lb)


def test_probs_drive_the_prototypes():
    loss_fn = small(anchor_mode="class")
    emb = torch.randn(2, 8, 4, 4)
    lab = torch.randint(0, 3, (2, 4, 4))
    probs = torch.zeros(2, 3, 4, 4)  # no pixel above phi: no prototype, no anchor
    out = loss_fn(emb, lab, probs=probs, return_details=True)
    assert out.num_contributing == 0 and loss_fn.bank.is_empty()


def test_gradient_flows_only_through_anchors():
    """Positives and negatives are detached: pixels never chosen as anchors get no gradient."""
    loss_fn = small(num_anchors=1, max_samples_per_class=64, use_bank=False, weighting="none")
    emb = torch.randn(1, 8, 4, 4, requires_grad=True)
    lab = torch.tensor([[0] * 8 + [1] * 8]).reshape(1, 4, 4)
    loss_fn(emb, lab).backward()
    touched = (emb.grad.abs().sum(1) > 0).sum()
    assert touched == 2  # one anchor per class


# --------------------------------------------------------------------------- modules
def test_module_faces_call_the_functional_core():
    feats, probs = torch.randn(2, 4, 3, 3), torch.rand(2, 3, 3, 3)
    p1, v1 = MaskedAveragePool(0.3)(feats, probs)
    p2, v2 = DF.masked_average_pool(feats, probs, 0.3)
    assert torch.equal(p1, p2) and torch.equal(v1, v2)
    x, lab = torch.randn(9, 4), torch.randint(0, 2, (9,))
    assert torch.equal(MultiScaleDensity((2, 3))(x, lab), DF.knn_density(x, lab, (2, 3)))


def test_gaussian_rampup_state_dict_round_trip():
    ramp = GaussianRampUp(total_steps=100, warmup_steps=10)
    for _ in range(42):
        ramp.step()
    other = GaussianRampUp(total_steps=100, warmup_steps=10)
    other.load_state_dict(ramp.state_dict())
    assert other.value == ramp.value == DF.gaussian_rampup(42, 100, 0.1, 10)
    assert other() == ramp.value


def test_bank_entries_oldest_first_after_wrap():
    bank = ClassMemoryBank(1, 1, size=3)
    for v in range(5):
        bank.push(torch.tensor([[float(v)]]), torch.tensor([0]), torch.tensor([v / 10]))
    f, d = bank.entries(0)
    assert f.flatten().tolist() == [2.0, 3.0, 4.0]
    torch.testing.assert_close(d, torch.tensor([0.2, 0.3, 0.4]))
    bank.reset()
    assert bank.is_empty()


def test_loss_moves_with_the_module_and_runs_in_float64_input():
    loss_fn = small().to(torch.device("cpu"))
    emb = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(emb, torch.randint(0, 3, (2, 4, 4)))
    assert loss.dtype == torch.float32
    loss.backward()
    assert emb.grad.dtype == torch.float64


# --------------------------------------------------------------------------- compilation
def test_grouped_functional_math_compiles_fullgraph():
    """The grouped functions have static shapes and no host sync: they trace as one graph."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 4, generator=g)
    valid = torch.rand(3, 10, generator=g) > 0.2
    bank = torch.randn(3, 6, 4, generator=g)
    dens = torch.compile(DF.knn_density_grouped, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(dens(x, valid, (2, 4), bank), DF.knn_density_grouped(x, valid, (2, 4), bank))
    wide, wide_bank = torch.randn(3, 40, 4, generator=g), torch.randn(3, 30, 4, generator=g)  # 70 keys: the CPU's
    assert DF._topk_plan(70, 4, wide.device) == (2, 4)  # pruned top-k, padded to 72
    wide_valid = torch.rand(3, 40, generator=g) > 0.2
    torch.testing.assert_close(dens(wide, wide_valid, (2, 4), wide_bank),
                               DF.knn_density_grouped(wide, wide_valid, (2, 4), wide_bank))

    loss = torch.compile(DF.soft_density_contrastive_loss_grouped, backend="aot_eager", fullgraph=True)
    args = (x, valid, torch.randn(3, 4, generator=g), torch.randn(3, 5, 4, generator=g))
    torch.testing.assert_close(loss(*args)[0], DF.soft_density_contrastive_loss_grouped(*args)[0])

    pool = torch.compile(DF.masked_average_pool, backend="aot_eager", fullgraph=True)
    f, p = torch.randn(2, 4, 5, 5, generator=g), torch.rand(2, 3, 5, 5, generator=g)
    torch.testing.assert_close(pool(f, p, 0.5)[0], DF.masked_average_pool(f, p, 0.5)[0])


# --------------------------------------------------------------------------- co-training
def _net(cin=1, classes=4, spatial_dims=2):
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return nn.Sequential(conv(cin, 6, 3, padding=1), nn.ReLU(), conv(6, classes, 1))


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cotraining_wrapper_any_module(spatial_dims, sparse):
    w = CoTrainingWrapper(_net(spatial_dims=spatial_dims), _net(spatial_dims=spatial_dims), feature_layer="1",
                          feature_channels=6, embed_dim=8, spatial_dims=spatial_dims, sparse_heads=sparse)
    x = torch.randn((2, 1) + (8,) * spatial_dims)
    out = w(x)
    assert out.logits_a.shape == (2, 4) + (8,) * spatial_dims
    if sparse:  # the feature maps; the loss runs the head at its sampled pixels
        assert isinstance(out, CoTrainingFeatures) and out.features_a.shape == (2, 6) + (8,) * spatial_dims
        cl = small(num_classes=4)(out.features_a, out.logits_b.argmax(1), head=w.head_a)
    else:
        assert isinstance(out, CoTrainingOutput) and out.embeddings_a.shape == (2, 8) + (8,) * spatial_dims
        cl = small(num_classes=4)(out.embeddings_a, out.logits_b.argmax(1))
    loss = w.cross_loss(out.logits_a, out.logits_b) + cl
    loss.backward()
    assert w.head_a.net[0].weight.grad is not None and w.model_b[0].weight.grad is not None


def test_cotraining_wrapper_keeps_nothing_when_a_model_runs_alone():
    w = CoTrainingWrapper(_net(), _net(), feature_layer="1", feature_channels=6, embed_dim=8)
    w.model_a(torch.randn(1, 1, 8, 8))  # inference with one model: the hook must not hold its features
    assert w._features == {}
    w(torch.randn(1, 1, 8, 8))
    assert w._features == {}


def test_cotraining_wrapper_bad_layer():
    with pytest.raises(ValueError, match="feature_layer: expected the name of a submodule"):
        CoTrainingWrapper(_net(), _net(), feature_layer="decoder", feature_channels=6)


def test_cotraining_wrapper_with_smp_unet():
    smp = pytest.importorskip("segmentation_models_pytorch")
    kw = dict(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=4, encoder_depth=3,
              decoder_channels=(32, 16, 8))
    w = CoTrainingWrapper(smp.Unet(**kw), smp.Unet(**kw), feature_layer="decoder", feature_channels=8, embed_dim=16,
                          sparse_heads=False)
    out = w(torch.randn(2, 1, 32, 32))
    assert out.embeddings_b.shape == (2, 16, 32, 32) and out.logits_a.shape == (2, 4, 32, 32)
    w.sparse_heads = True
    out = w(torch.randn(2, 1, 32, 32))
    assert out.features_b.shape == (2, 8, 32, 32) and out.logits_a.shape == (2, 4, 32, 32)


def test_scale_gradient_identity_and_scales():
    from torch_dacl import scale_gradient

    x = torch.ones(3, requires_grad=True)
    assert scale_gradient(x, 1.0) is x  # no node in the graph at scale 1
    for s in (0.5, 2.0, 0.0):
        x.grad = None
        y = scale_gradient(x, s)
        assert torch.equal(y, x) and y is not x
        (3 * y).sum().backward()
        assert x.grad.tolist() == [3 * s] * 3


def test_wrapper_and_head_defaults_and_tuple_outputs():
    class TupleOut(nn.Module):  # a feature layer whose output is a tuple: its last element is f
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 6, 3, padding=1)

        def forward(self, x):
            f = self.conv(x)
            return (f * 0, f)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat, self.out = TupleOut(), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.out(torch.relu(self.feat(x)[1]))

    w = CoTrainingWrapper(Net(), Net(), feature_layer="feat", feature_channels=6, sparse_heads=False)
    assert w.head_a.out_channels == 64 and w.head_a.net[0].weight.dim() == 4  # D = 64, 2D heads by default
    out = w(torch.randn(2, 1, 8, 8))
    ref = w.head_a(w.model_a.feat(torch.randn(2, 1, 8, 8))[1])
    assert out.embeddings_a.shape == ref.shape == (2, 64, 8, 8)
    w.sparse_heads = True
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(w(x).features_a, w.model_a.feat(x)[1])  # the last element, not the first
    with pytest.raises(ValueError, match="in_channels"):
        ProjectionHead(3, 4)(torch.randn(5))
    with pytest.raises(ValueError, match="in_channels"):
        ProjectionHead(3, 4).embed_points(torch.randn(5, 2))
