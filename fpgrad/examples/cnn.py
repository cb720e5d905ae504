"""A tiny CNN for ``fpgrad compare fpgrad/examples/cnn.py:build`` and ``fpgrad sweep``.

Conv2d, BatchNorm2d, SiLU, max pooling and a linear head on 8 images of 8 x 8 pixels whose
values are 1e-3 (std): after the convolution every channel is nearly constant, so batch
norm's ``x - mean`` is at the edge of float16's resolution. ``build(seed)`` draws the
weights and data from ``seed`` (``fpgrad sweep --seeds 0..3``).
"""

from __future__ import annotations

import torch
from torch import nn


def build(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, nn.Module]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.SiLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    x = torch.randn(8, 1, 8, 8) * 1e-3
    y = torch.randint(0, 3, (8,))
    return model, x, y, nn.CrossEntropyLoss()
