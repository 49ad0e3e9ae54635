"""Detection report (task=detection runs), laid out like the APHQ-ViT / RepQ-ViT COCO tables.

One table per bit-width: rows = methods (FP first), columns = models (Mask R-CNN Swin-T/S, Cascade Mask R-CNN
Swin-T/S, then any other, e.g. the demo), cells `AP^box / AP^mask` of ours with the published pair beside it
(`detection_entries` of common/report/assets/published.yaml). Runs differing only by seed are averaged.
Written by `python -m common.report DIR` as `detection_report.md` and `detection_table.csv` whenever DIR holds
detection runs.
"""
from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import yaml

from common.report.runs import PUBLISHED, iter_results, method_label

__all__ = ["collect_detection", "load_published_detection", "build_detection_table", "detection_markdown",
           "write_detection_report", "MODEL_ORDER"]

MODEL_ORDER = ("mask_rcnn_swin_t", "mask_rcnn_swin_s", "cascade_mask_rcnn_swin_t", "cascade_mask_rcnn_swin_s")
_TITLE = {"mask_rcnn_swin_t": "Mask R-CNN Swin-T", "mask_rcnn_swin_s": "Mask R-CNN Swin-S",
          "cascade_mask_rcnn_swin_t": "Cascade Mask R-CNN Swin-T", "cascade_mask_rcnn_swin_s": "Cascade Mask R-CNN Swin-S"}
FP = "fp"


def collect_detection(dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """results.json of every task=detection run below `dirs` (report folders skipped)."""
    return [{**r, "_dir": str(p.parent)} for p, r in iter_results(dirs)
            if r.get("task") == "detection" and "quant_box_ap" in r]


def load_published_detection(path: Path = PUBLISHED) -> dict[tuple[str, str, str], tuple[float, float, str]]:
    """{(method, bits, model): (box, mask, source)}; FP rows under bits `fp`; the first entry wins."""
    data = yaml.safe_load(path.read_text()) or {}
    out: dict[tuple[str, str, str], tuple[float, float, str]] = {}
    for e in data.get("detection_entries") or []:
        out.setdefault((e["method"], e["bits"], e["model"]), (float(e["box"]), float(e["mask"]), e["source"]))
    return out


def build_detection_table(runs: list[dict[str, Any]], published: dict | None = None) -> dict:
    """{bits: {"models": [...], "rows": {row: {model: {"ours": (box, mask) | None, "pub": (box, mask) | None,
    "n": runs}}}}}; the FP row of every bit-width is the runs' FP evaluation."""
    pub = load_published_detection() if published is None else published
    acc: dict[str, dict[str, dict[str, list[tuple[float, float]]]]] = \
        defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in runs:
        acc[r["bits"]][FP][r["model"]].append((r["fp_box_ap"], r["fp_mask_ap"]))
        if r["method"] != FP:
            acc[r["bits"]][method_label(r)][r["model"]].append((r["quant_box_ap"], r["quant_mask_ap"]))
    tables = {}
    for bits, rows in sorted(acc.items()):
        models = sorted({m for row in rows.values() for m in row},
                        key=lambda m: (MODEL_ORDER.index(m) if m in MODEL_ORDER else len(MODEL_ORDER), m))
        names = [FP] + sorted(n for n in rows if n != FP)
        names += sorted({me for (me, b, mo) in pub if b == bits and mo in models} - set(names))
        out_rows = {}
        for name in names:
            cells = {}
            for m in models:
                vals = rows.get(name, {}).get(m, [])
                ours = (statistics.fmean(v[0] for v in vals), statistics.fmean(v[1] for v in vals)) if vals else None
                p = pub.get((name, FP if name == FP else bits, m)) if "[" not in name else None
                cells[m] = {"ours": ours, "pub": p[:2] if p else None, "source": p[2] if p else None, "n": len(vals)}
            out_rows[name] = cells
        tables[bits] = {"models": models, "rows": out_rows}
    return tables


def _pair(v: tuple[float, float] | None) -> str:
    return "–" if v is None else f"{v[0]:.1f}/{v[1]:.1f}"


def detection_markdown(tables: dict, n_runs: int, dirs: list[str]) -> str:
    lines = ["# Detection report", "",
             f"{n_runs} runs from {', '.join(dirs)}. COCOeval AP^box / AP^mask (AP@[.5:.95], maxDets 100, x100); "
             "cells `ours (published)`. Published: STOD (FP), APHQ-ViT and RepQ-ViT READMEs on COCO val2017 with the "
             "STOD checkpoints; the demo detector and COCO subsets are not comparable to them.", ""]
    for bits, t in tables.items():
        models = t["models"]
        lines += [f"## {bits.upper()}", "", "| method | " + " | ".join(_TITLE.get(m, m) for m in models) + " |",
                  "|---|" + "---|" * len(models)]
        for row, cells in t["rows"].items():
            txt = [_pair(c["ours"]) + (f" ({_pair(c['pub'])})" if c["pub"] else "") for c in (cells[m] for m in models)]
            lines.append(f"| {row} | " + " | ".join(txt) + " |")
        lines.append("")
    return "\n".join(lines)


def write_detection_report(runs: list[dict[str, Any]], out: Path, dirs: list[str]) -> list[Path]:
    tables = build_detection_table(runs)
    md = out / "detection_report.md"
    md.write_text(detection_markdown(tables, len(runs), dirs))
    csv_path = out / "detection_table.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["bits", "method", "model", "box_ap", "mask_ap", "box_ap_published", "mask_ap_published", "runs"])
        for bits, t in tables.items():
            for row, cells in t["rows"].items():
                for m, c in cells.items():
                    o, p = c["ours"], c["pub"]
                    w.writerow([bits, row, m, *([f"{x:.2f}" for x in o] if o else ["", ""]),
                                *([f"{x:.1f}" for x in p] if p else ["", ""]), c["n"]])
    return [md, csv_path]
