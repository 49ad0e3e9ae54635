"""GPU readiness check and benchmark: one command (`bench/gpu.sh`) on a CUDA machine, or on CPU.

    bench/gpu.sh                         # auto device (cuda if present), DeiT-S W4A4, every method below
    bench/gpu.sh --device cpu --smoke    # tiny model and counts: the CPU test of this script (< 1 min)
    python bench/gpu_bench.py --methods aphq erq --model deit_s --json out.json

Stages, in order (each printed as it finishes, then one table):

1. `tests`: the device-agnostic tests (`tests/test_gpu_bench.py -k on_device`) run with
   VITQ_TEST_DEVICE=<device>: fake-quant, APHQ calibration, block reconstruction and ERQ on the device.
2. every method (default: aphq erq repq ptq qdrop brecq fimaq adalog, those whose conf/method/NAME.yaml
   exists) quantizes a random-weight model (W4A4 by default) through its real `PTQMethod.quantize`, with
   a real stage cache in a temporary directory (nothing reused) and reduced counts: every `iters` key of
   the method config set to `--iters`, every `n_images` / `n_calib` capped at `--images`. Each stage
   (what the method times through `ctx.stage` / `ctx.timed`) gets its wall seconds, peak GPU memory
   (`torch.cuda.max_memory_allocated`, reset when the stage starts; nested stages fold into the outer
   one) and an extrapolation to the config's full size (the paper's 1024 / 128 images, 20 000 steps):
   full = (measured − training steps) × full images / used images + Σ sec_per_iter × full iters, where
   the training steps are the `sec_per_iter` × `iters` records the engines return (MR blocks,
   reconstruction units) and the images are those of the stage's config section (mlp_recon, calib,
   recon, n_calib). Step times do not depend on the image count (batches of 32), the calibration search
   and the APH pass are linear in it.

No `.cuda()` anywhere: the device is a `torch.device` passed to the same code the CPU runs; CUDA-only
calls are behind `device.type == "cuda"`. Random images, random weights (`model.pretrained=false`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omegaconf import OmegaConf  # noqa: E402

from common.models.zoo import build_model  # noqa: E402
from common.run.config import CONF_DIR, model_node, register_resolvers, seed_everything, set_precision  # noqa: E402
from common.run.registry import RunContext, get_method  # noqa: E402
from common.run.stages import StageCache  # noqa: E402
from common.run.tracking import Tracker  # noqa: E402

METHODS = ["aphq", "erq", "repq", "ptq", "qdrop", "brecq", "fimaq", "adalog"]
#: --smoke (the CPU test): one reconstruction method, one closed-form method, one baseline
SMOKE_METHODS = ["aphq", "erq", "ptq"]
MiB = 2 ** 20
#: config keys that count images, and the section a stage's images come from
IMAGE_KEYS = ("n_images", "n_calib")
SECTIONS = (("mlp_recon", "mlp_recon"), ("mr", "mlp_recon"), ("calib", "calib"), ("reconstruct", "recon"),
            ("recon", "recon"))


class GpuMemory:
    """Peak GPU memory per stage: reset at each stage start, folded into every open stage."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.open: list[str] = []
        self.peak: dict[str, int] = {}

    def _fold(self) -> None:
        if self.cuda:
            m = torch.cuda.max_memory_allocated(self.device)
            for s in self.open:
                self.peak[s] = max(self.peak.get(s, 0), m)

    @contextlib.contextmanager
    def stage(self, name: str):
        self._fold()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.open.append(name)
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
            self._fold()
            self.open.remove(name)

    def mib(self, name: str) -> float | None:
        return round(self.peak[name] / MiB, 1) if self.cuda and name in self.peak else None


class RandomData:
    """The calibration source the methods draw from: seeded random images of the model's input size."""

    def __init__(self, model: torch.nn.Module, n_max: int):
        self.size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        self.n_calib_available = n_max

    def calibration(self, n: int, augment: bool = False, draw: int = 0):
        gen = torch.Generator().manual_seed(1000 + int(draw))
        return torch.randn(n, *self.size, generator=gen), torch.zeros(n, dtype=torch.long)


def _walk(node: Any, path: tuple = ()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield path + (k,), v
            yield from _walk(v, path + (k,))


def reduce_config(method_cfg: dict, iters: int, images: int) -> tuple[dict, dict]:
    """The method config with every `iters` set to `iters` and image counts capped at `images`, and
    the full values {path: value} of what was changed."""
    cfg = copy.deepcopy(method_cfg)
    full: dict[tuple, int] = {}
    for path, value in list(_walk(cfg)):
        key = path[-1]
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        new = iters if key == "iters" else min(value, images) if key in IMAGE_KEYS else None
        if new is None or new == value:
            continue
        full[path] = value
        node = cfg
        for p in path[:-1]:
            node = node[p]
        node[key] = new
    return cfg, full


def _section(stage: str) -> str | None:
    for needle, section in SECTIONS:
        if needle in stage:
            return section
    return None


def _steps(record: Any) -> list[tuple[float, int]]:
    """(sec_per_iter, iters) of every engine unit found in a stage result."""
    out = []
    if isinstance(record, dict):
        if "sec_per_iter" in record and "iters" in record:
            out.append((float(record["sec_per_iter"]), int(record["iters"] or 0)))
        for v in record.values():
            if isinstance(v, dict):
                out.extend(_steps(v))
    return out


def extrapolate(stage: str, seconds: float, record: Any, reduced: dict, full: dict) -> float:
    """Full-size estimate of one stage (see the module docstring)."""
    steps = _steps(record)
    step_s = sum(s * n for s, n in steps)
    full_iters = max([v for p, v in full.items() if p[-1] == "iters"], default=None)
    section = _section(stage)
    ratio = 1.0
    image_keys = [p for p in full if p[-1] in IMAGE_KEYS]
    # the stage's own section (mlp_recon / calib / recon), else a method-wide count (ERQ's n_calib)
    chosen = [p for p in image_keys if section is not None and section in p] or [p for p in image_keys if len(p) == 1]
    if chosen:
        node = reduced
        for p in chosen[0]:
            node = node[p]
        ratio = full[chosen[0]] / max(int(node), 1)
    rest = max(seconds - step_s, 0.0) * ratio
    return rest + sum(s * (full_iters if full_iters is not None else n) for s, n in steps)


def compose_config(overrides: list[str]):
    """The composed primary config (as run.py composes it), without the hydra node."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides, return_hydra_config=False)
    finally:
        GlobalHydra.instance().clear()


def bench_method(name: str, model_name: str, bits: str, device: torch.device, iters: int, images: int) -> dict:
    composed = compose_config([f"method={name}", f"model={model_name}", f"bits={bits}"])
    raw = OmegaConf.to_container(composed.method, resolve=True)
    red, full = reduce_config(raw, iters, images)
    root = OmegaConf.create({"method": red, "bits": OmegaConf.to_container(composed.bits, resolve=True),
                             "seed": 0, "device": str(device)})
    seed_everything(0)
    torch.manual_seed(0)
    model = build_model(model_node(model_name, checkpoint=None, pretrained=False)).eval()
    data = RandomData(model, images)
    mem = GpuMemory(device)
    records: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        stages = StageCache(Path(tmp) / "run", None, False, {})
        run_stage = stages.run

        def capture(stage_name, key, compute):
            res = run_stage(stage_name, key, compute)
            records[stage_name] = res[0] if isinstance(res, tuple) else res
            return res

        stages.run = capture  # type: ignore[method-assign]
        ctx = RunContext(root, Path(tmp) / "run", device, stages, Tracker(tmp), {})
        timed = ctx.timed

        parents: dict[str, str | None] = {}

        @contextlib.contextmanager
        def tracked(stage_name):
            outer = [o for o in mem.open if o != "total"]
            parents.setdefault(stage_name, outer[-1] if outer else None)
            with mem.stage(stage_name), timed(stage_name):
                yield

        ctx.timed = tracked  # type: ignore[method-assign]
        method = get_method(root.method.name, root.method.get("module"))(root.method, ctx)
        t0 = time.perf_counter()
        with tracked("total"):
            method.quantize(copy.deepcopy(model).to(device), data)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        total = time.perf_counter() - t0
    rows = []
    for stage, sec in ctx.timings.items():
        if stage == "total":
            continue
        rows.append({"stage": stage, "parent": parents.get(stage), "seconds": round(sec, 2),
                     "peak_gpu_mib": mem.mib(stage),
                     "full_estimate_s": round(extrapolate(stage, sec, records.get(stage), red, full), 1)})
    top = [r for r in rows if r["parent"] is None]
    untimed = max(total - sum(r["seconds"] for r in top), 0.0)  # work outside any stage: not scaled
    return {"full_estimate_s": round(untimed + sum(r["full_estimate_s"] for r in top), 1),
            "method": name, "model": model_name, "bits": bits, "device": str(device), "iters": iters,
            "images": images, "full_counts": {".".join(map(str, p)): v for p, v in full.items()},
            "total_s": round(total, 2), "peak_gpu_mib": mem.mib("total"), "stages": rows}


def run_tests(device: torch.device, timeout: float) -> dict:
    env = dict(os.environ, VITQ_TEST_DEVICE=str(device), PYTHONPATH=str(REPO))
    env.setdefault("OMP_NUM_THREADS", "2")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_gpu_bench.py"),
           "-k", "on_device"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"stage": "tests", "seconds": round(time.perf_counter() - t0, 2), "returncode": proc.returncode,
            "summary": last, "output_tail": proc.stdout[-3000:] + proc.stderr[-2000:]}


def format_table(tests: dict | None, results: list[dict]) -> str:
    lines = [f"{'method':10s} {'stage':24s} {'seconds':>9s} {'peak GPU MiB':>13s} {'full-size est. s':>17s}"]
    if tests is not None:
        lines.append(f"{'-':10s} {'tests':24s} {tests['seconds']:9.2f} {'-':>13s} {'-':>17s}  {tests['summary']}")
    for r in results:
        if "error" in r:
            lines.append(f"{r['method']:10s} {'ERROR':24s} {r['error']}")
            continue
        for s in r["stages"]:
            gpu = "-" if s["peak_gpu_mib"] is None else f"{s['peak_gpu_mib']:.1f}"
            label = ("  " if s["parent"] else "") + s["stage"]
            lines.append(f"{r['method']:10s} {label:24s} {s['seconds']:9.2f} {gpu:>13s} {s['full_estimate_s']:17.1f}")
        gpu = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.1f}"
        lines.append(f"{r['method']:10s} {'total':24s} {r['total_s']:9.2f} {gpu:>13s} {r['full_estimate_s']:17.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny model (demo) and counts: checks the script, not speed")
    ap.add_argument("--model", default=None, help="model config (default deit_s; demo with --smoke)")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--methods", nargs="+", default=None,
                    help=f"default: {' '.join(METHODS)} (those present); --smoke: {' '.join(SMOKE_METHODS)}")
    ap.add_argument("--iters", type=int, default=None, help="steps per unit at reduced size (default 200; smoke 10)")
    ap.add_argument("--images", type=int, default=None, help="image cap at reduced size (default 64; smoke 8)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    set_precision(False)
    model = args.model or ("demo" if args.smoke else "deit_s")
    iters = args.iters or (10 if args.smoke else 200)
    images = args.images or (8 if args.smoke else 64)
    methods = [m for m in (args.methods or (SMOKE_METHODS if args.smoke else METHODS))
               if (CONF_DIR / "method" / f"{m}.yaml").is_file()]
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", model {model}, {args.bits}, iters {iters}, images {images}, methods {' '.join(methods)}", flush=True)
    tests = None
    if not args.skip_tests:
        tests = run_tests(device, timeout=300)
        print(f"tests: {tests['summary']} ({tests['seconds']} s)", flush=True)
        if tests["returncode"] != 0:
            print(tests["output_tail"], flush=True)
    results = []
    for name in methods:
        try:
            r = bench_method(name, model, args.bits, device, iters, images)
        except Exception as exc:  # report and go on: one broken method must not hide the others' figures
            r = {"method": name, "error": f"{type(exc).__name__}: {exc}"}
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "stages"}), flush=True)
    print(format_table(tests, results), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"tests": tests, "methods": results}, indent=1))
    failed = (tests is not None and tests["returncode"] != 0) or any("error" in r for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
