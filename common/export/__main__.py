"""`python -m common.export RUN_DIR --format safetensors|onnx [--out FILE] [--force]`: export a finished run.

    python -m common.export outputs/runs/demo-ptq-w4a4/<time> --format safetensors
    python -m common.export outputs/runs/demo-ptq-w4a4/<time> --format onnx --out /tmp/demo.onnx

Default output: RUN_DIR/export/model.<format>; the report (sizes, agreement, kernels) goes to <out>.json.
"""
from __future__ import annotations

import argparse
import sys

from common.errors import UserError

from .api import FORMATS, export_run
from .onnx_qdq import OnnxOptions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m common.export", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished run dir (outputs/runs/<model>-<method>-<bits>/<time>)")
    p.add_argument("--format", required=True, choices=FORMATS, help="packed integer checkpoint or QDQ ONNX")
    p.add_argument("--out", help="output file (default: RUN_DIR/export/model.<format>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--no-verify", action="store_true", help="skip the eval-set comparison with the fake-quant model")
    p.add_argument("--qdq-only", action="store_true",
                   help="onnx: refuse quantizers without a QuantizeLinear/DequantizeLinear form (log2/log√2, "
                        "fractional zero-points, multi-axis scales) instead of emulating them with plain ops")
    p.add_argument("--int8-weights", action="store_true",
                   help="onnx: store sub-8-bit weight codes in 8-bit types (W4A8 then runs on the 8-bit integer GEMM)")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset (>= 21 for int4/uint4)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads for verification")
    args = p.parse_args(argv)
    try:
        export_run(args.run_dir, args.format, args.out, force=args.force, verify=not args.no_verify,
                   onnx_options=OnnxOptions(opset=args.opset, qdq_only=args.qdq_only, int8_weights=args.int8_weights),
                   threads=args.threads)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
