"""Super-resolution report (task=sr runs), laid out like ERQ's SR table.

One table per (model, bits): rows = methods (FP and bicubic first), columns = test sets (Set5, Set14,
B100, Urban100, then any other), cells `PSNR/SSIM` of ours with the published `PSNR/SSIM` beside it
(`common/report/assets/published.yaml`, `sr_entries`). Runs that differ only by seed are averaged.
Written by `python -m common.report DIR` as `sr_report.md` and `sr_table.csv` whenever DIR holds SR runs.
"""
from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import yaml

from common.report.runs import PUBLISHED, iter_results, method_label

__all__ = ["collect_sr", "load_published_sr", "build_sr_table", "sr_markdown", "write_sr_report", "SET_ORDER"]

SET_ORDER = ("set5", "set14", "b100", "urban100")
_SET_TITLE = {"set5": "Set5", "set14": "Set14", "b100": "BSD100", "urban100": "Urban100"}
FP, BICUBIC = "fp", "bicubic"


def collect_sr(dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """results.json of every task=sr run below `dirs` (report folders skipped)."""
    return [{**r, "_dir": str(p.parent)} for p, r in iter_results(dirs) if r.get("task") == "sr" and "quant_psnr" in r]


def load_published_sr(path: Path = PUBLISHED) -> dict[tuple[str, str, str, str], tuple[float, float, str]]:
    """{(method, bits, model, set): (psnr, ssim, source)}; the first entry wins on duplicates."""
    data = yaml.safe_load(path.read_text()) or {}
    out: dict[tuple[str, str, str, str], tuple[float, float, str]] = {}
    for e in data.get("sr_entries") or []:
        for s, (p, q) in e["sets"].items():
            out.setdefault((e["method"], e["bits"], e["model"], s), (float(p), float(q), e["source"]))
    return out


def build_sr_table(runs: list[dict[str, Any]], published: dict | None = None) -> dict:
    """{(model, bits): {"sets": [...], "rows": {row: {set: {"ours": (psnr, ssim) | None, "pub": (..) | None}}}}}"""
    pub = load_published_sr() if published is None else published
    acc: dict[tuple[str, str], dict[str, dict[str, list[tuple[float, float]]]]] = \
        defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in runs:
        key = (r["model"], r["bits"])
        s = str(r["dataset"]).lower()
        acc[key][FP][s].append((r["fp_psnr"], r["fp_ssim"]))
        acc[key][BICUBIC][s].append((r["bicubic_psnr"], r["bicubic_ssim"]))
        if r["method"] != FP:
            acc[key][method_label(r)][s].append((r["quant_psnr"], r["quant_ssim"]))
    tables = {}
    for (model, bits), rows in sorted(acc.items()):
        sets = sorted({s for row in rows.values() for s in row},
                      key=lambda s: (SET_ORDER.index(s) if s in SET_ORDER else len(SET_ORDER), s))
        names = [FP, BICUBIC] + sorted(n for n in rows if n not in (FP, BICUBIC))
        names += sorted({m for (m, b, mo, _s) in pub if b == bits and mo == model} - set(names))
        out_rows = {}
        for name in names:
            cells = {}
            for s in sets:
                vals = rows.get(name, {}).get(s, [])
                ours = (statistics.fmean(v[0] for v in vals), statistics.fmean(v[1] for v in vals)) if vals else None
                p = pub.get((name, FP if name == FP else bits, model, s)) if "[" not in name else None
                cells[s] = {"ours": ours, "pub": p[:2] if p else None, "source": p[2] if p else None}
            out_rows[name] = cells
        tables[(model, bits)] = {"sets": sets, "rows": out_rows}
    return tables


def _pair(v: tuple[float, float] | None) -> str:
    return "–" if v is None else f"{v[0]:.2f}/{v[1]:.4f}"


def sr_markdown(tables: dict, n_runs: int, dirs: list[str]) -> str:
    lines = ["# Super-resolution report", "",
             f"{n_runs} runs from {', '.join(dirs)}. PSNR (dB) / SSIM on the Y channel (BT.601), `scale` px border "
             "cropped, 8-bit outputs; cells `ours (published)`. Published: ERQ's SR table (SwinIR-M, the official "
             "weights, full test sets); the demo model and any subset are not comparable to it.", ""]
    for (model, bits), t in tables.items():
        sets = t["sets"]
        lines += [f"## {model} — {bits}", "",
                  "| method | " + " | ".join(_SET_TITLE.get(s, s) for s in sets) + " |", "|---|" + "---|" * len(sets)]
        for row, cells in t["rows"].items():
            txt = []
            for s in sets:
                c = cells[s]
                txt.append(_pair(c["ours"]) + (f" ({_pair(c['pub'])})" if c["pub"] else ""))
            lines.append(f"| {row} | " + " | ".join(txt) + " |")
        lines.append("")
    return "\n".join(lines)


def write_sr_report(runs: list[dict[str, Any]], out: Path, dirs: list[str]) -> list[Path]:
    tables = build_sr_table(runs)
    md = out / "sr_report.md"
    md.write_text(sr_markdown(tables, len(runs), dirs))
    csv_path = out / "sr_table.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "bits", "method", "set", "psnr", "ssim", "psnr_published", "ssim_published"])
        for (model, bits), t in tables.items():
            for row, cells in t["rows"].items():
                for s, c in cells.items():
                    o, p = c["ours"], c["pub"]
                    ours = [f"{x:.4f}" for x in o] if o else ["", ""]
                    published = [f"{x:.4f}" for x in p] if p else ["", ""]
                    w.writerow([model, bits, row, s, *ours, *published])
    return [md, csv_path]
