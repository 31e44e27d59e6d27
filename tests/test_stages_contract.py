"""Contracts of the stage helpers and the memory bank that the other stage tests leave open:
the sampler's packed all-gather (with the two collectives simulated in process), the
prototypes of the sampled pixels, the ranking helpers' tie order, the random stream's
hash and state, the bank's ``state_dict`` loading and ``entries``, the stages' defaults and
checks, ``masked_mean`` in each dtype, the sampler's prototypes from a probability map, and
the stages' device under another default device."""

import re

import pytest
import torch

import torch_dacl.distributed as tdist
from naive import naive_mix
from torch_dacl import ClassMemoryBank
from torch_dacl.stages import (BankPolicy, PixelSampler, RandomStream, Sample, SoftContrastiveTerm, _mix, count_shared,
                               masked_mean, sampled_prototypes, split_by_rank)


# --------------------------------------------------------------------------- PixelSampler._gather
def pack(feats, valid, protos=None, pvalid=None):
    """Naive packing of one rank's contribution: ``[features | valid | prototypes | valid]``."""
    vals = [float(x) for x in feats.detach().reshape(-1).tolist()]
    vals += [1.0 if b else 0.0 for b in valid.reshape(-1).tolist()]
    if protos is not None:
        vals += [float(x) for x in protos.detach().reshape(-1).tolist()]
        vals += [1.0 if b else 0.0 for b in pvalid.reshape(-1).tolist()]
    return torch.tensor(vals, dtype=torch.float32)


def rank_data(c, s, d, m, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(c, s, d, generator=g)
    valid = torch.rand(c, s, generator=g) < 0.6
    valid[0, 0], valid[-1, -1] = True, False  # both values present on every rank
    if m is None:
        return feats, valid, None, None
    protos = torch.randn(c, m, d, generator=g)
    pvalid = torch.rand(c, m, generator=g) < 0.5
    pvalid[0, 0], pvalid[-1, -1] = False, True
    return feats, valid, protos, pvalid


class FakeWorld:
    """Rank ``rank`` of a simulated group: the other ranks' vectors are packed here."""

    def __init__(self, packed, rank):
        self.packed, self.rank, self.calls = packed, rank, []

    def gather_sizes(self, n, device, uniform=False):
        self.calls.append(("gather_sizes", n, device, uniform))
        if uniform:
            return [n] * len(self.packed)
        return [p.shape[0] for p in self.packed]

    def all_gather_with_grad(self, x, uniform=False, sizes=None):
        self.calls.append(("all_gather_with_grad", x, uniform, sizes))
        return torch.cat([x if i == self.rank else p for i, p in enumerate(self.packed)])


@pytest.mark.parametrize("per_rank,rank", [((2, 1, 3), 1), ((1, 3), 0), ((None, None, None), 2), ((None, None), 1)],
                         ids=["protos-3ranks", "protos-2ranks", "pixels-3ranks", "pixels-2ranks"])
def test_gather_unpacks_every_rank_in_rank_order(monkeypatch, per_rank, rank):
    c, s, d = 2, 3, 4
    data = [rank_data(c, s, d, m, seed=10 + r) for r, m in enumerate(per_rank)]
    with_protos = per_rank[0] is not None
    feats, valid, protos, pvalid = data[rank]
    feats = feats.clone().requires_grad_(True)
    if with_protos:
        protos = protos.clone().requires_grad_(True)
    world = FakeWorld([pack(*x) for x in data], rank)
    monkeypatch.setattr(tdist, "gather_sizes", world.gather_sizes)
    monkeypatch.setattr(tdist, "all_gather_with_grad", world.all_gather_with_grad)

    out_f, out_v, out_p, out_pv = PixelSampler._gather(feats, valid, protos, pvalid)

    # one size exchange (skipped, uniform, without prototypes) and one gather of the packed vector
    assert [call[0] for call in world.calls] == ["gather_sizes", "all_gather_with_grad"]
    _, n, device, uniform = world.calls[0]
    own = pack(*data[rank])
    assert type(n) is int and n == own.shape[0]
    assert device == torch.device("cpu")
    assert uniform is (not with_protos)
    _, x, _, sizes = world.calls[1]
    assert torch.equal(x.detach(), own)
    assert sizes == [p.shape[0] for p in world.packed]

    # the global batch, rank-major along dim 1
    assert torch.equal(out_f.detach(), torch.cat([x[0] for x in data], 1))
    assert out_v.dtype == torch.bool and torch.equal(out_v, torch.cat([x[1] for x in data], 1))
    if with_protos:
        assert out_p.shape == (c, sum(per_rank), d)
        assert torch.equal(out_p.detach(), torch.cat([x[2] for x in data], 1))
        assert out_pv.dtype == torch.bool and torch.equal(out_pv, torch.cat([x[3] for x in data], 1))
    else:
        assert out_p is None and out_pv is None

    # the gradient reaches this rank's own rows only
    wf = torch.randn(out_f.shape, generator=torch.Generator().manual_seed(1))
    loss = (out_f * wf).sum()
    if with_protos:
        wp = torch.randn(out_p.shape, generator=torch.Generator().manual_seed(2))
        loss = loss + (out_p * wp).sum()
    loss.backward()
    assert torch.equal(feats.grad, wf[:, rank * s:(rank + 1) * s])
    if with_protos:
        start = sum(per_rank[:rank])
        assert torch.equal(protos.grad, wp[:, start:start + per_rank[rank]])


def test_distributed_sampler_hands_on_the_global_sample(monkeypatch):
    """Through ``forward``: with a group (simulated), the Sample is every rank's local
    sample, rank-major, and its ``unit`` the normalised gathered features."""
    c, n, d = 2, 2, 3
    emb = torch.randn(n, d, 2, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[[0, 1, 1], [0, -100, 1]], [[1, 1, 0], [0, 0, 1]]])
    protos = torch.randn(n, c, d, generator=torch.Generator().manual_seed(1))
    pvalid = torch.tensor([[True, False], [True, True]])
    local = PixelSampler(c, max_per_class=4)(emb, labels, protos, pvalid, generator=torch.Generator().manual_seed(5))
    other = rank_data(c, 4, d, 3, seed=7)  # rank 0 holds 3 images
    world = FakeWorld([pack(*other), pack(local.features, local.valid, local.prototypes, local.prototypes_valid)], 1)
    monkeypatch.setattr(tdist, "is_distributed", lambda: True)
    monkeypatch.setattr(tdist, "gather_sizes", world.gather_sizes)
    monkeypatch.setattr(tdist, "all_gather_with_grad", world.all_gather_with_grad)
    sampler = PixelSampler(c, max_per_class=4, gather_distributed=True)
    assert sampler.distributed
    out = sampler(emb, labels, protos, pvalid, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out.features, torch.cat([other[0], local.features], 1))
    assert torch.equal(out.valid, torch.cat([other[1], local.valid], 1))
    assert torch.equal(out.prototypes, torch.cat([other[2], local.prototypes], 1))
    assert torch.equal(out.prototypes_valid, torch.cat([other[3], local.prototypes_valid], 1))
    assert torch.allclose(out.unit, torch.nn.functional.normalize(out.features, dim=-1))


# --------------------------------------------------------------------------- sampled_prototypes
def naive_prototypes(features, valid, image, masks, num_images):
    m, d = features.shape
    c = masks.shape[1]
    protos = torch.zeros(c, num_images, d, dtype=torch.float64)
    ok = torch.zeros(c, num_images, dtype=torch.bool)
    for k in range(c):
        for i in range(num_images):
            rows = [j for j in range(m) if valid[j] and masks[j, k] and image[j] == i]
            if rows:
                protos[k, i] = sum(features[j].double() for j in rows) / len(rows)
                ok[k, i] = True
    return protos, ok


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["float32", "float64", "float16", "bfloat16"])
def test_sampled_prototypes_match_a_loop_and_sum_halves_in_float32(dtype):
    g = torch.Generator().manual_seed(3)
    m, d, c, n = 12, 3, 3, 3
    features = (torch.randn(m, d, generator=g) * 4).to(dtype)
    valid = torch.rand(m, generator=g) < 0.8
    image = torch.randint(0, n, (m,), generator=g)
    masks = torch.rand(m, c, generator=g) < 0.5
    masks[:, 2] = False  # class 2: no pixel anywhere
    masks[image == 1, 1] = False  # class 1: none in image 1
    protos, ok = sampled_prototypes(features, valid, image, masks, n)
    want, want_ok = naive_prototypes(features, valid, image, masks, n)
    assert protos.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    assert ok.tolist() == want_ok.tolist()
    assert not ok[2].any() and not ok[1, 1]
    assert torch.allclose(protos.double(), want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- ranking helpers
def test_split_by_rank_breaks_ties_by_position():
    g = torch.Generator().manual_seed(0)
    c, s = 2, 200
    key = torch.randint(0, 3, (c, s), generator=g).float()  # many ties
    valid = torch.rand(c, s, generator=g) < 0.9
    lo, lo_ok, hi, hi_ok = split_by_rank(key, valid, 40, 50)
    for row in range(c):
        ranked = sorted((j for j in range(s) if valid[row, j]), key=lambda j: (float(key[row, j]), j))
        assert lo[row][lo_ok[row]].tolist() == ranked[:40]
        assert hi[row][hi_ok[row]].tolist() == ranked[::-1][:50]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ranking_helpers_run_on_the_inputs_device():
    g = torch.Generator().manual_seed(0)
    key, valid = torch.rand(3, 10, generator=g), torch.rand(3, 10, generator=g) < 0.7
    cpu = split_by_rank(key, valid, 3, 4)
    gpu = split_by_rank(key.cuda(), valid.cuda(), 3, 4)
    for a, b in zip(cpu, gpu):
        assert b.is_cuda and torch.equal(a, b.cpu())
    args = (cpu[0], cpu[1], cpu[2], cpu[3])
    shared = count_shared(*[t.cuda() for t in args], 10)
    assert shared.is_cuda and torch.equal(shared.cpu(), count_shared(*args, 10))


# --------------------------------------------------------------------------- the random stream
def test_mix_is_the_splitmix64_finaliser():
    # known answer: the first output of splitmix64 seeded with 0 is 0xE220A8397B1DCDAF
    assert _mix(0) == 0xE220A8397B1DCDAF >> 1
    for values in [(7,), (7, 0), (7, 1), (2**62 - 1, 12345), (3, 4, 5), (-1,), (2**64 + 9, 1)]:
        assert _mix(*values) == naive_mix(*values)
        assert 0 <= _mix(*values) < 2**63
    stream = RandomStream(seed=11)
    for t in range(3):
        shared, _ = stream.next(torch.device("cpu"))
        assert shared.initial_seed() == naive_mix(11, t)


def test_random_stream_state_round_trip_keeps_seed_zero_and_unset():
    stream = RandomStream()
    stream.load_state(torch.tensor([0, 5]))
    assert stream.seed == 0 and stream.calls == 5
    assert stream.state().tolist() == [0, 5]
    shared, _ = stream.next(torch.device("cpu"))
    assert shared.initial_seed() == naive_mix(0, 5)

    unset = RandomStream(seed=3)
    unset.load_state(torch.tensor([-1, 2]))  # a stream saved before its first call
    assert unset.seed is None and unset.state().tolist() == [-1, 2]
    torch.manual_seed(4)
    want = int(torch.randint(0, 2**62, (1,)))
    torch.manual_seed(4)
    shared, _ = unset.next(torch.device("cpu"))
    assert unset.seed == want and shared.initial_seed() == naive_mix(want, 2)


# --------------------------------------------------------------------------- the bank's state_dict and entries
def test_bank_refuses_a_checkpoint_of_other_sizes_naming_each():
    bank = ClassMemoryBank(num_classes=2, dim=7, size=6)
    other = ClassMemoryBank(num_classes=3, dim=4, size=5).state_dict()
    msg = ("state_dict: the checkpoint's memory bank has num_classes=3, bank_size=5, dim=4; this one was built "
           "with num_classes=2, bank_size=6, dim=7 (build it with the checkpoint's values)")
    with pytest.raises(ValueError, match=re.escape(msg)):
        bank.load_state_dict(other)


def test_bank_load_reports_missing_unexpected_and_mismatched_keys():
    bank = ClassMemoryBank(num_classes=2, dim=3, size=4)
    result = bank.load_state_dict({}, strict=False)  # no features: nothing to check, all missing
    assert sorted(result.missing_keys) == ["count", "density", "features", "ptr"]
    assert result.unexpected_keys == []

    src = ClassMemoryBank(num_classes=2, dim=3, size=4)
    src.push(torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]), torch.rand(5))
    sd = dict(src.state_dict(), junk=torch.zeros(1))
    result = bank.load_state_dict(sd, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["junk"]
    assert torch.equal(bank.features, src.features) and torch.equal(bank.count, src.count)
    with pytest.raises(RuntimeError, match=re.escape('Unexpected key(s) in state_dict: "junk"')):
        bank.load_state_dict(sd)

    bad = dict(src.state_dict(), density=torch.zeros(2, 9))
    with pytest.raises(RuntimeError, match="size mismatch for density"):
        bank.load_state_dict(bad, strict=False)


@pytest.mark.parametrize("c", [-1, 2, 3, 1.0, True])
def test_bank_entries_refuses_a_class_out_of_range(c):
    bank = ClassMemoryBank(num_classes=2, dim=3, size=4)
    bank.push(torch.randn(3, 3), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=re.escape(f"c: expected an int class in [0, 2), got {c!r}")):
        bank.entries(c)


# --------------------------------------------------------------------------- the stages' defaults and checks
def test_stages_check_their_counts_naming_the_keyword():
    cases = [(lambda: PixelSampler(0), "num_classes: expected an int >= 1, got 0"),
             (lambda: PixelSampler(2, max_per_class=0), "max_samples_per_class: expected an int >= 1, got 0"),
             (lambda: BankPolicy(push_per_class=0), "bank_push_per_class: expected an int >= 1, got 0")]
    for make, msg in cases:
        with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
            make()


def test_sampler_defaults_take_512_pixels_per_class_and_do_not_gather(monkeypatch):
    monkeypatch.setattr(tdist, "is_distributed", lambda: True)  # a process group exists
    sampler = PixelSampler(2)
    assert not sampler.distributed  # gathering is opt-in
    labels = torch.tensor([[[0, 1, 1], [0, -100, 1]]])
    s = sampler(torch.zeros(1, 3, 2, 3), labels, generator=torch.Generator().manual_seed(0))
    assert s.features.shape == (2, 512, 3) and s.valid.sum(1).tolist() == [2, 3]


def test_term_default_temperature_is_0_4_in_eq10():
    g = torch.Generator().manual_seed(0)
    anchors, centers, negatives = torch.randn(2, 3, 4, generator=g), torch.randn(2, 4, generator=g), torch.randn(
        2, 5, 4, generator=g)
    loss, _ = SoftContrastiveTerm(weighting="none", reduction="sum")(
        anchors, torch.ones(2, 3, dtype=torch.bool), centers, negatives)
    a, c, p = (torch.nn.functional.normalize(x.double(), dim=-1) for x in (anchors, centers, negatives))
    pos = (a * c.unsqueeze(1)).sum(-1) / 0.4  # (C, Q)
    neg = torch.logsumexp(torch.einsum("cqd,cpd->cqp", a, p) / 0.4, dim=-1)
    assert torch.allclose(loss.double(), (neg - pos).sum(), rtol=1e-5, atol=1e-5)


def test_bank_policy_defaults_push_64_pixels_per_class_when_training():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 70, 3, generator=g)
    sample = Sample(feats, torch.ones(2, 70, dtype=torch.bool), torch.nn.functional.normalize(feats, dim=-1))
    bank = ClassMemoryBank(2, 3, size=100)
    BankPolicy(source="pixel").update(bank, sample, torch.rand(2, 70, generator=g))  # training by default
    assert bank.count.tolist() == [64, 64]


# --------------------------------------------------------------------------- masked_mean
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["float32", "float64", "float16", "bfloat16"])
def test_masked_mean_is_the_mean_of_the_valid_rows_in_the_inputs_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 5, 3, generator=g) * 3).to(dtype)
    valid = torch.tensor([[True, False, True, True, False],  # three rows
                          [False, False, True, False, False],  # one row: the mean is that row
                          [False] * 5,  # none: zeros, not valid
                          [True] * 5])
    mean, any_valid = masked_mean(x, valid)
    assert mean.dtype == dtype and mean.shape == (4, 3)
    assert any_valid.tolist() == [True, True, False, True]
    want = torch.stack([x[c][valid[c]].double().mean(0) if valid[c].any() else torch.zeros(3, dtype=torch.float64)
                        for c in range(4)])
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else 3e-2
    assert torch.allclose(mean.double(), want, rtol=tol, atol=tol)
    assert torch.equal(mean[1], x[1, 2])


# --------------------------------------------------------------------------- PixelSampler options
def test_sampler_without_ignore_index_samples_every_label_in_range():
    labels = torch.tensor([[[0, 1, -100, 2], [5, 1, 1, 0]]])  # -100 and 5 lie outside [0, 3)
    emb = torch.zeros(1, 2, 2, 4)
    for ignore_index, counts in [(None, [2, 3, 1]), (1, [2, 0, 1]), (-100, [2, 3, 1])]:
        s = PixelSampler(3, max_per_class=4, ignore_index=ignore_index)(
            emb, labels, generator=torch.Generator().manual_seed(0))
        assert s.valid.sum(1).tolist() == counts


def test_sampler_head_prototypes_threshold_the_pool_at_each_sampled_pixel():
    """Eq. 2 from the sampled pixels with a probability map: ``T_n`` is ``pool > threshold``
    (0.5 by default, strict), at every sampled pixel of the image, whatever its label."""
    g = torch.Generator().manual_seed(0)
    n, f, h, w, c = 2, 3, 3, 4, 2  # N != F
    emb = torch.randn(n, f, h, w, generator=g)
    labels = torch.randint(0, c, (n, h, w), generator=g)
    labels[0, 0, 0] = -100  # not sampled
    pool = torch.tensor([0.0, 0.5, 0.9])[torch.randint(0, 3, (n, c, h, w), generator=g)]
    pool[0, 0, 0, 1] = pool[0, 1, 2, 3] = 0.5  # a value at the threshold is not in T_n
    pool[1, 0] = 0.9  # class 0 of image 1: every pixel
    pool[1, 1] = 0.0  # class 1 of image 1: none
    head = torch.nn.Linear(f, 4)
    with torch.no_grad():
        head.weight.copy_(torch.randn(4, f, generator=g))
        head.bias.copy_(torch.randn(4, generator=g))
    sampler = PixelSampler(c, max_per_class=h * w * n)  # every labelled pixel is sampled
    for threshold, kwargs in [(0.5, {}), (0.2, {"threshold": 0.2})]:
        s = sampler(emb, labels, head=head, pool=pool, generator=torch.Generator().manual_seed(1), **kwargs)
        assert s.prototypes.shape == (c, n, 4) and s.prototypes_valid.shape == (c, n)
        for k in range(c):
            for i in range(n):
                rows = [head(emb[i, :, y, x]).double() for y in range(h) for x in range(w)
                        if labels[i, y, x] >= 0 and pool[i, k, y, x] > threshold]
                assert bool(s.prototypes_valid[k, i]) == bool(rows)
                if rows:
                    assert torch.allclose(s.prototypes[k, i].double(), sum(rows) / len(rows), atol=1e-5)
        assert s.prototypes_valid[0, 1] and not s.prototypes_valid[1, 1]


# --------------------------------------------------------------------------- devices
def test_sampler_and_bank_policy_stay_on_the_inputs_device_under_another_default_device():
    """Every tensor the stages make is made on their inputs' device: a default device set
    elsewhere (``torch.set_default_device``) changes nothing."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 3, 3, 4, generator=g)
    labels = torch.randint(0, 2, (2, 3, 4), generator=g)
    head = torch.nn.Linear(3, 4)
    sampler = PixelSampler(2, max_per_class=8)
    want = sampler(emb, labels, head=head, pool=torch.empty(0), generator=torch.Generator().manual_seed(1))
    with torch.device("meta"):
        got = sampler(emb, labels, head=head, pool=torch.empty(0, device="cpu"),
                      generator=torch.Generator().manual_seed(1))
    for a, b in zip(want, got):
        assert b.device.type == "cpu" and torch.equal(a, b)

    density, proto_density = torch.rand(2, 8, generator=g), torch.rand(2, 2, generator=g)
    for source in ("pixel", "prototype"):
        banks = [ClassMemoryBank(2, 4, size=6) for _ in range(2)]
        policy = BankPolicy(source=source, push_per_class=3)
        policy.update(banks[0], want, density, proto_density, generator=torch.Generator().manual_seed(2))
        with torch.device("meta"):
            policy.update(banks[1], want, density, proto_density, generator=torch.Generator().manual_seed(2))
        assert banks[1].count.tolist() == banks[0].count.tolist() != [0, 0]
        assert torch.equal(banks[1].features, banks[0].features) and torch.equal(banks[1].density, banks[0].density)


def test_a_negative_ignore_index_does_not_wrap_into_narrow_labels():
    # uint8 labels compared with -100 in uint8 would read it as 156 and drop class 156
    from torch_dacl.stages import one_hot_maps

    labels = torch.tensor([[[0, 156], [199, 3]]])
    hot8 = one_hot_maps(labels.to(torch.uint8), 200, ignore_index=-100)
    assert torch.equal(hot8, one_hot_maps(labels, 200, ignore_index=-100))
    assert hot8[0, 156, 0, 1] == 1.0 and hot8.sum() == 4
    sampler = PixelSampler(200, max_per_class=4)
    emb = torch.randn(1, 3, 2, 2)
    s8 = sampler(emb, labels.to(torch.uint8), generator=torch.Generator().manual_seed(0))
    s64 = sampler(emb, labels, generator=torch.Generator().manual_seed(0))
    assert s8.valid[156].sum() == 1 and s8.valid.sum() == 4
    assert torch.equal(s8.valid, s64.valid) and torch.equal(s8.features, s64.features)
