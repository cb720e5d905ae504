"""Adversarial regimes against a rigorous independent oracle (attack5).

The oracle (:mod:`tests.oracle.interval_ad`) is reverse-mode AD over mpmath's interval
context, written from each model's definition, at 320 digits and more until every value is
decided. An fpgrad claim is wrong exactly when its ball is disjoint from the oracle's
interval: every ball (loss and gradients) must meet it, every proven zero must lie in it, every
certified digit (the ball of radius ``|mid| 10^-digits``) must meet it.
"""

from __future__ import annotations

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

NEG_INF = float("-inf")


def _meets(o: Any, m: Any, r: Any) -> bool:
    return bool(o.a <= m + r and o.b >= m - r)


def _claims(ex: Any, key: str, oracle: Any) -> None:
    oracle = np.asarray(oracle, dtype=object)
    mid, rad = ex.enclosure(key)
    mid = np.asarray(mid, dtype=object).reshape(oracle.shape)
    rad = np.asarray(rad, dtype=np.float64).reshape(oracle.shape)
    zero, und = ex.zero(key).reshape(oracle.shape), ex.undetermined(key).reshape(oracle.shape)
    digits = np.asarray(ex.digits[key], dtype=np.float64).reshape(oracle.shape)
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
) -> Any:
    """fpgrad's certificates against ``oracle(params, *inputs, targets)`` (object arrays of
    :class:`A.V`); returns the exact result."""
    model = model.double()
    net = fpgrad.from_module(model, inputs, targets, loss)
    ex = exact_graph(net.graph, allow_uncertified=True).result
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
                    terms.append(-A.total(np.array([logp[i, j] * q[j] for j in range(c)], dtype=object)))
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
    check(Scale(torch.ones(2, 3)), x, t, nn.CrossEntropyLoss(), _ce_oracle(), undetermined=True)


@pytest.mark.parametrize("kind", ["smoothing", "soft", "weight", "ignore", "weight_smoothing"])
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
    np.testing.assert_allclose([float(g.mid) for g in grads["w"].ravel()], w.grad.numpy().ravel(), atol=1e-12)
    check(Scale(torch.ones(2, 3)), x, t, loss, oracle, undetermined=True)
