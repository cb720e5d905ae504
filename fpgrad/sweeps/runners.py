"""Running cells in this process, in local processes or on a Dask cluster. Workers get
:func:`~fpgrad.sweeps.cells.run_cell`, a top-level function, looked up at each call."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from fpgrad.errors import InputError
from fpgrad.sweeps import cells
from fpgrad.sweeps.cells import CellJob


def _worker_init(parent: int) -> None:
    """Local workers leave Ctrl-C to the parent, which stops them, drop library warnings, and
    die with the parent: on Linux the kernel kills them when it dies (``PR_SET_PDEATHSIG``);
    elsewhere, and as a backstop, a thread checks every second that the parent is still there."""
    import signal
    import threading
    import warnings

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore")  # as in the CLI: no library warning adds lines to stderr
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the thread does it
            pass
    if os.getppid() != parent:  # the parent died before the death signal was set
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    import time

    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _failure(job: CellJob, exc: BaseException) -> dict[str, Any]:
    return {
        "key": job.key,
        "axes": job.axes,
        "network_hash": job.network_hash,
        "status": "internal_error",
        "error": f"{type(exc).__name__}: {exc}",
    }


def run_inline(jobs: list[CellJob], done: Callable[[dict[str, Any]], None]) -> None:
    for job in jobs:
        done(cells.run_cell(job))


def run_local(jobs: list[CellJob], workers: int, done: Callable[[dict[str, Any]], None]) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),  # torch and fork do not mix
        initializer=_worker_init,
        initargs=(os.getpid(),),
    )
    try:
        futures = {pool.submit(cells.run_cell, job): job for job in jobs}
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


def run_dask(jobs: list[CellJob], scheduler: Any, done: Callable[[dict[str, Any]], None]) -> None:
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
        futures = {client.submit(cells.run_cell, job, pure=False): job for job in jobs}
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
