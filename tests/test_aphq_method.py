"""The `aphq` method family through the real pipeline (`common.run.pipeline.run`) on the demo model.

* stages are cached and reused: a matching later stage is loaded and earlier stages are not touched;
  a changed reconstruction config recomputes only that stage; `stages.load.<stage>=PATH` loads a file;
  reusing a saved stage gives the same final numbers as computing it;
* block reconstruction resumes from its per-unit checkpoint after a crash, with identical results;
* on the trained demo model at W4A4 and W3A3 (short iteration counts): aphq beats qdrop, which beats
  ptq, in KL to the FP model by a margin measured over seeds, without losing top-1 beyond its binomial
  standard error; MR keeps the FP accuracy within 2 points.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.run.pipeline import run

from conftest import compose_cfg, point_at, read_jsonl, run_py_many, top1_tolerance

# Short settings (the paper's are 20 000 steps on 1024 / 128 images); random demo weights unless trained ones
# are asked for, so the plumbing tests do not depend on the bundled checkpoint.
FAST = ["model=demo", "logger=jsonl", "num_threads=1",
        "method.mlp_recon.n_images=64", "method.mlp_recon.iters=10", "method.mlp_recon.log_every=5",
        "method.calib.n_images=16", "method.recon.n_images=64", "method.recon.iters=10", "method.recon.log_every=5"]
RANDOM = ["model.checkpoint=null", "model.pretrained=false"]
KEYS = ("quant_top1", "kl_to_fp", "top1_agreement")


def _events(run_dir: Path) -> list[tuple[str, str]]:
    events = read_jsonl(run_dir / "stages" / "events.jsonl", missing_ok=True)
    return [(e["stage"], e["event"]) for e in events if e["stage"].startswith("aphq_")]


def _same(a: dict, b: dict) -> None:
    for k in KEYS:
        assert a[k] == b[k], (k, a[k], b[k])


def test_stages_are_reused_and_loadable(run_cfg, tmp_path):
    base = ["method=aphq", *FAST, *RANDOM]
    r1 = run(run_cfg(base, run_dir=tmp_path / "a"))
    assert _events(tmp_path / "a") == [("aphq_mlp_recon", "computed"), ("aphq_calibrate", "computed"),
                                       ("aphq_reconstruct", "computed")]
    assert {"aphq_mlp_recon", "aphq_calibrate", "aphq_reconstruct"} <= set(r1["timings"])
    metrics = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert any(m.get("curve", "").startswith("recon/blocks.") for m in metrics)  # per-unit loss curves
    assert any(m.get("curve", "").startswith("mr/blocks.") for m in metrics)
    assert any("mr_fp_top1" in m for m in metrics) and any("calib_top1" in m for m in metrics)

    # same config, new run dir, shared cache: only the last stage is loaded, the earlier ones are not touched
    r2 = run(run_cfg(base, run_dir=tmp_path / "b"))
    assert _events(tmp_path / "b") == [("aphq_reconstruct", "loaded")]
    _same(r1, r2)

    # a different reconstruction config reuses the calibration (and never needs the MR stage)
    run(run_cfg(base + ["method.recon.iters=6"], run_dir=tmp_path / "c"))
    assert _events(tmp_path / "c") == [("aphq_calibrate", "loaded"), ("aphq_reconstruct", "computed")]

    # an explicit stage file (the reference's --load-calibrate-checkpoint), no implicit reuse
    cal = next((tmp_path / "a" / "stages").glob("aphq_calibrate-*.pt"))
    r4 = run(run_cfg(base + ["stages.reuse=false", f"+stages.load.aphq_calibrate={cal}"], run_dir=tmp_path / "d"))
    assert _events(tmp_path / "d") == [("aphq_calibrate", "loaded"), ("aphq_reconstruct", "computed")]
    _same(r1, r4)  # loading the saved calibration gives the numbers of computing it


def test_reconstruction_resumes_after_a_crash(run_cfg, tmp_path, monkeypatch):
    import aphq.method as M

    base = ["method=qdrop", *FAST, *RANDOM]
    real = M.reconstruct_model

    class Killed(RuntimeError):
        pass

    def crash_after_two_units(*args, on_unit_done=None, **kw):
        done = []

        def hook(name):
            on_unit_done(name)
            done.append(name)
            if len(done) == 2:
                raise Killed(name)
        return real(*args, on_unit_done=hook, **kw)

    monkeypatch.setattr(M, "reconstruct_model", crash_after_two_units)
    with pytest.raises(Killed):
        run(run_cfg(base, run_dir=tmp_path / "killed"))
    assert list((tmp_path / "stage_cache").glob("aphq_reconstruct-*.partial.pt"))
    monkeypatch.setattr(M, "reconstruct_model", real)
    resumed = run(run_cfg(base, run_dir=tmp_path / "resumed"))
    metrics = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [m["next_unit"] for m in metrics if m.get("event") == "aphq_reconstruct_resumed"] == [2]
    assert not list((tmp_path / "stage_cache").glob("aphq_reconstruct-*.partial.pt"))  # cleaned up

    fresh_cfg = point_at(compose_cfg(base), tmp_path / "fresh", tmp_path / "other_cache")
    _same(resumed, run(fresh_cfg))


# Steps per unit (MR and block reconstruction) of the default-suite ordering check. W3A3 separates the methods
# clearly at 500; W4A4 is nearly saturated on this model (PTQ is 1 point below FP) and needs 1000: at 500 steps
# QDrop's KL was above PTQ's (0.0449 vs 0.0423). The `slow` test below checks the demo preset (2000 steps).
SHORT_ORDER_STEPS = {"w3a3": 500, "w4a4": 1000}


# KL(fp‖q) ratios better/worse at the SHORT_ORDER_STEPS, seeds 0 / 1 / 2, measured with this code (`seed=N`,
# same settings as the test; table in docs/aphq.md, "Shorter runs"):
#   W3A3/500   aphq/qdrop 0.76 / 0.77 / 0.89   qdrop/ptq 0.36 / 0.49 / 0.48
#   W4A4/1000  aphq/qdrop 0.64 / 0.55 / 0.75   qdrop/ptq 0.79 / 0.70 / 0.84
# so every ordering held at every seed with a gap of at least 11 %; asserted: a gap of at least 5 %. The slow
# preset test (2000 steps) reuses this check; its margins are from one seed only (docs/aphq.md "Demo results",
# seed 0: aphq/qdrop 0.87 / 0.66, qdrop/ptq 0.54 / 0.33 at W4A4 / W3A3).
KL_RATIO = 0.95
# Top-1 on the 400 test images moves by several images between seeds and machines while the KL ordering holds:
# better − worse over seeds 0 / 1 / 2 was W3A3 aphq−qdrop −1.75 / +2.75 / +1.5, W4A4 qdrop−ptq +1.25 / +1.0 / −0.5
# (on another CPU, W3A3 seed 0: aphq 95.50 vs qdrop 96.25). So top-1 is only required not to be lower by more
# than 2 SE of the difference of two accuracies (conftest.top1_tolerance: 2.7 points at 96 %, 1.9 at 98 %).


def _ordering(results: dict[str, dict], run_dir: Path) -> None:
    kl = {m: r["kl_to_fp"] for m, r in results.items()}
    top1 = {m: r["quant_top1"] for m, r in results.items()}
    assert kl["aphq"] < KL_RATIO * kl["qdrop"] and kl["qdrop"] < KL_RATIO * kl["ptq"], kl
    n = results["aphq"]["n_eval"]
    for better, worse in (("aphq", "qdrop"), ("qdrop", "ptq")):
        tol = top1_tolerance(top1[better], top1[worse], n)
        assert top1[better] >= top1[worse] - tol, (better, worse, top1, tol)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    mr_top1 = [m["mr_fp_top1"] for m in metrics if "mr_fp_top1" in m]
    # MR keeps the FP accuracy: within 2 points (≈ 2.7 binomial SE at 97.75 % on 400 images; measured
    # 97.75 / 97.50 at W4A4 / W3A3, FP 97.75)
    assert mr_top1 and abs(mr_top1[-1] - results["aphq"]["fp_top1"]) <= 2.0


def test_aphq_beats_qdrop_beats_ptq_on_demo_short(tmp_path):
    """The trained demo model at W3A3 and W4A4, short iteration counts, seed 0, through `run.py`: KL(fp‖q)
    ordered aphq < qdrop < ptq with a margin, top-1 not lower beyond noise (see KL_RATIO). Six runs, two at a
    time (one thread each)."""
    jobs, dirs = [], {}
    for bits, steps in SHORT_ORDER_STEPS.items():
        for method in ("ptq", "qdrop", "aphq"):
            d = dirs[bits, method] = tmp_path / f"{bits}-{method}"
            steps_args = [] if method == "ptq" else [f"method.recon.iters={steps}", f"method.mlp_recon.iters={steps}"]
            jobs.append([f"method={method}", "model=demo", f"bits={bits}", "logger=jsonl", "num_threads=1",
                         *steps_args, f"hydra.run.dir={d}", f"stages.shared_dir={tmp_path / 'cache'}"])
    procs = run_py_many(jobs, workers=2)
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    for bits in SHORT_ORDER_STEPS:
        results = {m: json.loads((dirs[bits, m] / "results.json").read_text()) for m in ("ptq", "qdrop", "aphq")}
        _ordering(results, dirs[bits, "aphq"])


@pytest.mark.slow  # 6 demo runs with the demo preset (2000 steps; ~3.5 min each for qdrop / aphq on one core)
@pytest.mark.parametrize("bits", ["w4a4", "w3a3"])
def test_aphq_beats_qdrop_beats_ptq_on_demo(run_cfg, tmp_path, bits):
    short = ["model=demo", "logger=jsonl", "num_threads=1", f"bits={bits}"]
    res = {m: run(run_cfg([f"method={m}", *short], run_dir=tmp_path / m)) for m in ("ptq", "qdrop", "aphq")}
    _ordering(res, tmp_path / "aphq")


def test_method_configs_compose():
    for name, expect in {"aphq": ("qdrop", "hessian_perturb", True), "qdrop": ("qdrop", "mse", False),
                         "brecq": ("rinp", "mse", False), "brecq_qinp": ("qinp", "mse", False),
                         "aphq_no_avg": ("qdrop", "hessian_perturb", False),
                         "aphq_brecq_hessian": ("qdrop", "hessian_brecq", False)}.items():
        m = compose_cfg([f"method={name}", "model=deit_s", "bits=w3a3"]).method
        assert (m.recon.mode, m.recon.metric, m.mlp_recon.enabled) == expect, name
        assert m.recon.iters == 20000 and m.calib.n_images == 128 and m.recon.n_images == 1024
    for bits, pct, tw in (("w2a2", 0.98, True), ("w3a3", 0.99, False), ("w4a4", 0.98, False)):
        m = compose_cfg([f"experiment=aphq_{bits}", "model=deit_s"]).method
        assert (m.mlp_recon.pct, m.calib.token_wise) == (pct, tw)
    assert compose_cfg([]).method.recon.iters < 20000  # the demo default runs a short preset
