"""fpgrad: a floating-point precision lab for gradient underflow."""


def __getattr__(name: str) -> object:
    """``fpgrad.watch`` is imported on first use, so ``import fpgrad`` stays cheap."""
    if name == "watch":
        import importlib

        return importlib.import_module("fpgrad.watch")
    raise AttributeError(f"module 'fpgrad' has no attribute {name!r}")
