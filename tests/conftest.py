"""Shared test set-up: compiled kernels warmed once per session, so `--durations` shows each
test's own time rather than the first caller's numba compilation or cache load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def warm_compiled_kernels() -> None:
    """Load (or compile) the numba kernels: rounding and the exact balls' elementary words."""
    from fpgrad.graph.layers import exact_trace
    from fpgrad.model.netfile import load_network
    from fpgrad.numbers.rounding import round_to

    round_to(np.array([1.0, 2.0**-30, 3.0e5]), "float16")
    exact_trace(load_network(ROOT / "fpgrad" / "examples" / "showcase.toml"))
