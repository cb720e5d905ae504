"""Scaled dot-product attention (torch's CPU kernel op and its backward) through bmm and a
masked softmax; masked positions (boolean False, additive -inf, causal) get weight exactly 0,
and so does every key of a query whose keys are all masked (torch's CPU kernel: its output row
is 0, its gradients 0)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fpgrad.graph import shapes
from fpgrad.graph.ops.linear import bmm
from fpgrad.graph.ops.registry import op


def _flat(x: Any) -> tuple[Any, tuple[int, ...]]:
    s = shapes.shape(x)
    return shapes.reshape(x, (-1, s[-2], s[-1])), s


def _mask(cx: Any, q: Any, k: Any, attn_mask: Any, causal: bool) -> tuple[np.ndarray, Any]:
    """(keep: bool mask broadcast to the scores, additive finite bias or None)."""
    lq, lk = shapes.shape(q)[-2], shapes.shape(k)[-2]
    keep = np.ones((lq, lk), dtype=bool)
    if causal:
        keep &= np.tril(np.ones((lq, lk), dtype=bool))
    bias = None
    if attn_mask is not None:
        if isinstance(attn_mask, np.ndarray) and attn_mask.dtype == bool:
            keep = keep & attn_mask
        else:  # additive: -inf entries mask, the finite rest is added
            hi = (
                attn_mask
                if isinstance(attn_mask, np.ndarray) and attn_mask.dtype.kind == "f"
                else cx.ar.to_float64(attn_mask)
            )
            keep = keep & ~np.isneginf(hi)
            if np.isfinite(hi[~np.isneginf(hi)]).all() and np.any(hi[np.isfinite(hi)] != 0):
                bias = cx.ar.asarray(np.where(np.isfinite(hi), hi, 0.0))
    return keep, bias


def _probs(cx: Any, q: Any, k: Any, attn_mask: Any, causal: bool, scale: Any) -> tuple:
    """(scaled scores' softmax p, flattened q, k, scale constant, leading shape)."""
    ar = cx.ar
    qf, qs = _flat(q)
    kf, _ = _flat(k)
    sc = ar.const(float(scale)) if scale is not None else None
    s = bmm(cx, qf, shapes.transpose(kf, 1, 2))
    if sc is None:
        sc = ar.div(ar.const(1.0), ar.sqrt(ar.const(float(qs[-1]))))
    s = ar.mul(s, sc)
    keep, bias = _mask(cx, q, k, attn_mask, causal)
    nb = shapes.shape(s)[0]
    keep = np.broadcast_to(keep, (*qs[:-2], *keep.shape[-2:])).reshape(nb, *keep.shape[-2:])
    if bias is not None:
        b = shapes.reshape(shapes.expand(bias, (*qs[:-2], *shapes.shape(bias)[-2:])),
                           (nb, *shapes.shape(bias)[-2:]))  # fmt: skip
        s = ar.add(s, b)
    zero = ar.asarray(np.zeros(shapes.shape(s)))
    m = ar.max(s, axis=2, keepdims=True)  # any shift at or above the kept scores is exact
    e = ar.where(keep, ar.exp(ar.sub(s, m)), zero)
    total = ar.sum(e, axis=2, keepdims=True)
    empty = ~keep.any(axis=2, keepdims=True)
    if empty.any():  # a query with every key masked: torch's kernel gives weights 0, not NaN
        total = ar.where(empty, ar.asarray(np.ones(empty.shape)), total)
    return ar.div(e, total), m, total, qf, kf, sc, qs


@op("aten._scaled_dot_product_flash_attention_for_cpu.default")
def sdpa(
    cx: Any, q: Any, k: Any, v: Any, dropout: float = 0.0, is_causal: bool = False,
    attn_mask: Any = None, scale: Any = None,
) -> tuple:  # fmt: skip
    """(softmax(q k^T scale + mask) v, logsumexp of the scores)."""
    if dropout:
        from fpgrad.errors import InputError

        raise InputError(f"{cx.label()}: attention dropout must be 0 (eval mode)")
    ar = cx.ar
    p, m, total, _, _, _, qs = _probs(cx, q, k, attn_mask, is_causal, scale)
    vf, vs = _flat(v)
    out = shapes.reshape(bmm(cx, p, vf), (*qs[:-1], vs[-1]))
    lse = shapes.reshape(ar.add(m, ar.log(total)), qs[:-1])
    return out, lse


@op("aten._scaled_dot_product_flash_attention_for_cpu_backward.default")
def sdpa_backward(
    cx: Any, g: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, dropout: float = 0.0,
    is_causal: bool = False, attn_mask: Any = None, scale: Any = None,
) -> tuple:  # fmt: skip
    """dq, dk, dv from p recomputed: ds = p (dp - sum(dp p)), dp = g v^T."""
    ar = cx.ar
    p, _, _, qf, kf, sc, qs = _probs(cx, q, k, attn_mask, is_causal, scale)
    gf, _ = _flat(g)
    vf, vs = _flat(v)
    dv = bmm(cx, shapes.transpose(p, 1, 2), gf)
    dp = bmm(cx, gf, shapes.transpose(vf, 1, 2))
    ds = ar.mul(p, ar.sub(dp, ar.sum(ar.mul(dp, p), axis=2, keepdims=True)))
    dq = ar.mul(bmm(cx, ds, kf), sc)
    dk = ar.mul(bmm(cx, shapes.transpose(ds, 1, 2), qf), sc)
    ks = shapes.shape(k)
    return (
        shapes.reshape(dq, qs),
        shapes.reshape(dk, ks),
        shapes.reshape(dv, vs),
    )
