"""onnxruntime helpers: sessions, batched inference, agreement with PyTorch, and which kernels run.

onnxruntime fuses QDQ patterns at session creation (default: all graph optimizations). One of its fusions
changes numerics: a ≤4-bit DequantizeLinear weight behind a float activation becomes MatMulNBits with
``accuracy_level`` 4 (the activation re-quantized to int8 per block at run time), set by the session entry
``session.qdq_matmulnbits_accuracy_level``. :func:`ort_session` passes ``nbits_accuracy_level`` through, so
callers can compare the default (4) with the float-activation form (0).
"""
from __future__ import annotations

import collections
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

__all__ = ["ort_session", "ort_predict", "agreement", "kernel_summary", "INTEGER_KERNELS"]

#: Op types of onnxruntime's optimized graph that compute with integer operands.
INTEGER_KERNELS = ("MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "QLinearConv",
                   "ConvInteger", "DynamicQuantizeMatMul", "QGemm", "QAttention")


def ort_session(path: str | Path, threads: int = 2, nbits_accuracy_level: int | None = None,
                optimized_path: str | Path | None = None):
    """A CPU InferenceSession with `threads` intra-op threads (sequential execution)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # the "optimized model may be hardware specific" warning is expected
    if nbits_accuracy_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(int(nbits_accuracy_level)))
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_predict(session, loader: Iterable) -> torch.Tensor:
    """Logits (float32, CPU) of the session over (images, labels) batches."""
    name = session.get_inputs()[0].name
    out = [torch.from_numpy(np.asarray(session.run(None, {name: x.numpy().astype(np.float32)})[0])) for x, _ in loader]
    return torch.cat(out)


def agreement(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement (%) and the largest |Δlogit| of `logits` against `reference`."""
    ref, got = reference.float(), logits.float()
    return {"top1_agreement": 100.0 * (ref.argmax(1) == got.argmax(1)).float().mean().item(),
            "max_abs_dlogit": (ref - got).abs().max().item(), "n": int(ref.shape[0])}


def kernel_summary(path: str | Path, threads: int = 1) -> dict[str, int]:
    """Op-type counts of onnxruntime's optimized graph (the kernels it actually runs) for MatMul/Conv-like
    and QDQ ops."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort_session(path, threads=threads, optimized_path=opt)
        ops = collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    keep = set(INTEGER_KERNELS) | {"MatMul", "FusedMatMul", "Gemm", "Conv", "QuantizeLinear", "DequantizeLinear"}
    return {k: v for k, v in sorted(ops.items()) if k in keep}
