"""Contracts of :class:`~torch_dacl.stages.AnchorKeyMiner` and
:class:`~torch_dacl.stages.RandomStream` that the other stage tests leave open.

The miner: its defaults (256 anchors, 512 positive keys split half batch / half bank, 512
negatives), the messages of its checks, the ``overlap`` of ``anchor_mode="class"`` (no pixel is
an anchor there), random rankings drawn from the generator passed in, negatives drawn
independently for each class and taking the whole pool when it is small, and every output on
the sample's device (the meta device stands in for an accelerator).

The stream: the seed drawn once (broadcast through ``shared_seed`` on the call's device when
distributed, from the global CPU stream otherwise), the shared and the per-rank local
generators seeded with the documented hash of ``(seed, t)`` and ``(seed, t, rank + 1)``, and
one generator per role and device, built on the device asked for (an accelerator is stood in
for by a spy on ``torch.Generator``).
"""

import re

import pytest
import torch
import torch.nn.functional as F

import torch_dacl.distributed as tdist
from torch_dacl.stages import AnchorKeyMiner, Memory, RandomStream, Sample
from naive import naive_mix

META = torch.device("meta")


def make_sample(c, s, d, n=None, seed=0, valid=None, device=None):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(c, s, d, generator=g)
    valid = torch.ones(c, s, dtype=torch.bool) if valid is None else valid
    protos = pvalid = None
    if n is not None:
        protos, pvalid = torch.randn(c, n, d, generator=g), torch.ones(c, n, dtype=torch.bool)
    sample = Sample(feats, valid, F.normalize(feats, dim=-1), protos, pvalid)
    if device is not None:
        sample = Sample(*(None if t is None else t.to(device) for t in sample))
    return sample


# --------------------------------------------------------------------------- AnchorKeyMiner: options
def test_miner_defaults_mine_256_anchors_512_positives_and_512_negatives():
    c, s, d, m = 2, 600, 3, 300
    g = torch.Generator().manual_seed(0)
    sample = make_sample(c, s, d, seed=1)
    density = torch.rand(c, s, generator=g)
    memory = Memory(torch.randn(c, m, d, generator=g), torch.ones(c, m, dtype=torch.bool), torch.rand(c, m, generator=g))
    mined = AnchorKeyMiner()(sample, density, memory=memory)
    assert mined.anchors.shape == (c, 256, d) and bool(mined.anchor_valid.all())
    assert mined.negatives.shape == (c, 512, d) and bool(mined.negative_valid.all())
    assert mined.positive_density.shape == (c, 256)
    for k in range(c):
        # Eq. 8: the center of the 256 densest sampled pixels and the 256 densest bank entries
        batch = sample.unit[k, density[k].argsort(descending=True)[:256]].double()
        bank = F.normalize(memory.features[k, memory.density[k].argsort(descending=True)[:256]].double(), dim=-1)
        want = torch.cat([batch, bank]).mean(0)
        assert torch.allclose(mined.centers[k].double(), want, atol=1e-6)


@pytest.mark.parametrize("kwargs,msg", [
    ({"num_positives": 0}, "num_positives: expected an int >= 1, got 0"),
    ({"num_positives": 2.0}, "num_positives: expected an int >= 1, got 2.0"),
    ({"sampling": "rand"}, "sampling: expected one of ('density', 'random'), got 'rand' (did you mean 'random'?)"),
    ({"sampling": None}, "sampling: expected one of ('density', 'random'), got None"),
], ids=["positives-0", "positives-float", "sampling-typo", "sampling-none"])
def test_miner_refuses_a_bad_option_naming_it(kwargs, msg):
    with pytest.raises(ValueError, match=re.escape(msg) + "$"):
        AnchorKeyMiner(**kwargs)


# --------------------------------------------------------------------------- AnchorKeyMiner: forward
def test_class_anchors_share_no_pixel_with_the_positives():
    c, s, n, d = 3, 5, 4, 2
    sample = make_sample(c, s, d, n=n)
    g = torch.Generator().manual_seed(2)
    mined = AnchorKeyMiner(num_anchors=2, num_positives=4, num_negatives=3, anchor_mode="class")(
        sample, torch.rand(c, s, generator=g), torch.rand(c, n, generator=g))
    assert mined.overlap.dtype == torch.long and mined.overlap.tolist() == [0] * c


def test_random_class_anchors_follow_the_generator_not_the_global_stream():
    c, s, n, d = 2, 4, 12, 3
    sample = make_sample(c, s, d, n=n)
    miner = AnchorKeyMiner(num_anchors=3, num_positives=2, num_negatives=2, sampling="random", anchor_mode="class")
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        runs.append(miner(sample, torch.zeros(c, s), torch.zeros(c, n), generator=torch.Generator().manual_seed(7)))
    assert torch.equal(runs[0].anchors, runs[1].anchors)
    # and they are prototypes of their class, not always the same ones
    for k in range(c):
        rows = [int((sample.prototypes[k] == a).all(1).nonzero()) for a in runs[0].anchors[k]]
        assert len(set(rows)) == 3
    other = miner(sample, torch.zeros(c, s), torch.zeros(c, n), generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other.anchors, runs[0].anchors)


@pytest.mark.parametrize("sampling", ["density", "random"])
@pytest.mark.parametrize("anchor_mode", ["pixel", "class"])
def test_miner_keeps_every_output_on_the_sample_device(sampling, anchor_mode):
    # meta refuses to mix with CPU tensors: a tensor the miner makes on the default device fails
    c, s, n, m, d = 2, 5, 3, 4, 4
    sample = make_sample(c, s, d, n=n, device=META)
    memory = Memory(torch.zeros(c, m, d, device=META), torch.ones(c, m, dtype=torch.bool, device=META),
                    torch.zeros(c, m, device=META))
    miner = AnchorKeyMiner(num_anchors=2, num_positives=4, num_negatives=3, sampling=sampling, anchor_mode=anchor_mode)
    mined = miner(sample, torch.zeros(c, s, device=META), torch.zeros(c, n, device=META), memory)
    assert all(t.device == META for t in mined)
    assert mined.anchors.shape == (c, 2, d) and mined.negatives.shape == (c, 3, d)
    assert mined.centers.shape == (c, d) and mined.positive_density.shape == (c, 2)
    assert mined.overlap.shape == (c,) and mined.overlap.dtype == torch.long


def test_negatives_of_the_classes_are_drawn_independently():
    # three classes of one pixel each, one negative per class: each class picks one of the two
    # others, so 8 joint picks, each with probability 1/8 when the classes draw independently
    c = 3
    unit = torch.eye(c).reshape(c, 1, c)
    miner, g = AnchorKeyMiner(num_negatives=1), torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        neg, ok = miner.negatives(unit, torch.ones(c, 1, dtype=torch.bool), g)
        assert ok.all()
        picks = tuple(neg[:, 0].argmax(1).tolist())
        assert all(p != k for k, p in enumerate(picks))
        seen.add(picks)
    assert len(seen) == 8  # a cycle 0->1->2->0 included: no common ranking of the pool


def test_negatives_take_the_whole_pool_even_at_a_zero_key():
    # num_negatives >= the pool: every valid pixel of the other classes is a negative. The
    # generator below draws an exact 0.0 among the keys of a valid pool entry (class 1 row, a
    # pixel of class 0): the edge of torch.rand's [0, 1)
    c, s, seed = 2, 8192, 146
    keys = torch.rand(c, c * s, generator=torch.Generator().manual_seed(seed))
    assert float(keys[1, :s].min()) == 0.0, "this torch's CPU generator no longer draws 0.0 at this seed"
    ids = torch.stack(torch.meshgrid(torch.arange(c), torch.arange(s), indexing="ij"), -1).float()  # (c, s, 2)
    neg, ok = AnchorKeyMiner(num_negatives=c * s).negatives(ids, torch.ones(c, s, dtype=torch.bool),
                                                            torch.Generator().manual_seed(seed))
    assert ok.sum(1).tolist() == [s, s]
    for k in range(c):
        chosen = neg[k][ok[k]]
        assert (chosen[:, 0] == 1 - k).all()
        assert chosen[:, 1].sort().values.tolist() == list(range(s))


# --------------------------------------------------------------------------- RandomStream
def test_stream_draws_its_seed_once_broadcast_on_the_calls_device_when_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(tdist, "shared_seed", lambda device: calls.append(device) or 1234)
    stream = RandomStream()
    shared, _ = stream.next("cpu", distributed=True)
    assert stream.seed == 1234 and shared.initial_seed() == naive_mix(1234, 0)
    stream.next("cpu", distributed=True)
    assert calls == [torch.device("cpu")] and isinstance(calls[0], torch.device)

    alone = RandomStream()  # not distributed: the global CPU stream, no broadcast
    torch.manual_seed(4)
    want = int(torch.randint(0, 2**62, (1,)))
    torch.manual_seed(4)
    shared, local = alone.next("cpu")
    assert len(calls) == 1 and alone.seed == want
    assert shared is local and shared.initial_seed() == naive_mix(want, 0)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_distributed_stream_seeds_a_local_generator_per_rank(monkeypatch, rank):
    monkeypatch.setattr(tdist, "rank", lambda: rank)
    stream = RandomStream(seed=9)
    for t in range(3):
        shared, local = stream.next(torch.device("cpu"), distributed=True)
        assert shared is not local
        assert shared.initial_seed() == naive_mix(9, t)
        assert local.initial_seed() == naive_mix(9, t, rank + 1)


class GeneratorSpy:
    """Stands in for ``torch.Generator`` on a CPU-only machine: records the device each
    generator is built for and returns a CPU generator."""

    def __init__(self, real):
        self.real, self.built = real, []

    def __call__(self, device=None):
        gen = self.real()
        self.built.append((None if device is None else torch.device(device), gen))
        return gen

    def device_of(self, gen):
        return next(d for d, g in self.built if g is gen)


def test_stream_builds_one_generator_per_role_on_the_device_asked(monkeypatch):
    spy = GeneratorSpy(torch.Generator)
    monkeypatch.setattr(torch, "Generator", spy)
    monkeypatch.setattr(tdist, "rank", lambda: 1)
    stream = RandomStream(seed=5)
    held = {}
    devices = ["cuda:0", "cpu", torch.device("cuda", 0), "cuda:1", "cpu"]
    for t, dev in enumerate(devices):
        shared, local = stream.next(dev, distributed=True)
        assert spy.device_of(shared) == torch.device(dev) and spy.device_of(local) == torch.device(dev)
        assert shared.initial_seed() == naive_mix(5, t) and local.initial_seed() == naive_mix(5, t, 2)
        for role, gen in (("shared", shared), ("local", local)):
            assert held.setdefault((role, str(torch.device(dev))), gen) is gen  # reused, reseeded
    assert len(spy.built) == 6  # 3 devices x 2 roles, each built once
