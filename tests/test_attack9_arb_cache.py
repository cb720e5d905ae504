"""Attack 9 on :data:`fpgrad.arith.arb._MATS`, the arb_mat cache keyed by ``id`` of an object
array: a stale matrix (an id reused after garbage collection, an entry evicted and refilled,
a transposed view, an array changed after its conversion) would multiply old balls.

Findings: none on the public paths. Ids freed by the collector are reused at once (checked
below), and the ``weakref.finalize`` that drops the entry with its array runs first; the
interpreter, the exact training run and the exact reference never write into an object
array after creating it (checked by a spy over whole runs: every cache hit holds the
array's current balls). Oracle: Python integers (the values are small integers).
"""

from __future__ import annotations

import gc
from typing import Any

import numpy as np
import pytest
from flint import arb

from fpgrad.arith import arb as arbmod
from fpgrad.arith import arb_kernels, arb_slices
from fpgrad.arith.arb import ArbArith


def _balls(values: np.ndarray) -> np.ndarray:
    out = np.empty(values.shape, dtype=object)
    for idx, v in np.ndenumerate(values):
        out[idx] = arb(int(v))
    return out


def _ints(balls: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda v: int(v.mid().man_exp()[0]) << int(v.mid().man_exp()[1]))(balls)


def test_ids_reused_after_collection_get_their_own_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arb_kernels, "available", lambda: False)  # the arb_mat path and its cache
    ar = ArbArith(64)
    rng = np.random.default_rng(1)
    b = _balls(rng.integers(-9, 10, (3, 2)))
    seen: set[int] = set()
    reused = 0
    for _ in range(40):
        x = rng.integers(-9, 10, (4, 3))
        a = _balls(x)
        reused += id(a) in seen
        seen.add(id(a))
        got = _ints(ar.matmul(a, b))
        assert np.array_equal(got, x @ _ints(b))
        got_t = _ints(ar.matmul(b.T, a.T))  # a.T: a view of a, converted through a
        assert np.array_equal(got_t, (x @ _ints(b)).T)
        del a
        gc.collect(0)  # (freed by reference count already; a full collection took 0.3 s here)
    assert reused > 0, "no id was reused: the test did not exercise the cache"


def test_eviction_and_refill_with_many_live_arrays() -> None:
    ar = ArbArith(64)
    rng = np.random.default_rng(2)
    xs = [rng.integers(-9, 10, (2, 2)) for _ in range(3 * arbmod._MATS_KEPT)]
    arrays = [_balls(x) for x in xs]
    for _ in range(2):  # the second round refills evicted entries
        for x, a in zip(xs, arrays, strict=True):
            assert np.array_equal(_ints(ar.matmul(a, a)), x @ x)
            assert np.array_equal(_ints(ar.matmul(a.T, a)), x.T @ x)
    assert len(arbmod._MATS) <= arbmod._MATS_KEPT + 1


def test_square_transpose_is_not_mistaken_for_the_array() -> None:
    ar = ArbArith(64)
    x = np.array([[1, 2], [3, 4]])
    a = _balls(x)
    ar.matmul(a, a)  # a cached
    assert np.array_equal(_ints(ar.matmul(a.T, a)), x.T @ x)
    assert np.array_equal(_ints(ar.matmul(a, a.T)), x @ x.T)
    flipped = a[::-1, ::-1]  # same data block, not a transpose
    assert np.array_equal(_ints(ar.matmul(flipped, a)), x[::-1, ::-1] @ x)


def _spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count cache hits whose matrix does not hold the array's current balls."""
    stats = {"hit": 0, "stale": 0}
    real = arbmod._kept_mat

    def kept(a: np.ndarray) -> Any:
        hit = id(a) in arbmod._MATS
        mat = real(a)
        if hit:
            stats["hit"] += 1
            now = a.ravel().tolist()
            ents = list(mat.entries())
            if not all(
                x.mid() == y.mid() and x.rad() == y.rad() for x, y in zip(ents, now, strict=True)
            ):
                stats["stale"] += 1
        return mat

    monkeypatch.setattr(arbmod, "_kept_mat", kept)
    return stats


def test_no_stale_matrix_on_exact_training_and_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from fpgrad.graph.layers import exact_trace
    from fpgrad.run.optim import OptimConfig
    from fpgrad.training import ExactRun, batch_schedule
    from tests.nets import net_from

    stats = _spy(monkeypatch)
    # the arb_mat path that holds the cache (the compiled kernels take small products without it)
    monkeypatch.setattr(arb_kernels, "available", lambda: False)
    monkeypatch.setattr(arb_slices, "MIN_PREC", 10**9)  # nor the slice products
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 3)).tolist()
    layers: list[dict[str, Any]] = [
        {"type": "dense", "out": 5},
        {"type": "relu"},
        {"type": "dense", "out": 3},
    ]
    for opt in (OptimConfig(lr=0.1, momentum=0.9), OptimConfig(name="adam", lr=0.01)):
        run = ExactRun(net_from(layers, "cross_entropy", x, [0, 1, 2, 0, 1, 2], seed=3), opt, 200)
        run.record_initial()
        for rows in batch_schedule(6, 8, 3, seed=1):
            run.step(rows)
    exact_trace(net_from(layers, "cross_entropy", x, [0, 1, 2, 0, 1, 2], seed=3), method="arb")
    assert stats["hit"] > 10 and stats["stale"] == 0, stats
