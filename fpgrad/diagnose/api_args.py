"""The Python API's boundary: the arguments of :func:`fpgrad.compare`, :func:`fpgrad.train` and
:func:`fpgrad.advise` checked for their types before any work, so that a wrong one is an
:class:`~fpgrad.errors.InputError` naming the argument, never an AttributeError or TypeError
from deep inside. (Ranges are checked where each value is used, as the command line's are.)"""

from __future__ import annotations

import numbers
from typing import Any

from fpgrad.errors import InputError

#: the largest seed, steps or count the API takes (numpy's seeds take any size; 2^63 as a
#: network file's ``seed``)
_BIG = 2**63


def check_network(net: Any, fn: str) -> None:
    """A network file's :class:`~fpgrad.model.network.Network` or a captured model."""
    from fpgrad.graph.network import GraphNetwork
    from fpgrad.model.network import Network

    if not isinstance(net, (Network, GraphNetwork)):
        raise InputError(
            f"{fn}: net must be a network, not {type(net).__name__}: read a file with "
            "fpgrad.load_network(path) or capture a torch model with fpgrad.from_module(...)"
        )


def check_int(value: Any, name: str, fn: str, low: int | None = None, high: int = _BIG,
              none: bool = False) -> None:  # fmt: skip
    """An integer (not a bool), at least ``low`` (when given) and at most ``high`` (or None
    where ``none``); a lower bound the callee words better is left to it."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(
            f"{fn}: {name} must be an integer (got {type(value).__name__} {value!r:.40})"
        )
    if low is not None and int(value) < low:
        raise InputError(f"{fn}: {name} must be at least {low} (got {int(value)})")
    if int(value) > high:
        raise InputError(f"{fn}: {name} {int(value)} is too large: at most {high}")


def check_real(value: Any, name: str, fn: str) -> None:
    """A real number (its range is the callee's)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(
            f"{fn}: {name} must be a number (got {type(value).__name__} {value!r:.40})"
        )


def check_names(value: Any, name: str, fn: str) -> None:
    """None, a comma-separated string, or a list of strings."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return
    raise InputError(
        f"{fn}: {name} must be a comma-separated string or a list of strings "
        f"(got {type(value).__name__} {value!r:.40})"
    )


def check_exponents(value: Any, fn: str) -> None:
    """None or (lo, hi), two integers."""
    if value is None:
        return
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value)
    ):
        raise InputError(f"{fn}: exponents must be a pair of integers (lo, hi), e.g. (0, 24) "
                         f"(got {value!r:.40})")  # fmt: skip
