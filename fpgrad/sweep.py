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
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fpgrad.errors import InputError

if TYPE_CHECKING:
    import argparse

    from fpgrad.network import Network

AXES = ("seed", "precision", "lr", "loss_scale", "init_scale")
TASKS = ("compare", "train")
#: gradient verdicts, in the order of the table and the plot (fpgrad.verdicts.VERDICTS)
COUNTS = (
    "ok",
    "structural_zero",
    "rounding_zero",
    "subnormal",
    "overflow",
    "nan",
    "wrong_sign",
    "spurious_nonzero",
)
#: options of each task (``sweep(..., **options)``) and their defaults
OPTIONS: dict[str, dict[str, Any]] = {
    # exact_bits None: fpgrad.exact.DEFAULT_BITS
    "compare": {"exact_bits": None, "reference": "original", "allow_uncertified": False},
    "train": {
        "steps": None,
        "optimizer": "sgd",
        "momentum": 0.0,
        "weight_decay": 0.0,
        "decoupled": False,
        "batch_size": None,
        "exact_bits": 128,
        "verdict_every": None,
    },
}
DEFAULT_LR = 0.01  #: the learning rate of a training sweep without an lr axis
CELLS_FILE = "cells.jsonl"
_SCHEMA = "fpgrad.sweep/1"
_LOG_SCHEMA = "fpgrad.sweep.cells/1"
_POWER = re.compile(r"^([+-]?\d+(?:\.\d*)?)\s*(?:\^|\*\*)\s*([+-]?\d+)$")


# ---- the grid ----------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """A grid value as it appears in keys and tables: ``1024``, ``0.1``, ``1e-05``, ``float16``."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    return str(value)


@dataclass(frozen=True)
class Cell:
    """One point of a grid: ``axes`` holds (axis, value) pairs in :data:`AXES` order."""

    index: int
    axes: tuple[tuple[str, Any], ...]

    @property
    def key(self) -> str:
        """``seed=0,precision=float16,loss_scale=1024``: stable across runs and machines."""
        return ",".join(f"{a}={format_value(v)}" for a, v in self.axes)

    def get(self, axis: str, default: Any = None) -> Any:
        return dict(self.axes).get(axis, default)


@dataclass(frozen=True)
class Grid:
    """Axes with their values (canonical, in :data:`AXES` order); ``precision`` is always one."""

    task: str
    axes: tuple[tuple[str, tuple[Any, ...]], ...]

    @classmethod
    def parse(
        cls, task: str, grid: Mapping[str, Any] | None, policies: Mapping[str, Any] | None = None
    ) -> Grid:
        """Validate ``{axis: values}``; values are a list or a comma-separated string. Ranges:
        ``seed=0..3`` (inclusive), ``loss_scale=2^0..2^16`` (every power of two between).
        ``policies``: the network file's precision policies (valid precision names too)."""
        if task not in TASKS:
            raise InputError(f"unknown sweep task {task!r}; use compare or train")
        given: dict[str, Any] = {}
        for name, values in (grid or {}).items():
            axis = _axis_name(name)
            if axis in given:
                raise InputError(f"grid axis {axis} given twice; give its values once")
            given[axis] = values
        if "lr" in given and task == "compare":
            raise InputError("grid axis lr is for --task train; compare has no learning rate")
        if "precision" not in given:
            from fpgrad.precisions import DEFAULT_PRECISIONS

            given["precision"] = list(DEFAULT_PRECISIONS)
        axes: list[tuple[str, tuple[Any, ...]]] = []
        for axis in AXES:
            if axis not in given:
                continue
            values: list[Any] = []
            for item in _items(axis, given[axis]):
                for value in _parse_value(axis, item, task, policies):
                    if value in values:
                        raise InputError(
                            f"grid axis {axis}: value {format_value(value)} given twice"
                        )
                    values.append(value)
            axes.append((axis, tuple(values)))
        out = cls(task, tuple(axes))
        if task == "train" and "loss_scale" in out.values:
            from fpgrad.train import parse_run

            for run in out.values["precision"]:
                spec = parse_run(run, dict(policies or {}))
                if spec.loss_scale is not None or spec.dynamic:
                    raise InputError(
                        f"precision {run} already sets a loss scale; drop its +scale/+dynamic "
                        "policy or the loss_scale axis"
                    )
        return out

    @property
    def values(self) -> dict[str, tuple[Any, ...]]:
        return dict(self.axes)

    def cells(self) -> list[Cell]:
        """Every point of the product, the last axis varying fastest."""
        names = [a for a, _ in self.axes]
        return [
            Cell(i, tuple(zip(names, point, strict=True)))
            for i, point in enumerate(itertools.product(*(v for _, v in self.axes)))
        ]

    def varying(self) -> list[str]:
        """The axes with more than one value."""
        return [a for a, v in self.axes if len(v) > 1]

    def __len__(self) -> int:
        return math.prod(len(v) for _, v in self.axes)

    def describe(self) -> str:
        return " x ".join(f"{a} ({len(v)})" for a, v in self.axes)


def _axis_name(name: str) -> str:
    axis = str(name).strip().lower().replace("-", "_")
    if axis not in AXES and axis.endswith("s") and axis[:-1] in AXES:
        axis = axis[:-1]  # seeds, precisions, loss_scales, init_scales
    if axis not in AXES:
        raise InputError(f"unknown grid axis {name!r}; axes: {', '.join(AXES)}")
    return axis


def _items(axis: str, values: Any) -> list[Any]:
    if isinstance(values, str):
        items: list[Any] = [s.strip() for s in values.split(",")]
        if any(not s for s in items):
            raise InputError(
                f"grid axis {axis}: empty value in {values!r}; separate values by commas"
            )
    elif isinstance(values, Iterable):
        items = list(values)
    else:
        items = [values]
    if not items:
        raise InputError(f"grid axis {axis} has no values; give at least one")
    return items


def _number(axis: str, item: Any) -> float:
    if isinstance(item, bool) or not isinstance(item, (int, float, str)):
        raise InputError(f"grid axis {axis}: {item!r} is not a number")
    if isinstance(item, str):
        m = _POWER.match(item.strip())
        try:
            value = float(m.group(1)) ** int(m.group(2)) if m else float(item)
        except (ValueError, OverflowError):
            raise InputError(f"grid axis {axis}: {item!r} is not a number") from None
    else:
        value = float(item)
    if not math.isfinite(value):
        raise InputError(f"grid axis {axis}: {item!r} is not finite")
    return value


def _parse_value(
    axis: str, item: Any, task: str, policies: Mapping[str, Any] | None = None
) -> list[Any]:
    """One grid value (or a range) of ``axis`` in canonical form."""
    text = item.strip() if isinstance(item, str) else None
    if text is not None and ".." in text and axis in ("seed", "loss_scale"):
        lo, _, hi = text.partition("..")
        if axis == "seed":
            a, b = _parse_value(axis, lo, task)[0], _parse_value(axis, hi, task)[0]
            values: list[Any] = list(range(a, b + 1))
        else:
            a, b = (math.frexp(_parse_value(axis, s, task)[0])[1] - 1 for s in (lo, hi))
            values = [math.ldexp(1.0, k) for k in range(a, b + 1)]
        if not values:
            raise InputError(f"grid axis {axis}: empty range {text!r}; write LOW..HIGH")
        return values
    if axis == "seed":
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise InputError(f"grid axis seed: {item!r} is not a non-negative integer")
        try:
            seed = int(item)
        except ValueError:
            raise InputError(f"grid axis seed: {item!r} is not a non-negative integer") from None
        if seed < 0:
            raise InputError(f"grid axis seed: {item!r} is not a non-negative integer")
        return [seed]
    if axis == "precision":
        return [_canonical_precision(str(item), task, policies)]
    value = _number(axis, item)
    if axis == "lr" and not value > 0:
        raise InputError(f"grid axis lr: {item!r} must be positive")
    if axis == "loss_scale" and not (value > 0 and math.frexp(value)[0] == 0.5):
        raise InputError(
            f"grid axis loss_scale: {item!r} is not a power of two (other scales would round "
            "the gradients); write e.g. 1024 or 2^10"
        )
    if axis == "init_scale" and not value >= 0:
        raise InputError(f"grid axis init_scale: {item!r} must be >= 0")
    return [value]


def _canonical_precision(name: str, task: str, policies: Mapping[str, Any] | None) -> str:
    if name.strip().lower() == "exact":
        raise InputError("grid axis precision: exact is the reference of every cell; drop it")
    if task == "train":
        from fpgrad.train import parse_run

        return parse_run(name, dict(policies or {})).label
    from fpgrad.precisions import parse_precisions

    return parse_precisions([name], dict(policies or {}))[0].name


# ---- the network and the cells' jobs ------------------------------------------------------


class _Source:
    """The network of a sweep: a TOML network file or document (re-parsed per seed), a model
    file, or a :class:`Network`."""

    def __init__(self, network: str | Path | Mapping[str, Any] | Network):
        from fpgrad.netfile import parse_network
        from fpgrad.network import Network

        self.doc: dict[str, Any] | None = None
        self.base = Path(".")
        self.where = "network"
        if isinstance(network, Network):
            self.network = network
        elif isinstance(network, Mapping):
            self.doc = dict(network)
            self.network = parse_network(self.doc, base=self.base, source=self.where)
        else:
            from fpgrad.from_torch import is_model_doc, load_model_file, read_toml

            path = Path(network)
            doc = read_toml(path)
            if is_model_doc(doc):
                self.network = load_model_file(path).network
                self.where = str(path)
            else:
                self.doc, self.base, self.where = doc, path.parent, str(path)
                self.network = parse_network(doc, base=self.base, source=self.where)
        self._cache: dict[int | None, tuple[Network, str]] = {}

    def at(self, seed: int | None) -> tuple[Network, str]:
        """The network with its init schemes drawn from ``seed`` (None, or a source without a
        TOML document: as given), and its :func:`network_hash`."""
        from fpgrad.netfile import parse_network

        use = seed if self.doc is not None else None
        if use not in self._cache:
            net = self.network
            if self.doc is not None and use is not None:
                net = parse_network({**self.doc, "seed": use}, base=self.base, source=self.where)
            self._cache[use] = (net, network_hash(net))
        return self._cache[use]


def network_hash(net: Network) -> str:
    """A digest of everything a cell's result depends on in ``net`` (not its name)."""
    import numpy as np

    h = hashlib.sha256()

    def add(*parts: Any) -> None:
        for p in parts:
            h.update(repr(p).encode())
            h.update(b"\0")

    add(net.loss.kind, sorted((k, repr(v)) for k, v in net.policies.items()))
    for ly in net.layers:
        add(ly.name, ly.kind, ly.slope, ly.eps)
        for name, value in ly.params.items():
            arr = np.ascontiguousarray(value, dtype=np.float64)
            add(name, arr.shape)
            h.update(arr.tobytes())
    for arr in (net.x, net.y):
        a = np.ascontiguousarray(arr)
        add(a.dtype.str, a.shape)
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def scale_init(net: Network, factor: float) -> Network:
    """Every dense layer's weight times ``factor`` (float64, rounded once); the rest unchanged."""
    if factor == 1.0:
        return net
    return net.with_params(
        {
            f"{ly.name}.weight": ly.params["weight"] * factor
            for ly in net.layers
            if ly.kind == "dense"
        }
    )


@dataclass(frozen=True)
class CellJob:
    """What a worker needs to run one cell (picklable; the network travels with it)."""

    task: str
    key: str
    axes: dict[str, Any]
    network: Network
    network_hash: str
    options: dict[str, Any]


def run_cell(job: CellJob) -> dict[str, Any]:
    """Run one cell; a JSON-able record. Errors are recorded, never raised: ``status`` is
    ``ok``, ``input_error`` (the cell's input is refused) or ``internal_error`` (a bug)."""
    from fpgrad.jsonutil import jsonable

    record: dict[str, Any] = {"key": job.key, "axes": job.axes, "network_hash": job.network_hash}
    try:
        result = _run_compare(job) if job.task == "compare" else _run_train(job)
        record.update(status="ok", **result)
    except InputError as exc:
        record.update(status="input_error", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on and exits 1
        record.update(status="internal_error", error=f"{type(exc).__name__}: {exc}")
    return jsonable(record)


def _run_compare(job: CellJob) -> dict[str, Any]:
    from fpgrad.compare import compare

    opts, axes = job.options, job.axes
    net = scale_init(job.network, axes.get("init_scale", 1.0))
    precision = axes["precision"]
    c = compare(
        net,
        precisions=[precision],
        exact_bits=opts["exact_bits"],
        reference=opts["reference"],
        allow_uncertified=opts["allow_uncertified"],
        loss_scale=axes.get("loss_scale", 1.0),
    )
    first = c.attribution[precision]["first_rounding_zero_backward"]
    return {
        "counts": c.summary[precision],
        "loss": {k: c.loss[precision][k] for k in ("value", "verdict", "kind")},
        "first_rounding_zero": f"{first['layer']} {first['quantity']}" if first else None,
        "certified_digits": c.certified_digits,
        "exact_method": c.exact_method,
    }


def _run_train(job: CellJob) -> dict[str, Any]:
    from fpgrad.optim import OptimConfig
    from fpgrad.train import train

    opts, axes = job.options, job.axes
    net = scale_init(job.network, axes.get("init_scale", 1.0))
    run = axes["precision"]
    scale = axes.get("loss_scale", 1.0)
    if scale != 1.0:
        run += f"+scale={format_value(scale)}"
    cfg = OptimConfig(
        name=opts["optimizer"],
        lr=axes.get("lr", DEFAULT_LR),
        momentum=opts["momentum"],
        weight_decay=opts["weight_decay"],
        decoupled=opts["decoupled"],
    )
    r = train(
        net,
        steps=opts["steps"],
        cfg=cfg,
        runs=[run],
        batch_size=opts["batch_size"],
        seed=axes.get("seed", 0),
        exact_bits=opts["exact_bits"],
        verdict_every=opts["verdict_every"],
    )
    label = r.runs[0]
    h, det = r.histories[label], r.detectors[label]
    step = max(h.verdicts)
    counts = {v: h.verdicts[step].get(v, 0) for v in COUNTS}
    counts.update({k: n for k, n in h.verdicts[step].items() if k not in counts})
    overflow = det["first_overflow"]
    return {
        "counts": counts,
        "verdict_step": step,
        "loss": {"first": h.loss[0], "last": h.loss[-1], "exact_last": r.exact.loss[-1]},
        "distance": r.distance[label][-1],
        "swamped": det["swamped_fraction"]["total"],
        "skipped": sum(h.skipped),
        "nonfinite": any(h.nonfinite),
        "events": {
            "stall": det["stall"]["detected"],
            "loss_floor": det["loss_floor"]["detected"],
            "limit_cycle": det["limit_cycle"]["detected"],
            "chaotic": det["divergence"].get("twin", {}).get("verdict") == "chaotic",
            "first_overflow_step": overflow["step"] if overflow else None,
        },
        "certified_digits": r.exact_certified_digits,
    }


# ---- the cell log: DIR/cells.jsonl -------------------------------------------------------


class _CellLog:
    """A header line (task and options), then one JSON line per finished cell, appended and
    flushed to disk as each cell finishes; a truncated last line is dropped on reading."""

    def __init__(self, path: Path, header: dict[str, Any], restart: bool):
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if restart and path.exists():
            path.unlink()
        lines = self._read() if path.exists() else []
        if lines:
            self._check_header(lines[0], header)
            for rec in lines[1:]:
                self.records[str(rec.get("key"))] = rec  # the last line of a key wins
        try:
            self._file = path.open("a", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror}") from None
        if not lines:
            self._write(header)

    def _read(self) -> list[dict[str, Any]]:
        data = self.path.read_bytes()
        out: list[dict[str, Any]] = []
        good = 0  # bytes up to the end of the last complete line
        for number, line in enumerate(data.split(b"\n"), start=1):
            end = good + len(line) + 1
            if not line.strip():
                good = min(end, len(data))
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError
            except ValueError:
                if end >= len(data):  # a last line cut short by an interruption
                    break
                raise InputError(
                    f"{self.path}: line {number} is not a JSON object; the file is damaged: "
                    "use --restart (or a new --out)"
                ) from None
            out.append(obj)
            good = min(end, len(data))
        if good < len(data) or (data and not data.endswith(b"\n")):
            with self.path.open("r+b") as f:  # drop the partial line, end on a newline
                f.truncate(good)
                if good and not data[:good].endswith(b"\n"):
                    f.seek(good)
                    f.write(b"\n")
        return out

    def _check_header(self, found: dict[str, Any], header: dict[str, Any]) -> None:
        if found.get("schema") != _LOG_SCHEMA:
            raise InputError(
                f"{self.path} is not a fpgrad sweep's cell log; use a new --out or --restart"
            )
        if found.get("task") != header["task"]:
            diff = f"task {found.get('task')} (now {header['task']})"
        elif found.get("options") != header["options"]:
            old, new = found.get("options") or {}, header["options"]
            k = next(k for k in sorted({*old, *new}) if old.get(k) != new.get(k))
            diff = f"{k}={format_value(old.get(k))} (now {format_value(new.get(k))})"
        else:
            return
        raise InputError(
            f"{self.path} holds a sweep with {diff}; use a new --out, or --restart to discard it"
        )

    def _write(self, obj: dict[str, Any]) -> None:
        from fpgrad.jsonutil import dumps

        self._file.write(dumps(obj) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, record: dict[str, Any]) -> None:
        self._write(record)
        self.records[record["key"]] = record

    def close(self) -> None:
        self._file.close()


# ---- running the cells -------------------------------------------------------------------


def _worker_init() -> None:
    """Local workers leave Ctrl-C to the parent, which stops them."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _failure(job: CellJob, exc: BaseException) -> dict[str, Any]:
    return {
        "key": job.key,
        "axes": job.axes,
        "network_hash": job.network_hash,
        "status": "internal_error",
        "error": f"{type(exc).__name__}: {exc}",
    }


def _run_inline(jobs: list[CellJob], done: Callable[[dict[str, Any]], None]) -> None:
    for job in jobs:
        done(run_cell(job))


def _run_local(jobs: list[CellJob], workers: int, done: Callable[[dict[str, Any]], None]) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),  # torch and fork do not mix
        initializer=_worker_init,
    )
    try:
        futures = {pool.submit(run_cell, job): job for job in jobs}
        for fut in as_completed(futures):
            try:
                record = fut.result()
            except Exception as exc:  # noqa: BLE001 - e.g. a worker killed for memory
                record = _failure(futures[fut], exc)
            done(record)
    except BaseException:  # Ctrl-C: stop the running cells too (shutdown alone waits for them)
        running = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in running:
            proc.terminate()
        raise
    pool.shutdown()


def _run_dask(jobs: list[CellJob], scheduler: Any, done: Callable[[dict[str, Any]], None]) -> None:
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise InputError(
            "--scheduler needs Dask: pip install 'fpgrad[dask]' (dask[distributed])"
        ) from None
    own = isinstance(scheduler, str)
    if own:
        try:
            client = Client(scheduler, set_as_default=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot reach the Dask scheduler at {scheduler!r}: {exc}") from None
    else:
        client = scheduler  # a distributed.Client
    futures = {}
    try:
        futures = {client.submit(run_cell, job, pure=False): job for job in jobs}
        for fut in as_completed(list(futures), loop=client.loop):
            try:
                record = fut.result()
            except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker
                record = _failure(futures[fut], exc)
            done(record)
    finally:
        client.cancel([f for f in futures if not f.done()])
        if own:
            client.close()


# ---- the result --------------------------------------------------------------------------


@dataclass
class SweepResult:
    """Every cell of the grid in grid order (``records``; ``status`` "pending" for cells not
    run yet), with the files written."""

    network: str
    task: str
    grid: Grid
    options: dict[str, Any]
    records: list[dict[str, Any]]
    out_dir: Path
    ran: int = 0  #: cells computed by this call
    reused: int = 0  #: cells read from cells.jsonl
    files: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return all(r["status"] != "pending" for r in self.records)

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Cells whose run raised (``input_error`` or ``internal_error``)."""
        return [r for r in self.records if r["status"].endswith("_error")]

    @property
    def exit_code(self) -> int:
        """1 when a cell failed with an internal error, else 0."""
        return 1 if any(r["status"] == "internal_error" for r in self.records) else 0

    def record(self, key: str) -> dict[str, Any]:
        """The record of the cell ``key`` (e.g. ``precision=float16,loss_scale=1024``)."""
        for r in self.records:
            if r["key"] == key:
                return r
        raise KeyError(key)

    def counts(self, key: str) -> dict[str, int]:
        """Verdict counts of the gradients of one cell."""
        return self.record(key)["counts"]

    def to_dict(self) -> dict[str, Any]:
        from fpgrad.jsonutil import jsonable

        return jsonable(
            {
                "schema": _SCHEMA,
                "network": self.network,
                "task": self.task,
                "options": self.options,
                "axes": {a: list(v) for a, v in self.grid.axes},
                "complete": self.complete,
                "cells": self.records,
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def _columns(self) -> list[str]:
        """Count columns: the first six always, others when a cell has them."""
        seen = {k for r in self.records for k, n in r.get("counts", {}).items() if n}
        others = sorted(k for k in seen - set(COUNTS) if not k.startswith("rounding_zero_"))
        return [*COUNTS[:6], *(k for k in COUNTS[6:] if k in seen), *others]

    def rows(self) -> tuple[list[str], list[list[Any]]]:
        """Headers and one row per cell: axes, verdict counts, the task's headline values."""
        from fpgrad.render import fmt_value

        axes = [a for a, _ in self.grid.axes]
        counts = self._columns()
        extra = (
            ["loss", "loss verdict", "digits"]
            if self.task == "compare"
            else [
                "step",
                "loss[0]",
                "loss[end]",
                "exact loss[end]",
                "distance",
                "swamped",
                "events",
            ]
        )
        errors = any(r["status"] != "ok" for r in self.records)
        rows = []
        for r in self.records:
            row: list[Any] = [format_value(r["axes"][a]) for a in axes]
            if r["status"] != "ok":
                row += [""] * (len(counts) + len(extra))
                row.append(r.get("error") or r["status"])
                rows.append(row)
                continue
            row += [r["counts"].get(c, 0) for c in counts]
            if self.task == "compare":
                loss = r["loss"]
                row += [
                    fmt_value(_num(loss["value"])),
                    loss["verdict"] + (f" ({loss['kind']})" if loss["kind"] else ""),
                    f"{_num(r['certified_digits']):.1f}",
                ]
            else:
                ev = r["events"]
                events = [
                    k.replace("_", " ") for k in ("stall", "loss_floor", "limit_cycle") if ev[k]
                ]
                events += ["chaotic"] if ev["chaotic"] else []
                if ev["first_overflow_step"] is not None:
                    events.append(f"overflow at step {ev['first_overflow_step']}")
                if r["nonfinite"]:
                    events.append("inf/nan")
                if r["skipped"]:
                    events.append(f"{r['skipped']} skipped")
                row += [
                    r["verdict_step"],
                    fmt_value(_num(r["loss"]["first"])),
                    fmt_value(_num(r["loss"]["last"])),
                    fmt_value(_num(r["loss"]["exact_last"])),
                    fmt_value(_num(r["distance"])),
                    f"{100 * _num(r['swamped']):.1f}%",
                    ", ".join(events) or "-",
                ]
            if errors:
                row.append("")
            rows.append(row)
        heads = axes + counts + extra + (["error"] if errors else [])
        return heads, rows

    def render(self) -> str:
        """The Markdown of ``sweep.md``: a heading, the configuration and one table."""
        from tabulate import tabulate

        o = self.options
        if self.task == "compare":
            what = f"exact reference {o['exact_bits']} bits, reference {o['reference']}"
        else:
            what = (
                f"{o['steps']} steps, {o['optimizer']}"
                + ("" if "lr" in self.grid.values else f" lr={DEFAULT_LR}")
                + (f" momentum={o['momentum']}" if o["momentum"] else "")
                + (f" weight_decay={o['weight_decay']}" if o["weight_decay"] else "")
                + (" (decoupled)" if o["decoupled"] else "")
                + (f", batch {o['batch_size']}" if o["batch_size"] else ", full batch")
                + f"; exact run at {o['exact_bits']} bits. Verdicts: the gradients of the "
                "last checked step against the exact gradients at the run's own parameters"
            )
        done = sum(r["status"] != "pending" for r in self.records)
        lines = [
            f"# fpgrad sweep: {self.network} ({self.task})",
            "",
            f"{len(self.records)} cells ({self.grid.describe()}), {done} done; {what}.",
            "",
        ]
        heads, rows = self.rows()
        counts = set(self._columns())  # right-aligned; the rest is text as written
        text = [i for i, h in enumerate(heads) if h not in counts]
        lines.append(tabulate(rows, headers=heads, tablefmt="github", disable_numparse=text))
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        axes = [a for a, _ in self.grid.axes]
        counts = sorted(
            {k for r in self.records for k in r.get("counts", {})},
            key=lambda k: (COUNTS.index(k) if k in COUNTS else len(COUNTS), k),
        )
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["key", *axes, "status", *counts, "loss", "certified_digits", "error"])
        for r in self.records:
            loss = r.get("loss", {})
            w.writerow(
                [
                    r["key"],
                    *(format_value(r["axes"][a]) for a in axes),
                    r["status"],
                    *(r.get("counts", {}).get(c, "") for c in counts),
                    loss.get("value", loss.get("last", "")),
                    r.get("certified_digits", ""),
                    r.get("error", ""),
                ]
            )
        return buf.getvalue()

    def plot(self, path: str | Path) -> str:
        """``sweep.png``: one stacked bar of gradient verdict counts per cell."""
        return _plot(self, Path(path))


def _num(x: Any) -> float:
    return float(x)  # "inf"/"nan" strings of strict JSON too


_GROUPS = (  # (label, verdicts, colour) in stacking order
    ("ok", ("ok",), "#4daf4a"),
    ("structural_zero", ("structural_zero",), "#bdbdbd"),
    ("subnormal", ("subnormal",), "#ffbf00"),
    ("rounding_zero (underflow)", ("rounding_zero_underflow",), "#b2182b"),
    ("rounding_zero (lost)", ("rounding_zero_lost",), "#f4a582"),
    ("rounding_zero", ("rounding_zero",), "#d6604d"),
    ("overflow / nan", ("overflow", "nan"), "#7b3294"),
    ("wrong_sign / spurious_nonzero", ("wrong_sign", "spurious_nonzero"), "#252525"),
    ("no_reference", ("no_reference",), "#80cdc1"),
)


def _plot(result: SweepResult, path: Path) -> str:
    from matplotlib.ticker import MaxNLocator

    from fpgrad.report.plots import plt, save_png

    varying = result.grid.varying() or [a for a, _ in result.grid.axes]
    fixed = [a for a, _ in result.grid.axes if a not in varying]
    recs = result.records
    n = len(recs)
    row_h = 0.32 if n <= 60 else 0.18
    fig, ax = plt.subplots(figsize=(9, 1.8 + row_h * n))
    labels = []
    for r in recs:
        label = ", ".join(f"{a}={format_value(r['axes'][a])}" for a in varying)
        labels.append(label if r["status"] == "ok" else f"{label} ({r['status']})")
    left = [0.0] * n
    for name, verdicts, colour in _GROUPS:
        widths = []
        for r in recs:
            c = r.get("counts", {}) if r["status"] == "ok" else {}
            if name == "rounding_zero" and "rounding_zero_underflow" in c:
                widths.append(0.0)  # drawn by its two kinds
            elif name.startswith("rounding_zero (") and "rounding_zero_underflow" not in c:
                widths.append(0.0)
            else:
                widths.append(float(sum(c.get(v, 0) for v in verdicts)))
        if any(widths):
            ax.barh(range(n), widths, left=left, color=colour, label=name, height=0.75)
            left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(n), labels, fontsize=8 if n <= 60 else 6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(n - 0.5, -0.5)  # grid order from the top
    ax.set_xlabel(
        "gradient elements" + (" (last checked step of each run)" if result.task == "train" else "")
    )
    title = f"{result.network}: gradient verdicts per cell ({result.task})"
    if fixed:
        title += "\n" + ", ".join(f"{a}={format_value(result.grid.values[a][0])}" for a in fixed)
    ax.set_title(title, fontsize=10)
    if any(left):
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    save_png(fig, path)
    return str(path)


# ---- the sweep ---------------------------------------------------------------------------


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
    from fpgrad.exact import DEFAULT_BITS, MIN_BITS

    if opts["exact_bits"] is None:
        opts["exact_bits"] = DEFAULT_BITS
    if opts["exact_bits"] < MIN_BITS:
        raise InputError(f"--exact-bits {opts['exact_bits']} is too low: use at least {MIN_BITS}")
    if task == "compare":
        from fpgrad.compare import REFERENCES

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
        from fpgrad.optim import OptimConfig

        OptimConfig(  # validates the optimizer's settings before any cell runs
            name=opts["optimizer"],
            momentum=opts["momentum"],
            weight_decay=opts["weight_decay"],
            decoupled=opts["decoupled"],
        )
    return opts


def _write_text(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
    if workers is not None and (isinstance(workers, bool) or workers < 0):
        raise InputError(f"--workers must be >= 0 (got {workers})")
    if workers is not None and scheduler is not None:
        raise InputError("give --workers or --scheduler, not both (a Dask cluster has its workers)")
    if max_cells is not None and max_cells < 0:
        raise InputError(f"--max-cells must be >= 0 (got {max_cells})")
    src = _Source(network)
    g = Grid.parse(task, grid, src.network.policies)
    if "seed" in g.values and task == "compare" and src.doc is None:
        raise InputError(
            "grid axis seed re-draws the init schemes of a TOML network file; "
            f"{src.where} has no init to re-draw"
        )
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output directory {str(out)!r}: {exc.strerror}") from None

    cells = g.cells()
    jobs: list[CellJob] = []
    for cell in cells:
        net, digest = src.at(cell.get("seed"))
        jobs.append(CellJob(task, cell.key, dict(cell.axes), net, digest, opts))

    from fpgrad.jsonutil import jsonable

    header = jsonable({"schema": _LOG_SCHEMA, "task": task, "options": opts})
    log = _CellLog(out / CELLS_FILE, header, restart)
    try:
        todo: list[CellJob] = []
        for job in jobs:
            old = log.records.get(job.key)
            if old is None or old.get("status") not in ("ok", "input_error"):
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
                _run_dask(todo, scheduler, done)
            elif todo and workers == 0:
                _run_inline(todo, done)
            elif todo:
                _run_local(todo, min(len(todo), workers or os.cpu_count() or 1), done)
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
    _write_text(out / "sweep.md", result.render())
    _write_text(out / "sweep.json", result.to_json() + "\n")
    _write_text(out / "sweep.csv", result.to_csv())
    result.files = [str(out / n) for n in ("sweep.md", "sweep.json", "sweep.csv")]
    result.files.append(result.plot(out / "sweep.png"))
    return result


# ---- command line ------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fpgrad sweep`` (each axis option takes comma-separated values and may
    be repeated)."""
    p.add_argument("network", help="network file or model file (TOML)")
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
