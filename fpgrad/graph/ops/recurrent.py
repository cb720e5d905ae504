"""The ops torch's recurrent layers add (nn.RNN, nn.LSTM, nn.GRU and their cells).

torch's CPU recurrent cells (``aten/src/ATen/native/RNN.cpp``) split the gate
pre-activations with ``unsafe_chunk`` (traced as ``unsafe_split``), apply ``sigmoid_`` /
``tanh_`` / ``add_`` / ``mul_`` in place to the pieces, and turn a ``batch_first`` output
around with ``transpose_``. fpgrad runs every in-place op as a new value; the rule that says
when that equals eager (the pieces of a fresh temporary) is
:func:`fpgrad.graph.ops.recurrent.split_piece_write_ok`, used by
:func:`fpgrad.graph.ops.unsupported_message`.
"""

from __future__ import annotations

import operator
from typing import Any

from fpgrad.graph import shapes
from fpgrad.graph.names import op_name
from fpgrad.graph.ops.registry import op
from fpgrad.graph.ops.shape import split, split_with_sizes

#: ops whose outputs (a list) are pairwise disjoint slices of their first argument
DISJOINT_SPLITS = frozenset({
    "aten.split.Tensor", "aten.unsafe_split.Tensor", "aten.split_with_sizes.default",
    "aten.unsafe_split_with_sizes.default", "aten.unbind.int",
})  # fmt: skip
#: ops whose output aliases their input (a write to it reaches the input's storage)
_ALIASING = {
    "aten.view", "aten._unsafe_view", "aten.reshape", "aten.t", "aten.transpose",
    "aten.permute", "aten.expand", "aten.slice", "aten.select", "aten.unsqueeze",
    "aten.squeeze", "aten.alias", "aten.detach", "aten.split", "aten.unsafe_split",
    "aten.split_with_sizes", "aten.unsafe_split_with_sizes", "aten.as_strided", "aten.unfold",
    "aten.diagonal", "aten.unbind", "aten.transpose_", "aten.t_", "aten.squeeze_",
    "aten.unsqueeze_", "aten.as_strided_", "aten.contiguous", "aten.reshape_as",
    "aten.view_as", "aten.expand_as",
}  # fmt: skip


@op("aten.unsafe_split.Tensor")
def unsafe_split(cx: Any, x: Any, size: int, dim: int = 0) -> list:
    """torch.split without autograd's view tracking: the same pieces."""
    return split(cx, x, size, dim)


@op("aten.unsafe_split_with_sizes.default")
def unsafe_split_with_sizes(cx: Any, x: Any, sizes: Any, dim: int = 0) -> list:
    return split_with_sizes(cx, x, sizes, dim)


@op("aten.transpose_.default")
def transpose_inplace(cx: Any, x: Any, a: int, b: int) -> Any:
    """The tensor's dims ``a`` and ``b`` swapped (a view: no value changes)."""
    return shapes.transpose(x, a, b)


@op("aten.sigmoid_.default")
def sigmoid_inplace(cx: Any, x: Any) -> Any:
    """sigmoid as a new value (the slot ``sigmoid``, as ``aten.sigmoid``)."""
    return cx.ar.sigmoid(x)


@op("aten.tanh_.default")
def tanh_inplace(cx: Any, x: Any) -> Any:
    return cx.ar.tanh(x)


def _inplace(node: Any) -> bool:
    key = str(node.target)
    return key.count(".") == 2 and key.split(".")[1].endswith("_")


def _fresh(node: Any) -> bool:
    """Whether ``node``'s output owns its storage: a call_function that is no view, no
    tuple element and no in-place op (its result is its input's storage)."""
    return (
        getattr(node, "op", None) == "call_function"
        and node.target is not operator.getitem
        and not _inplace(node)
        and op_name(node) not in _ALIASING
    )


def split_piece_write_ok(node: Any) -> bool:
    """Whether the in-place op ``node``, writing into piece ``i`` of a split of a fresh
    temporary, may run as a new value (the rest of the in-place rules hold separately: the
    piece itself is not read after the write nor through a view).

    ``node.args[0]``, after a chain of in-place ops each the only reader of its input, is
    ``p = getitem(s, i)`` with ``s`` one of :data:`DISJOINT_SPLITS` of ``b``, and:

    1. every user of ``s`` is a ``getitem`` and no other one takes index ``i``: the only
       alias of piece ``i`` in the graph is ``p``;
    2. ``s`` is ``b``'s only user and ``b`` is a fresh temporary (a call_function result that
       is no view, no tuple element; or a chain of in-place ops on one, each the only user
       of its input): nothing else aliases ``b``'s storage.

    Proof that the new value equals eager's result. The write changes exactly the elements
    of piece ``i`` (an elementwise in-place op on a tensor writes its own elements only).
    The split's pieces are pairwise disjoint slices of ``b``, so every other piece keeps the
    values it had: the graph's pieces ``j != i`` (computed before the write) are the eager
    values whenever they are read. ``b`` and the nodes of its in-place chain are read by
    nothing but the next node of the chain and ``s``, which ran before the write, so no node
    reads ``b``'s storage after it. Piece ``i`` is read after the write only through
    ``node`` (rule 1 and the general rule that ``p`` has no later reader and no view), whose
    graph value is the written value. Hence every node reads in the graph what it reads in
    eager. Anything else (a view of ``b``, a split of a view, a getitem of a multi-output
    op, a placeholder or buffer) is not proven here and stays refused."""
    if not node.args:
        return False
    base: Any = node.args[0]
    while hasattr(base, "op") and _inplace(base) and base.args:
        if len(base.users) != 1:
            return False
        base = base.args[0]
    if not hasattr(base, "op") or base.target is not operator.getitem:
        return False
    s, i = base.args[0], base.args[1]
    if not hasattr(s, "op") or str(s.target) not in DISJOINT_SPLITS:
        return False
    for u in s.users:
        if u.target is not operator.getitem or (u is not base and u.args[1] == i):
            return False
    b = s.args[0]
    if not hasattr(b, "op") or list(b.users) != [s]:
        return False
    while hasattr(b, "op") and _inplace(b) and b.args:
        b = b.args[0]
        if not hasattr(b, "op") or len(b.users) != 1:
            return False
    return _fresh(b)
