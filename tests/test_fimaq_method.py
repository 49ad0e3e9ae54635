"""`method=fimaq` / `fimaq_brecq` through the real pipeline on the demo model (short counts).

* `python run.py method=fimaq` end to end: two stages computed, the realised rank and every snapshot's
  weight summary in metrics.jsonl, DPLR term curves, a sane quantized model; a rerun loads the stage;
* a crash after two units resumes at unit 2 with the numbers of an uninterrupted run;
* configs compose (token-wise scales at every bit-width, no MR, the baseline's MSE on FP inputs), and
  `fisher_lr` beyond rank 1 is a one-line error before any compute.
"""
from __future__ import annotations

import json
import math

import pytest

from common.run.pipeline import run

from conftest import compose_cfg, last_line, point_at, read_jsonl, run_py

FAST = ["model=demo", "logger=jsonl", "num_threads=1", "method.calib.n_images=16", "method.recon.n_images=64",
        "method.recon.iters=20", "method.recon.log_every=5"]
RANDOM = ["model.checkpoint=null", "model.pretrained=false"]
KEYS = ("quant_top1", "kl_to_fp", "top1_agreement")


def _events(run_dir):
    return [(e["stage"], e["event"]) for e in read_jsonl(run_dir / "stages" / "events.jsonl", missing_ok=True)
            if e["stage"].startswith("fimaq_")]


def test_run_py_fimaq_end_to_end(tmp_path):
    d = tmp_path / "run"
    args = ["method=fimaq", "bits=w4a4", *FAST, f"hydra.run.dir={d}", f"stages.shared_dir={tmp_path / 'cache'}"]
    proc = run_py(args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((d / "results.json").read_text())
    assert res["method"] == "fimaq" and math.isfinite(res["kl_to_fp"]) and res["kl_to_fp"] < 1.0
    assert res["quant_top1"] > 50  # the trained demo model (FP 97.75) stays a classifier after W4A4
    assert _events(d) == [("fimaq_calibrate", "computed"), ("fimaq_reconstruct", "computed")]
    recs = read_jsonl(d / "metrics.jsonl")
    sched = [r for r in recs if r.get("event") == "fimaq_schedule"]
    assert sched and sched[0]["realised_rank"] == 5 and sched[0]["snapshot_steps"] == [0, 4, 8, 12, 16]
    units = ["patch_embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    for unit in units:
        snaps = [r for r in recs if r.get("event") == "fimaq_snapshot" and r["unit"] == unit]
        assert [r["rank"] for r in snaps] == [1, 2, 3, 4, 5], unit
        assert all(r["g_mean"] > 0 and r["delta_mean"] > 0 and r["pinv_fallback"] == 0 for r in snaps)
        curve = [r for r in recs if r.get("curve") == f"recon/{unit}"]
        assert curve[0]["rec"] == pytest.approx(2.0, rel=1e-6)  # p1 + p2, both terms renormalised at it = 0
        assert {"rec_lowrank", "rec_diag"} <= set(curve[0])
    assert [r["realised_rank"] for r in recs if r.get("event") == "fimaq_unit_rank"] == [5] * len(units)
    assert not any(r.get("event") == "fimaq_snapshot" and r["unit"] == "head" for r in recs)
    head = [r for r in recs if r.get("curve") == "recon/head"]
    assert head and all(r["rec"] == r["rec_raw"] for r in head)  # head KL unnormalised
    summary = [r for r in recs if r.get("event") == "fimaq_reconstruct_summary"][-1]
    assert summary["recon_realised_rank"] == 5 and summary["recon_snapshot_seconds"] > 0

    # the same config again: the reconstruction is loaded from the shared cache, calibration untouched
    d2 = tmp_path / "again"
    proc = run_py([*args[:-2], f"hydra.run.dir={d2}", f"stages.shared_dir={tmp_path / 'cache'}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _events(d2) == [("fimaq_reconstruct", "loaded")]
    res2 = json.loads((d2 / "results.json").read_text())
    assert all(res2[k] == res[k] for k in KEYS)


def test_reconstruction_resumes_after_a_crash(run_cfg, tmp_path, monkeypatch):
    import fimaq.method as M

    base = ["method=fimaq", *FAST, *RANDOM, "method.recon.iters=10"]
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
    assert list((tmp_path / "stage_cache").glob("fimaq_reconstruct-*.partial.pt"))
    monkeypatch.setattr(M, "reconstruct_model", real)
    resumed = run(run_cfg(base, run_dir=tmp_path / "resumed"))
    metrics = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [m["next_unit"] for m in metrics if m.get("event") == "fimaq_reconstruct_resumed"] == [2]
    assert not list((tmp_path / "stage_cache").glob("fimaq_reconstruct-*.partial.pt"))
    fresh = run(point_at(compose_cfg(base), tmp_path / "fresh", tmp_path / "other_cache"))
    assert all(resumed[k] == fresh[k] for k in KEYS), ({k: resumed[k] for k in KEYS}, {k: fresh[k] for k in KEYS})


def test_fimaq_brecq_baseline_runs(run_cfg, tmp_path):
    r = run(run_cfg(["method=fimaq_brecq", *FAST, *RANDOM, "method.recon.iters=5"], run_dir=tmp_path / "b"))
    assert r["method"] == "fimaq_brecq" and math.isfinite(r["kl_to_fp"])
    recs = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert not any(m.get("event") == "fimaq_snapshot" for m in recs)
    first = [m for m in recs if m.get("curve") == "recon/blocks.0"][0]
    assert first["rec"] == pytest.approx(1.0, rel=1e-6)  # the baseline's MSE is normalised to 1


def test_configs_compose():
    for bits in ("w3a3", "w4a4", "w6a6"):
        m = compose_cfg(["method=fimaq", "model=deit_s", f"bits={bits}"]).method
        assert m.calib.token_wise is True and "mlp_recon" not in m
        assert (m.recon.metric, m.recon.k, m.recon.p1, m.recon.p2, m.recon.dis_mode) == ("fisher_dplr", 5, 1.0, 1.0, "q")
        assert (m.recon.mode, m.recon.drop_prob, m.recon.iters, m.recon.n_images, m.calib.n_images) == \
            ("qdrop", 0.5, 20000, 1024, 128)
        assert m.recon.head_norm is None and m.recon.exact_rank is False and m.recon.lr_rank1_only is True
        b = compose_cfg(["method=fimaq_brecq", "model=deit_s", f"bits={bits}"]).method
        assert (b.calib.token_wise, b.recon.metric, b.recon.mode) == (False, "mse", "rinp")
    assert compose_cfg(["method=fimaq"]).method.recon.iters == 2000  # the demo preset (tuned/fimaq_demo.yaml)


def test_fisher_lr_beyond_rank_1_is_a_one_line_error(tmp_path):
    proc = run_py(["method=fimaq", *FAST, "method.recon.metric=fisher_lr", f"hydra.run.dir={tmp_path / 'r'}",
                   f"stages.shared_dir={tmp_path / 'cache'}"], timeout=300)
    assert proc.returncode != 0
    assert "fisher_lr works only at rank 1" in last_line(proc.stderr), proc.stderr[-2000:]
    assert not list((tmp_path / "r").glob("stages/fimaq_calibrate-*.pt"))  # failed before any compute


# Demo comparison with qdrop (docs/fimaq.md "Demo results"): W3A3 at 500 and W4A4 at 1000 steps per unit, seeds
# 0, 1, 2, the rest the demo preset; `python run.py method=M model=demo bits=B seed=S method.recon.iters=K`.
DEMO_STEPS = {"w3a3": 500, "w4a4": 1000}
DEMO_SEEDS = (0, 1, 2)


def _mean_kl(dirs: dict) -> dict:
    """{(bits, method): mean KL(fp‖q) over the seeds} from run dirs {(bits, method, seed): Path}."""
    out: dict = {}
    for (bits, method, _seed), d in dirs.items():
        out.setdefault((bits, method), []).append(json.loads((d / "results.json").read_text())["kl_to_fp"])
    return {k: sum(v) / len(v) for k, v in out.items()}


# Margins on the seed-mean KL, measured on this project's 2-core CPU (torch 2.14.1) with exactly these runs:
# seed-mean KL fimaq vs qdrop was 0.1171 vs 0.1340 at W3A3 (per seed −0.0033, −0.0497, +0.0024) and 0.0254 vs
# 0.0337 at W4A4 (per seed −0.0023, −0.0156, −0.0070). Single seeds do not order (W3A3 seed 2), so only the means
# are asserted, with half the measured gap as the margin.
DEMO_MARGIN = {"w3a3": 0.008, "w4a4": 0.004}


@pytest.mark.slow  # 12 demo runs (500 / 1000 steps per unit), ~1-5 min each on one core
def test_fimaq_beats_qdrop_in_mean_kl_on_demo(tmp_path):
    from conftest import run_py_many

    dirs = {(b, m, s): tmp_path / f"{b}-{m}-s{s}" for b in DEMO_STEPS for s in DEMO_SEEDS for m in ("fimaq", "qdrop")}
    jobs = [[f"method={m}", "model=demo", f"bits={b}", f"seed={s}", f"method.recon.iters={DEMO_STEPS[b]}",
             "logger=jsonl", f"hydra.run.dir={d}", f"stages.shared_dir={tmp_path / 'cache'}"]
            for (b, m, s), d in dirs.items()]
    for proc in run_py_many(jobs, workers=2, timeout=1800):
        assert proc.returncode == 0, proc.stderr[-3000:]
    kl = _mean_kl(dirs)
    for bits, margin in DEMO_MARGIN.items():
        assert kl[bits, "fimaq"] < kl[bits, "qdrop"] - margin, (bits, kl)
