"""Contracts of :class:`~torch_dacl.ClassMemoryBank` (``torch_dacl/bank.py``) that the other
bank tests leave open: the constructor's defaults (``L = 1000`` entries per class as in the
paper, no gathering unless asked), its checks naming each keyword, ``gather_distributed``
under a process group (the all-gather simulated in process), the integer ``count`` of the
docstring example, and a ``density`` buffer with one entry per feature slot."""

import re

import pytest
import torch

import torch_dacl.distributed as tdist
from torch_dacl import ClassMemoryBank


def other_rank(feats, labels, dens, valid):
    """Rank 1 of a simulated 2-rank group: ``all_gather_cat`` puts rank 0's items first."""
    def all_gather_cat(*ts):
        return tuple(torch.cat([o.to(t.dtype), t]) for o, t in zip((feats, labels, dens, valid), ts))
    return all_gather_cat


# --------------------------------------------------------------------------- defaults
def test_bank_default_keeps_the_papers_1000_entries_per_class():
    bank = ClassMemoryBank(num_classes=2, dim=1)
    assert bank.size == 1000 and bank.bank.shape == (2, 1000, 1) and bank.valid.shape == (2, 1000)
    bank.push(torch.arange(1001.0).unsqueeze(1), torch.zeros(1001, dtype=torch.long))
    assert bank.count.tolist() == [1000, 0]
    feats, _ = bank.entries(0)
    assert feats.flatten().tolist() == [float(v) for v in range(1, 1001)]  # the oldest one dropped


# --------------------------------------------------------------------------- checks
@pytest.mark.parametrize("kwargs,msg", [
    (dict(num_classes=0, dim=3), "num_classes: expected an int >= 1, got 0"),
    (dict(num_classes=2.0, dim=3), "num_classes: expected an int >= 1, got 2.0"),
    (dict(num_classes=2, dim=0), "dim: expected an int >= 1, got 0"),
    (dict(num_classes=2, dim=True), "dim: expected an int >= 1, got True"),
], ids=["num_classes=0", "num_classes=2.0", "dim=0", "dim=True"])
def test_bank_checks_its_sizes_naming_the_keyword(kwargs, msg):
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        ClassMemoryBank(**kwargs, size=4)


# --------------------------------------------------------------------------- gather_distributed
def test_bank_gathers_pushes_across_ranks_only_when_asked(monkeypatch):
    # this process is rank 1 of a simulated 2-rank group; rank 0 pushes two items of class 1
    mine = (torch.tensor([[1.0, 1.0], [2.0, 2.0]]), torch.tensor([0, 1]), torch.tensor([0.1, 0.2]),
            torch.tensor([True, True]))
    rank0 = (torch.tensor([[7.0, 7.0], [8.0, 8.0]]), torch.tensor([1, 1]), torch.tensor([0.7, 0.8]),
             torch.tensor([True, True]))
    monkeypatch.setattr(tdist, "is_distributed", lambda: True)
    monkeypatch.setattr(tdist, "all_gather_cat", other_rank(*rank0))

    gathered = ClassMemoryBank(2, 2, size=4, gather_distributed=True)
    gathered.push(*mine)
    assert gathered.count.tolist() == [1, 3]
    feats, dens = gathered.entries(1)
    assert feats.tolist() == [[7.0, 7.0], [8.0, 8.0], [2.0, 2.0]]  # rank 0's items enter first
    torch.testing.assert_close(dens, torch.tensor([0.7, 0.8, 0.2]))

    for local in (ClassMemoryBank(2, 2, size=4), ClassMemoryBank(2, 2, size=4, gather_distributed=False)):
        local.push(*mine)  # gathering is opt-in: only this rank's items
        assert local.count.tolist() == [1, 1]
        assert local.entries(1)[0].tolist() == [[2.0, 2.0]]


# --------------------------------------------------------------------------- buffers
def test_bank_count_is_an_integer_tensor_as_in_the_docstring_example():
    bank = ClassMemoryBank(num_classes=2, dim=3, size=4)
    assert bank.count.dtype == torch.long
    bank.push(torch.randn(5, 3), torch.tensor([0, 0, 1, 0, 1]))
    assert bank.count.dtype == torch.long and repr(bank.count.tolist()) == "[3, 2]"
    assert bank.state_dict()["count"].dtype == torch.long


def test_bank_density_buffer_has_one_entry_per_feature_slot():
    # the density of each stored vector sits in the slot of that vector; a checkpoint of a
    # bank of the same sizes, written slot by slot, loads
    bank = ClassMemoryBank(num_classes=2, dim=3, size=4)
    assert bank.density.shape == bank.features.shape[:2]
    bank.push(torch.randn(3, 3), torch.tensor([0, 1, 0]), torch.rand(3))
    bank.push(torch.randn(3, 3), torch.tensor([0, 0, 0]), torch.rand(3))  # class 0 wraps
    sd = bank.state_dict()
    assert sd["density"].shape == sd["features"].shape[:2]
    ckpt = {"features": sd["features"].clone(), "density": torch.zeros(sd["features"].shape[:2]),
            "ptr": sd["ptr"].clone(), "count": sd["count"].clone()}
    ckpt["density"][0, :4] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    other = ClassMemoryBank(num_classes=2, dim=3, size=4)
    other.load_state_dict(ckpt)
    torch.testing.assert_close(other.bank_density[0], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    # 2 then 3 items of class 0 in 4 slots: the next write, hence the oldest entry, is slot 1
    torch.testing.assert_close(other.entries(0)[1], torch.tensor([0.2, 0.3, 0.4, 0.1]))
