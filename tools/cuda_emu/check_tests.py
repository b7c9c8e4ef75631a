import os
import sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'tests'))
import torch, mos_ext
import build
E = build.emu
import test_cuda as TC
from test_cuda import case, SHAPES, assert_close, acc_dtype

for shape in SHAPES:
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
        t0 = time.time()
        pk = torch.float32 if dtype != torch.float32 else None
        c = case(shape, dtype, pool_a_dtype=pk, seed=2)
        v = E.sgmv_shrink(c.x, c.pool_a, c.idx_a, c.seg_indptr, c.seg_tenant)
        assert_close(v, torch.ops.mos.sgmv_shrink(c.x, c.pool_a, c.idx_a, c.seg_indptr, c.seg_tenant), shape)
        y_e, y_c = c.y.clone(), c.y.clone()
        E.sgmv(y_e, c.x, c.pool_a, c.pool_b, c.idx_a, c.idx_b, c.scale, c.seg_indptr, c.seg_tenant)
        torch.ops.mos.sgmv(y_c, c.x, c.pool_a, c.pool_b, c.idx_a, c.idx_b, c.scale, c.seg_indptr, c.seg_tenant)
        assert_close(y_e, y_c, shape + " sgmv")
        out = ~c.valid_rows()
        assert torch.equal(y_e[out], c.y[out])
        vv = torch.randn(c.x.shape[0], c.idx_b.shape[1], dtype=acc_dtype(dtype))
        y_e, y_c = c.y.clone(), c.y.clone()
        E.sgmv_expand(y_e, vv, c.pool_b, c.idx_b, c.scale, c.seg_indptr, c.seg_tenant)
        torch.ops.mos.sgmv_expand(y_c, vv, c.pool_b, c.idx_b, c.scale, c.seg_indptr, c.seg_tenant)
        assert_close(y_e, y_c, shape + " expand")
        for det in ((False,) if shape == "t1024_decode" else (False, True)):
            u = torch.randn(c.x.shape[0], c.idx_a.shape[1], dtype=acc_dtype(dtype))
            g0 = torch.randn(c.pool_a.shape, dtype=acc_dtype(dtype))
            g_e, g_c = g0.clone(), g0.clone()
            E.shard_grad(g_e, u, c.x, c.idx_a, c.scale, c.seg_indptr, c.seg_tenant, det)
            torch.ops.mos.shard_grad(g_c, u, c.x, c.idx_a, c.scale, c.seg_indptr, c.seg_tenant, False)
            assert_close(g_e, g_c, f"{shape} shard_grad det={det}")
            same = (g_c == g0).all(1)
            assert torch.equal(g_e[same], g0[same])
        print(shape, dtype, "ok", round(time.time() - t0, 1), flush=True)
