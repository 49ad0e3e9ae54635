"""The detection report: runs grouped by bits, models as columns in the papers' order, published pairs beside ours."""
from __future__ import annotations

import json

from common.report.detection import build_detection_table, collect_detection, load_published_detection
from common.report.tables import write_report


def _run(tmp, name, model, method, bits, seed, box, mask):
    d = tmp / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps({
        "task": "detection", "model": model, "method": method, "bits": bits, "seed": seed, "dataset": "coco",
        "fp_box_ap": 46.0, "fp_mask_ap": 41.5, "quant_box_ap": box, "quant_mask_ap": mask, "overrides": []}))


def test_detection_table_like_the_papers(tmp_path):
    _run(tmp_path, "a", "cascade_mask_rcnn_swin_t", "erq", "w4a4", 0, 47.0, 41.0)
    _run(tmp_path, "b", "mask_rcnn_swin_t", "erq", "w4a4", 0, 37.0, 36.0)
    _run(tmp_path, "c", "mask_rcnn_swin_t", "erq", "w4a4", 1, 39.0, 38.0)
    runs = collect_detection([tmp_path])
    assert len(runs) == 3
    pub = load_published_detection()
    assert pub[("aphq", "w4a4", "mask_rcnn_swin_s")][:2] == (44.1, 41.0)
    assert pub[("aphq", "w4a4", "cascade_mask_rcnn_swin_s")][:2] == (50.3, 43.7)
    t = build_detection_table(runs)["w4a4"]
    assert t["models"] == ["mask_rcnn_swin_t", "cascade_mask_rcnn_swin_t"]
    assert t["rows"]["erq"]["mask_rcnn_swin_t"]["ours"] == (38.0, 37.0)  # seeds averaged
    assert t["rows"]["fp"]["mask_rcnn_swin_t"]["pub"] == (46.0, 41.6)
    assert t["rows"]["repq"]["cascade_mask_rcnn_swin_t"]["pub"] == (47.0, 41.4) and \
        t["rows"]["repq"]["cascade_mask_rcnn_swin_t"]["ours"] is None
    rep = write_report([tmp_path], tmp_path / "out", plots=False)
    md = (tmp_path / "out" / "detection_report.md").read_text()
    assert "| erq | 38.0/37.0 (36.1/36.0) | 47.0/41.0 |" in md
    assert any(str(f).endswith("detection_table.csv") for f in rep["files"])
