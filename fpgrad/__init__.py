"""fpgrad: a floating-point precision lab for gradient underflow."""

from typing import Any


def __getattr__(name: str) -> Any:
    """Public entry points imported on first use, so ``import fpgrad`` stays cheap:
    ``fpgrad.watch`` (the watch package, callable) and ``fpgrad.from_module``."""
    if name == "watch":
        import importlib

        return importlib.import_module("fpgrad.watch")
    if name == "from_module":
        from fpgrad.graph import from_module

        return from_module
    raise AttributeError(f"module 'fpgrad' has no attribute {name!r}")
