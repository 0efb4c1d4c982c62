"""The run report: scores with confidence intervals, ΔP against the full cache, plots, exports.

Input: result rows as dicts, one per (model, config, task_key, sample), as the store returns them.
`summarize` reduces them to one record per (model, task_key, config); `table` prints those for a
terminal; `write` adds a single-file HTML report with PNG plots and CSV/JSON exports; `main` does both.

One idea per module, each importing only those above it in this list:
- stats:   seeded bootstrap intervals and paired ΔP, in numpy alone (the statistics, and why, are documented there)
- summary: stored rows -> summary records (groups, best marks, plot series from method + settings), Pareto
- text:    a record's cells as text, shared by the table and the page
- table:   the terminal table
- plots:   the matplotlib figures
- html:    the single-file HTML page
- exports: results.csv, summary.csv, summary.json
- build:   `write` (all files of a report) and `main` (write, then print the table)
- load:    a run directory's rows, failures and bench.json, read back
"""

from kvbench.report.build import main, write
from kvbench.report.exports import FAILURE_FIELDS, ROW_FIELDS
from kvbench.report.load import load
from kvbench.report.plots import by_ratio as _by_ratio  # noqa: F401  (tests call report._by_ratio)
from kvbench.report.summary import REQUIRED, SUMMARY_FIELDS, pareto, summarize
from kvbench.report.table import table

__all__ = ["FAILURE_FIELDS", "REQUIRED", "ROW_FIELDS", "SUMMARY_FIELDS", "load", "main", "pareto", "summarize",
           "table", "write"]
