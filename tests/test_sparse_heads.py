"""The sparse heads: the projection head run at the pixels the loss samples equals the dense
head there (loss, gradient on the feature map, memory bank), and the gradient is zero
elsewhere; the normalisation is the one documented difference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torch_dacl import (CoTrainingFeatures, CoTrainingWrapper, DACLObjective, ProjectionHead,
                        SegmentationWithEmbeddings, SoftDensityContrastiveLoss, feature_layers, load_checkpoint,
                        save_checkpoint)
from torch_dacl.stages import gather_points, sampled_prototypes

SMALL = dict(num_anchors=8, num_positives=8, num_negatives=8, bank_size=16, ks=(2, 4))


def _pair(c, d, **kw):
    opts = {**SMALL, "seed": 3, **kw}
    return SoftDensityContrastiveLoss(c, d, **opts), SoftDensityContrastiveLoss(c, d, **opts)


def _labels(shape, c, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, shape, generator=g)
    y.view(-1)[:: 7] = -100  # some ignored pixels
    return y


@pytest.mark.parametrize("spatial", [(10, 12), (4, 6, 8)])
@pytest.mark.parametrize("budget", [6, 10_000])
def test_sparse_head_equals_dense_head_at_the_sampled_pixels(spatial, budget):
    """Frozen normalisation (the dense head in eval mode): same loss, same gradient on the
    feature map, zero gradient off the sample, and the same bank over several steps. With a
    small budget the bank stores pixels (the sampled pixels' prototypes of Eq. 2 are an
    estimate, see the next tests); with every pixel sampled it stores the prototypes, which
    are then exact."""
    torch.manual_seed(0)
    c, f_ch, d = 3, 5, 8
    head = ProjectionHead(f_ch, d, spatial_dims=len(spatial), point_norm="frozen")
    with torch.no_grad():  # non-trivial running statistics and affine
        bn = head.net[1]
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
    head.eval()
    dense, sparse = _pair(c, d, max_samples_per_class=budget, bank_source="pixel" if budget < 100 else "prototype")
    feats = torch.randn(3, f_ch, *spatial, requires_grad=True)
    for step in range(3):
        y = _labels((3,) + spatial, c, step)
        feats.grad = None
        l_dense = dense(head(feats), y)
        l_dense.backward()
        g_dense = feats.grad.clone()
        feats.grad = None
        l_sparse = sparse(feats, y, head=head)
        l_sparse.backward()
        g_sparse = feats.grad.clone()
        torch.testing.assert_close(l_sparse, l_dense, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-7)
        touched = g_sparse.abs().sum(1) > 0  # pixels that received a gradient
        assert int(touched.sum()) <= c * budget and not bool(touched[y == -100].any())
        assert float(l_dense.detach()) > 0
    torch.testing.assert_close(sparse.bank.bank, dense.bank.bank, rtol=1e-5, atol=1e-6)
    assert torch.equal(sparse.bank.count, dense.bank.count) and int(dense.bank.count.sum()) > 0


def test_sample_norm_equals_dense_batchnorm_when_the_sample_is_every_pixel():
    """``point_norm="sample"`` normalises by the statistics of the sampled pixels: with every
    pixel sampled (no ignored pixel, budget above the class sizes) that is BatchNorm in
    training mode over the batch, running statistics included."""
    torch.manual_seed(0)
    head = ProjectionHead(4, 8)
    head_s = copy.deepcopy(head)
    dense, sparse = _pair(3, 8, max_samples_per_class=10_000)
    feats = torch.randn(2, 4, 9, 9, requires_grad=True)
    y = torch.randint(0, 3, (2, 9, 9))
    l_dense = dense(head(feats), y)
    (g_dense,) = torch.autograd.grad(l_dense, feats)
    l_sparse = sparse(feats, y, head=head_s)
    (g_sparse,) = torch.autograd.grad(l_sparse, feats)
    torch.testing.assert_close(l_sparse, l_dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-7)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(head_s.net[1], name), getattr(head.net[1], name))


def test_sample_norm_uses_only_the_valid_points():
    head = ProjectionHead(3, 4)
    x = torch.randn(10, 3)
    valid = torch.tensor([True] * 6 + [False] * 4)
    garbage = x.clone()
    garbage[6:] = 1e6  # padding rows must not move the statistics
    torch.testing.assert_close(head.embed_points(garbage, valid)[:6], head.embed_points(x[:6]), rtol=1e-5, atol=1e-6)
    head.eval()  # eval: the running statistics, as the dense head
    torch.testing.assert_close(head.embed_points(x), head(x.view(10, 3, 1, 1)).view(10, 4), rtol=1e-5, atol=1e-6)


def test_sampled_prototypes_match_a_loop():
    g = torch.Generator().manual_seed(0)
    m, d, c, n = 40, 3, 4, 5
    feats, image = torch.randn(m, d, generator=g), torch.randint(0, n, (m,), generator=g)
    masks, valid = torch.rand(m, c, generator=g) > 0.5, torch.rand(m, generator=g) > 0.2
    protos, ok = sampled_prototypes(feats, valid, image, masks, n)
    assert protos.shape == (c, n, d) and ok.shape == (c, n)
    for k in range(c):
        for i in range(n):
            rows = [feats[j] for j in range(m) if valid[j] and masks[j, k] and image[j] == i]
            assert bool(ok[k, i]) == bool(rows)
            if rows:
                torch.testing.assert_close(protos[k, i], torch.stack(rows).mean(0))


def test_gather_points_reads_strided_and_channels_last_views_in_place():
    x = torch.randn(2, 3, 6, 8)
    idx = torch.tensor([[0, 5, 47], [50, 95, 3]])
    ref = x.movedim(1, -1).reshape(-1, 3)[idx]
    torch.testing.assert_close(gather_points(x.contiguous(memory_format=torch.channels_last), idx), ref)
    grid = x[..., 1::2, ::2]  # a pixel grid: a strided view
    torch.testing.assert_close(gather_points(grid, idx % 24), grid.movedim(1, -1).reshape(-1, 3)[idx % 24])


def test_objective_sparse_equals_dense_with_frozen_heads():
    """The objective built with the heads (sparse) and the one fed dense embeddings give the same
    loss and the same gradients on the networks, pixel stride included."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1))

    x, y = torch.randn(4, 1, 12, 12), torch.randint(0, 3, (4, 12, 12))
    labeled = torch.tensor([True, True, False, False])
    grads, losses = [], []
    for sparse in (False, True):
        torch.manual_seed(1)
        w = CoTrainingWrapper(net(), net(), feature_layer="1", feature_channels=6, embed_dim=8, sparse_heads=sparse,
                              point_norm="frozen")
        w.head_a.eval(), w.head_b.eval()
        obj = DACLObjective.from_wrapper(w, num_classes=3, total_steps=10, warmup=0, seed=5, pixel_stride=2,
                                         pseudo_confidence=0.0, **SMALL)
        assert obj.sparse_heads == sparse
        torch.manual_seed(2)  # the pixel grid's offset
        res = obj(*w(x), labels=y, labeled=labeled)
        res.loss.backward()
        losses.append(res.loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in w.model_a.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_objective_cross_false_computes_no_cps_term():
    net = lambda: nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1))  # noqa: E731
    w = CoTrainingWrapper(net(), net(), feature_layer="1", feature_channels=6, embed_dim=8)
    obj = DACLObjective.from_wrapper(w, num_classes=3, total_steps=10, warmup=0, cross=False, **SMALL)
    res = obj(*w(torch.randn(2, 1, 8, 8)), labels=torch.randint(0, 3, (2, 8, 8)), labeled=torch.tensor([True, False]))
    assert float(res.cross) == 0.0 and float(res.cross_term) == 0.0
    torch.testing.assert_close(res.loss, res.cl_term)
    assert res.cross.grad_fn is None  # nothing computed


def test_heads_follow_their_model_device_and_dtype():
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1)).double()
    m = SegmentationWithEmbeddings(net, feature_layer="1", feature_channels=6, embed_dim=8)
    assert all(p.dtype == torch.float64 for p in m.head.parameters())
    logits, feats = m(torch.randn(2, 1, 8, 8, dtype=torch.float64))
    loss = SoftDensityContrastiveLoss(3, 8, **SMALL)(feats, logits.argmax(1), head=m.head)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    w = CoTrainingWrapper(copy.deepcopy(net), copy.deepcopy(net), feature_layer="1", feature_channels=6)
    assert w.head_b.net[0].weight.dtype == torch.float64
    assert isinstance(w(torch.randn(1, 1, 8, 8, dtype=torch.float64)), CoTrainingFeatures)


def test_feature_layers_lists_candidates_and_errors_point_to_it():
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 3, 1))
    layers = feature_layers(net, torch.randn(1, 1, 16, 16))
    assert [(ly.name, ly.channels, ly.spatial, ly.scale) for ly in layers] == [
        ("0", 6, (16, 16), 1.0), ("1", 6, (16, 16), 1.0), ("2", 6, (8, 8), 0.5), ("3", 3, (8, 8), 0.5)]
    with pytest.raises(ValueError, match="feature_layers"):
        CoTrainingWrapper(net, net, feature_layer="decoder", feature_channels=6)
    w = CoTrainingWrapper(net, copy.deepcopy(net), feature_layer="0", feature_channels=4)
    with pytest.raises(ValueError, match="pass feature_channels=6.*feature_layers"):
        w(torch.randn(1, 1, 16, 16))


def test_loss_head_errors():
    loss = SoftDensityContrastiveLoss(3, 8, anchor_mode="class", **SMALL)
    with pytest.raises(ValueError, match="anchor_mode='class'.*dense"):
        loss(torch.randn(1, 4, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), head=ProjectionHead(4, 8))
    loss = SoftDensityContrastiveLoss(3, 8, **SMALL)
    with pytest.raises(ValueError, match="expected 4 channels"):
        loss(torch.randn(1, 5, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), head=ProjectionHead(4, 8))
    with pytest.raises(ValueError, match="to 8 channels"):
        loss(torch.randn(1, 4, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), head=nn.Linear(4, 7))
    # any pointwise module maps (M, F) rows
    out = loss(torch.randn(2, 4, 4, 4), torch.randint(0, 3, (2, 4, 4)), head=nn.Linear(4, 8))
    assert torch.isfinite(out)


def test_checkpoint_round_trip_resumes_the_objective_exactly(tmp_path):
    net = lambda: nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1))  # noqa: E731
    torch.manual_seed(0)
    w = CoTrainingWrapper(net(), net(), feature_layer="1", feature_channels=6, embed_dim=8)
    obj = DACLObjective.from_wrapper(w, num_classes=3, total_steps=10, warmup=0, **SMALL)
    opt = torch.optim.SGD(w.parameters(), lr=0.1, momentum=0.9)
    x, y, lab = torch.randn(2, 1, 8, 8), torch.randint(0, 3, (2, 8, 8)), torch.tensor([True, False])

    def step():
        res = obj(*w(x), labels=y, labeled=lab)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        obj.step()
        return res.loss.detach()

    step()
    save_checkpoint(tmp_path / "c.pt", model=w, objective=obj, optimizer=opt, step=1)
    after = [step(), step()]
    w2 = copy.deepcopy(w)
    obj2 = DACLObjective.from_wrapper(w2, num_classes=3, total_steps=10, warmup=0, **SMALL)
    opt2 = torch.optim.SGD(w2.parameters(), lr=0.1, momentum=0.9)
    assert load_checkpoint(tmp_path / "c.pt", model=w2, objective=obj2, optimizer=opt2) == {"step": 1}
    w, obj, opt = w2, obj2, opt2
    again = [step(), step()]
    torch.testing.assert_close(torch.stack(again), torch.stack(after))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    with pytest.raises(KeyError, match="holds"):
        load_checkpoint(tmp_path / "c.pt", scheduler=opt)


def test_objective_refuses_the_heads_dense_output_when_it_runs_the_heads():
    """A dense wrapper's embeddings given to an objective that runs the heads would go through
    the head twice (undetectable by shape when F == D): the objective says so."""
    net = lambda: nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))  # noqa: E731
    w = CoTrainingWrapper(net(), net(), feature_layer="1", feature_channels=8, embed_dim=8, sparse_heads=False)
    obj = DACLObjective(num_classes=3, total_steps=10, warmup=0, heads=w.heads, **SMALL)  # sparse by default
    out = w(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="heads' dense output"):
        obj(*out, labels=torch.randint(0, 3, (2, 8, 8)), labeled=torch.tensor([True, False]))
    ok = DACLObjective.from_wrapper(w, num_classes=3, total_steps=10, warmup=0, **SMALL)  # follows the wrapper
    assert not ok.sparse_heads and torch.isfinite(ok(*w(torch.randn(2, 1, 8, 8)), labels=torch.randint(
        0, 3, (2, 8, 8)), labeled=torch.tensor([True, False])).loss)
    assert DACLObjective.from_wrapper(w, num_classes=3, total_steps=10, sparse_heads=True, dim=8).sparse_heads


def test_feature_layers_keeps_batchnorm_statistics():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    feature_layers(net, torch.randn(2, 1, 8, 8) * 5 + 3)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_embed_points_normalises_in_float32_under_autocast():
    head = ProjectionHead(4, 8)
    x = torch.randn(50, 4)
    ref = head.embed_points(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head.embed_points(x.bfloat16())
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


def test_embed_points_cumulative_running_statistics_as_batchnorm():
    """``momentum=None`` (a cumulative average) updates the running statistics as BatchNorm does."""
    head = ProjectionHead(3, 4)
    head.net[1].momentum = None
    ref = copy.deepcopy(head)
    for seed in range(3):
        x = torch.randn(20, 3, generator=torch.Generator().manual_seed(seed))
        head.embed_points(x)
        ref(x.view(20, 3, 1, 1))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(head.net[1], name), getattr(ref.net[1], name))


def test_embed_points_runs_in_the_heads_own_half_precision():
    """A bfloat16 head (a bfloat16 model's, which the heads follow) maps points in bfloat16,
    close to its dense forward at those points."""
    torch.manual_seed(0)
    head = ProjectionHead(4, 8).bfloat16().eval()
    x = torch.randn(6, 4, 5, 5).bfloat16()
    pts = x.movedim(1, -1).reshape(-1, 4)
    out = head.embed_points(pts)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), head(x).movedim(1, -1).reshape(-1, 8).float(), rtol=0.05, atol=0.05)


def test_ramp_and_objective_pickle_and_restore_the_host_step():
    """torch.save of the whole module (not only its state dict) works, and loading a state dict
    restores the host copy of the step that the schedule reads."""
    import io

    from torch_dacl import GaussianRampUp

    ramp = GaussianRampUp(10, max_weight=1.0, warmup_steps=0)
    for _ in range(4):
        ramp.step()
    buf = io.BytesIO()
    torch.save(ramp, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert again.value == ramp.value > 0
    fresh = GaussianRampUp(10, max_weight=1.0, warmup_steps=0)
    fresh.load_state_dict(ramp.state_dict())
    assert fresh.value == ramp.value
    obj = DACLObjective(num_classes=3, dim=8, total_steps=10, **SMALL)
    torch.save(obj, io.BytesIO())


def test_paired_losses_with_different_bank_sources_run_apart():
    """Two losses that differ in what their banks store do not share one grouped call: the pair
    gives what two separate calls give."""
    from torch_dacl.loss import paired_losses

    emb = [torch.randn(2, 8, 6, 6) for _ in range(2)]
    ys = [_labels((2, 6, 6), 3, s) for s in (0, 1)]
    for sources in (("prototype", "pixel"), ("pixel", "prototype")):
        la, lb = (SoftDensityContrastiveLoss(3, 8, **SMALL, seed=3, bank_source=s) for s in sources)
        ra, rb = copy.deepcopy(la), copy.deepcopy(lb)
        da, db = paired_losses(la, lb, emb[0], ys[0], emb[1], ys[1])
        torch.testing.assert_close(da.loss, ra(emb[0], ys[0]))
        torch.testing.assert_close(db.loss, rb(emb[1], ys[1]))


def test_made_by_sees_the_head_through_autocast_and_casts():
    from torch_dacl.cotraining import made_by

    head = ProjectionHead(4, 8)
    x = torch.randn(2, 4, 3, 3)
    assert made_by(head(x), head) and not made_by(head.net[:3](x), head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head(x)
    assert made_by(low, head) and made_by(low.float(), head)
    assert not made_by(x, head)


def test_objective_checks_both_feature_maps_channels():
    net = lambda: nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1))  # noqa: E731
    w = CoTrainingWrapper(net(), net(), feature_layer="1", feature_channels=6, embed_dim=8)
    obj = DACLObjective.from_wrapper(w, num_classes=3, total_steps=10, warmup=0, **SMALL)
    la, lb, fa, fb = w(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="embeddings_b: .*6 channels"):
        obj(la, lb, fa, fb[:, :5], labels=torch.randint(0, 3, (2, 8, 8)), labeled=torch.tensor([True, False]))
