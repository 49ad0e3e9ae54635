"""The fused numba kernels of the integer-code search (common/calib/kernels.py) against torch ops.

`int8_codes` must give the float32 search's codes exactly (the same IEEE division and round-half-even),
checked bit for bit on random data with exact half-way points and values far outside the range;
`product_sums` against a float64 torch evaluation of the zero-point-corrected product."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.calib.kernels import int8_codes, product_sums


def _data(seed: int, scale: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4099, generator=gen) * 4
    # (k + 1/2)·s in float32 and its neighbours: x / s lands on or next to a tie, where a reciprocal
    # multiply or a fused operation would round differently
    k = torch.arange(-40, 40, dtype=torch.float32) + 0.5
    near = (k[:, None] * scale[None, :]).flatten()
    ties = torch.cat([near, torch.nextafter(near, near + 1), torch.nextafter(near, near - 1)])
    x[:, 1000:1000 + ties.numel()] = ties
    x[:, :600] = (torch.randint(-60, 60, (3, 600), generator=gen) + 0.5) * 0.25  # x / s exactly k + 0.5 for s = 0.25
    x[:, 600:650] *= 1e4  # far outside every candidate's range
    x[:, 650:660] = 0.0
    x[:, 660:670] = -0.0
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_equal_torch_bit_for_bit(bits):
    levels = 2 ** bits - 1
    gen = torch.Generator().manual_seed(100 + bits)
    scale = torch.cat([torch.tensor([0.25, 0.125, 1 / 3]), torch.rand(6, generator=gen) * 2 + 1e-3]).float()
    x = _data(bits, scale)
    recip = sum(int((torch.round(x / s) != torch.round(x * (1 / s))).sum()) for s in scale)
    assert recip > 0  # the data tell division from a reciprocal multiply
    zp = torch.randint(0, levels + 1, (scale.numel(),), generator=gen).float()
    c = scale.numel()
    # signed form: clamp(round(x/s), −z, L − z) (the search's D = U − z)
    out = np.empty((3, c, x.shape[1]), np.int8)
    if bits < 8:
        int8_codes(x.numpy(), scale.numpy(), np.zeros(c, np.float32), (-zp).numpy(), (levels - zp).numpy(), 0.0, out)
        ref = torch.stack([torch.round(x / scale[j]).clamp(-zp[j], levels - zp[j]) for j in range(c)], 1)
        assert torch.equal(torch.from_numpy(out), ref.to(torch.int8))
    # unsigned form with an offset: clamp(round(x/s) + z, 0, L) − off
    off = 128 if bits == 8 else 0
    int8_codes(x.numpy(), scale.numpy(), zp.numpy(), np.zeros(c, np.float32), np.full(c, levels, np.float32),
               float(off), out)
    ref = torch.stack([(torch.round(x / scale[j]) + zp[j]).clamp(0, levels) - off for j in range(c)], 1)
    assert torch.equal(torch.from_numpy(out), ref.to(torch.int8))


@pytest.mark.parametrize("rows,shared", [(False, True), (True, True), (True, False)])
def test_product_sums_equal_float64(rows, shared):
    gen = torch.Generator().manual_seed(int(rows) * 2 + int(shared))
    S, C, N, M, K = 3, 4, 7, 5, 11
    p = torch.randint(-20000, 20000, (S, C, N, M + int(rows)), generator=gen, dtype=torch.int32)
    yw = torch.randn(S, N, M, generator=gen, dtype=torch.float64)
    w = torch.rand(M, generator=gen, dtype=torch.float64)
    zs = 1 if shared else S
    zr = torch.randint(-5, 5, (zs, M), generator=gen).double() if rows else torch.zeros(zs, M, dtype=torch.float64)
    colsum = torch.randint(-300, 300, (zs, M), generator=gen).double()
    corr = zr * K - colsum
    zc = torch.randint(-8, 8, (C,), generator=gen).double()
    pp, py = np.empty(C), np.empty(C)
    product_sums(p.numpy(), M, yw.numpy(), w.numpy(), zr.numpy(), corr.numpy(), zc.numpy(), rows, pp, py)
    pd = p[..., :M].double()
    if rows:
        pd = pd - zr[:, None, None, :] * p[..., M:].double()
    pd = pd + zc[None, :, None, None] * corr[:, None, None, :]
    ref_pp = (w * pd * pd).sum((0, 2, 3))
    ref_py = (pd * yw[:, None]).sum((0, 2, 3))
    assert torch.allclose(torch.from_numpy(pp), ref_pp, rtol=1e-13, atol=0)
    assert torch.allclose(torch.from_numpy(py), ref_py, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("delta", [True, False])
def test_fused_fake_quant_equals_quant_delta_bit_for_bit(delta):
    """`candidates_delta` (the fused kernel on CPU) against `quant_delta`'s torch ops: the same float32
    bits, signs of zero included, on data with ties (x / s = k + 1/2), zeros of both signs and a
    zero-point of −0.0."""
    from common.calib.search import candidates_delta, quant_delta

    gen = torch.Generator().manual_seed(int(delta))
    scale = torch.rand(2, 7, generator=gen) + 0.05
    zp = torch.randint(0, 16, (2, 7), generator=gen).float()
    zp[0, 0] = -0.0
    x = torch.randn(2, 5, 3001, generator=gen) * 3
    x[..., :100], x[..., 100:200] = 0.0, -0.0
    x[0, :, 200:207] = (torch.arange(7) + 0.5) * scale[0]
    got = candidates_delta(x, scale, zp, 4, delta).clone()
    ref = quant_delta(x[:, :, None], scale[:, None, :, None], zp[:, None, :, None], 4, delta)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
