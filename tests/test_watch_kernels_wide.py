"""The bit-pattern kernels on tensors long enough for their vectorised loops (and the scalar
remainders after them): the same counts and magnitudes as the torch paths and a numpy count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fpgrad.watching import bitstats, optimizer_state
from fpgrad.watching.bitstats import bit_stats, state_counts
from fpgrad.watching.classify import SMALLEST_NORMAL, basic_stats

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: lengths around vector widths (4 to 32 lanes, unrolled) and a few long ones
SIZES = (1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 255, 1000, 4097, 65537)


def _specials(dt: torch.dtype) -> list[float]:
    fi = torch.finfo(dt)
    tiny = fi.smallest_normal
    sub = float(torch.tensor(tiny / 4, dtype=dt))
    least = bitstats.decode(dt, 1)  # the smallest subnormal
    return [0.0, -0.0, tiny, -tiny, sub, -sub, least, -least, fi.max, -fi.max,
            math.inf, -math.inf, math.nan]  # fmt: skip


def _case(dt: torch.dtype, n: int, g: torch.Generator, kinds: list[int]) -> torch.Tensor:
    """``n`` normals (signs mixed, some huge) with a few specials of ``kinds`` at random places
    (the first, the last and the middle included)."""
    sp = _specials(dt)
    t = (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dt)
    t[t == 0] = 1.0
    places = {0, n - 1, n // 2} | set(torch.randint(0, n, (4,), generator=g).tolist())
    for i, p in enumerate(sorted(places)):
        if kinds:
            t[p] = sp[kinds[i % len(kinds)]]
    return t


def _numpy_stats(t: torch.Tensor) -> dict:
    """The counts from numpy on float64 values (exact for the four formats)."""
    x = t.double().numpy()
    fin = np.isfinite(x)
    a = np.abs(x)
    sn = SMALLEST_NORMAL[t.dtype]
    nz = fin & (a != 0)
    return {
        "zeros": int((a == 0).sum()),
        "subnormals": int((nz & (a < sn)).sum()),
        "infs": int(np.isinf(x).sum()),
        "nans": int(np.isnan(x).sum()),
        "min_abs": float(a[nz].min()) if nz.any() else None,
        "max_abs": float(a[nz].max()) if nz.any() else None,
    }


@pytest.mark.parametrize("dt", DTYPES)
def test_bit_stats_on_long_tensors(dt: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    groups = [[], [0], [1], [4], [6], [7], [0, 4], [10], [12], [0, 10, 12], [8, 9], [2, 3]]
    for n in SIZES:
        for kinds in groups:
            t = _case(dt, n, g, kinds)
            want = _numpy_stats(t)
            assert str(basic_stats(t, SMALLEST_NORMAL[dt])) == str(want), (dt, n, kinds)
            assert str(bit_stats(t)) == str(want), (dt, n, kinds)
            assert str(bit_stats(t, dense=True)) == str(want), (dt, n, kinds)
        z = torch.zeros(n, dtype=dt)
        assert str(bit_stats(z, dense=True)) == str(_numpy_stats(z)) == str(bit_stats(z))


@pytest.mark.parametrize("dt", DTYPES)
def test_state_counts_on_long_tensors(dt: torch.dtype) -> None:
    """Long Adam-like states, the same counts as numpy (zeros, subnormals, elements below the
    eps threshold); a negative or non-finite ``exp_avg_sq`` anywhere gives None."""
    eps = 1e-3 if dt in (torch.float16, torch.bfloat16) else 1e-8
    thr = optimizer_state._eps_threshold(dt, eps)
    g = torch.Generator().manual_seed(5)
    sp = _specials(dt)
    for n in SIZES:
        for trial in range(4):
            sq = (torch.rand(n, generator=g, dtype=torch.float64) * 4 * thr + thr / 2).to(dt)
            avg = _case(dt, n, g, [0, 1, 4, 6] if trial % 2 else [])
            if trial >= 2:
                sq[n // 3] = sp[4]  # a subnormal
                sq[-1] = 0.0
            lo = optimizer_state._eps_threshold(dt, eps * (1 - 2.0**-30))
            hi = optimizer_state._eps_threshold(dt, eps * (1 + 2.0**-30))
            near = ((sq.double() >= lo) & (sq.double() < hi)).any()
            for bitstats_dense in (False, True):
                if bitstats_dense:
                    bitstats._STATE_DENSE.update((id(sq), id(avg)))
                got = state_counts(
                    [[("exp_avg", avg), ("exp_avg_sq", sq)]],
                    {0: eps},
                    optimizer_state._eps_threshold,
                )
                bitstats._STATE_DENSE.clear()
                if near:
                    assert got is None
                    continue
                assert got is not None, (dt, n, trial)
                (vals, keys), below = got[0][0], got[1][0]
                assert keys == ["exp_avg", "exp_avg_sq"]
                wa, ws = _numpy_stats(avg), _numpy_stats(sq)
                assert vals == [wa["zeros"], wa["subnormals"], ws["zeros"], ws["subnormals"]]
                assert below == int((sq.double() < thr).sum()), (dt, n, trial)
            for bad in (-1.0, math.inf, math.nan):
                s2 = sq.clone()
                s2[n // 2] = bad
                got = state_counts([[("exp_avg_sq", s2)]], {0: eps}, optimizer_state._eps_threshold)
                assert got is None, (dt, n, bad)


def test_count_not_equal_is_torchs_count() -> None:
    from fpgrad.watching.passes import count_not_equal

    g = torch.Generator().manual_seed(2)
    for n in SIZES:
        for dt in (torch.int64, torch.int32):
            t = torch.randint(-3, 4, (n,), generator=g).to(dt)
            for v in (-100, -3, 0, 3):
                assert count_not_equal(t, v) == int((t != v).sum()), (n, dt, v)
    t = torch.zeros(4, 3, dtype=torch.int64)
    assert count_not_equal(t.t(), 0) is None  # non-contiguous: torch's count
    assert count_not_equal(t.to(torch.int16), 0) is None
    assert count_not_equal(t.to(torch.int32), 2**40) is None  # not an int32


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_pending_updates_settle_as_torch_subtracts(dt: torch.dtype) -> None:
    """The shadow's updates given the weights before: read through ``get`` (torch's
    subtraction) or settled by step_records' compiled pass, the same tensors, bit for bit, and
    the same records as from updates subtracted at once."""
    from fpgrad.watching import optimizer
    from fpgrad.watching.scratch import Scratch
    from fpgrad.watching.shadow_optimizer import PendingUpdates, ShadowOptimizer

    def setup() -> tuple:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(30, 70), torch.nn.Linear(70, 3)).to(dt)
        with torch.no_grad():  # large weights: some updates swamped in float32
            m[0].weight.mul_(10.0 ** torch.randint(-2, 7, m[0].weight.shape).to(dt))
        opt = torch.optim.Adam(m.parameters(), lr=1e-4)
        for _ in range(2):
            opt.zero_grad()
            m(torch.randn(5, 30, dtype=dt)).square().mean().backward()
            if _ == 0:
                opt.step()
        params = list(m.parameters())
        before = {id(p): p.detach().to(torch.float64, copy=True) for p in params}
        names = {id(p): n for n, p in m.named_parameters()}
        return m, opt, params, before, names

    _, opt, params, before, _ = setup()
    pend = ShadowOptimizer().requested_updates(opt, before)
    assert isinstance(pend, PendingUpdates) and not pend.settled
    now = {k: v.clone() for k, v in ShadowOptimizer().requested_updates(opt).items()}
    assert all(torch.equal(pend.get(k), now[k]) for k in now) and pend.settled

    recs = []
    for lazy in (True, False):
        _, opt, params, before, names = setup()
        req = ShadowOptimizer().requested_updates(opt, before if lazy else None)
        assert isinstance(req, PendingUpdates) == lazy
        opt.step()
        got = optimizer.step_records(opt, names, before, req, Scratch())
        if lazy:
            assert req.settled
        recs.append((got, {k: dict.__getitem__(req, k).clone() for k in req}))
    (a, ra), (b, rb) = recs
    assert a == b and any(r["swamped"] for r in a) == (dt == torch.float32)
    va, vb = list(ra.values()), list(rb.values())  # (ids differ: two models, same order)
    assert len(va) == len(vb) == 4 and all(torch.equal(x, y) for x, y in zip(va, vb, strict=True))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_mm_overlaps_few_and_many_zeros(dt: torch.dtype, transposed: bool) -> None:
    """Dense factors with a few exact zeros in the product (one by cancellation of overlapping
    supports, one of disjoint supports), and sparse ones with many: the count of zeros with an
    overlapping pair is the brute-force count on both sides of the few-zeros switch."""
    g = torch.Generator().manual_seed(4)
    for trial in range(16):
        m, k, n = 20 + trial, 40 + 3 * trial, 30 + 2 * trial
        dens = 1.0 if trial % 2 else 0.15
        a = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) < dens)
        b = torch.randn(k, n, generator=g) * (torch.rand(k, n, generator=g) < dens)
        a[0], b[:, 0] = 0, 0
        a[0, :2], b[:2, 0] = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0])  # cancels
        a[1], b[:, 1] = 0, 1.0
        a[1, 3], b[3, 1] = 2.0, 0.0  # disjoint supports
        a, b = a.to(dt), b.to(dt)
        if transposed:
            a = a.t().contiguous().t()
        t = torch.ops.aten.mm.default(a, b)
        if not torch.isfinite(t).all():
            continue
        supports = (a.double() != 0).double() @ (b.double() != 0).double()
        want = int(((t == 0) & (supports > 0)).sum())
        assert t[0, 0] == 0 and t[1, 1] == 0
        assert bitstats.mm_overlaps(a, b, t) == want, (dt, trial)
        bad = a.clone()
        bad[m - 1, k - 1] = math.inf
        assert bitstats.mm_overlaps(bad, b, t) == -1
        bad = b.clone()
        bad[k - 1, n - 1] = math.nan
        assert bitstats.mm_overlaps(a, bad, t) == -1


@pytest.mark.parametrize("read", ["dict", "splat", "copy", "iter"])
def test_pending_updates_settle_on_every_whole_read(read: str) -> None:
    """dict(x), {**x}, x.copy() and iteration see the updates, never the raw new weights."""
    from fpgrad.watching.shadow_optimizer import PendingUpdates

    qs = [torch.tensor([3.0, 5.0], dtype=torch.float64)]
    ws = [torch.tensor([1.0, 1.0], dtype=torch.float64)]
    pend = PendingUpdates({7: qs[0]}, qs, ws)
    if read == "iter":
        keys = list(pend)
        got = {k: dict.__getitem__(pend, k) for k in keys}
    else:
        got = {"dict": dict, "splat": lambda p: {**p}, "copy": lambda p: p.copy()}[read](pend)
    assert pend.settled and torch.equal(got[7], torch.tensor([2.0, 4.0], dtype=torch.float64))
