"""Each stage of SoftDensityContrastiveLoss alone, the vocabulary of options, Table 2's rows,
and the loss's random stream (seeded once, saved in its state_dict)."""

import ast
import inspect
import io
import itertools
import textwrap

import pytest
import torch
import torch.nn.functional as F

import torch_dacl.functional as DF
from torch_dacl import ClassMemoryBank, MaskedAveragePool, MultiScaleDensity, SoftDensityContrastiveLoss
from torch_dacl.ablation import TABLE2, TABLE2_ROWS, table2_options
from torch_dacl.options import REDUCTIONS, look_up_option
from torch_dacl.stages import (AnchorKeyMiner, BankPolicy, Memory, PixelSampler, RandomStream, Sample,
                               SoftContrastiveTerm, count_shared, masked_mean, one_hot_maps, select_top,
                               split_by_rank)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def sample_of(feats, valid, protos=None, pvalid=None):
    return Sample(feats, valid, F.normalize(feats.detach().float(), dim=-1), protos, pvalid)


# --------------------------------------------------------------------------- helpers
def test_split_by_rank_is_disjoint_and_takes_the_two_ends():
    key = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4]])
    valid = torch.ones(1, 8, dtype=torch.bool)
    lo, lo_ok, hi, hi_ok = split_by_rank(key, valid, 2, 3)  # enough: exactly Q lowest and H highest
    assert lo[lo_ok].tolist() == [1, 5] and hi[hi_ok].tolist() == [2, 6, 4]
    for n in range(0, 9):  # n valid entries, Q = 3, H = 4: q = min(3, n // 2), h = min(4, n - q)
        v = torch.arange(8).unsqueeze(0) < n
        lo, lo_ok, hi, hi_ok = split_by_rank(key, v, 3, 4)
        q = 3 if n >= 7 else min(3, n // 2)
        h = 4 if n >= 7 else min(4, n - q)
        assert int(lo_ok.sum()) == q and int(hi_ok.sum()) == h
        assert not set(lo[lo_ok].tolist()) & set(hi[hi_ok].tolist())
        assert all(i < n for i in lo[lo_ok].tolist() + hi[hi_ok].tolist())  # only valid entries


def test_select_top_masks_invalid_and_masked_mean_and_count_shared():
    score = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    valid = torch.tensor([[False, True, True, True]])
    idx, ok = select_top(score, valid, 2, largest=True)
    assert idx.tolist() == [[2, 1]] and ok.all()
    idx, ok = select_top(score, valid, 5, largest=False)  # k clipped to S; the invalid one last
    assert idx.shape == (1, 4) and ok.tolist() == [[True, True, True, False]]
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]], [[0.0, 0.0]] * 3])
    mean, any_valid = masked_mean(x, torch.tensor([[True, True, False], [False] * 3]))
    assert mean.tolist() == [[2.0, 1.0], [0.0, 0.0]] and any_valid.tolist() == [True, False]
    a, b = torch.tensor([[0, 1, 2]]), torch.tensor([[2, 3, 1]])
    assert count_shared(a, torch.tensor([[True, True, True]]), b, torch.tensor([[True, True, False]]), 4).tolist() == [1]


def test_one_hot_maps_leave_ignored_pixels_empty():
    maps = one_hot_maps(torch.tensor([[[0, 2], [-100, 1]]]), 3)
    assert maps.shape == (1, 3, 2, 2) and maps.dtype == torch.float32
    assert maps.sum(1).tolist() == [[[1.0, 1.0], [0.0, 1.0]]]
    assert one_hot_maps(torch.tensor([[[0, 2], [-100, 1]]]), 3, ignore_index=2).sum(1).tolist() == [[[1.0, 0.0],
                                                                                                  [0.0, 1.0]]]


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 2, 3, 4)])
@pytest.mark.parametrize("ignore_index", [None, 1, -100])
def test_one_hot_maps_match_a_pixel_loop(shape, ignore_index):
    labels = torch.randint(-1, 5, shape, generator=gen(3))  # -1 and 4 lie outside [0, 4)
    labels[0].view(-1)[0] = -100
    maps = one_hot_maps(labels, 4, ignore_index=ignore_index)
    want = torch.zeros((shape[0], 4) + shape[1:])
    for n in range(shape[0]):
        for pos in itertools.product(*(range(s) for s in shape[1:])):
            lab = int(labels[(n,) + pos])
            if 0 <= lab < 4 and lab != ignore_index:
                want[(n, lab) + pos] = 1.0
    assert maps.dtype == torch.float32 and torch.equal(maps, want)


# --------------------------------------------------------------------------- 1. PixelSampler
def test_sampler_budget_ignore_index_and_gradient():
    g = gen(0)
    emb = torch.randn(2, 4, 3, 5, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 3, 5), generator=g)
    labels[0, 0] = -100
    counts = torch.bincount(labels[labels >= 0], minlength=3)
    s = PixelSampler(3, max_per_class=4)(emb, labels, generator=gen(1))
    assert s.features.shape == (3, 4, 4) and s.unit.shape == (3, 4, 4)
    assert s.valid.sum(1).tolist() == counts.clamp(max=4).tolist()
    flat_emb, flat_lab = emb.detach().movedim(1, -1).reshape(-1, 4), labels.reshape(-1)
    for c in range(3):  # every sampled vector is a pixel of its class, each at most once
        got = s.features[c][s.valid[c]].detach()
        match = (got[:, None] - flat_emb[None]).abs().sum(-1).argmin(1)
        assert torch.all(flat_lab[match] == c) and len(set(match.tolist())) == got.shape[0]
    torch.testing.assert_close(s.unit.norm(dim=-1)[s.valid], torch.ones(int(s.valid.sum())))
    (s.features * s.valid.unsqueeze(-1)).sum().backward()
    assert int((emb.grad.abs().sum(1) > 0).sum()) == int(s.valid.sum())  # only the sampled pixels


def test_sampler_follows_its_generator_and_layout_does_not_matter():
    emb = torch.randn(1, 4, 6, 6, generator=gen(2))
    labels = torch.randint(0, 2, (1, 6, 6), generator=gen(3))
    sampler = PixelSampler(2, max_per_class=5)
    a = sampler(emb, labels, generator=gen(7))
    torch.manual_seed(99)  # the global stream does not matter when a generator is passed
    b = sampler(emb, labels, generator=gen(7))
    c = sampler(emb.contiguous(memory_format=torch.channels_last), labels, generator=gen(7))
    assert torch.equal(a.features, b.features) and torch.equal(a.features, c.features)
    draws = {tuple(sampler(emb, labels, generator=gen(s)).features[0, :, 0].tolist()) for s in range(6)}
    assert len(draws) > 1


def test_sampler_carries_prototypes_class_major():
    emb = torch.randn(2, 4, 3, 3, generator=gen(4))
    labels = torch.randint(0, 3, (2, 3, 3), generator=gen(5))
    protos, pvalid = MaskedAveragePool(0.5)(emb, one_hot_maps(labels, 3))
    s = PixelSampler(3, 8)(emb, labels, protos, pvalid, generator=gen(0))
    assert torch.equal(s.prototypes, protos.transpose(0, 1)) and torch.equal(s.prototypes_valid, pvalid.t())
    assert not PixelSampler(3, 8, gather_distributed=True).distributed  # no process group: no gather


# --------------------------------------------------------------------------- 2. density
def test_density_stage_grouped_is_the_functional_core():
    x = torch.randn(3, 6, 4, generator=gen(6))
    valid = torch.rand(3, 6, generator=gen(7)) > 0.3
    bank, bvalid = torch.randn(3, 5, 4, generator=gen(8)), torch.rand(3, 5, generator=gen(9)) > 0.5
    dens = MultiScaleDensity((2, 3)).grouped(x, valid, bank, bvalid)
    assert torch.equal(dens, DF.knn_density_grouped(x, valid, (2, 3), bank, bvalid))
    assert torch.all(dens[~valid] == -1)


# --------------------------------------------------------------------------- 3-5. miner
def _class_sample(c=2, s=8, d=4, seed=10):
    feats = torch.randn(c, s, d, generator=gen(seed))
    return sample_of(feats, torch.ones(c, s, dtype=torch.bool))


def test_miner_density_anchors_lowest_positives_highest():
    batch = _class_sample()
    density = torch.rand(2, 8, generator=gen(11))
    mined = AnchorKeyMiner(num_anchors=2, num_positives=6, num_negatives=5)(batch, density)
    for c in range(2):
        order = density[c].argsort()
        assert set(mined.anchor_density[c].tolist()) == set(density[c, order[:2]].tolist())
        assert set(mined.positive_density[c].tolist()) == set(density[c, order[-3:]].tolist())
        torch.testing.assert_close(mined.centers[c], batch.unit[c, order[-3:]].mean(0))
    assert mined.overlap.tolist() == [0, 0] and mined.centers_valid.all()


def test_miner_bank_positives_have_the_highest_stored_density():
    batch = _class_sample()
    bank = torch.randn(2, 5, 4, generator=gen(12))
    bank_density = torch.tensor([[0.1, 0.9, 0.5, 0.8, 0.2], [0.3, 0.2, 0.1, 0.0, 0.7]])
    valid = torch.tensor([[True, False, True, True, True], [True] * 5])
    miner = AnchorKeyMiner(num_anchors=2, num_positives=4, num_negatives=5)
    density = torch.rand(2, 8, generator=gen(13))
    mined = miner(batch, density, memory=Memory(bank, valid, bank_density))
    for c, picks in ((0, [3, 2]), (1, [4, 0])):  # slot 1 of class 0 is empty though its density is highest
        top = batch.unit[c, density[c].argsort()[-2:]]
        want = torch.cat([top, F.normalize(bank[c, picks], dim=-1)]).mean(0)
        torch.testing.assert_close(mined.centers[c], want)


def test_miner_negatives_are_other_classes_without_replacement():
    batch = _class_sample(c=3, s=4)
    miner = AnchorKeyMiner(num_anchors=1, num_positives=2, num_negatives=5)
    neg, ok = miner.negatives(batch.unit, batch.valid, gen(0))
    assert neg.shape == (3, 5, 4) and ok.all()
    for c in range(3):
        src = (neg[c][:, None, None] - batch.unit[None]).abs().sum(-1).flatten(1).argmin(1)
        assert len(set(src.tolist())) == 5 and torch.all(src // 4 != c)


def test_miner_random_ranking_follows_the_generator():
    batch = _class_sample(s=12)
    density = torch.rand(2, 12, generator=gen(14))
    miner = AnchorKeyMiner(num_anchors=2, num_positives=4, num_negatives=3, sampling="random")
    a, b = miner(batch, density, generator=gen(1)), miner(batch, density, generator=gen(1))
    assert torch.equal(a.anchors, b.anchors) and torch.equal(a.negatives, b.negatives)
    draws = {tuple(miner(batch, density, generator=gen(s)).anchor_density[0].tolist()) for s in range(8)}
    assert len(draws) > 1


def test_miner_class_anchors_are_prototypes_by_their_density():
    batch = _class_sample()
    protos = torch.randn(2, 3, 4, generator=gen(15), requires_grad=True)
    pvalid = torch.tensor([[True, True, True], [True, False, True]])
    batch = batch._replace(prototypes=protos, prototypes_valid=pvalid)
    pdens = torch.tensor([[0.5, 0.1, 0.3], [0.0, -1.0, 0.4]])
    mined = AnchorKeyMiner(num_anchors=2, num_positives=4, num_negatives=3, anchor_mode="class")(
        batch, torch.rand(2, 8, generator=gen(16)), pdens)
    assert mined.anchor_density.tolist() == [[pytest.approx(0.1), pytest.approx(0.3)], [0.0, pytest.approx(0.4)]]
    assert torch.equal(mined.anchors[0, 0], protos[0, 1]) and mined.anchors.requires_grad


# --------------------------------------------------------------------------- 6. term
def test_term_is_the_functional_core_and_reduces_like_it():
    g = gen(17)
    args = (torch.randn(2, 3, 4, generator=g), torch.tensor([[True, True, False], [True] * 3]),
            torch.randn(2, 4, generator=g), torch.randn(2, 5, 4, generator=g))
    terms, contributing = DF.soft_density_contrastive_loss_grouped(*args, temperature=0.3, weighting="scale")
    for reduction in REDUCTIONS:
        loss, got = SoftContrastiveTerm(0.3, "scale", reduction=reduction)(*args)
        assert torch.equal(got, contributing)
        torch.testing.assert_close(loss, DF.reduce_terms(terms, contributing, reduction))
    assert SoftContrastiveTerm(reduction="none")(*args)[0].shape == (2, 3)


def test_term_weighting_is_pluggable():
    g = gen(18)
    args = (torch.randn(2, 3, 4, generator=g), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 4, generator=g),
            torch.randn(2, 5, 4, generator=g))
    paper, _ = SoftContrastiveTerm(weighting="paper")(*args)
    same, _ = SoftContrastiveTerm(weighting=lambda log_w, log_ratio: -(log_w + log_ratio))(*args)
    torch.testing.assert_close(paper, same)
    none, _ = SoftContrastiveTerm(weighting="none")(*args)
    torch.testing.assert_close(SoftContrastiveTerm(weighting=lambda log_w, log_ratio: -log_ratio)(*args)[0], none)


# --------------------------------------------------------------------------- 7. bank policy
def test_bank_policy_prototypes_pixels_eval_and_off():
    c, s, d = 2, 5, 3
    feats = torch.randn(c, s, d, generator=gen(19))
    valid = torch.tensor([[True] * 5, [True, True, False, False, False]])
    protos, pvalid = torch.randn(c, 2, d, generator=gen(20)), torch.tensor([[True, False], [True, True]])
    batch = sample_of(feats, valid, protos, pvalid)
    dens, pdens = torch.rand(c, s, generator=gen(21)), torch.rand(c, 2, generator=gen(22))

    bank = ClassMemoryBank(c, d, size=8)
    BankPolicy("prototype").update(bank, batch, dens, pdens, training=True)
    assert bank.count.tolist() == [1, 2]
    f, dd = bank.entries(1)
    torch.testing.assert_close(f, protos[1])
    torch.testing.assert_close(dd, pdens[1])

    bank = ClassMemoryBank(c, d, size=8)
    BankPolicy("pixel", push_per_class=3).update(bank, batch, dens, training=True, generator=gen(0))
    assert bank.count.tolist() == [3, 2]  # class 1 has only two valid pixels
    f, dd = bank.entries(0)
    for v, dv in zip(f, dd):  # each pushed entry is a sampled pixel (unit vector) with its density
        i = int((batch.unit[0] - v).abs().sum(-1).argmin())
        torch.testing.assert_close(batch.unit[0, i], v)
        torch.testing.assert_close(dens[0, i], dv)

    bank = ClassMemoryBank(c, d, size=8)
    BankPolicy("prototype").update(bank, batch, dens, pdens, training=False)
    assert bank.is_empty()  # eval(): no push ...
    BankPolicy("prototype", update_in_eval=True).update(bank, batch, dens, pdens, training=False)
    assert not bank.is_empty()  # ... unless asked
    off = BankPolicy(enabled=False)
    assert off.memory(bank) is None and not off.stores_prototypes
    before = bank.count.clone()
    off.update(bank, batch, dens, pdens, training=True)
    assert torch.equal(bank.count, before)


# --------------------------------------------------------------------------- random stream and resume
def test_random_stream_is_a_function_of_seed_and_call():
    a, b = RandomStream(seed=3), RandomStream(seed=3)
    draws = [torch.rand(4, generator=a.next("cpu")[0]) for _ in range(3)]
    assert len({tuple(x.tolist()) for x in draws}) == 3  # calls differ
    b.load_state(a.state())
    a_next, b_next = torch.rand(4, generator=a.next("cpu")[0]), torch.rand(4, generator=b.next("cpu")[0])
    assert torch.equal(a_next, b_next) and a.state().tolist() == [3, 4]
    torch.manual_seed(5)
    c = RandomStream()
    assert c.state().tolist() == [-1, 0]
    c.next("cpu")
    torch.manual_seed(5)
    d = RandomStream()
    d.next("cpu")
    assert c.seed == d.seed  # drawn once from the global stream at the first call
    shared, local = RandomStream(seed=1).next("cpu")
    assert shared is local  # one process: one stream
    with pytest.raises(ValueError, match="seed: expected an int >= 0"):
        RandomStream(seed=True)


def _steps(loss_fn, n, start=0):
    out = []
    for step in range(start, start + n):
        g = gen(100 + step)
        emb = torch.randn(2, 6, 5, 5, generator=g, requires_grad=True)
        labels = torch.randint(0, 3, (2, 5, 5), generator=g)
        loss = loss_fn(emb, labels)
        loss.backward()
        out.append((loss.detach(), emb.grad))
    return out


@pytest.mark.parametrize("opts", [dict(), dict(bank_source="pixel", bank_push_per_class=3),
                                  dict(sampling="random", anchor_mode="class")])
def test_restored_loss_continues_its_random_stream_exactly(opts):
    """Two steps, save, restore into a fresh loss: its third step equals the uninterrupted run's,
    with budgets below the candidates (every random draw matters) and the global stream moved."""
    kw = dict(num_classes=3, dim=6, ks=(2, 3), num_anchors=3, num_positives=4, num_negatives=4, bank_size=5,
              max_samples_per_class=6, **opts)
    torch.manual_seed(0)
    run = SoftDensityContrastiveLoss(**kw)
    _steps(run, 2)
    buf = io.BytesIO()
    torch.save(run.state_dict(), buf)
    want = _steps(run, 1, start=2)[0]
    buf.seek(0)
    torch.manual_seed(12345)  # a different global stream: the loss must not depend on it
    fresh = SoftDensityContrastiveLoss(**kw)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    got = _steps(fresh, 1, start=2)[0]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for k, v in run.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    other = SoftDensityContrastiveLoss(**kw)  # without the saved stream the draws differ
    other.load_state_dict({k: v for k, v in run.state_dict().items() if k != "_extra_state"})
    assert not torch.equal(_steps(other, 1, start=3)[0][0], _steps(fresh, 1, start=3)[0][0])


def test_seed_argument_fixes_the_stream_and_old_checkpoints_load():
    a, b = SoftDensityContrastiveLoss(3, 6, ks=(2,), num_anchors=2, seed=4), \
        SoftDensityContrastiveLoss(3, 6, ks=(2,), num_anchors=2, seed=4)
    torch.manual_seed(1)
    la = _steps(a, 2)
    torch.manual_seed(2)
    lb = _steps(b, 2)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(la, lb))
    old = {k: v for k, v in a.state_dict().items() if k != "_extra_state"}  # saved before the stream was
    c = SoftDensityContrastiveLoss(3, 6, ks=(2,), num_anchors=2)
    c.load_state_dict(old)  # strict: loads
    assert torch.equal(c.bank.features, a.bank.features)


# --------------------------------------------------------------------------- the loss as a composition
def test_forward_reads_as_the_steps():
    src = textwrap.dedent(inspect.getsource(SoftDensityContrastiveLoss.forward))
    fn = ast.parse(src).body[0]
    body = fn.body[1:]  # after the docstring
    assert fn.end_lineno - body[0].lineno + 1 <= 40
    assert not any(isinstance(node, (ast.For, ast.While)) for node in ast.walk(fn))


def test_options_are_read_from_and_written_to_the_stages():
    loss_fn = SoftDensityContrastiveLoss(3, 8, ks=(2, 4), num_anchors=5, bank_source="pixel", use_bank=False)
    assert loss_fn.ks == loss_fn.density.ks == (2, 4)
    assert loss_fn.num_anchors == loss_fn.miner.num_anchors == 5
    assert loss_fn.bank_source == loss_fn.bank_policy.source == "pixel" and loss_fn.use_bank is False
    loss_fn.ignore_index = 2
    assert loss_fn.sampler.ignore_index == 2
    with pytest.raises(ValueError, match="ignore_index: expected an int or None"):
        loss_fn.ignore_index = True
    with pytest.raises(ValueError, match=r"sampling: expected one of .*did you mean 'random'"):
        loss_fn.sampling = "randm"


# --------------------------------------------------------------------------- vocabulary and validation
@pytest.mark.parametrize("make, match", [
    (lambda: SoftDensityContrastiveLoss(3, 8, weighting="papr"), r"weighting: expected one of .*did you mean 'paper'"),
    (lambda: SoftDensityContrastiveLoss(3, 8, bank_source="pixels"), r"bank_source: .*did you mean 'pixel'"),
    (lambda: SoftDensityContrastiveLoss(3, 8, anchor_mode="classes"), r"anchor_mode: .*did you mean 'class'"),
    (lambda: SoftDensityContrastiveLoss(3, 8, reduction="avg"), r"reduction: expected one of \('mean', 'sum', 'none'\)"),
    (lambda: SoftDensityContrastiveLoss(3, 8, bank_size=True), r"bank_size: expected an int >= 1, got True"),
    (lambda: SoftDensityContrastiveLoss(3, 8, num_negatives=2.0), r"num_negatives: expected an int >= 1"),
    (lambda: SoftDensityContrastiveLoss(3, 8, gamma=0), r"gamma: expected a value > 0"),
    (lambda: SoftDensityContrastiveLoss(3, 8, threshold=float("nan")), r"threshold: expected a finite number"),
    (lambda: SoftDensityContrastiveLoss(3, 8, ignore_index=1.5), r"ignore_index: expected an int or None"),
    (lambda: ClassMemoryBank(2, 4, size=True), r"size: expected an int >= 1, got True"),
    (lambda: ClassMemoryBank(2, 4, 5).entries(True), r"c: expected an int class in \[0, 2\), got True"),
    (lambda: ClassMemoryBank(2, 4, 5).push(torch.randn(2, 4), torch.tensor([True, False])),
     r"labels: expected an integer tensor"),
    (lambda: DF.dacl_labels(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([True]), torch.randn(1, 2, 2, 2),
                            policy="class_fractions"), r"policy: .*did you mean 'class_fraction'"),
])
def test_one_vocabulary_one_lookup(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_reduction_values_are_the_same_in_the_core_and_the_module():
    g = gen(23)
    anchors, labels = torch.randn(6, 4, generator=g), torch.tensor([0, 0, 0, 1, 1, 1])
    centers, negatives = torch.randn(2, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    for reduction in REDUCTIONS:
        DF.soft_density_contrastive_loss(anchors, labels, centers, negatives, reduction=reduction)
        out = SoftDensityContrastiveLoss(2, 4, ks=(2,), num_anchors=2, num_positives=2, reduction=reduction)(
            torch.randn(1, 4, 4, 4, generator=g), torch.randint(0, 2, (1, 4, 4), generator=g))
        assert out.shape == ((2, 2) if reduction == "none" else ())  # "none": (C, Q) terms
    assert look_up_option("reduction", "sum", REDUCTIONS) == "sum"


def test_scalars_are_checked_once_in_init(monkeypatch):
    """The stages pass validate_args=False: forward re-checks no scalar option."""
    import torch_dacl._validation as V
    loss_fn = SoftDensityContrastiveLoss(3, 8, ks=(2,), num_anchors=2, num_positives=2, num_negatives=4, gamma=0.5)
    calls = []
    for name in ("check_positive", "check_ks", "look_up_option", "check_int"):
        real = getattr(V, name)
        monkeypatch.setattr(DF, name, lambda *a, _real=real, _n=name, **k: (calls.append(_n), _real(*a, **k))[1],
                            raising=False)
    loss_fn(torch.randn(2, 8, 4, 4), torch.randint(0, 3, (2, 4, 4)))
    assert calls == []


# --------------------------------------------------------------------------- Table 2
def test_table2_rows_are_named_compositions():
    assert TABLE2_ROWS == ("I", "II", "III", "IV", "V", "VI")
    assert table2_options("II") == dict(sampling="random", ks=(8, 16, 32), use_bank=False, weighting="none")
    assert all(set(row) == {"sampling", "ks", "use_bank", "weighting"} for row in TABLE2.values())
    assert table2_options("iii")["ks"] == (8,)
    vi = SoftDensityContrastiveLoss.from_table2("VI", num_classes=3, dim=8)
    default = SoftDensityContrastiveLoss(3, 8)
    for name in ("sampling", "ks", "use_bank", "weighting", "anchor_mode", "num_anchors"):
        assert getattr(vi, name) == getattr(default, name), name
    iv = SoftDensityContrastiveLoss.from_table2("IV", num_classes=3, dim=8, ks=(2, 4), num_anchors=7)
    assert (iv.ks, iv.use_bank, iv.weighting, iv.num_anchors) == ((2, 4), False, "none", 7)
    with pytest.raises(ValueError, match="row I is the CPS baseline"):
        table2_options("I")
    with pytest.raises(ValueError, match="row: expected one of .*'VI'"):
        table2_options("VII")
    options = table2_options("V")
    options["weighting"] = "paper"  # a copy: TABLE2 itself is read-only
    assert TABLE2["V"]["weighting"] == "none"
