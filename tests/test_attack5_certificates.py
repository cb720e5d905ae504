"""Adversarial regimes against a rigorous independent oracle (attack5).

The oracle (:mod:`tests.oracle.interval_ad`) is reverse-mode AD over mpmath's interval
context, written from each model's definition, at 320 digits and more until every value is
decided. An fpgrad claim is wrong exactly when its ball is disjoint from the oracle's
interval: every ball (loss and gradients) must meet it, every proven zero must lie in it, every
certified digit (the ball of radius ``|mid| 10^-digits``) must meet it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpmath import iv, mpf, nstr, workdps
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph
from tests.oracle import interval_ad as A
from tests.oracle.claims import claims

NEG_INF = float("-inf")


def _meets(o: Any, m: Any, r: Any) -> bool:
    return bool(o.a <= m + r and o.b >= m - r)


def _claims(ex: Any, key: str, oracle: Any) -> None:
    """Every claim of ``ex`` about ``key`` against the oracle's intervals (digits checked up to
    300, the oracle's width)."""
    oracle = np.asarray(oracle, dtype=object)
    c = claims(ex, key)
    mid, rad, zero, und, digits = (
        np.reshape(v, oracle.shape) for v in (c.mid, c.rad, c.zero, c.undetermined, c.digits)
    )
    for idx in np.ndindex(oracle.shape):
        o, m, r = oracle[idx], mpf(mid[idx]), mpf(float(rad[idx]))
        where = f"{key}{list(idx)}: oracle {iv.nstr(o, 20)}, fpgrad {nstr(m, 20)} +- {nstr(r, 5)}"
        assert _meets(o, m, r), f"ball excludes the exact value: {where}"
        if zero[idx]:
            assert o.a <= 0 <= o.b, f"proven zero is not zero: {where}"
        elif und[idx]:
            assert m - r <= 0 <= m + r, f"undetermined ball without 0: {where}"
        else:
            d = float(digits[idx])
            assert d >= 17, where
            bound = abs(m) * mpf(10) ** (-mpf(min(d, 300.0))) * (1 + mpf(1e-9))
            assert _meets(o, m, bound), f"{d:.1f} digits claimed: {where}"


def check(
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor,
    loss: Any,
    oracle: Callable[..., Any],
    max_dps: int = 40000,
    undetermined: bool = False,
    bits: int | None = None,
) -> Any:
    """fpgrad's certificates against ``oracle(params, *inputs, targets)`` (object arrays of
    :class:`A.V`), at ``bits`` when given (above 150: Arb); returns the exact result."""
    model = model.double()
    net = fpgrad.from_module(model, inputs, targets, loss)
    kw = {} if bits is None else {"bits": bits}
    ex = exact_graph(net.graph, allow_uncertified=True, **kw).result
    if not undetermined:
        assert ex.undetermined_count == 0, ex.escalations
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    value, grads, dps = A.gradients(lambda p: oracle(p, *xs, targets), params, max_dps=max_dps)
    with workdps(max(dps, ex.bits // 3) + 60):  # m +- r exactly
        _claims(ex, "loss", value)
        for name, g in grads.items():
            _claims(ex, f"grads/{name}", g)
    return ex


def _t(x: Any) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


# ---- the models ------------------------------------------------------------------------


class Scale(nn.Module):
    """y = f(w * x), w of x's shape."""

    def __init__(self, w: Any, f: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(_t(w))
        self.f = f or (lambda z: z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(self.w * x)


def _log_softmax_rows(z: np.ndarray) -> np.ndarray:
    """log_softmax of object rows: z - max - log(sum exp(z - max)) (the max is a constant
    shift chosen from the data: any constant gives the same exact value)."""
    out = np.empty(z.shape, dtype=object)
    for i in range(z.shape[0]):
        row = z[i]
        k = int(np.argmax([float(v.v.mid) for v in row]))
        s = A.total(A.exp(row - row[k]))
        out[i] = row - row[k] - A.log(s)
    return out


def _ce_oracle(smoothing: float = 0.0, weight: Any = None, ignore: int = -100) -> Callable:
    def f(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
        z = p["w"] * A.arr(x.numpy())
        logp = _log_softmax_rows(z)
        n, c = z.shape
        terms, wsum = [], A.V(0)
        for i in range(n):
            if t.dtype == torch.long:
                ti = int(t[i])
                if ti == ignore:
                    continue
                wi = mpf(1) if weight is None else mpf(float(weight[ti]))
                q = [iv.mpf(mpf(smoothing)) / c + (iv.mpf(1) - iv.mpf(mpf(smoothing)) if j == ti else 0)
                     for j in range(c)]  # fmt: skip
                if weight is not None:
                    # torch: per-class weight on every smoothed term, normaliser w[t_i]
                    terms.append(-A.total(np.array([logp[i, j] * (iv.mpf(mpf(1) - mpf(smoothing)) * float(weight[j]) if j == ti else 0)
                                                    for j in range(c)], dtype=object)))  # fmt: skip
                    if smoothing:
                        terms.append(-A.total(np.array([logp[i, j] * (iv.mpf(mpf(smoothing)) / c * float(weight[j]))
                                                        for j in range(c)], dtype=object)))  # fmt: skip
                    wsum = wsum + A.V(wi)
                else:
                    terms.append(
                        -A.total(np.array([logp[i, j] * q[j] for j in range(c)], dtype=object))
                    )
                    wsum = wsum + A.V(1)
            else:
                terms.append(-A.total(logp[i] * A.arr(t[i].numpy())))
                wsum = wsum + A.V(1)
        return A.total(np.array(terms, dtype=object)) / wsum

    return f


LOGITS = {
    "1e4": [[1e4, -1e4, 0.0], [0.0, 1e4, -1e4]],
    "700": [[700.0, -700.0, 710.0], [-745.0, 0.0, 709.0]],
    "mixed": [[1e4, 1e4 - 2**-39, -1e4], [1e-300, -1e-300, 5e-324]],
    "close_huge": [[1e15, 1e15 + 0.125, 1e15 - 0.125], [3.0, 3.0, 3.0]],
}


@pytest.mark.parametrize("logits", sorted(LOGITS))
@pytest.mark.parametrize("target", ["right", "wrong"])
def test_cross_entropy_saturated(logits: str, target: str) -> None:
    x = _t(LOGITS[logits])
    t = torch.tensor([0, 1] if target == "right" else [1, 2])
    check(Scale(torch.ones(2, 3)), x, t, nn.CrossEntropyLoss(), _ce_oracle())


@pytest.mark.parametrize("kind", ["soft", "weight", "ignore"])
def test_cross_entropy_variants_saturated(kind: str) -> None:
    x = _t(LOGITS["1e4"])
    weight = _t([0.5, 2.0, 3.0])
    if kind == "soft":
        t = _t([[0.9, 0.1, 0.0], [0.2, 0.0, 0.8]])
        loss, oracle = nn.CrossEntropyLoss(), _ce_oracle()
    elif kind == "smoothing":
        t = torch.tensor([0, 1])
        loss, oracle = nn.CrossEntropyLoss(label_smoothing=0.1), _ce_oracle(0.1)
    elif kind == "weight":
        t = torch.tensor([0, 2])
        loss, oracle = nn.CrossEntropyLoss(weight=weight), _ce_oracle(weight=weight)
    elif kind == "weight_smoothing":
        t = torch.tensor([0, 2])
        loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.25)
        oracle = _ce_oracle(0.25, weight=weight)
    else:
        t = torch.tensor([0, -100])
        loss, oracle = nn.CrossEntropyLoss(), _ce_oracle()
    # the oracle's reading of torch's semantics, checked on benign logits in float64
    benign = torch.tensor([[0.5, -1.0, 0.25], [0.0, 1.5, -0.5]], dtype=torch.float64)
    w = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    out = loss(w * benign, t)
    out.backward()
    value, grads, _ = A.gradients(lambda p: oracle(p, benign, t), {"w": np.ones((2, 3))})
    assert abs(float(value.mid) - out.item()) < 1e-12
    np.testing.assert_allclose(
        [float(g.mid) for g in grads["w"].ravel()], w.grad.numpy().ravel(), atol=1e-12
    )
    check(Scale(torch.ones(2, 3)), x, t, loss, oracle)


# ---- pointwise tails and kinks -----------------------------------------------------------

X_TAILS = [[20.0, -20.0, 400.0, -400.0], [1e5, -1e5, 5e-324, -1e-300]]
X_KINKS = [[0.0, -0.0, 5e-324, -5e-324], [1e-300, -1e-300, 2.0, -3.0]]


def _mse_oracle(f: Callable[[np.ndarray], np.ndarray]) -> Callable:
    def run(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
        d = f(p["w"] * A.arr(x.numpy())) - A.arr(t.numpy())
        return A.total(d * d) / d.size

    return run


POINTWISE: dict[str, tuple[Callable, Callable]] = {
    "tanh": (torch.tanh, A.tanh),
    "sigmoid": (torch.sigmoid, A.sigmoid),
    "silu": (F.silu, lambda z: z * A.sigmoid(z)),
    "gelu": (F.gelu, A.gelu),
    "relu": (torch.relu, A.relu),
    "leaky": (lambda z: F.leaky_relu(z, 0.125), lambda z: A.leaky_relu(z, 0.125)),
    "abs": (torch.abs, A.absv),
}


@pytest.mark.parametrize("name", sorted(POINTWISE))
@pytest.mark.parametrize("data", ["tails", "kinks"])
def test_pointwise_tails_and_kinks(name: str, data: str) -> None:
    f, g = POINTWISE[name]
    x = _t(X_TAILS if data == "tails" else X_KINKS)
    t = _t([[0.5, -0.25, 1.0, 0.0], [2.0, 0.0, -1.0, 0.125]])
    check(Scale(torch.ones(2, 4), f), x, t, nn.MSELoss(), _mse_oracle(g))


def test_l1_at_zero_residuals() -> None:
    """L1 at a zero residual (torch: sign(0) = 0) and at 2^-52 from one."""
    x = _t([[1.0, 2.0, 3.0, 0.5]])
    t = _t([[1.0, 3.0, 2.0, 0.5 + 2**-52]])

    def l1(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
        return A.total(A.absv(p["w"] * A.arr(x.numpy()) - A.arr(t.numpy()))) / 4

    check(Scale(torch.ones(1, 4)), x, t, nn.L1Loss(), l1)


# ---- normalisation with constant and near-constant rows ------------------------------------

ROWS = [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0 + 2**-52, 1.0, 1.0], [3.0, -3.0, 1e-300, 0.0]]


class Norm(nn.Module):
    def __init__(self, kind: str, eps: float) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.g = nn.Parameter(_t([1.5, -0.5, 2.0, 0.25]))
        self.b = nn.Parameter(_t([0.125, 1.0, -1.0, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.g
        if self.kind == "layer":
            return F.layer_norm(x, (4,), self.g, self.b, self.eps)
        if self.kind == "rms":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) + self.b
        return F.batch_norm(x.T, None, None, self.g[:3], self.b[:3], True, 0.1, self.eps).T


def _norm_oracle(kind: str, eps: float) -> Callable:
    def run(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
        g, b = p["g"], p["b"]
        h = A.arr(x.numpy()) * g
        rows = h
        out = np.empty(rows.shape, dtype=object)
        for i in range(rows.shape[0]):
            r, n = rows[i], rows.shape[1]
            if kind == "rms":
                out[i] = r / A.sqrt(A.total(r * r) / n + eps) + b
                continue
            mean = A.total(r) / n
            var = A.total((r - mean) * (r - mean)) / n
            scale = g if kind == "layer" else g[i]
            shift = b if kind == "layer" else b[i]
            out[i] = (r - mean) / A.sqrt(var + eps) * scale + shift
        d = out - A.arr(t.numpy())
        return A.total(d * d) / d.size

    return run


@pytest.mark.parametrize("kind", ["layer", "rms", "batch"])
@pytest.mark.parametrize("eps", [1e-5, 1e-300, 5e-324])
def test_norms_on_constant_rows(kind: str, eps: float) -> None:
    x = _t(ROWS)
    t = torch.zeros(x.shape, dtype=torch.float64) + 0.375
    check(Norm(kind, eps), x, t, nn.MSELoss(), _norm_oracle(kind, eps), max_dps=2000)


# ---- cancellation, range, logs and powers ----------------------------------------------------


class Poly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(_t([1.0, 2.0, 5e-324, 1e-300]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = (self.w[0] * x[0] + 1e300) - 1e300  # 1 exactly; 0 in float64
        b = (self.w[1] * 1e308 * 10.0) / 1e308  # 20 exactly; inf in float64
        c = torch.log(self.w[2]) + torch.sqrt(self.w[3]) + self.w[3] ** -0.5 * 1e-160
        d = torch.sqrt(self.w[0] - 1.0 + self.w[2] * 0.0 + 1.0)
        return torch.stack([a, b, c, d, 1.0 / self.w[2] * 1e-320])


def _poly_oracle(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
    w = p["w"]
    xs = A.arr(x.numpy())
    a = (w[0] * xs[0] + 1e300) - 1e300
    b = (w[1] * 1e308 * 10.0) / 1e308
    c = A.log(w[2]) + A.sqrt(w[3]) + w[3] ** -0.5 * 1e-160
    d = A.sqrt(w[0] - 1.0 + w[2] * 0.0 + 1.0)
    y = np.array([a, b, c, d, 1.0 / w[2] * 1e-320], dtype=object) - A.arr(t.numpy())
    return A.total(y * y) / 5


def test_cancellation_overflow_log_pow() -> None:
    x = _t([1.0])
    t = _t([0.0, 1.0, -700.0, 0.5, 2.0])
    check(Poly(), x, t, nn.MSELoss(), _poly_oracle)


@pytest.mark.parametrize("z", [1e4, -1e4, 710.0, 0.0])
def test_bce_with_logits_saturated(z: float) -> None:
    x = _t([[z, -z, 1.0], [z, 2.0, -z]])
    t = _t([[1.0, 1.0, 0.0], [0.25, 0.5, 1.0]])

    def oracle(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
        u, y = p["w"] * A.arr(x.numpy()), A.arr(t.numpy())
        # -(y log s(u) + (1 - y) log s(-u)), log s(u) = -log1p(e^-u) written per sign
        terms = np.empty(u.shape, dtype=object)
        for i in np.ndindex(u.shape):
            v = u[i]
            pos = float(v.v.mid) >= 0
            ls = -A.log1p(A.exp(-v)) if pos else v - A.log1p(A.exp(v))
            lns = -v - A.log1p(A.exp(-v)) if pos else -A.log1p(A.exp(v))
            terms[i] = -(y[i] * ls + (1 - y[i]) * lns)
        return A.total(terms) / u.size

    check(Scale(torch.ones(2, 3)), x, t, nn.BCEWithLogitsLoss(), oracle)


# ---- max-pool ties and masked attention --------------------------------------------------


class Pool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(_t([[2.0, 2.0, 1.0, 1.0], [2.0, 2.0, 1.0, 1.0],
                                  [0.0, 0.0, -1.0, 5e-324], [0.0, -0.0, -1.0, 0.0]]))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d((self.w * x)[None, None], 2, 2).reshape(4)


def _pool_oracle(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
    h = p["w"] * A.arr(x.numpy())
    outs = [A.first_max([h[i, j], h[i, j + 1], h[i + 1, j], h[i + 1, j + 1]])
            for i in (0, 2) for j in (0, 2)]  # fmt: skip
    d = np.array(outs, dtype=object) - A.arr(t.numpy())
    return A.total(d * d) / 4


def test_max_pool_ties_route_to_the_first_maximum() -> None:
    """Equal maxima in every window: torch sends the gradient to the first (row-major); the
    exact reference must certify that convention, checked against torch float64 too."""
    x, t = torch.ones(4, 4, dtype=torch.float64), _t([0.5, -1.0, 3.0, 0.25])
    model = Pool()
    ex = check(model, x, t, nn.MSELoss(), _pool_oracle)
    m = copy.deepcopy(model)
    nn.MSELoss()(m(x), t).backward()
    mid = np.array([float(v) for v in ex.midpoints("grads/w").ravel()]).reshape(4, 4)
    np.testing.assert_array_equal(mid, m.w.grad.numpy())  # every value is exact in float64


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Parameter(_t([[1e4, -1.0], [0.5, 2.0], [3.0, 700.0]]))

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        s = self.q @ self.q.T
        p = torch.softmax(s.masked_fill(mask, NEG_INF), -1)
        return p @ self.q


def _attn_oracle(p: dict, mask: torch.Tensor, t: torch.Tensor) -> A.V:
    q = p["q"]
    s = q @ q.T
    out = np.empty(q.shape, dtype=object)
    for i in range(3):
        keep = [j for j in range(3) if not bool(mask[i, j])]
        k = max(keep, key=lambda j: float(s[i, j].v.mid))
        e = {j: A.exp(s[i, j] - s[i, k]) for j in keep}
        z = A.total(np.array(list(e.values()), dtype=object))
        out[i] = sum((q[j] * (e[j] / z) for j in keep), np.zeros(2, dtype=object) + A.V(0))
    d = out - A.arr(t.numpy())
    return A.total(d * d) / d.size


@pytest.mark.parametrize("row", [0, 1, 2])
def test_attention_with_masked_rows_and_huge_scores(row: int) -> None:
    """Scores up to 1e8, -inf masks leaving one or two keys per row."""
    mask = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    mask[row] = torch.tensor([True, False, True])
    check(Attn(), mask, torch.zeros(3, 2, dtype=torch.float64), nn.MSELoss(), _attn_oracle)


SMOOTHING: dict[str, tuple[Any, Callable]] = {
    "module": (nn.CrossEntropyLoss(label_smoothing=0.1), _ce_oracle(0.1)),
    "functional": (lambda z, t: F.cross_entropy(z, t, label_smoothing=0.2), _ce_oracle(0.2)),
    "weight": (
        nn.CrossEntropyLoss(weight=_t([0.5, 2.0, 3.0]), label_smoothing=0.25),
        _ce_oracle(0.25, weight=_t([0.5, 2.0, 3.0])),
    ),
}


@pytest.mark.parametrize("kind", sorted(SMOOTHING))
def test_label_smoothing_constants_are_the_rationals_they_round(kind: str) -> None:
    """Label smoothing eps on 3 classes: the exact loss uses 1 - eps and eps / 3 (of the
    float64 eps); torch's decomposition rounds both to float64, and the exact reference
    certified 2,400 digits of that rounded-constant loss (wrong from digit 17) before the fix."""
    loss, oracle = SMOOTHING[kind]
    benign = torch.tensor([[0.5, -1.0, 0.25], [0.0, 1.5, -0.5]], dtype=torch.float64)
    t = torch.tensor([0, 2])
    w = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    out = loss(w * benign, t)
    out.backward()
    value, grads, _ = A.gradients(lambda p: oracle(p, benign, t), {"w": np.ones((2, 3))})
    assert abs(float(value.mid) - out.item()) < 1e-12
    got = [float(g.mid) for g in grads["w"].ravel()]
    np.testing.assert_allclose(got, w.grad.numpy().ravel(), atol=1e-12)
    check(Scale(torch.ones(2, 3)), benign, t, loss, oracle)
    check(Scale(torch.ones(2, 3)), _t(LOGITS["1e4"]), t, loss, oracle)


def test_label_smoothing_that_torch_rounds_ambiguously_is_refused() -> None:
    """Without a traced F.cross_entropy call, 0.1 over 3 classes cannot be told from its
    float64 predecessor (both round to 0.9 and 0.1 / 3): a one-line InputError."""
    from fpgrad.errors import InputError

    def raw(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch._C._nn.cross_entropy_loss(z, t, None, 1, -100, 0.1)

    model = Scale(torch.ones(2, 3)).double()
    net = fpgrad.from_module(model, _t(LOGITS["700"]), torch.tensor([0, 1]), raw)
    with pytest.raises(InputError, match="label smoothing is one of 2 float64 values"):
        exact_graph(net.graph)


class MHA(nn.Module):
    """nn.MultiheadAttention with its default need_weights=True (torch scales q by its
    float64 ``sqrt(1 / head_dim)``); head_dim 3."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.a = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x, x, x)[0]


def _mha_oracle(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
    xs = A.arr(x.numpy())[0]
    qkv = xs @ p["a.in_proj_weight"].T + p["a.in_proj_bias"]
    scale = 1 / iv.sqrt(3)  # the definition's 1 / sqrt(head_dim)
    heads = []
    for h in range(2):
        q, k, v = (qkv[:, 6 * j + 3 * h : 6 * j + 3 * h + 3] for j in range(3))
        s = (q @ k.T) * A.V(scale)
        rows = []
        for i in range(3):
            top = max(range(3), key=lambda j: float(s[i, j].v.mid))
            e = A.exp(s[i] - s[i, top])
            rows.append(e / A.total(e))
        heads.append(np.array(rows, dtype=object) @ v)
    o = np.concatenate(heads, axis=1) @ p["a.out_proj.weight"].T + p["a.out_proj.bias"]
    d = o - A.arr(t.numpy())[0]
    return A.total(d * d) / d.size


def test_multihead_attention_scale_is_the_real_inverse_square_root() -> None:
    """torch's q * fl(sqrt(1/3)) inside nn.MultiheadAttention was read as the exact scale."""
    torch.manual_seed(6)
    x = torch.randn(1, 3, 6, dtype=torch.float64) * 4
    t = torch.randn(1, 3, 6, dtype=torch.float64)
    check(MHA(), x, t, nn.MSELoss(), _mha_oracle, max_dps=320)  # key bias: 0 by cancellation


def test_user_constants_equal_to_torch_smoothing_constants_stay_as_written() -> None:
    """A hand-written smoothed loss with the float64 constants 0.9 and 0.1 / 3 (Tensor ops,
    beside a real smoothed F.cross_entropy): the exact reference keeps the user's constants."""
    keep, share = 0.9, 0.1 / 3

    def loss(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(z, 1)
        own = F.nll_loss(logp, t) * keep + (-logp.sum(1)).mean() * share
        return own + F.cross_entropy(z, t, label_smoothing=0.1)

    def oracle(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
        z = p["w"] * A.arr(x.numpy())
        logp = _log_softmax_rows(z)
        nll = -A.total(np.array([logp[i, int(t[i])] for i in range(2)], dtype=object)) / 2
        smooth = -A.total(logp) / 2
        return nll * keep + smooth * share + _ce_oracle(0.1)(p, x, t)

    x, t = _t([[0.5, -1.0, 0.25], [0.0, 1.5, -0.5]]), torch.tensor([0, 2])
    check(Scale(torch.ones(2, 3)), x, t, loss, oracle)


def test_huber_exactly_at_delta_and_below_tiny() -> None:
    """Residuals exactly at +-delta (the branch point), just inside, and 2^-1074."""
    x = _t([[1.5, -0.5, 1.0, 5e-324]])
    t = _t([[0.5, 0.5, 1.0 - (1.0 - 2**-53), 0.0]])
    delta = 1.0

    def oracle(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
        r = p["w"] * A.arr(x.numpy()) - A.arr(t.numpy())
        terms = np.empty(r.shape, dtype=object)
        for i in np.ndindex(r.shape):
            z = A.absv(r[i])
            inside = bool(z.v.b < delta)
            if not inside and not bool(z.v.a >= delta):
                raise A.Undecided("huber branch")
            terms[i] = z * z * 0.5 if inside else (z - 0.5 * delta) * delta
        return A.total(terms) / r.size

    check(Scale(torch.ones(1, 4)), x, t, nn.HuberLoss(delta=delta), oracle)


@pytest.mark.parametrize("rows", [3, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_reduction_none_scales_rows_not_classes(rows: int, weighted: bool) -> None:
    """``(F.cross_entropy(z, t, reduction="none") * r).sum()``: the upstream gradient is one
    per row. With as many rows as classes the exact reference multiplied class j by r_j and
    certified the wrong gradients (w[0, 1]: -0.2229 against -0.1115)."""
    r = _t([1.0, 2.0, 5.0, 0.5][:rows])
    cw = _t([0.5, 2.0, 3.0]) if weighted else None
    x = _t([[0.5, -1.0, 0.25], [0.0, 1.5, -0.5], [2.0, 0.0, 1.0], [1e4, -1e4, 0.0]][:rows])
    t = torch.tensor([0, 2, 1, -100][:rows])

    def loss(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(z, t, weight=cw, reduction="none") * r).sum()

    def oracle(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
        logp = _log_softmax_rows(p["w"] * A.arr(x.numpy()))
        terms = [
            -logp[i, int(t[i])] * (1.0 if cw is None else float(cw[int(t[i])])) * float(r[i])
            for i in range(rows)
            if int(t[i]) != -100
        ]
        return A.total(np.array(terms, dtype=object))

    check(Scale(torch.ones(rows, 3)), x, t, loss, oracle)


class PadPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(_t([[3.0, 3.0, -1.0], [3.0, -2.0, -1.0], [-5.0, -5.0, -5.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d((self.w * x)[None, None], 2, 2, padding=1).reshape(4)


def _pad_pool_oracle(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
    h = p["w"] * A.arr(x.numpy())
    outs = []
    for i0 in (-1, 1):
        for j0 in (-1, 1):
            cells = [
                h[i, j] for i in (i0, i0 + 1) for j in (j0, j0 + 1) if 0 <= i < 3 and 0 <= j < 3
            ]
            outs.append(A.first_max(cells))
    d = np.array(outs, dtype=object) - A.arr(t.numpy())
    return A.total(d * d) / 4


def test_max_pool_with_padding_ties_and_negative_windows() -> None:
    """Padding cells (-inf for torch) never win, even beside ties and all-negative windows."""
    x, t = torch.ones(3, 3, dtype=torch.float64), _t([0.5, -1.0, 3.0, 0.25])
    model = PadPool()
    ex = check(model, x, t, nn.MSELoss(), _pad_pool_oracle)
    m = copy.deepcopy(model).double()
    nn.MSELoss()(m(x), t).backward()
    mid = np.array([float(v) for v in ex.midpoints("grads/w").ravel()]).reshape(3, 3)
    np.testing.assert_array_equal(mid, m.w.grad.numpy())


class Centered(nn.Module):
    """sum(h - mean(h)) is exactly 0 for every w; the balls cannot prove it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(_t([0.1, 1e300, -3.0, 2**-60]))
        self.v = nn.Parameter(_t([1.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w * x
        return ((h - h.mean()).sum() * self.v + 1.0).reshape(1)


def test_sum_of_centered_values_is_never_certified_nonzero() -> None:
    def oracle(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
        h = p["w"] * A.arr(x.numpy())
        c = A.total(h - A.total(h) / 4) * p["v"][0] + 1.0
        return (c - float(t[0])) * (c - float(t[0]))

    x, t = _t([1.0, 1.0, 3.0, -1.0]), _t([0.25])
    ex = check(Centered(), x, t, nn.MSELoss(), oracle, max_dps=320, undetermined=True)
    assert (ex.zero("grads/v") | ex.undetermined("grads/v")).all()  # never a nonzero


@pytest.mark.parametrize("kind", ["var", "sqrt_var"])
def test_variance_backward_scale_is_the_rational(kind: str) -> None:
    """torch's backward scales by its float64 2 / (n - 1) (n = 4: 2/3 rounded)."""

    def f(z: torch.Tensor) -> torch.Tensor:
        return z.var(1).sqrt() if kind == "sqrt_var" else z.var(1)

    def g(z: np.ndarray) -> np.ndarray:
        out = []
        for row in z:
            mean = A.total(row) / 4
            var = A.total((row - mean) * (row - mean)) / 3
            out.append(A.sqrt(var) if kind == "sqrt_var" else var)
        return np.array(out, dtype=object)

    x = _t([[1.0, 2.0, 4.0, 8.0], [0.1, 0.2, 0.3, 0.7]])
    t = _t([0.5, 0.01])

    def oracle(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
        d = g(p["w"] * A.arr(x.numpy())) - A.arr(t.numpy())
        return A.total(d * d) / 2

    check(Scale(torch.ones(2, 4), f), x, t, nn.MSELoss(), oracle)
