"""Benchmark APHQ-ViT: calibration search, and the whole method with short iteration counts.

    python bench/bench_aphq_calib.py                          # calibration of deit_t and deit_s, 128 images, W4A4
    python bench/bench_aphq_calib.py --models deit_t --images 32 --threads 1
    python bench/bench_aphq_calib.py --e2e --models deit_t --iters 20 --recon-images 64
    python bench/bench_aphq_calib.py --models deit_t --images 8 --int-search both   # old vs new search, same process

Models have random weights and the images are random (seeded): run time does not depend on either,
except that the exact branch-and-bound search prunes less on such flat error landscapes than on
trained models. Printed per model: wall seconds, CPU seconds (process user + system time: the
steadier figure on a shared machine; with one thread it is about the wall time on an idle core) and
peak resident memory (sampled every 5 ms; "+" = above the level before the stage). Calibration also
gets a breakdown by module kind. `--e2e` runs MR → calibration → APH → block reconstruction and
prints per-stage times, seconds per MR / reconstruction step, and APH seconds per image and unit.
Nothing is written to disk.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aphq.aph import average_perturbation_hessian  # noqa: E402
from common.calib.calibrate import LN_SITES, CalibConfig, calibrate_model  # noqa: E402
from aphq.mlp_recon import reconstruct_mlps  # noqa: E402
from common.recon.block import reconstruct_model  # noqa: E402
from common.quant.scheme import QuantScheme  # noqa: E402
from common.quant.wrap import wrap_model  # noqa: E402
from common.models.units import model_units  # noqa: E402
from common.models.zoo import build_model  # noqa: E402
from common.run.config import group_options, model_node  # noqa: E402

MiB = 1024 ** 2


def rss() -> int:
    """Resident set size of this process in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Background sampler of the resident set size; `stage()` records the peak while a block runs."""

    def __init__(self, period: float = 0.005):
        self.period, self.peak, self._stop = period, rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.period)

    @contextmanager
    def stage(self, out: dict, name: str):
        base = rss()
        self.peak = base
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.peak = max(self.peak, rss())
        out[name] = {"wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(time.process_time() - c0, 2),
                     "peak_MiB": round(self.peak / MiB), "plus_MiB": round((self.peak - base) / MiB)}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def aphq_scheme(bits: int) -> QuantScheme:
    return QuantScheme(w_bit=bits, a_bit=bits, matmul_granularity="head", ln_act_granularity="channel",
                       ln_sites=LN_SITES)


def fp_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_node(name, checkpoint=None, pretrained=False)).eval()


def images(n: int, model: torch.nn.Module, seed: int) -> torch.Tensor:
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return torch.randn(n, *size, generator=torch.Generator().manual_seed(seed))


def bench_calibration(name: str, n: int, bits: int, meter: PeakRSS, int_search: bool = True,
                      units: int | None = None) -> dict:
    model = wrap_model(fp_model(name), aphq_scheme(bits))
    if units:  # only the first `units` units (patch embed, blocks.0, ...): a per-block figure in less time
        import common.calib.capture as capture_mod  # iter_layer_io walks the units

        capture_mod.model_units = lambda m, _all=model_units: _all(m)[:units]
    x = images(n, model, 1)
    out: dict = {"int_search": int_search}
    with meter.stage(out, "calibration"):
        rec = calibrate_model(model, x, CalibConfig(n_images=n, int_search=int_search), bits, bits, progress=False)
    out["state"] = model.state_dict()
    kinds: dict[str, float] = {}
    for qname, sec in rec["seconds"].items():
        kind = qname.rsplit(".", 1)[-1] if "." in qname else qname
        kinds[kind] = round(kinds.get(kind, 0.0) + sec, 2)
    out["by_module_kind_wall_s"] = kinds
    cpu_kinds: dict[str, float] = {}
    for qname, sec in rec.get("cpu_seconds", {}).items():
        kind = qname.rsplit(".", 1)[-1] if "." in qname else qname
        cpu_kinds[kind] = round(cpu_kinds.get(kind, 0.0) + sec, 2)
    out["by_module_kind_cpu_s"] = cpu_kinds
    out["matmul_searches"] = sum(r.get("searches", 0) for r in rec["modules"].values())
    out["matmul_memo_hits"] = sum(r.get("memo_hits", 0) for r in rec["modules"].values())
    out["matmul_rescored"] = sum(r.get("rescored", 0) for r in rec["modules"].values())
    return out


def bench_e2e(name: str, args, meter: PeakRSS) -> dict:
    bits = args.bits
    fp = fp_model(name)
    q = copy.deepcopy(fp)
    units = model_units(fp)
    out: dict = {}
    x_mr, x_cal, x_rec = images(args.recon_images, fp, 0), images(args.images, fp, 1), images(args.recon_images, fp, 2)
    with meter.stage(out, "mlp_recon"):
        mr = reconstruct_mlps(q, fp, x_mr, {"iters": args.iters, "log_every": 0}, progress=False)
    it = [b["sec_per_iter"] for b in mr["blocks"].values()]
    out["mlp_recon"].update(aph_s=mr["aph_seconds"], s_per_step=round(sum(it) / len(it), 4))
    _cpu_estimate(out["mlp_recon"], "s_per_step")
    wrap_model(q, aphq_scheme(bits))
    with meter.stage(out, "calibration"):
        calibrate_model(q, x_cal, CalibConfig(n_images=args.images), bits, bits, progress=False)
    names = [u.name for u in units]
    with meter.stage(out, "aph"):
        aph = average_perturbation_hessian(fp, x_rec, names, progress=False)
    out["aph"]["s_per_image_per_unit"] = round(out["aph"]["wall_s"] / (x_rec.shape[0] * len(aph)), 4)
    with meter.stage(out, "block_recon"):
        rec = reconstruct_model(q, fp, x_rec, {"iters": args.iters, "log_every": 0, "eval_stats": False},
                                weights=aph, progress=False)
    blocks = [u for n_, u in rec["units"].items() if n_.startswith(("blocks.", "layers."))]
    out["block_recon"]["s_per_step_block"] = round(sum(u["sec_per_iter"] for u in blocks) / max(len(blocks), 1), 4)
    _cpu_estimate(out["block_recon"], "s_per_step_block")
    _cpu_estimate(out["aph"], "s_per_image_per_unit")
    return out


def _cpu_estimate(stage: dict, key: str) -> None:
    """Per-step figures are wall time; on a shared machine scale them by the stage's CPU/wall ratio
    (≈ the time on an idle core when running with one thread)."""
    if stage.get("wall_s"):
        stage[key + "_cpu"] = round(stage[key] * stage["cpu_s"] / stage["wall_s"], 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deit_t", "deit_s"], choices=group_options("model"))
    p.add_argument("--images", type=int, default=128, help="calibration images (reference: 128)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--e2e", action="store_true", help="whole method with short iteration counts")
    p.add_argument("--iters", type=int, default=20, help="MR and block-reconstruction steps per unit (--e2e)")
    p.add_argument("--recon-images", type=int, default=64, help="MR / APH / reconstruction images (--e2e)")
    p.add_argument("--int-search", choices=["on", "off", "both"], default="on",
                   help="calibration: integer-code evaluation (method.calib.int_search); 'both' runs off then on "
                        "in this process, prints the CPU-time ratio and checks the state dicts are identical")
    p.add_argument("--units", type=int, default=None,
                   help="calibration: only the first N units (2 = patch embed + the first block)")
    p.add_argument("--json", type=str, default=None, help="also write the results to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    meter = PeakRSS()
    results = {}
    try:
        for name in args.models:
            if args.e2e:
                runs = [(name, lambda: bench_e2e(name, args, meter))]
            else:
                flags = {"on": [True], "off": [False], "both": [False, True]}[args.int_search]
                runs = [(name if len(flags) == 1 else f"{name}/int_search={f}",
                         lambda f=f: bench_calibration(name, args.images, args.bits, meter, f, args.units))
                        for f in flags]
            done = []
            for key, fn in runs:
                t0 = time.perf_counter()
                res = fn()
                res["total_wall_s"] = round(time.perf_counter() - t0, 2)
                state = res.pop("state", None)
                done.append((res, state))
                results[key] = res
                print(json.dumps({"model": key, "images": args.images, "bits": args.bits,
                                  "threads": torch.get_num_threads(), **res}), flush=True)
            if len(done) == 2:
                (old, s_old), (new, s_new) = done
                same = all(torch.equal(s_old[k], s_new[k]) for k in s_old) and s_old.keys() == s_new.keys()
                cmp = {"model": name, "cpu_ratio_off_over_on": round(old["calibration"]["cpu_s"] / new["calibration"]["cpu_s"], 2),
                       "wall_ratio_off_over_on": round(old["calibration"]["wall_s"] / new["calibration"]["wall_s"], 2),
                       "identical_state_dicts": same}
                results[f"{name}/compare"] = cmp
                print(json.dumps(cmp), flush=True)
    finally:
        meter.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
