"""The contract of ``torch_dacl.functional.knn_density_grouped`` (the multi-scale kNN density of
Eq. 3-5, grouped layout) beyond tests/test_functional.py and tests/test_functional_contract.py:
float32 similarities whatever the features' dtype, validity masks of other dtypes taken as bool,
the bfloat16 similarity precision, a group of no query (``S = 0``) and tensors made on the
features' device under another default device or dtype (``meta`` stands in for an
accelerator), and the ``chunk_elements`` bound on one similarity chunk, with its defaults (2M
elements on the CPU, 16M elsewhere)."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import torch_dacl.functional as DF


class _SimilarityChunks(TorchFunctionMode):
    """Records the number of elements of every similarity chunk (the ``bmm`` products)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.bmm:
            self.sizes.append(out.numel())
        return out


def _groups(seed, c=3, s=12, L=9, d=5):
    """Features ``(C, S, D)``, a validity mask with padding, a bank and its mask."""
    g = torch.Generator().manual_seed(seed)
    feats, bank = torch.randn(c, s, d, generator=g), torch.randn(c, L, d, generator=g)
    valid = torch.rand(c, s, generator=g) > 0.3
    bank_valid = torch.rand(c, L, generator=g) > 0.3
    return feats, valid, bank, bank_valid


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_density_similarities_run_in_float32_whatever_the_features_dtype(dtype):
    # "similarities and top-k run in float32": features of another dtype give exactly the
    # densities of the same values in float32
    feats, valid, bank, bank_valid = _groups(1, s=30, L=20, d=16)
    feats, bank = feats.to(dtype), bank.to(dtype)
    for b, bv in ((None, None), (bank, bank_valid)):
        got = DF.knn_density_grouped(feats, valid, (1, 3), b, bv)
        ref = DF.knn_density_grouped(feats.float(), valid, (1, 3), None if b is None else b.float(), bv)
        assert got.dtype == torch.float32
        assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.long, torch.float32])
def test_density_takes_integer_and_float_validity_masks_as_bool(dtype):
    feats, valid, bank, bank_valid = _groups(2)
    ref = DF.knn_density_grouped(feats, valid, (1, 3), bank, bank_valid)
    assert (ref[valid] > -1).any() and torch.all(ref[~valid] == -1)  # the masks matter
    got = DF.knn_density_grouped(feats, valid.to(dtype), (1, 3), bank, bank_valid.to(dtype))
    assert got.dtype == torch.float32 and torch.equal(got, ref)


def test_bfloat16_precision_rounds_each_similarity_to_bfloat16():
    # ks = (1,): a density is one similarity (Eq. 3 with k = 1), so with precision="bfloat16"
    # every density is a bfloat16 value within its rounding of the float32 one; float32 is not
    feats, valid, bank, bank_valid = _groups(3, s=40, L=30, d=16)
    exact = DF.knn_density_grouped(feats, valid, (1,), bank, bank_valid)
    bf = DF.knn_density_grouped(feats, valid, (1,), bank, bank_valid, precision="bfloat16")
    assert bf.dtype == torch.float32
    assert torch.equal(bf, bf.to(torch.bfloat16).float())
    assert not torch.equal(exact, exact.to(torch.bfloat16).float())
    torch.testing.assert_close(bf, exact, rtol=0, atol=2e-2)
    assert torch.equal(bf[~valid], exact[~valid])


# ----------------------------------------------------------------------------- empty groups, default device/dtype
@pytest.mark.parametrize("with_bank", [False, True])
def test_density_of_groups_of_no_query_is_an_empty_float32_map(with_bank):
    feats, bank = torch.zeros(3, 0, 4), torch.randn(3, 5, 4)
    dens = DF.knn_density_grouped(feats, torch.zeros(3, 0, dtype=torch.bool), (2,), bank if with_bank else None)
    assert dens.shape == (3, 0) and dens.dtype == torch.float32 and dens.device == feats.device


@pytest.mark.parametrize("s", [0, 6])
def test_density_is_made_on_the_features_device_under_another_default_device(s):
    # the bank mask made when bank_valid is omitted and the empty result live on the
    # features' device, not on the default one
    feats, valid, bank, _ = _groups(4, s=max(s, 1))
    feats, valid = feats[:, :s], valid[:, :s]
    ref = DF.knn_density_grouped(feats, valid, (1, 3), bank)
    with torch.device("meta"):
        dens = DF.knn_density_grouped(feats, valid, (1, 3), bank)
        no_bank = DF.knn_density_grouped(feats, valid, (1, 3))
    assert dens.device.type == no_bank.device.type == "cpu"
    assert dens.shape == no_bank.shape == (3, s)
    assert torch.equal(dens, ref)
    assert torch.equal(no_bank, DF.knn_density_grouped(feats, valid, (1, 3)))


@pytest.mark.parametrize("s", [0, 6])
def test_density_is_float32_under_a_float64_default_dtype(s):
    feats, valid, bank, bank_valid = _groups(5, s=max(s, 1))
    feats, valid = feats[:, :s], valid[:, :s]
    ref = DF.knn_density_grouped(feats, valid, (1, 3), bank, bank_valid)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        dens = DF.knn_density_grouped(feats, valid, (1, 3), bank, bank_valid)
    finally:
        torch.set_default_dtype(before)
    assert dens.dtype == torch.float32 and dens.shape == (3, s)
    assert torch.equal(dens, ref)


# ----------------------------------------------------------------------------- chunk_elements
def test_similarity_chunks_hold_as_many_queries_as_chunk_elements_allows():
    # width = S + L keys (no top-k padding here); a chunk of q queries holds C * q * width
    # similarities: at most chunk_elements, and never less than one query a chunk
    feats, valid, bank, bank_valid = _groups(6, c=3, s=40, L=17, d=8)
    c, s, width = 3, 40, 57
    assert DF._topk_plan(width, 9, torch.device("cpu")) == (0, 0)
    full = DF.knn_density_grouped(feats, valid, (4, 9), bank, bank_valid)
    for rows in (1, 3, 7):
        for chunk_elements in (rows * c * width, (rows + 1) * c * width - 1):
            rec = _SimilarityChunks()
            with rec:
                dens = DF.knn_density_grouped(feats, valid, (4, 9), bank, bank_valid, chunk_elements=chunk_elements)
            sizes = [c * min(rows, s - start) * width for start in range(0, s, rows)]
            assert rec.sizes == sizes
            torch.testing.assert_close(dens, full)
    rec = _SimilarityChunks()
    with rec:  # a bound below one query's similarities: one query a chunk
        DF.knn_density_grouped(feats, valid, (4, 9), bank, bank_valid, chunk_elements=1)
    assert rec.sizes == [c * width] * s


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_default_chunk_bound_is_2m_elements_on_the_cpu_and_16m_elsewhere(device):
    # 2048 queries and a bank of 1008 (the paper's 512 pixels would not reach the bound):
    # 6.3M similarities, more than 2M and less than 16M; 3056 keys are a multiple of the CPU
    # top-k's groups of 16 (ks = (1,)), so the rows are not padded
    s, L, d = 2048, 1008, 4
    width = s + L
    assert DF._topk_plan(width, 1, torch.device(device))[0] == 0
    feats, bank = torch.randn(1, s, d, device=device), torch.randn(1, L, d, device=device)
    valid = torch.ones(1, s, dtype=torch.bool, device=device)
    rec = _SimilarityChunks()
    with rec:
        dens = DF.knn_density_grouped(feats, valid, (1,), bank)
    assert dens.shape == (1, s) and dens.device.type == device
    rows = (1 << 21) // width if device == "cpu" else s
    assert rec.sizes == [min(rows, s - start) * width for start in range(0, s, rows)]
