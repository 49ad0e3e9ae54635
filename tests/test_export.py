"""Integer export (common.export): bit packing, the packed safetensors checkpoint, QDQ ONNX in onnxruntime.

Every comparison is against an independent computation: packing against the raw codes, the packed model's
logits against the fake-quant model's (bit for bit), onnxruntime's logits against PyTorch's. The run dir
is a real `common.run.pipeline.run` of the demo (ptq, W4A4, 8 calibration / 100 eval images, a few seconds);
RepQ-ViT / ERQ models come from driving those methods directly on tiny random ViT / Swin models, and the
DeiT-T / Swin-T checks wrap small random-weight timm models with min/max quantizer ranges.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf, open_dict

from common.errors import UserError
from common.export import OnnxOptions, export_onnx, export_run, load_packed, pack_codes, read_manifest, save_packed
from common.export.packing import packed_nbytes, unpack_codes
from common.export.rundir import load_run, model_info
from common.export.runtime import agreement, kernel_summary, ort_session
from common.export.specs import dequantize_codes, spec_of, weight_codes
from common.quant.granularity import PerChannel
from common.quant.primitives import qparams_from_range
from common.quant.quantizers import LogQuantizer, Quantizer, UniformQuantizer, quantizers_of
from common.quant.scheme import QuantScheme
from common.quant.wrap import wrap_model
from conftest import REPO, compose_cfg, point_at, subprocess_env

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A finished demo run dir (ptq W4A4) laid out as run.py writes it, .hydra/config.yaml included."""
    from common.run.pipeline import run

    base = tmp_path_factory.mktemp("export_demo")
    cfg = point_at(compose_cfg(["model=demo", "method=ptq", "bits=w4a4", "num_threads=1", "method.n_calib=8",
                                "dataset.n_eval=100", "logger=none"]), base / "run", base / "stage_cache")
    (base / "run" / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, base / "run" / ".hydra" / "config.yaml")  # as Hydra saves it: before run() resolves it
    n = torch.get_num_threads()
    try:
        run(cfg)
    finally:
        torch.set_num_threads(n)
    return base / "run"


@torch.no_grad()
def minmax_calibrate(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Each uniform / log quantizer fits min/max ranges on the first tensor it sees (weights: rounded zero-points)."""
    def hook(q, args):
        if q.bits >= 32 or bool(q.calibrated):
            return
        t = args[0].detach()
        if isinstance(q, LogQuantizer):
            q.set_qparams(t.max().reshape(1))
            return
        dims = q.granularity.reduce_dims(t.dim())
        lo, hi = t.amin(dims, keepdim=True).clamp(max=0), t.amax(dims, keepdim=True).clamp(min=0)
        q.set_qparams(*qparams_from_range(lo, hi, q.bits, q.round_zero_point or q.role == "weight"))

    handles = [q.register_forward_pre_hook(hook) for _, q in quantizers_of(model)
               if isinstance(q, (UniformQuantizer, LogQuantizer))]
    model(x)
    for h in handles:
        h.remove()


#: Small DeiT-T / Swin-T: timm name, kwargs, image size. Swin: two stages, so shifted windows (14x14 tokens,
#: window 7) and a patch merging are both exported.
TIMM = {"deit_t": ("deit_tiny_patch16_224", {"img_size": 32, "depth": 2, "num_classes": 10}, 32),
        "swin_t": ("swin_tiny_patch4_window7_224", {"img_size": 56, "depths": (2, 1), "num_heads": (2, 4),
                                                    "embed_dim": 32, "window_size": 7, "num_classes": 10}, 56)}


def random_timm(family: str, seed: int = 0) -> tuple[torch.nn.Module, int]:
    """A small random-weight DeiT-T or Swin-T (noisy parameters, a wide head so logits are well separated)."""
    torch.manual_seed(seed)
    name, kwargs, img = TIMM[family]
    m = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
        m.head.fc.weight.normal_(0, 1.0) if hasattr(m.head, "fc") else m.head.weight.normal_(0, 1.0)
    return m.eval(), img


def quantized_timm(family: str, w_bit: int, a_bit: int, **scheme) -> tuple[torch.nn.Module, torch.Tensor]:
    model, img = random_timm(family)
    wrap_model(model, QuantScheme(w_bit=w_bit, a_bit=a_bit, **scheme))
    gen = torch.Generator().manual_seed(1)
    minmax_calibrate(model, torch.randn(16, 3, img, img, generator=gen))
    return model.eval(), torch.randn(64, 3, img, img, generator=gen)


def ort_logits(path: Path, x: torch.Tensor, level: int | None = None) -> torch.Tensor:
    s = ort_session(path, threads=1, nbits_accuracy_level=level)
    return torch.from_numpy(s.run(None, {"input": x.numpy()})[0])


def graph_ops(path: Path) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(n.op_type for n in onnx.load(str(path)).graph.node))


def init_types(path: Path) -> dict[str, int]:
    return {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 12])
def test_pack_roundtrip(bits) -> None:
    codes = torch.randint(0, 2 ** bits, (37, 11), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(codes.numel(), bits)
    assert torch.equal(unpack_codes(packed, bits, codes.shape), codes)
    if bits <= 8:  # independent: read code i from bits [i*b, (i+1)*b) of the little-endian byte stream
        stream = int.from_bytes(bytes(packed.tolist()), "little")
        flat = codes.reshape(-1).tolist()
        assert all(((stream >> (i * bits)) & (2 ** bits - 1)) == c for i, c in enumerate(flat))


def test_pack_layout_and_errors() -> None:
    assert pack_codes(torch.tensor([1, 2, 3, 15]), 4).tolist() == [0x21, 0xF3]  # two per byte, first in the low nibble
    assert pack_codes(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b10_01_00_11]
    assert pack_codes(torch.arange(8), 3).numel() == 3  # eight 3-bit codes in three bytes
    with pytest.raises(ValueError, match="lie in"):
        pack_codes(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="integers"):
        pack_codes(torch.tensor([0.5]), 4)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_weight_codes_match_fake_quant(bits, symmetric) -> None:
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    q = UniformQuantizer(bits, symmetric=symmetric, granularity=PerChannel(0), role="weight")
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if symmetric:
        q.set_qparams(torch.maximum(-lo, hi) / (2 ** (bits - 1) - 1))
    else:
        q.set_qparams(*qparams_from_range(lo * 0.8, hi * 0.8, bits))  # clipped: codes saturate
    spec = spec_of("w", q)
    codes = weight_codes("w", spec, w)
    s = q.scale.detach()
    if symmetric:  # independent: numpy round-half-even
        ref = np.clip(np.round(w.numpy() / s.numpy()), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) + 2 ** (bits - 1)
    else:
        ref = np.clip(np.round(w.numpy() / s.numpy()) + q.zero_point.numpy(), 0, 2 ** bits - 1)
    assert np.array_equal(codes.numpy(), ref) and codes.min() >= 0 and codes.max() < 2 ** bits
    assert codes.max() == 2 ** bits - 1  # the range clip saturated some codes
    assert torch.equal(dequantize_codes(spec, codes), q(w).detach())


# --------------------------------------------------------------------------- packed checkpoint from a run


def test_packed_checkpoint_of_a_run_is_exact(demo_run, tmp_path) -> None:
    out = tmp_path / "demo.safetensors"
    report = export_run(demo_run, "safetensors", out, log=lambda _: None)
    assert report["verify"]["exact"] and report["verify"]["max_abs_dlogit"] == 0.0
    assert report["verify"]["fake_quant_top1"] == json.loads((demo_run / "results.json").read_text())["quant_top1"]
    assert json.loads(Path(f"{out}.json").read_text())["bytes"] == out.stat().st_size
    # independently of export_run's own check: rebuild here and compare logits over the eval set
    run = load_run(demo_run)
    loaded = load_packed(out)
    data = run.eval_data()
    with torch.no_grad():
        for x, _ in data.eval_loader():
            assert torch.equal(loaded(x), run.model(x))
    manifest = read_manifest(out)
    assert (manifest["method"], manifest["bits"]["name"], manifest["model"]["timm_name"]) == ("ptq", "w4a4", "vit_digits")
    assert manifest["project"]["vitq"] and manifest["config"]["method"]["name"] == "ptq"
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        for layer, w in manifest["weights"].items():
            assert w["bits"] == 4 and f.get_tensor(w["key"]).numel() == (np.prod(w["shape"]) + 1) // 2
    assert report["fp32_ratio"] > 3.5  # the demo is tiny (embeddings, norms and the manifest weigh in)


def test_cli_onnx_export_of_a_run(demo_run, tmp_path, capsys) -> None:
    from common.export.__main__ import main

    out = tmp_path / "demo.onnx"
    assert main([str(demo_run), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime kernels:" in printed and "top-1 agreement" in printed and "FP32 checkpoint" in printed
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["verify"]["default"]["top1_agreement"] >= 99.5
    types = init_types(out)
    assert types["blocks.0.attn.qkv.weight_quantizer.codes"] == onnx.TensorProto.UINT4  # 4-bit weights as uint4
    assert types["blocks.0.attn.qkv.input_quantizer.zero_point"] == onnx.TensorProto.UINT4  # and activations
    ops = graph_ops(out)  # per-tensor activations (QDQ pairs) and per-channel weights (DequantizeLinear)
    assert ops["DequantizeLinear"] == report["quantizers"]
    assert ops["QuantizeLinear"] == report["details"]["quantizer_forms"]["qdq"]
    assert not any(n.domain for n in onnx.load(str(out)).graph.node)  # no custom ops left


# --------------------------------------------------------------------------- ONNX on DeiT-T / Swin-T


@pytest.mark.parametrize("family", ["deit_t", "swin_t"])
def test_onnx_w8a8_integer_kernels(family, tmp_path) -> None:
    model, x = quantized_timm(family, 8, 8, matmul_granularity="head")
    path = tmp_path / f"{family}.onnx"
    rep = export_onnx(model, x[:2], path)
    with torch.no_grad():
        ref = model(x)
    res = agreement(ref, ort_logits(path, x))  # the integer GEMM rounds differently from fake-quant in fp32
    assert res["top1_agreement"] >= 99.5 and res["max_abs_dlogit"] < 0.02 * ref.abs().max().item(), res
    kernels = kernel_summary(path)
    assert kernels.get("MatMulIntegerToFloat", 0) >= 4, kernels  # the linear layers run on the integer GEMM
    axes = {n.name: [a.i for a in n.attribute if a.name == "axis"] for n in onnx.load(str(path)).graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert any("qkv.weight_quantizer" in k and v == [1] for k, v in axes.items())  # per output channel of Wᵀ
    assert any("matmul1.a_quantizer" in k and v == [1] for k, v in axes.items())  # per head
    assert rep["quantizer_forms"]["dq"] == sum(1 for n, q in quantizers_of(model) if q.role == "weight" and q.active)


def test_onnx_low_bits_clip_exact_range(tmp_path) -> None:
    family = "deit_t"
    model, x = quantized_timm(family, 3, 3)
    path = tmp_path / "w3a3.onnx"
    export_onnx(model, x[:2], path)
    with torch.no_grad():
        ref = model(x)
    res = agreement(ref, ort_logits(path, x))
    assert res["top1_agreement"] >= 99.5, res
    g = onnx.load(str(path)).graph
    clips = [n for n in g.node if n.op_type == "Clip"]
    inits = {t.name: t for t in g.initializer}
    assert clips and all(onnx.numpy_helper.to_array(inits[c.input[2]]) == 7 for c in clips)  # 3-bit code range
    assert init_types(path)["blocks.0.attn.qkv.weight_quantizer.codes"] == onnx.TensorProto.UINT4  # 3-bit codes


def test_onnx_token_wise_scales(tmp_path) -> None:
    """Per-token linear inputs (one axis: QDQ) and APHQ-style token-wise matmul operands (heads x tokens:
    emulated with plain ops), static scales as calibrated."""
    model, x = quantized_timm("deit_t", 8, 8, act_granularity="token", matmul_granularity="head")
    mm = model.blocks[0].attn.matmul1
    with torch.no_grad():
        a = torch.randn(8, 3, 5, 64)  # (B, heads, tokens, head_dim): one scale per (head, token)
        mm.a_quantizer.set_qparams(*qparams_from_range(a.amin((0, 3), keepdim=True), a.amax((0, 3), keepdim=True), 8))
        ref = model(x)
    path = tmp_path / "token.onnx"
    rep = export_onnx(model, x[:2], path)
    assert rep["quantizer_forms"]["emulated"] == 1 and rep["quantizer_forms"]["qdq"] >= 8
    res = agreement(ref, ort_logits(path, x))  # 8-bit rounding flips from float differences upstream
    assert res["top1_agreement"] >= 99.5 and res["max_abs_dlogit"] < 0.05 * ref.abs().max().item(), res
    with pytest.raises(UserError, match=r"blocks.0.attn.matmul1.a_quantizer .*several axes.*--qdq-only"):
        export_onnx(model, x[:2], tmp_path / "no.onnx", OnnxOptions(qdq_only=True))


def test_onnx_int8_weights_and_weight_only(tmp_path) -> None:
    model, x = quantized_timm("deit_t", 4, 8)
    path = tmp_path / "w4a8.onnx"
    export_onnx(model, x[:2], path, OnnxOptions(int8_weights=True))
    assert kernel_summary(path).get("MatMulIntegerToFloat", 0) >= 4  # W4A8 on the 8-bit integer GEMM
    with torch.no_grad():
        ref = model(x)
    assert agreement(ref, ort_logits(path, x))["top1_agreement"] >= 99.5
    model, x = quantized_timm("deit_t", 4, 32)  # weight-only 4-bit: onnxruntime's MatMulNBits
    path = tmp_path / "w4.onnx"
    export_onnx(model, x[:2], path)
    assert kernel_summary(path).get("MatMulNBits", 0) >= 4
    with torch.no_grad():
        ref = model(x)
    exact = agreement(ref, ort_logits(path, x, level=0))
    assert exact["top1_agreement"] == 100.0 and exact["max_abs_dlogit"] < 1e-3, exact


# --------------------------------------------------------------------------- RepQ-ViT / ERQ (log√2, fractional zero-points, dual-uniform)


def _drive(method: str, family: str, tmp: Path) -> torch.nn.Module:
    """RepQ-ViT / ERQ run directly on a tiny random model (no data set), as tests/test_erq_methods.py does."""
    from common.run.registry import RunContext, get_method
    from common.run.stages import StageCache
    from common.run.tracking import Tracker

    cfg = compose_cfg([f"method={method}", "bits=w4a4", "model=deit_t"])
    with open_dict(cfg):
        cfg.method.n_calib = 6
    ctx = RunContext(cfg, tmp, torch.device("cpu"), StageCache(tmp, None, False), Tracker(tmp), {"test": 1})
    model, img = random_timm(family)
    images = torch.randn(6, 3, img, img, generator=torch.Generator().manual_seed(1))

    class Images:
        def calibration(self, n, augment=False):
            return images[:n], torch.zeros(n, dtype=torch.long)

    return get_method(cfg.method.name, cfg.method.module)(cfg.method, ctx).quantize(model, Images()).eval(), img


@pytest.mark.parametrize("method,family", [("repq", "deit_t"), ("erq", "swin_t")])
def test_repq_erq_export(method, family, tmp_path) -> None:
    model, img = _drive(method, family, tmp_path / "stages")
    kinds = {type(q).__name__ for _, q in quantizers_of(model) if q.active}
    assert "LogQuantizer" in kinds and (method != "erq" or "DualUniformQuantizer" in kinds)
    x = torch.randn(32, 3, img, img, generator=torch.Generator().manual_seed(2))
    # packed checkpoint: exact, the rebuilt dual-uniform weights included
    info = {"name": family, "timm_name": TIMM[family][0], "kwargs": TIMM[family][1], "register_module": None}
    save_packed(model, tmp_path / "m.safetensors", info, reference=random_timm(family)[0])
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(load_packed(tmp_path / "m.safetensors")(x), ref)
    # ONNX: log√2 and fractional zero-points emulated with plain ops (same arithmetic)
    path = tmp_path / "m.onnx"
    rep = export_onnx(model, x[:2], path)
    assert rep["quantizer_forms"].get("emulated", 0) >= 1
    ops = graph_ops(path)
    assert ops.get("Log", 0) >= 1 and ops.get("Round", 0) >= 1
    res = agreement(ref, ort_logits(path, x, level=0))
    assert res["top1_agreement"] >= 99.5, res
    if method == "erq":
        assert ops.get("Where", 0) >= 1  # dual-uniform weights: two DequantizeLinear + Where
    with pytest.raises(UserError, match=r"--qdq-only") as err:
        export_onnx(model, x[:2], tmp_path / "no.onnx", OnnxOptions(qdq_only=True))
    assert "\n" not in str(err.value) and "quantizer" in str(err.value)


# --------------------------------------------------------------------------- bad input: one-line errors first


class _OddQuantizer(Quantizer):
    def fake_quant(self, x):
        return x.round()


def test_unsupported_quantizer_is_refused(tmp_path) -> None:
    model, x = quantized_timm("deit_t", 8, 8)
    odd = _OddQuantizer(4)
    odd.calibrated.fill_(True)
    model.blocks[0].mlp.fc2.input_quantizer = odd
    for fmt_call in (lambda: export_onnx(model, x[:2], tmp_path / "m.onnx"),
                     lambda: save_packed(model, tmp_path / "m.safetensors", {"timm_name": "deit_tiny_patch16_224"},
                                         reference=random_timm("deit_t")[0])):
        with pytest.raises(UserError, match="blocks.0.mlp.fc2.input_quantizer is a _OddQuantizer") as err:
            fmt_call()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.safetensors").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.export", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=subprocess_env())


def test_bad_inputs_fail_fast_with_one_line(demo_run, tmp_path, monkeypatch) -> None:
    import common.export.api as api

    def boom(*a, **k):
        raise AssertionError("heavy work started")

    monkeypatch.setattr(api, "load_run", boom)
    existing = tmp_path / "exists.onnx"
    existing.write_text("x")
    with pytest.raises(UserError, match="exists: pass --force"):
        export_run(demo_run, "onnx", existing)
    with pytest.raises(UserError, match="unknown export format"):
        export_run(demo_run, "tflite")
    not_run = tmp_path / "empty"
    not_run.mkdir()
    with pytest.raises(UserError, match="not a run dir"):
        export_run(not_run, "onnx", tmp_path / "a.onnx")
    unfinished = tmp_path / "unfinished"
    (unfinished / "stages").mkdir(parents=True)
    (unfinished / ".hydra").mkdir()
    (unfinished / ".hydra" / "config.yaml").write_text((demo_run / ".hydra" / "config.yaml").read_text().replace(
        str(demo_run.parent / "stage_cache"), str(tmp_path / "no_cache")))
    for p in (demo_run / "stages").glob("fp_eval-*.pt"):
        (unfinished / "stages" / p.name).write_bytes(p.read_bytes())
    with pytest.raises(UserError, match="no finished quantization stage"):
        export_run(unfinished, "safetensors", tmp_path / "a.safetensors")
    monkeypatch.undo()
    # a stage file that is not the run's: the replay refuses to compute it (export never re-quantizes)
    (unfinished / "stages" / "ptq_calibrate-0000000000.pt").write_bytes(b"")
    with pytest.raises(UserError, match="no finished `ptq_calibrate` stage"):
        export_run(unfinished, "safetensors", tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    proc = _cli(str(unfinished), "--format", "onnx", "--out", str(existing))
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "exists" in proc.stderr


@pytest.mark.slow
def test_default_demo_run_exports_to_both_formats(tmp_path) -> None:
    """`python run.py` (the demo, method=aphq W4A4 with MLP reconstruction: ReLU MLPs, per-head matmuls)."""
    from common.run.pipeline import run

    cfg = point_at(compose_cfg(["num_threads=1", "logger=none"]), tmp_path / "run", tmp_path / "stage_cache")
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, tmp_path / "run" / ".hydra" / "config.yaml")
    run(cfg)
    packed = export_run(tmp_path / "run", "safetensors", log=lambda _: None)
    assert packed["verify"]["exact"]
    assert read_manifest(packed["path"])["module_swaps"]  # GELU -> ReLU recorded and rebuilt
    exported = export_run(tmp_path / "run", "onnx", log=lambda _: None)
    assert exported["verify"]["default"]["top1_agreement"] >= 99.5


def test_model_info_of_a_run(demo_run) -> None:
    from common.export.rundir import read_run_config

    info = model_info(read_run_config(demo_run))
    assert info["timm_name"] == "vit_digits" and info["register_module"] == "common.models.demo"
