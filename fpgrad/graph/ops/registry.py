"""The op registry: ``OPS`` maps an aten overload name to the function that computes it, and
``HINTS`` the refused ops to the hint shown (filled by the modules of :mod:`fpgrad.graph.ops`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

OpFn = Callable[..., Any]
OPS: dict[str, OpFn] = {}
#: op name (overload dropped) -> hint shown when it is refused
HINTS: dict[str, str] = {
    "aten.native_dropout": "dropout in training mode draws random masks: call model.eval()",
    "aten.bernoulli": "random ops cannot be replayed in every column: call model.eval()",
    "aten.bernoulli_": "dropout in training mode draws random masks: call model.eval()",
    "aten.new_empty": (
        "new_empty filled by writes into its slices (circular padding: padding_mode="
        "'circular', F.pad(mode='circular'); nn.AdaptiveLogSoftmaxWithLoss.log_prob) is not "
        "replayed: build the tensor with torch.cat of its pieces (circular padding: "
        "torch.cat([x[..., -p:], x, x[..., :p]], -1) per dimension)"
    ),
}


def op(*names: str) -> Callable[[OpFn], OpFn]:
    """Register ``fn`` under the aten overload ``names``."""

    def register(fn: OpFn) -> OpFn:
        for name in names:
            if name in OPS and OPS[name] is not fn:  # two modules claiming one op: a merge slip
                raise RuntimeError(f"{name} is registered twice ({OPS[name].__module__}, {fn.__module__})")
            OPS[name] = fn
        return fn

    return register
