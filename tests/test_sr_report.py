"""The super-resolution report (common/report/sr.py): ERQ's layout, published numbers beside ours."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from common.report import main
from common.report.sr import PUBLISHED, SET_ORDER, build_sr_table, collect_sr, load_published_sr

REPO = Path(__file__).resolve().parents[1]


def _result(d: Path, method: str, dataset: str, q: float) -> None:
    d.mkdir(parents=True)
    r = {"task": "sr", "model": "swinir_x2", "method": method, "bits": "w4a4", "dataset": dataset, "scale": 2,
         "fp_psnr": 38.0, "fp_ssim": 0.96, "quant_psnr": q, "quant_ssim": 0.9, "bicubic_psnr": 33.7,
         "bicubic_ssim": 0.93, "overrides": [f"dataset.name={dataset}"]}
    (d / "results.json").write_text(json.dumps(r))


def test_published_sr_entries_are_consistent():
    data = yaml.safe_load(PUBLISHED.read_text())
    models = {p.stem for p in (REPO / "conf" / "model").glob("*.yaml")}
    for e in data["sr_entries"]:
        assert e["source"] in data["sr_sources"] and e["model"] in models and set(e["sets"]) <= set(SET_ORDER), e
        assert all(10 < p < 50 and 0 < s < 1 for p, s in e["sets"].values())
    pub = load_published_sr()
    assert pub[("erq", "w4a4", "swinir_x2", "set5")][:2] == (32.12, 0.9010)
    assert pub[("fp", "fp", "swinir_x4", "set5")][:2] == (32.72, 0.9021)


def test_sr_report_layout(tmp_path, capsys):
    _result(tmp_path / "a", "erq", "set5", 32.0)
    _result(tmp_path / "b", "erq", "urban100", 29.0)
    _result(tmp_path / "c", "repq", "set5", 30.0)
    runs = collect_sr([tmp_path])
    assert len(runs) == 3
    t = build_sr_table(runs)[("swinir_x2", "w4a4")]
    assert t["sets"] == ["set5", "urban100"]
    assert list(t["rows"])[:4] == ["fp", "bicubic", "erq", "repq"]
    assert t["rows"]["erq"]["set5"]["ours"] == (32.0, 0.9) and t["rows"]["erq"]["set5"]["pub"] == (32.12, 0.9010)
    assert t["rows"]["gptq"]["set5"]["ours"] is None  # a published row we did not run
    assert main([str(tmp_path), "--no-plots"]) == 0
    md = (tmp_path / "report" / "sr_report.md").read_text()
    assert "| erq | 32.00/0.9000 (32.12/0.9010) | 29.00/0.9000 (29.66/0.8479) |" in md
    assert (tmp_path / "report" / "sr_table.csv").is_file()
