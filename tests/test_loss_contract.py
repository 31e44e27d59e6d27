"""The contract of ``torch_dacl.loss`` beyond tests/test_modules.py and test_module_reference.py:
the docstrings of the option properties, ``DACLDetails.per_class`` on hand-made masks, the
diagnostics fields (anchor-center cosine against a batch whose answer is known, the bank fill
of a disabled bank, the ``contributing`` mask), ``state_dict`` loading (old checkpoints without
the random stream, stray keys, load hooks), and :func:`~torch_dacl.loss.paired_losses` against
two separate calls for every option that the grouped call forwards."""

from __future__ import annotations

import re

import pytest
import torch

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
