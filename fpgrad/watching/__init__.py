"""Watch a real training loop: per-op zeros, subnormals, infs and NaNs, created or inherited.

:func:`fpgrad.watch` is :func:`fpgrad.watching.watcher.watch`; ``Watcher`` is what it returns.
"""

from fpgrad.watching.watcher import Watcher, watch

__all__ = ["Watcher", "watch"]
