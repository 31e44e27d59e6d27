"""SoftDensityContrastiveLoss end to end against the loop pipeline ``naive.NaiveDACL``.

Unlike the value checks of test_modules.py, every budget here is *below* the number of
candidates (anchors, batch positives, bank positives, and negatives in the spy test), so a
wrong selection (lowest instead of highest, the wrong class, a dropped temperature) changes
the result. Several steps run, so the bank fills (and, for prototypes, overflows) and its
positives are used. Every top-k cut is strict: ``NaiveDACL`` raises ``AmbiguousCut`` when two
different candidates nearly tie at a cut, and the seeds below were chosen so none does.

Randomness. The module draws its pixel subsample, its negatives and (with
``bank_source="pixel"``) the order of its pixel pushes at random. These tests *control* the
draws rather than replicate the generator: ``max_samples_per_class`` and
``bank_push_per_class`` are at or above every class's pixel count (the subsample is the whole
class), the pixel bank never overflows (the push order cannot matter), and
``num_negatives`` is at or above the number of other-class pixels (the negative set is all of
them), except in ``test_strict_negative_budget_*``, where the negatives the module drew are
observed through a spy on the functional core, checked to be ``num_negatives`` distinct
pixels of other classes, and handed to the reference.
"""

import pytest
import torch

import torch_dacl.functional as DF
from naive import NaiveDACL
from torch_dacl import SoftDensityContrastiveLoss

KS = (2, 4)
TAU = 0.3  # not the default 0.4: a module that ignores its temperature fails
BIG = 512  # sample / negative / push budgets above every count: those choices are deterministic


def make_batch(seed, n=2, hw=(6, 6), c=3, d=8, min_count=None):
    """Clustered embeddings with a per-pixel spread (so densities vary) and random labels."""
    g = torch.Generator().manual_seed(seed)
    means = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=-1) * 2.0
    labels = torch.randint(0, c, (n,) + hw, generator=g)
    spread = 0.3 + 2.0 * torch.rand((n, 1) + hw, generator=g)
    emb = means[labels].movedim(-1, 1) + spread * torch.randn((n, d) + hw, generator=g)
    if min_count is not None:
        counts = torch.bincount(labels.flatten(), minlength=c)
        assert counts.min() >= min_count, counts
    return emb, labels


def module_and_reference(c=3, d=8, num_anchors=3, num_positives=4, bank_size=3, **kw):
    common = dict(ks=KS, temperature=TAU, num_anchors=num_anchors, num_positives=num_positives, bank_size=bank_size)
    opts = {k: v for k, v in kw.items() if k in ("bank_source", "anchor_mode", "use_bank", "weighting", "gamma",
                                                  "include_positive", "reduction", "threshold")}
    module = SoftDensityContrastiveLoss(num_classes=c, dim=d, num_negatives=kw.get("num_negatives", BIG),
                                        max_samples_per_class=BIG, bank_push_per_class=BIG, **common, **opts)
    ref = NaiveDACL(num_classes=c, max_samples=BIG, bank_push_per_class=BIG, **common, **opts)
    return module, ref


def compare_step(module, ref, emb, labels, probs=None, negatives=None, grad=True):
    """One call of both; loss, contributing anchors and gradient must agree."""
    e1 = emb.clone().requires_grad_()
    e2 = emb.double().requires_grad_()
    out = module(e1, labels, probs=probs, return_details=True)
    want, k = ref(e2, labels, probs=probs, negatives=negatives(e1) if callable(negatives) else negatives)
    assert int(out.num_contributing) == k
    torch.testing.assert_close(out.loss.double(), want.detach(), atol=1e-4, rtol=1e-4)
    if grad:
        out.loss.backward()
        want.backward()
        assert e2.grad is not None
        torch.testing.assert_close(e1.grad.double(), e2.grad, atol=2e-5, rtol=1e-3)
    return out, k


def compare_banks(module, ref, ordered):
    for n in range(module.num_classes):
        feats, dens = module.bank.entries(n)
        want = list(ref.bank[n])
        assert feats.shape[0] == len(want)
        if not want:
            continue
        wf = torch.stack([v for v, _ in want])
        wd = torch.tensor([dv for _, dv in want], dtype=torch.float64)
        if not ordered:  # pixel pushes enter in random order: compare as sets (sorted by density)
            o1, o2 = dens.argsort(), wd.argsort()
            feats, dens, wf, wd = feats[o1], dens[o1], wf[o2], wd[o2]
        nf = torch.nn.functional.normalize
        torch.testing.assert_close(nf(feats.double(), dim=-1), nf(wf, dim=-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dens.double(), wd, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- pixel anchors
@pytest.mark.parametrize("opts", [
    dict(),
    dict(weighting="scale"),
    dict(weighting="none", include_positive=True),
    dict(reduction="sum", gamma=0.5),
])
def test_pixel_anchors_prototype_bank_match_reference(opts):
    """Q=3 of >= 8 pixels, H=2 batch and 2 bank positives of 3 bank slots that overflow."""
    module, ref = module_and_reference(**opts)
    for step in range(4):
        emb, labels = make_batch(100 + step, min_count=8)
        fill = [len(q) for q in ref.bank]
        compare_step(module, ref, emb, labels)
        compare_banks(module, ref, ordered=True)
        if step >= 2:
            assert min(fill) > ref.hb  # the bank held more entries than its positive budget
    assert all(len(q) == 3 for q in ref.bank)  # full, after 4 pushes of 2 prototypes


def test_pixel_anchors_pixel_bank_match_reference():
    """``bank_source="pixel"``: 3 bank positives out of a partially filled pixel bank."""
    module, ref = module_and_reference(num_anchors=4, num_positives=6, bank_size=120, bank_source="pixel")
    for step in range(3):
        emb, labels = make_batch(200 + step, min_count=8)
        compare_step(module, ref, emb, labels)
        compare_banks(module, ref, ordered=False)
    assert 0 < min(len(q) for q in ref.bank) and max(len(q) for q in ref.bank) < 120  # partially filled


def test_without_bank_match_reference():
    module, ref = module_and_reference(use_bank=False, weighting="scale")
    for step in range(2):
        compare_step(module, ref, *make_batch(300 + step, min_count=8))
    assert module.bank.is_empty()


# --------------------------------------------------------------------------- class-wise anchors
@pytest.mark.parametrize("with_probs", [False, True])
def test_class_anchors_match_reference(with_probs):
    """``anchor_mode="class"``: 2 of 4 per-image prototypes are anchors; bank of 5 overflows."""
    module, ref = module_and_reference(num_anchors=2, num_positives=4, bank_size=5, anchor_mode="class",
                                       threshold=0.4)
    for step in range(3):
        emb, labels = make_batch(400 + step, n=4, hw=(5, 5), min_count=8)
        probs = None
        if with_probs:  # soft maps whose masks differ from the labels
            g = torch.Generator().manual_seed(step)
            probs = torch.softmax(3 * torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float()
                                  + torch.randn((4, 3, 5, 5), generator=g), 1)
        compare_step(module, ref, emb, labels, probs=probs)
        compare_banks(module, ref, ordered=True)


# --------------------------------------------------------------------------- strict negatives
def _spy(monkeypatch):
    """Record the negatives the module hands to the functional core."""
    seen = {}
    real = DF.soft_density_contrastive_loss_grouped

    def spy(anchors, anchors_valid, centers, negatives, negatives_valid=None, **kw):
        seen["negatives"], seen["valid"] = negatives.detach().clone(), negatives_valid.clone()
        return real(anchors, anchors_valid, centers, negatives, negatives_valid, **kw)

    monkeypatch.setattr(DF, "soft_density_contrastive_loss_grouped", spy)
    return seen


@pytest.mark.parametrize("anchor_mode", ["pixel", "class"])
def test_strict_negative_budget_draws_other_classes_only(monkeypatch, anchor_mode):
    """num_negatives=5 of >= 16 other-class pixels: the drawn set is checked, then used."""
    seen = _spy(monkeypatch)
    module, ref = module_and_reference(num_negatives=5, anchor_mode=anchor_mode)
    for step in range(3):
        emb, labels = make_batch(500 + step, n=3, min_count=8)
        unit = torch.nn.functional.normalize(emb.movedim(1, -1).reshape(-1, emb.shape[1]), dim=-1)
        flat = labels.reshape(-1)

        def negatives(_):
            chosen = []
            for n in range(3):
                got = seen["negatives"][n][seen["valid"][n]]
                assert got.shape[0] == 5  # the full budget, fewer than the candidates
                dist = (got[:, None] - unit[None]).norm(dim=-1)  # which pixel is each negative?
                idx = dist.argmin(1)
                assert torch.all(dist.min(1).values < 1e-5)
                assert len(set(idx.tolist())) == 5  # without replacement
                assert torch.all(flat[idx] != n), "a negative of class n from class n"
                chosen.append([emb.movedim(1, -1).reshape(-1, emb.shape[1])[i].double() for i in idx.tolist()])
            return chosen

        # the spy fills `seen` during the module call, so the reference runs after it
        e1 = emb.clone().requires_grad_()
        out = module(e1, labels, return_details=True)
        want, k = ref(emb.double(), labels, negatives=negatives(None))
        assert int(out.num_contributing) == k > 0
        torch.testing.assert_close(out.loss.double(), want, atol=1e-4, rtol=1e-4)


def test_negative_draw_covers_all_other_class_pixels(monkeypatch):
    """Over repeated calls each other-class pixel is drawn (the draw is random, not fixed)."""
    seen = _spy(monkeypatch)
    torch.manual_seed(0)
    module = SoftDensityContrastiveLoss(num_classes=2, dim=4, ks=(2,), num_anchors=2, num_positives=2,
                                        num_negatives=3, use_bank=False)
    emb = torch.randn(1, 4, 3, 4)
    labels = torch.tensor([[0] * 6 + [1] * 6]).reshape(1, 3, 4)
    unit = torch.nn.functional.normalize(emb.movedim(1, -1).reshape(-1, 4), dim=-1)
    hits = torch.zeros(12)
    for _ in range(40):
        module(emb, labels)
        got = seen["negatives"][0][seen["valid"][0]]
        hits[(got[:, None] - unit[None]).norm(dim=-1).argmin(1)] += 1
    assert torch.all(hits[:6] == 0) and torch.all(hits[6:] > 0)


# --------------------------------------------------------------------------- small classes
def test_reference_splits_a_small_class_disjointly():
    """The reference's rule itself: S_n < Q + H gives q = min(Q, S_n // 2), h = min(H, S_n - q)."""
    ref = NaiveDACL(num_classes=2, ks=(1,), temperature=TAU, num_anchors=3, num_positives=4, bank_size=4,
                    max_samples=BIG, use_bank=False, weighting="none", reduction="sum")
    emb = torch.randn(1, 4, 1, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[[0, 0, 0, 1, 1, 1, 1, 1, 1]]])  # S_0 = 3, S_1 = 6 (Q + H = 5)
    _, k = ref(emb, labels)
    assert k == 1 + 3


@pytest.mark.parametrize("anchor_mode", ["pixel", "class"])
def test_small_classes_match_reference(anchor_mode):
    """Classes with 1, 3 and 4 pixels (< Q + H = 5): pixel anchors and positives split
    disjointly; class anchors are prototypes, so positives are the H densest pixels as usual."""
    module, ref = module_and_reference(num_anchors=3, num_positives=4, anchor_mode=anchor_mode)
    for step in range(3):
        emb, labels = make_batch(600 + step, n=2, hw=(4, 4), c=3)
        labels[labels == 2] = 0
        labels[0, 0, :3] = 2  # class 2: 3 pixels ...
        labels[1, 3, 3] = 2  # ... plus 1 in the other image
        labels[1, 0, :3] = 1
        labels[0, 3, :] = 1
        compare_step(module, ref, emb, labels)


def test_one_pixel_class_gives_no_anchor():
    module, ref = module_and_reference(num_anchors=3, num_positives=4, use_bank=False)
    emb, labels = make_batch(700, min_count=1)
    labels[labels == 2] = 1
    labels[0, 0, 0] = 2
    out, k = compare_step(module, ref, emb, labels)
    assert not out.anchor_valid[2].any()


# --------------------------------------------------------------------------- the reference bites
def test_reference_rejects_an_ambiguous_cut():
    """A near-tie between different vectors at a cut is an error, not a coin toss."""
    from naive import AmbiguousCut

    ref = NaiveDACL(num_classes=1, ks=(1,), temperature=TAU, num_anchors=1, num_positives=2, bank_size=4,
                    max_samples=BIG, use_bank=False)
    emb = torch.tensor([[[[1.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]]], dtype=torch.float64)  # symmetric: equal densities
    with pytest.raises(AmbiguousCut):
        ref(emb, torch.zeros(1, 1, 3, dtype=torch.long))


# --------------------------------------------------------------------------- targeted cases
@pytest.mark.parametrize("num_anchors, num_positives", [(3, 6), (1, 4), (2, 2)])
def test_small_class_split_when_positives_outnumber_what_is_left(num_anchors, num_positives):
    """Classes of 3, 4, 5 and 6 pixels, with H larger than S_n - q for some of them: the
    positives stop at S_n - q, never reaching into the anchors; overlap is 0 for every class."""
    module, ref = module_and_reference(c=4, num_anchors=num_anchors, num_positives=num_positives, use_bank=False)
    emb, _ = make_batch(800, n=1, hw=(3, 6), c=4)
    labels = torch.tensor([[0] * 3 + [1] * 4 + [2] * 5 + [3] * 6]).reshape(1, 3, 6)
    out, _ = compare_step(module, ref, emb, labels)
    assert out.overlap.shape == (4,) and torch.all(out.overlap == 0)
    h = max(1, num_positives // 2)
    for n, s_n in enumerate((3, 4, 5, 6)):
        q = num_anchors if s_n >= num_anchors + h else min(num_anchors, s_n // 2)
        assert int(out.anchor_valid[n].sum()) == q
        assert int(out.positive_valid[n].sum()) == (h if s_n >= num_anchors + h else min(h, s_n - q))


def test_class_anchors_skip_images_without_the_class():
    """Q=2 anchors among 4 images of which one lacks class 2: the missing prototype is never
    an anchor, the two lowest-density valid ones are."""
    module, ref = module_and_reference(num_anchors=2, num_positives=4, anchor_mode="class", use_bank=False)
    emb, labels = make_batch(900, n=4, hw=(5, 5), min_count=8)
    labels[1][labels[1] == 2] = 0  # image 1 has no pixel of class 2
    out, _ = compare_step(module, ref, emb, labels)
    assert out.anchor_valid.sum(1).tolist() == [2, 2, 2]


def test_probs_at_label_resolution_are_resized_like_labels():
    """probs (and labels) at twice the embeddings' resolution: nearest resizing gives the loss of
    the pre-resized inputs."""
    emb, labels = make_batch(950, n=2, hw=(4, 4), min_count=4)
    probs = torch.softmax(3 * torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float()
                          + torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(0)), 1)
    big_l = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)
    big_p = probs.repeat_interleave(2, 2).repeat_interleave(2, 3)
    losses = []
    for lab, pr in ((labels, probs), (big_l, big_p)):
        module, _ = module_and_reference(anchor_mode="class", num_anchors=2, num_positives=4, threshold=0.4)
        losses.append(module(emb, lab, probs=pr, return_details=True))
    torch.testing.assert_close(losses[0].loss, losses[1].loss)
    assert int(losses[0].num_contributing) == int(losses[1].num_contributing) > 0


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int16])
def test_integer_label_dtypes_give_the_long_result(dtype):
    emb, labels = make_batch(960, min_count=8)
    a, _ = module_and_reference()
    b, _ = module_and_reference()
    torch.testing.assert_close(a(emb, labels), b(emb, labels.to(dtype)))


def test_ignore_index_inside_the_class_range_is_ignored():
    """ignore_index=2 with 3 classes: pixels labelled 2 take no part, exactly as -100 would."""
    emb, labels = make_batch(970, min_count=8)
    a, _ = module_and_reference()
    b, _ = module_and_reference()
    b.ignore_index = 2
    out_a = a(emb, labels.masked_fill(labels == 2, -100), return_details=True)
    out_b = b(emb, labels, return_details=True)
    torch.testing.assert_close(out_a.loss, out_b.loss)
    assert not out_b.sample_valid[2].any()


@pytest.mark.parametrize("anchor_mode", ["pixel", "class"])
def test_ignore_index_inside_the_class_range_makes_no_prototype(anchor_mode):
    emb, labels = make_batch(970, min_count=8)
    a, _ = module_and_reference(anchor_mode=anchor_mode)
    b, _ = module_and_reference(anchor_mode=anchor_mode)
    b.ignore_index = 2
    for _ in range(2):
        la = a(emb, labels.masked_fill(labels == 2, -100))
        lb = b(emb, labels)
    torch.testing.assert_close(la, lb)
    assert int(b.bank.count[2]) == 0


@pytest.mark.parametrize("anchor_mode", ["pixel", "class"])
def test_random_sampling_does_not_pick_by_density(anchor_mode):
    """sampling="random" (ablation II): over repeated calls on one batch the anchors and batch
    positives vary and are not always the lowest / highest density ones."""
    torch.manual_seed(0)
    emb, labels = make_batch(980, n=4, min_count=8)
    module = SoftDensityContrastiveLoss(num_classes=3, dim=8, ks=KS, num_anchors=2, num_positives=4,
                                        num_negatives=BIG, max_samples_per_class=BIG, use_bank=False,
                                        sampling="random", anchor_mode=anchor_mode)
    density = SoftDensityContrastiveLoss(num_classes=3, dim=8, ks=KS, num_anchors=2, num_positives=4,
                                         num_negatives=BIG, max_samples_per_class=BIG, use_bank=False,
                                         anchor_mode=anchor_mode)
    ref = density(emb, labels, return_details=True)
    anchor_sets, pos_sets = set(), set()
    for _ in range(8):
        out = module(emb, labels, return_details=True)
        anchor_sets.add(tuple(sorted(out.anchor_density[out.anchor_valid].tolist())))
        pos_sets.add(tuple(sorted(out.positive_density[out.positive_valid].tolist())))
    assert len(anchor_sets) > 1 and len(pos_sets) > 1  # density sampling gives one set (next line)
    assert len({tuple(sorted(density(emb, labels, return_details=True).anchor_density[ref.anchor_valid].tolist()))
                for _ in range(3)}) == 1


def test_details_per_class_summaries_are_the_masked_means():
    module, ref = module_and_reference(num_anchors=3, num_positives=4, bank_size=3)
    for step in range(2):
        emb, labels = make_batch(990 + step, min_count=8)
        out = module(emb, labels, return_details=True)
    s = out.per_class()
    assert set(s) == {"sampled", "anchors", "anchor_density", "positives", "positive_density",
                      "anchor_center_cosine", "overlap", "bank_fill"}
    counts = torch.bincount(labels.flatten(), minlength=3).float()
    torch.testing.assert_close(s["sampled"], counts)
    torch.testing.assert_close(s["anchors"], torch.full((3,), 3.0))
    torch.testing.assert_close(s["positives"], torch.full((3,), 2.0))
    for c in range(3):
        torch.testing.assert_close(s["anchor_density"][c], out.anchor_density[c][out.anchor_valid[c]].mean())
        torch.testing.assert_close(s["positive_density"][c], out.positive_density[c][out.positive_valid[c]].mean())
        torch.testing.assert_close(s["anchor_center_cosine"][c],
                                   out.anchor_center_cosine[c][out.anchor_valid[c]].mean())
        assert s["anchor_density"][c] < s["positive_density"][c]  # anchors: low end, positives: high end
    torch.testing.assert_close(s["overlap"], torch.zeros(3))
    torch.testing.assert_close(s["bank_fill"], torch.full((3,), 3.0))  # 2 steps x 2 images, bank of 3
    assert all(v.shape == (3,) and v.dtype == torch.float32 for v in s.values())


def test_defaults_are_the_papers():
    m = SoftDensityContrastiveLoss(num_classes=2, dim=4)
    assert (m.temperature, m.num_anchors, m.num_positives, m.num_negatives, m.bank.size) == (0.4, 256, 512, 512, 1000)
    assert m.ks == (8, 16, 32) and m.weighting == "paper" and m.bank_source == "prototype"
    assert m.gather_distributed is False and m.update_bank_in_eval is False and m.include_positive is False
