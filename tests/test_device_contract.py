"""Device placement without a GPU: the helpers that allocate their own tensors allocate them on
their inputs' device.

On a CPU-only machine a dropped ``device=`` argument changes nothing, because every tensor lands
on the CPU anyway. PyTorch's ``meta`` device tells the two apart here: it runs shape and dtype
logic without data, and refuses to mix a meta tensor with a (non-scalar) CPU one. So each
helper below, given meta inputs, must return meta outputs of the right shape, which fails if any
tensor it makes is left on the default device. Only helpers without data-dependent steps (no
``.item()``, ``nonzero`` or ``bincount``) can run on meta; the others are covered on a GPU by
``tests/test_stages_contract.py::test_ranking_helpers_run_on_the_inputs_device``.
"""

import torch

import torch_dacl.functional as DF
from torch_dacl.stages import count_shared, one_hot_maps, split_by_rank

META = torch.device("meta")


def test_one_hot_maps_stay_on_the_labels_device():
    labels = torch.zeros(2, 4, 5, dtype=torch.long, device=META)
    maps = one_hot_maps(labels, 3, ignore_index=-100)
    assert maps.device == META and maps.shape == (2, 3, 4, 5) and maps.dtype == torch.float32
    maps = one_hot_maps(torch.zeros(2, 3, 4, 5, dtype=torch.long, device=META), 4)  # 3-D labels
    assert maps.device == META and maps.shape == (2, 4, 3, 4, 5)


def test_split_by_rank_stays_on_the_keys_device():
    key = torch.zeros(3, 8, device=META)
    valid = torch.ones(3, 8, dtype=torch.bool, device=META)
    low, low_ok, high, high_ok = split_by_rank(key, valid, 2, 3)
    assert [t.device for t in (low, low_ok, high, high_ok)] == [META] * 4
    assert low.shape == low_ok.shape == (3, 2) and high.shape == high_ok.shape == (3, 3)


def test_count_shared_stays_on_the_indices_device():
    idx = torch.zeros(3, 4, dtype=torch.long, device=META)
    ok = torch.ones(3, 4, dtype=torch.bool, device=META)
    shared = count_shared(idx, ok, idx, ok, 8)
    assert shared.device == META and shared.shape == (3,)


def test_knn_density_of_no_features_stays_on_their_device():
    feats = torch.zeros(0, 4, device=META)
    labels = torch.zeros(0, dtype=torch.long, device=META)
    for bank in (None, torch.zeros(3, 5, 4, device=META)):
        dens = DF.knn_density(feats, labels, (2,), bank=bank)
        assert dens.device == META and dens.shape == (0,)


def test_objective_counts_pseudo_labels_on_the_labels_device():
    from torch_dacl import DACLObjective

    objective = DACLObjective(3, dim=8, total_steps=10)
    y = torch.zeros(2, 4, 4, dtype=torch.long, device=META)
    counts = objective._count(y, torch.ones(2, 4, 4, dtype=torch.bool, device=META))
    assert counts.device == META and counts.shape == (3,)
