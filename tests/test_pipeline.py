"""The pipeline end to end: the embedded demo (digits ViT) and a checkpoint round trip on a DeiT.

Demo runs are module-scoped fixtures (each is a real `common.run.pipeline.run`, a few seconds on CPU)
shared by the tests that read their outputs; every run writes under pytest's tmp dirs only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch

from common.run.pipeline import run
from conftest import DEMO_WEIGHTS, compose_cfg, last_line, perturbed_timm, point_at, read_jsonl, run_py, top1_tolerance

REQUIRED = ("model", "method", "bits", "dataset", "n_calib", "n_eval", "fp_top1", "fp_top5", "quant_top1",
            "quant_top5", "top1_agreement", "kl_to_fp", "timings", "seed")
NUMBERS = ("n_calib", "n_eval", "fp_top1", "fp_top5", "quant_top1", "quant_top5", "top1_agreement", "kl_to_fp")
DIGITS_TEST = 400  # size of the digits test split (common/data/digits.py)


def _events(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "stages" / "events.jsonl")


def _records(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def _numbers(r: dict) -> dict:
    return {k: r[k] for k in NUMBERS} | {"calib_ids": r["data"]["calib_ids"]}


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    """`run` applies `num_threads` process-wide; give the other test modules their default back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- demo runs


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    if not DEMO_WEIGHTS.is_file():
        pytest.fail(f"the demo weights {DEMO_WEIGHTS} are missing: build them with `python -m common.models.train_demo`")
    return tmp_path_factory.mktemp("demo")


def _demo(base: Path, name: str, *overrides: str) -> dict:
    # num_threads=1: on a shared 2-core machine torch's default intra-op threads make these small-tensor
    # searches ~10x slower (oversubscription); the numbers do not depend on it.
    cfg = point_at(compose_cfg(["model=demo", "num_threads=1", *overrides]), base / name, base / "stage_cache")
    return run(cfg)


@pytest.fixture(scope="module")
def w8a8(demo_dir) -> dict:
    """ptq W8A8, stage reuse off (the first of the determinism pair), run dir `w8a8`."""
    return _demo(demo_dir, "w8a8", "method=ptq", "bits=w8a8", "stages.reuse=false")


@pytest.fixture(scope="module")
def w8a8_fresh(demo_dir, w8a8) -> dict:
    """The same config and seed again, in a fresh run dir, stage reuse off."""
    return _demo(demo_dir, "w8a8_again", "method=ptq", "bits=w8a8", "stages.reuse=false")


@pytest.fixture(scope="module")
def w8a8_resumed(demo_dir, w8a8) -> dict:
    """A second run into the first run's dir with reuse on: stages are loaded, not recomputed."""
    return _demo(demo_dir, "w8a8", "method=ptq", "bits=w8a8", "stages.reuse=true")


@pytest.fixture(scope="module")
def w4a4(demo_dir) -> dict:
    return _demo(demo_dir, "w4a4", "method=ptq", "bits=w4a4")


@pytest.fixture(scope="module")
def fp(demo_dir) -> dict:
    return _demo(demo_dir, "fp", "method=fp", "bits=w8a8")


def test_demo_w8a8_results(w8a8, demo_dir) -> None:
    run_dir = demo_dir / "w8a8"
    on_disk = json.loads((run_dir / "results.json").read_text())
    for key in REQUIRED:
        assert key in on_disk, key
    assert (on_disk["model"], on_disk["method"], on_disk["bits"], on_disk["dataset"]) == ("demo", "ptq", "w8a8", "digits")
    assert (on_disk["w_bit"], on_disk["a_bit"], on_disk["seed"]) == (8, 8, 0)
    assert on_disk["n_calib"] == 32 and on_disk["n_eval"] == DIGITS_TEST
    assert {"load", "fp_eval", "quantize", "quant_eval"} <= set(on_disk["timings"])
    assert on_disk["fp_top1"] >= 90, "the bundled demo model should classify digits well"
    assert on_disk["top1_agreement"] >= 99, on_disk
    assert 0 <= on_disk["kl_to_fp"] < 0.01, on_disk
    assert _numbers(on_disk) == _numbers(w8a8)  # the returned dict is what was written
    assert len(on_disk["data"]["calib_ids"]) == 32
    final = [r for r in _records(run_dir) if r.get("event") == "final"]
    assert final and final[0]["quant_top1"] == on_disk["quant_top1"]
    assert [e["event"] for e in _events(run_dir)] == ["computed", "computed"]  # fp_eval, ptq_calibrate


def test_demo_w4a4_is_worse_than_w8a8(w4a4, w8a8) -> None:
    assert (w4a4["bits"], w4a4["w_bit"], w4a4["a_bit"]) == ("w4a4", 4, 4)
    assert w4a4["fp_top1"] == w8a8["fp_top1"]  # same FP model and eval set
    # ptq seeds 0 / 1 / 2: KL 0.0423 / 0.0517 / 0.0374 (W4A4) vs 0.00027 / 0.00025 / 0.00038 (W8A8), > 100x
    # apart, so a 10x margin; top-1 agreement 97.0 / 96.0 / 97.5 vs 99.5 / 100 / 99.0, compared only up to
    # 2 SE of the difference of two accuracies on the 400-image test split (conftest.top1_tolerance)
    assert w4a4["kl_to_fp"] > 10 * w8a8["kl_to_fp"], (w4a4["kl_to_fp"], w8a8["kl_to_fp"])
    tol = top1_tolerance(w4a4["top1_agreement"], w8a8["top1_agreement"], w8a8["n_eval"])
    assert w4a4["top1_agreement"] <= w8a8["top1_agreement"] + tol
    assert w4a4["quant_top1"] > 50, "W4A4 PTQ should stay far above chance (10%) on the demo"


def test_demo_fp_is_the_fp_model(fp, w8a8) -> None:
    assert fp["method"] == "fp" and fp["n_calib"] == 0
    assert fp["top1_agreement"] == 100.0 and fp["kl_to_fp"] == pytest.approx(0.0, abs=1e-12)
    assert (fp["quant_top1"], fp["quant_top5"]) == (fp["fp_top1"], fp["fp_top5"]) == (w8a8["fp_top1"], w8a8["fp_top5"])


def test_demo_deterministic(w8a8, w8a8_fresh, demo_dir) -> None:
    assert _numbers(w8a8_fresh) == _numbers(w8a8)
    assert [e["event"] for e in _events(demo_dir / "w8a8_again")] == ["computed", "computed"]  # really recomputed
    for stage in ("fp_eval", "ptq_calibrate"):
        (a,), (b,) = (sorted((demo_dir / d / "stages").glob(f"{stage}-*.pt")) for d in ("w8a8", "w8a8_again"))
        assert a.name == b.name  # same signature
        sa, sb = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
        flat_a = sa["state_dict"] if stage == "ptq_calibrate" else sa
        flat_b = sb["state_dict"] if stage == "ptq_calibrate" else sb
        for k, v in flat_a.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, flat_b[k]), (stage, k)


def test_demo_rerun_loads_stages(w8a8, w8a8_resumed, demo_dir) -> None:
    run_dir = demo_dir / "w8a8"
    events = _events(run_dir)
    assert [e["event"] for e in events] == ["computed", "computed", "loaded", "loaded"]
    assert {e["stage"] for e in events[2:]} == {"fp_eval", "ptq_calibrate"}
    assert _numbers(w8a8_resumed) == _numbers(w8a8)
    records = _records(run_dir)  # appended, not overwritten: one start and one final per attempt
    assert [r["attempt"] for r in records if r.get("event") == "start"] == [0, 1]
    assert len([r for r in records if r.get("event") == "final"]) == 2


def test_run_py_demo(demo_dir, w8a8) -> None:
    """The real command line: @hydra.main, the Hydra run dir, the printed table."""
    out = demo_dir / "cli"
    r = run_py(["model=demo", "method=ptq", "bits=w8a8", f"hydra.run.dir={out}",
                f"stages.shared_dir={demo_dir / 'cli_cache'}"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    assert results["run_dir"] == str(out)
    assert "bits=w8a8" in results["overrides"]
    assert _numbers(results) == _numbers(w8a8)  # same config and seed as the in-process run
    assert "demo | ptq | w8a8 | digits (calib 32, eval 400)" in r.stdout
    assert f"FP         {results['fp_top1']:7.2f}" in r.stdout
    assert f"quantized  {results['quant_top1']:7.2f}" in r.stdout
    assert last_line(r.stdout).startswith(f"top-1 agreement {results['top1_agreement']:.2f}%")


# --------------------------------------------------------------------------- DeiT checkpoint round trip


def test_deit_checkpoint_round_trip(run_cfg, tmp_path) -> None:
    """A depth-1 DeiT-Tiny saved to a file, run through the pipeline: same FP logits as the source."""
    from common.data import build_data
    from common.run.evaluate import predict

    source = perturbed_timm("deit_tiny_patch16_224", depth=1)
    ckpt = tmp_path / "deit_t_depth1.pth"
    torch.save({"model": source.state_dict()}, ckpt)  # the DeiT release layout

    cfg = run_cfg(["model=deit_t", "model.pretrained=false", "+model.kwargs.depth=1", f"model.checkpoint={ckpt}",
                   "dataset=imagenet_sample", "dataset.n_eval=20", "method=ptq", "bits=w4a4", "method.n_calib=8",
                   "num_threads=1"])
    r = run(cfg)
    assert (r["model"], r["method"], r["bits"], r["dataset"]) == ("deit_t", "ptq", "w4a4", "imagenet_sample")
    assert r["n_calib"] == 8 and r["n_eval"] == 20
    for key in ("fp_top1", "fp_top5", "quant_top1", "quant_top5", "top1_agreement", "kl_to_fp"):
        assert isinstance(r[key], float) and math.isfinite(r[key]), key
    assert 0 <= r["fp_top1"] <= 100 and r["kl_to_fp"] >= 0

    (stage,) = (Path(cfg.run_dir) / "stages").glob("fp_eval-*.pt")
    saved = torch.load(stage, weights_only=False)
    data = build_data(cfg.dataset, source, int(cfg.seed))
    logits, labels = predict(source, data.eval_loader())
    assert torch.equal(saved["labels"], labels)
    torch.testing.assert_close(saved["logits"], logits, rtol=0, atol=1e-5)


def test_replaced_checkpoint_is_not_served_from_the_stage_cache(tmp_path) -> None:
    """Weights replaced in place (same path, same size: e.g. a retrained demo) must not reuse old stages."""
    import common.models.demo  # noqa: F401  (registers vit_digits)
    from safetensors.torch import save_file

    ckpt, shared = tmp_path / "digits.safetensors", tmp_path / "shared"
    results = []
    for i, seed in enumerate((1, 2)):
        torch.manual_seed(seed)
        save_file(timm.create_model("vit_digits", pretrained=False).state_dict(), str(ckpt))
        cfg = point_at(compose_cfg(["model=demo", f"model.checkpoint={ckpt}", "method=fp", "num_threads=1"]),
                       tmp_path / f"run{i}", shared)
        results.append(run(cfg))
        assert [e["event"] for e in _events(tmp_path / f"run{i}")] == ["computed"]
    (a,), (b,) = ((tmp_path / f"run{i}" / "stages").glob("fp_eval-*.pt") for i in (0, 1))
    assert not torch.equal(torch.load(a, weights_only=False)["logits"], torch.load(b, weights_only=False)["logits"])
