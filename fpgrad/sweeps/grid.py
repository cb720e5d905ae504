"""The grid: axes and values (:class:`Grid`), its points (:class:`Cell`), :func:`format_value`."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fpgrad.errors import InputError

AXES = ("seed", "precision", "lr", "loss_scale", "init_scale")
TASKS = ("compare", "train")
_POWER = re.compile(r"^([+-]?\d+(?:\.\d*)?)\s*(?:\^|\*\*)\s*([+-]?\d+)$")


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
            from fpgrad.graph.precisions import DEFAULT_PRECISIONS

            given["precision"] = list(DEFAULT_PRECISIONS)
        axes: list[tuple[str, tuple[Any, ...]]] = []
        for axis in AXES:
            if axis not in given:
                continue
            values: list[Any] = []
            seen: set[Any] = set()
            for item in _items(axis, given[axis]):
                for value in _parse_value(axis, item, task, policies):
                    if value in seen:
                        raise InputError(
                            f"grid axis {axis}: value {format_value(value)} given twice"
                        )
                    seen.add(value)
                    values.append(value)
                if len(values) > MAX_AXIS_VALUES:
                    raise InputError(
                        f"grid axis {axis} has more than {MAX_AXIS_VALUES} values; give fewer"
                    )
            axes.append((axis, tuple(values)))
        out = cls(task, tuple(axes))
        if len(out) > MAX_CELLS:
            raise InputError(
                f"the grid has {len(out)} cells ({out.describe()}), above {MAX_CELLS}; "
                "give fewer values"
            )
        if task == "train" and "loss_scale" in out.values:
            from fpgrad.training import parse_run

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


MAX_AXIS_VALUES = 10_000  #: values of one axis (a range included)
MAX_CELLS = 100_000  #: cells of one grid


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
        if ".." in hi:
            raise InputError(
                f"grid axis {axis}: range {text[:40]!r} has more than one '..'; write LOW..HIGH"
            )
        if axis == "seed":
            a, b = _parse_value(axis, lo, task)[0], _parse_value(axis, hi, task)[0]
            if b - a >= MAX_AXIS_VALUES:
                raise InputError(
                    f"grid axis seed: range {text[:40]!r} has {b - a + 1} values, above "
                    f"{MAX_AXIS_VALUES}; give a shorter range"
                )
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
            if not 0 <= seed < 2**63:
                raise ValueError
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
        from fpgrad.training import parse_run

        return parse_run(name, dict(policies or {})).label
    from fpgrad.graph.precisions import parse_precisions

    return parse_precisions([name], dict(policies or {}))[0].name
