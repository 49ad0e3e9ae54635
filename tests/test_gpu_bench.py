"""`bench/gpu.sh` and the device-agnostic tests it runs on the device.

* `test_on_device_*`: run on VITQ_TEST_DEVICE (default cpu; `bench/gpu.sh` sets it to the benchmark's
  device, e.g. cuda): fake-quant equals the CPU result, APHQ calibration, a block reconstruction and ERQ
  run there and keep their tensors on that device. Tiny models, a few seconds each on CPU.
* `test_gpu_sh_smoke_on_cpu`: `bench/gpu.sh --device cpu --smoke` (tiny model and counts) runs, its
  tests stage passes and its table has every stage of every smoke method.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_vit

DEVICE = torch.device(os.environ.get("VITQ_TEST_DEVICE", "cpu"))


def _skip_unavailable():
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("VITQ_TEST_DEVICE=cuda but no CUDA device")


def test_on_device_fake_quant_matches_cpu():
    _skip_unavailable()
    from common.quant.primitives import fake_quant_affine

    x = torch.randn(4, 3, 17, 8)
    s, z = torch.rand(1, 3, 1, 1) * 0.1 + 0.01, torch.randint(0, 15, (1, 3, 1, 1)).float()
    ref = fake_quant_affine(x, s, z, 4)
    got = fake_quant_affine(x.to(DEVICE), s.to(DEVICE), z.to(DEVICE), 4)
    assert got.device.type == DEVICE.type
    assert torch.equal(got.cpu(), ref)


def _aphq_scheme():
    from common.quant.scheme import QuantScheme

    return QuantScheme(w_bit=4, a_bit=4, matmul_granularity="head", ln_act_granularity="channel",
                       ln_sites=("qkv", "fc1", "reduction"))


def test_on_device_aphq_calibration_and_block_reconstruction():
    _skip_unavailable()
    from common.calib.calibrate import CalibConfig, calibrate_model
    from common.quant import UniformQuantizer
    from common.quant.wrap import wrap_model
    from common.recon.block import reconstruct_model

    fp = tiny_vit().to(DEVICE)
    x = torch.randn(8, 3, 16, 16)
    q = wrap_model(copy.deepcopy(fp), _aphq_scheme()).to(DEVICE)
    calibrate_model(q, x, CalibConfig(n_images=8), 4, 4, device=DEVICE, progress=False)
    quantizers = [m for m in q.modules() if isinstance(m, UniformQuantizer) and m.bits < 32]
    assert quantizers and all(bool(m.calibrated) for m in quantizers if m.scale.numel())
    with torch.no_grad():
        y = q(x.to(DEVICE))
    assert y.device.type == DEVICE.type and torch.isfinite(y).all()
    rec = reconstruct_model(q, fp, x, {"iters": 3, "metric": "mse", "log_every": 0, "eval_stats": False}, device=DEVICE,
                            progress=False)
    assert rec["units"] and all(p.device.type == DEVICE.type for p in q.parameters())
    with torch.no_grad():
        assert torch.isfinite(q(x.to(DEVICE))).all()


def test_on_device_erq():
    _skip_unavailable()
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_bench

    r = gpu_bench.bench_method("erq", "demo", "w4a4", DEVICE, iters=2, images=8)
    assert r["device"] == str(DEVICE) and any(s["stage"] == "erq_reduce" for s in r["stages"])


def test_gpu_sh_smoke_on_cpu(tmp_path: Path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--device", "cpu", "--smoke", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("method     stage"):]
    rows = [line.split() for line in table.splitlines()[1:]]
    have = {(r[0], r[1]) for r in rows if len(r) >= 2}
    assert ("-", "tests") in have and "passed" in table.splitlines()[1]
    expected = {"aphq": ["aphq_mlp_recon", "aphq_calibrate", "aphq_reconstruct"],
                "erq": ["erq_act_init", "erq_reparam", "erq_calibrate", "erq_stats", "erq_aqer", "erq_weight_init",
                        "erq_wqer", "erq_reduce"],
                "ptq": ["ptq_calibrate"]}
    for method, stages in expected.items():
        for stage in stages + ["total"]:
            assert (method, stage) in have, (method, stage, table)
    # every row has seconds, a peak-memory column ("-" on CPU) and a full-size estimate
    for r in rows:
        if len(r) >= 2 and r[0] in expected:
            float(r[2]), float(r[4])
            assert r[3] == "-"
