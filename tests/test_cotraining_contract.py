"""The contract of ``torch_dacl.cotraining`` beyond tests/test_sparse_heads.py: the documented
defaults (embedding dimension 64), every constructor argument reaching both heads, the heads
following a model's device (the meta device) and floating dtype only, the last element of a
tuple/list feature output, the hooks keeping nothing outside the wrapper's forward, the
boundaries of the sampled-point normalisation (one point, two points, the running-statistics
update against BatchNorm, the affine shift, masks of other dtypes, features of another
dtype), ``feature_layers`` on 1-D/2-D/3-D inputs of unequal sides, tuple outputs, layers of
another rank and layers run twice, and ``made_by`` on inputs that are not the head's."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_dacl import CoTrainingWrapper, ProjectionHead, SegmentationWithEmbeddings, feature_layers
from torch_dacl.cotraining import made_by


def exactly(message: str) -> str:
    """A ``pytest.raises(match=)`` pattern that accepts ``message`` and nothing else."""
    return "^" + re.escape(message) + "$"


def _net(ch=6, classes=3):
    return nn.Sequential(nn.Conv2d(1, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, classes, 1))


class _TripleOut(nn.Module):
    """A feature layer whose output is a 3-tuple; the feature map is the last element."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(1, ch, 3, padding=1)

    def forward(self, x):
        f = self.conv(x)
        return f + 1.0, f + 2.0, f


class _TripleNet(nn.Module):
    def __init__(self, ch=6, classes=3):
        super().__init__()
        self.feat = _TripleOut(ch)
        self.out = nn.Conv2d(ch, classes, 1)

    def forward(self, x):
        return self.out(self.feat(x)[-1])


class _SwitchNet(nn.Module):
    """A network whose layer ``feat`` runs only while ``use_feat`` is set."""

    def __init__(self, ch=6, classes=3):
        super().__init__()
        self.feat = nn.Conv2d(1, ch, 3, padding=1)
        self.skip = nn.Conv2d(1, ch, 3, padding=1)
        self.out = nn.Conv2d(ch, classes, 1)
        self.use_feat = True

    def forward(self, x):
        return self.out(self.feat(x) if self.use_feat else self.skip(x))


# ----------------------------------------------------------------------------- defaults and arguments
def test_projection_head_default_embedding_dimension_is_64():
    # the documented default out_channels D = 64, in both paths
    head = ProjectionHead(4)
    assert head.out_channels == 64
    assert head(torch.randn(2, 4, 3, 3)).shape == (2, 64, 3, 3)
    assert head.embed_points(torch.randn(5, 4)).shape == (5, 64)


def test_projection_head_hidden_relu_works_in_place():
    # the dense head rectifies the normalised hidden map in place (no second hidden-size map)
    assert ProjectionHead(4, 8).net[2].inplace is True
    assert ProjectionHead(4, 8, spatial_dims=3).net[2].inplace is True


def test_segmentation_with_embeddings_default_embedding_dimension_is_64():
    model = SegmentationWithEmbeddings(_net(), feature_layer="1", feature_channels=6, sparse_head=False)
    assert model.head.out_channels == 64
    logits, emb = model(torch.randn(2, 1, 5, 5))
    assert logits.shape == (2, 3, 5, 5) and emb.shape == (2, 64, 5, 5)


def test_wrapper_passes_hidden_dim_and_point_norm_to_both_heads():
    w = CoTrainingWrapper(_net(), _net(), feature_layer="1", feature_channels=6, embed_dim=8, hidden_dim=5,
                          point_norm="frozen")
    for head in w.heads:
        assert head.net[0].out_channels == 5 and head.net[3].in_channels == 5
        assert head.point_norm == "frozen"


def test_segmentation_with_embeddings_passes_hidden_dim_and_point_norm_to_its_head():
    model = SegmentationWithEmbeddings(_net(), feature_layer="1", feature_channels=6, embed_dim=8, hidden_dim=5,
                                       point_norm="frozen")
    assert model.head.net[0].out_channels == 5 and model.head.net[3].in_channels == 5
    assert model.head.point_norm == "frozen"


# ----------------------------------------------------------------------------- heads follow the model
def test_heads_follow_a_model_on_the_meta_device():
    # the heads are created on the models' device (the meta device shows it without a GPU)
    net = _net().to("meta")
    model = SegmentationWithEmbeddings(net, feature_layer="1", feature_channels=6, embed_dim=8)
    assert all(p.device.type == "meta" for p in model.head.parameters())
    w = CoTrainingWrapper(net, copy.deepcopy(net), feature_layer="1", feature_channels=6, embed_dim=8)
    assert all(p.device.type == "meta" for head in w.heads for p in head.parameters())


def test_heads_of_a_model_without_parameters_stay_float32_on_the_cpu():
    # a model with nothing to follow keeps the head as built
    net = nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.Identity())
    model = SegmentationWithEmbeddings(net, feature_layer="0", feature_channels=1, embed_dim=8, sparse_head=False)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.head.parameters())
    logits, emb = model(torch.randn(2, 1, 4, 4))
    assert emb.shape == (2, 8, 4, 4)


def test_heads_keep_float32_when_the_first_parameter_is_not_floating():
    # only a floating first parameter sets the heads' dtype (an integer one is ignored)
    net = _net()
    net.register_parameter("steps", nn.Parameter(torch.zeros(1, dtype=torch.long), requires_grad=False))
    assert next(net.parameters()).dtype == torch.long
    model = SegmentationWithEmbeddings(net, feature_layer="1", feature_channels=6, embed_dim=8)
    assert all(p.dtype == torch.float32 for p in model.head.parameters())
    w = CoTrainingWrapper(net, copy.deepcopy(net), feature_layer="1", feature_channels=6, embed_dim=8)
    assert all(p.dtype == torch.float32 for head in w.heads for p in head.parameters())


# ----------------------------------------------------------------------------- feature hooks
def test_a_tuple_feature_output_gives_its_last_element():
    x = torch.randn(2, 1, 5, 5)
    torch.manual_seed(0)
    a, b = _TripleNet(), _TripleNet()
    w = CoTrainingWrapper(a, b, feature_layer="feat", feature_channels=6, embed_dim=8)
    out = w(x)
    torch.testing.assert_close(out.features_a, a.feat(x)[-1], rtol=0, atol=0)
    torch.testing.assert_close(out.features_b, b.feat(x)[-1], rtol=0, atol=0)
    model = SegmentationWithEmbeddings(a, feature_layer="feat", feature_channels=6, embed_dim=8)
    logits, feats = model(x)
    torch.testing.assert_close(feats, a.feat(x)[-1], rtol=0, atol=0)
    torch.testing.assert_close(logits, a(x), rtol=0, atol=0)


def test_wrapper_keeps_no_feature_of_a_model_called_alone():
    # the hooks keep features only during the wrapper's forward: a model called alone in
    # between leaves nothing that a later forward could take for its own
    x = torch.randn(1, 1, 5, 5)
    a, b = _SwitchNet(), _SwitchNet()
    w = CoTrainingWrapper(a, b, feature_layer="feat", feature_channels=6, embed_dim=8)
    w(x)
    b(x)  # alone, e.g. at inference
    b.use_feat = False
    with pytest.raises(RuntimeError, match=exactly("the hook on 'feat' of model_b did not fire during forward")):
        w(x)
    b.use_feat = True
    assert w(x).features_b.shape == (1, 6, 5, 5)


def test_segmentation_with_embeddings_keeps_no_feature_of_the_model_called_alone():
    x = torch.randn(1, 1, 5, 5)
    net = _SwitchNet()
    model = SegmentationWithEmbeddings(net, feature_layer="feat", feature_channels=6, embed_dim=8)
    message = exactly("the hook on 'feat' did not fire during the model's forward")
    net(x)  # alone before the first forward
    net.use_feat = False
    with pytest.raises(RuntimeError, match=message):
        model(x)
    net.use_feat = True
    model(x)
    net(x)  # alone after a forward
    net.use_feat = False
    with pytest.raises(RuntimeError, match=message):
        model(x)
    with pytest.raises(RuntimeError, match=message):  # and again after a failed forward
        model(x)


# ----------------------------------------------------------------------------- embed_points
def test_embed_points_casts_the_features_to_the_heads_dtype():
    # features of another dtype (e.g. from an autocast forward) are mapped in the head's dtype
    head = ProjectionHead(3, 4)
    x = torch.randn(10, 3, dtype=torch.float64)
    ref = copy.deepcopy(head).embed_points(x.float())
    out = head.embed_points(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def _head_with_stats(seed=0):
    torch.manual_seed(seed)
    head = ProjectionHead(3, 4, hidden_channels=5)
    with torch.no_grad():  # non-trivial running statistics and affine
        bn = head.net[1]
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    return head


def _stats(head):
    bn = head.net[1]
    return [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


def test_embed_points_affine_shift_is_added_as_in_the_dense_head():
    # frozen normalisation and eval mode: the point path equals the dense head, bias included
    head = _head_with_stats()
    x = torch.randn(12, 3)
    dense = head.eval()(x.view(12, 3, 1, 1)).view(12, 4)
    torch.testing.assert_close(head.embed_points(x), dense, rtol=1e-5, atol=1e-6)
    head.train()
    head.point_norm = "frozen"
    torch.testing.assert_close(head.embed_points(x), dense, rtol=1e-5, atol=1e-6)


def test_embed_points_one_valid_point_normalises_to_zero_and_keeps_the_statistics():
    # one sampled point: its batch mean is itself (normalised value 0, the output is the head
    # at the BatchNorm shift), and a sample of fewer than 2 points moves no running statistic
    head = _head_with_stats()
    before = _stats(head)
    x = torch.randn(6, 3)
    valid = torch.tensor([False, False, True, False, False, False])
    out = head.embed_points(x, valid)
    conv2, bn = head.net[3], head.net[1]
    expected = F.linear(F.relu(bn.bias), conv2.weight.flatten(1), conv2.bias)
    torch.testing.assert_close(out[2], expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(_stats(head), before):
        assert torch.equal(got, want)
    head.embed_points(x[2:3])  # one row, no mask
    head.embed_points(x, torch.zeros(6, dtype=torch.bool))  # no valid row at all
    for got, want in zip(_stats(head), before):
        assert torch.equal(got, want)


def test_embed_points_two_valid_points_update_the_statistics_as_batchnorm():
    # two points: the smallest sample that updates the running statistics (unbiased variance)
    head = _head_with_stats()
    ref = copy.deepcopy(head)
    x = torch.randn(5, 3)
    valid = torch.tensor([False, True, False, True, False])
    out = head.embed_points(x, valid)
    dense = ref(x[valid].view(2, 3, 1, 1)).view(2, 4)  # BatchNorm in training mode over the two points
    torch.testing.assert_close(out[valid], dense, rtol=1e-4, atol=1e-5)
    bn, bn_ref = head.net[1], ref.net[1]
    assert int(bn.num_batches_tracked) == int(bn_ref.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)


def test_embed_points_counts_a_mask_of_another_dtype_exactly():
    # the mask is a 0/1 weight in float32: a half-precision mask counts 2049 points as 2049
    head = ProjectionHead(2, 3)
    ref = copy.deepcopy(head)
    x = torch.randn(2052, 2, generator=torch.Generator().manual_seed(0)) + 3.0
    valid = torch.ones(2052, dtype=torch.bool)
    valid[-3:] = False
    out = head.embed_points(x, valid.half())
    torch.testing.assert_close(out, ref.embed_points(x, valid), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.net[1].running_mean, ref.net[1].running_mean)
    torch.testing.assert_close(head.net[1].running_var, ref.net[1].running_var)


def test_a_float64_head_normalises_in_float64():
    # half precision goes up to float32 for the normalisation, float64 stays float64: in eval
    # the point path equals the dense float64 head to float64 precision, and in training the
    # running statistics match BatchNorm's in float64
    head = _head_with_stats().double()
    x = torch.randn(12, 3, dtype=torch.float64)
    dense = head.eval()(x.view(12, 3, 1, 1)).view(12, 4)
    out = head.embed_points(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, dense, rtol=1e-12, atol=1e-12)
    head.train()
    ref = copy.deepcopy(head)
    out = head.embed_points(x)
    torch.testing.assert_close(out, ref(x.view(12, 3, 1, 1)).view(12, 4), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.net[1].running_mean, ref.net[1].running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.net[1].running_var, ref.net[1].running_var, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- feature_layers
def _rows(model, x):
    return [(ly.name, ly.channels, ly.spatial, ly.scale) for ly in feature_layers(model, x)]


def test_feature_layers_scale_is_the_last_axis_fraction_for_1d_2d_and_3d_inputs():
    # sides of unequal length, each halved by the pooling: the scale is 0.5 whatever the rank
    net1 = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.MaxPool1d(2))
    assert _rows(net1, torch.randn(1, 1, 12)) == [("0", 4, (12,), 1.0), ("1", 4, (6,), 0.5)]
    net2 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2))
    assert _rows(net2, torch.randn(1, 1, 8, 12)) == [("0", 4, (8, 12), 1.0), ("1", 4, (4, 6), 0.5)]
    net3 = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.MaxPool3d(2))
    assert _rows(net3, torch.randn(1, 1, 4, 8, 12)) == [("0", 4, (4, 8, 12), 1.0), ("1", 4, (2, 4, 6), 0.5)]


def test_feature_layers_reads_the_last_element_of_a_tuple_output():
    rows = _rows(_TripleNet(ch=5), torch.randn(1, 1, 6, 6))
    assert rows == [("feat.conv", 5, (6, 6), 1.0), ("feat", 5, (6, 6), 1.0), ("out", 3, (6, 6), 1.0)]

    class Mixed(nn.Module):  # a tuple whose elements differ: the last one is the candidate
        def forward(self, x):
            return x[:, :1], x[:, :2, ::2, ::2], x[:, :, ::2]

    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Mixed())
    assert _rows(net, torch.randn(1, 1, 8, 8)) == [("0", 4, (8, 8), 1.0), ("1", 4, (4, 8), 1.0)]


def test_feature_layers_skips_outputs_of_another_rank_and_lists_a_layer_once():
    relu = nn.ReLU()  # one module run twice
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), relu, nn.Conv2d(4, 4, 1), relu,
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    assert _rows(net, torch.randn(2, 1, 8, 8)) == [
        ("0", 4, (8, 8), 1.0), ("1", 4, (8, 8), 1.0), ("2", 4, (8, 8), 1.0), ("4", 4, (1, 1), 0.125)]


# ----------------------------------------------------------------------------- made_by
def test_made_by_is_false_for_what_the_head_did_not_make():
    # anything that is not the head's dense output, graphs with inputs that need no gradient included
    head = ProjectionHead(4, 8)
    f = torch.randn(2, 4, 3, 3, requires_grad=True)
    assert not made_by(None, head)  # not a tensor
    assert not made_by(f * 2.0, head)  # an operation with an input outside the graph
    assert not made_by(head.net[:3](f) * torch.ones(1), head)
    assert made_by(head(f), head) and made_by(head(f * 2.0), head)


def test_a_float16_head_normalises_in_float32_without_overflow():
    # features whose first-layer activations spread by about +-600: their squares (3.6e5) overflow
    # float16 (max 65504), so a normalisation in the head's own dtype gives an infinite variance
    # and a constant output; in float32 the point path matches the float32 head's to float16 rounding
    torch.manual_seed(0)
    head = ProjectionHead(3, 4, hidden_channels=5).train()
    with torch.no_grad():
        head.net[0].weight.fill_(1.0)
    x = torch.randn(64, 3) * 200
    ref = copy.deepcopy(head)(x.view(64, 3, 1, 1)).view(64, 4)
    out = head.half().embed_points(x.half())
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    assert ref.std(0).min() > 0.05  # the reference is not constant: a collapsed output cannot match it
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
