"""mos_ext.batch: per-row adapter ids -> sgmv segments, and add_sgmv's dtype staging."""
import pytest
import torch

from mos_ext import batch, reference


def _runs(seg):
    return list(zip(seg.indptr.tolist()[:-1], seg.indptr.tolist()[1:], seg.tenant.tolist()))


def test_build_segments_merges_runs_and_keeps_order():
    seg = batch.build_segments([2, 2, -1, 0, 0, 0, 2], tokens_per_row=3)
    assert seg.indptr.dtype == torch.int32 and seg.tenant.dtype == torch.int32
    assert _runs(seg) == [(0, 6, 2), (6, 9, -1), (9, 18, 0), (18, 21, 2)]
    assert seg.num_tokens == 21 and seg.active
    assert list(reference.segments(*seg.args())) == [(0, 6, 2), (9, 18, 0), (18, 21, 2)]


def test_build_segments_one_per_row_and_inactive():
    seg = batch.build_segments(torch.tensor([1, 1, -1]), tokens_per_row=2, merge=False)
    assert _runs(seg) == [(0, 2, 1), (2, 4, 1), (4, 6, -1)]
    none = batch.build_segments([-1, -1], tokens_per_row=4)
    assert not none.active and _runs(none) == [(0, 8, -1)]
    empty = batch.build_segments([], tokens_per_row=4)
    assert not empty.active and empty.indptr.tolist() == [0] and empty.num_tokens == 0


def test_batch_metadata_builds_once_and_repeats_rows():
    meta = batch.BatchMetadata([0, -1], merge=False)
    a = meta.segments(4, 5, "cpu")  # beam search: each row twice
    assert a is meta.segments(4, 5, torch.device("cpu"))
    assert _runs(a) == [(0, 5, 0), (5, 10, 0), (10, 15, -1), (15, 20, -1)]
    with pytest.raises(ValueError, match="3 sequences but 2"):
        meta.segments(3, 1, "cpu")


def test_single_segment_cached():
    s = batch.single_segment(7, torch.device("cpu"))
    assert s is batch.single_segment(7, "cpu")
    assert _runs(s) == [(0, 7, 0)]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_add_sgmv_slices_match_reference(out_dtype):
    g = torch.Generator().manual_seed(0)
    n, h, s, r = 6, 16, 4, 3
    pa, pb = torch.randn(10, s, generator=g), torch.randn(10, s, generator=g)
    idx_a = torch.randint(0, 10, (2, r, h // s), generator=g, dtype=torch.int32)
    idx_b = torch.randint(0, 10, (2, r, 8 // s), generator=g, dtype=torch.int32)
    scale = torch.tensor([0.5, 2.0])
    x = torch.randn(n, h, generator=g)
    out = torch.randn(n, 16, generator=g).to(out_dtype)
    seg = batch.build_segments([1, -1, 0], tokens_per_row=2)
    got = batch.add_sgmv(out.clone(), x, [(pa, pb, idx_a, idx_b, 0, 8), (pa, pb, idx_a, idx_b, 8, 8)], scale, seg,
                         torch.float32)
    d = reference.sgmv(torch.zeros(n, 8), x, pa, pb, idx_a, idx_b, scale, *seg.args())
    want = out.float() + torch.cat([d, d], 1)
    tol = dict(atol=1e-5, rtol=1e-5) if out_dtype == torch.float32 else dict(atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(got.float(), want, **tol)
    assert batch.add_sgmv(out, x, [(pa, pb, idx_a, idx_b, 0, 8)], scale, None, torch.float32) is out
