"""The contract of DACLObjective and gradient_share beyond tests/test_objective.py: the
documented defaults (Eq. 1's lambda_CL peak 0.1, the 1/30 warm-up), the exact error messages,
the output fields of every path, the seeds of the two losses, the pixel grid against a
hand-made one, the sparse/dense/class head paths against separate loss calls, state_dict
round trips, summarize()/extra_repr() and gradient_share against hand computations."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from torch_dacl import DACLObjective, ProjectionHead, SoftDensityContrastiveLoss, dacl_labels, gradient_share
from torch_dacl.options import PSEUDO_POLICIES, RAMP_SHAPES

C, D, FEAT = 3, 8, 6
SMALL = dict(num_anchors=6, num_positives=8, num_negatives=10, bank_size=12, max_samples_per_class=40, ks=(2, 4))


def exactly(message: str) -> str:
    """A ``pytest.raises(match=)`` pattern that accepts ``message`` and nothing else."""
    return "^" + re.escape(message) + "$"


def _logits(n=4, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, h, w, generator=g) * 3, torch.randn(n, C, h, w, generator=g) * 3


def _labels(n=4, h=8, w=8, seed=1):
    return torch.randint(0, C, (n, h, w), generator=torch.Generator().manual_seed(seed))


def _heads(out_a=D, out_b=D):
    torch.manual_seed(0)
    return ProjectionHead(FEAT, out_a), ProjectionHead(FEAT, out_b)


# ----------------------------------------------------------------------------- defaults
def test_default_schedule_peaks_at_eq1_lambda_and_warms_up_for_a_thirtieth():
    obj = DACLObjective(C, D, total_steps=300, **SMALL)
    values = []
    for _ in range(300):
        values.append(obj.lambda_cl)
        obj.step()
    assert values[:10] == [0.0] * 10 and values[10] > 0.0  # 1/30 of 300 steps
    assert obj.lambda_cl == pytest.approx(0.1)  # Eq. 1's peak at t = t_max
    assert max(values) <= 0.1 + 1e-12


def test_constant_ramp_shape_reaches_lambda_cl_right_after_the_warmup():
    obj = DACLObjective(C, D, total_steps=100, lambda_cl=0.4, warmup=5, ramp_shape="constant", **SMALL)
    values = []
    for _ in range(8):
        values.append(obj.lambda_cl)
        obj.step()
    assert values == [0.0] * 5 + [0.4] * 3


def test_zero_weights_are_allowed_and_unit_interval_ends_accepted():
    obj = DACLObjective(C, D, total_steps=10, lambda_cl=0.0, lambda_cross=0.0, pseudo_confidence=1.0,
                        pseudo_fraction=1.0, **SMALL)
    assert obj.lambda_cross == 0.0 and obj.pseudo_confidence == 1.0 and obj.pseudo_fraction == 1.0
    assert DACLObjective(C, D, total_steps=10, pseudo_confidence=0.0, **SMALL).pseudo_confidence == 0.0


# ----------------------------------------------------------------------------- errors
def test_constructor_error_messages_are_exact():
    with pytest.raises(ValueError, match=exactly(
            "total_steps: expected the number of training steps (t_max of Eq. 1's schedule), got None")):
        DACLObjective(C, D)
    with pytest.raises(ValueError, match=exactly(
            "dim: expected the embedding dimension D (or heads=, whose out_channels give it), got None")):
        DACLObjective(C, total_steps=10)
    with pytest.raises(ValueError, match=exactly(
            "reduction: expected 'mean' or 'sum' in DACLObjective (its terms are scalars), got 'none'")):
        DACLObjective(C, D, total_steps=10, reduction="none")
    with pytest.raises(ValueError, match=exactly(f"pseudo_policy: expected one of {PSEUDO_POLICIES}, got 'fixd' "
                                                 "(did you mean 'fixed'?)")):
        DACLObjective(C, D, total_steps=10, pseudo_policy="fixd")
    with pytest.raises(ValueError, match=exactly(f"ramp_shape: expected one of {RAMP_SHAPES}, got 'linear'")):
        DACLObjective(C, D, total_steps=10, ramp_shape="linear")
    with pytest.raises(ValueError, match=exactly("pixel_stride: expected an int >= 1, got 0")):
        DACLObjective(C, D, total_steps=10, pixel_stride=0)


def test_reduction_sum_and_mean_are_accepted():
    for reduction in ("mean", "sum"):
        assert DACLObjective(C, D, total_steps=10, reduction=reduction, **SMALL).loss_a.reduction == reduction


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_pseudo_confidence_outside_the_unit_interval_is_refused(value):
    with pytest.raises(ValueError, match=exactly(f"pseudo_confidence: expected a value in [0, 1], got {value!r}")):
        DACLObjective(C, D, total_steps=10, pseudo_confidence=value)


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_pseudo_fraction_outside_zero_one_is_refused(value):
    with pytest.raises(ValueError, match=exactly(f"pseudo_fraction: expected a value in (0, 1], got {value!r}")):
        DACLObjective(C, D, total_steps=10, pseudo_fraction=value)


@pytest.mark.parametrize("name", ["lambda_cl", "lambda_cross"])
@pytest.mark.parametrize("value", [-0.5, math.inf, math.nan])
def test_weights_must_be_finite_and_non_negative(name, value):
    with pytest.raises(ValueError, match=exactly(f"{name}: expected a finite value >= 0, got {value!r}")):
        DACLObjective(C, D, total_steps=10, **{name: value})


@pytest.mark.parametrize("value", [0, -1.0])
def test_head_weight_must_be_positive(value):
    with pytest.raises(ValueError, match=exactly(f"head_weight: expected a value > 0 or None, got {value!r}")):
        DACLObjective(C, D, total_steps=10, head_weight=value, heads=_heads())


def test_head_weight_without_heads_message():
    with pytest.raises(ValueError, match=exactly(
            "heads: head_weight needs the two ProjectionHead modules, heads=(head_a, head_b); got None")):
        DACLObjective(C, D, total_steps=10, head_weight=1.0)


@pytest.mark.parametrize("kind", ["not_heads", "three_heads", "one_head"])
def test_heads_must_be_two_projection_heads(kind):
    heads = {"not_heads": (torch.nn.Identity(), torch.nn.Identity()),
             "three_heads": _heads() + (ProjectionHead(FEAT, D),),
             "one_head": _heads()[:1]}[kind]
    with pytest.raises(ValueError, match=exactly(
            f"heads: expected the two ProjectionHead modules, heads=(head_a, head_b), got {heads!r}")):
        DACLObjective(C, D, total_steps=10, heads=heads)


def test_forward_without_embeddings_message():
    la, lb = _logits()
    y = _labels()
    obj = DACLObjective(C, D, total_steps=10, **SMALL)
    e = torch.randn(4, D, 8, 8)
    msg = exactly("embeddings_a, embeddings_b: expected the two models' embeddings (N, D, *S), got None "
                  "(only contrastive=False runs without them)")
    for ea, eb in ((None, e), (e, None), (None, None)):
        with pytest.raises(ValueError, match=msg):
            obj(la, lb, ea, eb, y, torch.ones(4, dtype=torch.bool))


# ----------------------------------------------------------------------------- construction
def test_dim_comes_from_the_heads_and_each_loss_gets_ignore_index():
    head_a, head_b = _heads(out_a=5, out_b=5)
    obj = DACLObjective(C, total_steps=10, heads=(head_a, head_b), ignore_index=255, **SMALL)
    assert obj.loss_a.dim == obj.loss_b.dim == 5
    assert obj.loss_a.ignore_index == 255 and obj.loss_b.ignore_index == 255
    assert obj.sparse_heads is True


@pytest.mark.parametrize("dim", [None, D])
def test_heads_of_different_sizes_are_refused(dim):
    with pytest.raises(ValueError, match=exactly(f"heads: expected both heads to map to dim={D} channels, got "
                                                 f"out_channels [{D}, 5]")):
        DACLObjective(C, dim, total_steps=10, heads=_heads(out_a=D, out_b=5), **SMALL)
    with pytest.raises(ValueError, match=exactly("heads: expected both heads to map to dim=8 channels, got "
                                                 "out_channels [5, 5]")):
        DACLObjective(C, 8, total_steps=10, heads=_heads(out_a=5, out_b=5), **SMALL)


@pytest.mark.parametrize("seed", [0, 7])
def test_seed_gives_model_a_seed_and_model_b_seed_plus_one(seed):
    obj = DACLObjective(C, D, total_steps=10, seed=seed, **SMALL)
    assert obj.loss_a.get_extra_state().tolist() == [seed, 0]
    assert obj.loss_b.get_extra_state().tolist() == [seed + 1, 0]
    unseeded = DACLObjective(C, D, total_steps=10, **SMALL)
    assert unseeded.loss_a.get_extra_state().tolist() == [-1, 0]
    assert unseeded.loss_b.get_extra_state().tolist() == [-1, 0]


def test_labels_for_uses_the_objective_ignore_index():
    la, lb = _logits()
    y = _labels()
    labeled = torch.tensor([True, False, True, False])
    obj = DACLObjective(C, D, total_steps=10, ignore_index=255, pseudo_confidence=0.9, **SMALL)
    got, conf = obj.labels_for(y, labeled, lb)
    ref, ref_conf = dacl_labels(y, labeled, lb, "fixed", 0.9, 0.5, ignore_index=255)
    assert torch.equal(got, ref) and torch.equal(conf, ref_conf)
    assert bool((got[~labeled] == 255).any()) and not bool((got == -100).any())


def test_from_wrapper_without_sparse_heads_attribute_runs_the_heads_densely():
    heads = _heads()
    obj = DACLObjective.from_wrapper(SimpleNamespace(heads=heads), num_classes=C, total_steps=10, **SMALL)
    assert obj.sparse_heads is False and obj.loss_a.dim == D
    assert list(obj.head_parameters()) == list(heads[0].parameters()) + list(heads[1].parameters())
    sparse = DACLObjective.from_wrapper(SimpleNamespace(heads=heads, sparse_heads=True), num_classes=C,
                                        total_steps=10, **SMALL)
    assert sparse.sparse_heads is True


def test_extra_repr_lists_the_options():
    obj = DACLObjective(C, D, total_steps=10, lambda_cross=0.5, pseudo_policy="class_fraction", pixel_stride=2,
                        **SMALL)
    base = ("lambda_cross=0.5, contrastive=True, pseudo_policy='class_fraction', pseudo_confidence=0.95, "
            "pseudo_fraction=0.5, pixel_stride=2, head_weight=None, sparse_heads=False, cross=True")
    assert obj.extra_repr() == base
    agree = DACLObjective(C, D, total_steps=10, lambda_cross=0.5, pseudo_policy="class_fraction", pixel_stride=2,
                          pseudo_agree=True, **SMALL)
    assert agree.extra_repr() == base + ", pseudo_agree=True"
    assert base + ", pseudo_agree=True" in repr(agree)


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cps_only_output_fields(dtype):
    la, lb = (t.to(dtype) for t in _logits())
    y = _labels()
    obj = DACLObjective(C, D, total_steps=10, warmup=0, lambda_cross=0.5, contrastive=False)
    for _ in range(5):
        obj.step()
    out = obj(la, lb, None, None, y, torch.ones(4, dtype=torch.bool))
    la, lb = la.float(), lb.float()  # the terms are float32 whatever the logits' dtype
    cross = F.cross_entropy(la, lb.argmax(1)) + F.cross_entropy(lb, la.argmax(1))
    torch.testing.assert_close(out.cross, cross)
    torch.testing.assert_close(out.cross_term, 0.5 * cross)
    torch.testing.assert_close(out.loss, 0.5 * cross)
    for zero in (out.cl_term, out.cl_a, out.cl_b):
        assert zero.dtype == torch.float32 and zero.shape == () and float(zero) == 0.0
    assert out.lambda_cl == pytest.approx(0.1 * math.exp(-5 * (1 - 5 / 10) ** 2))
    assert out.stats == {}


@pytest.mark.parametrize("contrastive", [False, True])
def test_without_cross_the_cps_fields_are_float32_zeros(contrastive):
    la, lb = (t.to(torch.float64) for t in _logits())
    y = _labels()
    e = torch.randn(4, D, 8, 8)
    obj = DACLObjective(C, D, total_steps=10, warmup=0, cross=False, contrastive=contrastive, seed=0, **SMALL)
    out = obj(la, lb, e, e, y, torch.ones(4, dtype=torch.bool))
    for zero in (out.cross, out.cross_term):
        assert zero.dtype == torch.float32 and float(zero) == 0.0
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, out.cl_term)


def _reference(seed, ea, ya, eb, yb, head_a=None, head_b=None):
    ref_a = SoftDensityContrastiveLoss(C, D, seed=seed, **SMALL)
    ref_b = SoftDensityContrastiveLoss(C, D, seed=seed + 1, **SMALL)
    return ref_a(ea, ya, return_details=True, head=head_a), ref_b(eb, yb, return_details=True, head=head_b)


def _check_against(out, det_a, det_b, lam):
    torch.testing.assert_close(out.cl_a, det_a.loss)
    torch.testing.assert_close(out.cl_b, det_b.loss)
    torch.testing.assert_close(out.cl_term, lam * (det_a.loss + det_b.loss))
    pa, pb = det_a.per_class(), det_b.per_class()
    assert set(out.stats) == set(pa) | {"pseudo_pixels"}
    for k in pa:
        torch.testing.assert_close(out.stats[k], (pa[k] + pb[k]) / 2)
    assert not bool(torch.equal(pa["sampled"], torch.zeros_like(pa["sampled"])))


def test_forward_equals_two_seeded_losses_and_the_mean_of_their_stats():
    g = torch.Generator().manual_seed(3)
    obj = DACLObjective(C, D, total_steps=10, warmup=0, seed=11, **SMALL)
    for _ in range(6):
        obj.step()
    la, lb = _logits()
    y = _labels()
    ea, eb = torch.randn(4, D, 8, 8, generator=g), torch.randn(4, D, 8, 8, generator=g)
    out = obj(la, lb, ea, eb, y, torch.ones(4, dtype=torch.bool))
    det_a, det_b = _reference(11, ea, y, eb, y)
    _check_against(out, det_a, det_b, obj.lambda_cl)
    assert torch.equal(out.stats["pseudo_pixels"], torch.zeros(C))


def test_pixel_stride_takes_a_randomly_offset_grid_of_the_labels_at_feature_resolution():
    """A coarse feature map (8x8 under 16x16 labels) with stride 2: the labels are first
    resized to 8x8 (nearest), then the grid ``[o::2]`` with a random offset ``o`` per spatial
    dimension (drawn from the global stream) is taken of features and labels alike."""
    obj = DACLObjective(C, D, total_steps=10, warmup=0, pixel_stride=2, seed=5, **SMALL)
    obj.step()
    ref_a = SoftDensityContrastiveLoss(C, D, seed=5, **SMALL)
    ref_b = SoftDensityContrastiveLoss(C, D, seed=6, **SMALL)
    g = torch.Generator().manual_seed(9)
    offsets = set()
    for step in range(6):
        la, lb = _logits(h=16, w=16, seed=step)
        y = torch.randint(0, C, (4, 16, 16), generator=g)
        ea, eb = torch.randn(4, D, 8, 8, generator=g), torch.randn(4, D, 8, 8, generator=g)
        torch.manual_seed(step)
        out = obj(la, lb, ea, eb, y, torch.ones(4, dtype=torch.bool))
        torch.manual_seed(step)
        off = [int(v) for v in torch.randint(2, (2,))]
        offsets.add(tuple(off))
        y8 = y[:, ::2, ::2]  # nearest resize 16x16 -> 8x8
        grid = (Ellipsis, slice(off[0], None, 2), slice(off[1], None, 2))
        det_a = ref_a(ea[grid], y8[grid], return_details=True)
        det_b = ref_b(eb[grid], y8[grid], return_details=True)
        _check_against(out, det_a, det_b, obj.lambda_cl)
        assert float(out.stats["sampled"].sum()) <= 4 * 4 * 4
    assert len(offsets) > 1 and any(o != (0, 0) for o in offsets)


def _with_heads(**opts):
    """An objective with two heads after one step, its feature maps, logits and labels, and
    its output on them."""
    head_a, head_b = _heads()
    obj = DACLObjective(C, total_steps=10, warmup=0, heads=(head_a, head_b), seed=2, **opts)
    obj.step()
    g = torch.Generator().manual_seed(4)
    fa, fb = torch.randn(4, FEAT, 8, 8, generator=g), torch.randn(4, FEAT, 8, 8, generator=g)
    la, lb = _logits()
    y = _labels()
    out = obj(la, lb, fa, fb, y, torch.ones(4, dtype=torch.bool))
    return obj, (head_a, head_b), (fa, fb), (la, lb), y, out


def test_sparse_heads_pixel_anchors_run_the_head_on_the_sampled_pixels():
    obj, (head_a, head_b), (fa, fb), (la, lb), y, out = _with_heads(**SMALL)
    det_a, det_b = _reference(2, fa, y, fb, y, head_a, head_b)
    _check_against(out, det_a, det_b, obj.lambda_cl)
    # the gradient reaches the feature map at the sampled pixels only
    fa = fa.clone().requires_grad_(True)
    res = obj(la, lb, fa, fb, y, torch.ones(4, dtype=torch.bool))
    res.cl_a.backward()
    touched = int((fa.grad.abs().sum(1) > 0).sum())
    assert 0 < touched <= int(res.stats["sampled"].sum() * 2)
    assert touched < 4 * 8 * 8


def test_class_anchors_run_the_heads_densely():
    opts = dict(SMALL, anchor_mode="class")
    _, (head_a, head_b), (fa, fb), _, y, out = _with_heads(**opts)
    ref_a = SoftDensityContrastiveLoss(C, D, seed=2, **opts)
    ref_b = SoftDensityContrastiveLoss(C, D, seed=3, **opts)
    torch.testing.assert_close(out.cl_a, ref_a(head_a(fa), y))
    torch.testing.assert_close(out.cl_b, ref_b(head_b(fb), y))


@pytest.mark.parametrize("which", ["a", "b", "both"])
def test_sparse_heads_refuse_the_heads_dense_output(which):
    head_a, head_b = _heads()
    obj = DACLObjective(C, total_steps=10, heads=(head_a, head_b), **SMALL)
    g = torch.Generator().manual_seed(4)
    fa, fb = torch.randn(4, FEAT, 8, 8, generator=g), torch.randn(4, FEAT, 8, 8, generator=g)
    ea = head_a(fa) if which in ("a", "both") else fa
    eb = head_b(fb) if which in ("b", "both") else fb
    la, lb = _logits()
    with pytest.raises(ValueError, match=exactly(
            "embeddings_a, embeddings_b: these are the heads' dense output, and the objective runs "
            "the heads itself (sparse_heads): pass the feature maps the heads read "
            "(CoTrainingWrapper(sparse_heads=True)), or build the objective with sparse_heads=False")):
        obj(la, lb, ea, eb, _labels(), torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("shape_a", [(4, 5, 8, 8), (4, 5)])
def test_sparse_heads_name_the_embedding_with_the_wrong_channels(shape_a):
    head_a, head_b = _heads()
    obj = DACLObjective(C, total_steps=10, heads=(head_a, head_b), **SMALL)
    la, lb = _logits()
    ea = torch.randn(*shape_a)
    with pytest.raises(ValueError, match=exactly(
            f"embeddings_a: with sparse heads, expected the feature map the head reads, {FEAT} channels "
            f"(N, {FEAT}, *S), got shape {tuple(shape_a)}; pass CoTrainingWrapper(sparse_heads=True)'s features, "
            f"or build the objective with sparse_heads=False for dense embeddings")):
        obj(la, lb, ea, torch.randn(4, FEAT, 8, 8), _labels(), torch.ones(4, dtype=torch.bool))


# ----------------------------------------------------------------------------- state
def _objective_with_heads(head_weight=0.5):
    heads = _heads()
    return DACLObjective(C, D, total_steps=10, warmup=2, head_weight=head_weight, heads=heads, **SMALL), heads


def test_state_dict_round_trip_restores_the_schedule_and_the_heads_scale():
    src, _ = _objective_with_heads()
    for _ in range(6):
        src.step()
    dst, heads = _objective_with_heads()
    res = dst.load_state_dict(src.state_dict())
    assert list(res.missing_keys) == [] and list(res.unexpected_keys) == []
    assert dst.lambda_cl == src.lambda_cl > 0
    for h in heads:
        assert h.input_grad_scale == pytest.approx(src.lambda_cl / 0.5)


def test_load_state_dict_is_strict_by_default_and_lenient_on_request():
    src, _ = _objective_with_heads()
    sd = src.state_dict()
    del sd["ramp.step_count"]
    dst, _ = _objective_with_heads()
    with pytest.raises(RuntimeError, match="ramp.step_count"):
        dst.load_state_dict(sd)
    res = dst.load_state_dict(sd, strict=False)
    assert list(res.missing_keys) == ["ramp.step_count"]


def test_load_state_dict_copies_unless_assign():
    src, _ = _objective_with_heads()
    src.step()
    sd = src.state_dict()
    copied, _ = _objective_with_heads()
    copied.load_state_dict(sd)
    assert copied.ramp.step_count is not sd["ramp.step_count"]
    assert copied.ramp.step_count.data_ptr() != sd["ramp.step_count"].data_ptr()
    assigned, _ = _objective_with_heads()
    assigned.load_state_dict(sd, assign=True)
    assert assigned.ramp.step_count is sd["ramp.step_count"]


# ----------------------------------------------------------------------------- summarize
def test_summarize_flattens_stats_per_class():
    stats = {"anchors": torch.tensor([1.0, 2.0, 3.0]), "bank_fill": torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)}
    assert DACLObjective.summarize(stats) == {"anchors/0": 1.0, "anchors/1": 2.0, "anchors/2": 3.0,
                                              "bank_fill/0": 0.5, "bank_fill/1": 0.0, "bank_fill/2": 1.0}
    named = DACLObjective.summarize(stats, class_names=["bg", "rv", "lv"])
    assert named == {"anchors/bg": 1.0, "anchors/rv": 2.0, "anchors/lv": 3.0,
                     "bank_fill/bg": 0.5, "bank_fill/rv": 0.0, "bank_fill/lv": 1.0}
    assert all(type(v) is float for v in named.values())
    assert DACLObjective.summarize({}) == {}


def test_summarize_of_a_forward_step():
    obj = DACLObjective(C, D, total_steps=10, seed=0, **SMALL)
    la, lb = _logits()
    e = torch.randn(4, D, 8, 8, requires_grad=True)
    out = obj(la, lb, e, e, _labels(), torch.tensor([True, True, False, False]))
    flat = DACLObjective.summarize(out.stats)
    assert len(flat) == len(out.stats) * C
    for k, v in out.stats.items():
        for i in range(C):
            assert flat[f"{k}/{i}"] == pytest.approx(float(v[i]))


# ----------------------------------------------------------------------------- gradient_share
def test_gradient_share_matches_hand_norms_on_a_shared_graph():
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    h = torch.tanh(w)  # saved tensors: the graph must be retained between the terms
    cl, sup = (0.3 * h).sum(), (h * h).sum()
    r = gradient_share({"cl": cl, "sup": sup}, [w])
    d = 1 - torch.tanh(w.detach()) ** 2
    n_cl = float((0.3 * d).norm())
    n_sup = float((2 * torch.tanh(w.detach()) * d).norm())
    assert r["grad_norm/cl"] == pytest.approx(n_cl) and r["grad_norm/sup"] == pytest.approx(n_sup)
    assert r["share"] == pytest.approx(n_cl / n_sup)
    (cl + sup).backward()  # the graph is still there
    assert w.grad is not None


def test_gradient_share_skips_unused_parameters_and_constant_terms():
    w = torch.ones(2, requires_grad=True)
    v = torch.ones(3, requires_grad=True)
    frozen = torch.ones(4)
    terms = {"cl": (0.5 * w).sum(), "const": torch.tensor(2.0), "sup": (2 * v).sum() + (frozen * 3).sum()}
    r = gradient_share(terms, [w, v, frozen])
    assert r == pytest.approx({"grad_norm/cl": 0.5 * math.sqrt(2), "grad_norm/const": 0.0,
                               "grad_norm/sup": 2 * math.sqrt(3), "share": 0.5 * math.sqrt(2) / (2 * math.sqrt(3))})
    assert list(r) == ["grad_norm/cl", "grad_norm/const", "grad_norm/sup", "share"]


def test_gradient_share_small_others_and_degenerate_cases():
    w = torch.ones(1, requires_grad=True)
    r = gradient_share({"cl": (0.2 * w).sum(), "sup": (0.5 * w).sum()}, [w])
    assert r["share"] == pytest.approx(0.4)  # others' norm below 1 still divides
    # no other term with gradient: share 0
    assert gradient_share({"cl": (0.2 * w).sum()}, [w])["share"] == 0.0
    assert gradient_share({"cl": (0.2 * w).sum(), "sup": torch.tensor(1.0)}, [w])["share"] == 0.0
    # the numerator absent: share 0 whatever the others
    r = gradient_share({"sup": (0.5 * w).sum()}, [w], numerator="cl")
    assert r == {"grad_norm/sup": pytest.approx(0.5), "share": 0.0}
    r = gradient_share({"sup": (0.5 * w).sum(), "cross": (3 * w).sum()}, [w], numerator="cross")
    assert r["share"] == pytest.approx(3 / 0.5)


# ----------------------------------------------------------------------------- label validation
def test_stride_one_validates_the_ground_truth_at_its_own_resolution():
    """With every pixel (stride 1) and a coarser feature map, the loss validates the labels
    before resizing them: a bad value where the 4x4 map does not read is still reported."""
    la, lb = _logits()
    y = _labels()
    y[0, 1, 1] = 5  # odd row and column: not read by the nearest resize to 4x4
    obj = DACLObjective(C, D, total_steps=10, seed=0, **SMALL)
    e = torch.randn(4, D, 4, 4)
    with pytest.raises(ValueError, match=exactly(
            "labels: expected values in [0, 3) or ignore_index=-100, got values in [5, 5]")):
        obj(la, lb, e, e, y, torch.ones(4, dtype=torch.bool))


def test_stride_grid_reports_a_bad_label_value_exactly():
    """Labels already at the features' resolution go to the grid as they are (no float round
    trip), so the error names the bad value exactly, even beyond float32's integers."""
    la, lb = _logits()
    y = _labels()
    y[1] = 2 ** 24 + 1
    obj = DACLObjective(C, D, total_steps=10, pixel_stride=2, seed=0, **SMALL)
    e = torch.randn(4, D, 8, 8)
    with pytest.raises(ValueError, match=exactly(
            f"labels: expected values in [0, 3) or ignore_index=-100, got values in [{2 ** 24 + 1}, {2 ** 24 + 1}]")):
        obj(la, lb, e, e, y, torch.ones(4, dtype=torch.bool))
