"""Integer export of finished runs: packed safetensors checkpoints and QDQ ONNX (docs/export.md).

    python -m common.export RUN_DIR --format safetensors|onnx [--out FILE] [--force]

Modules: `packing` (bit packing), `specs` (quantizer specs, integer weight codes), `rundir` (rebuild a
run's fake-quant model from its stages), `checkpoint` (packed format, writer and loader), `onnx_qdq`
(ONNX with QuantizeLinear/DequantizeLinear), `runtime` (onnxruntime sessions, agreement, kernels),
`api` (`export_run`), `__main__` (the CLI). onnx / onnxruntime / onnxscript come with the `export` extra.
"""
from .api import FORMATS, default_output, export_run
from .checkpoint import load_packed, read_manifest, save_packed
from .onnx_qdq import OnnxOptions, export_onnx
from .packing import pack_codes, unpack_codes
from .rundir import LoadedRun, load_run

__all__ = ["FORMATS", "default_output", "export_run", "load_packed", "read_manifest", "save_packed", "OnnxOptions",
           "export_onnx", "pack_codes", "unpack_codes", "LoadedRun", "load_run"]
