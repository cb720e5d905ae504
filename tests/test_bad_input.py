"""Every bad input gives one line on stderr naming the problem, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fpgrad.cli import main

GOOD = """
seed = 1
[[layer]]
type = "dense"
out = 2
[[layer]]
type = "tanh"
[[layer]]
type = "dense"
out = 1
[loss]
type = "mse"
[data]
x = [[1.0, 2.0], [0.5, -1.0]]
y = [[0.5], [0.25]]
"""


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, text: str, name: str = "net.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fpgrad: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_good_file_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["compare", write(tmp_path, GOOD), "--precisions", "float32"], capsys)
    assert code == 0, err
    assert "Gradient verdicts" in out


@pytest.mark.parametrize(
    ("old", "new", "needles"),
    [
        ('type = "tanh"', 'type = "swish"', ["unknown layer type 'swish'", "layer 1"]),
        ('type = "mse"', 'type = "hinge"', ["unknown loss 'hinge'", "mse"]),
        ("out = 2\n", "out = 2\nin = 3\n", ["in = 3", "gives 2 features"]),
        (
            "x = [[1.0, 2.0], [0.5, -1.0]]",
            "x = [[1.0, nan], [0.5, -1.0]]",
            ["non-finite", "[data].x"],
        ),
        ("y = [[0.5], [0.25]]", "y = [[0.5], [inf]]", ["non-finite", "[data].y"]),
        (
            "y = [[0.5], [0.25]]",
            "y = [[0.5, 1.0], [0.25, 1.0]]",
            ["targets have shape [2, 2]", "[batch, 1]"],
        ),
        ("y = [[0.5], [0.25]]", "y = [[0.5]]", ["y has 1 rows but x has 2"]),
        ("x = [[1.0, 2.0], [0.5, -1.0]]", "x = [[1.0, 2.0], [0.5]]", ["ragged"]),
        ("x = [[1.0, 2.0], [0.5, -1.0]]", 'x = [[1.0, "a"], [0.5, -1.0]]', ["expected numbers"]),
        ("seed = 1", "seed = -1", ["seed must be a non-negative integer"]),
        (
            'type = "dense"\nout = 2',
            'type = "dense"\nout = 2\ninit = "orthogonal"',
            ["unknown init scheme 'orthogonal'"],
        ),
        ('[loss]\ntype = "mse"', "", ["missing [loss]"]),
        ("seed = 1", "seed = 1\ncolour = 3", ["unknown top-level key 'colour'"]),
        ("x = [[1.0, 2.0]", "x = [[1.0, 2.0", ["malformed TOML"]),
    ],
)
def test_bad_network_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, needles: list[str]
) -> None:
    assert old in GOOD
    code, out, err = run_cli(["compare", write(tmp_path, GOOD.replace(old, new, 1))], capsys)
    assert_one_line_error(code, err, *needles)
    assert out == ""


def test_weight_shape_mismatch_names_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = GOOD.replace('type = "dense"\nout = 1', 'type = "dense"\nweight = [[1.0, 2.0, 3.0]]')
    code, _, err = run_cli(["compare", write(tmp_path, text)], capsys)
    assert_one_line_error(code, err, "weight has shape [1, 3]", "use shape [1, 2]")


def test_nan_in_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = GOOD.replace('type = "dense"\nout = 1', 'type = "dense"\nweight = [[1.0, nan]]')
    code, _, err = run_cli(["compare", write(tmp_path, text)], capsys)
    assert_one_line_error(code, err, "non-finite", "weight")


def test_data_files_npy_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "x.npy", np.array([[1.0, 2.0], [0.5, -1.0]]))
    (tmp_path / "y.csv").write_text("0.5\n0.25\n")
    text = GOOD.replace("x = [[1.0, 2.0], [0.5, -1.0]]", 'x_file = "x.npy"').replace(
        "y = [[0.5], [0.25]]", 'y_file = "y.csv"'
    )
    code, out, err = run_cli(["compare", write(tmp_path, text), "--precisions", "float64"], capsys)
    assert code == 0, err
    np.save(tmp_path / "x.npy", np.array([[1.0, np.nan], [0.5, -1.0]]))
    code, _, err = run_cli(["compare", write(tmp_path, text)], capsys)
    assert_one_line_error(code, err, "non-finite")
    code, _, err = run_cli(["compare", write(tmp_path, text.replace("x.npy", "x.parquet"))], capsys)
    assert_one_line_error(code, err, "unknown format", ".npy or .csv")
    code, _, err = run_cli(
        ["compare", write(tmp_path, text.replace("x.npy", "missing.npy"))], capsys
    )
    assert_one_line_error(code, err, "cannot read data file")


def test_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["compare", "/nonexistent/net.toml"], capsys)
    assert_one_line_error(code, err, "cannot read network file")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--precisions", "float8"], ["unknown precision 'float8'", "float16"]),
        (["--precisions", "float16,,float32"], ["empty precision name"]),
        (["--exact-bits", "32"], ["--exact-bits 32 is too low", "at least 64"]),
        (["--exact-bits", "many"], ["invalid int value"]),
        (["--reference", "rounding"], ["unknown reference 'rounding'"]),
        (["--frobnicate"], ["unrecognized arguments"]),
    ],
)
def test_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needles: list[str]
) -> None:
    code, _, err = run_cli(["compare", write(tmp_path, GOOD), *args], capsys)
    assert_one_line_error(code, err, *needles)


def test_cross_entropy_targets_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = GOOD.replace("out = 1", "out = 3").replace('type = "mse"', 'type = "cross_entropy"')
    code, _, err = run_cli(
        ["compare", write(tmp_path, text.replace("y = [[0.5], [0.25]]", "y = [0, 3]"))], capsys
    )
    assert_one_line_error(code, err, "class indices 0..2")
    code, _, err = run_cli(
        [
            "compare",
            write(tmp_path, text.replace("y = [[0.5], [0.25]]", "y = [0, 2]")),
            "--precisions",
            "float64",
        ],
        capsys,
    )
    assert code == 0, err


def test_module_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fpgrad", "compare", str(tmp_path / "none.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


CANCEL = """
# two samples whose weight-gradient contributions cancel to about 2^-45 of their size
[[layer]]
type = "dense"
weight = [[1.0]]
bias = [0.0]
[[layer]]
type = "tanh"
[loss]
type = "mse"
[data]
x = [[0.5], [0.50000000000002842171]]
y = [[1.4621171572600098], [-0.5378828427399902]]
"""


def test_precision_too_low_to_certify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    path = write(tmp_path, CANCEL)
    code, _, err = run_cli(
        [
            "compare",
            path,
            "--exact-bits",
            "64",
            "--exact-max-bits",
            "64",
            "--precisions",
            "float64",
        ],
        capsys,
    )
    assert_one_line_error(
        code, err, "certifies only", "raise --exact-max-bits or pass --allow-uncertified"
    )
    code, out, err = run_cli(
        [
            "compare",
            path,
            "--exact-bits",
            "64",
            "--exact-max-bits",
            "64",
            "--allow-uncertified",
            "--json",
            "--precisions",
            "float64",
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads(out)["exact"]["certified_digits"] < 17
    code, out, err = run_cli(
        ["compare", path, "--exact-bits", "200", "--json", "--precisions", "float64"], capsys
    )
    assert code == 0, err
    assert json.loads(out)["exact"]["certified_digits"] >= 17
