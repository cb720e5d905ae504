"""The exit-code contract at the command line's edge: a broken pipe is exit 0 only when stdout
was closed, library warnings add no line, option values like -1e-3 are values, messages stay
on one line, and files are read only when regular and small enough."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import fpgrad.cli as cli
from fpgrad.cli_guard import join_negative_values
from fpgrad.errors import InputError
from fpgrad.model.validate import check_expression, load_csv, load_npy, read_bytes

ROOT = Path(__file__).resolve().parents[1]


def test_a_closed_stdout_is_exit_0_without_a_message() -> None:
    code = (
        "import sys, fpgrad.cli as c\n"
        "def big(args):\n"
        "    for _ in range(20000): print('x' * 1000)\n"
        "    return 0\n"
        "c._formats = big\n"
        "sys.exit(c.main(['formats']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()  # the reader goes away, like `| head -c 10`
    err = proc.stderr.read().decode()
    assert proc.wait() == 0, err
    assert err == ""


def test_any_other_broken_pipe_is_an_internal_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def pool_died(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")  # e.g. a worker pool that failed to start

    monkeypatch.setattr(cli, "_formats", pool_died)
    assert cli.main(["formats"]) == 1
    err = capsys.readouterr().err
    assert "internal error: BrokenPipeError" in err and err.count("\n") == 1


def test_library_warnings_add_no_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def noisy(args: object) -> int:
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
        np.log(np.zeros(1))  # RuntimeWarning: divide by zero
        raise InputError("the problem; the fix")

    monkeypatch.setattr(cli, "_formats", noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # would print them, were they not dropped
        assert cli.main(["formats"]) == 2
    assert capsys.readouterr().err == "fpgrad: error: the problem; the fix\n"


def test_multi_line_messages_are_joined_and_capped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def long(args: object) -> int:
        raise InputError("a\nb " + "x" * 10_000)

    monkeypatch.setattr(cli, "_formats", long)
    assert cli.main(["formats"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fpgrad: error: a b xx") and len(err) < 2100


def test_memory_exhaustion_is_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def hungry(args: object) -> int:
        raise MemoryError

    monkeypatch.setattr(cli, "_formats", hungry)
    assert cli.main(["formats"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory" in err


@pytest.mark.parametrize(
    ("argv", "joined"),
    [
        (["train", "n", "--lr", "-1e-3"], ["train", "n", "--lr=-1e-3"]),
        (["compare", "n", "--loss-scale", "-inf"], ["compare", "n", "--loss-scale=-inf"]),
        (["train", "n", "--seed", "-1"], ["train", "n", "--seed=-1"]),
        (["train", "n", "--json", "-1"], ["train", "n", "--json", "-1"]),
        (["train", "n", "--lr", "-x"], ["train", "n", "--lr", "-x"]),
    ],
)
def test_negative_values_after_an_option_are_values(argv: list[str], joined: list[str]) -> None:
    assert join_negative_values(argv) == joined


def test_a_negative_learning_rate_is_read_and_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fpgrad.fuzz.known import _net

    (tmp_path / "n.toml").write_bytes(_net())
    assert cli.main(["train", str(tmp_path / "n.toml"), "--steps", "1", "--lr", "-1e-3"]) == 2
    assert "learning rate must be positive" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "n.toml"), "--steps", "1", "--lr", "1e308"]) == 2
    assert "--lr must be finite and at most 1e+06 (got 1e+308)" in capsys.readouterr().err


def test_files_must_be_regular_and_small(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is a pipe; give a regular file"):
        read_bytes(fifo, "data file")
    with pytest.raises(InputError, match="is a device"):
        read_bytes("/dev/zero", "data file")
    big = tmp_path / "big"
    big.write_bytes(b"1" * 101)
    with pytest.raises(InputError, match="has 101 bytes, above the limit of 100"):
        read_bytes(big, "data file", cap=100)


def test_npy_headers_are_checked_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.ones((3, 2)))
    assert load_npy(path, "w").shape == (3, 2)
    with pytest.raises(InputError, match=r"declares shape \[3, 2\] \(6 numbers\), above"):
        load_npy(path, "w", max_elements=5)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(InputError, match="holds 40 bytes of data, not 48"):
        load_npy(path, "w")


def test_csv_errors_name_the_place_not_the_content(tmp_path: Path) -> None:
    path = tmp_path / "y.csv"
    path.write_text("1,2\n3,secret-content\n")
    with pytest.raises(InputError, match="line 2, column 2 is not a number") as err:
        load_csv(path, "w")
    assert "secret" not in str(err.value)
    path.write_text("1,2\n3\n")
    with pytest.raises(InputError, match="line 2 has 1 columns, the first row 2"):
        load_csv(path, "w")
    path.write_text("# a comment\n1,2\n3,4\n")
    assert load_csv(path, "w").tolist() == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("1e99999999", "decimal exponent e99999999"),
        ("1E+100001", "decimal exponent e+100001"),
        ("0x1p-99999999", "binary exponent"),
        ("9" * 4001, "4001 digits"),
        ("(" * 101 + "1" + ")" * 101, "nests parentheses deeper than 100"),
        ("1+" * 6000, "characters, above 10000"),
    ],
)
def test_expressions_are_bounded_before_evaluation(text: str, needle: str) -> None:
    with pytest.raises(InputError, match=needle.replace("(", r"\(").replace("+", r"\+")):
        check_expression(text)


@pytest.mark.parametrize("text", ["1e100000", "0x1.8p-3", "2**-1074", "1_000e-3", "0xe5p1"])
def test_expressions_within_the_bounds_pass(text: str) -> None:
    check_expression(text)
