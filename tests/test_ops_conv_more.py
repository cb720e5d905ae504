"""Convolution-family ops (:mod:`fpgrad.graph.ops.conv_more`, :mod:`fpgrad.graph.ops.resample`):
transposed convolution 1-3d, 3-D convolution, adaptive max pooling, 3-D max pooling, bilinear
upsampling, pixel (un)shuffle.

Each op in a small model: the native columns (bfloat16, float32, float64) equal torch eager
autograd bit for bit, the exact reference certifies and agrees with torch float64, an emulated
column runs; the exact enclosures contain an independent interval oracle
(:mod:`tests.oracle.interval_ad`, each op written from its definition: sums over the kernel,
first maxima in scan order, rational interpolation weights); ties in max pooling are decided
as torch decides them, a 2^-70 near tie the float64 midpoints cannot see is decided exactly;
the emulated machine against :func:`fpgrad.round_to` applied op by op.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from fractions import Fraction
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpmath import iv
from torch import nn

import fpgrad
from fpgrad.arith.emulated import EmulatedArith
from fpgrad.graph.exact import exact_graph
from fpgrad.graph.ops import conv_more, resample
from tests.oracle import interval_ad as A
from tests.test_attack5_certificates import _t, check


class Up(nn.Module):
    """Conv2d(2, 2, 3) -> F.interpolate(bilinear, **kw) -> Flatten -> LazyLinear(3)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__()
        self.c, self.kw, self.o = nn.Conv2d(2, 2, 3), kw, nn.LazyLinear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(F.interpolate(self.c(x), mode="bilinear", **self.kw).flatten(1))


class UNetLike(nn.Module):
    """Conv, adaptive max pool, conv, transposed conv + bilinear up, skip concat, conv,
    pixel shuffle, average pool, 1x1 conv, spatial mean."""

    def __init__(self) -> None:
        super().__init__()
        self.e1, self.e2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)
        self.t, self.c = nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Conv2d(8, 4, 3, padding=1)
        self.ps, self.o = nn.Conv2d(4, 8, 1), nn.Conv2d(2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.e1(x))
        b = F.relu(self.e2(F.adaptive_max_pool2d(a, (x.shape[-2] // 2, x.shape[-1] // 2))))
        up = F.interpolate(b[:, :4], scale_factor=2, mode="bilinear", align_corners=True)
        h = F.relu(self.c(torch.cat([self.t(b) + up, a], 1)))
        return self.o(F.avg_pool2d(F.pixel_shuffle(self.ps(h), 2), 2)).mean((-1, -2))


def _seq(*m: nn.Module) -> nn.Module:
    return nn.Sequential(*m, nn.Flatten(), nn.LazyLinear(3))


def _r(*s: int) -> torch.Tensor:
    return torch.randn(*s)


MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "convT2d_stride": lambda: (_seq(nn.ConvTranspose2d(2, 2, 3, stride=2)), _r(4, 2, 4, 4)),
    "convT2d_all_options": lambda: (
        _seq(
            nn.ConvTranspose2d(
                4,
                6,
                (3, 2),
                stride=(2, 3),
                padding=(1, 0),
                output_padding=(1, 2),
                dilation=(1, 2),
                groups=2,
            )
        ),
        _r(4, 4, 4, 5),
    ),  # fmt: skip
    "convT1d": lambda: (
        _seq(nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2)),
        _r(4, 2, 5),
    ),
    "convT3d": lambda: (_seq(nn.ConvTranspose3d(2, 2, 2, stride=2)), _r(4, 2, 2, 3, 2)),
    "conv3d": lambda: (
        _seq(
            nn.Conv3d(
                2, 4, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2), groups=2
            )
        ),
        _r(4, 2, 4, 5, 5),
    ),  # fmt: skip
    "adaptive_max_down": lambda: (
        _seq(nn.Conv2d(2, 2, 3), nn.AdaptiveMaxPool2d((3, 2))),
        _r(4, 2, 7, 6),
    ),  # fmt: skip
    "adaptive_max_up": lambda: (
        _seq(nn.Conv2d(2, 2, 3), nn.AdaptiveMaxPool2d((5, 7))),
        _r(4, 2, 6, 6),
    ),  # fmt: skip
    "adaptive_max_tanh": lambda: (
        _seq(nn.Conv2d(2, 2, 3), nn.Tanh(), nn.AdaptiveMaxPool2d(3)),
        _r(4, 2, 7, 7),
    ),
    "max_pool3d": lambda: (_seq(nn.Conv3d(1, 2, 2), nn.MaxPool3d(2)), _r(4, 1, 5, 5, 5)),
    "max_pool3d_pad_ceil_dilation": lambda: (
        _seq(
            nn.Conv3d(1, 2, 2),
            nn.MaxPool3d(3, stride=2, padding=1, dilation=(1, 2, 1), ceil_mode=True),
        ),
        _r(4, 1, 6, 7, 6),
    ),  # fmt: skip
    "pixel_shuffle_unshuffle": lambda: (
        _seq(nn.Conv2d(4, 8, 1), nn.PixelShuffle(2), nn.Conv2d(2, 2, 1), nn.PixelUnshuffle(2)),
        _r(4, 4, 2, 3),
    ),
    "bilinear_scale2": lambda: (Up(scale_factor=2, align_corners=False), _r(4, 2, 6, 6)),
    "bilinear_scale1.7": lambda: (Up(scale_factor=1.7, align_corners=False), _r(4, 2, 6, 6)),
    "bilinear_scales_hw_down": lambda: (Up(scale_factor=(0.6, 1.3)), _r(4, 2, 7, 6)),
    "bilinear_size_align": lambda: (Up(size=(5, 7), align_corners=True), _r(4, 2, 6, 6)),
    "bilinear_size_down": lambda: (Up(size=(3, 9), align_corners=False), _r(4, 2, 6, 6)),
    "bilinear_same_size": lambda: (Up(size=(4, 3), align_corners=True), _r(4, 2, 6, 5)),
    "unet_like": lambda: (UNetLike(), _r(4, 2, 10, 8)),
    "adaptive_max_1d": lambda: (_seq(nn.Conv1d(2, 3, 2), nn.AdaptiveMaxPool1d(4)), _r(4, 2, 9)),
    "adaptive_max_none_size": lambda: (
        _seq(nn.Conv2d(2, 3, 2), nn.AdaptiveMaxPool2d((None, 2))),
        _r(4, 2, 5, 6),
    ),
    "upsampling_bilinear2d_module": lambda: (
        _seq(nn.Conv2d(2, 3, 2), nn.UpsamplingBilinear2d(scale_factor=2)),
        _r(4, 2, 4, 3),
    ),
}


def _eager(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> dict:
    m = copy.deepcopy(model).to(dtype)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nn.CrossEntropyLoss()(m(x.to(dtype)), y).backward()
    finally:
        torch.set_num_threads(n)
    return {k: p.grad.double().numpy() for k, p in m.named_parameters()}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_native_bit_for_bit_exact_certified_emulated_runs(case: str) -> None:
    torch.manual_seed(0)
    model, x = MODELS[case]()
    model(x)  # LazyLinear's shape
    y = torch.tensor([0, 1, 2, 0])
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    natives = [("bfloat16", torch.bfloat16), ("float32", torch.float32), ("float64", torch.float64)]
    cmp = fpgrad.compare(net, ",".join([*(p for p, _ in natives), "bfloat16:emulated"]))
    for prec, dtype in natives:
        ref = _eager(model, x, y, dtype)
        for name in net.param_names:
            assert np.array_equal(cmp.values(prec)[name], ref[name]), (prec, name)
    assert cmp.certified_digits >= 17
    r64 = _eager(model, x, y, torch.float64)
    scale = max(float(np.abs(r).max()) for r in r64.values())
    for name, r in r64.items():
        e = cmp.column(name).exact
        assert not e.undetermined_mask().any(), name
        noise = e.zero & (np.abs(r) <= 1e-12 * scale)
        np.testing.assert_allclose(
            e.hi[~noise], r[~noise], rtol=1e-8, atol=1e-14 * scale, err_msg=name
        )
    em = cmp.values("bfloat16:emulated")
    for name in net.param_names:
        assert np.isfinite(em[name]).all(), name
        assert not np.array_equal(em[name], r64[name]), name  # rounded: not float64's values


# ---- the interval oracle (tests.oracle.interval_ad), each op from its definition ------------
SYSTEMS = [None, 256]  # the fast balls first, and Arb from the start
_ZERO = A.V(0)


def _mse(out: np.ndarray, t: torch.Tensor) -> A.V:
    d = out - A.arr(t.numpy())
    return A.total(d * d) / d.size


def _sum(terms: list) -> A.V:
    out = _ZERO if not terms else terms[0]
    for v in terms[1:]:
        out = out + v
    return out


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, s: tuple, p: tuple, d: tuple,
          groups: int) -> np.ndarray:  # fmt: skip
    """y[n, o, j] = b[o] + sum_{c in o's group, k} x[n, c, j s - p + k d] w[o, c, k]."""
    n, c = x.shape[:2]
    o, cg, *ks = w.shape
    og, size = o // groups, x.shape[2:]
    out_size = [(z + 2 * pp - dd * (k - 1) - 1) // ss + 1 for z, pp, dd, k, ss in
                zip(size, p, d, ks, s, strict=True)]  # fmt: skip
    y = np.empty((n, o, *out_size), dtype=object)
    for i, oo, *j in itertools.product(range(n), range(o), *(range(z) for z in out_size)):
        g, terms = oo // og, []
        for cc in range(cg):
            for k in itertools.product(*(range(kk) for kk in ks)):
                pos = [
                    jj * ss - pp + kk * dd for jj, ss, pp, kk, dd in zip(j, s, p, k, d, strict=True)
                ]
                if all(0 <= q < z for q, z in zip(pos, size, strict=True)):
                    terms.append(x[(i, g * cg + cc, *pos)] * w[(oo, cc, *k)])
        y[(i, oo, *j)] = _sum(terms) + b[oo]
    return y


def _conv_t(x: np.ndarray, w: np.ndarray, b: np.ndarray, s: tuple, p: tuple, op_: tuple,
            d: tuple, groups: int) -> np.ndarray:  # fmt: skip
    """y[n, g og + o, i s - p + k d] += x[n, c, i] w[c, o, k] (c in group g), plus b."""
    n, c = x.shape[:2]
    _, og, *ks = w.shape
    cg, size = c // groups, x.shape[2:]
    out_size = [(z - 1) * ss - 2 * pp + dd * (k - 1) + e + 1 for z, ss, pp, dd, k, e in
                zip(size, s, p, d, ks, op_, strict=True)]  # fmt: skip
    terms: dict[tuple, list] = {}
    for i, cc, *j in itertools.product(range(n), range(c), *(range(z) for z in size)):
        g = cc // cg
        for oo in range(og):
            for k in itertools.product(*(range(kk) for kk in ks)):
                pos = tuple(
                    jj * ss - pp + kk * dd for jj, ss, pp, kk, dd in zip(j, s, p, k, d, strict=True)
                )
                if all(0 <= q < z for q, z in zip(pos, out_size, strict=True)):
                    terms.setdefault((i, g * og + oo, *pos), []).append(
                        x[(i, cc, *j)] * w[(cc, oo, *k)]
                    )
    y = np.empty((n, og * groups, *out_size), dtype=object)
    for idx in np.ndindex(y.shape):
        y[idx] = _sum(terms.get(idx, [])) + b[idx[1]]
    return y


class Conv(nn.Module):
    """A convolution module applied to w * x (a parameter per input element)."""

    def __init__(self, w: np.ndarray, conv: nn.Module) -> None:
        super().__init__()
        self.w, self.conv = nn.Parameter(_t(w)), conv.double()
        rng = np.random.default_rng(3)
        with torch.no_grad():  # exact float64 weights of a few bits
            self.conv.weight.copy_(
                _t(np.round(rng.standard_normal(self.conv.weight.shape) * 8) / 8)
            )
            self.conv.bias.copy_(_t(np.linspace(-0.5, 0.5, self.conv.bias.numel())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.w * x)


CONVS = {
    "convT1d": (lambda: nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1,
                                           groups=2), (1, 2, 3)),
    "convT2d": (lambda: nn.ConvTranspose2d(2, 2, (2, 3), stride=(2, 1), padding=(0, 1),
                                           output_padding=(1, 0), dilation=(1, 2)), (1, 2, 2, 3)),
    "convT3d": (lambda: nn.ConvTranspose3d(1, 2, 2, stride=(1, 2, 1)), (1, 1, 2, 2, 2)),
    "conv3d": (lambda: nn.Conv3d(2, 2, (2, 1, 2), stride=(1, 1, 2), padding=(1, 0, 0),
                                 dilation=(1, 1, 1), groups=2), (1, 2, 2, 2, 3)),
}  # fmt: skip


@pytest.mark.parametrize("bits", SYSTEMS)
@pytest.mark.parametrize("case", sorted(CONVS))
def test_convolutions_against_the_oracle(case: str, bits: int | None) -> None:
    """Inputs spanning 1e-300 .. 1e300 (products and sums far outside float64's rounding)."""
    make, shape = CONVS[case]
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    flat = x.reshape(-1)
    flat[0], flat[1], flat[-1] = 1e300, -1e-300, 3e-300
    w = rng.standard_normal(shape)
    model = Conv(w, make())
    m = model.conv
    with torch.no_grad():
        t = torch.zeros_like(model(_t(x)))
    t = _t(rng.standard_normal(tuple(t.shape)))

    def oracle(p: dict, x_: torch.Tensor, t_: torch.Tensor) -> A.V:
        h = p["w"] * A.arr(x_.numpy())
        geo = (tuple(m.stride), tuple(m.padding))
        if m.transposed:
            y = _conv_t(h, p["conv.weight"], p["conv.bias"], *geo, tuple(m.output_padding),
                        tuple(m.dilation), m.groups)  # fmt: skip
        else:
            y = _conv(h, p["conv.weight"], p["conv.bias"], *geo, tuple(m.dilation), m.groups)
        return _mse(y, t_)

    ex = check(model, _t(x), t, nn.MSELoss(), oracle, bits=bits)
    assert ex.certified_digits >= 17


class Shifted(nn.Module):
    """f(w * x + c), w and c of x's shape: c lifts an element by less than float64 resolves."""

    def __init__(self, w: np.ndarray, c: np.ndarray, f: Callable[[torch.Tensor], Any]) -> None:
        super().__init__()
        self.w, self.c, self.f = nn.Parameter(_t(w)), nn.Parameter(_t(c)), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.f(self.w * x + self.c)
        return out[0] if isinstance(out, tuple) else out


def _adaptive_windows(n: int, o: int) -> list[range]:
    """torch's adaptive window i: [floor(i n / o), ceil((i + 1) n / o))."""
    return [range((i * n) // o, -(-((i + 1) * n) // o)) for i in range(o)]


def _max_pool_oracle(windows: Callable[[tuple], list[list[range]]]) -> Callable[..., A.V]:
    """Each output the first maximum (A.first_max) of its window scanned row-major."""

    def oracle(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
        h = p["w"] * A.arr(x.numpy()) + p["c"]
        wins = windows(h.shape[2:])
        out = np.empty((*h.shape[:2], *(len(w) for w in wins)), dtype=object)
        for idx in np.ndindex(out.shape):
            cells = [h[(*idx[:2], *pos)] for pos in itertools.product(
                *(wins[a][i] for a, i in enumerate(idx[2:])))]  # fmt: skip
            out[idx] = A.first_max(cells)
        return _mse(out, t)

    return oracle


def _pool3_windows(k: int, s: int, p: int) -> Callable[[tuple], list[list[range]]]:
    def wins(size: tuple) -> list[list[range]]:
        return [[range(max(0, j * s - p), min(n, j * s - p + k))
                 for j in range((n + 2 * p - k) // s + 1)] for n in size]  # fmt: skip

    return wins


@pytest.mark.parametrize("bits", SYSTEMS)
@pytest.mark.parametrize("pool", ["adaptive", "pool3d"])
def test_max_pooling_ties_and_a_near_tie_against_the_oracle(pool: str, bits: int | None) -> None:
    """Exact ties (equal values: the first wins, as in torch), 2 then 2 + 2^-70 in one
    window (float64 rounds both to 2; exactly the later one is above: it takes the gradient),
    equal values of opposite w (w x = 1.5 from 3 * 0.5 and -1.5 * -1), 1e300 and 1e-300."""
    rng = np.random.default_rng(4)
    if pool == "adaptive":
        shape = (1, 2, 5, 4)
        f: Callable[[torch.Tensor], Any] = lambda h: F.adaptive_max_pool2d(h, (3, 3))  # noqa: E731
        wins = lambda s: [_adaptive_windows(s[0], 3), _adaptive_windows(s[1], 3)]  # noqa: E731
    else:
        shape = (1, 1, 3, 3, 4)
        f = lambda h: F.max_pool3d(h, 2, stride=1, padding=1)  # noqa: E731
        wins = _pool3_windows(2, 1, 1)
    x = rng.standard_normal(shape) * 0.5
    w = np.ones(shape)
    c = np.zeros(shape)
    a, b = ((0, 0), (0, 1)) if pool == "adaptive" else ((0, 0, 1), (0, 0, 2))  # two planes
    x[(*a, slice(0, 2), slice(0, 2))] = 0.75  # an exact tie over a whole window
    x[(*b, 1, 0)], x[(*b, 1, 1)] = 2.0, 2.0
    c[(*b, 1, 1)] = 2.0**-70  # 2 + 2^-70 after 2
    x[(*a, 2, 2)], w[(*a, 2, 2)] = 0.5, 3.0
    x[(*a, 2, 3)], w[(*a, 2, 3)] = -1.0, -1.5  # 1.5 twice, from different products
    x[(*b, -1, -1)], x[(*b, -2, -1)] = 1e300, 1e-300
    model = Shifted(w, c, f)
    with torch.no_grad():
        t = _t(rng.standard_normal(tuple(model(_t(x)).shape)))
    check(model, _t(x), t, nn.MSELoss(), _max_pool_oracle(wins), bits=bits)


def _bilinear_weights(n: int, o: int, align: bool, scale: float | None) -> np.ndarray:
    """(o, n) Fractions: torch's source coordinate from the exact scale (``(n-1)/(o-1)``,
    ``1/scale_factor`` or ``n/o``), ``s - floor(s)`` to the right neighbour, the rest to the left
    (both to the last cell at the border); equal sizes copy."""
    m = np.full((o, n), Fraction(0), dtype=object)
    if o == n:
        for j in range(o):
            m[j, j] = Fraction(1)
        return m
    if align:
        r = Fraction(n - 1, o - 1) if o > 1 else Fraction(0)
    else:
        r = 1 / Fraction(scale) if scale else Fraction(n, o)
    for j in range(o):
        s = r * j if align else max(r * j + r / 2 - Fraction(1, 2), Fraction(0))
        lo = min(s.numerator // s.denominator, n - 1)
        lam = min(s - lo, Fraction(1))
        m[j, lo] += 1 - lam
        m[j, min(lo + 1, n - 1)] += lam
    return m


def _iv(f: Fraction) -> Any:
    return iv.mpf(f.numerator) / iv.mpf(f.denominator)


def _interp(h: np.ndarray, mh: np.ndarray, mw: np.ndarray) -> np.ndarray:
    """out[.., p, q] = sum_{i, j} mh[p, i] mw[q, j] h[.., i, j] (nonzero weights only)."""
    out = np.empty((*h.shape[:2], mh.shape[0], mw.shape[0]), dtype=object)
    for a, b, p, q in np.ndindex(out.shape):
        terms = [h[a, b, i, j] * _iv(mh[p, i] * mw[q, j]) for i in range(mh.shape[1])
                 for j in range(mw.shape[1]) if mh[p, i] and mw[q, j]]  # fmt: skip
        out[a, b, p, q] = _sum(terms)
    return out


BILINEAR = {  # (input h, w), F.interpolate keywords, torch's (size, scales) as the weights see them
    "scale_1.7": ((3, 4), {"scale_factor": 1.7}, ((5, 6), (1.7, 1.7))),
    "scales_down": ((5, 4), {"scale_factor": (0.6, 1.3)}, ((3, 5), (0.6, 1.3))),
    "size_align": ((3, 4), {"size": (4, 6), "align_corners": True}, ((4, 6), (None, None))),
    "size_down_same": ((6, 3), {"size": (4, 3)}, ((4, 3), (None, None))),
}


@pytest.mark.parametrize("bits", SYSTEMS)
@pytest.mark.parametrize("case", sorted(BILINEAR))
def test_bilinear_against_the_oracle(case: str, bits: int | None) -> None:
    """Weights 1/3 and 1/1.7's quotients (non-dyadic: exact rationals in the exact systems),
    an input cell of 1e300 next to -1e300 and 1e-300."""
    (hh, ww), kw, ((oh, ow), (sh, sw)) = BILINEAR[case]
    align = bool(kw.get("align_corners", False))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 2, hh, ww))
    x[0, 1, 0, :3] = [1e300, -1e300, 1e-300]
    w = rng.standard_normal((1, 2, hh, ww))
    mh, mw = _bilinear_weights(hh, oh, align, sh), _bilinear_weights(ww, ow, align, sw)
    model = Shifted(w, np.zeros_like(w), lambda h: F.interpolate(h, mode="bilinear", **kw))
    with torch.no_grad():  # the definition is torch's: within float64 roundings of its output
        ref = F.interpolate(_t(x[:, :1]), mode="bilinear", **kw).numpy()
    fh = np.vectorize(float)(mh).astype(np.float64)
    fw = np.vectorize(float)(mw).astype(np.float64)
    np.testing.assert_allclose(fh @ x[0, 0] @ fw.T, ref[0, 0], rtol=1e-14, atol=1e-15)
    t = _t(rng.standard_normal((1, 2, oh, ow)))

    def oracle(p: dict, x_: torch.Tensor, t_: torch.Tensor) -> A.V:
        return _mse(_interp(p["w"] * A.arr(x_.numpy()) + p["c"], mh, mw), t_)

    check(model, _t(x), t, nn.MSELoss(), oracle, bits=bits)


def _shuffle(h: np.ndarray, r: int) -> np.ndarray:
    """out[n, c, i r + a, j r + b] = h[n, c r^2 + a r + b, i, j]."""
    n, cr, hh, ww = h.shape
    out = np.empty((n, cr // (r * r), hh * r, ww * r), dtype=object)
    for i0, c, i, j, a, b in itertools.product(*map(range, (n, cr // (r * r), hh, ww, r, r))):
        out[i0, c, i * r + a, j * r + b] = h[i0, c * r * r + a * r + b, i, j]
    return out


@pytest.mark.parametrize("bits", SYSTEMS)
def test_pixel_shuffle_and_unshuffle_against_the_oracle(bits: int | None) -> None:
    """shuffle(h) * v + unshuffle(shuffle(h))-shaped terms: both moves checked by position."""
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((1, 8, 2, 3)), rng.standard_normal((1, 8, 2, 3))
    v = rng.standard_normal((1, 2, 4, 6))

    def f(h: torch.Tensor) -> torch.Tensor:
        s = F.pixel_shuffle(h, 2) * _t(v)
        return F.pixel_unshuffle(s * s, 2) + h

    model = Shifted(w, np.zeros_like(w), f)
    t = _t(rng.standard_normal((1, 8, 2, 3)))

    def oracle(p: dict, x_: torch.Tensor, t_: torch.Tensor) -> A.V:
        h = p["w"] * A.arr(x_.numpy()) + p["c"]
        s = _shuffle(h, 2) * A.arr(v)
        sq = s * s
        un = np.empty(h.shape, dtype=object)  # the inverse map, from the definition
        for i0, c, i, j, a, b in itertools.product(*map(range, (1, 2, 2, 3, 2, 2))):
            un[i0, c * 4 + a * 2 + b, i, j] = sq[i0, c, i * 2 + a, j * 2 + b]
        return _mse(un + h, t_)

    check(model, _t(x), t, nn.MSELoss(), oracle, bits=bits)


# ---- the emulated machine by hand: fpgrad.round_to after every operation --------------------
def _cx(fmt: str) -> Any:
    return SimpleNamespace(ar=EmulatedArith(fmt, accumulation="per_op"), label=lambda: "op")


def _torch_weights(n: int, o: int, align: bool, scale: float | None) -> np.ndarray:
    """torch's own float64 weights: its bilinear kernel on each unit vector (height 1: a copy)."""
    eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, 1, n)
    out = torch.ops.aten.upsample_bilinear2d(eye, [1, o], align, 1.0, scale)
    return out.reshape(n, o).T.numpy()


def dense_rows(rows: list, n: int, o: int) -> np.ndarray:
    """The (o, n) matrix of per-output (index, weight) rows, repeated indices summed."""
    m = np.zeros((o, n))
    for j, row in enumerate(rows):
        for i, w in row:
            m[j, i] += w
    return m


@pytest.mark.parametrize(("n", "o", "align", "scale"), [
    (3, 5, False, 1.7), (5, 3, False, 0.6), (4, 6, True, None), (6, 4, False, None),
    (7, 3, True, None), (2, 3, False, None), (1, 3, False, None), (3, 1, True, None),
])  # fmt: skip
def test_emulated_weights_are_torch_float64_weights(n: int, o: int, align: bool,
                                                    scale: float | None) -> None:  # fmt: skip
    """Outside the exact systems the weight matrix is torch's float64 one, bit for bit."""
    got = dense_rows(resample._lin_rows64(n, o, align, scale), n, o)  # the machines' taps
    assert np.array_equal(got, _torch_weights(n, o, align, scale))


@pytest.mark.parametrize("fmt", ["bfloat16", "fp8_e4m3"])
def test_emulated_bilinear_and_transposed_conv_by_hand(fmt: str) -> None:
    """Per-op accumulation: each product and each add rounded once into the format, the width
    interpolated first (torch's order), sums over increasing input index."""

    def R(v: Any) -> np.ndarray:
        return fpgrad.round_to(np.asarray(v, dtype=np.float64), fmt)

    cx = _cx(fmt)
    x = R([[[[1.1, -2.3, 0.7], [0.45, 3.3, -1.9]]]])  # (1, 1, 2, 3) -> (3, 5), size given

    def interp(rows: np.ndarray, m: np.ndarray) -> np.ndarray:
        out = np.zeros((rows.shape[0], m.shape[0]))
        for a, q in np.ndindex(out.shape):
            acc = None
            for j in range(m.shape[1]):
                if m[q, j] != 0:
                    term = R(rows[a, j] * m[q, j])
                    acc = term if acc is None else R(acc + term)
            out[a, q] = acc
        return out

    mh, mw = R(_torch_weights(2, 3, False, None)), R(_torch_weights(3, 5, False, None))
    by_hand = interp(interp(x[0, 0], mw).T, mh).T
    got = resample.upsample_bilinear2d(cx, cx.ar.asarray(x), [3, 5], False)
    assert np.array_equal(got[0, 0], by_hand)
    g = R(np.linspace(-1, 1, 15).reshape(1, 1, 3, 5))
    back = resample.upsample_bilinear2d_backward(cx, cx.ar.asarray(g), [3, 5], [1, 1, 2, 3],
                                                 False)  # fmt: skip
    assert np.array_equal(back[0, 0], interp(interp(g[0, 0], mw.T).T, mh.T).T)
    # conv_transpose1d, one channel, kernel 2, stride 1: y[p] = (w0 x[p] + w1 x[p-1]) + b
    xs, w, b = R([[[0.3, -1.7, 2.2]]]), R([[[0.9, -0.55]]]), R([0.15])
    y = conv_more.convolution(cx, cx.ar.asarray(xs), cx.ar.asarray(w), cx.ar.asarray(b), [1],
                              [0], [1], True, [0], 1)  # fmt: skip
    xv, (w0, w1) = np.concatenate([[0.0], xs[0, 0], [0.0]]), w[0, 0]
    hand = [R(R(R(w0 * xv[p + 1]) + R(w1 * xv[p])) + b[0]) for p in range(4)]
    assert np.array_equal(y[0, 0], hand)


class StraddleTie(nn.Module):
    """One adaptive window holding 3 and sqrt(3) sqrt(3): exactly equal, but no ball of the
    second is a point, so which comes first as the maximum can never be decided."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(_t([[[[2.0, 3.0], [0.5, 1.0]]]]))
        self.v = nn.Parameter(_t(np.ones((1, 1, 2, 2))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.w, torch.sqrt(self.w) * torch.sqrt(self.w)], -1) * x
        return F.adaptive_max_pool2d(h, (1, 1)) + (self.v * x[..., :2]).sum()


def test_an_undecidable_max_pool_tie_is_undetermined_never_guessed() -> None:
    """torch float64 computes sqrt(3)^2 = 2.9999999999999996 (the 3 wins); exactly they tie
    (the first, 3, wins) but no precision can prove it: the run ends at the cap with every
    claim withdrawn (undetermined), none certified, none a proven zero."""
    x, t = _t(np.ones((1, 1, 2, 4))), torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    net = fpgrad.from_module(StraddleTie(), x, t, nn.MSELoss())
    r = exact_graph(net.graph, allow_uncertified=True, max_bits=512).result
    assert r.bits == 512 and "undecided" in r.escalations[-1]
    for key in ("loss", "grads/w", "grads/v"):
        assert np.all(r.undetermined_masks[key]), key
        assert not np.any(r.zeros[key]), key


class _AvgPool3d(nn.Module):
    def __init__(self, **kw: Any) -> None:
        super().__init__()
        self.c, self.kw = nn.Conv3d(1, 2, 2), kw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool3d(torch.tanh(self.c(x)), **self.kw).flatten(1)


@pytest.mark.parametrize("kw", [
    {"kernel_size": 2},
    {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True, "count_include_pad": False},
    {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
    {"kernel_size": (2, 3, 2), "stride": 1, "divisor_override": 5},
])  # fmt: skip
def test_avg_pool3d_native_bit_for_bit_and_exact(kw: dict) -> None:
    """nn.AvgPool3d's geometry (padding, ceil_mode's clipped windows, the three divisors):
    native columns are eager's, the exact balls hold torch float64's."""
    from tests.oracle.native_exact import check

    torch.manual_seed(0)
    m, x = _AvgPool3d(**kw), torch.randn(2, 1, 6, 7, 5)
    with torch.no_grad():
        y = torch.randn(2, m(x).shape[1])
    check(m, x, y, nn.MSELoss(), digits=30)
    fpgrad.compare(fpgrad.from_module(m, x, y, nn.MSELoss()), "bfloat16:emulated")
