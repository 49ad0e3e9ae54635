"""Benchmark integer inference: PyTorch fp32 vs onnxruntime fp32 vs onnxruntime on integer kernels.

    python bench/bench_export.py                          # deit_t and deit_s, 2 threads
    python bench/bench_export.py --models deit_t --threads 1 --repeats 20 --json /tmp/bench.json

Models have random weights and are quantized with min/max ranges on a few random images (speed does not
depend on the values): per-channel asymmetric weights, per-tensor asymmetric activations (both attention
matmul operands included), the image FP. Rows:

* PyTorch fp32 — the timm model; PyTorch fake-quant W8A8 — the wrapped model (for reference);
* onnxruntime fp32 — the timm model exported by the same exporter (no quantizers);
* onnxruntime W8A8 — the QDQ export (MatMulIntegerToFloat: 8-bit integer GEMM);
* onnxruntime W4A8 — 4-bit weight codes in 8-bit containers (`int8_weights`), the same integer GEMM;
* onnxruntime W4 weight-only — uint4 weights, float activations (MatMulNBits; onnxruntime's default
  accuracy level 4 computes it with int8 activations).

Latency: batch 1, median (and best) of `--repeats` runs after warm-up; throughput: batch 32, images/s over
`--repeats // 4` batches (at least 2). Sizes: the fp32 state dict, each ONNX file, the packed safetensors
checkpoint (W8 / W4). The kernels column lists the integer ops in onnxruntime's optimized graph. On a
shared machine the load average is printed with the figures; the best-of latency is the steadier one.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

from common.export import OnnxOptions, export_onnx, save_packed  # noqa: E402
from common.export.checkpoint import fp32_bytes  # noqa: E402
from common.export.runtime import INTEGER_KERNELS, kernel_summary, ort_session  # noqa: E402
from common.quant.primitives import qparams_from_range  # noqa: E402
from common.quant.quantizers import UniformQuantizer, quantizers_of  # noqa: E402
from common.quant.scheme import QuantScheme  # noqa: E402
from common.quant.wrap import wrap_model  # noqa: E402

MODELS = {"deit_t": "deit_tiny_patch16_224", "deit_s": "deit_small_patch16_224", "deit_b": "deit_base_patch16_224"}


@torch.no_grad()
def minmax_calibrate(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Every uniform quantizer takes the min/max range of the first tensor it sees."""
    def hook(q, args):
        if q.bits < 32 and not bool(q.calibrated):
            t = args[0].detach()
            dims = q.granularity.reduce_dims(t.dim())
            q.set_qparams(*qparams_from_range(t.amin(dims, keepdim=True).clamp(max=0),
                                              t.amax(dims, keepdim=True).clamp(min=0), q.bits))

    handles = [q.register_forward_pre_hook(hook) for _, q in quantizers_of(model) if isinstance(q, UniformQuantizer)]
    model(x)
    for h in handles:
        h.remove()


def quantized(fp: torch.nn.Module, w_bit: int, a_bit: int, img: int) -> torch.nn.Module:
    m = wrap_model(copy.deepcopy(fp), QuantScheme(w_bit=w_bit, a_bit=a_bit))
    minmax_calibrate(m, torch.randn(4, 3, img, img, generator=torch.Generator().manual_seed(0)))
    for layer in m.modules():
        if hasattr(layer, "freeze_weight"):
            layer.freeze_weight()
    return m.eval()


def timed(fn, x: torch.Tensor, repeats: int) -> list[float]:
    fn(x)  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out


def measure(fn, img: int, repeats: int) -> dict[str, float]:
    lat = timed(fn, torch.randn(1, 3, img, img), repeats)
    thr = timed(fn, torch.randn(32, 3, img, img), max(2, repeats // 4))
    return {"latency_ms": 1e3 * statistics.median(lat), "latency_best_ms": 1e3 * min(lat),
            "throughput_img_s": 32 / statistics.median(thr)}


def torch_fn(model: torch.nn.Module):
    def run(x):
        with torch.inference_mode():
            return model(x)
    return run


def ort_fn(path: Path, threads: int):
    s = ort_session(path, threads=threads)
    name = s.get_inputs()[0].name
    return lambda x: s.run(None, {name: x.numpy()})


def bench_model(short: str, threads: int, repeats: int, tmp: Path) -> list[dict]:
    torch.manual_seed(0)
    fp = timm.create_model(MODELS[short], pretrained=False).eval()
    img = fp.default_cfg["input_size"][-1]
    example = torch.randn(2, 3, img, img)
    rows: list[dict] = []

    def row(name: str, fn, size: int | None, kernels: dict | None = None, packed: int | None = None) -> None:
        r = {"model": short, "row": name, **measure(fn, img, repeats), "bytes": size, "packed_bytes": packed,
             "integer_kernels": {k: v for k, v in (kernels or {}).items() if k in INTEGER_KERNELS}}
        rows.append(r)
        print(f"{short:7s} {name:28s} {r['latency_ms']:8.2f} ms (best {r['latency_best_ms']:7.2f})  "
              f"{r['throughput_img_s']:8.1f} img/s  {size / 1e6 if size else float('nan'):7.2f} MB  "
              f"{' '.join(f'{k} {v}' for k, v in r['integer_kernels'].items())}", flush=True)

    row("PyTorch fp32", torch_fn(fp), fp32_bytes(fp))
    fp_onnx = tmp / f"{short}-fp32.onnx"
    export_onnx(fp, example, fp_onnx)
    row("onnxruntime fp32", ort_fn(fp_onnx, threads), fp_onnx.stat().st_size, kernel_summary(fp_onnx))
    info = {"name": short, "timm_name": MODELS[short], "kwargs": {}, "register_module": None}
    w8a8 = quantized(fp, 8, 8, img)
    row("PyTorch fake-quant W8A8", torch_fn(w8a8), None)
    for name, model, options, bits in (
            ("onnxruntime W8A8", w8a8, OnnxOptions(), 8),
            ("onnxruntime W4A8 (int8 codes)", quantized(fp, 4, 8, img), OnnxOptions(int8_weights=True), 4),
            ("onnxruntime W4 weight-only", quantized(fp, 4, 32, img), OnnxOptions(), 4)):
        path = tmp / f"{short}-{name.split()[1]}.onnx"
        export_onnx(model, example, path, options)
        packed = save_packed(model, tmp / f"{short}-w{bits}.safetensors", info, reference=fp)["bytes"]
        row(name, ort_fn(path, threads), path.stat().st_size, kernel_summary(path), packed)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="deit_t,deit_s", help="comma list of " + ", ".join(MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for short in args.models.split(","):
            rows += bench_model(short.strip(), args.threads, args.repeats, Path(tmp))
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
