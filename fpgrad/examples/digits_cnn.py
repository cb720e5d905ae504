"""The gallery scenario cnn_digits_loss_scaling's model for ``fpgrad train``/``compare``:
a small CNN pretrained in float32 on scikit-learn's digits, and a batch of 64 of them.

    fpgrad train fpgrad/examples/digits_cnn.py:build --steps 10 --lr 0.05 --momentum 0.9 \
        --precisions float16,float16+scale=1024,float16+master+scale=1024
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fpgrad.scenarios.cnn_digits_loss_scaling import pretrained


def build() -> tuple[Any, Any, Any, Any]:
    model, x, y = pretrained()
    return model, x, y, nn.CrossEntropyLoss()
