"""Held-out model findings, round 2 (``scripts/heldout_models_d.py``, ``_e``): each fix checked
against torch.

Native columns equal torch's eager autograd bit for bit; the certified exact reference holds
torch float64's loss and gradients in its balls (plus a 1e-9 relative allowance for float64's
own rounding) or, where torch float64 is itself inexact, the mpmath oracle's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from tests.oracle.native_exact import check

# ---- casts to integers inside a loss (float targets -> class indices) -------------------------


def _two_task_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Class labels and a regression target in one float tensor: ``y[:, 0].long()``."""
    return F.cross_entropy(out[:, :3], y[:, 0].long()) + 0.5 * F.mse_loss(out[:, 3], y[:, 1])


def _mask_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(y > 0).long()`` as classes, ``(y > 0).float()`` as a weight, ``y.trunc`` by cast."""
    w = (y > 0).float() + 0.5
    return F.cross_entropy(out[:, :2], (y > 0).long()) + (w * (out[:, 2] - y).abs()).mean() \
        + (out[:, 3] * (2.5 * y).to(torch.int32)).mean()  # fmt: skip


def test_float_targets_cast_to_class_indices() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4))
    y = torch.stack([torch.tensor([0.0, 2, 1, 1]), torch.randn(4)], 1)
    check(m, torch.randn(4, 4), y, _two_task_loss)
    y2 = torch.tensor([0.5, -0.25, 1.75, -1.5, 0.0, -0.0])
    check(m, torch.randn(6, 4), y2, _mask_loss)
    net = fpgrad.from_module(m, torch.randn(6, 4), y2, _mask_loss)
    fpgrad.compare(net, "bfloat16:emulated,float32").render(max_rows=2)
