"""The network bound (MAX_ELEMENTS, 8M numbers) admits the 5.82M benchmark model's size and
refuses beyond it in one line; option counts keep their own bound (MAX_OPTION_COUNT)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fpgrad.model.netfile import load_network
from fpgrad.model.validate import MAX_ELEMENTS, MAX_OPTION_COUNT
from tests.test_bad_input import assert_one_line_error, run_cli, write


def _net(widths: list[int]) -> str:
    layers = "".join(
        f'[[layer]]\ntype = "dense"\nout = {w}\n[[layer]]\ntype = "tanh"\n' for w in widths
    )
    return (
        f'seed = 1\n{layers}[[layer]]\ntype = "dense"\nout = 1\n[loss]\ntype = "mse"\n'
        "[data]\nx = [[1.0, 2.0], [0.5, -1.0]]\ny = [[0.5], [0.25]]\n"
    )


def test_a_network_of_five_million_numbers_loads(tmp_path: Path) -> None:
    net = load_network(Path(write(tmp_path, _net([2000, 2500]))))  # 5.01M parameters
    n = sum(p.size for p in net.params.values())
    assert 10**6 < n <= MAX_ELEMENTS  # the old bound of 10**6 refused it


def test_over_the_bound_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["compare", write(tmp_path, _net([10**6, 10]))], capsys)
    assert_one_line_error(code, err, f"more than {MAX_ELEMENTS} numbers", "use smaller layers")


def test_option_counts_keep_their_bound(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, _net([2]))
    code, _, err = run_cli(["compare", path, "--max-rows", str(MAX_OPTION_COUNT + 1)], capsys)
    assert_one_line_error(code, err, "--max-rows")
