"""Paper-style report of a run or sweep dir: `python -m common.report DIR [DIR ...] [--out OUT]`.

Collects every `results.json` under the given dirs (with the `metrics.jsonl` next to it) and writes to OUT
(default `<first DIR>/report/`):

* `report.md`: one table per bit-width (rows: methods, columns: models), each cell `ours (published, Δ)`,
  plus an FP section; published numbers come from `common/report/assets/published.yaml` (sources listed at the end);
* `table.csv`: the same layout, with `<model>`, `<model>_published`, `<model>_diff` columns;
* `runs.csv`: one line per run (all numbers, the overrides, the run dir);
* `acc_vs_bits.png` (top-1 against bit-width per method, one panel per model) and `curves/*.png`
  (per-unit reconstruction-loss curves of every run that logged curves), see `common.report.plots`.

Rows are found, never listed: a row is a method name (`results.json:method`), plus `[key=value,...]` for
overrides that change the method (hyper-parameter sweeps such as `method.coe=...`), plus `method:extra` rows
for extra accuracies a method logs as `<extra>_top1` in a `metrics.jsonl` record (e.g. APHQ's
`mr_fp_top1` -> row `aphq:mr_fp`). Runs that differ only by seed are averaged (mean ± std).
Every run's `fp_top1` feeds the FP row; `method=fp` runs appear only there.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from common.report.runs import PUBLISHED, iter_results
from common.run.tracking import INFRA_OVERRIDE

__all__ = ["Run", "collect", "load_published", "build_table", "write_report", "main"]

FP = "fp"  # section / row name of full-precision results

# What a row label leaves out besides infrastructure (common.run.tracking.INFRA_OVERRIDE): the row/column keys.
_NOT_VARIANT = re.compile(r"^(model|bits|method|seed|dataset|experiment|tuned)$")


@dataclass
class Run:
    """One finished job: its results.json, the extras and curves of its metrics.jsonl."""

    path: Path
    results: dict[str, Any]
    extras: dict[str, float] = field(default_factory=dict)   # e.g. {"mr_fp": 79.4}
    curves: dict[str, list[tuple[int, dict[str, float]]]] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return str(self.results["model"])

    @property
    def method(self) -> str:
        return str(self.results["method"])

    @property
    def bits(self) -> str:
        return str(self.results["bits"])

    @property
    def variant(self) -> str:
        """Overrides that change the method, e.g. `coe=1000` for `method.coe=1000` (empty if none)."""
        parts = []
        for ov in self.results.get("overrides") or []:
            key, _, value = str(ov).lstrip("+~").partition("=")
            if _NOT_VARIANT.search(key) or INFRA_OVERRIDE.search(key):
                continue
            parts.append(f"{key.removeprefix('method.')}={value}")
        return ",".join(sorted(parts))

    @property
    def label(self) -> str:
        return f"{self.method}[{self.variant}]" if self.variant else self.method

    def bits_key(self) -> tuple[int, int]:
        return int(self.results.get("w_bit", 32)), int(self.results.get("a_bit", 32))


def _read_metrics(path: Path) -> tuple[dict[str, float], dict[str, list[tuple[int, dict[str, float]]]]]:
    """Extras (`<name>_top1` in non-final records, last value wins) and curves of a metrics.jsonl."""
    extras: dict[str, float] = {}
    curves: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    if not path.is_file():
        return extras, {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: skip it
            if "curve" in rec:
                vals = {k: float(v) for k, v in rec.items()
                        if k not in ("curve", "step", "time") and isinstance(v, (int, float))}
                curves[str(rec["curve"])][int(rec.get("step", 0))] = vals  # a resumed run overwrites its steps
            elif rec.get("event") != "final":
                for k, v in rec.items():
                    if k.endswith("_top1") and k not in ("fp_top1", "quant_top1") and isinstance(v, (int, float)):
                        extras[k[: -len("_top1")]] = float(v)
    return extras, {c: sorted(pts.items()) for c, pts in curves.items()}


def collect(dirs: Iterable[str | Path]) -> list[Run]:
    """Every `results.json` below `dirs` (report folders skipped), sorted by path."""
    runs = []
    for p, results in iter_results(dirs):
        if not all(k in results for k in ("model", "method", "bits", "quant_top1")):
            continue
        extras, curves = _read_metrics(p.parent / "metrics.jsonl")
        runs.append(Run(p.parent, results, extras, curves))
    return runs


def load_published(path: Path = PUBLISHED) -> dict[tuple[str, str, str], tuple[float, str]]:
    """{(method, bits, model): (top1, source)}; the first entry of the file wins on duplicates."""
    data = yaml.safe_load(path.read_text())
    out: dict[tuple[str, str, str], tuple[float, str]] = {}
    for e in data["entries"]:
        for model, v in e["top1"].items():
            out.setdefault((e["method"], e["bits"], model), (float(v), e["source"]))
    return out


def published_sources(path: Path = PUBLISHED) -> dict[str, str]:
    return dict(yaml.safe_load(path.read_text())["sources"])


@dataclass
class Cell:
    values: list[float]
    published: float | None = None
    source: str | None = None

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def diff(self) -> float | None:
        return None if self.mean is None or self.published is None else self.mean - self.published

    def text(self) -> str:
        if self.mean is None:
            return "–" if self.published is None else f"– ({self.published:.2f})"
        s = f"{self.mean:.2f}" + (f"±{self.std:.2f}" if self.std is not None and self.std >= 0.005 else "")
        if self.published is not None:
            s += f" ({self.published:.2f}, {self.diff:+.2f})"
        return s


@dataclass
class Table:
    """sections[bits][row][model] -> Cell; bits sections ordered FP first, then by (w+a, w)."""

    models: list[str]
    sections: dict[str, dict[str, dict[str, Cell]]]


def _published_for(pub: dict, row: str, bits: str, model: str) -> tuple[float, str] | tuple[None, None]:
    base = row.split("[")[0]
    if "[" in row:  # a hyper-parameter variant is not the published configuration
        return None, None
    return pub.get((base, bits, model)) or pub.get((base, FP, model)) or (None, None)


def build_table(runs: list[Run], published: dict | None = None, all_published: bool = False) -> Table:
    """Group runs into the paper layout. `all_published` adds published rows we did not run."""
    pub = load_published() if published is None else published
    values: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    order: dict[str, tuple[int, int]] = {}
    for r in runs:
        if r.results.get("fp_top1") is not None:
            values[FP][FP][r.model].append(float(r.results["fp_top1"]))
        if r.method == FP:
            continue
        order[r.bits] = r.bits_key()
        values[r.bits][r.label][r.model].append(float(r.results["quant_top1"]))
        for extra, v in r.extras.items():
            values[r.bits][f"{r.label}:{extra}"][r.model].append(v)
    models = sorted({r.model for r in runs})
    bits_order = [FP] * bool(values.get(FP)) + sorted(order, key=lambda b: (sum(order[b]), order[b][0], b))
    sections: dict[str, dict[str, dict[str, Cell]]] = {}
    for bits in bits_order:
        rows = dict(values[bits])
        if all_published:
            for (m, b, model) in pub:
                if b == bits and model in models:
                    rows.setdefault(m, {})
        sections[bits] = {}
        for row in sorted(rows, key=lambda x: (x != FP, x)):
            cells = {}
            for model in models:
                p, src = _published_for(pub, row, bits, model)
                cells[model] = Cell(list(rows[row].get(model, [])), p, src)
            sections[bits][row] = cells
    return Table(models, sections)


def _bits_title(bits: str) -> str:
    m = re.fullmatch(r"w(\d+)a(\d+)", bits)
    return f"W{m[1]}/A{m[2]} ({bits})" if m else ("Full precision" if bits == FP else bits)


def to_markdown(table: Table, runs: list[Run], dirs: list[str]) -> str:
    lines = ["# PTQ report", "",
             f"{len(runs)} runs from {', '.join(dirs)}. Top-1 (%) on each run's evaluation set; cells: "
             "`ours (published, ours − published)`; `±` = std over seeds. Published numbers are ImageNet-1k "
             "(full val set); a run on another dataset or subset is not directly comparable.", ""]
    datasets = sorted({f"{r.results.get('dataset')} (n_eval {r.results.get('n_eval')})" for r in runs})
    lines += [f"Evaluation: {', '.join(datasets)}.", ""]
    for bits, rows in table.sections.items():
        lines += [f"## {_bits_title(bits)}", "", "| method | " + " | ".join(table.models) + " |",
                  "|---|" + "---|" * len(table.models)]
        for row, cells in rows.items():
            lines.append(f"| {row} | " + " | ".join(cells[m].text() for m in table.models) + " |")
        lines.append("")
    srcs = published_sources()
    used = {c.source for rows in table.sections.values() for cells in rows.values() for c in cells.values() if c.source}
    if used:
        lines += ["## Sources of the published numbers", ""]
        lines += [f"- `{s}`: {srcs.get(s, '?')}" for s in sorted(used)]
        lines.append("")
    return "\n".join(lines)


def write_csvs(table: Table, runs: list[Run], out: Path) -> None:
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["bits", "method"] + [f"{m}{s}" for m in table.models for s in ("", "_published", "_diff")])
        for bits, rows in table.sections.items():
            for row, cells in rows.items():
                vals: list[Any] = []
                for m in table.models:
                    c = cells[m]
                    vals += [_fmt(c.mean), _fmt(c.published), _fmt(c.diff)]
                w.writerow([bits, row] + vals)
    keys = ["model", "method", "bits", "w_bit", "a_bit", "seed", "dataset", "n_calib", "n_eval", "fp_top1", "fp_top5",
            "quant_top1", "quant_top5", "top1_agreement", "kl_to_fp"]
    timing_keys = sorted({k for r in runs for k in (r.results.get("timings") or {})})
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row"] + keys + [f"time_{k}" for k in timing_keys] + ["extras", "overrides", "run_dir"])
        for r in runs:
            t = r.results.get("timings") or {}
            w.writerow([r.label] + [r.results.get(k, "") for k in keys] + [t.get(k, "") for k in timing_keys]
                       + [json.dumps(r.extras), " ".join(r.results.get("overrides") or []), str(r.path)])


def _fmt(v: float | None) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def write_report(dirs: list[str | Path], out: str | Path | None = None, plots: bool = True,
                 all_published: bool = False) -> dict[str, Any]:
    """Write report.md, table.csv, runs.csv and the plots; returns {'runs', 'table', 'files'}."""
    dirs = [str(d) for d in dirs]
    runs = collect(dirs)
    from common.report.sr import collect_sr, write_sr_report  # task=sr runs: their own table (sr_report.md)

    sr_runs = collect_sr(dirs)
    from common.report.detection import collect_detection, write_detection_report  # task=detection runs

    det_runs = collect_detection(dirs)
    if not runs and not sr_runs and not det_runs:
        from common.errors import UserError

        raise UserError(f"no results.json found under {', '.join(dirs)}: point the report at a run or sweep dir")
    out = Path(out) if out else Path(dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    if not runs:
        files = (write_sr_report(sr_runs, out, dirs) if sr_runs else []) + \
            (write_detection_report(det_runs, out, dirs) if det_runs else [])
        return {"runs": sr_runs + det_runs, "table": None, "files": files}
    table = build_table(runs, all_published=all_published)
    (out / "report.md").write_text(to_markdown(table, runs, dirs))
    write_csvs(table, runs, out)
    files = [out / "report.md", out / "table.csv", out / "runs.csv"]
    if plots:
        from common.report.plots import plot_acc_vs_bits, plot_curves

        files += plot_acc_vs_bits(table, out / "acc_vs_bits.png")
        files += plot_curves(runs, out / "curves")
    if sr_runs:
        files += write_sr_report(sr_runs, out, dirs)
    if det_runs:
        files += write_detection_report(det_runs, out, dirs)
    return {"runs": runs, "table": table, "files": files}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m common.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="run or sweep dirs (searched recursively for results.json)")
    ap.add_argument("--out", help="output folder (default: <first dir>/report)")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    ap.add_argument("--all-published", action="store_true",
                    help="also list published rows (other methods) for the models and bit-widths present")
    args = ap.parse_args(argv)
    from common.errors import UserError

    try:
        rep = write_report(args.dirs, args.out, plots=not args.no_plots, all_published=args.all_published)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print((Path(rep["files"][0])).read_text())
    print("\n".join(f"wrote {f}" for f in rep["files"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
