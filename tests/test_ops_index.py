"""Data movement and indexing ops (:mod:`fpgrad.graph.ops.index`).

Each op in a small model ``op(w * x)``: the native float16/bfloat16/float32 columns equal
torch eager autograd bit for bit; the exact reference's claims meet the interval oracle
(:mod:`tests.oracle.interval_ad`), where the op is written again from its definition in numpy
on object arrays (``np.roll``, ``np.pad``, explicit loops: neither torch nor fpgrad); the
emulated sums are checked by hand, addend by addend, with :func:`fpgrad.round_to`.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from fpgrad.arith.emulated import EmulatedArith
from fpgrad.diagnose.comparison import compare
from fpgrad.errors import InputError
from fpgrad.graph.exact import exact_graph
from fpgrad.graph.ops import index as ix
from tests.oracle import interval_ad as A
from tests.oracle.claims import claims
from tests.test_attack5_certificates import _t, check
from tests.test_graph_capture import eager_grads

SHAPE = (4, 6)
IDX = np.array([5, 1, 1, 0, 5, 5, 2])
GIDX = np.array([[0, 0, 5], [1, 2, 2], [3, 3, 3]])
SIDX = np.array([[5, 1, 0], [0, 1, 2]])
AIDX = np.array([[3, 3, 0], [3, 3, 3], [3, 1, 1]])
RIDX = np.array([2, 0, 2, 2])


def _obj(shape: tuple[int, ...], v: float = 0.0) -> np.ndarray:
    out = np.empty(shape, dtype=object)
    for i in np.ndindex(shape):
        out[i] = A.V(v)
    return out


def _first(vals: list[A.V], lowest: bool) -> A.V:
    """torch's first maximum (first minimum): a later element replaces it only when strictly
    above (below)."""
    best = vals[0]
    for v in vals[1:]:
        if A.less(v, best) if lowest else A.less(best, v):
            best = v
    return A.V(best.v, ((best, 1),))


def _pad_const(h: np.ndarray) -> np.ndarray:  # F.pad(h, (2, -1, 1, 0), value=0.5)
    out = _obj((h.shape[0] + 1, h.shape[1] + 1), 0.5)
    out[1:, 2:] = h[:, :-1]
    return out


def _gather(h: np.ndarray) -> np.ndarray:
    out = np.empty(GIDX.shape, dtype=object)
    for i, j in np.ndindex(GIDX.shape):
        out[i, j] = h[i, GIDX[i, j]]
    return out


def _scatter(h: np.ndarray) -> np.ndarray:
    out = _obj(SHAPE)
    for i, j in np.ndindex(SIDX.shape):
        out[i, SIDX[i, j]] = h[i, j]
    return out


def _scatter_add(h: np.ndarray) -> np.ndarray:  # h.scatter_add(0, AIDX, src) in index order
    out, src = h.copy(), h[:3, :3] * h[1:4, 2:5]
    for i, j in np.ndindex(AIDX.shape):
        out[AIDX[i, j], j] = out[AIDX[i, j], j] + src[i, j]
    return out


def _index_add(h: np.ndarray) -> np.ndarray:
    out = _obj((3, SHAPE[1]))
    for i, r in enumerate(RIDX):
        out[r] = out[r] + h[i]
    return out


def _cumsum(h: np.ndarray, axis: int) -> np.ndarray:
    out = h.copy()
    m = np.moveaxis(out, axis, 0)
    for i in range(1, m.shape[0]):
        m[i] = m[i - 1] + m[i]
    return out


def _nearest(n_in: int, n_out: int, exact: bool) -> np.ndarray:
    """torch's nearest source (float32 scale in/out; nearest-exact samples pixel centres)."""
    scale = np.float32(np.float32(n_in) / np.float32(n_out))
    dst = np.arange(n_out, dtype=np.float32) + (np.float32(0.5) if exact else np.float32(0))
    return np.minimum(np.floor(dst * scale).astype(np.int64), n_in - 1)


def _up_scaled(h: np.ndarray, factor: float) -> np.ndarray:
    """torch's nearest with a given scale factor: source floor(dst * fl32(1 / factor))."""
    n_out = int(np.floor(h.shape[-1] * factor))
    scale = np.float32(1.0 / factor)
    src = np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64),
                     h.shape[-1] - 1)  # fmt: skip
    return h[:, src]


def _up(h: np.ndarray, size: tuple[int, ...], exact: bool = False) -> np.ndarray:
    rows = _nearest(h.shape[-2], size[0], exact) if len(size) == 2 else np.arange(h.shape[-2])
    cols = _nearest(h.shape[-1], size[-1], exact)
    return h[rows][:, cols]


def _extreme(h: np.ndarray, axis: int, lowest: bool) -> np.ndarray:
    m = np.moveaxis(h, axis, -1)
    out = np.empty(m.shape[:-1], dtype=object)
    for i in np.ndindex(out.shape):
        out[i] = _first(list(m[i]), lowest)
    return out


def _triu(h: np.ndarray, k: int, upper: bool) -> np.ndarray:
    i, j = np.indices(h.shape)
    keep = (j - i >= k) if upper else (j - i <= k)
    return np.where(keep, h, _obj(h.shape))


def _i(a: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a))


def _zero(h: torch.Tensor) -> torch.Tensor:
    return torch.zeros(SHAPE, dtype=h.dtype)


Op = Callable[[torch.Tensor], torch.Tensor]
Oracle = Callable[[np.ndarray], np.ndarray]
CASES: dict[str, tuple[Op, Oracle]] = {
    "flip": (lambda h: h.flip(-1, 0), lambda h: h[::-1, ::-1]),
    "roll": (lambda h: h.roll((1, -2), (0, 1)), lambda h: np.roll(h, (1, -2), (0, 1))),
    "roll_flat": (lambda h: h.roll(5), lambda h: np.roll(h, 5)),
    "repeat": (lambda h: h.repeat(2, 1, 2), lambda h: np.tile(h, (2, 1, 2))),
    "triu": (lambda h: h.triu(1), lambda h: _triu(h, 1, True)),
    "tril": (lambda h: h.tril(-1), lambda h: _triu(h, -1, False)),
    "pad_constant": (lambda h: F.pad(h, (2, -1, 1, 0), value=0.5), _pad_const),
    "reflection_pad2d": (
        lambda h: F.pad(h[None, None], (2, 3, 1, 2), mode="reflect"),
        lambda h: np.pad(h, ((1, 2), (2, 3)), mode="reflect")[None, None],
    ),
    "replication_pad1d": (
        lambda h: F.pad(h[None], (2, 3), mode="replicate"),
        lambda h: np.pad(h, ((0, 0), (2, 3)), mode="edge")[None],
    ),
    "index_select": (lambda h: h.index_select(-1, _i(IDX)), lambda h: h[:, IDX]),
    "gather": (lambda h: h.gather(1, _i(GIDX)), _gather),
    "scatter_src": (lambda h: _zero(h).scatter(1, _i(SIDX), h[:2, :3]), _scatter),
    "scatter_add": (
        lambda h: h.scatter_add(0, _i(AIDX), h[:3, :3] * h[1:4, 2:5]),
        _scatter_add,
    ),  # fmt: skip
    "index_add": (lambda h: _zero(h)[:3].index_add(0, _i(RIDX), h), _index_add),
    "max_dim": (lambda h: h.max(-1).values, lambda h: _extreme(h, -1, False)),
    "min_dim_keepdim": (
        lambda h: h.min(0, keepdim=True).values * h,
        lambda h: _extreme(h, 0, True)[None] * h,
    ),
    "cumsum": (lambda h: h.cumsum(-1), lambda h: _cumsum(h, -1)),
    "cumsum_dim0": (lambda h: h.cumsum(0), lambda h: _cumsum(h, 0)),
    "index_tensor": (lambda h: h[_i([3, 1, 1, 3])], lambda h: h[[3, 1, 1, 3]]),
    "index_split_dims": (
        lambda h: h.view(2, 2, 6)[_i([1, 0, 1]), :, _i([3, 3, 3])],
        lambda h: h.reshape(2, 2, 6)[[1, 0, 1], :, [3, 3, 3]],
    ),
    "upsample_nearest1d": (
        lambda h: F.interpolate(h[None], scale_factor=2),
        lambda h: _up(h, (12,))[None],
    ),  # fmt: skip
    "upsample_nearest1d_factor_1_7": (
        lambda h: F.interpolate(h[None], scale_factor=1.7),
        lambda h: _up_scaled(h, 1.7)[None],
    ),  # fmt: skip
    "upsample_nearest2d": (
        lambda h: F.interpolate(h[None, None], size=(5, 9)),
        lambda h: _up(h, (5, 9))[None, None],
    ),  # fmt: skip
    "upsample_nearest_exact2d": (
        lambda h: F.interpolate(h[None, None], size=(7, 4), mode="nearest-exact"),
        lambda h: _up(h, (7, 4), True)[None, None],
    ),
}


def _setitem(h: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(h)
    out[_i([2, 0])] = h[:2]  # aten.index_put_
    return out


def _setitem_oracle(h: np.ndarray) -> np.ndarray:
    out = _obj(SHAPE)
    out[2], out[0] = h[0], h[1]
    return out


def _fill(h: np.ndarray, where: list[tuple[int, int]], v: float) -> np.ndarray:
    out = h.copy()
    for i in where:
        out[i] = A.V(v)
    return out


def _windows(h: np.ndarray, size: int, step: int) -> np.ndarray:
    n = (h.shape[1] - size) // step + 1
    return np.stack([h[:, j * step : j * step + size] for j in range(n)], 1)


CASES.update({
    "index_put_inplace": (_setitem, _setitem_oracle),
    "index_add_inplace": (
        lambda h: torch.zeros_like(h).index_add_(0, _i(RIDX), h),
        lambda h: np.concatenate([_index_add(h), _obj((1, SHAPE[1]))]),
    ),
    "argmax_gather": (
        lambda h: h.gather(1, h.argmax(1, keepdim=True)),
        lambda h: _extreme(h, 1, False)[:, None],
    ),
    "argmin_flat": (
        lambda h: torch.take_along_dim(h.flatten(), h.argmin().reshape(1)) * h,
        lambda h: h * _first(list(h.ravel()), True),
    ),
    "index_bool_mask": (
        lambda h: h[torch.tensor([True, False, True, True])],
        lambda h: h[np.array([True, False, True, True])],
    ),
    "scatter_value_repeated": (
        lambda h: h.scatter(1, _i([[1, 1, 2]]), -0.5), lambda h: _fill(h, [(0, 1), (0, 2)], -0.5)
    ),
    "unfold_overlapping": (lambda h: h.unfold(1, 4, 1), lambda h: _windows(h, 4, 1)),
    "unfold_strided": (lambda h: h.unfold(1, 3, 2), lambda h: _windows(h, 3, 2)),
    "diagonal": (lambda h: torch.diagonal(h, 1), lambda h: np.diagonal(h, 1).copy()),
    "rot90": (lambda h: torch.rot90(h, 3), lambda h: np.rot90(h, 3)),
    "unbind": (
        lambda h: torch.stack(h.unbind(1)[::-1]),
        lambda h: np.stack([h[:, j] for j in range(SHAPE[1])][::-1]),
    ),
})  # fmt: skip


class Scale(nn.Module):
    """op(w * x), w of x's shape."""

    def __init__(self, op: Op, w: Any) -> None:
        super().__init__()
        self.op = op
        self.w = nn.Parameter(_t(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self.w * x)


def _mse_oracle(op: Oracle) -> Callable[..., A.V]:
    def f(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
        d = np.asarray(op(p["w"] * A.arr(x.numpy())), dtype=object) - A.arr(t.numpy())
        return A.total(d * d) / d.size

    return f


def _data(seed: int) -> tuple[np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE), _t(rng.standard_normal(SHAPE))


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_columns_are_eager_autograd_bit_for_bit(case: str) -> None:
    w, x = _data(1)
    model = Scale(CASES[case][0], w).float()
    x32 = x.float()
    y = torch.randn(model(x32).shape, generator=torch.Generator().manual_seed(2))
    net = fpgrad.from_module(model, x32, y, nn.MSELoss())
    cmp = compare(net, "float16,bfloat16,float32,float64,bfloat16:emulated")
    assert cmp.kinds["bfloat16:emulated"] == "emulated"
    for prec, dtype in [("float16", torch.float16), ("bfloat16", torch.bfloat16),
                        ("float32", torch.float32), ("float64", torch.float64)]:  # fmt: skip
        ref = eager_grads(model, x32, y, nn.MSELoss(), dtype)
        assert np.array_equal(cmp.values(prec)["w"], ref["w"]), prec


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_claims_meet_the_interval_oracle(case: str) -> None:
    op, oracle = CASES[case]
    w, x = _data(3)
    t = _t(np.random.default_rng(4).standard_normal(tuple(op(_t(w) * x).shape)))
    check(Scale(op, w), x, t, nn.MSELoss(), _mse_oracle(oracle))


# ---- adversarial corners ---------------------------------------------------------------------
class Pair(nn.Module):
    """The max (or min) over (w[0] x, w[1] x + eps), each divided by 3 with ``third``: which
    row the gradient reaches depends on the first extremum."""

    def __init__(self, w: Any, eps: float, lowest: bool = False, third: bool = False) -> None:
        super().__init__()
        self.w, self.eps, self.lowest, self.third = nn.Parameter(_t(w)), eps, lowest, third

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.stack([self.w[0] * x, self.w[1] * x + self.eps], -1)
        z = z / 3 if self.third else z
        return z.min(-1).values if self.lowest else z.max(-1).values


def _pair_oracle(eps: float, lowest: bool, third: bool = False) -> Callable[..., A.V]:
    def f(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
        xs, w = A.arr(x.numpy()), p["w"]
        rows = np.stack([w[0] * xs, w[1] * xs + eps], -1)
        rows = rows / 3 if third else rows
        d = _extreme(rows, -1, lowest) - A.arr(t.numpy())
        return A.total(d * d) / d.size

    return f


@pytest.mark.parametrize("bits", [None, 256])
@pytest.mark.parametrize("lowest", [False, True])
def test_first_extremum_on_exact_ties_and_near_ties(bits: int | None, lowest: bool) -> None:
    """Equal integers (exact ties: the first wins, as in torch) and a difference of 2^-70
    (float64's w x + 2^-70 rounds back to w x, so float64 sees a tie; the exact values do
    not): the oracle and fpgrad route the gradient by the exact comparison, fast balls and
    Arb."""
    w = np.array([[1.0, -2.0, 3.0, 0.0, 5.0], [1.0, -2.0, 3.0, 0.0, 5.0]])
    x = _t([1.0, 3.0, -1.0, 2.0, 0.5])
    t = _t([0.5, -1.0, 2.0, 0.25, 1.0])
    for eps in (0.0, 2.0**-70):
        ex = check(Pair(w, eps, lowest), x, t, nn.MSELoss(), _pair_oracle(eps, lowest), bits=bits)
        g = claims(ex, "grads/w")
        mid = np.asarray(g.mid, dtype=float).reshape(w.shape)
        winner = 0 if eps == 0.0 or lowest else 1  # the tie keeps the first
        assert np.all(mid[1 - winner] == 0) and np.all(
            np.asarray(g.zero).reshape(w.shape)[1 - winner]
        )


def test_a_near_tie_the_fast_balls_cannot_decide_escalates_to_arb() -> None:
    """(w x + 2^-200) / 3 against w x / 3: the fast balls' radii (~2^-150) hold both orders,
    Arb at 256 bits decides the second is the maximum; checked against the oracle."""
    w = np.array([[1.0, -2.0, 3.0], [1.0, -2.0, 3.0]])
    x, t = _t([1.0, 3.0, -1.0]), _t([0.5, -1.0, 2.0])
    eps = 2.0**-200
    ex = check(Pair(w, eps, third=True), x, t, nn.MSELoss(), _pair_oracle(eps, False, True))
    assert ex.method == "arb" and any("fast" in e for e in ex.escalations), ex.escalations
    zero = np.asarray(claims(ex, "grads/w").zero).reshape(w.shape)
    assert zero[0].all() and not zero[1].any()


def test_a_tie_the_balls_cannot_decide_is_undetermined() -> None:
    """w[0] x / 3 and w[1] x / 3 with w[0] = w[1]: equal exact values held by balls of
    positive radius, never decided at any precision: the escalation ends undetermined, every
    undetermined ball holds 0, nothing is certified wrong."""
    w = np.array([[1.0, 2.0], [1.0, 2.0]])
    model = Pair(w, 0.0, third=True).double()
    x, t = _t([1.0, -3.0]), _t([0.0, 0.0])
    net = fpgrad.from_module(model, x, t, nn.MSELoss())
    ex = exact_graph(net.graph, allow_uncertified=True, max_bits=1024).result
    assert ex.undetermined_count > 0
    assert any("undecided" in e for e in ex.escalations)
    g = claims(ex, "grads/w")
    und = np.ravel(g.undetermined)
    assert und.any()
    mid, rad = np.ravel(g.mid), np.ravel(g.rad)
    assert all(float(mid[i]) - rad[i] <= 0 <= float(mid[i]) + rad[i] for i in np.flatnonzero(und))


class Lin(nn.Module):
    def __init__(self, op: Op, w: Any) -> None:
        super().__init__()
        self.op, self.w = op, nn.Parameter(_t(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self.w * x)


def _dot(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (o * t).sum()


BIG = np.array([[1e300, 1.0, 3.0], [1.0, -1e300, 1e-300], [-1e300, 1e300, -1.0],
                [1e-300, 1.0, 2.0]])  # fmt: skip


@pytest.mark.parametrize("bits", [None, 256])
@pytest.mark.parametrize(
    "case",
    [
        ("cumsum", lambda h: h.cumsum(0), lambda h: _cumsum(h, 0)),
        ("index_add", lambda h: torch.zeros(2, 3, dtype=h.dtype).index_add(0, _i([1, 0, 1, 1]), h),
         lambda h: _index_add_rows(h, [1, 0, 1, 1], 2)),
        ("scatter_add", lambda h: torch.zeros(2, 3, dtype=h.dtype).scatter_add(
            0, _i([[1, 0, 1], [0, 0, 1], [1, 0, 1], [1, 1, 1]]), h),
         lambda h: _scatter_rows(h, [[1, 0, 1], [0, 0, 1], [1, 0, 1], [1, 1, 1]], 2)),
        ("upsample_backward", lambda h: F.interpolate(h.T[None], size=8)[0].T,
         lambda h: h[np.arange(8) // 2]),
    ],
    ids=lambda c: c[0],
)  # fmt: skip
def test_sums_cancel_across_the_float64_range(case: tuple, bits: int | None) -> None:
    """Addends 1e300, -1e300, 1, 1e-300 meet in one sum (forward for cumsum / index_add /
    scatter_add, backward for the upsampling and every backward): float64 loses the small
    ones, the exact reference keeps them (checked against the oracle, fast balls and Arb)."""
    _, op, oracle = case
    x = _t(np.ones(BIG.shape))
    out = op(_t(BIG) * x)
    t = _t(np.resize([1.0, -1e-300, 1e-8, 1.0, -1.0], tuple(out.shape)))

    def f(p: dict, xx: torch.Tensor, tt: torch.Tensor) -> A.V:
        o = np.asarray(oracle(p["w"] * A.arr(xx.numpy())), dtype=object)
        return A.total(o * A.arr(tt.numpy()))

    check(Lin(op, BIG), x, t, _dot, f, bits=bits)


def _index_add_rows(h: np.ndarray, idx: list[int], n: int) -> np.ndarray:
    out = _obj((n, h.shape[1]))
    for i, r in enumerate(idx):
        out[r] = out[r] + h[i]
    return out


def _scatter_rows(h: np.ndarray, idx: list[list[int]], n: int) -> np.ndarray:
    out = _obj((n, h.shape[1]))
    for i, j in np.ndindex(np.shape(idx)):
        out[idx[i][j], j] = out[idx[i][j], j] + h[i, j]
    return out


# ---- emulated sums --------------------------------------------------------------------------
def _cx(fmt: str, target: str = "", accumulation: str = "fp32") -> Any:
    return SimpleNamespace(ar=EmulatedArith(fmt, accumulation), label=lambda: "test",
                           node=SimpleNamespace(target=target))  # fmt: skip


def _bits(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).view(np.int64)


def _seq(terms: list[float], fmt: str) -> float:
    """Left-to-right sum, each addition rounded into ``fmt`` (by hand)."""
    acc = 0.0
    for v in terms:
        acc = float(fpgrad.round_to(acc + v, fmt))  # float64 holds the exact sum here
    return acc


def _fp32(terms: list[float], fmt: str) -> float:
    """A float32 accumulator, rounded once into ``fmt`` (by hand)."""
    acc = np.float32(0.0)
    for v in terms:
        acc = np.float32(acc + np.float32(v))
    return float(fpgrad.round_to(float(acc), fmt))


E = 2.0**-8  # bfloat16 (8 bits): 1 + E is a tie (rounds to 1), 1 + 2E is representable


@pytest.mark.parametrize(
    ("accumulation", "total"),
    [
        ("per_op", _seq),
        ("fp32", _fp32),
        ("exact", lambda ts, f: float(fpgrad.round_to(sum(ts), f))),
    ],
)
def test_emulated_sums_by_hand(
    accumulation: str, total: Callable[[list[float], str], float]
) -> None:
    """Addends 1, E, E in both orders: rounded per addition, 1 + E + E is 1 and E + E + 1 is
    1 + 2E; a float32 accumulator or the exact sum give 1 + 2E both ways: the machine's
    accumulation and the addends' order (torch's) both show."""
    fmt = "bfloat16"
    cx = _cx(fmt, accumulation=accumulation)
    src = cx.ar.asarray(np.array([[E, 1.0], [E, E], [1.0, E], [3.0, 5.0]]))
    out = ix.index_add(cx, cx.ar.asarray(np.zeros((2, 2))), 0, np.array([1, 1, 1, 0]), src)
    want = [[3.0, 5.0], [total([E, E, 1.0], fmt), total([1.0, E, E], fmt)]]
    assert np.array_equal(_bits(out), _bits(want))
    idx = np.array([[1, 1], [1, 1], [1, 1]])
    got = ix.scatter_add(cx, cx.ar.asarray(np.zeros((2, 2))), 0, idx, src[:3])
    assert np.array_equal(_bits(got[1]), _bits([total([E, E, 1.0], fmt), total([1.0, E, E], fmt)]))
    row = cx.ar.asarray(np.array([[1.0, E, E, E, E], [E, E, 1.0, E, 3.0]]))
    cs = ix.cumsum(cx, row, -1)
    want_cs = [[total(list(r[: i + 1]), fmt) for i in range(5)] for r in np.asarray(row)]
    assert np.array_equal(_bits(cs), _bits(want_cs))
    up = _cx(fmt, "aten.upsample_nearest1d_backward.default", accumulation)
    g = up.ar.asarray(np.array([[[1.0, E, E, E, E, 1.0]]]))
    back = ix.copy_backward(up, g, [6], [1, 1, 2], None)
    assert np.array_equal(
        _bits(back), _bits([[[total([1.0, E, E], fmt), total([E, E, 1.0], fmt)]]])
    )
    assert (want[1][1] == 1.0) == (accumulation == "per_op")  # the cases tell the modes apart
    # index_put(accumulate=True): torch's kernel rounds every addition, in every machine
    put = ix.index_put(cx, cx.ar.asarray(np.zeros(2)), [np.array([1, 1, 1])],
                       cx.ar.asarray(np.array([1.0, E, E])), True)  # fmt: skip
    assert np.array_equal(_bits(put), _bits([0.0, _seq([1.0, E, E], fmt)]))


_UP, _PAD, _UNF, _REP, _UPX = (f"aten.{k}_backward.default" for k in (
    "upsample_nearest1d", "reflection_pad1d", "unfold", "replication_pad2d",
    "_upsample_nearest_exact2d"))  # fmt: skip
#: torch's CPU kernels that round every addition (the others accumulate in float)
_PER_ADDITION = {"index_put_accumulate", "reflection_pad_backward", "replication_pad2d_backward",
                 "unfold_backward"}  # fmt: skip
#: torch's kernel on (values, index) and the same sum by fpgrad's op on (cx, values, index)
_TORCH_SUMS: dict[str, tuple[Callable[..., Any], Callable[..., Any], str]] = {
    "index_add": (
        lambda v, i: torch.zeros(5, 8, dtype=v.dtype).index_add(0, _i(i), v),
        lambda cx, v, i: ix.index_add(cx, cx.ar.asarray(np.zeros((5, 8))), 0, i, v), ""),
    "scatter_add": (
        lambda v, i: torch.ones(5, 8, dtype=v.dtype).scatter_add(0, _i(np.tile(i[:, None], 8)), v),
        lambda cx, v, i: ix.scatter_add(cx, cx.ar.asarray(np.ones((5, 8))), 0,
                                        np.tile(i[:, None], 8), v), ""),
    "index_put_accumulate": (
        lambda v, i: torch.zeros(5, 8, dtype=v.dtype).index_put((_i(i),), v, accumulate=True),
        lambda cx, v, i: ix.index_put(cx, cx.ar.asarray(np.zeros((5, 8))), [i], v, True), ""),
    "cumsum": (lambda v, i: v.cumsum(0), lambda cx, v, i: ix.cumsum(cx, v, 0), ""),
    "upsample_backward": (
        lambda v, i: torch.ops.aten.upsample_nearest1d_backward(v.T[None], [400], [1, 8, 7], None),
        lambda cx, v, i: ix.copy_backward(cx, v.T[None], [400], [1, 8, 7], None), _UP),
    "reflection_pad_backward": (
        lambda v, i: torch.ops.aten.reflection_pad1d_backward(
            v.T[None], torch.zeros(1, 8, 200, dtype=v.dtype), [100, 100]),
        lambda cx, v, i: ix.copy_backward(cx, v.T[None], np.zeros((1, 8, 200)), [100, 100]), _PAD),
    "replication_pad2d_backward": (
        lambda v, i: torch.ops.aten.replication_pad2d_backward(
            v.reshape(1, 8, 20, 20), torch.zeros(1, 8, 8, 10, dtype=v.dtype), [5, 5, 6, 6]),
        lambda cx, v, i: ix.copy_backward(cx, v.reshape(1, 8, 20, 20), np.zeros((1, 8, 8, 10)),
                                          [5, 5, 6, 6]), _REP),
    "upsample_nearest_exact2d_backward": (
        lambda v, i: torch.ops.aten._upsample_nearest_exact2d_backward(
            v.reshape(2, 4, 20, 20), [20, 20], [2, 4, 3, 4], None, None),
        lambda cx, v, i: ix.copy_backward(cx, v.reshape(2, 4, 20, 20), [20, 20], [2, 4, 3, 4],
                                          None, None), _UPX),
    "unfold_backward": (
        lambda v, i: torch.ops.aten.unfold_backward(v.reshape(8, 50, 8), [8, 57], 1, 8, 1),
        lambda cx, v, i: ix.copy_backward(cx, v.reshape(8, 50, 8), [8, 57], 1, 8, 1), _UNF),
}  # fmt: skip


@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", sorted(_TORCH_SUMS))
def test_default_emulated_sums_are_torch_cpu_kernels_bit_for_bit(fmt: str, case: str) -> None:
    """The default emulated machine reproduces torch's own float16 / bfloat16 CPU kernels bit
    for bit, 400 x 8 addends over 16 binades: a float32 accumulator rounded once where the
    kernel accumulates in float (a per_op machine does not match there), every addition
    rounded where the kernel does that (in every machine)."""
    rng = np.random.default_rng(7)
    vals = fpgrad.round_to(
        rng.standard_normal((400, 8)) * np.exp2(rng.integers(-8, 8, (400, 8))), fmt
    )
    idx = rng.integers(0, 5, 400)
    dt = torch.bfloat16 if fmt == "bfloat16" else torch.float16
    kernel, mine, target = _TORCH_SUMS[case]
    want = kernel(torch.from_numpy(vals).to(dt), idx).double().numpy()
    got = mine(_cx(fmt, target), vals, idx)
    assert np.array_equal(_bits(got), _bits(want))
    per_op = mine(_cx(fmt, target, "per_op"), vals, idx)
    assert np.array_equal(_bits(per_op), _bits(want)) == (case in _PER_ADDITION)


# ---- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("op", "message"),
    [
        (lambda h: _zero(h).scatter(1, _i([[1, 1]]), h[:1, :2]), "two values to one element"),
        (lambda h: F.pad(h, (1, 1), value=float("inf")), "finite only"),
        (lambda h: _zero(h)[:2].index_add(0, _i([1, 0, 1, 1]), h, alpha=2.0), "alpha"),
        (lambda h: h.index_put((_i([1, 1]),), h[:2], accumulate=False), "two values"),
    ],
    ids=["scatter_duplicates", "pad_inf", "index_add_alpha", "index_put_duplicates"],
)
def test_refused_with_a_reason(op: Op, message: str) -> None:
    w, x = _data(5)
    model = Scale(op, w)
    net = fpgrad.from_module(model, x, torch.zeros(tuple(model(x).shape), dtype=torch.float64),
                             _dot)  # fmt: skip
    with pytest.raises(InputError, match=message):
        compare(net, "bfloat16:emulated")


class NearTiePool(nn.Module):
    """max_pool2d over one 2x2 window holding 2 and 2 + 2^-70 (first): float64 midpoints see
    a tie, the exact maximum is the second element."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(_t([[2.0, 2.0], [1.0, 1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d((self.w * x + _t([[0.0, 2.0**-70], [0.0, 0.0]]))[None, None], 2)


@pytest.mark.parametrize("bits", [None, 256])
def test_max_pool_near_tie_below_float64_resolution(bits: int | None) -> None:
    """Regression (found here): Arb's first maximum was chosen by float64 midpoints and never
    checked, so at 256 bits the gradient went to w[0, 0] with w[0, 1] a "proven" zero."""

    def f(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
        h = (p["w"] * A.arr(x.numpy()) + A.arr([[0.0, 2.0**-70], [0.0, 0.0]])).ravel()
        d = _first(list(h), False) - A.arr(t.numpy()).ravel()[0]
        return A.total(d * d)

    ex = check(NearTiePool(), _t(np.ones((2, 2))), _t(np.zeros((1, 1, 1, 1))), nn.MSELoss(), f,
               bits=bits)  # fmt: skip
    assert np.asarray(claims(ex, "grads/w").zero).ravel().tolist() == [True, False, True, True]


# ---- structural zeros through data movement ------------------------------------------------
class Between(nn.Module):
    def __init__(self, op: Op) -> None:
        super().__init__()
        self.conv, self.op, self.bn = nn.Conv1d(2, 3, 3), op, nn.BatchNorm1d(3)
        self.head = nn.LazyLinear(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.op(self.conv(x))).flatten(1))


@pytest.mark.parametrize(
    ("op", "zero"),
    [
        (lambda t: t.flip(-1), [0, 1, 2]),
        (lambda t: t.roll(2, -1), [0, 1, 2]),
        (lambda t: F.interpolate(t, scale_factor=2), [0, 1, 2]),
        (lambda t: F.pad(t, (2, 3), mode="reflect"), [0, 1, 2]),
        (lambda t: F.pad(t[:, None], (2, 3, 0, 0), mode="replicate")[:, 0], [0, 1, 2]),
        (lambda t: t.triu(), [0]),  # channels 1 and 2 lose elements: no identity
        (lambda t: t.roll(3), []),  # the flat roll moves elements across channels
    ],
    ids=["flip", "roll", "upsample", "reflection_pad", "replication_pad", "triu", "roll_flat"],
)
def test_batch_norm_removes_the_conv_bias_through_data_movement(op: Op, zero: list) -> None:
    """The conv bias in front of training-mode batch norm has a gradient of exactly 0 when
    the op between them moves each channel's elements within one channel (the identity rules
    of data movement and of the padding / upsampling backward sums); where it does not, no
    zero is claimed. Checked against torch float64 (tests/test_graph_identities.check)."""
    from tests.test_graph_identities import check as identity_check

    torch.manual_seed(0)
    model = Between(op)
    x = torch.randn(4, 2, 7)
    model(x)
    identity_check(model, (x,), torch.tensor([0, 1, 1, 0]), {"conv.bias": zero})


@pytest.mark.parametrize("lowest", [False, True])
def test_emulated_extremum_of_a_row_with_nan_is_its_first_nan(lowest: bool) -> None:
    """A machine's overflow can make NaN: torch's max/min along a dim return NaN and the
    index of the first NaN; so do the emulated machines (the exact systems have no NaN)."""
    x = np.array([[1.0, np.nan, 3.0, np.nan], [2.0, 5.0, -1.0, 5.0], [np.inf, 0.0, np.nan, 1.0]])
    cx = _cx("bfloat16")
    fn = ix.min_dim if lowest else ix.max_dim
    val, where = fn(cx, cx.ar.asarray(x), 1)
    ref = (torch.from_numpy(x).min if lowest else torch.from_numpy(x).max)(1)
    assert np.array_equal(where, ref.indices.numpy())
    assert np.array_equal(np.asarray(val), ref.values.numpy(), equal_nan=True)


@pytest.mark.parametrize(
    "op",
    [
        lambda h: F.pad(h, (1, 2, 1, 0, 2, 1), mode="replicate"),
        lambda h: F.pad(h, (1, 2, 1, 0, 2, 1), mode="reflect"),
        lambda h: F.interpolate(h, scale_factor=(2, 1, 3)),
        lambda h: F.interpolate(h, size=(5, 4, 7), mode="nearest-exact"),
        lambda h: F.interpolate(h.flatten(2), size=50, mode="nearest-exact"),
    ],
    ids=["replication_pad3d", "reflection_pad3d", "upsample_nearest3d", "nearest_exact3d",
         "nearest_exact1d"],
)  # fmt: skip
def test_3d_padding_and_upsampling(op: Op) -> None:
    """Native columns bit for bit; the exact gradients agree with torch float64 (1e-12)."""
    w = np.random.default_rng(8).standard_normal((1, 2, 3, 3, 4))
    model = Scale(op, w).float()
    x = torch.randn(1, 2, 3, 3, 4, generator=torch.Generator().manual_seed(9))
    y = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(10))
    cmp = compare(fpgrad.from_module(model, x, y, nn.MSELoss()), "float32,bfloat16")
    for prec, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        assert np.array_equal(
            cmp.values(prec)["w"], eager_grads(model, x, y, nn.MSELoss(), dtype)["w"]
        )
    ref = eager_grads(model, x, y, nn.MSELoss(), torch.float64)["w"]
    np.testing.assert_allclose(cmp.column("w").exact.hi, ref, rtol=1e-12, atol=1e-15)
