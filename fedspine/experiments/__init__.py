"""Experiments: run every variant (strategy or ablation) of one spec on the same fleet, data
partition and budget, over seeds, and turn the runs into tables and figures.

- ``spec``: the spec file, its validation and the plan of cells (``load_experiment``, ``plan``);
- ``runner``: each cell into its own run directory, resumable, with a reuse cache (``run_cells``);
- ``report``: tables, ``results.md`` and ``results.json`` (``rows``, ``write_results``);
- ``figures``: the PNG figures (matplotlib, imported only when drawing).

The scripts and spec files are in the repository's top-level ``experiments/`` folder
(``experiments/compare.py``, ``experiments/configs/``); that folder is not a package, so it
never shadows this one.
"""

from fedspine.experiments.figures import make_figures
from fedspine.experiments.report import Row, environment, format_table, rows, speedup, write_results
from fedspine.experiments.runner import CellResult, finished_runs, read_finished, run_cells
from fedspine.experiments.spec import FULL, Cell, Experiment, load_experiment, plan

__all__ = [
    "FULL",
    "Cell",
    "CellResult",
    "Experiment",
    "Row",
    "environment",
    "finished_runs",
    "format_table",
    "load_experiment",
    "make_figures",
    "plan",
    "read_finished",
    "rows",
    "run_cells",
    "speedup",
    "write_results",
]
