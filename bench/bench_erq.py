"""Benchmark ERQ (and RepQ-ViT): per-stage wall time and peak memory, nothing written to disk.

    python bench/bench_erq.py                       # deit_t and deit_s, W4A4, 32 calibration images
    python bench/bench_erq.py --models deit_b --threads 2 --method erq

Models have random weights (`model.pretrained=false`) and the calibration images are random
(seeded): run time does not depend on either. Stage results are kept in memory (no stage cache on
disk). Peak memory is the process's resident set size, sampled every 5 ms by a background thread and
attributed to the stage that was running; "peak" is the maximum over the whole quantization, and
"+peak" is that minus the resident size before quantization started (model and images loaded).
CPU seconds (process user + system time) are printed beside wall time: on a shared machine they are
the steadier figure (with one thread, CPU time ≈ the wall time the run takes on an idle core).
Disk writes are read from /proc/self/io (`write_bytes`) around the quantization.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.run.config import CONF_DIR, model_node  # noqa: E402
from common.run.registry import RunContext, get_method  # noqa: E402
from common.run.tracking import Tracker  # noqa: E402
from common.models.zoo import build_model  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

GiB = 1024 ** 3


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def disk_written() -> int | None:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("write_bytes"))
    except (OSError, StopIteration):
        return None


class MemorySampler:
    """Samples RSS in a thread; `mark(stage)` / `unmark()` attribute samples to the running stage."""

    def __init__(self, period: float = 0.005):
        self.period = period
        self.stack: list[str] = []
        self.peak: dict[str, int] = {}
        self.overall = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.period)

    def sample(self) -> None:
        r = rss_bytes()
        self.overall = max(self.overall, r)
        for s in self.stack:
            self.peak[s] = max(self.peak.get(s, 0), r)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class _MemoryStages:
    """Stage 'cache' that only computes: nothing touches the disk."""

    def run(self, name, key, compute):
        return compute(), "memory"


def bench(model_name: str, method: str, bits: str, n_calib: int, overrides: list[str]) -> dict:
    cfg = OmegaConf.create({"method": OmegaConf.load(CONF_DIR / "method" / f"{method}.yaml"),
                            "bits": OmegaConf.load(CONF_DIR / "bits" / f"{bits}.yaml")})
    cfg.method.n_calib = n_calib
    for item in overrides:
        key, value = item.split("=", 1)
        OmegaConf.update(cfg, key, _yaml(value), merge=True)
    model = build_model(model_node(model_name, checkpoint=None, pretrained=False))
    size = model.default_cfg["input_size"][-1]
    images = torch.randn(n_calib, 3, size, size, generator=torch.Generator().manual_seed(0))

    class Data:
        def calibration(self, n, augment=False):
            return images[:n], torch.zeros(n, dtype=torch.long)

    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(cfg, Path(tmp), torch.device("cpu"), _MemoryStages(), Tracker(tmp), {})
        sampler = MemorySampler()
        timed = ctx.timed

        cpu: dict[str, float] = {}

        @contextlib.contextmanager
        def tracked(stage):
            sampler.stack.append(stage)
            sampler.sample()
            c0 = time.process_time()
            try:
                with timed(stage):
                    yield
            finally:
                cpu[stage] = cpu.get(stage, 0.0) + time.process_time() - c0
                sampler.sample()
                sampler.stack.remove(stage)

        ctx.timed = tracked
        m = get_method(cfg.method.name, cfg.method.module)(cfg.method, ctx)
        work = copy.deepcopy(model)
        base = rss_bytes()
        w0 = disk_written()
        with sampler:
            t0 = time.perf_counter()
            with tracked("total"):
                m.quantize(work, Data())
            total = time.perf_counter() - t0
        w1 = disk_written()
    return {"model": model_name, "method": method, "bits": bits, "n_calib": n_calib,
            "threads": torch.get_num_threads(), "total_s": round(total, 2),
            "cpu_s": round(cpu["total"], 2), "stages_s": {k: v for k, v in ctx.timings.items() if k != "total"},
            "stages_cpu_s": {k: round(v, 2) for k, v in cpu.items() if k != "total"},
            "rss_before_gib": round(base / GiB, 3), "peak_rss_gib": round(sampler.overall / GiB, 3),
            "stage_peak_rss_gib": {k: round(v / GiB, 3) for k, v in sampler.peak.items()},
            "disk_written_mib": None if w0 is None else round((w1 - w0) / 2 ** 20, 2)}


def _yaml(text: str):
    import yaml

    return yaml.safe_load(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["deit_t", "deit_s"])
    ap.add_argument("--method", default="erq", choices=["erq", "repq"])
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("overrides", nargs="*", help="method config overrides, e.g. method.wqer.refine.enabled=false")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        r = bench(name, args.method, args.bits, args.n_calib, args.overrides)
        results.append(r)
        print(f"\n{r['model']} {r['method']} {r['bits']} calib={r['n_calib']} threads={r['threads']}: "
              f"total {r['total_s']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"(+{r['peak_rss_gib'] - r['rss_before_gib']:.2f} over {r['rss_before_gib']:.2f} before), "
              f"disk written {r['disk_written_mib']} MiB")
        print(f"  {'stage':18s} {'wall s':>8s} {'cpu s':>8s} {'peak GiB':>9s}")
        for stage, sec in r["stages_s"].items():
            print(f"  {stage:18s} {sec:8.2f} {r['stages_cpu_s'].get(stage, float('nan')):8.2f} "
                  f"{r['stage_peak_rss_gib'].get(stage, float('nan')):9.2f}")
        print(f"  {'total':18s} {r['total_s']:8.2f} {r['cpu_s']:8.2f} {r['peak_rss_gib']:9.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
