"""An independent oracle for captured torch models: the ops written from their definitions
in mpmath, gradients by central differences.

Every function here takes numpy object arrays of ``CTX`` mpf numbers (120 digits) and is
written from the op's mathematical definition and torch's documented semantics (window
geometry of pooling, the loss reductions), not from fpgrad's op code nor from torch: nothing
of fpgrad is imported. Data and parameters enter exactly (float64 -> mpf).

The gradient of a loss ``f(params)`` is the central difference
``(f(p + h e_i) - f(p - h e_i)) / 2h`` with ``h = 1e-30``: the truncation error is
``h^2 |f'''| / 6 ~ 1e-60 |f'''|`` and the rounding error ``~1e-120 |f| / h = 1e-90 |f|``, so
:data:`REL_ERR` (``1e-40`` relative to the case's largest value) bounds the oracle's error for
the O(1) functions of the tests' tiny shapes. This is a test's oracle, not a certificate: the
functions must be smooth within ``h`` of the point (random data: no ties, no kinks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mpmath
import numpy as np

CTX = mpmath.MPContext()
CTX.dps = 120
STEP = CTX.mpf(10) ** -30
REL_ERR = CTX.mpf(10) ** -40
ZERO = CTX.mpf(0)
NEG_INF = CTX.mpf("-inf")


def mp(a: Any) -> np.ndarray:
    """A float64 array (or tensor) as an object array of mpf, exactly."""
    if hasattr(a, "detach"):
        a = a.detach().double().numpy()
    arr = np.asarray(a, dtype=np.float64)
    out = np.empty(arr.shape, dtype=object)
    flat = out.reshape(-1)
    for i, v in enumerate(arr.reshape(-1)):
        flat[i] = CTX.mpf(float(v))
    return out


def _u(fn: Callable[[Any], Any]) -> Callable[[np.ndarray], np.ndarray]:
    f = np.frompyfunc(fn, 1, 1)
    return lambda x: np.asarray(f(x), dtype=object)


exp, log, sqrt, tanh, erf = (_u(CTX.exp), _u(CTX.log), _u(CTX.sqrt), _u(CTX.tanh),
                             _u(CTX.erf))  # fmt: skip


def gt0(x: np.ndarray) -> np.ndarray:
    return np.asarray(np.frompyfunc(lambda v: v > 0, 1, 1)(x), dtype=bool)


def full(shape: tuple[int, ...], v: Any) -> np.ndarray:
    out = np.empty(shape, dtype=object)
    out.fill(CTX.mpf(v))
    return out


# ---- activations ---------------------------------------------------------------------------
def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + exp(-x))


def relu(x: np.ndarray) -> np.ndarray:
    return np.where(gt0(x), x, ZERO)


def leaky_relu(x: np.ndarray, slope: float) -> np.ndarray:
    return np.where(gt0(x), x, x * CTX.mpf(slope))


def elu(x: np.ndarray, alpha: float) -> np.ndarray:
    return np.where(gt0(x), x, CTX.mpf(alpha) * (exp(x) - 1))


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


def gelu(x: np.ndarray) -> np.ndarray:
    """x Phi(x) = x/2 (1 + erf(x / sqrt 2))."""
    return x / 2 * (1 + erf(x / CTX.sqrt(2)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh(b (x + k x^3))) as defined: b = sqrt(2 / pi) and k = 0.044715 the
    reals (the exact reference's choice; torch's kernel uses their float64 roundings)."""
    b = CTX.sqrt(2 / CTX.pi)
    return x / 2 * (1 + tanh(b * (x + CTX.mpf(44715) / 10**6 * x * x * x)))


def softmax(z: np.ndarray, axis: int) -> np.ndarray:
    e = exp(z - np.max(z, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(z: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(z, axis=axis, keepdims=True)
    return z - m - log(np.sum(exp(z - m), axis=axis, keepdims=True))


# ---- dense, convolution, pooling -----------------------------------------------------------
def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    out = np.matmul(x, w.T)
    return out if b is None else out + b


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride=(1, 1), padding=(0, 0),
           dilation=(1, 1), groups: int = 1) -> np.ndarray:  # fmt: skip  # noqa: ANN001
    """out[n, o, i, j] = b[o] + sum_{c, a, e} xpad[n, g Cg + c, i s + a d, j s + e d] w[o, c, a, e]."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = full((n, c, h + 2 * ph, wd + 2 * pw), 0)
    xp[:, :, ph : ph + h, pw : pw + wd] = x
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    og = o // groups
    out = np.empty((n, o, oh, ow), dtype=object)
    for bi in range(n):
        for oi in range(o):
            g = oi // og
            for i in range(oh):
                for j in range(ow):
                    acc = ZERO if b is None else b[oi]
                    for ci in range(cg):
                        for a in range(kh):
                            for e in range(kw):
                                acc += (
                                    xp[bi, g * cg + ci, i * sh + a * dh, j * sw + e * dw]
                                    * w[oi, ci, a, e]
                                )
                    out[bi, oi, i, j] = acc
    return out


def conv1d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int = 1,
           padding: int = 0, groups: int = 1) -> np.ndarray:  # fmt: skip
    out = conv2d(x[:, :, None, :], w[:, :, None, :], b, (1, stride), (0, padding), (1, 1), groups)
    return out[:, :, 0, :]


def _out_size(size: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """torch's pooling output size (the last window must start inside the input or the left
    padding when ``ceil``)."""
    num = size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)
    out = num // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


def max_pool2d(x: np.ndarray, k: int, s: int, p: int = 0, ceil: bool = False) -> np.ndarray:
    """Max over each window's elements inside the input (padding is -inf)."""
    n, c, h, w = x.shape
    oh, ow = _out_size(h, k, s, p, 1, ceil), _out_size(w, k, s, p, 1, ceil)
    out = np.empty((n, c, oh, ow), dtype=object)
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * s - p, j * s - p
            win = x[:, :, max(h0, 0) : min(h0 + k, h), max(w0, 0) : min(w0 + k, w)]
            out[:, :, i, j] = np.max(win.reshape(n, c, -1), axis=2)
    return out


def avg_pool2d(x: np.ndarray, k: int, s: int, p: int = 0, ceil: bool = False,
               count_include_pad: bool = True) -> np.ndarray:  # fmt: skip
    """Mean over each window; the divisor counts the padding inside ``size + p`` when
    ``count_include_pad`` (torch's rule), else the input elements only."""
    n, c, h, w = x.shape
    oh, ow = _out_size(h, k, s, p, 1, ceil), _out_size(w, k, s, p, 1, ceil)
    out = np.empty((n, c, oh, ow), dtype=object)
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * s - p, j * s - p
            h1, w1 = min(h0 + k, h + p), min(w0 + k, w + p)
            pool = (h1 - h0) * (w1 - w0)
            h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, h), min(w1, w)
            win = x[:, :, h0:h1, w0:w1].reshape(n, c, -1)
            div = pool if count_include_pad else (h1 - h0) * (w1 - w0)
            out[:, :, i, j] = np.sum(win, axis=2) / div
    return out


def adaptive_avg_pool2d(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """Window i covers [floor(i H / oh), ceil((i + 1) H / oh))."""
    n, c, h, w = x.shape
    out = np.empty((n, c, oh, ow), dtype=object)
    for i in range(oh):
        for j in range(ow):
            a, b = (i * h) // oh, -((-(i + 1) * h) // oh)
            e, f = (j * w) // ow, -((-(j + 1) * w) // ow)
            out[:, :, i, j] = np.sum(x[:, :, a:b, e:f].reshape(n, c, -1), axis=2) / (
                (b - a) * (f - e)
            )
    return out


# ---- normalisation -------------------------------------------------------------------------
def batch_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float,
               running: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:  # fmt: skip
    """Per channel (axis 1): batch mean and biased variance, or the running statistics."""
    axes = tuple(a for a in range(x.ndim) if a != 1)
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    if running is None:
        m = np.sum(x, axis=axes, keepdims=True) / (x.size // x.shape[1])
        v = np.sum((x - m) ** 2, axis=axes, keepdims=True) / (x.size // x.shape[1])
    else:
        m, v = running[0].reshape(shape), running[1].reshape(shape)
    return (x - m) / sqrt(v + CTX.mpf(eps)) * g.reshape(shape) + b.reshape(shape)


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    m = np.sum(x, axis=-1, keepdims=True) / x.shape[-1]
    v = np.sum((x - m) ** 2, axis=-1, keepdims=True) / x.shape[-1]
    return (x - m) / sqrt(v + CTX.mpf(eps)) * g + b


def var(x: np.ndarray, axis: int, correction: int) -> np.ndarray:
    m = np.sum(x, axis=axis, keepdims=True) / x.shape[axis]
    return np.sum((x - m) ** 2, axis=axis) / (x.shape[axis] - correction)


# ---- attention -----------------------------------------------------------------------------
def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: np.ndarray | None = None,
              scale: Any = None) -> np.ndarray:  # fmt: skip
    """softmax(q k^T scale + bias) v over the last two axes; bias entries -inf mask."""
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * (scale or 1 / CTX.sqrt(q.shape[-1]))
    if bias is not None:
        s = s + bias
    return np.matmul(softmax(s, -1), v)


def causal_bias(n: int) -> np.ndarray:
    return np.where(np.tril(np.ones((n, n), dtype=bool)), ZERO, NEG_INF)


def multihead(x: np.ndarray, p: dict[str, np.ndarray], prefix: str, heads: int,
              bias: np.ndarray, pad: np.ndarray) -> np.ndarray:  # fmt: skip
    """nn.MultiheadAttention (batch_first, self-attention): in-projection, per-head attention
    with ``bias`` (L, L) and key padding (N, L: True masks), out-projection."""
    n, length, e = x.shape
    hd = e // heads
    qkv = linear(x, p[f"{prefix}.in_proj_weight"], p[f"{prefix}.in_proj_bias"])
    q, k, v = qkv[..., :e], qkv[..., e : 2 * e], qkv[..., 2 * e :]
    out = np.empty((n, length, e), dtype=object)
    for bi in range(n):
        b = bias + np.where(pad[bi], NEG_INF, ZERO)[None, :]
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            out[bi, :, sl] = attention(q[bi, :, sl], k[bi, :, sl], v[bi, :, sl], b)
    return linear(out, p[f"{prefix}.out_proj.weight"], p[f"{prefix}.out_proj.bias"])


# ---- losses --------------------------------------------------------------------------------
def reduce(terms: np.ndarray, reduction: str) -> Any:
    total = np.sum(terms)
    return total / terms.size if reduction == "mean" else total


def mse(y: np.ndarray, t: np.ndarray, reduction: str = "mean") -> Any:
    return reduce((y - t) ** 2, reduction)


def l1(y: np.ndarray, t: np.ndarray, reduction: str = "mean") -> Any:
    d = y - t
    return reduce(np.where(gt0(d), d, -d), reduction)


def huber(y: np.ndarray, t: np.ndarray, delta: float, reduction: str = "mean") -> Any:
    d = y - t
    a = np.where(gt0(d), d, -d)
    dl = CTX.mpf(delta)
    return reduce(np.where(gt0(dl - a), d * d / 2, dl * (a - dl / 2)), reduction)


def bce_logits(z: np.ndarray, t: np.ndarray, pos_weight: np.ndarray | None = None,
               reduction: str = "mean") -> Any:  # fmt: skip
    """-(pw t log s(z) + (1 - t) log(1 - s(z)))."""
    s = sigmoid(z)
    pw = 1 if pos_weight is None else pos_weight
    return reduce(-(pw * t * log(s) + (1 - t) * log(1 - s)), reduction)


def cross_entropy(z: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None,
                  ignore_index: int = -100, smoothing: float = 0.0,
                  reduction: str = "mean") -> Any:  # fmt: skip
    """torch's cross-entropy of logits (N, C) with class indices or probabilities (N, C).
    Label smoothing's coefficients are the real ``1 - eps`` and ``eps / C`` of the float64
    ``eps`` (torch rounds both to float64; the exact reference does not)."""
    lp = log_softmax(z, 1)
    c = z.shape[1]
    w = np.array([CTX.mpf(1)] * c, dtype=object) if weight is None else weight
    keep_c, eps_c = 1 - CTX.mpf(smoothing), CTX.mpf(smoothing) / c
    if target.dtype.kind == "f" or target.dtype == object:  # probabilities
        t = target * keep_c + eps_c
        terms = -np.sum(lp * t * w, axis=1)
        return reduce(terms, reduction)
    keep = target != ignore_index
    rows = np.arange(len(target))
    safe = np.where(keep, target, 0)
    wt = np.where(keep, w[safe], ZERO)
    nll = np.where(keep, -lp[rows, safe] * wt, ZERO)
    smooth = np.where(keep, -np.sum(lp * w, axis=1), ZERO)
    if reduction == "mean":
        denom = np.sum(wt)
        nll_r, smooth_r = np.sum(nll) / denom, np.sum(smooth) / denom
    else:
        nll_r, smooth_r = np.sum(nll), np.sum(smooth)
    return keep_c * nll_r + eps_c * smooth_r if smoothing else nll_r


def nll(lp: np.ndarray, target: np.ndarray, reduction: str = "mean") -> Any:
    picked = -lp[np.arange(len(target)), target]
    return reduce(picked, reduction)


# ---- gradients -----------------------------------------------------------------------------
def gradients(f: Callable[[dict[str, np.ndarray]], Any], params: dict[str, np.ndarray]
              ) -> tuple[Any, dict[str, np.ndarray]]:  # fmt: skip
    """(f(params), central differences of f per parameter element)."""
    value = f(params)
    grads = {}
    for name, p in params.items():
        g = np.empty(p.shape, dtype=object)
        for idx in np.ndindex(p.shape):
            orig = p[idx]
            p[idx] = orig + STEP
            up = f(params)
            p[idx] = orig - STEP
            down = f(params)
            p[idx] = orig
            g[idx] = (up - down) / (2 * STEP)
        grads[name] = g
    return value, grads
