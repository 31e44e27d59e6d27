"""The contract of ``torch_dacl.loss`` beyond tests/test_modules.py and test_module_reference.py:
the docstrings of the option properties, ``DACLDetails.per_class`` on hand-made masks, the
diagnostics fields (anchor-center cosine against a batch whose answer is known, the bank fill
of a disabled bank, the ``contributing`` mask), ``state_dict`` loading (old checkpoints without
the random stream, stray keys, load hooks), and :func:`~torch_dacl.loss.paired_losses` against
two separate calls for every option that the grouped call forwards."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import torch_dacl.functional as DF
from torch_dacl import DACLDetails, SoftDensityContrastiveLoss
from torch_dacl.loss import paired_losses

C, D = 3, 8
SMALL = dict(num_anchors=6, num_positives=8, num_negatives=10, bank_size=12, max_samples_per_class=40, ks=(2, 4))

# every option property of the loss: the stage and the attribute that keep it
OPTIONS = {
    "temperature": ("term", "temperature"), "weighting": ("term", "weighting"), "gamma": ("term", "gamma"),
    "include_positive": ("term", "include_positive"), "reduction": ("term", "reduction"),
    "ks": ("density", "ks"), "precision": ("density", "precision"),
    "num_anchors": ("miner", "num_anchors"), "num_positives": ("miner", "num_positives"),
    "num_negatives": ("miner", "num_negatives"), "sampling": ("miner", "sampling"),
    "anchor_mode": ("miner", "anchor_mode"), "max_samples_per_class": ("sampler", "max_per_class"),
    "ignore_index": ("sampler", "ignore_index"), "gather_distributed": ("sampler", "gather_distributed"),
    "threshold": ("pool", "threshold"), "bank_source": ("bank_policy", "source"),
    "bank_push_per_class": ("bank_policy", "push_per_class"), "use_bank": ("bank_policy", "enabled"),
    "update_bank_in_eval": ("bank_policy", "update_in_eval"),
}


def _batch(n=3, h=7, w=8, seed=0, width=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, h, w, generator=g, requires_grad=True), torch.randint(0, C, (n, h, w), generator=g)


def _pair(**kw):
    """Two losses of one signature (two seeds) and two more with the same seeds."""
    opts = {**SMALL, **kw}
    return ([SoftDensityContrastiveLoss(C, D, seed=s, **opts) for s in (1, 2)],
            [SoftDensityContrastiveLoss(C, D, seed=s, **opts) for s in (1, 2)])


def _assert_details_close(x: DACLDetails, y: DACLDetails):
    for name, a, b in zip(DACLDetails._fields, x, y):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, name
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def _assert_state_close(x: SoftDensityContrastiveLoss, y: SoftDensityContrastiveLoss):
    sx, sy = x.state_dict(), y.state_dict()
    assert list(sx) == list(sy)
    for k in sx:
        torch.testing.assert_close(sx[k], sy[k], rtol=1e-6, atol=1e-6, msg=k)


def _paired_equals_separate(steps=2, **kw):
    """paired_losses over a few steps gives each loss what its own call gives: every
    DACLDetails field, the gradient of both embeddings, the banks and the random streams."""
    grouped, separate = _pair(**kw)
    for step in range(steps):
        ea, ya = _batch(seed=10 * step)
        eb, yb = _batch(seed=10 * step + 1)
        da, db = paired_losses(*grouped, ea, ya, eb, yb)
        sa = separate[0](ea, ya, return_details=True)
        sb = separate[1](eb, yb, return_details=True)
        _assert_details_close(da, sa)
        _assert_details_close(db, sb)
        if da.loss.requires_grad:
            total = lambda a, b: (a.sum() + 2 * b.sum())  # noqa: E731  (reduction="none" gives (C, Q))
            ga = torch.autograd.grad(total(da.loss, db.loss), (ea, eb))
            gs = torch.autograd.grad(total(sa.loss, sb.loss), (ea, eb))
            for x, y in zip(ga, gs):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    for a, b in zip(grouped, separate):
        _assert_state_close(a, b)
    return grouped


# ----------------------------------------------------------------------------- option properties
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_property_docstring_names_the_stage_attribute_that_keeps_it(name):
    stage, attr = OPTIONS[name]
    prop = getattr(SoftDensityContrastiveLoss, name)
    assert isinstance(prop, property)
    assert prop.__doc__ == f"Kept by ``self.{stage}.{attr}``."
    loss = SoftDensityContrastiveLoss(C, D, **SMALL)
    assert getattr(loss, name) == getattr(getattr(loss, stage), attr)  # the docstring tells the truth


# ----------------------------------------------------------------------------- DACLDetails.per_class
def test_per_class_means_are_over_the_valid_entries_only():
    # row 0: one valid entry among invalid ones (whatever they hold); row 1: none valid; row 2: all
    dens = torch.tensor([[0.5, 7.0, -3.0], [1.0, 2.0, 3.0], [0.25, 0.5, 0.75]])
    valid = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    details = DACLDetails(torch.tensor(0.0), dens, valid, dens, valid, valid.sum(),
                          positive_density=dens, positive_valid=valid, anchor_center_cosine=dens)
    s = details.per_class()
    want = torch.tensor([0.5, 0.0, 0.5])  # a lone valid entry is its own mean; no valid entry gives 0
    for key in ("anchor_density", "positive_density", "anchor_center_cosine"):
        torch.testing.assert_close(s[key], want, rtol=0, atol=1e-7, msg=key)
    assert s["anchors"].tolist() == [1.0, 0.0, 3.0] and s["positives"].tolist() == [1.0, 0.0, 3.0]
    assert set(s) == {"sampled", "anchors", "anchor_density", "positives", "positive_density", "anchor_center_cosine"}


# ----------------------------------------------------------------------------- diagnostics
def _constant_class_batch(scale=3.0):
    """Every pixel of class k holds one vector v_k (random, not unit); class 2 has 3 pixels."""
    g = torch.Generator().manual_seed(7)
    vecs = torch.randn(C, D, generator=g) * scale
    labels = torch.zeros(2, 6, 6, dtype=torch.long)
    labels[:, 3:] = 1
    labels[0, 0, :3] = 2  # 3 pixels: 1 anchor (3 // 2), 3 padded anchor slots, 2 positives
    emb = vecs[labels].permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    return emb, labels


def test_anchor_center_cosine_is_the_cosine_and_zero_where_the_anchor_is_not_valid():
    # anchors of class k and its center (Eq. 8) are all v_k: the cosine is 1 (whatever |v_k|,
    # however many anchors and classes); padded anchor slots read 0
    emb, labels = _constant_class_batch()
    loss = SoftDensityContrastiveLoss(C, D, ks=(2,), num_anchors=4, num_positives=4, num_negatives=8,
                                      max_samples_per_class=40, use_bank=False, seed=0)
    out = loss(emb, labels, return_details=True)
    valid = out.anchor_valid
    assert valid.sum(1).tolist() == [4, 4, 1]
    cos = out.anchor_center_cosine
    assert cos.shape == (C, 4) and cos.dtype == torch.float32
    torch.testing.assert_close(cos[valid], torch.ones(int(valid.sum())), rtol=0, atol=1e-5)
    assert torch.equal(cos[~valid], torch.zeros(int((~valid).sum())))
    torch.testing.assert_close(out.per_class()["anchor_center_cosine"], torch.ones(C), rtol=0, atol=1e-5)


def test_bank_fill_is_zero_once_the_bank_is_switched_off():
    # "bank_fill: filled bank slots after the update (0 without a bank)": also for a bank that
    # was filled before ``use_bank`` was set to False
    loss = SoftDensityContrastiveLoss(C, D, **SMALL, seed=0)
    emb, labels = _batch()
    assert loss(emb, labels, return_details=True).bank_fill.tolist() == [3, 3, 3]  # 3 images, 1 prototype each
    loss.use_bank = False
    out = loss(emb, labels, return_details=True)
    assert loss.bank.count.tolist() == [3, 3, 3]  # the bank keeps its content ...
    assert out.bank_fill.tolist() == [0, 0, 0] and out.per_class()["bank_fill"].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_details_contributing_is_the_mask_of_the_anchors_in_the_loss(reduction):
    emb, labels = _constant_class_batch()
    labels[1, 0, 0] = 2  # class 2: 4 pixels, 2 anchors
    loss = SoftDensityContrastiveLoss(C, D, ks=(2,), num_anchors=4, num_positives=4, num_negatives=8,
                                      max_samples_per_class=40, reduction=reduction, seed=0)
    out = loss(emb, labels, return_details=True)
    assert isinstance(out.contributing, torch.Tensor)
    assert out.contributing.shape == (C, 4) and out.contributing.dtype == torch.bool
    assert torch.equal(out.contributing, out.anchor_valid)  # every class has a center and negatives
    assert int(out.num_contributing) == int(out.contributing.sum()) == 10
    if reduction == "none":
        assert torch.equal(out.loss != 0, out.contributing)


# ----------------------------------------------------------------------------- state_dict
def _stream_free_state(loss):
    state = loss.state_dict()
    del state["_extra_state"]
    return state


@pytest.mark.parametrize("strict", [True, False])
def test_checkpoint_without_the_stream_loads_and_keeps_the_stream(strict):
    # a checkpoint from before the stream was saved: the rest loads, this loss's stream stays
    src = SoftDensityContrastiveLoss(C, D, **SMALL, seed=3)
    src(*_batch())
    dst = SoftDensityContrastiveLoss(C, D, **SMALL, seed=9)
    stream = dst.get_extra_state().clone()
    result = dst.load_state_dict(_stream_free_state(src), strict=strict)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(dst.get_extra_state(), stream)
    assert torch.equal(dst.bank.count, src.bank.count) and torch.equal(dst.bank.features, src.bank.features)


def test_non_strict_module_load_of_a_checkpoint_without_the_stream():
    # nn.Module's extension point ``_load_from_state_dict`` called with strict=False (as a
    # wrapper module may): no stream in the checkpoint is no error and nothing is reported
    src = SoftDensityContrastiveLoss(C, D, **SMALL, seed=3)
    state = {"loss." + k: v for k, v in _stream_free_state(src).items()}
    dst = SoftDensityContrastiveLoss(C, D, **SMALL, seed=9)
    stream = dst.get_extra_state().clone()
    missing, unexpected, errors = [], [], []
    dst._load_from_state_dict(state, "loss.", {}, False, missing, unexpected, errors)
    assert (missing, unexpected, errors) == ([], [], [])
    assert torch.equal(dst.get_extra_state(), stream)


@pytest.mark.parametrize("stray", ["_EXTRA_STATE", "XX_extra_stateXX", "extra_state", "note"])
def test_strict_load_reports_a_stray_key_and_only_it(stray):
    # a stray key is reported as unexpected, also in an old checkpoint without the stream (the
    # stream is not reported missing there, whatever the stray key resembles)
    src = SoftDensityContrastiveLoss(C, D, **SMALL, seed=3)
    for state in (src.state_dict(), _stream_free_state(src)):
        state[stray] = torch.zeros(2, dtype=torch.long)
        dst = SoftDensityContrastiveLoss(C, D, **SMALL, seed=9)
        with pytest.raises(RuntimeError) as info:
            dst.load_state_dict(state)
        message = str(info.value)
        assert f'Unexpected key(s) in state_dict: "{stray}"' in message and "Missing key(s)" not in message
        result = dst.load_state_dict(state, strict=False)  # not strict: listed, not raised
        assert result.missing_keys == [] and result.unexpected_keys == [stray]


def test_load_state_dict_pre_hooks_see_the_load_arguments_and_report_errors():
    # nn.Module's load machinery reaches the loss's hooks with the caller's strict flag and lists
    seen = []

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        seen.append((strict, type(missing_keys), type(unexpected_keys), type(error_msgs)))
        error_msgs.append("checkpoint refused by the hook")

    loss = SoftDensityContrastiveLoss(C, D, **SMALL, seed=0)
    loss.register_load_state_dict_pre_hook(hook)
    state = SoftDensityContrastiveLoss(C, D, **SMALL, seed=1).state_dict()
    with pytest.raises(RuntimeError, match=re.escape("checkpoint refused by the hook")):
        loss.load_state_dict(state)
    assert seen == [(True, list, list, list)]


# ----------------------------------------------------------------------------- paired_losses
@pytest.mark.parametrize("kw", [
    dict(weighting="none"), dict(weighting="scale"), dict(gamma=0.5), dict(include_positive=True),
    dict(reduction="sum"), dict(reduction="none"),
    dict(num_negatives=200),  # more negatives asked than there are: padded (invalid) negatives
    dict(bank_source="pixel", bank_push_per_class=3),  # pixel pushes: the pixel density and random picks
    dict(precision="bfloat16"),  # the density's matmul precision reaches both kNN calls
    dict(use_bank=False),  # no memory: no bank keys to group
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_paired_losses_forward_every_option_to_the_grouped_call(kw):
    _paired_equals_separate(**kw)


def test_paired_losses_in_eval_mode_leave_the_banks_as_they_were():
    grouped, _ = _pair()
    for loss in grouped:
        loss.eval()
    da, db = paired_losses(*grouped, *_batch(seed=0), *_batch(seed=1))
    assert [loss.bank.count.tolist() for loss in grouped] == [[0, 0, 0], [0, 0, 0]]
    assert da.bank_fill.tolist() == [0, 0, 0] and db.bank_fill.tolist() == [0, 0, 0]
    for loss in grouped:
        loss.update_bank_in_eval = True
    paired_losses(*grouped, *_batch(seed=0), *_batch(seed=1))
    assert [loss.bank.count.tolist() for loss in grouped] == [[3, 3, 3], [3, 3, 3]]


@pytest.mark.parametrize("a, b", [(dict(ks=(2, 4)), dict(ks=(3,))),
                                  (dict(temperature=0.4), dict(temperature=0.1))])
def test_paired_losses_with_different_density_or_term_options_match_their_own_calls(a, b):
    # the two losses differ in one stage only (the kNN density, or the term): each still gets
    # what its own call gives
    grouped = [SoftDensityContrastiveLoss(C, D, seed=1, **{**SMALL, **a}),
               SoftDensityContrastiveLoss(C, D, seed=2, **{**SMALL, **b})]
    separate = [SoftDensityContrastiveLoss(C, D, seed=1, **{**SMALL, **a}),
                SoftDensityContrastiveLoss(C, D, seed=2, **{**SMALL, **b})]
    for step in range(2):
        (ea, ya), (eb, yb) = _batch(seed=10 * step), _batch(seed=10 * step + 1)
        da, db = paired_losses(*grouped, ea, ya, eb, yb)
        _assert_details_close(da, separate[0](ea, ya, return_details=True))
        _assert_details_close(db, separate[1](eb, yb, return_details=True))


def test_paired_losses_do_not_check_the_term_options_again():
    # the options were checked once (by the loss); the grouped call, like the loss's own call,
    # takes the term's values as they are, here a temperature written on the stage directly
    grouped, separate = _pair()
    for loss in grouped + separate:
        loss.term.temperature = -0.5
    (ea, ya), (eb, yb) = _batch(seed=0), _batch(seed=1)
    da, db = paired_losses(*grouped, ea, ya, eb, yb)
    _assert_details_close(da, separate[0](ea, ya, return_details=True))
    _assert_details_close(db, separate[1](eb, yb, return_details=True))


def test_paired_class_anchor_losses_run_as_two_calls():
    # anchor_mode="class" is never grouped: each loss's value and graph are its own call's, so
    # the first loss's backward leaves the second model's embeddings without a gradient
    grouped, separate = _pair(anchor_mode="class")
    (ea, ya), (eb, yb) = _batch(seed=0), _batch(seed=1)
    da, db = paired_losses(*grouped, ea, ya, eb, yb)
    _assert_details_close(da, separate[0](ea, ya, return_details=True))
    _assert_details_close(db, separate[1](eb, yb, return_details=True))
    da.loss.backward()
    assert ea.grad is not None and eb.grad is None


def test_paired_losses_do_not_check_the_density_options_again():
    # as for the term: the kNN scales written on the stage directly (numpy ints, which the
    # loss's own check refuses) are taken as they are, by the grouped call as by the own call
    grouped, separate = _pair()
    for loss in grouped + separate:
        loss.density.ks = tuple(np.array([2, 4]))
    (ea, ya), (eb, yb) = _batch(seed=0), _batch(seed=1)
    da, db = paired_losses(*grouped, ea, ya, eb, yb)
    _assert_details_close(da, separate[0](ea, ya, return_details=True))
    _assert_details_close(db, separate[1](eb, yb, return_details=True))


def test_paired_losses_of_batches_of_different_sizes_match_their_own_calls():
    # the per-image prototypes (Eq. 2, for the bank) of a 3-image and a 2-image batch differ
    # in shape; each loss still gets its own call's details, gradient and bank
    grouped, separate = _pair()
    for step in range(2):
        ea, ya = _batch(n=3, seed=10 * step)
        eb, yb = _batch(n=2, h=5, w=6, seed=10 * step + 1)
        da, db = paired_losses(*grouped, ea, ya, eb, yb)
        sa, sb = separate[0](ea, ya, return_details=True), separate[1](eb, yb, return_details=True)
        _assert_details_close(da, sa)
        _assert_details_close(db, sb)
        ga = torch.autograd.grad(da.loss + 2 * db.loss, (ea, eb))
        gs = torch.autograd.grad(sa.loss + 2 * sb.loss, (ea, eb))
        for x, y in zip(ga, gs):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    assert [loss.bank.count.tolist() for loss in grouped] == [[6, 6, 6], [4, 4, 4]]  # a prototype per image
    for a, b in zip(grouped, separate):
        _assert_state_close(a, b)


def test_density_of_the_sample_is_the_knn_density_in_the_loss_precision():
    # every pixel is sampled (fewer than max_samples_per_class per class): the sampled
    # densities of class k are Eq. 3-5 over the pixels of class k, with the similarity
    # matmul in the loss's precision (bfloat16 differs from float32 by about 1e-3 here)
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(2, D, 5, 6, generator=g), torch.randint(0, C, (2, 5, 6), generator=g)
    pixels = emb.permute(0, 2, 3, 1)
    loss = SoftDensityContrastiveLoss(C, D, ks=(2, 4), num_anchors=4, num_positives=4, num_negatives=8,
                                      max_samples_per_class=40, use_bank=False, seed=0, precision="bfloat16")
    out = loss(emb, labels, return_details=True)
    for k in range(C):
        feats = pixels[labels == k]
        assert int(out.sample_valid[k].sum()) == len(feats)
        got = out.density[k][out.sample_valid[k]].sort().values
        ref = {p: DF.knn_density_grouped(feats[None], torch.ones(1, len(feats), dtype=torch.bool), (2, 4),
                                         precision=p)[0].sort().values for p in ("bfloat16", "float32")}
        torch.testing.assert_close(got, ref["bfloat16"], rtol=0, atol=1e-5)
        assert (got - ref["float32"]).abs().max() > 1e-4  # the two precisions are told apart


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_per_class_means_of_half_precision_fields_are_float32_means(dtype):
    # a half-precision count is exact only up to 2048 (float16) / 256 (bfloat16) and a float16
    # one overflows past 65504: the means count and sum in float32, like the counts' summaries
    n = 70000
    x = torch.zeros(2, n, dtype=dtype)
    x[0] = 0.5  # row 0: 70000 valid entries of 0.5
    x[1, 0] = 1.0  # row 1: 257 valid entries, one 1 and 256 zeros
    valid = torch.zeros(2, n, dtype=torch.bool)
    valid[0], valid[1, :257] = True, True
    details = DACLDetails(torch.tensor(0.0), x, valid, x, valid, valid.sum(), positive_density=x,
                          positive_valid=valid, anchor_center_cosine=x)
    s = details.per_class()
    want = torch.tensor([0.5, 1 / 257])
    for key in ("anchor_density", "positive_density", "anchor_center_cosine"):
        assert s[key].dtype == torch.float32, key
        torch.testing.assert_close(s[key], want, rtol=1e-6, atol=0, msg=key)
    assert s["anchors"].tolist() == [70000.0, 257.0]


# ----------------------------------------------------------------------------- review of the f7d386b run (2)
def test_defaults_sample_512_pixels_per_class_and_push_64_of_them_into_a_pixel_bank():
    # max_samples_per_class defaults to N_q + N_p^+/2 = 512 (docstring), bank_push_per_class to 64:
    # two classes of 800 pixels each
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 4, 40, 40, generator=g)
    labels = torch.zeros(1, 40, 40, dtype=torch.long)
    labels[:, 20:] = 1
    loss = SoftDensityContrastiveLoss(2, 4, bank_source="pixel", seed=0)
    out = loss(emb, labels, return_details=True)
    assert out.sample_valid.shape == (2, 512) and out.sample_valid.sum(1).tolist() == [512, 512]
    assert loss.bank.count.tolist() == [64, 64]


def test_gather_distributed_loss_sees_the_global_batch_banks_it_once_and_takes_the_broadcast_seed(monkeypatch):
    # rank 1 of a simulated 2-rank group whose rank 0 contributes a copy of this rank's sample:
    # the loss works on the gathered (global) sample, every rank pushes that same global sample
    # into its bank (so the bank must not gather it again: each prototype enters once), and the
    # stream's seed, drawn at the first call, is rank 0's broadcast draw
    import torch_dacl.distributed as tdist

    monkeypatch.setattr(tdist, "is_distributed", lambda: True)
    monkeypatch.setattr(tdist, "world_size", lambda: 2)
    monkeypatch.setattr(tdist, "rank", lambda: 1)
    monkeypatch.setattr(tdist, "shared_seed", lambda device: 4242)
    monkeypatch.setattr(tdist, "gather_sizes", lambda n, device, uniform=False: [n, n])
    monkeypatch.setattr(tdist, "all_gather_with_grad", lambda x, uniform=False, sizes=None: torch.cat([x.detach(), x]))
    monkeypatch.setattr(tdist, "all_gather_cat", lambda *ts: tuple(torch.cat([t, t]) for t in ts))
    emb, labels = _batch(n=2)
    loss = SoftDensityContrastiveLoss(C, D, **SMALL, gather_distributed=True)
    assert loss.gather_distributed
    out = loss(emb, labels, return_details=True)
    local = torch.stack([(labels == k).sum() for k in range(C)])
    assert out.sample_valid.shape == (C, 80) and torch.equal(out.sample_valid.sum(1), 2 * local)
    assert loss.bank.count.tolist() == [4, 4, 4]  # the 2 x 2 images' prototypes, once each
    assert loss.get_extra_state().tolist() == [4242, 1]


def test_without_validation_labels_outside_the_classes_take_no_part():
    # validate=False skips the value check; a label outside [0, C) is then left out like
    # ignore_index (PixelSampler, one-hot maps): the same details, bank and stream
    emb, labels = _batch(seed=3)
    odd, ignored = labels.clone(), labels.clone()
    odd[:, 0], odd[:, 1] = 7, -5
    ignored[:, :2] = -100
    a = SoftDensityContrastiveLoss(C, D, **SMALL, seed=0, validate=False)
    b = SoftDensityContrastiveLoss(C, D, **SMALL, seed=0)
    _assert_details_close(a(emb, odd, return_details=True), b(emb, ignored, return_details=True))
    _assert_state_close(a, b)
    with pytest.raises(ValueError, match=re.escape("labels: expected values in [0, 3) or ignore_index=-100")):
        b(emb, odd)


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("dtype, num_classes, values", [(torch.uint8, 300, (0, 100, 200, 255)),
                                                         (torch.int8, 200, (0, 50, 127, -100))],
                         ids=["uint8-300", "int8-200"])
def test_small_integer_labels_of_many_classes_give_the_int64_labels_result(validate, dtype, num_classes, values):
    # any integer dtype: class bounds compared in uint8 / int8 wrap (300 -> 44, 200 -> -56), so
    # the labels are checked and grouped as int64
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, D, 5, 6, generator=g)
    labels = torch.tensor(values)[torch.randint(0, len(values), (2, 5, 6), generator=g)]
    kw = dict(SMALL, seed=0, validate=validate)
    a, b = SoftDensityContrastiveLoss(num_classes, D, **kw), SoftDensityContrastiveLoss(num_classes, D, **kw)
    out = a(emb, labels.to(dtype), return_details=True)
    _assert_details_close(out, b(emb, labels, return_details=True))
    _assert_state_close(a, b)
    assert out.sample_valid.sum(1)[list(values[1:3])].tolist() == [int((labels == v).sum()) for v in values[1:3]]


def test_sparse_head_prototypes_take_the_probs_masks_at_the_threshold():
    # every pixel sampled: Eq. 2 over the sampled pixels is Eq. 2 over all pixels, so a pointwise
    # head run sparsely banks the dense path's prototypes, with T_n = probs_n > phi (phi = 0.3)
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(2, D, 5, 6, generator=g), torch.randint(0, C, (2, 5, 6), generator=g)
    probs = torch.softmax(2 * torch.randn(2, C, 5, 6, generator=g), 1)
    head = torch.nn.Linear(D, D)
    with torch.no_grad():
        emb = head(feats.movedim(1, -1)).movedim(-1, 1)
    kw = dict(SMALL, max_samples_per_class=60, threshold=0.3, seed=0)
    sparse, dense = SoftDensityContrastiveLoss(C, D, **kw), SoftDensityContrastiveLoss(C, D, **kw)
    sparse(feats, labels, probs, head=head)
    dense(emb, labels, probs)
    _assert_state_close(sparse, dense)
    # the premise: one-hot masks, or probs at phi = 0.5, bank other prototypes
    for other_kw, other_probs in ((kw, None), (dict(kw, threshold=0.5), probs)):
        other = SoftDensityContrastiveLoss(C, D, **other_kw)
        other(emb, labels, other_probs)
        assert not torch.allclose(other.bank.features, dense.bank.features, atol=1e-3)


@pytest.mark.parametrize("scale", [1, 2], ids=["same-size", "resized"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["float64", "float16"])
def test_probs_masks_compare_each_probability_with_phi_resized_or_not(dtype, scale):
    # Eq. 2: T_n = 1(p_n > phi). Class 2 is reliable at one pixel only, where its probability is
    # just above phi = 0.3 (0.3 + 1e-12 in float64, float16's 0.30005 in float16), so its only
    # prototype is that pixel's embedding, with the map at the embeddings' size or at twice the
    # size (nearest neighbour gives back the same map)
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(2, D, 4, 5, generator=g), torch.randint(0, C, (2, 4, 5), generator=g)
    p2 = 0.3 + 1e-12 if dtype == torch.float64 else float(torch.tensor(0.3, dtype=dtype))
    assert p2 > 0.3
    probs = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64).view(1, C, 1, 1).repeat(2, 1, 4, 5)
    probs[0, :, 1, 2] = torch.tensor([0.35, 0.65 - p2, p2], dtype=torch.float64)
    probs = probs.to(dtype).repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    loss = SoftDensityContrastiveLoss(C, D, **SMALL, threshold=0.3, seed=0)
    loss(emb, labels, probs)
    assert loss.bank.count.tolist() == [2, 2, 1]
    feats, _ = loss.bank.entries(2)
    torch.testing.assert_close(feats, emb[0, :, 1, 2].view(1, D), rtol=0, atol=0)
