"""Adversarial round 22: emulated columns of pooling backward, convolution input gradients,
upsampling, recurrent cells, group/RMS norm and the activations against the step oracle of
``tests/test_attack21_emulated.py`` (MPFR, one correctly rounded operation per documented step)
and against torch's float16/bfloat16/float32 CPU kernels where the docs claim bit equality.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fpgrad.arith.emulated import EmulatedArith
from fpgrad.graph.ops import OPS
from fpgrad.numbers.rounding import Mode
from tests.test_attack21_emulated import Oracle
from tests.test_emulated import DIRECTED

MAXPOOL = "aten.max_pool2d_with_indices.default"


def _cx(fmt: str, mode: Mode = Mode.NEAREST_EVEN, target: str = MAXPOOL) -> SimpleNamespace:
    return SimpleNamespace(ar=EmulatedArith(fmt, mode=mode), label=lambda: "test",
                           origin=lambda i: None, node=SimpleNamespace(target=target))  # fmt: skip


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ---- finding 1: 2-D pooling backward added a cell's addends in reverse window order ----------


@pytest.mark.parametrize("mode", DIRECTED)
def test_pool2d_backward_adds_in_output_order(mode: Mode) -> None:
    """fp8_e5m2 max_pool2d (1, 3), stride 1, of [0, 0, 5, 0, 0]: all three windows pick the 5,
    upstream gradient [1, 0.125, 0.125]. torch's CPU backward adds output after output, each
    add rounded: (1 + 0.125) + 0.125 = 1 (nearest, toward zero, down), 1.5 (up). The column
    placed window offsets ki-major, which reaches a cell from the last window first:
    (0.125 + 0.125) + 1 = 1.25 in every mode. avg_pool2d's backward (gradient 3x, divisor 3)
    the same."""
    o, cx = Oracle("fp8_e5m2", mode), _cx("fp8_e5m2", mode)
    want = o.add(o.add(1.0, 0.125), 0.125)
    x = np.array([[[[0.0, 0.0, 5.0, 0.0, 0.0]]]])
    g = np.array([[[[1.0, 0.125, 0.125]]]])
    geo = ([1, 3], [1, 1], [0, 0])
    _, idx = OPS[MAXPOOL](cx, x, *geo, [1, 1], False)
    dx = OPS["aten.max_pool2d_with_indices_backward.default"](cx, g, x, *geo, [1, 1], False, idx)
    assert dx.ravel()[2] == want
    dx = OPS["aten.avg_pool2d_backward.default"](cx, 3 * g, x, *geo, False, True, None)
    assert dx.ravel()[2] == want


@pytest.mark.parametrize(("dtype", "fmt"), [(torch.float16, "float16"),
                                            (torch.bfloat16, "bfloat16"), (torch.float32, "float32")])  # fmt: skip
def test_pool2d_backward_equals_torchs_kernels(dtype: torch.dtype, fmt: str) -> None:
    """Overlapping windows (padding, ceil_mode, dilation, count_include_pad either way,
    divisor_override): the machine's max/avg pool backward equals torch's CPU kernel bit for
    bit (float16 differed on 19 of 294 cells of a 3x3/1/1 max pool, float32 avg on 168)."""
    torch.manual_seed(1)
    x = (torch.randn(2, 3, 7, 7) * 3).to(dtype)
    cx = _cx(fmt)
    for k, s, p, ceil, cip, div in [(3, 1, 1, False, True, None), (3, 2, 1, True, False, None),
                                    (2, 1, 0, False, True, 3), (3, 1, 1, False, False, None)]:  # fmt: skip
        xr = x.clone().requires_grad_()
        y = F.avg_pool2d(xr, k, s, p, ceil, cip, div)
        g = torch.randn_like(y)
        y.backward(g)
        got = OPS["aten.avg_pool2d_backward.default"](cx, _np(g), _np(x), [k, k], [s, s],
                                                      [p, p], ceil, cip, div)  # fmt: skip
        assert np.array_equal(got, _np(xr.grad))
    for k, s, p, d, ceil in [(3, 1, 1, 1, False), (3, 2, 1, 1, True), (2, 1, 0, 2, False)]:
        xr = x.clone().requires_grad_()
        y, _ = F.max_pool2d_with_indices(xr, k, s, p, d, ceil)
        g = torch.randn_like(y)
        y.backward(g)
        geo = ([k, k], [s, s], [p, p], [d, d], ceil)
        _, idx = OPS[MAXPOOL](cx, _np(x), *geo)
        got = OPS["aten.max_pool2d_with_indices_backward.default"](cx, _np(g), _np(x), *geo, idx)
        assert np.array_equal(got, _np(xr.grad))


# ---- finding 2: resampling by dense matrices spread one inf or NaN over the whole row --------


def _reads(n: int, o: int) -> list[set[int]]:
    """The input cells torch's float64 bilinear kernel reads for each output (NaN probes)."""
    out: list[set[int]] = [set() for _ in range(o)]
    for i in range(n):
        x = torch.zeros(1, 1, 1, n, dtype=torch.float64)
        x[..., i] = float("nan")
        y = F.interpolate(x, size=(1, o), mode="bilinear", align_corners=False)[0, 0, 0]
        for j in range(o):
            if torch.isnan(y[j]):
                out[j].add(i)
    return out


@pytest.mark.parametrize("mode", DIRECTED)
def test_bilinear_keeps_an_overflow_local(mode: Mode) -> None:
    """fp8_e5m2 bilinear (1, 6) -> (1, 12) of [1, inf, 2, 3, 4, 5]: the column multiplied the
    whole row by its (12, 6) weight matrix, 0 * inf = NaN in all 12 outputs; torch's kernel
    reads two cells per output, so the 7 outputs that do not read the inf are finite: each
    is (1 - l) x_i0 + l x_i1 in the fp32 accumulator, rounded once (the oracle). Backward:
    an inf gradient at output 0 reaches only input cells 0 and 1 (was: 5 NaN cells)."""
    o, cx = Oracle("fp8_e5m2", mode), _cx("fp8_e5m2", mode)
    xs = [1.0, float("inf"), 2.0, 3.0, 4.0, 5.0]
    y = OPS["aten.upsample_bilinear2d.default"](cx, np.array([[[xs]]]), [1, 12], False)[0, 0, 0]
    reads = _reads(6, 12)
    from fpgrad.graph.ops.resample import _lin_rows64

    for j, row in enumerate(_lin_rows64(6, 12, False, None)):
        if 1 in reads[j]:
            continue
        (i0, w0), (i1, w1) = row
        terms = [o.store(w0) * xs[i0], o.store(w1) * xs[i1]]
        assert y[j] == o.sum_fp32(terms if i0 != i1 else [o.store(w0 + w1) * xs[i0]])
    g = np.ones((1, 1, 1, 12))
    g[..., 0] = np.inf
    dx = OPS["aten.upsample_bilinear2d_backward.default"](cx, g, [1, 12], [1, 1, 1, 6], False)
    assert np.isfinite(dx.ravel()[2:]).all()


@pytest.mark.parametrize("fmt", ["fp8_e5m2", "float16"])
def test_bicubic_and_adaptive_avg_pool_keep_an_overflow_local(fmt: str) -> None:
    """An inf in the last cell of a 7-wide row: adaptive_avg_pool2d to 3 windows
    ([0, 3), [2, 5), [4, 7)) gave [inf?, NaN, NaN] through its 0/1 matrix; torch's kernel and
    the documented window sums give finite first two windows. Bicubic 7 -> 14: outputs whose
    four taps miss cell 6 stay finite (were all NaN)."""
    cx = _cx(fmt)
    x = np.array([[[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, np.inf]]]])
    got = OPS["aten._adaptive_avg_pool2d.default"](cx, x, [1, 3]).ravel()
    want = F.adaptive_avg_pool2d(torch.from_numpy(x), (1, 3)).numpy().ravel()
    assert np.isfinite(got[:2]).all() and np.isinf(got[2]) and got[2] == want[2]
    y = OPS["aten.upsample_bicubic2d.default"](cx, x, [1, 14], False).ravel()
    ref = F.interpolate(torch.from_numpy(x), size=(1, 14), mode="bicubic").numpy().ravel()
    assert np.array_equal(np.isfinite(y), np.isfinite(ref)) and np.isfinite(y[:8]).all()


# ---- finding 3: bilinear tap index is torch's floorf of the float64 source coordinate ----------


def test_bilinear_weights_equal_torchs_float64_kernel_on_every_small_geometry() -> None:
    """torch takes ``floorf`` of the float64 source coordinate (a float): for 3 -> 7, output 3,
    the fused coordinate 0.9999999999999999 is 1.0f, index 1, weights [0, 1, 0]; the column
    floored the double (index 0, weights [1.1e-16, 1, 0]): 24 of 1008 geometries differed
    (float32:emulated gave 1.1e-16 for the 0 of [1, 0, 0] there)."""
    from fpgrad.graph.ops import resample
    from tests.test_ops_conv_more import dense_rows

    for n in range(1, 9):
        for o in range(1, 20):
            for align, scale in [(False, None), (True, None), (False, o / n * 1.03)]:
                eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, 1, n)
                ref = torch.ops.aten.upsample_bilinear2d(eye, [1, o], align, 1.0, scale)
                got = dense_rows(resample._lin_rows64(n, o, align, scale), n, o)
                assert np.array_equal(got, ref.reshape(n, o).T.numpy()), (n, o, align, scale)
    y = OPS["aten.upsample_bilinear2d.default"](_cx("float32"), np.array([[[[1.0, 0, 0]]]]),
                                                [1, 7], False)  # fmt: skip
    assert y.ravel()[3] == 0.0


# ---- finding 4: embedding (bag) sums by one-hot matmul spread an inf to every row -------------


@pytest.mark.parametrize("mode", DIRECTED)
def test_embedding_backward_keeps_an_overflow_in_its_row(mode: Mode) -> None:
    """fp8_e5m2 embedding backward, tokens [0, 2, 1, 2], gradient rows of ones with an inf in
    token 1's first column: the column took onehot^T @ g, so rows 0, 1 and 3 got 0 * inf =
    NaN there; torch (float16: [[1, 1, 1], [1, 1, 1], [inf, 2, 2], [0, 0, 0]]) and the
    documented per-row fp32 sum keep it in row 2. Embedding-bag backward alike."""
    o, cx = Oracle("fp8_e5m2", mode), _cx("fp8_e5m2", mode)
    idx = np.array([0, 2, 1, 2])
    g = np.full((4, 3), 1.25)
    g[1, 0] = np.inf
    got = OPS["aten.embedding_dense_backward.default"](cx, g, idx, 4, -1, False)
    want = [[o.sum_fp32([g[t, d] for t in range(4) if idx[t] == r]) if r in idx else 0.0
             for d in range(3)] for r in range(4)]  # fmt: skip
    assert np.array_equal(got, np.array(want))
    bag = OPS["aten._embedding_bag_backward.default"](cx, g[:2], idx, np.array([0, 2]),
                                                      None, None, None, 4, False, 0, False, None)  # fmt: skip
    # bags [0, 2] and [1, 2]; bag 1's gradient has the inf: rows 1 and 2 get inf, not NaN
    assert np.isfinite(bag[[0, 3]]).all() and np.isfinite(bag[1:3, 1:]).all()
    assert np.isposinf(bag[1:3, 0]).all()


# ---- held: SiLU and tanh-GELU step by step (fp8_e4m3, fp8_e5m2; four modes) ------------------


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("mode", DIRECTED)
def test_silu_and_tanh_gelu_follow_the_documented_steps(fmt: str, mode: Mode) -> None:
    """silu = x * sigmoid(x), its backward g * (s(x) * (1 + x * s(-x))); tanh GELU
    (x * 0.5) * (1 + tanh(beta * (x + (x * x * x) * kappa))) with torch's float64 constants
    stored in the format; each step one correctly rounded operation (sigmoid and tanh
    correctly rounded: sigmoid at 400 bits then rounded, tanh MPFR's in the format). Inputs
    include -0, subnormals, a cube past e4m3's 448 (NaN there: no inf) and large negatives:
    tanh(-256) is -0.875 toward zero and up in e5m2, the GELU then -1.25 (held)."""
    import gmpy2
    from gmpy2 import mpfr

    from fpgrad.graph.ops.pointwise import GELU_BETA, GELU_KAPPA

    o, cx = Oracle(fmt, mode), _cx(fmt, mode)
    w = gmpy2.context(precision=400, emax=1 << 24, emin=-(1 << 24))

    def sig(v: float) -> float:
        return o._fin(o.ctx.plus(w.div(1, w.add(1, w.exp(-mpfr(v))))))

    def tanh(v: float) -> float:
        return v if np.isnan(v) else o._fin(o.ctx.tanh(mpfr(v)))  # MPFR's, in the format

    xs = [o.store(v) for v in [-0.0, 0.0, 0.001953125, -0.013671875, 0.6875, -1.75, 3.0,
                               -6.5, 8.0, 13.0, -20.0, 0.15625]]  # fmt: skip
    gs = [o.store(v) for v in [1.0, -0.5, 3.0, 0.1, -2.0, 1.5, 0.75, -1.0, 2.0, 0.3, 5.0, -3.5]]
    x, g = np.array(xs), np.array(gs)
    silu = OPS["aten.silu.default"](cx, x)
    dsilu = OPS["aten.silu_backward.default"](cx, g, x)
    gelu = OPS["aten.gelu.default"](cx, x, "tanh")
    beta, kappa, half, one = o.store(GELU_BETA), o.store(GELU_KAPPA), o.store(0.5), o.store(1.0)
    for i, (v, gv) in enumerate(zip(xs, gs, strict=True)):
        s = sig(v)
        want = o.mul(gv, o.mul(s, o.add(one, o.mul(v, sig(-v)))))
        assert np.array_equal([silu[i], dsilu[i]], [o.mul(v, s), want], equal_nan=True), v
        cube = o.mul(o.mul(v, v), v)
        inner = o.mul(o.add(v, o.mul(cube, kappa)), beta)
        want = o.mul(o.mul(v, half), o.add(one, tanh(inner)))
        assert np.array_equal([gelu[i]], [want], equal_nan=True), v


# ---- held: conv2d input gradient (2 output channels, stride 2, dilation 2, padding 1) -------


@pytest.mark.parametrize("mode", DIRECTED)
def test_conv2d_input_gradient_follows_the_documented_steps(mode: Mode) -> None:
    """fp8_e4m3 convolution_backward's grad_input: per kernel offset the dot over output
    channels (fp32 accumulator, one rounding), placed back offset after offset (ki-major),
    each addition rounded: torch's col2im order (float16 equals torch bit for bit, held)."""
    o, cx = Oracle("fp8_e4m3", mode), _cx("fp8_e4m3", mode)
    rng = np.random.default_rng(3)
    x = np.array([o.store(v) for v in rng.standard_normal(25)]).reshape(1, 1, 5, 5)
    w = np.array([o.store(v) for v in rng.standard_normal(18) * 2]).reshape(2, 1, 3, 3)
    g = np.array([o.store(v) for v in rng.standard_normal(8) * 3]).reshape(1, 2, 2, 2)
    dx, _, _ = OPS["aten.convolution_backward.default"](cx, g, x, w, [2], [2, 2], [1, 1], [2, 2],
                                                        False, [0, 0], 1, [True, False, False])  # fmt: skip
    for i, j in np.ndindex(5, 5):
        acc = None
        for ki, kj in np.ndindex(3, 3):
            oi, oj = i + 1 - 2 * ki, j + 1 - 2 * kj  # padded cell = stride * out + dilation * k
            part = 0.0
            if oi % 2 == 0 and oj % 2 == 0 and 0 <= oi // 2 < 2 and 0 <= oj // 2 < 2:
                part = o.dot_fp32(list(w[:, 0, ki, kj]), list(g[0, :, oi // 2, oj // 2]))
            acc = part if acc is None else o.add(acc, part)
        assert dx[0, 0, i, j] == acc, (i, j)


@pytest.mark.parametrize("mode", DIRECTED)
def test_nearest_upsample_backward_is_one_fp32_accumulation(mode: Mode) -> None:
    """fp8_e5m2 nearest 2x backward onto one cell of gradients [1, 0.125, 0.125, 0.125]: the
    float32 accumulator, rounded once (1.375 -> 1.5 nearest/up, 1.25 toward zero/down; per-add
    rounding would give 1 to nearest). Held."""
    o = Oracle("fp8_e5m2", mode)
    cx = _cx("fp8_e5m2", mode, "aten.upsample_nearest2d_backward.default")
    g = np.array([[[[1.0, 0.125], [0.125, 0.125]]]])
    got = OPS["aten.upsample_nearest2d_backward.default"](cx, g, [2, 2], [1, 1, 1, 1], None, None)
    assert got.ravel()[0] == o.sum_fp32([1.0, 0.125, 0.125, 0.125])


def test_norm_eps_is_stored_in_the_format() -> None:
    """Documented (emulate-a-format.md): group norm of a constant group, eps = 1e-5, stores
    eps as 0 in fp8_e4m3 (rstd = 1/sqrt(0): NaN, no inf), 2^-16 in fp8_e5m2 (rstd 256)."""
    x = np.full((1, 2, 2, 2), 1.5)
    _, _, r = OPS["aten.native_group_norm.default"](_cx("fp8_e4m3"), x, None, None, 1, 2, 4, 1, 1e-5)
    assert np.isnan(r).all()
    _, _, r = OPS["aten.native_group_norm.default"](_cx("fp8_e5m2"), x, None, None, 1, 2, 4, 1, 1e-5)
    assert (r == 256.0).all()
