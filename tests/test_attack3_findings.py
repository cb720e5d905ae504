"""Adversarial findings on captured models (attack3): each test failed before its fix.

Oracles are exact rationals (``fractions.Fraction``) of the float64 parameters."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph

ROOT = Path(__file__).resolve().parents[1]
W = [[1.0, 2.0], [3.0, 5.0], [4.0, 9.0], [1.5, -2.0], [0.25, 7.0]]


class _Fn(nn.Module):
    def __init__(self, f: object, rows: int) -> None:
        super().__init__()
        self.f = f
        self.w = nn.Parameter(torch.tensor(W[:rows]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(self.w * x)  # type: ignore[operator]


def _exact(model: nn.Module, rows: int) -> object:
    net = fpgrad.from_module(model, torch.ones(rows, 2), torch.zeros(2), nn.MSELoss())
    return exact_graph(net.graph).result


def _inside(ex: object, key: str, true: list[Fraction]) -> None:
    mid, rad = ex.enclosure(key)  # type: ignore[attr-defined]
    mid = np.asarray(mid, dtype=object).reshape(-1)
    rad = np.asarray(rad, dtype=np.float64).reshape(-1)
    with mpmath.workprec(400):
        for i, t in enumerate(true):
            exact = mpmath.mpf(t.numerator) / t.denominator
            assert abs(exact - mpmath.mpf(mid[i])) <= rad[i], f"{key}[{i}] outside its ball"


def _columns(rows: int) -> list[list[Fraction]]:
    return [[Fraction(W[i][j]) for i in range(rows)] for j in range(2)]


def test_user_constant_equal_to_var_scale_is_not_read_as_a_rational() -> None:
    """A user's float64 constant 0.6666666666666666 (== torch's 2/(3-0)) times ``w - mean(w)``
    beside ``w.var(0, correction=0)`` was read as exactly 2/3: a wrong loss, certified."""
    c = 0.6666666666666666

    def f(w: torch.Tensor) -> torch.Tensor:
        s = w.sum(0, keepdim=True) * c
        return (w * (s * (w - w.mean(0, keepdim=True)))).sum(0) + w.var(0, correction=0)

    ex = _exact(_Fn(f, 3), 3)
    out = []
    for col in _columns(3):
        s, mu = sum(col), sum(col) / 3
        out.append(sum(v * s * Fraction(c) * (v - mu) for v in col)
                   + sum((v - mu) ** 2 for v in col) / 3)  # fmt: skip
    _inside(ex, "loss", [sum(o * o for o in out) / 2])


def test_fractional_correction_divides_by_the_exact_n_minus_correction() -> None:
    """``var(correction=0.1)`` divided by float64's rounding of ``5 - 0.1`` (forward and
    backward): every certified digit past the 16th was wrong."""
    corr = 0.1
    ex = _exact(_Fn(lambda w: w.var(0, correction=corr), 5), 5)
    dof = 5 - Fraction(corr)
    out, grads = [], [[Fraction(0)] * 2 for _ in range(5)]
    for col in _columns(5):
        mu = sum(col) / 5
        out.append(sum((v - mu) ** 2 for v in col) / dof)
    for j, col in enumerate(_columns(5)):
        mu = sum(col) / 5
        for i, v in enumerate(col):
            grads[i][j] = out[j] * 2 * (v - mu) / dof
    _inside(ex, "loss", [sum(o * o for o in out) / 2])
    _inside(ex, "grads/w", [g for row in grads for g in row])


def test_fast_ncdf_counts_a_nan_radius_or_midpoint() -> None:
    """The fast ball ``ncdf`` of a ball with a NaN radius (0 * inf upstream) or a NaN / inf
    midpoint returned a finite ball ([0.90, 1.10] for midpoint 0.1, where Phi(0.1) = 0.54)
    with no range error; the run then only checks its outputs for NaN, so it laundered."""
    from fpgrad.arith import expansion
    from fpgrad.arith.ball import Ball, BallArith

    for mid, rad in ((0.1, np.nan), (np.nan, 0.0), (np.inf, 0.0), (-np.inf, 0.0)):
        ar = BallArith(150)
        ar.ncdf(Ball(expansion.from_float(np.array([mid]), ar.k), np.array([rad])))
        assert ar.range_errors == 1, (mid, rad)


def _pt2(tmp: Path, toml: str = 'inputs = ["x.npy"]\ntargets = "y.npy"\nloss = "mse"\n') -> Path:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    torch.export.save(torch.export.export(model, (x,)), tmp / "model.pt2")
    np.save(tmp / "x.npy", x.numpy())
    np.save(tmp / "y.npy", np.zeros((4, 2), np.float32))
    (tmp / "model.toml").write_text(toml)
    return tmp / "model.pt2"


def _rezip(
    src: Path, dst: Path, deflate: str = "", extra: tuple = (), nested: bool = False
) -> None:
    """``src``'s members into ``dst``: member ``deflate`` compressed (1 MiB of zeros when it
    is a weight), ``extra`` (name, bytes) added, the sample inputs' own members compressed."""
    import copy
    import io
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data, info = zin.read(info.filename), copy.copy(info)
            if info.filename.endswith(deflate) and deflate:
                info.compress_type = zipfile.ZIP_DEFLATED
                data = b"\0" * 2**20 if "weight_" in deflate else data
            if nested and info.filename.endswith("sample_inputs/model.pt"):
                buf = io.BytesIO()
                with zipfile.ZipFile(io.BytesIO(data)) as inner, zipfile.ZipFile(buf, "w") as z:
                    for sub in inner.infolist():
                        z.writestr(sub.filename, inner.read(sub.filename), zipfile.ZIP_DEFLATED)
                data = buf.getvalue()
            zout.writestr(info, data)
        for name, data in extra:
            zout.writestr(name, data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"deflate": "weight_0"}, "is compressed (1048576 bytes declared)"),
        ({"nested": True}, "is compressed"),
        ({"extra": (("model/../../evil.txt", b"x"),)}, "named outside the archive"),
        ({"extra": (("/tmp/evil.txt", b"x"),)}, "named outside the archive"),
    ],
)
def test_pt2_compressed_or_escaping_members_are_refused(
    tmp_path: Path, change: dict, message: str
) -> None:
    """A deflated member (a zip bomb: torch inflated a 1 MiB member for 1 KiB of file, so
    512 MiB could inflate to ~500 GiB) or a member named outside the archive was read."""
    from fpgrad.errors import InputError
    from fpgrad.graph.pt2 import load_pt2

    src = _pt2(tmp_path)
    _rezip(src, tmp_path / "bad.pt2", **change)
    (tmp_path / "bad.toml").write_text((tmp_path / "model.toml").read_text())
    with pytest.raises(InputError, match=re.escape(message)):
        load_pt2(str(tmp_path / "bad.pt2"))


@pytest.mark.parametrize("name", ["../x.npy", "ABS"])
def test_pt2_data_outside_the_toml_directory_is_refused(tmp_path: Path, name: str) -> None:
    from fpgrad.errors import InputError
    from fpgrad.graph.pt2 import load_pt2

    (tmp_path / "m").mkdir()
    _pt2(tmp_path / "m")
    np.save(tmp_path / "x.npy", np.zeros((4, 3), np.float32))
    name = str(tmp_path / "x.npy") if name == "ABS" else name
    (tmp_path / "m" / "model.toml").write_text(f'inputs = ["{name}"]\ntargets = "y.npy"\n'
                                               'loss = "mse"\n')  # fmt: skip
    with pytest.raises(InputError, match="outside the data file's directory"):
        load_pt2(str(tmp_path / "m" / "model.pt2"))


def test_pt2_torch_errors_and_devices_are_one_line(tmp_path: Path) -> None:
    """A zip torch cannot read printed torch.export's warning with its traceback before the
    refusal; a pipe named model.pt2 was "no such program"."""
    src = _pt2(tmp_path)
    _rezip(src, tmp_path / "bad.pt2", extra=(("other/x.txt", b"x"),))
    (tmp_path / "bad.toml").write_text((tmp_path / "model.toml").read_text())
    os.mkfifo(tmp_path / "pipe.pt2")
    (tmp_path / "pipe.toml").write_text((tmp_path / "model.toml").read_text())
    for name, message in (("bad.pt2", "not a torch.export.save program"), ("pipe.pt2", "a pipe")):
        proc = subprocess.run([sys.executable, "-m", "fpgrad", "compare", str(tmp_path / name)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr


_M1 = [[False, True, False], [True, False, True]]
_M2 = [[False, True, False], [False, False, True]]


class _Masked(nn.Module):
    def __init__(self, refill: list) -> None:
        super().__init__()
        self.refill = torch.tensor(refill)
        self.w = nn.Parameter(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (self.w * x).masked_fill(torch.tensor(_M1), float("-inf"))
        return s.masked_fill(self.refill, 0.0) * 2.0


def test_masked_fill_that_overwrites_every_neg_inf_is_a_plain_value() -> None:
    """``masked_fill(m, -inf).masked_fill(m, 0.0) * 2``: the mask is gone, but the value
    stayed a mask and ``mul`` failed (AttributeError); with some -inf left, it is refused."""
    from fpgrad.errors import InputError

    x, y = torch.ones(2, 3), torch.zeros(2, 3)
    model = _Masked(_M1)
    ex = exact_graph(fpgrad.from_module(model, x, y, nn.MSELoss()).graph).result
    w = [[Fraction(v) for v in row] for row in model.w.detach().double().tolist()]
    grads = [Fraction(0) if _M1[i][j] else 8 * w[i][j] / 6 for i in range(2) for j in range(3)]
    _inside(ex, "grads/w", grads)
    with pytest.raises(InputError, match="only softmax reads"):
        fpgrad.compare(fpgrad.from_module(_Masked(_M2), x, y, nn.MSELoss()), "float32")


class _Pow(nn.Module):
    def __init__(self, e: float) -> None:
        super().__init__()
        self.e = e
        self.w = nn.Parameter(torch.tensor([[0.5, -1.0], [2.0, 3.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).pow(self.e) + torch.sqrt(self.w * x) * 0.0


def test_sqrt_of_a_negative_value_is_not_certified() -> None:
    """``(-1) ** 1.5`` (torch: NaN) went to Arb, whose square root cut the ball [-1, -1] to
    its non-negative part: sqrt(-1) = 0 exactly, a certified loss of 8.78125 and a proven
    zero gradient, where torch's loss and that gradient are NaN."""
    x, y = torch.ones(2, 2), torch.zeros(2, 2)
    for e in (1.5, 2.5):
        ex = exact_graph(fpgrad.from_module(_Pow(e), x, y, nn.MSELoss()).graph).result
        assert ex.undetermined("loss").all()
        assert ex.undetermined("grads/w").reshape(2, 2)[0, 1]
        assert not ex.zero("grads/w").any()


@pytest.mark.parametrize("e", [float("inf"), float("nan")])
def test_pow_with_a_non_finite_exponent_is_refused(e: float) -> None:
    """``int(2 * e)`` raised OverflowError / ValueError (a traceback) before the refusal."""
    from fpgrad.errors import InputError

    net = fpgrad.from_module(_Pow(e), torch.ones(2, 2), torch.zeros(2, 2), nn.MSELoss())
    with pytest.raises(InputError, match="not supported"):
        exact_graph(net.graph)


def _codes(e_bits: int, m_bits: int, fn: bool) -> np.ndarray:
    """Every finite value of a format with ``e_bits``/``m_bits`` (``fn``: no inf, one NaN)."""
    bias = 2 ** (e_bits - 1) - 1
    m = np.arange(2**m_bits) / 2**m_bits
    vals = [m * 2.0 ** (1 - bias)]
    for e in range(1, 2**e_bits - (0 if fn else 1)):
        vals.append((1 + m) * 2.0 ** (e - bias))
    v = np.concatenate(vals)
    v = v[:-1] if fn else v  # e4m3fn: S.1111.111 is NaN
    return np.unique(np.concatenate([v, -v]))


@pytest.mark.parametrize(("fmt", "e_bits", "m_bits"), [("fp8_e4m3", 4, 3), ("fp8_e5m2", 5, 2),
                                                       ("e5m7", 5, 7)])  # fmt: skip
def test_emulated_ncdf_npdf_correctly_rounded_in_small_formats(
    fmt: str, e_bits: int, m_bits: int
) -> None:
    """(No finding: a check.) Every input of fp8_e4m3, fp8_e5m2 and e5m7 in five modes
    against MPFR's neighbours of the 400-bit value (which never lies on a boundary here)."""
    import gmpy2

    from fpgrad.arith.emulated import EmulatedArith
    from fpgrad.numbers.rounding import Mode

    x = _codes(e_bits, m_bits, fmt == "fp8_e4m3")
    bias = 2 ** (e_bits - 1) - 1
    wide = gmpy2.context(precision=400, emin=gmpy2.get_emin_min(), emax=gmpy2.get_emax_max())
    tiny = gmpy2.mpfr(2) ** -(10**6)  # MPFR's range ends near |x| = 38000: a positive stand-in
    for fn in ("ncdf", "npdf"):
        exact = []
        with gmpy2.context(wide):
            rpi, r2 = gmpy2.sqrt(2 * gmpy2.const_pi()), gmpy2.sqrt(gmpy2.mpfr(2))
            for v in x.tolist():
                m = gmpy2.mpfr(v)
                if fn == "npdf":
                    exact.append((0, gmpy2.exp(-m * m / 2) / rpi or tiny))
                else:
                    t = gmpy2.erfc(abs(m) / r2) / 2 or tiny
                    exact.append((1, -t) if v > 0 else (0, t))
        nb = []
        for rnd in (gmpy2.RoundDown, gmpy2.RoundUp):
            ctx = gmpy2.context(precision=m_bits + 1, emin=2 - bias - m_bits, emax=bias + 2,
                                subnormalize=True, round=rnd)  # fmt: skip
            with gmpy2.context(ctx):
                nb.append(np.array([float(b + t) for b, t in exact]))
        lo, hi = nb
        with gmpy2.context(wide):
            near_lo = np.array([(b + t) - lo_ < hi_ - (b + t) for (b, t), lo_, hi_
                                in zip(exact, lo.tolist(), hi.tolist(), strict=True)])  # fmt: skip
        nearest = np.where(lo == hi, lo, np.where(near_lo, lo, hi))
        want = {Mode.NEAREST_EVEN: nearest, Mode.NEAREST_AWAY: nearest, Mode.UP: hi,
                Mode.DOWN: lo, Mode.TOWARD_ZERO: np.where(lo >= 0, lo, hi)}  # fmt: skip
        for mode, ref in want.items():
            ar = EmulatedArith(fmt, mode=mode)
            got = getattr(ar, fn)(ar.asarray(x))
            bad = np.flatnonzero(got != ref)
            assert bad.size == 0, f"{fn} {fmt} {mode}: {x[bad[:4]]} {got[bad[:4]]} {ref[bad[:4]]}"


def test_pt2_safetensors_element_limit(tmp_path: Path) -> None:
    """A .npy input above the element limit is refused; a safetensors tensor was not."""
    from safetensors.numpy import save_file

    from fpgrad.errors import InputError
    from fpgrad.graph.pt2 import load_pt2
    from fpgrad.model.validate import MAX_ELEMENTS

    _pt2(tmp_path, 'inputs = ["d.safetensors:x"]\ntargets = "y.npy"\nloss = "mse"\n')
    save_file({"x": np.zeros(MAX_ELEMENTS + 1, np.float32)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(InputError, match="above the limit"):
        load_pt2(str(tmp_path / "model.pt2"))


def test_fast_ncdf_npdf_enclose_mpmath() -> None:
    """(No finding: a check.) Fast-ball Phi and phi contain mpmath's value (1000 bits) at the
    midpoint and both ends of balls of radii 0 .. 11 around points of [-13, 13] (subnormals,
    +-12, +-38 included), unless a range error sends the run to Arb."""
    from fpgrad.arith import expansion
    from fpgrad.arith.ball import Ball, BallArith

    rng = np.random.default_rng(0)
    special = [0.0, 5e-324, -5e-324, 1e-300, 12.0, -12.0, 11.999999999999998, -38.5, 38.0, 1.0]
    xs = np.concatenate([rng.uniform(-13, 13, 40), special])
    with mpmath.workprec(1000):
        for bits in (100, 150):
            for rad in (0.0, 1e-30, 1e-10, 0.5, 11.0):
                for fn in ("ncdf", "npdf"):
                    ar = BallArith(bits)
                    a = Ball(expansion.from_float(xs, ar.k), np.full(xs.shape, rad))
                    out = getattr(ar, fn)(a)
                    if ar.range_errors:
                        ar = BallArith(bits)  # the finite, in-range inputs alone
                        keep = np.abs(xs) > 1e-100
                        keep &= (np.abs(xs) < 30) if fn == "npdf" else keep
                        xs_k = xs[keep]
                        a = Ball(expansion.from_float(xs_k, ar.k), np.full(xs_k.shape, rad))
                        out = getattr(ar, fn)(a)
                        assert ar.range_errors == 0, (bits, rad, fn)
                    else:
                        xs_k = xs
                    mids = expansion.to_mpf(out.mid.reshape(out.mid.shape[0], -1), mpmath.mp)
                    ref = mpmath.ncdf if fn == "ncdf" else mpmath.npdf
                    r = mpmath.mpf(rad)
                    for i, x in enumerate(xs_k.tolist()):
                        for p in (mpmath.mpf(x) - r, mpmath.mpf(x), mpmath.mpf(x) + r):
                            v = ref(p)
                            assert abs(v - mids[i]) <= out.rad[i], (bits, fn, x, rad, p)
