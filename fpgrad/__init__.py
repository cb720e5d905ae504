"""fpgrad: a floating-point precision lab for gradient underflow.

The public API, each name imported on first use so that ``import fpgrad`` stays cheap:

- :func:`compare` a network in precisions and exactly, every gradient element judged;
- :func:`train` side by side from one initialisation; :func:`advise` a loss scale;
- :func:`sweep` grids of compares or trainings; :func:`watch` your own training loop;
- :func:`from_module` a torch model captured for all of these; :func:`load_network` a network
  file or a model file;
- :func:`round_to` correctly rounded values in any format; :func:`get_format` its constants.

>>> import fpgrad
>>> fpgrad.round_to([65520.0, 1e-8, 1 + 2**-11], "float16").tolist()
[inf, 0.0, 1.0]
>>> fpgrad.get_format("fp8_e4m3").max
448.0
>>> net = fpgrad.load_network("fpgrad/examples/showcase.toml")
>>> fpgrad.compare(net, "float16").counts("float16")["rounding_zero"]
5
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> (module, attribute)
_API: dict[str, tuple[str, str]] = {
    "compare": ("fpgrad.diagnose.comparison", "compare"),
    "train": ("fpgrad.training", "train"),
    "advise": ("fpgrad.diagnose.advisor", "advise"),
    "sweep": ("fpgrad.sweeps", "sweep"),
    "watch": ("fpgrad.watching", "watch"),
    "from_module": ("fpgrad.graph", "from_module"),
    "load_network": ("fpgrad.model.netfile", "load_network"),
    "round_to": ("fpgrad.numbers.rounding", "round_to"),
    "get_format": ("fpgrad.numbers.formats", "get_format"),
}
__all__ = list(_API)

if TYPE_CHECKING:  # the names as the type checker sees them
    from fpgrad.diagnose.advisor import advise as advise
    from fpgrad.diagnose.comparison import compare as compare
    from fpgrad.graph import from_module as from_module
    from fpgrad.model.netfile import load_network as load_network
    from fpgrad.numbers.formats import get_format as get_format
    from fpgrad.numbers.rounding import round_to as round_to
    from fpgrad.sweeps import sweep as sweep
    from fpgrad.training import train as train
    from fpgrad.watching import watch as watch


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'fpgrad' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # once bound, later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
