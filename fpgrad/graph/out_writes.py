"""Writes through ``out=`` into a model's buffers (``F.normalize(.., out=u)`` of spectral_norm's
power iteration in training mode, ``aten.div.out``).

make_fx records such a write as the op's node, which later readers read (the written value),
while a ``get_attr`` of the buffer holds the tensor as the trace left it: written. The capture
gives each such buffer back its value before the trace (:func:`restore_out_targets`), so the
reads before the write see what eager reads; a ``get_attr`` read after the write would then
see the old value, and is refused (:func:`out_written_reads`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from fpgrad.errors import InputError


def restore_out_targets(gm: fx.GraphModule, before: dict[int, torch.Tensor]) -> None:
    """Give each buffer an op wrote through ``out=`` (``F.normalize(.., out=u)`` of
    spectral_norm's power iteration in training) back its value before the trace: the graph
    reads it as a ``get_attr`` before the write, and the op's node holds the written value
    (a buffer read after its write is refused: :func:`out_written_reads`)."""
    for node in gm.graph.nodes:
        target = node.kwargs.get("out") if node.op == "call_function" else None
        if isinstance(target, fx.Node) and target.op == "get_attr":
            value = getattr(gm, str(target.target), None)
            old = before.get(id(value)) if isinstance(value, torch.Tensor) else None
            if old is None or value is None or old.shape != value.shape:
                raise InputError(
                    f"{node.target} writes through out= into {target.target}, a tensor that is "
                    "not one of the model's buffers: its value before the write is not known; "
                    "compute a new tensor instead of writing into one"
                )
            with torch.no_grad():
                value.copy_(old)


def out_written_reads(graph: Any) -> list[Any]:
    """Nodes reading a buffer (``get_attr``) after an op wrote it through ``out=``: the graph
    holds the buffer's value before the write (:func:`restore_out_targets` restores it), which the node would read where eager reads the written one."""
    written: set[Any] = set()
    bad = []
    for node in graph.gm.graph.nodes:
        if node.op == "get_attr" and node.target in written:
            bad += [u for u in node.users if u.kwargs.get("out") is not node or u.args.count(node)]
        target = node.kwargs.get("out") if node.op == "call_function" else None
        if getattr(target, "op", None) == "get_attr":
            written.add(target.target)
    return bad
