"""Property-based tests (hypothesis) of the invariants the paper's math must keep."""

import io

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import torch_dacl.functional as DF
from naive import NaiveFifo, naive_knn_density, naive_sdcl, naive_sdcl_autograd
from torch_dacl import ClassMemoryBank, SoftDensityContrastiveLoss

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def labelled_points(draw, max_q=30, max_c=4, max_d=6):
    q = draw(st.integers(1, max_q))
    c = draw(st.integers(1, max_c))
    d = draw(st.integers(1, max_d))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(q, d, generator=g)
    if draw(st.booleans()):  # exact duplicates: ties in the kNN ranking
        feats[q // 2:] = feats[: q - q // 2].clone()
    labels = torch.randint(0, c, (q,), generator=g)
    return feats, labels, c, seed


@SETTINGS
@given(
    pushes=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 2**16)), min_size=1, max_size=8),
    size=st.integers(1, 6),
)
def test_bank_fifo_keeps_last_size_per_class_in_order(pushes, size):
    c, d = 3, 2
    bank = ClassMemoryBank(c, d, size)
    ref = NaiveFifo(c, size)
    counter = 0
    for m, seed in pushes:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(-1, c + 1, (m,), generator=g)  # includes out-of-range labels
        valid = torch.rand(m, generator=g) > 0.2
        feats = torch.arange(counter, counter + m, dtype=torch.float32).unsqueeze(1).repeat(1, d)
        dens = torch.rand(m, generator=g)
        counter += m
        bank.push(feats, labels, dens, valid)
        ref.push(feats, labels, dens, valid)
    for k in range(c):
        f, dd = bank.entries(k)
        expect = list(ref.q[k])
        assert f.shape[0] == len(expect) == int(bank.count[k])
        assert [float(x[0]) for x in f] == [float(e[0][0]) for e in expect]
        assert torch.allclose(dd, torch.tensor([e[1] for e in expect]).reshape(-1))
        assert int(bank.valid[k].sum()) == len(expect)


@SETTINGS
@given(data=labelled_points(), ks=st.lists(st.integers(1, 10), min_size=1, max_size=3), with_bank=st.booleans())
def test_density_range_order_and_scale_invariance(data, ks, with_bank):
    feats, labels, c, seed = data
    g = torch.Generator().manual_seed(seed + 1)
    bank = torch.randn(c, 4, feats.shape[1], generator=g) if with_bank else None
    dens = DF.knn_density(feats, labels, ks, bank)
    assert torch.all(dens >= -1 - 1e-5) and torch.all(dens <= 1 + 1e-5)
    perm = torch.randperm(feats.shape[0], generator=g)
    dens_p = DF.knn_density(feats[perm], labels[perm], ks, bank)
    torch.testing.assert_close(dens_p, dens[perm], atol=1e-5, rtol=0)
    scale = torch.rand(feats.shape[0], 1, generator=g) * 10 + 0.1
    dens_s = DF.knn_density(feats * scale, labels, ks, bank)
    torch.testing.assert_close(dens_s, dens, atol=1e-5, rtol=0)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), three_d=st.booleans(), threshold=st.floats(0.0, 0.9))
def test_pooling_is_invariant_to_pixel_permutation(seed, three_d, threshold):
    g = torch.Generator().manual_seed(seed)
    spatial = (3, 4, 2) if three_d else (4, 5)
    feats = torch.randn((2, 3) + spatial, generator=g)
    probs = torch.softmax(torch.randn((2, 4) + spatial, generator=g), 1)
    protos, valid = DF.masked_average_pool(feats, probs, threshold)
    perm = torch.randperm(int(torch.tensor(spatial).prod()), generator=g)
    fp = feats.reshape(2, 3, -1)[..., perm].reshape(feats.shape)
    pp = probs.reshape(2, 4, -1)[..., perm].reshape(probs.shape)
    protos_p, valid_p = DF.masked_average_pool(fp, pp, threshold)
    assert torch.equal(valid, valid_p)
    torch.testing.assert_close(protos_p, protos, atol=1e-5, rtol=1e-5)


def _small_loss(c, d, **kw):
    base = dict(num_classes=c, dim=d, ks=(2, 4), num_anchors=8, num_positives=8, num_negatives=8,
                bank_size=16, max_samples_per_class=32)
    base.update(kw)
    return SoftDensityContrastiveLoss(**base)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    c=st.integers(1, 4),
    three_d=st.booleans(),
    weighting=st.sampled_from(["paper", "scale", "none"]),
    bank_source=st.sampled_from(["prototype", "pixel"]),
    anchor_mode=st.sampled_from(["pixel", "class"]),
    ignored=st.floats(0.0, 1.0),
    dtype=st.sampled_from([None, torch.bfloat16, torch.float16]),
)
def test_loss_and_gradient_are_finite(seed, c, three_d, weighting, bank_source, anchor_mode, ignored, dtype):
    g = torch.Generator().manual_seed(seed)
    spatial = (2, 4, 4) if three_d else (6, 5)
    d = 8
    loss_fn = _small_loss(c, d, weighting=weighting, bank_source=bank_source, anchor_mode=anchor_mode)
    for _ in range(3):  # the bank fills up across calls
        emb = (torch.randn((2, d) + spatial, generator=g) * 5).requires_grad_()
        labels = torch.randint(0, c, (2,) + spatial, generator=g)
        labels[torch.rand(labels.shape, generator=g) < ignored] = -100
        if dtype is None:
            loss = loss_fn(emb, labels)
        else:
            with torch.autocast("cpu", dtype=dtype):
                x = emb * 1.0  # an op under autocast: the loss sees a low-precision graph
                loss = loss_fn(x.to(dtype), labels)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert emb.grad is not None and torch.isfinite(emb.grad).all()


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), bank_source=st.sampled_from(["prototype", "pixel"]))
def test_state_dict_round_trip_is_exact(seed, bank_source):
    torch.manual_seed(seed)
    loss_a = _small_loss(3, 4, bank_source=bank_source)
    for _ in range(3):
        loss_a(torch.randn(2, 4, 5, 5), torch.randint(0, 3, (2, 5, 5)))
    buf = io.BytesIO()
    torch.save(loss_a.state_dict(), buf)
    buf.seek(0)
    loss_b = _small_loss(3, 4, bank_source=bank_source)
    loss_b.load_state_dict(torch.load(buf))
    for k, v in loss_a.state_dict().items():
        assert torch.equal(v, loss_b.state_dict()[k]), k
    # resumed training continues identically
    emb, lab = torch.randn(2, 4, 5, 5), torch.randint(0, 3, (2, 5, 5))
    torch.manual_seed(seed + 1)
    la = loss_a(emb, lab)
    torch.manual_seed(seed + 1)
    lb = loss_b(emb, lab)
    assert torch.equal(la, lb)
    assert all(torch.equal(v, loss_b.state_dict()[k]) for k, v in loss_a.state_dict().items())


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), weighting=st.sampled_from(["paper", "scale", "none"]),
       bank_source=st.sampled_from(["prototype", "pixel"]), anchor_mode=st.sampled_from(["pixel", "class"]))
def test_loss_is_invariant_to_an_added_ignored_pixel(seed, weighting, bank_source, anchor_mode):
    """With budgets that take every pixel, the loss is a function of the labelled pixels only.

    (The bank holds every pushed vector, so the random push order does not matter.)
    """
    g = torch.Generator().manual_seed(seed)
    c, d = 3, 4
    kw = dict(num_classes=c, dim=d, ks=(2, 3), num_anchors=64, num_positives=128, num_negatives=128,
              bank_size=64, max_samples_per_class=64, weighting=weighting, bank_source=bank_source,
              anchor_mode=anchor_mode)
    loss_a, loss_b = SoftDensityContrastiveLoss(**kw), SoftDensityContrastiveLoss(**kw)
    for _ in range(2):
        emb = torch.randn(2, d, 4, 4, generator=g)
        lab = torch.randint(0, c, (2, 4, 4), generator=g)
        emb_x = torch.cat([emb, torch.randn(2, d, 4, 1, generator=g)], dim=3)  # one more column ...
        lab_x = torch.cat([lab, torch.full((2, 4, 1), -100)], dim=2)  # ... that is ignored
        la, lb = loss_a(emb, lab), loss_b(emb_x, lab_x)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_a.bank.count, loss_b.bank.count)


# --------------------------------------------------------------------------- comparisons with the naive references
# These compare values (not only invariances) over random shapes, budgets, bank fill and
# ignore masks; the strategies reach a class with one member, exact ties (duplicated
# vectors), a partially filled bank and batches whose every pixel is ignored.
COMPARE = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.filter_too_much])


@COMPARE
@given(data=labelled_points(), ks=st.lists(st.integers(1, 8), min_size=1, max_size=3),
       bank_len=st.integers(0, 5), fill=st.lists(st.integers(0, 5), min_size=4, max_size=4),
       lone=st.booleans())
def test_density_matches_naive_reference(data, ks, bank_len, fill, lone):
    feats, labels, c, seed = data
    if lone:  # the last query forms a class of its own: its only neighbours are bank entries
        labels = labels.clone()
        labels[labels == c - 1] = 0
        labels[-1] = c - 1
    g = torch.Generator().manual_seed(seed + 2)
    bank = bank_valid = None
    if bank_len:
        bank = torch.randn(c, bank_len, feats.shape[1], generator=g)
        bank_valid = torch.arange(bank_len).unsqueeze(0) < torch.tensor(fill[:c]).unsqueeze(1)  # partial fill
    dens = DF.knn_density(feats, labels, ks, bank, bank_valid)
    ref = naive_knn_density(feats, labels, ks, bank, bank_valid)
    torch.testing.assert_close(dens.double(), ref, atol=1e-5, rtol=1e-5)


@COMPARE
@given(seed=st.integers(0, 2**31 - 1), a=st.integers(0, 12), c=st.integers(1, 4), p=st.integers(1, 6),
       d=st.integers(1, 5), p_valid=st.floats(0.0, 1.0), weighting=st.sampled_from(["paper", "scale", "none"]),
       gamma=st.sampled_from([None, 0.5, 2.0]), include_positive=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), tau=st.floats(0.1, 1.0), dup=st.booleans())
def test_sdcl_matches_naive_reference(seed, a, c, p, d, p_valid, weighting, gamma, include_positive, reduction,
                                      tau, dup):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(a, d, generator=g, dtype=torch.float64)
    if dup and a > 1:
        anchors[1:] = anchors[0]  # ties: identical anchors
    labels = torch.randint(0, c, (a,), generator=g)
    centers = torch.randn(c, d, generator=g, dtype=torch.float64)
    negatives = torch.randn(c, p, d, generator=g, dtype=torch.float64)
    neg_valid = torch.rand(c, p, generator=g) < p_valid  # partially valid, sometimes none
    kw = dict(temperature=tau, weighting=weighting, gamma=gamma, include_positive=include_positive)
    a1 = anchors.clone().requires_grad_()
    loss = DF.soft_density_contrastive_loss(a1, labels, centers, negatives, neg_valid, reduction=reduction, **kw)
    ref = naive_sdcl(anchors, labels, centers, negatives, neg_valid, reduction=reduction, **kw)
    torch.testing.assert_close(loss.double(), ref, atol=1e-4, rtol=1e-5)
    if reduction != "none":
        loss.backward()
        a2 = anchors.clone().requires_grad_()
        ref2, _ = naive_sdcl_autograd(a2, labels, centers, negatives, neg_valid, reduction=reduction, **kw)
        ref2.backward()
        if a2.grad is None:  # nothing contributes: the reference never touched the anchors
            assert a1.grad is None or torch.all(a1.grad == 0)
        else:
            torch.testing.assert_close(a1.grad, a2.grad, atol=1e-5, rtol=1e-4)


@st.composite
def dacl_runs(draw, small_classes):
    """A module configuration and a few batches for SoftDensityContrastiveLoss vs NaiveDACL.

    ``small_classes=False`` keeps, in pixel mode, every class at 0 or at least Q + H pixels
    (the regime where anchors and batch positives are the Q lowest and H highest);
    ``True`` forces classes below it, down to one pixel (the disjoint split).
    """
    anchor_mode = "pixel" if small_classes else draw(st.sampled_from(["pixel", "class"]))
    c = draw(st.integers(1, 3))
    n = draw(st.integers(1, 3))
    hw = (draw(st.integers(2, 4)), draw(st.integers(2, 5)))
    d = draw(st.integers(3, 6))
    q = draw(st.integers(1, 4))
    pos = draw(st.integers(2, 6))
    steps = draw(st.integers(2, 3))
    bank_source = draw(st.sampled_from(["prototype", "pixel"]))
    cfg = dict(num_classes=c, dim=d, ks=tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=2))),
               temperature=draw(st.sampled_from([0.2, 0.3, 0.7])), num_anchors=q, num_positives=pos,
               bank_source=bank_source, anchor_mode=anchor_mode, use_bank=draw(st.booleans()),
               weighting=draw(st.sampled_from(["paper", "scale", "none"])),
               include_positive=draw(st.booleans()), reduction=draw(st.sampled_from(["mean", "sum"])),
               # the pixel bank is never overflowed (its push order is random); prototypes may be
               bank_size=n * hw[0] * hw[1] * steps if bank_source == "pixel" else draw(st.integers(1, 6)))
    h = max(1, pos // 2)
    batches = []
    for _ in range(steps):
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, c, (n,) + hw, generator=g)
        ignored = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
        labels[torch.rand(labels.shape, generator=g) < ignored] = -100
        emb = torch.randn((n, d) + hw, generator=g) * (0.5 + torch.rand((n, 1) + hw, generator=g))
        emb = emb + torch.randn(c, d, generator=g)[labels.clamp_min(0)].movedim(-1, 1)
        if draw(st.booleans()):  # exact duplicates: tied densities
            flat = emb.movedim(1, -1).reshape(-1, d)
            flat[1::3] = flat[0::3][: flat[1::3].shape[0]]
            emb = flat.reshape((n,) + hw + (d,)).movedim(-1, 1).contiguous()
        if small_classes or (anchor_mode == "class" and draw(st.booleans())):
            # one class keeps a single pixel (the others a few)
            k = draw(st.integers(0, c - 1))
            members = (labels == k).reshape(-1).nonzero().flatten()
            if members.numel() > 1:
                labels.reshape(-1)[members[1:]] = -100 if c == 1 else (k + 1) % c
        if anchor_mode == "pixel" and not small_classes:
            counts = torch.bincount(labels[labels >= 0], minlength=c)
            for k in range(c):
                if 0 < counts[k] < q + h:
                    labels[labels == k] = -100
        batches.append((emb, labels))
    return cfg, batches


def _compare_runs(cfg, batches):
    from naive import AmbiguousCut, NaiveDACL

    from hypothesis import assume

    module = SoftDensityContrastiveLoss(max_samples_per_class=512, num_negatives=512, bank_push_per_class=512,
                                        **cfg)
    ref_kw = {k: v for k, v in cfg.items() if k != "dim"}
    ref = NaiveDACL(max_samples=512, bank_push_per_class=512, **ref_kw)
    for emb, labels in batches:
        e1, e2 = emb.clone().requires_grad_(), emb.double().requires_grad_()
        out = module(e1, labels, return_details=True)
        try:
            want, k = ref(e2, labels)
        except AmbiguousCut:
            assume(False)  # two different candidates nearly tie at a cut: no unique answer
        counts = torch.bincount(labels[labels >= 0], minlength=cfg["num_classes"])
        for name, hit in (("one-pixel class", bool((counts == 1).any())), ("all ignored", bool((labels < 0).all())),
                          ("tie at a cut", ref.tie_at_cut), ("contributing anchors", k > 0),
                          ("bank positives used", cfg["use_bank"] and any(len(b) > 0 for b in ref.bank)),
                          ("bank partially filled", cfg["use_bank"] and any(0 < len(b) < cfg["bank_size"]
                                                                            for b in ref.bank))):
            if hit:
                event(name)
        assert int(out.num_contributing) == k
        torch.testing.assert_close(out.loss.double(), want.detach(), atol=1e-4, rtol=1e-4)
        out.loss.backward()
        if not ref.tie_at_cut and want.requires_grad:  # a tie between copies may move the gradient
            want.backward()
            torch.testing.assert_close(e1.grad.double(), e2.grad, atol=2e-5, rtol=1e-3)
        if (labels < 0).all():
            assert out.loss.item() == 0.0 and torch.all(e1.grad == 0)


@COMPARE
@given(run=dacl_runs(small_classes=False))
def test_module_matches_naive_pipeline(run):
    _compare_runs(*run)


@settings(COMPARE, max_examples=20)
@given(run=dacl_runs(small_classes=True))
def test_module_matches_naive_pipeline_with_small_classes(run):
    _compare_runs(*run)
