"""Reports: paper-style tables of runs and sweeps (published numbers beside ours), CSVs and plots.

`python -m common.report DIR`. Reads run dirs only; may import `common.run` (the tracker's record
protocol) and the leaf helpers; the published tables live only in `assets/published.yaml` here.
"""
from common.report.tables import (FP, PUBLISHED, Cell, Run, Table, build_table, collect, load_published, main,
                                  published_sources, to_markdown, write_csvs, write_report)

__all__ = ["FP", "PUBLISHED", "Cell", "Run", "Table", "build_table", "collect", "load_published", "main",
           "published_sources", "to_markdown", "write_csvs", "write_report"]
