"""The compiled bit-pattern statistics against the torch paths they replace."""

from __future__ import annotations

import math

import pytest
import torch

from fpgrad.watching import bitstats, optimizer, optimizer_state
from fpgrad.watching.bitstats import bit_stats, bits_of, state_counts
from fpgrad.watching.classify import SMALLEST_NORMAL, basic_stats, op_stats
from fpgrad.watching.scratch import Scratch

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _specials(dt: torch.dtype) -> list[float]:
    fi = torch.finfo(dt)
    tiny = fi.smallest_normal
    sub = float(torch.tensor(tiny / 4, dtype=dt))
    return [0.0, -0.0, tiny, -tiny, sub, -sub, fi.max, -fi.max, math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("dt", DTYPES)
def test_bit_stats_is_basic_stats(dt: torch.dtype) -> None:
    """Every mix of zeros, -0.0, subnormals, max finite, infs, NaNs and normals, and empty."""
    sp = _specials(dt)
    g = torch.Generator().manual_seed(0)
    cases = [[], [0.0], [-0.0], [math.nan], [sp[4]], [1.0, 2.0]]
    for _ in range(400):
        k = int(torch.randint(0, 12, (1,), generator=g))
        idx = torch.randint(0, len(sp), (k,), generator=g).tolist()
        normals = torch.randn(int(torch.randint(0, 5, (1,), generator=g)), generator=g).tolist()
        cases.append([sp[i] for i in idx] + normals)
    seen = set()
    for vals in cases:
        t = torch.tensor(vals, dtype=torch.float64).to(dt)
        got, want = bit_stats(t), basic_stats(t, SMALLEST_NORMAL[dt])
        assert str(got) == str(want), (dt, vals)  # str: NaN-free dicts, None and -0.0 alike
        assert str(bit_stats(t, dense=True)) == str(want), (dt, vals)  # one counting pass
        assert got is not None
        seen.add(tuple(bool(got[c]) for c in ("zeros", "subnormals", "infs", "nans")))
    assert len(seen) == 16  # every combination of the four counts, zero or not, was checked


def test_bits_of_declines_other_layouts() -> None:
    t = torch.randn(4, 6)
    assert bits_of(t.t()) is None  # non-contiguous: the torch path
    assert bits_of(t.to(torch.int32)) is None
    assert bits_of(t.t()) is None and bit_stats(t.t()) is None


def test_op_stats_same_on_non_contiguous() -> None:
    """A transposed output (torch path) gives the record of its contiguous copy (bit path)."""
    x = torch.tensor([[0.0, 1e-40, 2.0], [3.0, -0.0, float("inf")]])
    f = torch.ops.aten.clone.default
    a = op_stats(f, (x.t(),), {}, x.t())
    b = op_stats(f, (x.t().contiguous(),), {}, x.t().contiguous())
    assert a == b and a[0]["zeros"] == 2 and a[0]["subnormals"] == 1 and a[0]["infs"] == 1


@pytest.mark.parametrize("dt", DTYPES)
def test_state_counts_is_flat_path(dt: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adam-like states with zeros, subnormals and values on both sides of every threshold
    (smallest normal, the eps band): the same counts as the torch flat path, or None alike."""
    eps = 1e-3 if dt in (torch.float16, torch.bfloat16) else 1e-8
    t_lo = optimizer_state._eps_threshold(dt, eps * (1 - 2.0**-30))
    t_hi = optimizer_state._eps_threshold(dt, eps * (1 + 2.0**-30))
    sn = SMALLEST_NORMAL[dt]
    sub = float(torch.tensor(sn / 4, dtype=dt))
    g = torch.Generator().manual_seed(1)
    compared = 0
    for trial in range(60):
        below = float(torch.nextafter(torch.tensor(t_lo, dtype=dt), torch.tensor(0, dtype=dt)))
        picks = [0.0, -0.0, sub, sn, below, t_hi, 1.0, float(torch.finfo(dt).max)]
        if trial % 5 == 0:
            picks.append(t_lo)  # in the band for wide formats: None
        params, states, groups = [], [], []
        for j in range(3):
            n = 1 + j * 5
            idx = torch.randint(0, len(picks), (n,), generator=g)
            sq = torch.tensor([picks[i] for i in idx], dtype=torch.float64).to(dt)
            avg = (torch.randn(n, generator=g) * 1e-39).to(dt) if trial % 2 else sq.neg()
            if trial == 7 and j == 1:
                avg[0] = math.nan  # not finite: None
            if trial == 9 and j == 2:
                sq[0] = -1.0  # a negative exp_avg_sq: None
            params.append(torch.zeros(n, dtype=dt))
            states.append({"step": torch.tensor(1.0), "exp_avg": avg, "exp_avg_sq": sq})
            groups.append({"eps": eps})
        ents = list(zip(groups, params, strict=True))
        got = optimizer_state._flat_state_counts(ents, states, Scratch())
        bitstats._STATE_DENSE.update(id(v) for st in states for v in st.values())
        assert optimizer_state._flat_state_counts(ents, states, Scratch()) == got  # counted at once
        bitstats._STATE_DENSE.clear()
        monkeypatch.setattr(optimizer_state, "state_counts", lambda *a: None)
        want = optimizer_state._flat_state_counts(ents, states, Scratch())
        monkeypatch.undo()
        assert (got is None) == (want is None), trial
        assert got == want, trial  # ints against the flat path's float sums
        compared += got is not None
    assert compared >= 20  # most trials have counts (some fall back near eps)
    per = [[("exp_avg_sq", torch.zeros(4, dtype=dt)[::2])]]  # no bit view: None
    assert state_counts(per, {0: eps}, optimizer_state._eps_threshold) is None


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("transposed", [False, True])
def test_mm_structural_kernel_is_the_torch_check(
    dt: torch.dtype, transposed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sparse factors (dead rows / columns, scattered zeros, a cancellation, subnormal factors),
    # strided like autograd's mm of a transposed activation; the compiled count of overlapping
    # zeros must give the torch paths' answer (mm_overlaps switched off) and a brute force one
    from fpgrad.watching import structural

    mm = torch.ops.aten.mm.default
    tiny = torch.finfo(dt).tiny / 4
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        m, k, n = 7 + seed, 70 + 3 * seed, 5 + 2 * seed
        a = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) < 0.1)
        b = torch.randn(k, n, generator=g) * (torch.rand(k, n, generator=g) < 0.2)
        a[seed % m] = 0
        b[:, seed % n] = 0
        if seed % 3 == 0:  # 1*1 + 1*(-1): an exact zero of overlapping supports
            a[1], b[:, 1] = 0, 0
            a[1, :2], b[:2, 1] = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0])
        if seed % 4 == 1:  # subnormal factors of the format
            a[2, 5] = tiny
        a, b = a.to(dt), b.to(dt)
        if transposed:
            a = a.t().contiguous().t()
        t = mm(a, b)
        zeros = int((t == 0).sum())
        if not zeros or not torch.isfinite(t).all():
            continue
        supports = (a.double() != 0).double() @ (b.double() != 0).double()
        brute = bool(((t != 0) | (supports == 0)).all())
        fast = structural._mm_zeros_structural(mm, (a, b), t, zeros)
        with monkeypatch.context() as mp:
            mp.setattr(structural, "mm_overlaps", lambda *_: None)
            slow = structural._mm_zeros_structural(mm, (a, b), t, zeros)
        assert fast == slow == brute, (seed, fast, slow, brute)
        assert bitstats.mm_overlaps(a, b, t) == int(((t == 0) & (supports > 0)).sum())


def test_mm_overlaps_declines_non_finite_inputs() -> None:
    a = torch.tensor([[float("inf"), 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert bitstats.mm_overlaps(a, b, torch.zeros(2, 2)) == -1
    assert bitstats.mm_overlaps(b, a, torch.zeros(2, 2)) == -1
    t = torch.tensor([[0.0, float("nan")], [0.0, 1.0]])
    assert bitstats.mm_overlaps(b, b, t) == -1
    assert bitstats.mm_overlaps(b, b.double(), t) is None  # formats differ: the torch path


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_update_counts_kernel_is_the_torch_path(dt: torch.dtype, monkeypatch) -> None:
    # weights from about 1e-4 to 1e7 (1e13 in float64) and Adam's lr 1e-4: the large ones cannot
    # move (swamped), the small ones do; a parameter of 3000 elements (its swamped map kept) and one of 5000 (not):
    # the compiled pass (d, counts, maps) must record what the torch path records
    import fpgrad

    def records() -> tuple[list[dict], list[torch.Tensor]]:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(60, 50), torch.nn.Linear(50, 100)).to(dt)
        with torch.no_grad():
            for p in m.parameters():
                top = 8 if dt == torch.float32 else 14
                p.mul_(10.0 ** torch.randint(-3, top, p.shape).to(dt))
        opt = torch.optim.Adam(m.parameters(), lr=1e-4)
        x = torch.randn(8, 60, dtype=dt)
        with fpgrad.watch(m, opt) as w:
            for _ in range(2):
                opt.zero_grad()
                m(x).square().mean().backward()
                opt.step()
        recs = [r for r in w._records if r["kind"] == "optimizer"]
        return recs, [p.detach().clone() for p in m.parameters()]

    fast, pf = records()
    if dt == torch.float32:  # (float64 weights: the float64 request is the update done)
        assert any(0 < r["swamped"] < r["numel"] for r in fast)
    assert any(0 < r["moved_share"] < 1 for r in fast)
    assert {r["swamped_map"] is None for r in fast} == {True, False}
    with monkeypatch.context() as mp:
        mp.setattr(optimizer, "update_counts", lambda *_: None)
        slow, ps = records()
    assert len(fast) == len(slow) == 8
    for a, b in zip(fast, slow, strict=True):
        assert a == b
    assert all(torch.equal(a, b) for a, b in zip(pf, ps, strict=True))
