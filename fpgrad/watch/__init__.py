"""Watch a real training loop: per-op zeros, subnormals, infs and NaNs, created or inherited.

``fpgrad.watch`` is both this package and the function: the package module is callable, so
``fpgrad.watch(model, ...)`` works whether or not the package was imported before.
"""

import sys
import types

from fpgrad.watch.watcher import Watcher, watch

__all__ = ["Watcher", "watch"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args: object, **kwargs: object) -> Watcher:
        return watch(*args, **kwargs)  # type: ignore[arg-type]


sys.modules[__name__].__class__ = _CallableModule
