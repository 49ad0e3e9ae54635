"""`python -m common.report` on a synthetic sweep dir: paper layout, published numbers and differences,
seed averaging, hyper-parameter variants, extra rows, CSVs and PNGs. (The report on a real sweep's output
is checked in tests/test_slurm.py, on the CI sweep run through SLURM.)"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from common.report import PUBLISHED, build_table, collect, load_published, main

REPO = Path(__file__).resolve().parents[1]


def _run(root: Path, name: str, model: str, method: str, bits: str, top1: float, seed: int = 0,
         extra: list[str] = (), curves: bool = False, mr: float | None = None) -> None:
    d = root / name
    d.mkdir(parents=True)
    w, a = int(bits[1]), int(bits[3])
    res = {"model": model, "method": method, "bits": bits, "w_bit": w, "a_bit": a, "fp_top1": 79.85,
           "quant_top1": top1, "dataset": "imagenet", "n_eval": 50000, "seed": seed, "timings": {"quantize": 1.0},
           "overrides": [f"model={model}", f"method={method}", f"bits={bits}", f"seed={seed}", "launcher=slurm",
                         "cluster.partition=gpu", *extra]}
    (d / "results.json").write_text(json.dumps(res))
    lines = [{"event": "start", "attempt": 0}]
    if mr is not None:
        lines.append({"event": "aphq_mlp_recon_summary", "mr_fp_top1": mr})
    if curves:
        lines += [{"curve": f"recon/blocks.{u}", "step": s, "loss": (u + 1) * math.exp(-s / 50)}
                  for u in range(3) for s in range(0, 100, 10)]
    lines.append({"event": "final", "quant_top1": top1})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"cut by a kil')


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    _run(root, "0", "deit_s", "aphq", "w4a4", 76.0, seed=0, curves=True, mr=79.0)
    _run(root, "1", "deit_s", "aphq", "w4a4", 77.0, seed=1, mr=79.0)
    _run(root, "2", "deit_s", "aphq", "w3a3", 68.0, mr=79.0)
    _run(root, "3", "vit_b", "erq", "w4a4", 78.0)
    _run(root, "4", "deit_s", "erq", "w4a4", 70.0, extra=["method.coe=1000"])
    _run(root, "5", "demo", "fp", "w4a4", 95.0)
    (root / "6").mkdir()  # a job that never finished: no results.json
    return root


def test_table_layout_and_published(sweep: Path) -> None:
    runs = collect([sweep])
    assert len(runs) == 6
    t = build_table(runs)
    assert list(t.sections) == ["fp", "w3a3", "w4a4"] and t.models == ["deit_s", "demo", "vit_b"]
    aphq = t.sections["w4a4"]["aphq"]["deit_s"]
    assert aphq.mean == pytest.approx(76.5) and aphq.std == pytest.approx(math.sqrt(0.5))
    assert aphq.published == 76.40 and aphq.diff == pytest.approx(0.10)  # aphq spec §9
    assert t.sections["w4a4"]["erq"]["vit_b"].published == 78.65  # erq spec §11.1
    assert t.sections["w4a4"]["erq[coe=1000]"]["deit_s"].published is None  # a variant is not the paper's config
    mr = t.sections["w3a3"]["aphq:mr_fp"]["deit_s"]
    assert mr.mean == 79.0 and mr.published == 79.38  # MLP Recon. column, bits-independent
    fp = t.sections["fp"]["fp"]
    assert fp["deit_s"].published == 79.85 and fp["demo"].mean == pytest.approx(79.85) and fp["demo"].published is None
    assert "fp" not in t.sections["w4a4"]  # method=fp runs only feed the FP row
    assert "– (76.40)" not in aphq.text() and aphq.text().startswith("76.50±0.71 (76.40, +0.10)")


def test_report_files(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    assert main([str(sweep), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## W4/A4 (w4a4)" in md and "| aphq | 76.50±0.71 (76.40, +0.10) |" in md
    assert "## Sources of the published numbers" in md and "`aphq`:" in md
    rows = list(csv.DictReader((out / "table.csv").open()))
    row = next(r for r in rows if r["bits"] == "w4a4" and r["method"] == "aphq")
    assert (row["deit_s"], row["deit_s_published"], row["deit_s_diff"]) == ("76.50", "76.40", "0.10")
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert len(runs) == 6 and {r["row"] for r in runs} >= {"aphq", "erq[coe=1000]", "fp"}
    for png in [out / "acc_vs_bits.png", out / "curves" / "deit_s-aphq-w4a4.png"]:
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    assert len(list((out / "curves").glob("*.png"))) == 1  # only the run that logged curves


def test_empty_dir_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path)]) == 1
    assert "no results.json" in capsys.readouterr().err


def test_published_file_is_consistent() -> None:
    data = yaml.safe_load(PUBLISHED.read_text())
    models = {p.stem for p in (REPO / "conf" / "model").glob("*.yaml")}
    bits = {p.stem for p in (REPO / "conf" / "bits").glob("*.yaml")} | {"fp"}
    for e in data["entries"]:
        assert e["source"] in data["sources"]
        assert e["bits"] in bits and set(e["top1"]) <= models, e
        assert all(0 <= v <= 100 for v in e["top1"].values())
    pub = load_published()
    assert pub[("erq", "w3a4", "vit_s")] == (60.13, "erq") and pub[("aphq", "w3a3", "swin_b")] == (78.14, "aphq")
