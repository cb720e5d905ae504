"""The command line of ``fpgrad sweep``: its options, and the grid and options they give."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fpgrad.sweeps.cells import DEFAULT_LR, OPTIONS
from fpgrad.sweeps.grid import AXES, TASKS
from fpgrad.sweeps.log import CELLS_FILE

if TYPE_CHECKING:
    import argparse

    from fpgrad.sweeps.result import SweepResult


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fpgrad sweep`` (each axis option takes comma-separated values and may
    be repeated)."""
    p.add_argument(
        "network", help="network file or model file (TOML), script.py:build or model.pt2"
    )
    p.add_argument("--task", default="compare", choices=TASKS, help="compare (default) or train")
    p.add_argument(
        "--out", required=True, help="output directory (cells.jsonl, sweep.md/json/csv/png)"
    )
    axis = p.add_argument_group("grid axes (comma-separated values; the cells are their product)")
    axis.add_argument(
        "--precisions",
        "--precision",
        dest="precision",
        action="append",
        metavar="P,...",
        help="precisions (compare) or runs (train: float16+master); default the four native ones",
    )
    axis.add_argument(
        "--seeds",
        "--seed",
        dest="seed",
        action="append",
        metavar="S,...",
        help="init seeds of a TOML network (train: also batch order); ranges: 0..3",
    )
    axis.add_argument(
        "--lr",
        action="append",
        metavar="LR,...",
        help=f"learning rates (train; default {DEFAULT_LR})",
    )
    axis.add_argument(
        "--loss-scales",
        "--loss-scale",
        dest="loss_scale",
        action="append",
        metavar="S,...",
        help="powers of two: 1,1024 or 2^0..2^16",
    )
    axis.add_argument(
        "--init-scales",
        "--init-scale",
        dest="init_scale",
        action="append",
        metavar="F,...",
        help="factors on every dense weight: 0.01,1",
    )
    run = p.add_argument_group("running")
    run.add_argument(
        "--workers", type=int, default=None, help="local processes (default: CPUs; 0: this process)"
    )
    run.add_argument("--scheduler", default=None, help="Dask scheduler address (tcp://host:8786)")
    run.add_argument(
        "--restart", action="store_true", help="discard the cells of an earlier run in --out"
    )
    run.add_argument("--max-cells", type=int, default=None, help="run at most N new cells now")
    run.add_argument("--json", action="store_true", help="print sweep.json instead of the table")
    task = p.add_argument_group("task options")
    task.add_argument(
        "--exact-bits", type=int, default=None, help="exact reference bits (compare 150, train 128)"
    )
    task.add_argument("--reference", default=None, help="compare: original (default) or rounded")
    task.add_argument(
        "--allow-uncertified",
        action="store_true",
        default=None,
        help="compare: accept fewer than 17 certified digits",
    )
    task.add_argument("--steps", type=int, default=None, help="train: optimizer steps (required)")
    task.add_argument("--optimizer", default=None, help="train: sgd (default) or adam")
    task.add_argument("--momentum", type=float, default=None, help="train: SGD momentum")
    task.add_argument("--weight-decay", type=float, default=None, help="train: weight decay")
    task.add_argument(
        "--decoupled", action="store_true", default=None, help="train: decoupled weight decay"
    )
    task.add_argument("--batch-size", type=int, default=None, help="train: mini-batch size")
    task.add_argument(
        "--verdict-every", type=int, default=None, help="train: steps between gradient verdicts"
    )


def grid_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The grid of ``fpgrad sweep``'s axis options (repeated options join)."""
    return {a: ",".join(getattr(args, a)) for a in AXES if getattr(args, a) is not None}


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    names = {n for t in TASKS for n in OPTIONS[t]}
    return {n: getattr(args, n) for n in sorted(names) if getattr(args, n) is not None}


def summary_line(result: SweepResult) -> str:
    """One line for stderr: what ran, what was reused, what failed or is pending."""
    pending = sum(r["status"] == "pending" for r in result.records)
    internal = [r for r in result.records if r["status"] == "internal_error"]
    refused = sum(r["status"] == "input_error" for r in result.records)
    parts = [f"{result.ran} cells run, {result.reused} from {CELLS_FILE}"]
    if refused:
        parts.append(f"{refused} refused (see the error column)")
    if pending:
        parts.append(f"{pending} pending: run the same command again to continue")
    line = f"wrote {', '.join(result.files)} ({'; '.join(parts)})"
    if internal:
        first = internal[0]
        line += (
            f"\nfpgrad: {len(internal)} cell(s) failed with internal errors, first "
            f"{first['key']}: {first['error']} (rerun to retry them)"
        )
    return line
