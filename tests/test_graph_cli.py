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
    assert out["exact"]["certified_digits"] >= 17
    summary = {
        k: n for k, n in out["summary"]["float32"].items() if not k.startswith("rounding_zero_")
    }
    assert sum(summary.values()) == 3 * 4 + 4 + 4 * 2 + 2
    assert {r["param"] for r in out["parameters"]} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert len(out["gradients"]) == 3 * 4 + 4 + 4 * 2 + 2  # every element, as for networks
    assert out["kinds"] == {"float16": "native", "float32": "native"}


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


REPORT_SCRIPT = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from torch import nn
from tests.graph_models import residual_mlp

def build():
    model, x, y = residual_mlp()
    model.inp.weight.data *= 1e-3  # gradients below float16's subnormals
    return model, x * 1e-4, y, nn.CrossEntropyLoss()
"""


def test_out_dir_report_of_a_captured_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    import numpy as np

    from fpgrad.diagnose.verdicts import VERDICTS
    from fpgrad.present.report.markdown import tables
    from tests.browser import CHROMIUM, chromium_images

    script = tmp_path / "net.py"
    script.write_text(REPORT_SCRIPT)
    out = tmp_path / "report"
    args = ["compare", f"{script}:build", "--precisions", "float16,bfloat16", "--out", str(out)]
    assert main(args) == 0
    assert "wrote " in capsys.readouterr().err
    files = {p.name for p in out.iterdir()}
    assert files == {
        "compare.md",
        "compare.html",
        "compare.json",
        "gradients.npz",
        "magnitudes.png",
        "verdicts.png",
        "signal.png",
    }
    md = (out / "compare.md").read_text()
    assert tables(md) and all(len({len(r) for r in t}) == 1 for t in tables(md))
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links == ["magnitudes.png", "verdicts.png", "signal.png"]
    assert all((out / link).stat().st_size > 1000 for link in links)
    doc = json.loads((out / "compare.json").read_text())
    assert doc["summary"]["float16"]["rounding_zero"] > 0
    first = doc["attribution"]["float16"]["first_rounding_zero_backward"]
    assert "## Diagnosis" in md and first["op"] in md
    # the npz: every element, its verdict codes agreeing with the JSON counts
    with np.load(out / "gradients.npz") as z:
        assert list(z["precisions"]) == ["float16", "bfloat16"]
        names = list(dict.fromkeys(r["param"] for r in doc["parameters"]))
        assert "inp.weight" in names
        for p in ("float16", "bfloat16"):
            codes = np.concatenate([z[f"{n}/{p}/verdict"].ravel() for n in names])
            counts = np.bincount(codes, minlength=len(VERDICTS))
            summary = {v: doc["summary"][p][v] for v in VERDICTS}
            assert dict(zip(VERDICTS, counts.tolist(), strict=True)) == summary
        w = z["inp.weight/float16/value"]
        rz = z["inp.weight/float16/verdict"] == VERDICTS.index("rounding_zero")
        exact = z["inp.weight/exact_hi"] + z["inp.weight/exact_lo"]
        assert w.shape == exact.shape == (6, 4) and rz.any()
        assert (w[rz] == 0).all() and (exact[rz] != 0).all()
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: `apt-get install chromium` for the browser check")
    ok, total, dom = chromium_images(out / "compare.html", tmp_path)
    assert total == 3 and ok == total
    assert "Diagnosis" in dom and "inp.weight" in dom


def test_out_dir_of_a_captured_model_checked_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "net.py").write_text("def build():\n    raise SystemExit('ran')\n")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["compare", f"{tmp_path / 'net.py'}:build", "--out", str(blocker / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write to output directory" in err


def test_magnitudes_figure_skips_undetermined_elements(tmp_path: Path) -> None:
    """An undetermined element (its ball holds 0: hi = 0, not a proven zero) has no log2; the
    transformer block's report failed on log2(0) = -inf before."""
    import numpy as np

    from fpgrad.diagnose.comparison import Column, GradColumns
    from fpgrad.diagnose.verdicts import ExactArray
    from fpgrad.numbers.formats import get_format
    from fpgrad.present.report.own import magnitudes_figure

    hi = np.array([0.0, 2.0**-30, 0.0])
    zero = np.array([False, False, True])
    ex = ExactArray(hi, np.zeros(3), zero, np.zeros(3), np.array([True, False, False]))
    z8 = np.zeros(3, dtype=np.uint8)
    col = Column(hi, z8, z8, np.zeros(3), np.zeros(3), np.zeros(3))
    g = GradColumns("b", (3,), ex, np.zeros(3), {"float16": col})
    path = tmp_path / "m.png"
    magnitudes_figure("net", [g], [("float16", get_format("float16"))], path)
    assert path.stat().st_size > 1000
