"""Sweeps under hostile conditions: damaged cell logs are reported by line and their cells
recomputed, a second sweep into a locked directory is refused, a full disk is exit 2 with the
finished cells kept, and a SIGKILLed sweep leaves no process of it running."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from fpgrad.cli import main
from fpgrad.sweeps import cells as sweep_mod
from fpgrad.sweeps import log as log_mod
from fpgrad.sweeps.run import OutputLock
from tests.test_sweep import NET, cell_lines, net_file

ROOT = Path(__file__).resolve().parents[1]


def _args(path: str, out: Path) -> list[str]:
    return [
        "sweep",
        path,
        "--out",
        str(out),
        "--workers",
        "0",
        "--precisions",
        "float16,bfloat16",
        "--loss-scales",
        "1,1024",
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    tmp = tmp_path_factory.mktemp("ref")
    path = net_file(tmp)
    assert main(_args(path, tmp / "out")) == 0
    return path, tmp / "out"


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    ran: list[str] = []
    real = sweep_mod.run_cell

    def counting(job: Any) -> dict[str, Any]:
        ran.append(job.key)
        return real(job)

    monkeypatch.setattr(sweep_mod, "run_cell", counting)
    return ran


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda line: line[: len(line) // 2], "not JSON"),
        (lambda line: json.dumps({**json.loads(line), "counts": "many"}), "field counts"),
        (lambda line: json.dumps({**json.loads(line), "status": 7}), "field status"),
        (lambda line: "[" * 100_000 + "]" * 100_000, "not JSON"),
        (lambda line: json.dumps({"key": json.loads(line)["key"]}), "field axes"),
    ],
)
def test_a_damaged_line_is_reported_and_its_cell_recomputed(
    reference: tuple[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    damage: Any,
    why: str,
) -> None:
    path, ref = reference
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    lines = (out / "cells.jsonl").read_text().splitlines()
    victim = json.loads(lines[2])["key"]
    lines[2] = damage(lines[2])
    (out / "cells.jsonl").write_text("\n".join(lines) + "\n")
    ran = _counting(monkeypatch)
    assert main(_args(path, out)) == 0
    err = capsys.readouterr().err
    assert ran == [victim]
    warning = [ln for ln in err.splitlines() if ln.startswith("fpgrad: warning:")]
    assert len(warning) == 1 and "line 3 is damaged" in warning[0] and why in warning[0]
    assert "1 cells run, 3 from cells.jsonl" in err
    assert cell_lines(out) == cell_lines(ref)
    for name in ("sweep.md", "sweep.json", "sweep.csv"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    assert main(_args(path, out)) == 0  # the file was repaired: no warning the second time
    assert "warning" not in capsys.readouterr().err


def test_a_damaged_header_is_a_one_line_error(
    reference: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, ref = reference
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    lines = (out / "cells.jsonl").read_text().splitlines()
    (out / "cells.jsonl").write_text("\n".join(["{{{", *lines[1:]]) + "\n")
    assert main(_args(path, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 1 (the header) is damaged" in err and "--restart" in err


def test_a_second_sweep_into_a_locked_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = net_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    lock = OutputLock(out)  # another sweep holds it (flock is per open file, so this counts)
    try:
        assert main(_args(path, out)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "another sweep is writing" in err
        assert not (out / "cells.jsonl").exists()
    finally:
        lock.release()
    assert main(_args(path, out)) == 0


def test_a_full_disk_is_exit_2_and_keeps_the_finished_cells(
    reference: tuple[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, ref = reference
    out = tmp_path / "out"
    real_fsync = os.fsync
    calls = [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        if calls[0] == 4:  # the header and two cells are on disk; the third line's sync fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(log_mod.os, "fsync", fsync)
    assert main(_args(path, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "kept" in err
    monkeypatch.setattr(log_mod.os, "fsync", real_fsync)
    ran = _counting(monkeypatch)
    assert main(_args(path, out)) == 0
    assert len(ran) == 1  # the three lines written were kept: only the fourth cell runs
    assert cell_lines(out) == cell_lines(ref)


def test_outputs_that_cannot_be_written_are_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = net_file(tmp_path)
    (tmp_path / "file").write_text("x")
    for out, needle in [
        (tmp_path / "file", "is an existing file"),
        (tmp_path / "file" / "sub", "cannot create"),
        (Path(""), "--out is empty"),
    ]:
        args = _args(path, out)
        if not str(out) or str(out) == ".":
            args[args.index("--out") + 1] = ""
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    out = tmp_path / "dir"
    (out / "cells.jsonl").mkdir(parents=True)  # the log is a directory
    assert main(_args(path, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory" in err


def test_sigkill_of_a_sweep_leaves_no_process(tmp_path: Path) -> None:
    """Workers busy in a long cell (and multiprocessing's resource tracker) die with the sweep
    (an idle worker would leave anyway: its task queue closes; a busy one would compute on)."""
    path = net_file(tmp_path, NET)
    cmd = [sys.executable, "-m", "fpgrad", "sweep", path, "--out", str(tmp_path / "o")]
    cmd += ["--task", "train", "--steps", "1000000", "--workers", "2"]
    cmd += ["--precisions", "float16,bfloat16"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        kids: list[psutil.Process] = []
        while time.monotonic() < deadline:  # two workers and the resource tracker
            kids = parent.children(recursive=True)
            if len(kids) >= 3:
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.2)
        assert len(kids) >= 3, kids
        time.sleep(8)  # the workers import torch and start their (endless) cells
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(kids, timeout=20)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [p.cmdline()[-3:] for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in psutil.Process().children(recursive=True):  # never leave one behind
            if p.pid != os.getpid():
                p.kill()
