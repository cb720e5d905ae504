"""Running one case under a time and memory limit, judged by the exit-code contract."""

from __future__ import annotations

import contextlib
import io
import os
import resource
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fpgrad.fuzz.cases import CANARY, Case


@dataclass
class Outcome:
    case: Case
    code: int
    seconds: float
    err: str
    problem: str | None  #: None: the contract holds


class CaseTimeout(BaseException):
    """A case ran past its time limit (a BaseException: the CLI's handler does not catch it)."""


def _write(case: Case, d: Path) -> None:
    for name, content in case.files.items():
        path = d / name
        if content == "fifo":
            os.mkfifo(path)
        elif content == "dir":
            path.mkdir()
        elif isinstance(content, str) and content.startswith("link:"):
            target = content[5:]
            path.symlink_to(target if target.startswith("/") else d / target)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())


def _vm_data() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover


@contextlib.contextmanager
def limits(seconds: float, memory_bytes: int) -> Iterator[None]:
    """At most ``seconds`` of wall time (SIGALRM raises :class:`CaseTimeout`) and at most
    ``memory_bytes`` more of private memory (RLIMIT_DATA: allocations beyond fail)."""

    def alarm(signum: int, frame: Any) -> None:
        raise CaseTimeout

    old_handler = signal.signal(signal.SIGALRM, alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = _vm_data() + memory_bytes
    resource.setrlimit(resource.RLIMIT_DATA, (min(cap, hard) if hard > 0 else cap, hard))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def run_case(case: Case, d: Path, seconds: float = 20.0, memory_bytes: int = 2**31) -> Outcome:
    """Run one case in directory ``d`` (empty) and judge it by the exit-code contract."""
    from fpgrad.cli import main

    _write(case, d)
    argv = [a.replace("{d}", str(d)) for a in case.argv]
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    code = -1
    problem = None
    try:
        with limits(seconds, memory_bytes), contextlib.redirect_stdout(out):
            with contextlib.redirect_stderr(err):
                code = main(argv)
    except CaseTimeout:
        problem = f"hang: more than {seconds:g} s"
    elapsed = time.monotonic() - start
    text = err.getvalue()
    lines = text.strip().splitlines()
    if problem is None:
        if code == 1:
            problem = "exit 1"
        elif code not in (0, 2):
            problem = f"exit {code}"
        elif "out of memory" in text:
            problem = "memory exhausted"
        elif code == 2 and (len(lines) != 1 or not lines[0].startswith("fpgrad: error: ")):
            problem = "exit 2 without exactly one 'fpgrad: error:' line"
        elif CANARY in text or CANARY in out.getvalue():
            problem = "a message quotes a data file's content"
    return Outcome(case, code, elapsed, text.strip()[:300], problem)
