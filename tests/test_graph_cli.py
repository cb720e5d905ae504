"""``fpgrad compare path/to/script.py:build`` and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fpgrad.cli import main

SCRIPT = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return model, torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]), nn.CrossEntropyLoss()

def other():
    return 1, 2
"""


def test_script_build_compares(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "net.py"
    script.write_text(SCRIPT)
    assert main(["compare", f"{script}:build", "--precisions", "float16,float32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["precisions"] == ["float16", "float32"]
    assert out["certified_digits"] >= 17
    assert sum(out["summary"]["float32"].values()) == 3 * 4 + 4 + 4 * 2 + 2
    assert set(out["parameters"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing.py:build", "no such script"),
        ("net.py:nothere", "defines no function nothere()"),
        ("net.py:other", "must return a tuple (model, inputs, targets, loss)"),
        ("broken.py:build", "raised ZeroDivisionError"),
    ],
)
def test_script_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str, message: str
) -> None:
    (tmp_path / "net.py").write_text(SCRIPT)
    (tmp_path / "broken.py").write_text("def build():\n    return 1 / 0\n")
    assert main(["compare", str(tmp_path / spec)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
