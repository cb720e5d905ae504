"""The gallery's scenarios, one module each; ``SCENARIOS`` maps names to modules.

Each module tests one claim people make about zero gradients with a network and data built
for it, in every precision and exactly, and computes its verdict from the results.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from fpgrad.errors import InputError

#: Scenario names in gallery order; each is a module fpgrad/scenarios/NAME.py.
NAMES: tuple[str, ...] = (
    "dead_relu",
    "dead_relu_remedies",
    "relu_killed_by_rounding",
    "deep_sigmoid_vanishing",
    "fp16_gradient_underflow",
    "mixed_precision_policy",
    "loss_near_zero_stall",
    "tiny_learning_rate",
    "chaotic_oscillation",
    "extreme_values_overflow",
    "similar_gradients_from_init",
    "fp8_formats",
    "gradscaler_skipped_steps",
    "graph_attention_fp16",
    "graph_norm_fp16",
    "cnn_digits_loss_scaling",
)


def available() -> list[str]:
    """All scenario names, in gallery order."""
    return list(NAMES)


def get(name: str) -> ModuleType:
    """The scenario module ``name``, imported on demand (a broken module fails only itself)."""
    if name not in NAMES:
        from fpgrad.suggest import did_you_mean

        raise InputError(
            f"unknown scenario {name!r}{did_you_mean(name, NAMES)}; known: {', '.join(NAMES)} "
            "(see fpgrad list)"
        )
    return importlib.import_module(f"fpgrad.scenarios.{name}")
