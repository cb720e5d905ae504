"""Cancellation proven from linear structure: ``a + alpha b`` (or a sum over a ``cat``'s axis)
that is exactly 0 everywhere.

Each floating node gets a *linear form*: its exact value as a sum ``sum_k c_k T_k`` with
rational coefficients ``c_k`` and *terms* ``T_k``, each term a node the form does not look into
(an *atom*) under a chain of linear ops. Where ``a + alpha b`` (or ``a - alpha b``) has the empty
form, every coefficient cancelled, and the output is exactly 0 wherever the atoms are finite,
whatever their values: the gradient of a bias shared by the two branches of a Siamese network
(``sum(g) + sum(-g)``), ``y - y.detach()``.

**Forms** (each an identity of real numbers; anything else is an atom):

* ``neg``: ``-1`` times; ``x * c``, ``x / c`` with a finite Python number ``c``: the exact
  rational of ``c`` (``c != 0`` to divide), unless the exact systems multiply by another real
  there (``literal``: torch's float64 ``fl(1 - w)`` of lerp's backward read as ``1 - w``, and
  the other derived constants of :mod:`fpgrad.graph.ops.derived`): such a product is an atom;
* ``a + alpha b``, ``a - alpha b`` (two tensors, ``alpha`` finite): the sum of the forms, an
  operand broadcast to the output's shape first wrapped in that broadcast;
* detach, alias, clone, contiguous: the same values, the same form;
* views and reductions (view, reshape, transposes, permute, (un)squeeze, expand, select,
  slice, sum, mean) are linear: ``L(sum c_k T_k) = sum c_k L(T_k)``, a term per (op, its
  non-tensor arguments, term); a sum over the axis of a ``cat`` is the sum of its pieces'
  sums (the triplet loss's shared bias: ``cat([g1 + g2, -g1, -g2])`` summed over the batch);
* ``mm``, ``bmm`` and ``mul`` of two tensors are bilinear: the products of the terms (``mul``'s
  pair in a fixed order: it commutes).

Terms are interned to integers, so a form is a small dict ``{term id: Fraction}``; a form of more
than :data:`MAX_TERMS` terms is an atom. Atoms are nodes, so two reads of a node must see one
value: a node that shares storage (through views) with the target of an in-place op has no
form (no cancellation is claimed through it). The exact reference still checks that every
enclosure it sets to 0 contains 0 (:func:`fpgrad.graph.exact.settle_zeros`), and leaves
non-finite ones (``-inf - -inf``) as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
from torch import fx

from fpgrad.graph.names import op_key
from fpgrad.graph.ops import _inplace, _is_view

MAX_TERMS = 16
Form = dict[int, Fraction]

_SAME = {"aten.detach.default", "aten.alias.default", "aten.clone.default",
         "aten.contiguous.default", "aten.lift_fresh_copy.default"}  # fmt: skip
_LINEAR = {
    "aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.t.default",
    "aten.transpose.int", "aten.permute.default", "aten.unsqueeze.default",
    "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default", "aten.expand.default",
    "aten.select.int", "aten.slice.Tensor", "aten.sum.dim_IntList", "aten.sum.default",
    "aten.mean.dim", "aten.mean.default",
}  # fmt: skip
_BILINEAR = {"aten.mm.default", "aten.bmm.default", "aten.mul.Tensor"}
_SCALE = {"aten.mul.Tensor", "aten.mul.Scalar", "aten.div.Tensor", "aten.div.Scalar"}
_SUMS = {"aten.add.Tensor", "aten.sub.Tensor"}
#: views beyond :func:`fpgrad.graph.ops._is_view`'s (outputs sharing their input's storage)
_MORE_VIEWS = {"aten.narrow.default", "aten.view_as_real.default"}


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor) and val.is_floating_point():
        return tuple(int(s) for s in val.shape)
    return None


def _number(x: Any) -> Fraction | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return Fraction(x)


def _written(graph: fx.Graph) -> set[str]:
    """Names of nodes sharing storage, through views, with the target of an in-place op."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    targets = []
    for node in graph.nodes:
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        key, base = op_key(node), node.args[0]
        if _is_view(node) or key in _MORE_VIEWS or key == "getitem" or _inplace(node):
            parent.setdefault(node.name, node.name)
            parent.setdefault(base.name, base.name)
            parent[find(node.name)] = find(base.name)  # the output aliases its first argument
        if _inplace(node):
            targets.append(base.name)
    roots = {find(t) for t in targets}
    return {n for n in parent if find(n) in roots}


class LinearForms:
    """Linear forms of a graph's floating nodes, computed on demand and cached."""

    def __init__(self, graph: fx.Graph, literal: Callable[[fx.Node], bool] | None = None) -> None:
        #: does the exact reference multiply by this scale node's Python number itself?
        self._literal = literal or (lambda node: True)
        self._written = _written(graph)
        self._forms: dict[str, Form | None] = {}
        self._ids: dict[tuple, int] = {}

    def cancels(self, node: fx.Node) -> bool:
        """Is ``node`` (``a + alpha b``, ``a - alpha b``, or a sum over a ``cat``'s axis)
        exactly 0 by its linear form?"""
        if op_key(node) in _SUMS:
            if not all(isinstance(a, fx.Node) for a in node.args[:2]):
                return False
        elif _cat_summed(node) is None:
            return False
        form = self.form(node)
        return form is not None and not form

    # ---- forms -------------------------------------------------------------------------------
    def _term(self, key: tuple) -> int:
        return self._ids.setdefault(key, len(self._ids))

    def _atom(self, node: fx.Node) -> Form | None:
        if node.name in self._written or _shape(node) is None:
            return None
        return {self._term(("atom", node.name)): Fraction(1)}

    def form(self, node: Any) -> Form | None:
        """The linear form of ``node``; None where it has none (not floating, written in place)."""
        if not isinstance(node, fx.Node):
            return None
        if node.name in self._forms:
            return self._forms[node.name]
        stack = [node]
        while stack:  # operands first, without recursion (long chains)
            top = stack[-1]
            pending = [a for a in self._operands(top) if a.name not in self._forms]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            if top.name not in self._forms:
                self._forms[top.name] = self._compute(top)
        return self._forms[node.name]

    def _operands(self, node: fx.Node) -> list[fx.Node]:
        if node.op != "call_function" or node.name in self._written or _shape(node) is None:
            return []
        key = op_key(node)
        if key in _SAME or key in _LINEAR or key == "aten.neg.default":
            if _cat_summed(node) is not None:
                return [node.args[0], *node.args[0].args[0]]
            return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
        if key in _SUMS or key in _SCALE or key in _BILINEAR:
            return [a for a in node.args[:2] if isinstance(a, fx.Node)]
        return []

    def _compute(self, node: fx.Node) -> Form | None:
        shape = _shape(node)
        if shape is None or node.name in self._written:
            return None
        key = op_key(node) if node.op == "call_function" else ""
        atom = self._atom(node)
        try:
            out = self._rule(node, key, shape)
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            out = None
        if out is None or len(out) > MAX_TERMS:
            return atom
        return out

    def _rule(self, node: fx.Node, key: str, shape: tuple[int, ...]) -> Form | None:
        args = node.args
        if key in _SAME:
            return self._get(args[0])
        if key == "aten.neg.default":
            return _scaled(self._get(args[0]), Fraction(-1))
        pieces = _cat_summed(node)
        if pieces is not None:  # sum over the cat's axis: the sum of the pieces' sums
            out: Form = {}
            for piece in pieces:
                f = self._get(piece)
                if f is None:
                    return None
                for t, c in f.items():
                    term = self._term(("sum", pieces.dims, pieces.keep, t))
                    out[term] = out.get(term, Fraction(0)) + c
            return {t: c for t, c in out.items() if c != 0}
        if key in _LINEAR:
            inner = self._get(args[0])
            if inner is None:
                return None
            params = (key, repr(args[1:]), repr(sorted(node.kwargs.items())))
            return {self._term((*params, t)): c for t, c in inner.items()}
        if key in _SUMS:
            return self._sum(node, key, shape)
        if key in _SCALE and len(args) == 2 and not node.kwargs:
            a, b = args
            num = _number(b)
            if isinstance(a, fx.Node) and num is not None:
                if not self._literal(node):
                    return None  # a derived real (lerp's 1 - w, ...): no rational coefficient
                if key.startswith("aten.div"):
                    return _scaled(self._get(a), 1 / num)
                return _scaled(self._get(a), num)
        if key in _BILINEAR and len(args) == 2 and not node.kwargs:
            return self._product(node, key)
        return None

    def _get(self, x: Any) -> Form | None:
        return self._forms.get(x.name) if isinstance(x, fx.Node) else None

    def _sum(self, node: fx.Node, key: str, shape: tuple[int, ...]) -> Form | None:
        a, b = node.args[:2]
        alpha = _number(node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1))
        if alpha is None or not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            return None
        fa, fb = self._broadcast(a, shape), self._broadcast(b, shape)
        if fa is None or fb is None:
            return None
        sign = alpha if key == "aten.add.Tensor" else -alpha
        out = dict(fa)
        for t, c in fb.items():
            out[t] = out.get(t, Fraction(0)) + sign * c
        return {t: c for t, c in out.items() if c != 0}

    def _broadcast(self, x: fx.Node, shape: tuple[int, ...]) -> Form | None:
        f, s = self._get(x), _shape(x)
        if f is None or s is None:
            return None
        if s == shape:
            return f
        return {self._term(("broadcast", shape, t)): c for t, c in f.items()}

    def _product(self, node: fx.Node, key: str) -> Form | None:
        a, b = node.args
        fa, fb = self._get(a), self._get(b)
        if fa is None or fb is None or len(fa) * len(fb) > MAX_TERMS:
            return None
        out: Form = {}
        for ta, ca in fa.items():
            for tb, cb in fb.items():
                pair = (ta, tb) if key != "aten.mul.Tensor" else tuple(sorted((ta, tb)))
                t = self._term((key, *pair))
                out[t] = out.get(t, Fraction(0)) + ca * cb
        return {t: c for t, c in out.items() if c != 0}


class _Pieces(list):
    """The pieces of a ``cat`` that a sum reduces over its axis, with the sum's normalised
    dims and keepdim."""

    dims: tuple[int, ...] = ()
    keep: bool = False


def _cat_summed(node: fx.Node) -> _Pieces | None:
    """``sum(cat(pieces, d), dims, keepdim)`` with ``d`` among ``dims`` (no dtype): the
    pieces, each a floating node; else None. Then the sum is the sum of the pieces' sums."""
    if op_key(node) != "aten.sum.dim_IntList" or node.kwargs.get("dtype") is not None:
        return None
    cat = node.args[0]
    if not isinstance(cat, fx.Node) or op_key(cat) != "aten.cat.default":
        return None
    shape = _shape(cat)
    pieces = cat.args[0]
    if shape is None or not shape or not isinstance(pieces, list | tuple):
        return None
    if not all(isinstance(p, fx.Node) and _shape(p) is not None for p in pieces):
        return None
    nd = len(shape)
    cdim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if not dims or not isinstance(cdim, int) or any(len(_shape(p) or ()) != nd for p in pieces):
        return None
    norm = tuple(sorted({int(d) % nd for d in dims}))
    if int(cdim) % nd not in norm:
        return None
    out = _Pieces(pieces)
    out.dims, out.keep = norm, bool(keep)
    return out


def _scaled(form: Form | None, c: Fraction) -> Form | None:
    if form is None:
        return None
    return {t: v * c for t, v in form.items() if v * c != 0}
