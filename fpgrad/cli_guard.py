"""The command line's boundary: options checked against their bounds before any work, values
like ``-1e-8`` after an option, and the exit-code contract (0 ok, 2 bad input, 1 a bug)."""

from __future__ import annotations

import argparse
import math
import os
import re
import stat
import sys
from pathlib import Path

from fpgrad.errors import InputError
from fpgrad.model.validate import (
    MAX_EXACT_BITS,
    MAX_OPTION_COUNT,
    MAX_RATE,
    MAX_SEED,
    MAX_STEPS,
    MAX_WORKERS,
    check_float,
    check_int,
)

#: longest message printed (a message is one line; longer ones are cut with "...")
MAX_MESSAGE_CHARS = 2000

_NUMBER = re.compile(r"^-(\d|\.\d|inf|nan|0x)", re.IGNORECASE)


def join_negative_values(argv: list[str]) -> list[str]:
    """``--lr -1e-3`` as ``--lr=-1e-3``: argparse reads a value starting with '-' as an option
    unless it is a plain integer or decimal."""
    out: list[str] = []
    for tok in argv:
        prev = out[-1] if out else ""
        if (
            _NUMBER.match(tok)
            and prev.startswith("--")
            and "=" not in prev
            and prev not in ("--json", "--")
        ):
            out[-1] = f"{prev}={tok}"
        else:
            out.append(tok)
    return out


def _out_dir(value: str, option: str, create: bool = False) -> None:
    """An output directory that exists, or whose nearest existing ancestor is a directory that
    can be written; made now with ``create`` (a sweep makes its own after its checks, so that
    a refused sweep leaves no trace)."""
    if not value.strip():
        raise InputError(f"{option} is empty; name a directory")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise InputError(
            f"{option} {value!r} is an existing file, not a directory; name a directory"
        )
    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"cannot create {option} directory {value!r}: {str(probe)!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{option} directory {value!r} cannot be written; choose another")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(
                f"cannot create {option} directory {value!r}: {exc.strerror}; choose another"
            ) from None


def _out_file(value: str, option: str) -> None:
    """An output file (not a directory) whose nearest existing ancestor is a writable
    directory (missing directories are made when it is written)."""
    if not value.strip():
        raise InputError(f"{option} is empty; name a file")
    path = Path(value)
    if path.is_dir():
        raise InputError(f"{option} {value!r} is a directory; name a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{option} {value!r} cannot be written; choose another place")
    probe = path.absolute().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{option} {value!r}: {str(probe)!r} is not a writable directory")


def check_args(args: argparse.Namespace) -> None:
    """Every option of every command within its bound, before any work (see the bounds
    table in docs/reference/bad-input.md)."""

    def opt(name: str) -> object:
        return getattr(args, name, None)

    cmd = opt("command")
    if isinstance(opt("exact_bits"), int) and opt("exact_bits") > MAX_EXACT_BITS:
        raise InputError(
            f"--exact-bits {opt('exact_bits')} is too high: use at most {MAX_EXACT_BITS} "
            "(the exact reference's cost grows with its bits)"
        )
    # upper bounds only where the command checks the lower one with its own message
    for name, high in (("steps", MAX_STEPS), ("batch_size", MAX_OPTION_COUNT)):
        if isinstance(opt(name), int) and opt(name) > high:
            raise InputError(f"--{name.replace('_', '-')} {opt(name)} is too large: at most {high}")
    for name in ("lr", "momentum", "weight_decay"):
        value = opt(name)
        if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= MAX_RATE):
            flag = f"--{name.replace('_', '-')}"
            raise InputError(f"{flag} must be finite and at most {MAX_RATE:g} (got {value})")
    if isinstance(opt("verdict_every"), int):
        check_int(opt("verdict_every"), "--verdict-every", 1, MAX_STEPS)
    if isinstance(opt("max_rows"), int):
        check_int(opt("max_rows"), "--max-rows", 0, MAX_OPTION_COUNT)
    if isinstance(opt("max_cells"), int) and opt("max_cells") > MAX_OPTION_COUNT:
        raise InputError(f"--max-cells {opt('max_cells')} is too large: at most {MAX_OPTION_COUNT}")
    if isinstance(opt("workers"), int) and opt("workers") > MAX_WORKERS:
        raise InputError(f"--workers {opt('workers')} is too many: at most {MAX_WORKERS}")
    if isinstance(opt("headroom"), int):
        check_int(opt("headroom"), "--headroom", 0, 1000)
    if isinstance(opt("seed"), int):
        check_int(opt("seed"), "--seed", 0, MAX_SEED)
    if isinstance(opt("loss_scale"), float):
        check_float(opt("loss_scale"), "--loss-scale", 0.0, 2.0**1000, open_low=True)
    if opt("tensorboard") is not None and not str(opt("tensorboard")).strip():
        raise InputError("--tensorboard is empty; name a directory (or leave --tensorboard out)")
    for name in ("policy", "verdict"):
        value = opt(name)
        if isinstance(value, str) and not all(n.strip() for n in value.split(",")):
            raise InputError(f"empty name in --{name} {value!r}; separate names by commas")
    if cmd in ("compare", "advise", "run", "watch-report") and opt("out") == "":
        raise InputError("--out is empty; name a directory (or leave --out out)")
    if cmd in ("train", "sweep") and isinstance(opt("out"), str):
        _out_dir(opt("out"), "--out", create=cmd == "train")
    if cmd == "report" and isinstance(opt("out"), str) and not opt("out").strip():
        raise InputError("--out is empty; name a directory")  # report checks the rest itself
    if cmd == "import" and isinstance(opt("out"), str):
        _out_file(opt("out"), "--out")
    if cmd == "report" and opt("only") is not None:
        if not [n for n in str(opt("only")).split(",") if n.strip()]:
            raise InputError("--only names no scenario; give names from fpgrad list")


def stdout_closed() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone (the one broken pipe that is
    not an error)."""
    import select

    try:
        fd = sys.stdout.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):
        return False
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def one_line(text: str) -> str:
    """A message on one line of at most :data:`MAX_MESSAGE_CHARS` characters."""
    flat = re.sub(r"\s*[\r\n]+\s*", " ", text.strip())
    return flat if len(flat) <= MAX_MESSAGE_CHARS else flat[: MAX_MESSAGE_CHARS - 3] + "..."
