"""Names of graph nodes: the registry key (``aten.addmm.default``) and the op (``aten.addmm``)."""

from __future__ import annotations

import operator

from torch import fx

#: ops that pass their input through unchanged (no value of their own)
PASS_THROUGH = frozenset({"aten.detach.default", "aten.alias.default", "aten.clone.default"})


def origin(node: object) -> object:
    """``node`` looking through detach, alias and clone (:data:`PASS_THROUGH`)."""
    while isinstance(node, fx.Node) and str(node.target) in PASS_THROUGH:
        node = node.args[0]
    return node


def op_name(node: fx.Node) -> str:
    """``aten.addmm`` for an aten node (overload dropped), ``getitem`` for tuple access."""
    if node.target is operator.getitem:
        return "getitem"
    return str(node.target).rsplit(".", 1)[0]


def op_key(node: fx.Node) -> str:
    """The registry key of a node: ``aten.addmm.default``."""
    return "getitem" if node.target is operator.getitem else str(node.target)


#: ops that only move or alias values (no arithmetic, no rounding: a cast is not one of them)
MOVES = frozenset({
    "aten.t", "aten.view", "aten._unsafe_view", "aten.reshape", "aten.permute", "aten.transpose",
    "aten.expand", "aten.squeeze", "aten.unsqueeze", "aten.detach", "aten.alias", "aten.clone",
})  # fmt: skip
