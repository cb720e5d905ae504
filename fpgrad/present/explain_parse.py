"""The numbers ``fpgrad explain`` takes, parsed exactly: decimals, hex floats, inf/nan and a
tiny expression grammar (``+ - * / **``, parentheses), all evaluated with fractions, with
size bounds on every intermediate (:func:`parse_value`).
"""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction

import numpy as np

from fpgrad.errors import InputError
from fpgrad.model.validate import check_expression

_MAX_POW_EXPONENT = 10_000  # |n| in a ** n
_MAX_BITS = 1_000_000  # size bound of any intermediate numerator or denominator
_HEX_FLOAT = re.compile(
    r"0[xX](?P<int>[0-9a-fA-F]*)(?:\.(?P<frac>[0-9a-fA-F]*))?[pP](?P<exp>[+-]?\d+)"
)
_SPECIAL = {"inf": math.inf, "infinity": math.inf, "nan": math.nan}

Value = Fraction | float  # an exact number, or a float for inf, nan and -0.0


def _parse_error(text: str, reason: str = "") -> InputError:
    why = f" ({reason})" if reason else ""
    return InputError(
        f"cannot parse value {text!r}{why}: write a number like 1e-8, 65520 or 1+2**-11"
    )


def _hex_fraction(m: re.Match[str]) -> Fraction:
    digits = m.group("int") + (m.group("frac") or "")
    if not digits:
        raise ValueError("empty hex float")
    shift = int(m.group("exp")) - 4 * len(m.group("frac") or "")
    return Fraction(int(digits, 16)) * Fraction(2) ** shift


def _check_size(v: Fraction) -> Fraction:
    if max(v.numerator.bit_length(), v.denominator.bit_length()) > _MAX_BITS:
        raise ValueError("number too large to handle exactly")
    return v


def parse_value(text: str | float | int | Fraction) -> Value:
    """The exact value of ``text``: a Fraction, or a float for inf, nan and -0.0.

    Accepts decimals (``1e-8``, ``0.1``), hex floats (``0x1.8p-3``), ``inf``/``nan`` and
    expressions of numbers with ``+ - * / **`` and parentheses (``1+2**-11``), evaluated exactly
    with fractions; ``**`` needs an integer exponent of at most 10000 in magnitude.

    >>> parse_value("1e-8"), parse_value("1+2**-11"), parse_value("0x1.8p-3")
    (Fraction(1, 100000000), Fraction(2049, 2048), Fraction(3, 16))
    """
    if isinstance(text, bool):
        raise _parse_error(str(text))
    if isinstance(text, (Fraction, int)):
        return Fraction(text)
    if isinstance(text, (float, np.floating)):
        x = float(text)
        return x if not math.isfinite(x) or (x == 0 and math.copysign(1, x) < 0) else Fraction(x)
    if not isinstance(text, str):
        raise _parse_error(repr(text))
    src = text.strip()
    check_expression(src, f"value {src[:40]!r}")  # bounded work before any number is built
    word = src.lower().lstrip("+")
    neg = word.startswith("-")
    if word.lstrip("-") in _SPECIAL:
        v = _SPECIAL[word.lstrip("-")]
        return -v if neg and not math.isnan(v) else v
    hexes: dict[str, Fraction] = {}

    def _hex(m: re.Match[str]) -> str:
        name = f"_hex{len(hexes)}"
        hexes[name] = _hex_fraction(m)
        return name

    try:
        body = _HEX_FLOAT.sub(_hex, src)
        tree = ast.parse(body, mode="eval")
        value = _check_size(_evaluate(tree.body, body, hexes))
    except InputError:
        raise
    except ZeroDivisionError:
        raise _parse_error(text, "division by zero") from None
    except (SyntaxError, ValueError, TypeError, OverflowError, RecursionError) as err:
        reason = str(err) if isinstance(err, ValueError) and str(err).startswith("number") else ""
        raise _parse_error(text, reason) from None
    if value == 0 and isinstance(tree.body, ast.UnaryOp) and isinstance(tree.body.op, ast.USub):
        return -0.0  # "-0": keep the sign of zero
    return value


def _evaluate(node: ast.AST, src: str, names: dict[str, Fraction]) -> Fraction:
    """Exact value of a node of the tiny grammar; anything else raises ValueError."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if isinstance(node.value, int):
            return Fraction(node.value)
        segment = ast.get_source_segment(src, node)  # the decimal as written, not its float
        if segment is None:
            raise ValueError("constant without source")
        return Fraction(segment.replace("_", ""))
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _evaluate(node.operand, src, names)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a = _evaluate(node.left, src, names)
        b = _evaluate(node.right, src, names)
        if isinstance(node.op, ast.Add):
            return _check_size(a + b)
        if isinstance(node.op, ast.Sub):
            return _check_size(a - b)
        if isinstance(node.op, ast.Mult):
            return _check_size(a * b)
        if isinstance(node.op, ast.Div):
            return _check_size(a / b)
        if isinstance(node.op, ast.Pow):
            if b.denominator != 1 or abs(b) > _MAX_POW_EXPONENT:
                raise ValueError("number exponent must be an integer of at most 10000")
            bits = max(a.numerator.bit_length(), a.denominator.bit_length())
            if bits * abs(int(b)) > _MAX_BITS:
                raise ValueError("number too large to handle exactly")
            return a ** int(b)
    raise ValueError("not a number")
