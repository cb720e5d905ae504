"""fpgrad: a floating-point precision lab for gradient underflow."""

from typing import Any


def __getattr__(name: str) -> Any:
    """``fpgrad.from_module`` without importing torch for every ``import fpgrad``."""
    if name == "from_module":
        from fpgrad.graph import from_module

        return from_module
    raise AttributeError(f"module 'fpgrad' has no attribute {name!r}")
