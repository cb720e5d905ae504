"""The facts of :mod:`fpgrad.graph.identities` and the sound rules on them, array by array.

A fact is an int64 array ``gid`` of a tensor's shape: ``ZERO`` marks an element exactly 0,
a label ``g >= 0`` the elements that sum to exactly 0 together (at least two), ``UNKNOWN``
nothing claimed (None: nothing known anywhere). Here: canonical labels, connected components,
and the propagation rules (gather for data movement, broadcast, reductions, ``a + alpha b``,
scaling, matrix products); :mod:`fpgrad.graph.identities` states each rule's soundness and
applies them to the ops of a graph.
"""

from __future__ import annotations

import numpy as np

UNKNOWN = -1
ZERO = -2
Fact = np.ndarray | None


# ---- labels ----------------------------------------------------------------------------------
def canon(gid: np.ndarray) -> Fact:
    """Relabel groups 0..G-1, turn one-element groups into ZERO; None when nothing is known."""
    flat = gid.ravel().copy()
    pos = flat >= 0
    if pos.any():
        _, inv, counts = np.unique(flat[pos], return_inverse=True, return_counts=True)
        keep = counts > 1
        remap = np.cumsum(keep) - 1
        flat[pos] = np.where(keep[inv], remap[inv], ZERO)
    if (flat == UNKNOWN).all():
        return None
    return flat.reshape(gid.shape)


def components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components of ``n`` nodes joined by edges (u[e], v[e]): the smallest node of
    each component as its label (root hooking and pointer jumping, vectorised)."""
    lab = np.arange(n, dtype=np.int64)
    while u.size:
        lu, lv = lab[u], lab[v]
        differ = lu != lv
        if not differ.any():
            break
        lu, lv = lu[differ], lv[differ]
        low = np.minimum(lu, lv)
        np.minimum.at(lab, lu, low)  # roots hook onto a smaller root: no cycles
        np.minimum.at(lab, lv, low)
        while True:
            nxt = lab[lab]
            if np.array_equal(nxt, lab):
                break
            lab = nxt
    return lab


def _group_minmax(gid: np.ndarray, key: np.ndarray) -> np.ndarray:
    """For flat ``gid`` (groups >= 0): does ``key`` take one value on each group?"""
    pos = gid >= 0
    n = int(gid[pos].max()) + 1 if pos.any() else 0
    lo = np.full(n, np.iinfo(np.int64).max)
    hi = np.full(n, np.iinfo(np.int64).min)
    np.minimum.at(lo, gid[pos], key[pos])
    np.maximum.at(hi, gid[pos], key[pos])
    return lo == hi


def _unknown(shape: tuple[int, ...]) -> np.ndarray:
    return np.full(shape, UNKNOWN, dtype=np.int64)


# ---- rules -----------------------------------------------------------------------------------
def gather(gid: np.ndarray, src: np.ndarray) -> Fact:
    """The fact of ``out.flat[o] = T.flat[src[o]]`` (``src < 0``: a zero fill)."""
    g = gid.ravel()
    s = src.ravel().astype(np.int64)
    read = s >= 0
    out = np.full(s.shape, ZERO, dtype=np.int64)
    out[read] = g[s[read]]
    pos = out >= 0
    if pos.any():
        counts = np.bincount(s[read], minlength=g.size)
        same = _group_minmax(g, counts)  # every member read equally often
        # the k-th reader of each member: members' k-th copies form group (g, k)
        idx = np.flatnonzero(read)
        order = np.argsort(s[idx], kind="stable")
        srt = s[idx][order]
        start = np.r_[True, srt[1:] != srt[:-1]]
        first = np.maximum.accumulate(np.where(start, np.arange(srt.size), 0))
        rank = np.empty(idx.size, dtype=np.int64)
        rank[order] = np.arange(srt.size) - first
        copy = np.zeros(s.shape, dtype=np.int64)
        copy[idx] = rank
        m = int(counts.max())
        out[pos] = np.where(same[out[pos]], out[pos] * m + copy[pos], UNKNOWN)
    return canon(out.reshape(src.shape))


def broadcast(gid: Fact, shape: tuple[int, ...], out: tuple[int, ...]) -> Fact:
    """The fact of ``T`` broadcast from ``shape`` to ``out`` (numpy rules)."""
    if gid is None or tuple(shape) == tuple(out):
        return gid
    n = int(np.prod(shape, dtype=np.int64))
    src = np.broadcast_to(np.arange(n, dtype=np.int64).reshape(shape), out)
    return gather(gid, np.ascontiguousarray(src))


def reduce(gid: np.ndarray, dst: np.ndarray, n_out: int) -> Fact:
    """The fact of ``out.flat[o] = sum of T.flat[i] over dst[i] == o``."""
    g = gid.ravel()
    d = dst.ravel().astype(np.int64)
    pos = g >= 0
    n_groups = int(g[pos].max()) + 1 if pos.any() else 0
    lab = components(n_out + n_groups, d[pos], n_out + g[pos])
    bad = np.zeros(n_out + n_groups, dtype=bool)
    bad[lab[d[g == UNKNOWN]]] = True
    out_lab = lab[:n_out]
    return canon(np.where(bad[out_lab], UNKNOWN, out_lab))


def reduce_axes(gid: np.ndarray, axes: list[int], keepdim: bool) -> Fact:
    """The fact of ``T.sum(axes)`` (axes already non-negative; empty: every axis)."""
    shape = gid.shape
    axes = sorted(set(axes)) if axes else list(range(len(shape)))
    kept = tuple(1 if a in axes else s for a, s in enumerate(shape))
    n_out = int(np.prod(kept, dtype=np.int64))
    dst = np.broadcast_to(np.arange(n_out, dtype=np.int64).reshape(kept), shape)
    out = reduce(gid, dst, n_out)
    if out is None:
        return None
    final = kept if keepdim else tuple(s for a, s in enumerate(shape) if a not in axes)
    return out.reshape(final)


def add(a: Fact, b: Fact, shape: tuple[int, ...]) -> Fact:
    """The fact of ``a + alpha b`` (both already of ``shape``)."""
    if a is None or b is None:
        return None
    ga, gb = a.ravel(), b.ravel()
    n = ga.size
    na = int(ga.max()) + 1 if (ga >= 0).any() else 0
    nb = int(gb.max()) + 1 if (gb >= 0).any() else 0
    ia, ib = np.flatnonzero(ga >= 0), np.flatnonzero(gb >= 0)
    u = np.concatenate([ia, ib])
    v = np.concatenate([n + ga[ia], n + na + gb[ib]])
    lab = components(n + na + nb, u, v)
    bad = np.zeros(n + na + nb, dtype=bool)
    bad[lab[:n][(ga == UNKNOWN) | (gb == UNKNOWN)]] = True
    out = np.where(bad[lab[:n]], UNKNOWN, lab[:n])
    return canon(out.reshape(shape))


def scale(t: Fact, factor_index: np.ndarray | None, factor: Fact = None) -> Fact:
    """The fact of ``t * c`` where element ``i`` meets ``c.flat[factor_index[i]]`` (None: a
    scalar); ``factor``: the fact of ``c`` broadcast (its ZEROs make zero products)."""
    if t is None and factor is None:
        return None
    shape = t.shape if t is not None else factor.shape  # type: ignore[union-attr]
    out = _unknown(shape).ravel() if t is None else t.ravel().copy()
    if t is not None and factor_index is not None:
        same = _group_minmax(out, factor_index.ravel().astype(np.int64))
        pos = out >= 0
        out[pos] = np.where(same[out[pos]], out[pos], UNKNOWN)
    if factor is not None:
        out[factor.ravel() == ZERO] = ZERO
    return canon(out.reshape(shape))


def matmul_left(a: np.ndarray, k: int) -> Fact:
    """The fact of ``a @ b`` (a of shape (B, n, m), b of (B, m, k)) from ``a``'s fact."""
    nb, n, m = a.shape
    g = a.ravel().copy()
    bi, ii, ji = (x.ravel() for x in np.indices(a.shape))
    pos = g >= 0
    if pos.any():  # each group must lie in one column of one batch
        same = _group_minmax(g, bi * m + ji)
        g[pos] = np.where(same[g[pos]], g[pos], UNKNOWN)
    rows = bi * n + ii
    pos = g >= 0
    n_groups = int(g[pos].max()) + 1 if pos.any() else 0
    lab = components(nb * n + n_groups, rows[pos], nb * n + g[pos])
    bad = np.zeros(nb * n + n_groups, dtype=bool)
    bad[lab[rows[g == UNKNOWN]]] = True
    row = np.where(bad[lab[: nb * n]], UNKNOWN, lab[: nb * n]).reshape(nb, n, 1)
    out = np.where(row >= 0, row * k + np.arange(k), UNKNOWN)
    return canon(out)


def matmul(a: Fact, b: Fact, ashape: tuple, bshape: tuple) -> Fact:
    """The fact of ``a @ b`` for 2-D (mm) or 3-D (bmm) operands."""
    batched = len(ashape) == 3
    a3 = None if a is None else (a if batched else a[None])
    b3 = None if b is None else (b if batched else b[None])
    k, n = bshape[-1], ashape[-2]
    left = None if a3 is None else matmul_left(a3, k)
    right = None
    if b3 is not None:
        r = matmul_left(np.ascontiguousarray(b3.transpose(0, 2, 1)), n)
        right = None if r is None else np.ascontiguousarray(r.transpose(0, 2, 1))
    out = left if left is not None else right
    if left is not None and right is not None:
        out = left.copy()
        out[right == ZERO] = ZERO
        out = canon(out)
    if out is None:
        return None
    return out if batched else out[0]


def _along(shape: tuple[int, ...], axes: list[int]) -> Fact:
    """Groups: each index of the other axes, its members running over ``axes``."""
    kept = tuple(1 if a in axes else s for a, s in enumerate(shape))
    n = int(np.prod(kept, dtype=np.int64))
    gid = np.broadcast_to(np.arange(n, dtype=np.int64).reshape(kept), shape)
    return canon(np.ascontiguousarray(gid))


def _index_in(shape: tuple[int, ...] | None, out: tuple[int, ...]) -> np.ndarray | None:
    """For each element of ``out``, the flat index of the element of a tensor of ``shape``
    broadcast to it."""
    if shape is None:
        return None
    n = int(np.prod(shape, dtype=np.int64))
    return np.broadcast_to(np.arange(n, dtype=np.int64).reshape(shape), out)
