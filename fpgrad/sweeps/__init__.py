"""Sweeps: one compare or training per point of a grid, with a table and a plot of verdict counts.

A grid has up to five axes (:data:`AXES`); each cell is one point of their Cartesian product,
run independently, in local processes or on a Dask cluster, with the same results either way:

- ``seed``: re-draws the init schemes of a TOML network file (its top-level ``seed``); for
  training also the seed of the mini-batch order and of stochastic rounding;
- ``precision``: a precision ``compare`` accepts, or a training run (``float16+master``);
- ``lr``: the learning rate (training only);
- ``loss_scale``: a power of two; compare backpropagates S * loss and judges the scaled
  gradients against S * exact, training appends ``+scale=S`` to the run;
- ``init_scale``: every dense layer's weight multiplied by the factor (one float64 rounding;
  exact for a power of two), biases and batch-norm parameters unchanged.

Every finished cell is appended to ``DIR/cells.jsonl`` (one JSON line, flushed to disk), after
a header line with the task and its options; a rerun skips the cells already there, so an
interrupted sweep resumes. The outputs ``sweep.md``, ``sweep.json``, ``sweep.csv`` and
``sweep.png`` list every cell of the grid in grid order.

Captured models (``script.py:build``, ``model.pt2``): precision, loss_scale, seed (called as
``build(seed=S)``) and lr; each worker builds the model again (:mod:`~fpgrad.sweeps.captured`).

Modules: :mod:`~fpgrad.sweeps.grid` (axes, values, cells), :mod:`~fpgrad.sweeps.cells` (the
network and one cell's run), :mod:`~fpgrad.sweeps.captured` (captured models), :mod:`~fpgrad.sweeps.log` (``cells.jsonl``),
:mod:`~fpgrad.sweeps.runners` (inline, local processes, Dask), :mod:`~fpgrad.sweeps.result`
(tables, JSON, CSV, plot), :mod:`~fpgrad.sweeps.run` (:func:`sweep`), :mod:`~fpgrad.sweeps.cli`.
"""

from fpgrad.sweeps.cells import (
    COUNTS,
    DEFAULT_LR,
    OPTIONS,
    CellJob,
    network_hash,
    run_cell,
    scale_init,
)
from fpgrad.sweeps.cli import add_arguments, grid_from_args, options_from_args, summary_line
from fpgrad.sweeps.grid import AXES, TASKS, Cell, Grid, format_value
from fpgrad.sweeps.log import CELLS_FILE
from fpgrad.sweeps.result import SweepResult
from fpgrad.sweeps.run import sweep

__all__ = [
    "AXES",
    "CELLS_FILE",
    "COUNTS",
    "DEFAULT_LR",
    "OPTIONS",
    "TASKS",
    "Cell",
    "CellJob",
    "Grid",
    "SweepResult",
    "add_arguments",
    "format_value",
    "grid_from_args",
    "network_hash",
    "options_from_args",
    "run_cell",
    "scale_init",
    "summary_line",
    "sweep",
]
