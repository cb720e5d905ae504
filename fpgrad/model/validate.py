"""The boundary: bounds on every input and checked readers of user files.

Everything a user hands fpgrad (network, model and data files, options) passes through these
helpers before any heavy work; each refusal is an :class:`~fpgrad.errors.InputError` whose one
line names the problem, where it is and the fix. No message quotes the content of a file.
"""

from __future__ import annotations

import math
import os
import stat
import sys
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from fpgrad.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: bytes of a network, model or data file (a larger one is refused before it is read)
MAX_FILE_BYTES = 512 * 2**20
#: numbers in one network: parameters plus data, all arrays together (and in one state dict).
#: The 784-2048-2048-10 MLP with a batch of 256 holds 6.02M; compare on it peaks at 1.9 GiB
#: RSS, about linear in the numbers, so a network at the bound stays near 2.5 GiB (docs/benchmarks.md)
MAX_ELEMENTS = 8 * 10**6
#: counts given as options (--batch-size, --max-rows, --max-cells)
MAX_OPTION_COUNT = 10**6
#: width of one layer (units) and features of the data
MAX_WIDTH = 10**6
#: layers of one network
MAX_LAYERS = 10_000
#: bits of an exact reference (``--exact-bits``)
MAX_EXACT_BITS = 4096
#: optimizer steps of ``train`` and of a train sweep
MAX_STEPS = 10**6
#: magnitude of a learning rate, momentum or weight decay
MAX_RATE = 1e6
#: seeds lie in [0, 2**32)
MAX_SEED = 2**32 - 1
#: characters of an ``explain`` value and of a policy or format name
MAX_EXPRESSION_CHARS = 10_000
#: decimal exponent of a literal in ``explain`` (10**100000 has 332,193 bits)
MAX_DECIMAL_EXPONENT = 100_000
#: binary exponent of a hex float (``0x1p-N``)
MAX_BINARY_EXPONENT = 400_000
#: digits of one integer or significand literal
MAX_LITERAL_DIGITS = 4000
#: nesting of parentheses in an ``explain`` value
MAX_NESTING = 100
#: local sweep workers
MAX_WORKERS = 256


# ---- files -----------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def regular_file_size(
    path: str | Path, what: str, cap: int = MAX_FILE_BYTES, where: str = ""
) -> int:
    """The size of ``path`` if it is a regular file (symlinks followed) of at most ``cap``
    bytes; otherwise a one-line refusal (prefixed by ``where``, the file that named it)."""
    at = f"{where}: " if where else ""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(f"{at}cannot read {what} {str(path)!r}: {exc.strerror}") from None
    except ValueError:  # embedded NUL
        raise InputError(f"{at}cannot read {what} {str(path)!r}: not a valid path") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{at}{what} {str(path)!r} is {_kind(st.st_mode)}; give a regular file")
    if st.st_size > cap:
        raise InputError(
            f"{at}{what} {str(path)!r} has {st.st_size} bytes, above the limit of {cap}; "
            "give a smaller file"
        )
    return st.st_size


def read_bytes(path: str | Path, what: str, cap: int = MAX_FILE_BYTES, where: str = "") -> bytes:
    """The bytes of a regular file of at most ``cap`` bytes. It is opened without blocking and
    checked again once open, so a pipe or device swapped in is refused, never read forever."""
    regular_file_size(path, what, cap, where)
    at = f"{where}: " if where else ""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InputError(f"{at}cannot read {what} {str(path)!r}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"{at}{what} {str(path)!r} is {_kind(mode)}; give a regular file")
        chunks, total = [], 0
        while total <= cap:
            chunk = os.read(fd, min(2**20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise InputError(f"{at}cannot read {what} {str(path)!r}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if total > cap:
        raise InputError(f"{at}{what} {str(path)!r} grew above {cap} bytes while read; give a file")
    return b"".join(chunks)


def read_text(path: str | Path, what: str, cap: int = MAX_FILE_BYTES, where: str = "") -> str:
    """A regular UTF-8 text file of at most ``cap`` bytes."""
    data = read_bytes(path, what, cap, where)
    at = f"{where}: " if where else ""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{at}{what} {str(path)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None


def _nesting(text: str) -> int:
    """The deepest nesting of brackets, braces and parentheses."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]})":
            depth -= 1
    return deepest


def load_toml(path: str | Path, what: str = "network file") -> dict[str, Any]:
    """A TOML document of a regular file, with one-line errors for every way it can be bad."""
    text = read_text(path, what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: malformed TOML: {exc}; fix the syntax there") from None
    except RecursionError:  # tomllib is pure Python: deep nesting ends here, safely
        raise InputError(
            f"{path}: arrays or tables nest too deep for the TOML parser; flatten them"
        ) from None
    except ValueError:  # an integer literal beyond Python's digit limit
        raise InputError(
            f"{path}: a number has too many digits (more than {sys.get_int_max_str_digits()}); "
            "write it as a float"
        ) from None


# ---- arrays (.npy, .csv) -------------------------------------------------------------------


def load_npy(path: Path, where: str, max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """A ``.npy`` array, never unpickled; its header is checked (dtype, shape, size against
    the file) before the data are read."""
    fmt = np.lib.format
    size = regular_file_size(path, "data file", where=where)
    data = read_bytes(path, "data file", where=where)
    import io

    f = io.BytesIO(data)
    name = str(path)
    if size == 0:
        raise InputError(f"{where}: data file {name!r} is empty; save it with numpy.save")
    if data[:2] == b"PK":
        raise InputError(
            f"{where}: data file {name!r} is a zip archive (.npz), not a .npy array; save one "
            "array with numpy.save"
        )
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError
    except Exception:  # noqa: BLE001 - numpy's header parser raises many kinds on bad bytes
        raise InputError(
            f"{where}: data file {name!r} is not a valid .npy file; save it with numpy.save"
        ) from None
    if dtype.hasobject or dtype.kind not in "fiub":
        raise InputError(
            f"{where}: data file {name!r} holds {dtype} values, not numbers; save a numeric array"
        )
    count = math.prod(int(n) for n in shape)
    if count > max_elements:
        raise InputError(
            f"{where}: data file {name!r} declares shape {list(shape)} ({count} numbers), above "
            f"the limit of {max_elements}; use less data"
        )
    if size - f.tell() != count * dtype.itemsize:
        raise InputError(
            f"{where}: data file {name!r} declares shape {list(shape)} of {dtype} but holds "
            f"{size - f.tell()} bytes of data, not {count * dtype.itemsize}; save it again"
        )
    f.seek(0)
    try:
        return np.load(f, allow_pickle=False)
    except (ValueError, OSError, EOFError):  # pragma: no cover - the checks above cover these
        raise InputError(
            f"{where}: data file {name!r} is not a valid .npy file; save it with numpy.save"
        ) from None


def load_csv(path: Path, where: str, max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """A comma-separated numeric array; errors name the line and column, never the content."""
    text = read_text(path, "data file", where=where)
    name = str(path)
    rows: list[list[float]] = []
    count = 0
    for number, line in enumerate(text.splitlines(), start=1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        row = []
        for col, cell in enumerate(body.split(","), start=1):
            try:
                row.append(float(cell))
            except ValueError:
                raise InputError(
                    f"{where}: data file {name!r}: line {number}, column {col} is not a "
                    "number; write comma-separated numbers"
                ) from None
        if rows and len(row) != len(rows[0]):
            raise InputError(
                f"{where}: data file {name!r}: line {number} has {len(row)} columns, the first "
                f"row {len(rows[0])}; give every row the same length"
            )
        count += len(row)
        if count > max_elements:
            raise InputError(
                f"{where}: data file {name!r} holds more than {max_elements} numbers; use less data"
            )
        rows.append(row)
    if not rows:
        raise InputError(f"{where}: data file {name!r} holds no numbers")
    arr = np.array(rows, dtype=np.float64)
    return arr[:, 0] if arr.shape[1] == 1 else arr


# ---- numbers and options --------------------------------------------------------------------


def check_name(value: Any, what: str) -> str:
    """A name shown in tables and reports: a string of 1 to 200 characters, none of them a
    control character (a newline or NUL would break the one-line rows)."""
    if not isinstance(value, str) or not 0 < len(value) <= 200:
        raise InputError(f"{what} must be a string of 1 to 200 characters (got {value!r:.40})")
    bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise InputError(f"{what} holds the control character {bad!r}; use printable characters")
    return value


def check_policy_name(value: Any, where: str) -> str:
    """A policy's name: a name (:func:`check_name`) that a command line can name, so without
    ``,`` (between names), ``+`` (before a run's options) and ``:`` (before a qualifier)."""
    if not isinstance(value, str) or not value.strip() or any(c in value for c in ",+:"):
        raise InputError(f"{where}: policy name {value!r:.40} must be a non-empty string without "
                         "',', '+' or ':' (the command line separates names with them)")  # fmt: skip
    return check_name(value, f"{where}: policy name")


def check_int(value: Any, what: str, low: int, high: int) -> int:
    """An integer in [low, high] (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{what} must be an integer (got {value!r})")
    if not low <= value <= high:
        raise InputError(f"{what} must lie in {low}..{high} (got {value})")
    return int(value)


def check_float(value: Any, what: str, low: float, high: float, *, open_low: bool = False) -> float:
    """A finite number in [low, high] (or (low, high] with ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InputError(f"{what} must be a number (got {value!r})")
    v = float(value)
    if not math.isfinite(v) or v > high or v < low or (open_low and v == low):
        bound = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
        raise InputError(f"{what} must be a finite number in {bound} (got {value})")
    return v


def check_expression(text: str, what: str = "value") -> None:
    """Bounds on a literal expression before it is evaluated: its length, nesting, digits per
    literal and exponents, so that evaluating it takes bounded time and memory."""
    import re

    if len(text) > MAX_EXPRESSION_CHARS:
        raise InputError(
            f"{what} has {len(text)} characters, above {MAX_EXPRESSION_CHARS}; write it shorter"
        )
    if _nesting(text) > MAX_NESTING:
        raise InputError(f"{what} nests parentheses deeper than {MAX_NESTING}; simplify it")
    for m in re.finditer(r"[pP]([+-]?)(\d+)", text):
        if len(m.group(2)) > 7 or int(m.group(2)) > MAX_BINARY_EXPONENT:
            raise InputError(
                f"{what}: binary exponent p{m.group(1)}{m.group(2)[:12]} is beyond "
                f"+-{MAX_BINARY_EXPONENT}; write a smaller exponent"
            )
    for m in re.finditer(r"(?<![xX0-9a-fA-F_])[0-9_.]*[0-9][eE]([+-]?)([0-9_]+)", text):
        digits = m.group(2).replace("_", "")
        if len(digits) > 7 or int(digits or "0") > MAX_DECIMAL_EXPONENT:
            raise InputError(
                f"{what}: decimal exponent e{m.group(1)}{digits[:12]} is beyond "
                f"+-{MAX_DECIMAL_EXPONENT}; write a smaller exponent"
            )
    for m in re.finditer(r"[0-9a-fA-F_]+", text):
        if len(m.group(0)) > MAX_LITERAL_DIGITS:
            raise InputError(
                f"{what}: a literal has {len(m.group(0))} digits, above {MAX_LITERAL_DIGITS}; "
                "use an exponent"
            )
