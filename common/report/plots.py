"""PNG plots for `common.report`: accuracy against bit-width per method, and per-unit loss curves.

Matplotlib runs headless (Agg). Both functions return the list of files written.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from common.report import Run, Table

__all__ = ["plot_acc_vs_bits", "plot_curves"]


def _bits_sort_key(bits: str) -> tuple[int, int, str]:
    m = re.fullmatch(r"w(\d+)a(\d+)", bits)
    return (int(m[1]) + int(m[2]), int(m[1]), bits) if m else (99, 99, bits)


def plot_acc_vs_bits(table: "Table", path: Path) -> list[Path]:
    """One panel per model: top-1 against bit-width, a line per method (row), filled = ours, hollow =
    published; the FP accuracy is a dashed line. Rows of extras (`method:extra`) are left out."""
    from common.report import FP

    bits = sorted((b for b in table.sections if b != FP), key=_bits_sort_key)
    if not bits:
        return []
    rows = sorted({r for b in bits for r in table.sections[b] if ":" not in r})
    n = len(table.models)
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(4.6 * ncol, 6.4), 3.6 * nrow + 0.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x = list(range(len(bits)))
    for ax, model in zip(axes.flat, table.models):
        for i, row in enumerate(rows):
            c = colors[i % len(colors)]
            ours = [table.sections[b].get(row, {}).get(model) for b in bits]
            ys = [cell.mean if cell is not None else None for cell in ours]
            pts = [(xi, y) for xi, y in zip(x, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", color=c, label=row)
            pub = [(xi, cell.published) for xi, cell in zip(x, ours) if cell is not None and cell.published is not None]
            if pub:
                ax.plot(*zip(*pub), "o--", color=c, mfc="none", alpha=0.7,
                        label=f"{row} (published)" if not pts else None)
        fp = table.sections.get(FP, {}).get(FP, {}).get(model)
        if fp is not None and fp.mean is not None:
            ax.axhline(fp.mean, color="k", ls=":", lw=1, label="FP")
        ax.set_title(model)
        ax.set_xticks(x, [b.upper() for b in bits])
        ax.set_xlabel("bit-width (weights/activations)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.suptitle("Top-1 vs bit-width (filled: ours, hollow dashed: published)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 + 0.02 * (len(labels) // 5), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_curves(runs: list["Run"], folder: Path, max_units_in_legend: int = 24) -> list[Path]:
    """One PNG per run that logged curves: a panel per (curve stage, value), one line per unit, log-scale
    loss against the iteration. Curves are named `<stage>/<unit>` (see `common.run.tracking`)."""
    written: list[Path] = []
    seen: set[str] = set()
    for run in runs:
        if not run.curves:
            continue
        label = run.label if len(run.label) <= 60 else f"{run.method}[{hashlib.sha1(run.variant.encode()).hexdigest()[:8]}]"
        name = re.sub(r"[^A-Za-z0-9_.=,-]+", "_", f"{run.model}-{label}-{run.bits}")
        if name in seen:  # another seed of the same configuration: keep the first
            continue
        seen.add(name)
        panels: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
        for curve, pts in run.curves.items():
            stage, _, unit = curve.partition("/")
            unit = unit or stage
            for step, vals in pts:
                for key, v in vals.items():
                    panels.setdefault((stage, key), {}).setdefault(unit, []).append((step, v))
        keys = sorted(panels)
        ncol = min(2, len(keys))
        nrow = math.ceil(len(keys) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(6.4 * ncol, 4.2 * nrow), squeeze=False)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        for ax, (stage, key) in zip(axes.flat, keys):
            units = panels[(stage, key)]
            cmap = plt.get_cmap("viridis", max(len(units), 2))
            for i, (unit, pts) in enumerate(units.items()):
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, color=cmap(i), lw=1.2, label=unit if len(units) <= max_units_in_legend else None)
            if all(v > 0 for pts in units.values() for _, v in pts):
                ax.set_yscale("log")
            ax.set_title(f"{stage}: {key} per unit")
            ax.set_xlabel("iteration")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3, which="both")
            if len(units) <= max_units_in_legend:
                ax.legend(fontsize=7, ncol=2 if len(units) > 8 else 1)
        fig.suptitle(f"{run.model} | {run.label} | {run.bits}", fontsize=10 if len(run.label) < 80 else 7)
        fig.tight_layout()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
