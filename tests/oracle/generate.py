"""Hypothesis strategies for adversarial networks (issue 12's campaign).

Hypothesis draws the knobs (regime, sizes, exponents, gaps, a seed); a numpy generator seeded
from them fills the arrays, so each example is small, reproducible and shrinks on its knobs.
Regimes: ReLU inputs exactly 0 or +-2**-k from 0 (k up to 1000, through ``1 + s 2**-k - 1``);
saturated tanh and sigmoid; cross-entropy logit gaps up to 1e4 (half of them with the top
class as target: a loss of about e**-gap); soft targets and label
smoothing near the optimum; inputs and weights near 2**+-1000; deep chains; wide fan-in with
cancellation; training batch norm (a bias before it: an exact zero gradient).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from fpgrad.model.network import Layer, Loss, Network

REGIMES = (
    "relu_edge",
    "saturated",
    "logit_gap",
    "soft_targets",
    "huge_tiny",
    "deep",
    "fan_in",
    "batch_norm",
)
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "softmax")


def _dense(name: str, rng: np.random.Generator, out: int, width: int, bias: bool) -> Layer:
    params = {"weight": rng.normal(size=(out, width))}
    if bias:
        params["bias"] = rng.normal(size=out)
    return Layer(name, "dense", params)


def _targets(rng: np.random.Generator, loss: str, batch: int, width: int) -> np.ndarray:
    if loss == "mse":
        return rng.normal(size=(batch, width))
    if loss == "bce":
        return rng.choice([0.0, 1.0, 0.25, 0.9], size=(batch, width))
    return rng.integers(0, width, size=batch).astype(np.float64)


@st.composite
def networks(draw: st.DrawFn, regimes: tuple[str, ...] = REGIMES) -> Network:
    """One small adversarial network (at most a few hundred values)."""
    regime = draw(st.sampled_from(regimes))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    batch = draw(st.integers(2 if regime == "batch_norm" else 1, 3))
    width = draw(st.integers(1, 3))
    loss = draw(st.sampled_from(("mse", "cross_entropy", "bce")))
    depth = draw(st.integers(1, 6 if regime == "deep" else 2))
    acts = [draw(st.sampled_from(ACTIVATIONS)) for _ in range(depth)]
    in_width = width
    x = rng.normal(size=(batch, in_width))
    layers: list[Layer] = []
    if regime == "relu_edge":
        # pre-activation of unit 0: a (1 + s 2**-k - 1) exactly, s in {-1, 0, 1}
        k = draw(st.integers(1, 1000))
        s = draw(st.sampled_from((-1.0, 0.0, 1.0)))
        a = draw(st.sampled_from((1.0, 0.5, 3.0)))
        x = np.concatenate([np.tile([1.0, s * 2.0**-k, -1.0], (batch, 1)), x], axis=1)
        first = _dense("d0", rng, width, x.shape[1], bias=False)
        first.params["weight"][0, :3] = a
        first.params["weight"][0, 3:] = 0.0
        layers += [first, Layer("a0", draw(st.sampled_from(("relu", "leaky_relu"))))]
        acts = acts[1:]
    elif regime == "fan_in":
        half = draw(st.integers(2, 8))
        base = rng.normal(size=(batch, half))
        x = np.concatenate([base, -base], axis=1)  # each feature twice, with opposite signs
        first = _dense("d0", rng, width, 2 * half, bias=draw(st.booleans()))
        first.params["weight"][:, half:] = first.params["weight"][:, :half]  # sums cancel
        if draw(st.booleans()):
            first.params["weight"][0, half] *= 1 + 2.0 ** -draw(st.integers(1, 52))
        layers += [first, Layer("a0", draw(st.sampled_from(ACTIVATIONS)))]
        acts = acts[1:]
    elif regime == "huge_tiny":
        e = draw(st.integers(900, 1000)) * draw(st.sampled_from((-1, 1)))
        x = x * 2.0**e
    for i, kind in enumerate(acts):
        n = len(layers)
        layers.append(_dense(f"d{n}", rng, width, x.shape[1] if not layers else width, True))
        if regime == "huge_tiny" and draw(st.booleans()):
            e = draw(st.integers(-1000, 1000))
            layers[-1].params["weight"][...] *= 2.0**e
        if regime == "saturated":
            big = draw(st.floats(10.0, 1000.0)) * rng.choice([-1.0, 1.0], size=width)
            layers[-1].params["bias"][...] = big
        if regime == "batch_norm" and i == 0:
            layers.append(
                Layer(
                    f"bn{n}",
                    "batch_norm",
                    {"weight": rng.normal(size=width), "bias": rng.normal(size=width)},
                )
            )
        layers.append(Layer(f"a{n}", kind))
    n = len(layers)
    last = _dense(f"d{n}", rng, width, width if layers else x.shape[1], True)
    layers.append(last)
    y = _targets(rng, loss, batch, width)
    if regime == "logit_gap" or (regime == "soft_targets" and width > 1):
        loss = "cross_entropy"
        y = _targets(rng, loss, batch, width)
    if regime == "logit_gap":
        gap = 10.0 ** draw(st.floats(0.0, 4.0))
        last.params["bias"][...] = rng.choice([0.0, -gap, gap], size=width)
        last.params["weight"][...] *= 2.0 ** -draw(st.integers(0, 30))
        if width > 1 and draw(st.booleans()):  # the target is the top class: loss ~ e**-gap
            y = np.full(batch, float(np.argmax(last.params["bias"])))
    if regime == "soft_targets" and width > 1:
        smooth = draw(st.sampled_from((0.0, 0.1, 0.2)))
        if smooth:
            cls = rng.integers(0, width, size=batch)
            y = np.full((batch, width), smooth / width)
            y[np.arange(batch), cls] += 1 - smooth
        else:
            y = rng.dirichlet(np.ones(width), size=batch)
        # logits at the optimum: the last layer's bias log t, its weights tiny
        last.params["bias"][...] = np.log(np.clip(y[0], 1e-300, None))
        last.params["weight"][...] *= 2.0 ** -draw(st.integers(20, 60))
    if loss == "cross_entropy" and y.ndim == 1 and width < 2:
        loss = "mse"
        y = _targets(rng, loss, batch, width)
    return Network(tuple(layers), Loss(loss), x, y, name=f"{regime}-{seed}")
