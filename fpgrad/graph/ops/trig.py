"""Hyperbolic and inverse trigonometric functions: ``sinh``, ``cosh``, ``tan``, ``asin``,
``acos``, ``asinh``, ``acosh``, ``atanh``.

Each is one slot: the emulated machines' correctly rounded function
(:mod:`fpgrad.arith.emulated_trig`), Arb's in the exact systems (the fast balls have none:
:class:`~fpgrad.graph.ops.pointwise.MissingSlot` sends the run to Arb, as for sin and cos).
Outside a domain Arb's ball is NaN and nothing is certified there. Their backward ops are
torch's formulas in supported ops (``cosh`` for sinh, ``1 + tan^2``, ``rsqrt(1 - x^2)``,
``rsqrt(x^2 + 1)``, ``rsqrt(x - 1) rsqrt(x + 1)`` in torch's form, ``1 / (1 - x^2)``), whose
constants are the integers 1 and 2.
"""

from __future__ import annotations

from typing import Any

from fpgrad.graph.ops._util import _slot
from fpgrad.graph.ops.registry import op

NAMES = ("sinh", "cosh", "tan", "asin", "acos", "asinh", "acosh", "atanh")


def _register(name: str) -> None:
    def fn(cx: Any, x: Any) -> Any:
        return _slot(cx, name)(x)

    fn.__name__ = name
    op(f"aten.{name}.default")(fn)


for _name in NAMES:
    _register(_name)
