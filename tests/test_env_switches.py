"""The on/off environment variables: known words only; anything else is one line, exit 2."""

from __future__ import annotations

import pytest

from fpgrad import cli, errors
from fpgrad.arith import arb_kernels, crt
from fpgrad.errors import InputError, switch
from fpgrad.numbers import rounding


def test_switches_are_the_modules_variables() -> None:
    assert set(errors.SWITCHES) == {crt.INT8_ENV, arb_kernels.KERNELS_ENV, rounding.KERNEL_ENV}


@pytest.mark.parametrize(
    ("raw", "want"),
    [("", None), ("  ", None), ("1", True), ("ON", True), (" yes ", True), ("true", True),
     ("0", False), ("off", False), ("No", False), ("false", False)],  # fmt: skip
)
def test_switch_words(raw: str, want: bool | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPGRAD_INT8_GEMM", raw)
    assert switch("FPGRAD_INT8_GEMM") is want


@pytest.mark.parametrize("raw", ["maybe", "2", "enable", "o n"])
def test_bad_values_name_the_variable_and_the_fix(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPGRAD_ARB_KERNELS", raw)
    with pytest.raises(InputError, match=r"FPGRAD_ARB_KERNELS=.*set it to 1 or 0"):
        switch("FPGRAD_ARB_KERNELS")
    crt.fast.cache_clear()
    monkeypatch.setenv(crt.INT8_ENV, raw)
    try:
        with pytest.raises(InputError, match="FPGRAD_INT8_GEMM"):
            crt.fast()
    finally:
        monkeypatch.undo()
        crt.fast.cache_clear()


def test_cli_refuses_a_bad_switch_before_any_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FPGRAD_ROUNDING_KERNEL", "maybe")
    assert cli.main(["explain", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "FPGRAD_ROUNDING_KERNEL='maybe'" in err
