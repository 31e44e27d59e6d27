"""DACLObjective (Eq. 1 beyond L_sup) against a hand-written loop, the pseudo-label policies
against loops, the disjoint anchor/positive rule, and the fixes users hit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_dacl import (
    ClassMemoryBank,
    CoTrainingWrapper,
    DACLObjective,
    GaussianRampUp,
    ProjectionHead,
    SoftDensityContrastiveLoss,
    dacl_labels,
    gradient_share,
)

C, D = 3, 8
SMALL = dict(num_anchors=6, num_positives=8, num_negatives=10, bank_size=12, max_samples_per_class=40, ks=(2, 4))


# ----------------------------------------------------------------------------- references
def naive_fixed_labels(labels, labeled, logits_other, thr, ignore=-100):
    out = labels.clone().long()
    probs = logits_other.softmax(1)
    for i in range(labels.shape[0]):
        if labeled[i]:
            continue
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in labels.shape[1:]]).tolist():
            idx = tuple(idx) if isinstance(idx, list) else (idx,)
            p = probs[(i, slice(None)) + idx]
            out[(i,) + idx] = int(p.argmax()) if float(p.max()) > thr else ignore
    return out


def naive_class_fraction_labels(labels, labeled, logits_other, thr, frac, ignore=-100):
    """Keep a pixel if its confidence passes thr, or it is among the ceil(frac * n_c) most
    confident unlabeled pixels predicted as its class c (n_c of them in the batch)."""
    out = naive_fixed_labels(labels, labeled, logits_other, thr, ignore)
    probs = logits_other.softmax(1)
    conf, pred = probs.max(1)
    cells = []
    for i in range(labels.shape[0]):
        if labeled[i]:
            continue
        for j in range(labels.shape[1]):
            for k in range(labels.shape[2]):
                cells.append((float(conf[i, j, k]), int(pred[i, j, k]), (i, j, k)))
    for c in range(logits_other.shape[1]):
        mine = sorted([cell for cell in cells if cell[1] == c], key=lambda t: -t[0])
        for _, _, pos in mine[: math.ceil(frac * len(mine))]:
            out[pos] = c
    return out


def separated_logits(n, c, h, w, seed):
    """Logits whose softmax confidences are pairwise > 1/500 apart (no histogram-bin ties)."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, c, (n, h, w), generator=g)
    conf = (torch.randperm(n * h * w, generator=g).float() / (n * h * w)) * 0.55 + 0.4  # distinct, spread
    conf = conf.view(n, h, w).clamp(1.0 / c + 0.02, 0.999)
    # logits giving exactly that top-1 probability: top = log(conf), others share the rest
    rest = ((1 - conf) / (c - 1)).clamp_min(1e-6)
    logits = rest.log().unsqueeze(1).repeat(1, c, 1, 1)
    logits.scatter_(1, pred.unsqueeze(1), conf.log().unsqueeze(1))
    return logits


def test_fixed_policy_matches_loop():
    logits = torch.randn(4, C, 5, 6) * 3
    labels = torch.randint(0, C, (4, 5, 6))
    labeled = torch.tensor([True, False, True, False])
    got, confident = dacl_labels(labels, labeled, logits, "fixed", confidence=0.8)
    ref = naive_fixed_labels(labels, labeled, logits, 0.8)
    assert torch.equal(got, ref)
    assert torch.equal(confident, (ref != -100) & ~labeled.view(-1, 1, 1))


@pytest.mark.parametrize("frac", [0.1, 0.5, 1.0])
def test_class_fraction_policy_matches_loop(frac):
    logits = separated_logits(4, C, 6, 6, seed=3)
    labels = torch.randint(0, C, (4, 6, 6))
    labeled = torch.tensor([False, True, False, False])
    got, _ = dacl_labels(labels, labeled, logits, "class_fraction", confidence=0.95, fraction=frac)
    assert torch.equal(got, naive_class_fraction_labels(labels, labeled, logits, 0.95, frac))


def test_class_fraction_reaches_every_predicted_class():
    # background very confident, foreground never above 0.95: the fixed policy gives the
    # foreground nothing, the class-aware one gives each predicted class pixels
    logits = torch.zeros(2, 3, 8, 8)
    logits[:, 0] = 6.0
    logits[:, 1, :2, :2], logits[:, 0, :2, :2] = 1.5, 0.0
    logits[:, 2, 5:, 5:], logits[:, 0, 5:, 5:] = 1.2, 0.0
    labeled = torch.zeros(2, dtype=torch.bool)
    y_fixed, _ = dacl_labels(torch.zeros(2, 8, 8, dtype=torch.long), labeled, logits, "fixed")
    y_cls, _ = dacl_labels(torch.zeros(2, 8, 8, dtype=torch.long), labeled, logits, "class_fraction", fraction=0.5)
    assert set(y_fixed.unique().tolist()) == {-100, 0}
    assert {1, 2} <= set(y_cls.unique().tolist())


def test_dacl_labels_errors_name_the_argument():
    with pytest.raises(ValueError, match="policy"):
        dacl_labels(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([True]), torch.zeros(1, 2, 2, 2), "quantile")
    with pytest.raises(ValueError, match="labels: expected shape"):
        dacl_labels(torch.zeros(1, 3, 2, dtype=torch.long), torch.tensor([True]), torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="labeled"):
        dacl_labels(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([True, False]), torch.zeros(1, 2, 2, 2))


# ----------------------------------------------------------------------------- objective
def _inputs(step, n=4, h=8, w=8):
    g = torch.Generator().manual_seed(100 + step)
    la = torch.randn(n, C, h, w, generator=g) * 3
    lb = torch.randn(n, C, h, w, generator=g) * 3
    ea = torch.randn(n, D, h, w, generator=g)
    eb = torch.randn(n, D, h, w, generator=g)
    y = torch.randint(0, C, (n, h, w), generator=g)
    return la, lb, ea, eb, y


@pytest.mark.parametrize("policy", ["fixed", "class_fraction"])
def test_objective_matches_hand_written_loop(policy):
    total, warm = 6, 2
    obj = DACLObjective(C, D, total_steps=total, lambda_cl=0.3, lambda_cross=0.7, warmup=warm, pseudo_policy=policy,
                        pseudo_confidence=0.6, pseudo_fraction=0.5, temperature=0.3, **SMALL)
    ref_a = SoftDensityContrastiveLoss(C, D, temperature=0.3, **SMALL)
    ref_b = SoftDensityContrastiveLoss(C, D, temperature=0.3, **SMALL)
    labeled = torch.tensor([True, True, False, False])
    for step in range(total):
        la, lb, ea, eb, y = _inputs(step)
        if policy == "class_fraction":
            la, lb = separated_logits(4, C, 8, 8, 7 * step), separated_logits(4, C, 8, 8, 7 * step + 1)
        torch.manual_seed(step)
        out = obj(la, lb, ea, eb, y, labeled)
        obj.step()
        # the loop: Eq. 1 beyond L_sup, written out
        if policy == "fixed":
            ya, yb = naive_fixed_labels(y, labeled, lb, 0.6), naive_fixed_labels(y, labeled, la, 0.6)
        else:
            ya = naive_class_fraction_labels(y, labeled, lb, 0.6, 0.5)
            yb = naive_class_fraction_labels(y, labeled, la, 0.6, 0.5)
        cross = (F.cross_entropy(la, lb.argmax(1)) + F.cross_entropy(lb, la.argmax(1)))
        lam = 0.0 if step < warm else 0.3 * math.exp(-5 * (1 - step / total) ** 2)
        torch.manual_seed(step)
        cl_a, cl_b = ref_a(ea, ya), ref_b(eb, yb)
        expected = 0.7 * cross + lam * (cl_a + cl_b)
        assert out.lambda_cl == pytest.approx(lam)
        torch.testing.assert_close(out.cl_a, cl_a)
        torch.testing.assert_close(out.cl_b, cl_b)
        torch.testing.assert_close(out.loss, expected)
        # pseudo-label counts: unlabeled pixels that received a label, per class, mean of a and b
        cnt = torch.stack([torch.bincount(t[2:][t[2:] >= 0], minlength=C).float() for t in (ya, yb)]).mean(0)
        torch.testing.assert_close(out.stats["pseudo_pixels"], cnt)
        assert torch.all(out.stats["overlap"] == 0)
    assert torch.equal(obj.loss_a.bank.features, ref_a.bank.features)


def test_objective_cps_only_and_stats_keys():
    la, lb, ea, eb, y = _inputs(0)
    out = DACLObjective(C, D, total_steps=10, contrastive=False)(la, lb, ea, eb, y, torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(out.loss, F.cross_entropy(la, lb.argmax(1)) + F.cross_entropy(lb, la.argmax(1)))
    assert out.stats == {} and float(out.cl_term) == 0.0


def test_objective_pixel_stride_subsamples_a_grid():
    obj = DACLObjective(C, D, total_steps=10, pixel_stride=2, **SMALL)
    la, lb, ea, eb, y = _inputs(1)
    out = obj(la, lb, ea, eb, y, torch.ones(4, dtype=torch.bool))
    assert float(out.stats["sampled"].sum()) <= 4 * 4 * 4  # a quarter of the 4x8x8 pixels at most


def test_warmup_fraction_and_warning():
    assert GaussianRampUp(3000, warmup_steps=1 / 30).warmup_steps == 100
    with pytest.warns(UserWarning, match="warmup_steps=1000 >= total_steps=300"):
        GaussianRampUp(300, warmup_steps=1000)
    with pytest.raises(ValueError, match="warmup_steps"):
        GaussianRampUp(300, warmup_steps=1.5)


# ----------------------------------------------------------------------------- heads
def _wrapper(sparse=False):
    torch.manual_seed(0)

    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, C, 1))
    return CoTrainingWrapper(net(), net(), feature_layer="1", feature_channels=6, embed_dim=D, sparse_heads=sparse)


def _grads(wrapper, head_weight, steps_before=0):
    obj = DACLObjective(C, D, total_steps=10, warmup=3, head_weight=head_weight,
                        heads=(wrapper.head_a, wrapper.head_b) if head_weight or wrapper.sparse_heads else None,
                        sparse_heads=wrapper.sparse_heads, **SMALL)
    for _ in range(steps_before):
        obj.step()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, C, (4, 8, 8), generator=torch.Generator().manual_seed(6))
    out = wrapper(x)
    torch.manual_seed(1)
    res = obj(*out, labels=y, labeled=torch.ones(4, dtype=torch.bool))
    wrapper.zero_grad()
    res.cl_term.backward()
    head = torch.cat([p.grad.flatten() for p in wrapper.head_a.parameters()])
    body = wrapper.model_a[0].weight.grad.clone()
    return head, body, res


@pytest.mark.parametrize("sparse", [False, True])
def test_head_weight_trains_heads_during_warmup_without_touching_the_backbone(sparse):
    head, body, res = _grads(_wrapper(sparse), head_weight=1.0)
    assert res.lambda_cl == 0.0
    assert float(head.abs().sum()) > 0  # the heads learn in the warm-up
    assert float(body.abs().sum()) == 0.0  # the backbone does not


@pytest.mark.parametrize("sparse", [False, True])
def test_head_weight_keeps_the_backbone_gradient_of_the_paper(sparse):
    _, body_paper, res = _grads(_wrapper(sparse), head_weight=None, steps_before=8)
    head_w, body_w, _ = _grads(_wrapper(sparse), head_weight=0.5, steps_before=8)
    head_p, _, _ = _grads(_wrapper(sparse), head_weight=None, steps_before=8)
    assert res.lambda_cl > 0
    torch.testing.assert_close(body_w, body_paper, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(head_w, head_p * (0.5 / res.lambda_cl), rtol=1e-4, atol=1e-5)


def test_head_weight_needs_the_heads():
    with pytest.raises(ValueError, match="heads"):
        DACLObjective(C, D, total_steps=10, head_weight=1.0)


def test_gradient_share_ratio():
    w = torch.ones(4, requires_grad=True)
    r = gradient_share({"cl": (0.2 * w).sum(), "sup": w.sum(), "cross": (3 * w).sum()}, [w])
    assert r["share"] == pytest.approx(0.2 / 4)
    assert r["grad_norm/sup"] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- disjoint rule
@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 30), min_size=2, max_size=4), q=st.integers(1, 12), p=st.integers(2, 24),
       seed=st.integers(0, 10_000), bank=st.booleans())
def test_anchors_and_positives_are_disjoint_ends_of_the_ranking(sizes, q, p, seed, bank):
    g = torch.Generator().manual_seed(seed)
    c = len(sizes)
    labels = torch.cat([torch.full((s,), k) for k, s in enumerate(sizes)] + [torch.full((2,), -100)])
    emb = torch.randn(1, D, 1, labels.numel(), generator=g)
    loss = SoftDensityContrastiveLoss(c, D, num_anchors=q, num_positives=p, num_negatives=8, ks=(2, 3),
                                      use_bank=bank, bank_size=5, max_samples_per_class=64)
    det = loss(emb, labels.view(1, 1, -1), return_details=True)
    h = max(1, p // 2)
    for k, s in enumerate(sizes):
        n_a, n_p = int(det.anchor_valid[k].sum()), int(det.positive_valid[k].sum())
        exp_a = q if s >= q + h else min(q, s // 2)
        assert n_a == exp_a and n_p == (h if s >= q + h else min(h, s - exp_a))
        assert n_a + n_p <= s
        if n_a and n_p:  # the anchors are the low end, the positives the high end
            assert float(det.anchor_density[k][det.anchor_valid[k]].max()) <= \
                float(det.positive_density[k][det.positive_valid[k]].min())
    assert int(det.overlap.sum()) == 0


# ----------------------------------------------------------------------------- user fixes
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_any_integer_label_dtype(dtype):
    emb = torch.randn(2, D, 6, 6)
    y = torch.randint(0, C, (2, 6, 6))
    ref, got = SoftDensityContrastiveLoss(C, D, **SMALL), SoftDensityContrastiveLoss(C, D, **SMALL)
    torch.manual_seed(0)
    a = ref(emb, y)
    torch.manual_seed(0)
    b = got(emb, y.to(dtype))
    torch.testing.assert_close(a, b)


def test_bank_unchanged_in_eval_unless_asked():
    emb, y = torch.randn(2, D, 6, 6), torch.randint(0, C, (2, 6, 6))
    loss = SoftDensityContrastiveLoss(C, D, **SMALL).eval()
    loss(emb, y)
    assert int(loss.bank.count.sum()) == 0
    loss.train()(emb, y)
    before = loss.bank.features.clone()
    loss.eval()(emb * 2, y)
    assert torch.equal(loss.bank.features, before)
    asked = SoftDensityContrastiveLoss(C, D, update_bank_in_eval=True, **SMALL).eval()
    asked(emb, y)
    assert int(asked.bank.count.sum()) > 0


def test_bank_size_mismatch_names_bank_size():
    a, b = SoftDensityContrastiveLoss(C, D, bank_size=10), SoftDensityContrastiveLoss(C, D, bank_size=20)
    with pytest.raises(ValueError, match="bank_size=10.*bank_size=20"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="size"):
        ClassMemoryBank(2, 3, size=True)


def test_wrapper_names_layer_and_feature_channels():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, C, 1))
    net2 = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, C, 1))
    w = CoTrainingWrapper(net, net2, feature_layer="1", feature_channels=16, embed_dim=D)
    with pytest.raises(ValueError, match=r"feature_channels.*'1'.*6 channels"):
        w(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="in_channels"):
        ProjectionHead(4, 8)(torch.randn(1, 3, 2, 2))


def test_class_prior_reaches_classes_never_predicted():
    # background wins every pixel's argmax; RV/Myo/LV are never predicted, so the fixed and
    # the class-fraction policies give them nothing; the prior policy gives each its top pixels
    g = torch.Generator().manual_seed(0)
    logits = torch.zeros(4, 4, 12, 12)
    logits[:, 0] = 4.0
    logits[:, 1:] = torch.rand(4, 3, 12, 12, generator=g) * 2
    labels = torch.zeros(4, 12, 12, dtype=torch.long)
    labels[:2, :3, :3], labels[:2, 4:8, 4:8], labels[:2, 9:, 9:] = 1, 2, 3
    labeled = torch.tensor([True, True, False, False])
    for policy in ("fixed", "class_fraction"):
        y, _ = dacl_labels(labels, labeled, logits, policy, confidence=0.99)
        assert not set(y[2:].unique().tolist()) & {1, 2, 3}
    y, conf = dacl_labels(labels, labeled, logits, "class_prior", confidence=0.99, fraction=0.5)
    probs = logits.softmax(1)
    unl = 2 * 12 * 12
    for c, area in ((1, 9), (2, 16), (3, 9)):
        mine = y[2:] == c
        need = math.ceil(0.5 * (2 * area / (2 * 144)) * unl)
        # about `need` pixels: fewer where another class claims a pixel, more by ties in the cut's bin
        assert 1 <= int(mine.sum()) <= 2 * need
        # they are the top end of p_c among the pixels left to background (up to one 1/1000 bin)
        p = probs[2:, c]
        assert float(p[mine].min()) >= float(p[y[2:] == 0].max()) - 1e-3
    assert torch.equal(conf[:2], torch.zeros_like(conf[:2]))


@pytest.mark.parametrize("policy", ["fixed", "class_fraction", "class_prior"])
def test_dacl_labels_same_on_the_unlabeled_rows_alone_and_on_every_row(policy, monkeypatch):
    """With ``labeled`` on the CPU the pseudo labels are computed on the unlabeled rows alone;
    elsewhere on every row, the labeled ones masked. Both give the same labels."""
    import torch_dacl.functional as DFn

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, C, 6, 7, generator=g) * 3
    labels = torch.randint(0, C, (5, 6, 7), generator=g)
    labels[0, :2] = -100
    labeled = torch.tensor([True, False, True, False, False])
    rows = dacl_labels(labels, labeled, logits, policy, confidence=0.9, fraction=0.4)
    monkeypatch.setattr(DFn, "_pick_rows", lambda lab: False)
    every = dacl_labels(labels, labeled, logits, policy, confidence=0.9, fraction=0.4)
    assert torch.equal(rows[0], every[0]) and torch.equal(rows[1], every[1])
    assert torch.equal(rows[0][labeled], labels[labeled])  # ground truth kept on the labeled rows
    none = dacl_labels(labels, torch.ones(5, dtype=torch.bool), logits, policy)
    assert torch.equal(none[0], labels) and not none[1].any()


@pytest.mark.parametrize("sparse", [False, True])
def test_paired_losses_equal_two_separate_calls(sparse):
    """The objective's one grouped call for both models gives each model exactly what its own
    loss call gives: loss, gradient, bank and random stream, over several steps."""
    from torch_dacl.loss import paired_losses

    def losses(seed):
        return (SoftDensityContrastiveLoss(C, D, seed=seed, **SMALL), SoftDensityContrastiveLoss(C, D, seed=seed + 1,
                                                                                                   **SMALL))
    heads = (ProjectionHead(6, D), ProjectionHead(6, D)) if sparse else (None, None)
    width = 6 if sparse else D
    g = torch.Generator().manual_seed(0)
    grouped, separate = losses(1), losses(1)
    for step in range(3):
        ea, eb = (torch.randn(3, width, 7, 8, generator=g, requires_grad=True) for _ in range(2))
        ya, yb = (torch.randint(0, C, (3, 7, 8), generator=g) for _ in range(2))
        da, db = paired_losses(*grouped, ea, ya, eb, yb, *heads)
        ga = torch.autograd.grad(da.loss + 2 * db.loss, (ea, eb))
        sa = separate[0](ea, ya, return_details=True, head=heads[0])
        sb = separate[1](eb, yb, return_details=True, head=heads[1])
        gs = torch.autograd.grad(sa.loss + 2 * sb.loss, (ea, eb))
        for x, y in ((da.loss, sa.loss), (db.loss, sb.loss), (da.density, sa.density), (db.anchor_density,
                                                                                         sb.anchor_density)):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        for x, y in zip(ga, gs):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    for a, b in zip(grouped, separate):
        torch.testing.assert_close(a.bank.bank, b.bank.bank)
        assert torch.equal(a.get_extra_state(), b.get_extra_state())
    # losses whose options differ run as two calls, with the same result
    odd = SoftDensityContrastiveLoss(C, D, seed=5, **{**SMALL, "num_anchors": 4})
    ref = SoftDensityContrastiveLoss(C, D, seed=5, **{**SMALL, "num_anchors": 4})
    ea, ya = torch.randn(2, width, 5, 5, generator=g), torch.randint(0, C, (2, 5, 5), generator=g)
    _, d_odd = paired_losses(SoftDensityContrastiveLoss(C, D, **SMALL), odd, ea, ya, ea, ya, *heads)
    torch.testing.assert_close(d_odd.loss, ref(ea, ya, head=heads[1]))


def test_hypothesis_options_of_the_objective():
    """The options issue #27's hypotheses are built from: no pseudo labels (H3: DACL on labeled
    pixels only), pseudo labels where both models agree (H3), a constant lambda_CL after the
    warm-up (H5), and a feature layer coarser than the logits (H4: labels follow it)."""
    g = torch.Generator().manual_seed(0)
    la, lb = torch.randn(4, C, 8, 8, generator=g) * 4, torch.randn(4, C, 8, 8, generator=g) * 4
    y = torch.randint(0, C, (4, 8, 8), generator=g)
    labeled = torch.tensor([True, True, False, False])
    # "none": ground truth on labeled rows, nothing elsewhere
    got, conf = dacl_labels(y, labeled, lb, "none")
    assert torch.equal(got[:2], y[:2]) and bool((got[2:] == -100).all()) and not conf.any()
    # agreement: a subset of the policy's pseudo labels, exactly where the argmaxes agree
    base = DACLObjective(C, D, total_steps=10, warmup=0, pseudo_confidence=0.5, **SMALL)
    agree = DACLObjective(C, D, total_steps=10, warmup=0, pseudo_confidence=0.5, pseudo_agree=True, **SMALL)
    e = torch.randn(4, D, 8, 8, generator=g)
    r_base = base(la, lb, e, e, y, labeled)
    r_agree = agree(la, lb, e, e, y, labeled)
    same = (la.argmax(1) == lb.argmax(1))[2:]
    _, ca = base.labels_for(y, labeled, lb)
    _, cb = base.labels_for(y, labeled, la)
    expect = ((ca[2:] & same).sum() + (cb[2:] & same).sum()) / 2  # the mean of both models' counts
    assert 0 < float(expect) < float(r_base.stats["pseudo_pixels"].sum())
    assert float(r_agree.stats["pseudo_pixels"].sum()) == pytest.approx(float(expect))
    # constant lambda after the warm-up (Fig. 5a), Eq. 1's Gaussian otherwise
    ramp = GaussianRampUp(total_steps=100, max_weight=0.5, warmup_steps=10, shape="constant")
    values = []
    for _ in range(100):
        values.append(ramp.value)
        ramp.step()
    assert values[:10] == [0.0] * 10 and values[10:] == [0.5] * 90
    with pytest.raises(ValueError, match="shape"):
        GaussianRampUp(total_steps=10, warmup_steps=0, shape="linear")
    # a coarser feature layer: the objective resizes the labels to it
    coarse = torch.randn(4, D, 4, 4, generator=g, requires_grad=True)
    res = DACLObjective(C, D, total_steps=10, warmup=0, pixel_stride=2, **SMALL)(la, lb, coarse, coarse, y, labeled)
    res.loss.backward()
    assert torch.isfinite(res.loss) and coarse.grad is not None
