"""attack20: recurrent layers, resampling and pooling geometry, convolution edge cases, margin
losses at their kinks, exact training trajectories and the train CLI, against independent
oracles (mpmath, fractions)."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from fpgrad import cli
from fpgrad.errors import InputError
from fpgrad.graph.exact import exact_graph
from fpgrad.run.optim import OptimConfig


def _contains(ex, key: str, truth: list) -> None:  # noqa: ANN001
    mid, rad = ex.enclosure(key)
    for m, r, t in zip(mid.reshape(-1), np.asarray(rad).reshape(-1), truth, strict=True):
        assert abs(mpmath.mpf(m) - t) <= mpmath.mpf(float(r)) * (1 + 1e-12) + 1e-300, (
            key, m, r, t)  # fmt: skip


# ---- training: the optimizer's settings ------------------------------------------------------


def test_adam_with_momentum_is_refused(tmp_path, capsys) -> None:  # noqa: ANN001
    """Was: ``fpgrad train ... --optimizer adam --momentum 0.9`` exited 0 with the header
    'adam lr=0.01 momentum=0.9' while every run (torch's and the exact one) ignored the
    momentum: torch.optim.Adam has none (its first moment decays by beta1)."""
    with pytest.raises(InputError, match="torch.optim.Adam has none"):
        OptimConfig(name="adam", momentum=0.9)
    script = tmp_path / "tiny.py"
    script.write_text(
        "import torch\nfrom torch import nn\n\n\ndef build():\n    torch.manual_seed(0)\n"
        "    m = nn.Linear(3, 2)\n"
        "    return m, torch.randn(4, 3), torch.randn(4, 2), nn.MSELoss()\n"
    )
    argv = ["train", f"{script}:build", "--steps", "1", "--optimizer", "adam",
            "--momentum", "0.9", "--precisions", "float32"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "momentum" in capsys.readouterr().err
