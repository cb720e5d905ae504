"""Strict JSON: every result fpgrad writes goes through :func:`jsonable`.

Non-finite floats become the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (JSON has no such
numbers); numpy scalars and arrays, tuples, enums, fractions and dataclasses become plain
lists, numbers and strings.

>>> jsonable({"x": float("inf"), "y": (1, float("nan")), 2: np.float32(0.5)})
{'x': 'inf', 'y': [1, 'nan'], '2': 0.5}
>>> dumps([np.arange(2), -float("inf")])
'[[0, 1], "-inf"]'
"""

from __future__ import annotations

import dataclasses
import json
import math
from decimal import Decimal
from enum import Enum
from fractions import Fraction
from pathlib import PurePath
from typing import Any

import numpy as np


def _float(x: float) -> float | str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts (recursively)."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return _float(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [jsonable(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):  # numpy scalars: bool_, integer, floating
        return jsonable(obj.item())
    if isinstance(obj, Enum):
        return jsonable(obj.value)
    if isinstance(obj, (Fraction, Decimal)):
        return str(obj)  # exact
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "tolist"):  # torch tensors and other array types
        return jsonable(obj.tolist())
    return obj  # anything else is left for json.dumps to accept or reject


def json_numbers(a: np.ndarray) -> list[str]:
    """The JSON text of each element of ``a`` (bool, int or float, flattened) as :func:`dumps`
    writes it: ``repr`` of the Python number, non-finite floats as the strings "inf", "nan".
    Each distinct bit pattern is formatted once (gradient columns repeat many values).

    >>> json_numbers(np.array([0.1, -np.inf, 3.0, np.nan, -0.0, 0.0, 0.1]))
    ['0.1', '"-inf"', '3.0', '"nan"', '-0.0', '0.0', '0.1']
    """
    a = np.asarray(a).ravel()
    if a.dtype.kind == "b":
        return np.where(a, "true", "false").tolist()
    if a.dtype.kind == "f":
        a = a.astype(np.float64, copy=False)
        bits, inverse = np.unique(a.view(np.int64), return_inverse=True)
        values = bits.view(np.float64)
        text = list(map(repr, values.tolist()))
        for i in np.flatnonzero(~np.isfinite(values)).tolist():
            text[i] = json.dumps(_float(float(values[i])))
    elif a.dtype.kind in "iu":
        values, inverse = np.unique(a, return_inverse=True)
        text = list(map(repr, values.tolist()))
    else:
        raise TypeError(f"json_numbers: not a number array ({a.dtype})")
    return np.asarray(text, dtype=object)[inverse].tolist()


def json_strings(strings: list[str]) -> list[str]:
    r"""``json.dumps`` of each string: quoted as they are when no character needs escaping (the
    decimal strings fpgrad writes), else one ``json.dumps`` each.

    >>> json_strings(["1.5e-3", "|e| <= 2"]), json_strings(['a"b'])
    (['"1.5e-3"', '"|e| <= 2"'], ['"a\\"b"'])
    """
    joined = "".join(strings)
    if joined.isascii() and joined.isprintable() and '"' not in joined and "\\" not in joined:
        return [f'"{s}"' for s in strings]
    return list(map(json.dumps, strings))


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (``allow_nan=False``; keyword arguments go to json.dumps)."""
    return json.dumps(jsonable(obj), allow_nan=False, **kwargs)
