"""``sweep()``: validate, run the cells missing from the log, write ``sweep.md/json/csv/png``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fpgrad.errors import InputError
from fpgrad.model.validate import MAX_EXACT_BITS
from fpgrad.sweeps.cells import OPTIONS, CellJob, Source
from fpgrad.sweeps.grid import TASKS, Grid, format_value
from fpgrad.sweeps.log import CELLS_FILE, LOG_SCHEMA, CellLog
from fpgrad.sweeps.result import SweepResult
from fpgrad.sweeps.runners import run_dask, run_inline, run_local

if TYPE_CHECKING:
    from fpgrad.model.network import Network


def _options(task: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The task's options with their defaults, validated."""
    known = OPTIONS[task]
    for name in options:
        if name not in known:
            other = next((t for t in TASKS if name in OPTIONS[t]), None)
            hint = (
                f"it is a {other} option"
                if other
                else f"options of {task}: {', '.join(known)}; lr and seed are grid axes"
            )
            raise InputError(f"sweep option {name} does not apply to --task {task}: {hint}")
    opts = {**known, **{k: v for k, v in options.items() if v is not None}}
    from fpgrad.reference.exact import DEFAULT_BITS, MIN_BITS

    if opts["exact_bits"] is None:
        opts["exact_bits"] = DEFAULT_BITS
    if opts["exact_bits"] < MIN_BITS:
        raise InputError(f"--exact-bits {opts['exact_bits']} is too low: use at least {MIN_BITS}")
    if opts["exact_bits"] > MAX_EXACT_BITS:
        raise InputError(
            f"--exact-bits {opts['exact_bits']} is too high: use at most {MAX_EXACT_BITS}"
        )
    if task == "compare":
        from fpgrad.diagnose.comparison import REFERENCES

        if opts["reference"] not in REFERENCES:
            raise InputError(f"unknown reference {opts['reference']!r}; use original or rounded")
    else:
        steps = opts["steps"]
        if steps is None:
            raise InputError("a train sweep needs --steps N")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be a positive integer (got {steps})")
        if opts["batch_size"] is not None and opts["batch_size"] < 1:
            raise InputError(f"batch size must be positive (got {opts['batch_size']})")
        from fpgrad.run.optim import OptimConfig

        OptimConfig(  # validates the optimizer's settings before any cell runs
            name=opts["optimizer"],
            momentum=opts["momentum"],
            weight_decay=opts["weight_decay"],
            decoupled=opts["decoupled"],
        )
    return opts


def _write_text(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        if isinstance(text, bytes):
            tmp.write_bytes(text)
        else:
            tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(
            f"cannot write {path}: {exc.strerror or exc}; free space or choose another --out "
            f"(the finished cells are kept in {path.parent / CELLS_FILE}; rerun to write it)"
        ) from None


class OutputLock:
    """An exclusive lock on an output directory (``DIR/.lock``, released when its holder
    exits, even killed): a second sweep into the same directory is refused."""

    def __init__(self, out: Path):
        import fcntl

        self.path = out / ".lock"
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(
                f"cannot write in {str(out)!r}: {exc.strerror}; choose another --out"
            ) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise InputError(
                f"another sweep is writing {str(out)!r} (it holds {self.path}); wait for it to "
                "finish or choose another --out"
            ) from None

    def release(self) -> None:
        os.close(self._fd)  # closing the descriptor releases the lock


def sweep(
    network: str | Path | Mapping[str, Any] | Network,
    task: str = "compare",
    grid: Mapping[str, Any] | None = None,
    out_dir: str | Path = "sweep",
    *,
    workers: int | None = None,
    scheduler: Any = None,
    progress: bool = False,
    restart: bool = False,
    max_cells: int | None = None,
    **options: Any,
) -> SweepResult:
    """Run ``task`` ("compare" or "train") on every cell of ``grid`` and write ``out_dir``.

    ``network``: a network file or model file path, a parsed TOML network document, or a
    :class:`Network` (the ``seed`` axis re-draws init schemes only for the first two).
    ``grid``: ``{axis: values}`` (see :meth:`Grid.parse`). ``workers``: local processes
    (default: one per cell up to the CPU count; 0: in this process). ``scheduler``: a Dask
    scheduler address (or a ``distributed.Client``) instead of local processes.
    ``max_cells``: run at most this many new cells (the rest stay pending for a later call).
    ``options``: the task's options (:data:`OPTIONS`), e.g. ``steps=10`` for training.
    Cells already in ``out_dir/cells.jsonl`` are not run again unless ``restart``.
    """
    if task not in TASKS:
        raise InputError(f"unknown sweep task {task!r}; use compare or train")
    opts = _options(task, options)
    from fpgrad.diagnose.api_args import check_int

    check_int(workers, "workers", "sweep", none=True)
    if not isinstance(out_dir, (str, os.PathLike)):
        raise InputError(
            f"sweep: out_dir must be a str or pathlib.Path (got {type(out_dir).__name__})"
        )
    if grid is not None and not isinstance(grid, Mapping):
        raise InputError(
            f"sweep: grid must be a dict of axis -> values (got {type(grid).__name__})"
        )
    if workers is not None and (isinstance(workers, bool) or workers < 0):
        raise InputError(f"--workers must be >= 0 (got {workers})")
    if workers is not None and scheduler is not None:
        raise InputError("give --workers or --scheduler, not both (a Dask cluster has its workers)")
    if max_cells is not None and max_cells < 0:
        raise InputError(f"--max-cells must be >= 0 (got {max_cells})")
    src = Source(network)
    g = Grid.parse(task, grid, src.network.policies)
    if src.script is not None:
        if task == "train":  # refused runs (policies) before any cell
            from fpgrad.graph.train import parse_graph_runs

            scales = [s for s in g.values.get("loss_scale", ()) if s != 1.0]
            runs = [f"{r}+scale={format_value(s)}" for r in g.values["precision"] for s in scales]
            parse_graph_runs([*g.values["precision"], *runs], src.network.policies)
        if "init_scale" in g.values:
            raise InputError(
                f"grid axis init_scale scales the dense layers of a TOML network; {src.where} is "
                "a captured model: scale its weights in build() (e.g. build(seed) or a new script)"
            )
    elif "seed" in g.values and task == "compare" and src.doc is None:
        raise InputError(
            "grid axis seed re-draws the init schemes of a TOML network file; "
            f"{src.where} has no init to re-draw"
        )
    out = Path(out_dir)
    if not str(out_dir).strip():
        raise InputError("--out is empty; name a directory")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is an existing file; name a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output directory {str(out)!r}: {exc.strerror}") from None
    lock = OutputLock(out)
    try:
        return _sweep_locked(
            src, task, g, opts, out, workers, scheduler, progress, restart, max_cells
        )
    finally:
        lock.release()


def _sweep_locked(
    src: Source,
    task: str,
    g: Grid,
    opts: dict[str, Any],
    out: Path,
    workers: int | None,
    scheduler: Any,
    progress: bool,
    restart: bool,
    max_cells: int | None,
) -> SweepResult:

    cells = g.cells()
    jobs: list[CellJob] = []
    for cell in cells:
        net, digest = src.at(cell.get("seed"))
        jobs.append(CellJob(task, cell.key, dict(cell.axes), net, digest, opts))

    from fpgrad.jsonutil import jsonable

    header = jsonable({"schema": LOG_SCHEMA, "task": task, "options": opts})
    log = CellLog(out / CELLS_FILE, header, restart)
    try:
        todo: list[CellJob] = []
        for job in jobs:
            old = log.records.get(job.key)
            if (
                old is None
                or old.get("status") not in ("ok", "input_error")
                or old.get("axes") != jsonable(job.axes)
            ):
                todo.append(job)
            elif old.get("network_hash") != job.network_hash:
                raise InputError(
                    f"{log.path}: cell {job.key} was computed from a different network (the "
                    "file or its data changed); use a new --out, or --restart to discard it"
                )
        reused = len(jobs) - len(todo)
        if max_cells is not None:
            todo = todo[:max_cells]
        bar = None
        if progress:
            import sys

            from tqdm import tqdm

            bar = tqdm(
                total=len(jobs), initial=reused, desc="fpgrad sweep", unit="cell", file=sys.stderr
            )

        def done(record: dict[str, Any]) -> None:
            log.append(record)
            if bar is not None:
                bar.set_postfix_str(record["key"], refresh=False)
                bar.update(1)

        try:
            if todo and scheduler is not None:
                run_dask(todo, scheduler, done)
            elif todo and workers == 0:
                run_inline(todo, done)
            elif todo:
                run_local(todo, min(len(todo), workers or os.cpu_count() or 1), done)
        finally:
            if bar is not None:
                bar.close()
        records = [
            log.records.get(c.key) or {"key": c.key, "axes": dict(c.axes), "status": "pending"}
            for c in cells
        ]
    finally:
        log.close()
    result = SweepResult(src.network.name, task, g, opts, records, out, len(todo), reused)
    result.notes = list(log.notes)
    _write_text(out / "sweep.md", result.render())
    _write_text(out / "sweep.json", result.to_json() + "\n")
    _write_text(out / "sweep.csv", result.to_csv())
    result.files = [str(out / n) for n in ("sweep.md", "sweep.json", "sweep.csv")]
    result.files.append(result.plot(out / "sweep.png"))
    return result
