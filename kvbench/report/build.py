"""A run's whole report: the files written into its directory (`write`) and, for the command line, the terminal
table printed after them (`main`)."""

from __future__ import annotations

from pathlib import Path

from kvbench.report.exports import write_exports
from kvbench.report.html import page
from kvbench.report.plots import draw, fresh_folder
from kvbench.report.summary import summarize
from kvbench.report.table import table


def write(run_dir: str | Path, rows: list[dict], efficiency: list[dict] | None = None, n_boot: int = 2000,
          seed: int = 0, summary: list[dict] | None = None, failures: list[dict] | None = None) -> Path:
    """Write report.html, plots/*.png, results.csv, summary.csv and summary.json into `run_dir`; return the HTML.

    `summary` (from `summarize(rows, n_boot, seed, failures)`) may be passed to avoid computing it twice.
    """
    run_dir = Path(run_dir)
    summary = summarize(rows, n_boot, seed, failures) if summary is None else summary
    folder = fresh_folder(run_dir)
    write_exports(run_dir, rows, summary, efficiency, n_boot, seed, failures)
    items = draw(folder, summary, rows)
    path = run_dir / "report.html"
    path.write_text(page(run_dir, summary, items, efficiency, len(rows), failures), encoding="utf-8")
    return path


def main(run_dir: str | Path, rows: list[dict], efficiency: list[dict] | None = None,
         failures: list[dict] | None = None) -> Path:
    """What `kvbench report RUN_DIR` (and the end of `kvbench run`) does: write the files, print the table."""
    summary = summarize(rows, failures=failures)
    path = write(run_dir, rows, efficiency, summary=summary, failures=failures)
    print(table(summary, efficiency, failures))
    print(f"\nreport: {path}")
    return path
