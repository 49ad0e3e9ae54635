"""`export_run`: a finished run dir → packed safetensors checkpoint or QDQ ONNX, verified and recorded.

Order of work (every user-fixable problem is a one-line UserError before the heavy part):
output path free (or `force`) → run config readable, a quantizing method, stage files present → the
run's final fake-quant model rebuilt from its stages (`common.export.rundir`) → every quantizer has a
form in the chosen format → write → verify on the run's eval set → report (printed, and written to
`<out>.json`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import UserError

from .checkpoint import fp32_bytes, load_packed, project_versions, save_packed
from .onnx_qdq import OnnxOptions, check_exportable, export_onnx, quantizer_specs
from .rundir import LoadedRun, load_run, model_info, read_run_config

__all__ = ["FORMATS", "default_output", "export_run"]

FORMATS = ("safetensors", "onnx")


def default_output(run_dir: str | Path, fmt: str) -> Path:
    """`<run_dir>/export/model.<format>`."""
    return Path(run_dir) / "export" / f"model.{fmt}"


def _fake_quant_logits(run: LoadedRun, loader) -> tuple[torch.Tensor, torch.Tensor]:
    from common.run.evaluate import predict

    for m in run.model.modules():  # as the pipeline evaluates: frozen (cached) fake-quant weights
        if hasattr(m, "freeze_weight"):
            m.freeze_weight()
    try:
        return predict(run.model, loader, "cpu", "fake-quant eval")
    finally:
        for m in run.model.modules():
            if hasattr(m, "unfreeze_weight"):
                m.unfreeze_weight()


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def _example_input(model: torch.nn.Module) -> torch.Tensor:
    from common.models.zoo import data_config

    return torch.randn(2, *data_config(model)["input_size"])


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, *, force: bool = False,
               verify: bool = True, onnx_options: OnnxOptions | None = None, threads: int = 2,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export a finished run (see the module docstring). Returns the report that is written to `<out>.json`."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use {' or '.join(FORMATS)}")
    out = Path(out) if out else default_output(run_dir, fmt)
    if out.exists() and not force:
        raise UserError(f"output {out} exists: pass --force to overwrite it, or --out another path")
    options = onnx_options or OnnxOptions()
    read_run_config(run_dir)  # cheap checks before the model is built
    t0 = time.perf_counter()
    run = load_run(run_dir)
    specs = quantizer_specs(run.model)  # an unknown quantizer family fails here, in both formats
    if fmt == "onnx":
        check_exportable(specs, options)
    info = model_info(run.cfg)
    fp_bytes = fp32_bytes(run.fp_model)
    report: dict[str, Any] = {
        "format": fmt, "run_dir": str(run.run_dir), "model": info, "method": run.method,
        "bits": {k: run.cfg.bits.get(k) for k in ("name", "w_bit", "a_bit", "patch_embed_a_bit", "head_a_bit",
                                                  "head_w_bit")},
        "quantizers": len(specs), "stages": [e.get("path") for e in run.stage_events],
        "project": project_versions(), "rebuild_seconds": round(time.perf_counter() - t0, 3)}
    t1 = time.perf_counter()
    if fmt == "safetensors":
        extra = {"method": run.method, "bits": report["bits"], "config": run.plain_config(),
                 "run": {"dir": str(run.run_dir), "quant_top1": run.results.get("quant_top1")}}
        written = save_packed(run.model, out, info, extra, reference=run.fp_model)
    else:
        written = export_onnx(run.model, _example_input(run.fp_model), out, options, specs)
    report["write_seconds"] = round(time.perf_counter() - t1, 3)
    report.update(path=str(out), bytes=written["bytes"], fp32_bytes=fp_bytes,
                  fp32_ratio=round(fp_bytes / written["bytes"], 3), details=written)
    log(f"wrote {out}: {written['bytes'] / 1e6:.2f} MB, FP32 checkpoint {fp_bytes / 1e6:.2f} MB "
        f"(1/{fp_bytes / written['bytes']:.1f})")
    if fmt == "onnx":
        from .runtime import kernel_summary

        report["onnxruntime_kernels"] = kernel_summary(out)
        log("onnxruntime kernels: " + ", ".join(f"{k} {v}" for k, v in report["onnxruntime_kernels"].items()))
    if verify:
        report["verify"] = _verify(run, fmt, out, threads, log, report.get("onnxruntime_kernels", {}))
    Path(f"{out}.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def _verify(run: LoadedRun, fmt: str, out: Path, threads: int, log: Callable[[str], None],
            kernels: dict[str, int]) -> dict[str, Any]:
    """Compare the written artefact with the rebuilt fake-quant model on the run's eval set."""
    from common.run.evaluate import predict

    from .runtime import agreement, ort_predict, ort_session

    data = run.eval_data()
    ref, labels = _fake_quant_logits(run, data.eval_loader())
    res: dict[str, Any] = {"n_eval": int(labels.numel()), "fake_quant_top1": _top1(ref, labels),
                           "run_quant_top1": run.results.get("quant_top1")}
    if res["run_quant_top1"] is not None and abs(res["fake_quant_top1"] - res["run_quant_top1"]) > 1e-6:
        log(f"warning: the rebuilt fake-quant model scores {res['fake_quant_top1']:.2f} top-1, the run recorded "
            f"{res['run_quant_top1']:.2f}")
    if fmt == "safetensors":
        logits, _ = predict(load_packed(out), data.eval_loader(), "cpu", "packed eval")
        res.update(exact=bool(torch.equal(logits, ref)), **agreement(ref, logits), top1=_top1(logits, labels))
        log(f"rebuilt from {out.name}: logits {'equal' if res['exact'] else 'DIFFER from'} the fake-quant model's "
            f"on {res['n']} eval images (max |Δlogit| {res['max_abs_dlogit']:.3g}), top-1 {res['top1']:.2f}")
        return res
    sessions: dict[str, int | None] = {"default": None}
    if kernels.get("MatMulNBits"):  # onnxruntime re-quantizes their float inputs to int8 by default
        sessions["nbits_accuracy_level_0"] = 0
    for tag, level in sessions.items():
        logits = ort_predict(ort_session(out, threads, level), data.eval_loader())
        res[tag] = {**agreement(ref, logits), "top1": _top1(logits, labels)}
        log(f"onnxruntime ({tag.replace('_', ' ')}) vs PyTorch fake-quant on {res[tag]['n']} eval images: "
            f"top-1 agreement {res[tag]['top1_agreement']:.2f}%, max |Δlogit| {res[tag]['max_abs_dlogit']:.3g}, "
            f"top-1 {res[tag]['top1']:.2f} (fake-quant {res['fake_quant_top1']:.2f})")
    if "nbits_accuracy_level_0" in res:
        log("note: onnxruntime fuses weights behind float activations into MatMulNBits and by default re-quantizes "
            "those activations to int8; the session entry session.qdq_matmulnbits_accuracy_level=0 keeps them exact")
    return res
