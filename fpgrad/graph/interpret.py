"""Run a captured graph in any number system (exact balls, mpmath, the emulated machines).

Nodes run in graph order (no recursion); each op is the function :data:`fpgrad.graph.ops.OPS`
registers for it, written once against the :class:`~fpgrad.arith.base.Arith` slots.
Floating tensors (parameters, inputs, targets, constants) enter the system through
``ar.asarray`` of their float64 values; integer tensors stay numpy integer arrays.

Long module: besides the interpreter loop, the rules for constants (which of torch's float64
values of a constant the exact systems may keep, what an in-place write on one leaves, when a
-inf mask's finite values are exact) live here, beside the loop that enters constants, since
each rule reads the loop's environment and its record of computed constants.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx

from fpgrad.arith.base import Arith, ExactDerivatives
from fpgrad.errors import InputError
from fpgrad.graph import shapes
from fpgrad.graph.capture import Graph, split_outputs
from fpgrad.graph.names import PASS_THROUGH, op_key
from fpgrad.graph.ops import OPS
from fpgrad.graph.ops._util import enter_integers, formula_fill, lowest_as_format


@dataclass
class GraphTrace:
    """Every node's value (arrays of the system), the loss, and gradients by parameter name."""

    system: str
    loss: Any
    grads: dict[str, Any]
    values: dict[str, Any] = field(default_factory=dict)
    #: tap name -> (value, gradient) (:data:`fpgrad.graph.capture.TAPS`)
    taps: dict[str, tuple[Any, Any]] = field(default_factory=dict)


@dataclass
class OpContext:
    """What an op sees besides its arguments: the system, its node, earlier values."""

    ar: Arith
    node: fx.Node
    env: dict[str, Any]
    graph: Graph

    def value(self, node: Any) -> Any:
        return self.env[node.name] if isinstance(node, fx.Node) else node

    def origin(self, i: int) -> fx.Node | None:
        """The node argument ``i`` came from, looking through detach/alias/clone."""
        node = self.node.args[i]
        while isinstance(node, fx.Node) and str(node.target) in PASS_THROUGH:
            node = node.args[0]
        return node if isinstance(node, fx.Node) else None

    def label(self) -> str:
        return self.graph.label(self.node)


def _enter(ar: Arith, value: Any) -> Any:
    """A float64 (or integer) numpy array or tensor as a value of the system."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        value = value.to(torch.float64).numpy() if value.is_floating_point() else value.numpy()
    arr = np.asarray(value)
    if arr.dtype.kind == "f":
        return ar.asarray(arr.astype(np.float64))
    return arr


_TORCH_ONLY = ("dtype", "layout", "device", "pin_memory", "memory_format")


def _enter_const(ar: Arith, value: Any, lowest: bool = False) -> Any:
    """A constant's value: finite floating arrays in the system; integers, booleans and
    arrays with infinities (additive -inf masks) as numpy arrays. ``lowest``: a fill of a
    backward formula (:func:`~fpgrad.graph.ops._util.formula_fill`), whose float64 maximum is
    the format's largest (:func:`~fpgrad.graph.ops._util.lowest_as_format`)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_enter_const(ar, v, lowest) for v in value)
    if not isinstance(value, torch.Tensor):
        return value
    arr = value.detach().numpy()
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            return arr
        if not lowest:
            return ar.asarray(arr)
        return ar.asarray(lowest_as_format(ar, arr))  # float64's max: the format's
    return arr.copy()


def _version(value: Any) -> Any:
    """The in-place version counters of a constant's tensors (views share their base's)."""
    if isinstance(value, (tuple, list)):
        return tuple(_version(v) for v in value)
    return value._version if isinstance(value, torch.Tensor) else None


#: fresh allocations whose values are undefined (torch's uninitialised memory): a constant of
#: one is zeros, so that what a later in-place write leaves is deterministic (the garbage's
#: NaN or inf sent the write's exact values back to torch's float64 ones, a wrong certificate)
_EMPTY = frozenset({"aten.empty.memory_format", "aten.empty_like.default",
                    "aten.new_empty.default", "aten.empty_strided.default",
                    "aten.new_empty_strided.default", "aten.empty_permuted.default"})  # fmt: skip

#: in-place ops whose out-of-place overload has another name
_INPLACE = {
    "aten.pow_.Scalar": "aten.pow.Tensor_Scalar",
    "aten.pow_.Tensor": "aten.pow.Tensor_Tensor",
}


def _out_of_place(key: str) -> str:
    """The registered out-of-place op an in-place one (``aten.exp_.default``) computes."""
    if key not in OPS and key.count(".") == 2 and key.split(".")[1].endswith("_"):
        a, name, overload = key.split(".")
        return _INPLACE.get(key, f"{a}.{name[:-1]}.{overload}")
    return key


def _exact_constant(
    ar: Arith, node: fx.Node, env: dict[str, Any], graph: Graph, value: Any, computed: set[str]
) -> Any:
    """Exact systems: the constant ``node`` computed in ``ar`` where it does arithmetic on
    constants (``pos_weight * t + 1 - t`` of BCE's backward against targets the loss holds,
    ``arange(4) / 3``, ``pe.exp_()``: an in-place op as its out-of-place one): torch's value of
    such a node is a rounding, not the real the graph defines, and the exact systems compute
    the model's real function. An integer input enters the system as its exact value; masks
    stay masks. None where torch's value stands: other systems, a result that is not a finite
    floating tensor, no floating or integer input (creation ops: zeros, arange; masks of
    comparisons), a non-finite input (an additive ``-inf`` mask), or an op the registry lacks
    whose values are all among what it read (a selection: ``diag_embed``, ``full_like``);
    such an op computing new values (``lgamma``) is refused (:func:`_selection`)."""
    if not isinstance(ar, ExactDerivatives):
        return None
    many = isinstance(value, (tuple, list)) and any(
        isinstance(v, torch.Tensor) and v.is_floating_point() for v in value
    )
    if not many and not (isinstance(value, torch.Tensor) and value.is_floating_point()):
        return None
    if not many and not bool(torch.isfinite(value).all()):
        return None
    reads = {n.name: env[n.name] for n in node.all_input_nodes}
    if any(_raw(v) and v.dtype.kind == "f" for v in reads.values()):
        return None  # a non-finite constant (_enter_const keeps it as numpy)
    ints: dict[str, Any] = {}
    if all(_raw(v) or v is None for v in reads.values()):  # no value of the system read
        ints = {k: v for k, v in reads.items() if _raw(v) and v.dtype.kind in "iu"}
        if not ints:
            return None  # torch's value is the definition (a creation op, a mask's selection)
        ints = {k: enter_integers(ar, v) for k, v in ints.items()}
        reads.update(ints)  # an integer tensor's arithmetic (``arange(4) / 3``): exact values
    key = op_key(node)
    if key == "aten.copy_.default":
        return None  # the write's value: :func:`_written`
    key = _out_of_place(key)  # ``exp_`` computes ``exp``
    if key not in OPS:
        return _selection(ar, node, env, graph, value, computed)
    cx = OpContext(ar, node, {**env, **ints} if ints else env, graph)
    args = fx.node.map_arg(node.args, lambda n: reads[n.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: reads[n.name])
    kwargs = {k: v for k, v in kwargs.items() if k not in _TORCH_ONLY}
    out = OPS[key](cx, *args, **kwargs)
    if many:  # split, unbind, sort of a constant: the system's values, or refused
        pairs = (
            list(zip(value, out, strict=True))
            if isinstance(out, (tuple, list)) and len(out) == len(value)
            else []
        )
        if not pairs or any(isinstance(t, torch.Tensor) and t.is_floating_point()
                            and (_raw(o) or tuple(shapes.shape(o)) != tuple(t.shape)) for t, o in pairs):  # fmt: skip
            return _selection(ar, node, env, graph, value, computed)
        return type(value)(out)
    if (
        isinstance(out, (tuple, list))
        or _raw(out)
        or tuple(shapes.shape(out)) != tuple(value.shape)
    ):
        return None  # the op kept torch's numbers (a selection of integers)
    return out


def _selection(
    ar: Arith, node: fx.Node, env: dict[str, Any], graph: Graph, value: Any, computed: set[str]
) -> None:
    """None where ``node`` reads only torch's own numbers (no constant the system computed:
    ``computed``) and every floating element of torch's ``value`` is one of the numbers it
    read (its inputs' values, its number arguments, 0): a selection, which torch computes
    exactly; else :class:`~fpgrad.errors.InputError`: torch's float64 value of an op the
    exact systems lack (``lgamma`` of a constant, ``diag`` of ``arange(4) / 3``) is a
    rounding of the real one."""
    fresh = any(n.name in computed for n in node.all_input_nodes)
    pool: list[np.ndarray] = [np.zeros(1)]
    for n in node.all_input_nodes:
        for v in env[n.name] if isinstance(env[n.name], (tuple, list)) else [env[n.name]]:
            if _raw(v) or isinstance(v, np.generic):
                pool.append(np.asarray(v, dtype=np.float64).ravel())
            elif v is not None and not isinstance(v, (bool, int, float)):
                pool.append(np.asarray(ar.to_float64(v), dtype=np.float64).ravel())
    nums: list[float] = []
    fx.node.map_aggregate((node.args, node.kwargs),
                          lambda a: nums.append(float(a)) if isinstance(a, (int, float)) else None)  # fmt: skip
    pool.append(np.asarray(nums, dtype=np.float64))
    have = np.concatenate(pool)
    outs = value if isinstance(value, (tuple, list)) else [value]
    for t in outs:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            got = t.detach().to(torch.float64).numpy().ravel()
            if fresh or not np.isin(got[np.isfinite(got)], have).all():
                why = (
                    "from a constant computed earlier in the forward (its values in torch are "
                    "not checked as exact here)"
                    if fresh
                    else "which the exact systems cannot compute (torch's float64 values are "
                    "roundings of the real ones)"
                )
                raise InputError(
                    f"{graph.label(node)}: a constant computed by {op_key(node)} {why}; compute "
                    "it before the model and pass it as a buffer or an input"
                )
    return None


def _raw(a: Any) -> bool:
    """A numpy array of torch's values (integers, masks, non-finite floats), not the system's."""
    return isinstance(a, np.ndarray) and a.dtype.kind != "O"


def _offsets(t: torch.Tensor) -> np.ndarray:
    """The storage element offset of each element of ``t`` (t's shape)."""
    n = t.untyped_storage().nbytes() // max(t.element_size(), 1)
    flat = torch.arange(n, dtype=torch.int64)
    return torch.as_strided(flat, t.shape, t.stride(), t.storage_offset()).numpy()


def _written(ar: Arith, node: fx.Node, env: dict[str, Any], consts: dict[str, Any]) -> Any:
    """Exact systems: the value ``copy_(dst, src)`` writes (src broadcast, same dtype), in the
    system; None for other writes (their own op computes it, :func:`_exact_constant`)."""
    if not isinstance(ar, ExactDerivatives) or op_key(node) != "aten.copy_.default":
        return None
    dst, src = node.args[0], node.args[1]
    if not (isinstance(dst, fx.Node) and isinstance(src, fx.Node)):
        return None
    v, d, s = env.get(src.name), consts.get(dst.name), consts.get(src.name)
    if v is None or _raw(v) or not isinstance(d, torch.Tensor):
        return None
    if not isinstance(s, torch.Tensor) or s.dtype != d.dtype:
        return None  # a cast into another format: torch's rounding is the definition here
    return shapes.expand(v, tuple(d.shape))


def _reread(
    ar: Arith,
    written: Any,
    exact: Any,
    consts: dict[str, Any],
    env: dict[str, Any],
    fed: set[str],
) -> list[str]:
    """After torch's in-place op on a constant (``pe[:, 0::2] = sin(..)``: ``copy_`` into a
    slice of a fresh ``zeros``), every constant sharing the written storage (the base, its
    views) is entered again: its system value was taken before the write, and the model's
    later readers of it (``x + pe``) read it after. Element by element (storage offsets):
    a written element takes ``exact`` (the system's value of the write, e.g. the exact sines;
    torch's where None), the others keep their system values. Placeholders (``fed``) keep
    the values given. Returns the names entered again."""
    if not isinstance(written, torch.Tensor):
        return []
    ptr = written.untyped_storage().data_ptr()
    src = exact if exact is not None else _enter_const(ar, written)
    w_off = _offsets(written).ravel()
    order = np.argsort(w_off, kind="stable")
    names = []
    for name, value in consts.items():
        if name in fed or name not in env or not isinstance(value, torch.Tensor):
            continue
        if value.untyped_storage().data_ptr() != ptr:
            continue
        names.append(name)
        old, fresh = env[name], _enter_const(ar, value)
        same = value.dtype == written.dtype and tuple(shapes.shape(old)) == tuple(value.shape)
        if (
            value is written
            and src is not None
            and not _raw(src)
            and (tuple(shapes.shape(src)) == tuple(value.shape))
        ):
            env[name] = src  # the op's own tensor (``unsqueeze_``: a new shape): its value
            continue
        if not same or any(_raw(a) for a in (old, src, fresh)):
            marks = _written_mask(value, w_off, order)[1] if same else None
            if isinstance(ar, ExactDerivatives) and fresh_is_rounded(
                old, src, written, value, marks
            ):
                raise InputError(
                    f"a constant holding -inf or NaN ({name}) is written in place with values the "
                    "exact systems compute (torch's float64 ones are roundings): keep the finite "
                    "table and the -inf mask apart (add the table to the scores, then "
                    "masked_fill(mask, float('-inf')) on the sum)"
                )
            env[name] = fresh  # torch's values (integers, masks, non-finite, other formats)
            continue
        hit, mask = _written_mask(value, w_off, order)
        if mask.any():
            flat = shapes.reshape(src, (-1,))
            picked = shapes.reshape(
                shapes.index(flat, (np.where(mask, hit, 0).ravel(),)), mask.shape
            )
            env[name] = ar.where(mask, picked, old)
    return names


def fresh_is_rounded(old: Any, src: Any, written: torch.Tensor, value: torch.Tensor,
                     mask: np.ndarray | None) -> bool:  # fmt: skip
    """Would torch's values after an in-place write replace exact values of the system? The
    written source's (``src``: the system's, where it is not torch's numbers) where it is not
    exactly torch's written floats, or the old system value's at the elements not written
    (``mask``: the written ones, where the shapes agree) where it is not exactly torch's."""
    from fpgrad.graph.exact_floats import equals_floats

    if src is not None and not _raw(src) and written.is_floating_point():
        if not equals_floats(src, written.detach().to(torch.float64).numpy()):
            return True
    if _raw(old) or old is None or mask is None or not value.is_floating_point():
        return False
    now = value.detach().to(torch.float64).numpy()
    keep = ~mask
    if not keep.any():
        return False
    flat = shapes.reshape(old, (-1,))
    idx = np.nonzero(keep.ravel())[0]
    return not equals_floats(shapes.index(flat, (idx,)), now.ravel()[idx])


#: ops whose every output element is one of their inputs' elements or number arguments (or 0):
#: for these, torch's values of a constant are exact when those elements are
_SELECTS = {"where", "masked_fill", "constant_pad_nd", "fill", "full_like", "clamp", "clamp_min",
            "clamp_max", "maximum", "minimum", "max", "min", "amax", "amin", "sort", "topk",
            "cummax", "cummin", "triu", "tril", "index", "index_select", "gather", "cat", "stack",
            "flip", "roll", "repeat", "expand", "view", "_unsafe_view", "reshape", "permute",
            "transpose", "t", "unsqueeze", "squeeze", "slice", "select", "clone", "alias",
            "detach", "lift_fresh_copy", "_to_copy", "contiguous", "relu", "diagonal",
            "diag_embed", "index_put", "scatter", "masked_scatter", "unfold", "split",
            "split_with_sizes", "unbind", "narrow", "zeros_like", "ones_like", "empty_like", "full",
            "new_full", "scalar_tensor", "zeros", "ones", "new_zeros", "new_ones", "nan_to_num"}  # fmt: skip


#: the most elements a constant checked in Arb may have (:func:`_probe`)
PROBE_MAX = 1 << 16


def _floats(ar: Arith, v: Any) -> np.ndarray | None:
    """The float64 numbers the system value ``v`` is exactly (None where it is not)."""
    from fpgrad.graph.exact_floats import equals_floats

    if v is None or isinstance(v, (tuple, list, bool, int, float)):
        return None
    try:
        floats = np.asarray(ar.to_float64(v), dtype=np.float64)
    except (TypeError, ValueError, AttributeError):
        return None
    return floats if equals_floats(v, floats) else None


_SUMS = ("aten.add.Tensor", "aten.sub.Tensor")


def _sum_probe(
    ar: Arith, node: fx.Node, env: dict[str, Any], value: torch.Tensor, key: str
) -> bool | None:
    """:func:`_probe` of ``a + b`` / ``a - b`` (alpha 1) on float64 numbers by
    :func:`~fpgrad.graph.exact_floats.sum_is_exact` (a causal mask plus an ALiBi table of any
    size); None where it does not apply (then the Arb probe)."""
    from fpgrad.graph.exact_floats import sum_is_exact

    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2 or not value.is_floating_point():
        return None
    ops = []
    for a in node.args:
        if isinstance(a, fx.Node):
            v = env[a.name]
            if _raw(v):  # torch's numbers: integers and booleans only where float64 holds them
                floats = v.astype(np.float64)
                if v.dtype.kind != "f" and not np.array_equal(floats.astype(v.dtype), v):
                    return None
            else:
                floats = _floats(ar, v)
            if floats is None:
                return None
            ops.append(np.asarray(floats, dtype=np.float64))
        elif isinstance(a, (int, float)) and not isinstance(a, bool):
            ops.append(np.asarray(float(a)))
        else:
            return None
    b = -ops[1] if key == "aten.sub.Tensor" else ops[1]
    return sum_is_exact(ops[0], b, value.detach().to(torch.float64).numpy())


def _probe(
    ar: Arith, node: fx.Node, env: dict[str, Any], graph: Graph, consts: dict[str, Any]
) -> bool:
    """Is torch's value of the constant ``node`` exactly the real one at each of its finite
    elements? The op runs in Arb at 4096 bits (exact on sums and products of float64 numbers)
    on exactly torch's values of its inputs: a non-finite constant read (torch's numbers, with
    -inf or NaN) as Arb's exact infinities (``exp(-inf)`` and ``1 / inf`` are exactly 0 there,
    ``atan(-inf)`` a ball: refused), a value of the system only where it is exactly float64
    numbers (read before an in-place write). False where
    the op is missing or fails, or the constant has more than :data:`PROBE_MAX` elements."""
    from fpgrad.arith.arb import ArbArith
    from fpgrad.graph.exact_floats import all_non_finite, equals_floats

    value = consts[node.name]
    outs = list(value) if isinstance(value, (tuple, list)) else [value]
    key = _out_of_place(op_key(node))
    if key in _SUMS and isinstance(value, torch.Tensor):  # any size: a vectorised TwoSum
        got = _sum_probe(ar, node, env, value, key)
        if got is not None:
            return got
    if sum(t.numel() for t in outs if isinstance(t, torch.Tensor)) > PROBE_MAX:
        return False
    if key not in OPS:
        return False
    arb = ArbArith(4096)
    reads: dict[str, Any] = {}
    for n in node.all_input_nodes:
        v = env[n.name]
        if _raw(v) and v.dtype.kind == "f":
            reads[n.name] = arb.asarray(v)  # exact infinities: exp(-inf) = 1 / inf = 0
        elif _raw(v) or v is None:
            reads[n.name] = v
        else:
            floats = _floats(ar, v)
            if floats is None:
                return False  # the system's value is no float64 numbers: no exact input
            reads[n.name] = arb.asarray(floats)
    try:
        args = fx.node.map_arg(node.args, lambda n: reads[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: reads[n.name])
        kwargs = {k: v for k, v in kwargs.items() if k not in _TORCH_ONLY}
        out = OPS[key](OpContext(arb, node, {**env, **reads}, graph), *args, **kwargs)
        got = list(out) if isinstance(out, (tuple, list)) else [out]
        if len(got) != len(outs):
            return False
        for t, o in zip(outs, got, strict=True):
            if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                continue
            if _raw(o) or tuple(shapes.shape(o)) != tuple(t.shape):
                return False
            now = t.detach().to(torch.float64).numpy().ravel()
            idx = np.nonzero(np.isfinite(now))[0]
            flat = shapes.reshape(o, (-1,))
            if not equals_floats(shapes.index(flat, (idx,)), now[idx]):
                return False
            inf = np.nonzero(~np.isfinite(now))[0]  # an overflow of finite inputs: refused
            if inf.size and not all_non_finite(shapes.index(flat, (inf,))):
                return False
        return True
    except Exception:  # noqa: BLE001 - any failure of the probe is a refusal, never a claim
        return False


def non_finite_exact(ar: Arith, node: fx.Node, env: dict[str, Any], graph: Graph,
                     consts: dict[str, Any], computed: set[str]) -> None:  # fmt: skip
    """A constant with -inf or NaN, or computed from one, stays torch's numbers: sound only
    where each finite element is exactly the real one. Either the op, run in the system on
    its inputs (:func:`_probe`), gives exactly torch's finite values (``triu`` of a filled
    table, ``t + mask`` of zeros), or the op is a selection (:data:`_SELECTS`; an op the
    registry lacks) and each finite element is one of the exact numbers it read
    (``masked_fill(t, m, -inf)``, ``where(m, t, -inf)``; an input the system computed counts
    only where its values are exactly torch's floats). Otherwise (``where(m, arange / 3,
    -inf)``: torch's 1/3 is a rounding; ``exp(mask + 0.5)``; ``log`` of a table whose rounded
    logarithm happens to equal one of its entries) InputError, one line. The value a
    ``copy_`` writes is judged by :func:`_reread`."""

    value = consts[node.name]
    many = isinstance(value, (tuple, list))
    if not any(
        isinstance(t, torch.Tensor) and t.is_floating_point() for t in (value if many else [value])
    ):
        return
    key = op_key(node)
    if key == "aten.copy_.default" or _probe(ar, node, env, graph, consts):
        return
    base = key.split(".")[1] if key.count(".") == 2 else key
    selects = base.rstrip("_") in _SELECTS or key not in OPS  # (fill_: fill)
    rounded = [
        n.name
        for n in node.all_input_nodes  # read before an in-place write: env's
        if n.name in computed and not _raw(env[n.name]) and _floats(ar, env[n.name]) is None
    ]
    try:
        if not selects:
            raise InputError(key)
        _selection(ar, node, env, graph, value, set(rounded))
    except InputError:
        raise InputError(
            f"{graph.label(node)}: a constant holding -inf or NaN, or computed from one, whose "
            f"finite values are not exactly the real ones ({key}: torch's float64 values are "
            "roundings); the exact systems hold such a mask only with exact finite values; keep "
            "the finite table and the -inf mask apart (add the table to the scores, then "
            "masked_fill(mask, float('-inf')) on the sum), or pass it as an input"
        ) from None


def _written_mask(
    value: torch.Tensor, w_off: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(for each element of ``value``, the index of the written element at its storage offset;
    whether the write, storage offsets ``w_off`` sorted by ``order``, reached it)."""
    off = _offsets(value)
    if not w_off.size:
        return np.zeros(off.shape, dtype=np.int64), np.zeros(off.shape, dtype=bool)
    hit = order[np.clip(np.searchsorted(w_off, off, sorter=order), 0, w_off.size - 1)]
    return hit, w_off[hit] == off


def _integer_op(node: fx.Node, env: dict[str, Any]) -> Any:
    """torch's own result where ``node`` reads only integer or boolean arrays and gives
    integers or booleans (``(z > 0).to(uint8) - 1``, ``argmax - 1``, ``mask + mask``): torch's
    integer semantics (wrap-around in the dtype, bool + bool an or, type promotion) exactly,
    in every system; None otherwise (the op's own function runs)."""
    reads = [env[n.name] for n in node.all_input_nodes]
    if not reads or not all(isinstance(v, (np.ndarray, np.generic)) and np.asarray(v).dtype.kind in "biu"
                            for v in reads):  # fmt: skip
        return None

    def tensor(n: fx.Node) -> torch.Tensor:
        return torch.from_numpy(np.array(env[n.name], copy=True))

    try:
        out = node.target(
            *fx.node.map_arg(node.args, tensor), **fx.node.map_arg(node.kwargs, tensor)
        )
    except (RuntimeError, TypeError):
        return None
    many = isinstance(out, (tuple, list))
    outs = list(out) if many else [out]
    if not outs or not all(isinstance(o, torch.Tensor) and not (o.is_floating_point() or o.is_complex())
                           for o in outs):  # fmt: skip
        return None
    arrays = [o.numpy().copy() for o in outs]
    return tuple(arrays) if many else arrays[0]


def _cast_reads(
    node: fx.Node, env: dict[str, Any], where: dict[str, Arith], here: Arith
) -> dict[str, Any]:
    """The floating arrays ``node`` reads from another system, rounded into ``here``
    (systems of float64 arrays), by node name."""
    out: dict[str, Any] = {}
    for n in node.all_input_nodes:
        src, v = where.get(n.name, here), env[n.name]
        if src is not here and isinstance(v, np.ndarray) and v.dtype.kind == "f":
            out[n.name] = here.asarray(src.to_float64(v))
    return out


def interpret(
    graph: Graph,
    ar: Arith,
    params: dict[str, Any] | None = None,
    keep: bool = True,
    settle: Callable[[fx.Node, Any], Any] | None = None,
    systems: dict[str, Arith] | None = None,
    data: Arith | None = None,
) -> GraphTrace:
    """Evaluate ``graph`` in ``ar``. ``params`` (name -> arrays of ``ar``) replaces the
    captured float64 values; ``keep=False`` drops intermediate values once read;
    ``settle(node, value)`` may replace each op's value (the exact reference sets the zeros
    that :mod:`fpgrad.graph.identities` proves). ``systems``: node name -> the system that op
    computes in (systems of float64 arrays, e.g. emulated machines; others: ``ar``), a floating
    input from another system rounded into it first; ``data``: the system the inputs and
    targets are stored in (default ``ar``)."""
    feeds: list[Any] = [
        params[n] if params is not None else _enter(ar, graph.params[n]) for n in graph.param_names
    ]
    feeds += [_enter(data or ar, x) for x in (*graph.inputs, graph.targets)]
    where: dict[str, Arith] = {}  # with systems: the system of each value
    if systems is not None:
        where = {n.name: ar for n in graph.gm.graph.nodes if n.op == "placeholder"}
        for n in list(where)[len(graph.param_names) :]:
            where[n] = data or ar
    raw = [*(graph.params[n] for n in graph.param_names), *graph.inputs, graph.targets]
    env: dict[str, Any] = {}
    consts: dict[str, Any] = {}  # torch values of nodes that read no floating data
    # the version counters of the constants' tensors when they entered the system: a later
    # in-place write (``pe[:, 0::2] = sin(...)`` is ``copy_`` into a slice of ``zeros``) changes
    # what eager reads from the tensor afterwards, so a reader re-enters it
    versions: dict[str, Any] = {}
    computed: set[str] = set()  # constants whose values the system computed (not torch's)
    placeholders = iter(zip(feeds, raw, strict=True))
    out_node = None
    constants = graph.constants
    where_fed = {n.name for n in graph.gm.graph.nodes if n.op == "placeholder"}
    for node in graph.gm.graph.nodes:
        if node.op == "placeholder":
            env[node.name], value = next(placeholders)
            if np.asarray(value).dtype.kind != "f":  # a copy: in-place ops must not reach it
                consts[node.name] = torch.from_numpy(np.array(value, copy=True))
        elif node.op == "get_attr":
            consts[node.name] = getattr(graph.gm, str(node.target)).clone()
            env[node.name] = _enter_const(ar, consts[node.name])
        elif node.op == "output":
            out_node = node
        elif node.name in constants:
            # a constant (a mask, a position table): torch computes it once, in float64
            consts[node.name] = node.target(
                *fx.node.map_arg(node.args, lambda n: consts[n.name]),
                **fx.node.map_arg(node.kwargs, lambda n: consts[n.name]),
            )
            if op_key(node) in _EMPTY and isinstance(consts[node.name], torch.Tensor):
                consts[node.name].zero_()  # uninitialised memory: deterministic zeros
            env[node.name] = _enter_const(ar, consts[node.name], formula_fill(graph, node))
            versions[node.name] = _version(consts[node.name])
            exact = _exact_constant(ar, node, env, graph, consts[node.name], computed)
            if exact is not None:
                env[node.name] = exact
                computed.add(node.name)
            elif isinstance(ar, ExactDerivatives) and (_raw(env[node.name]) or any(
                    _raw(env[n.name]) and env[n.name].dtype.kind == "f" for n in node.all_input_nodes)):  # fmt: skip
                non_finite_exact(ar, node, env, graph, consts, computed)
            if op_key(node).count(".") == 2 and op_key(node).split(".")[1].endswith("_"):
                wrote = exact if exact is not None else _written(ar, node, env, consts)
                for name in _reread(ar, consts[node.name], wrote, consts, env, where_fed):
                    versions[name] = _version(consts[name])
                    if wrote is not None or name in computed:
                        computed.add(name)
        else:
            for n in node.all_input_nodes:  # a constant written in place since it was entered
                if n.name in versions and _version(consts[n.name]) != versions[n.name]:
                    env[n.name] = _enter_const(ar, consts[n.name])
                    versions[n.name] = _version(consts[n.name])
            here = ar if systems is None else systems.get(node.name, ar)
            cast = {} if systems is None else _cast_reads(node, env, where, here)
            cx = OpContext(here, node, env, graph)
            args = fx.node.map_arg(node.args, lambda n, c=cast: c.get(n.name, env[n.name]))
            kwargs = fx.node.map_arg(node.kwargs, lambda n, c=cast: c.get(n.name, env[n.name]))
            kwargs = {k: v for k, v in kwargs.items() if k not in _TORCH_ONLY}
            done = _integer_op(node, env)
            env[node.name] = OPS[op_key(node)](cx, *args, **kwargs) if done is None else done
            if systems is not None:
                where[node.name] = here
            if settle is not None:
                env[node.name] = settle(node, env[node.name])
    assert out_node is not None
    outs = fx.node.map_arg(out_node.args[0], lambda n: env[n.name])
    flat = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    loss, grads, taps = split_outputs(graph, flat)
    return GraphTrace(
        system=ar.name,
        loss=loss,
        grads=dict(zip(graph.param_names, grads, strict=True)),
        values=env if keep else {},
        taps=taps,
    )
