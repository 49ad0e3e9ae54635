"""Reading run dirs for every report table: the `results.json` files below some dirs, and row labels.

One reader for the classification, SR and detection tables, so they skip the same folders and warn on the
same unreadable files.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["PUBLISHED", "iter_results", "method_label"]

#: the published tables (ImageNet, SR, detection); the one asset every report reads
PUBLISHED = Path(__file__).resolve().parent / "assets" / "published.yaml"


def iter_results(dirs: Iterable[str | Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(path, parsed results.json) of every run below `dirs`, sorted by path per dir; report folders are
    skipped and an unreadable file is skipped with a warning."""
    for d in dirs:
        for p in sorted(Path(d).rglob("results.json")):
            if "report" in p.parent.parts[len(Path(d).parts):]:
                continue
            try:
                yield p, json.loads(p.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                print(f"warning: skipping {p}: {exc}", file=sys.stderr)


def method_label(r: dict[str, Any]) -> str:
    """Row label of a run: its method, plus the `method.*` overrides it ran with (`erq[coe=100]`)."""
    variant = [o for o in r.get("overrides") or [] if o.lstrip("+~").startswith("method.")]
    return r["method"] + (f"[{','.join(sorted(o.lstrip('+~').removeprefix('method.') for o in variant))}]"
                          if variant else "")
