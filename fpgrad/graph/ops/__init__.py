"""The aten ops fpgrad implements, each once, against the number-system interface.

``OPS`` maps an aten overload name (``aten.addmm.default``) to a function
``fn(cx, *args, **kwargs)``: ``cx`` is the :class:`~fpgrad.graph.interpret.OpContext` (the
number system ``cx.ar``, the node, the nodes its arguments came from), the arguments are the
node's with every input node replaced by its value (arrays of the system; integer tensors as
numpy integer arrays; Python scalars as given).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

from fpgrad.graph.names import op_key, op_name
from fpgrad.graph.ops.registry import HINTS, OPS, OpFn, op

if TYPE_CHECKING:
    from fpgrad.graph.capture import Graph

__all__ = ["HINTS", "OPS", "OpFn", "op", "unsupported_message"]

_VIEWS = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice",
          "select", "unsqueeze", "squeeze", "alias", "detach", "split", "as_strided",
          "unfold", "diagonal", "unbind", "split_with_sizes", "unsafe_split",
          "unsafe_split_with_sizes", "transpose_"}  # fmt: skip


_READS_NEG_INF = {"aten._softmax.default", "aten.masked_fill.Scalar", "aten.masked_fill_.Scalar"}


def _neg_inf(node: Any) -> bool:
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
    return isinstance(value, float) and value == float("-inf")


def _inplace(node: Any) -> bool:
    key = op_key(node)
    return key.count(".") == 2 and key.split(".")[1].endswith("_")


def _aliased_write(node: Any, constants: set[str]) -> str:
    """Why the in-place op ``node`` cannot run as a new value ('' when it can): it writes
    through a view or a detached alias (the base it shares storage with keeps its old value
    in the graph), or into a buffer (a ``get_attr`` tensor) that something else reads: the
    graph holds the buffer's value after the traced forward wrote it. Constants the forward
    creates (a float mask filled in place) are computed by torch in graph order: faithful."""
    if not _inplace(node) or not node.args or not hasattr(node.args[0], "op"):
        return ""
    chain, base = [node], node.args[0]
    while _inplace(base) and base.args and hasattr(base.args[0], "op"):
        chain.append(base)
        base = base.args[0]
    if (
        node.name not in constants  # torch computes constants, views sharing storage as eager
        and base.op == "call_function"
        and _is_view(base)
        and not split_piece_write_ok(node)  # a piece of a split of a fresh temporary: proven
    ):
        return "it writes through a view or a detached alias; write into a copy (clone())"
    if base.op == "get_attr":
        members = {n.name for n in chain} | {base.name}
        readers = [u for n in (base, *chain) for u in n.users if u.name not in members]
        if any(not _inplace(u) for u in readers):
            return "it writes into a buffer that is read; write into a copy"
    return ""


def _is_view(node: Any) -> bool:
    """``node`` shares storage with another value: a view op, or an item of a view op's list
    (``split``, ``unbind``); an item of another op's tuple (a batch norm's output, a
    max-pool's values) is that op's own fresh tensor."""
    if node.target is operator.getitem:
        src = node.args[0]
        return not hasattr(src, "op") or src.op != "call_function" or _is_view(src)
    return op_name(node).removeprefix("aten.") in _VIEWS


def split_piece_write_ok(node: Any) -> bool:
    """:func:`fpgrad.graph.ops.recurrent.split_piece_write_ok` (imported late: ops register)."""
    from fpgrad.graph.ops.recurrent import split_piece_write_ok as ok

    return ok(node)


#: batch norms that, in training mode, update their running statistics (args 3 and 4) in
#: place although their schemas mark no write
_BN_UPDATES = {"aten.native_batch_norm.default", "aten._native_batch_norm_legit.default"}
_BN_BACKWARD = "aten.native_batch_norm_backward.default"


def _stat_key(node: Any) -> Any:
    """What identifies a tensor's storage in the graph: a buffer's attribute name (each read
    is its own get_attr node), else the node."""
    return ("attr", node.target) if getattr(node, "op", None) == "get_attr" else node


def _running_stat_reads(graph: Graph) -> list[Any]:
    """Live nodes that read a running statistic a training-mode batch norm updates in place.
    The graph holds a buffer (``get_attr``) as the traced forward left it: updated by torch
    in float64, a rounded constant, where eager reads the old value before the update and its
    own dtype's update after it, and the exact reference would read neither the old value nor
    the real update; any other node holds its value before the update. So every such read is
    refused, except by a training batch norm's forward and backward (they do not read the
    statistics' values) and by nodes no output (loss, gradient) depends on (instance norm's
    mean of its updated copy, written back): they change nothing certified."""
    stats = set()
    for node in graph.ops:
        if op_key(node) in _BN_UPDATES and len(node.args) > 5 and bool(node.args[5]):
            stats |= {_stat_key(a) for a in node.args[3:5] if hasattr(a, "op")}
    if not stats:
        return []
    live: set[Any] = set()  # the nodes the outputs (loss, gradients) depend on
    todo = [n for n in graph.gm.graph.nodes if n.op == "output"]
    while todo:
        n = todo.pop()
        if n not in live:
            live.add(n)
            todo.extend(n.all_input_nodes)
    bad = []
    for node in graph.gm.graph.nodes:
        if _stat_key(node) not in stats:
            continue
        for u in node.users:
            key = op_key(u) if u.op == "call_function" else ""
            train = (key in _BN_UPDATES and len(u.args) > 5 and bool(u.args[5])) or (
                key == _BN_BACKWARD and len(u.args) > 7 and bool(u.args[7])
            )
            own = [i for i, a in enumerate(u.args) if a is node]
            only_stats = own and all(i in (3, 4) for i in own) and node not in u.kwargs.values()
            if u in live and not (train and only_stats):
                bad.append(u)
    return bad


from fpgrad.graph.out_writes import out_written_reads  # noqa: E402


def unsupported_message(graph: Graph) -> str:
    """One line naming every unsupported op with its module paths, or ''."""
    missing: dict[str, list[str]] = {}
    constants = graph.constants
    for node in graph.ops:
        if op_key(node) not in OPS and node.name not in constants:
            where = missing.setdefault(op_key(node), [])
            path = graph.paths.get(node.name, "") or "<top>"
            if path not in where:
                where.append(path)
    order = {n.name: i for i, n in enumerate(graph.gm.graph.nodes)}
    for node in graph.ops:  # an in-place op writing through an alias or into a buffer
        why = _aliased_write(node, constants)
        if why:
            where = missing.setdefault(op_key(node), [])
            where.append(f"{graph.paths.get(node.name, '') or '<top>'} ({why})")
    for node in graph.ops:  # an in-place op runs as a new value: its input must not be read later
        key = op_key(node)
        inplace = _inplace(node)
        if inplace and node.name not in constants and node.args:
            src = node.args[0]
            users = [u for u in getattr(src, "users", {}) if u is not node]
            later = [u for u in users if order[u.name] > order[node.name]]
            views = [u for u in users if op_name(u).removeprefix("aten.") in _VIEWS]
            if later or views:
                where = missing.setdefault(key, [])
                where.append(f"{graph.paths.get(node.name, '') or '<top>'} (its input is read "
                             "after the in-place op or through a view)")  # fmt: skip
    for node in out_written_reads(graph):
        where = missing.setdefault(f"{op_key(node)} reading a buffer written through out=", [])
        where.append(graph.paths.get(node.name, "") or "<top>")
    for node in _running_stat_reads(graph):
        where = missing.setdefault(f"{op_key(node)} reading a batch norm's running statistic", [])
        where.append(graph.paths.get(node.name, "") or "<top>")
    for node in graph.ops:  # -inf from masked_fill is a mask: only softmax may read it
        if (
            op_key(node).startswith("aten.masked_fill")
            and _neg_inf(node)
            and (node.name not in constants)
        ):
            for user in node.users:
                if op_key(user) not in _READS_NEG_INF:
                    where = missing.setdefault(f"{op_key(user)} reading masked_fill(-inf)", [])
                    where.append(graph.paths.get(user.name, "") or "<top>")
    if not missing:
        return ""
    parts = []
    for key, where in missing.items():
        name = key.rsplit(".", 1)[0]
        hint = HINTS.get(name.removesuffix("_backward"), "not implemented yet")
        if key in OPS:  # implemented: refused for its in-place write alone
            hint = "fpgrad runs an in-place op as a new value"
        if key.endswith(".out") and key not in OPS:
            hint = (
                "it writes into a tensor given as out=: only torch.div's out= (F.normalize, "
                "spectral_norm's power iteration) is replayed; compute a new tensor instead"
            )
        if key.endswith("reading masked_fill(-inf)"):
            hint = "-inf is a mask that only softmax reads"
            if key.startswith("aten._log_softmax"):  # F.cross_entropy of masked logits
                hint += (
                    "; for a cross-entropy over masked logits (SimCLR's self-similarity) fill "
                    "with torch.finfo(x.dtype).min instead: its weight underflows to 0 in every "
                    "torch dtype, and the exact reference keeps its real, tiny value"
                )
        if key.endswith("written through out="):
            hint = (
                "the graph reads the buffer's value before the write; read the op's result instead"
            )
        if key.endswith("running statistic"):
            hint = (
                "a training batch norm updates it in place, unannotated: the graph holds "
                "only the updated value, so a read of it cannot be replayed"
            )
        parts.append(f"{key} in {', '.join(where)} ({hint})")
    return (
        f"unsupported ops ({len(missing)}): "
        + "; ".join(parts)
        + "; see docs/howto/torch-models.md for the supported ops"
    )


# register the ops (imports for their side effect)
from fpgrad.graph.ops import (  # noqa: E402, F401
    attention,
    bags,
    bicubic,
    blend,
    conv,
    cumulative,
    distance,
    fills,
    grid_sample,
    index,
    linear,
    loss,
    losses2,
    norm,
    norms,
    ordering,
    pointwise,
    products,
    recurrent,
    reduce,
    resample,
    scatter_reduce,
    select,
    shape,
    smooth,
    steps,
    trig,
)
