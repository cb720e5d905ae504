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
        lambda h: h.scatter_add(0, _i(AIDX), h[:3, :3] * h[1:4, 2:5]), _scatter_add
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
        lambda h: F.interpolate(h[None], scale_factor=2), lambda h: _up(h, (12,))[None]
    ),  # fmt: skip
    "upsample_nearest2d": (
        lambda h: F.interpolate(h[None, None], size=(5, 9)), lambda h: _up(h, (5, 9))[None, None]
    ),  # fmt: skip
    "upsample_nearest_exact2d": (
        lambda h: F.interpolate(h[None, None], size=(7, 4), mode="nearest-exact"),
        lambda h: _up(h, (7, 4), True)[None, None],
    ),
}


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
    cmp = compare(net, "float16,bfloat16,float32")
    for prec, dtype in [("float16", torch.float16), ("bfloat16", torch.bfloat16),
                        ("float32", torch.float32)]:  # fmt: skip
        ref = eager_grads(model, x32, y, nn.MSELoss(), dtype)
        assert np.array_equal(cmp.values(prec)["w"], ref["w"]), prec


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_claims_meet_the_interval_oracle(case: str) -> None:
    op, oracle = CASES[case]
    w, x = _data(3)
    t = _t(np.random.default_rng(4).standard_normal(tuple(op(_t(w) * x).shape)))
    check(Scale(op, w), x, t, nn.MSELoss(), _mse_oracle(oracle))
