"""One forward and backward pass of a Network in one number system, keeping every intermediate.

Each layer's forward formula and local derivative are written once, side by side, against
the :class:`~fpgrad.arith.base.Arith` slots. The backward pass walks the layers in reverse
without recursion and in a fixed order, so the order of accumulation is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fpgrad.arith.base import Arith
from fpgrad.model.network import Layer, Network

if TYPE_CHECKING:
    from fpgrad.model.policy import Plan


@dataclass
class Trace:
    """Everything one evaluation produced.

    ``forward[layer]`` is the layer's output (pre-activation z for dense and the batch norms,
    activation a otherwise); ``backward[layer]`` is dL/d(that output); ``grads`` maps
    ``layer.param`` to dL/dparam. Values are arrays of the number system (float64 arrays of
    exactly converted values for torch dtypes).
    """

    system: str
    loss: Any
    forward: dict[str, Any] = field(default_factory=dict)
    backward: dict[str, Any] = field(default_factory=dict)
    grads: dict[str, Any] = field(default_factory=dict)
    #: key ("loss", "forward/L", "backward/L", "grads/P") -> the format the value was in,
    #: where it differs between tensors (precision policies); missing: the system's format
    formats: dict[str, str] = field(default_factory=dict)
    #: layer name or "loss" -> observed dtypes of what the op computed on (torch runs)
    ran_in: dict[str, dict[str, str | None]] = field(default_factory=dict)


def evaluate_plan(
    net: Network,
    plan: Plan,
    arith: Callable[[str], Arith],
    params: dict[str, Any] | None = None,
    rows: np.ndarray | None = None,
    loss_scale: float = 1.0,
) -> Trace:
    """Forward and backward of ``net`` with every layer (and the loss) in the number system
    its :class:`~fpgrad.model.policy.Plan` names (``arith(precision)``; systems of float64 arrays,
    e.g. the emulated machines). A value entering a layer in another system is rounded into
    it; gradients are rounded back into the system of the value they belong to, as autograd
    casts them; parameters are stored in ``plan.params`` (``params`` overrides, in it) and
    parameter gradients arrive there. ``loss_scale`` as in :func:`evaluate`."""
    systems = [arith(lp.compute) for lp in plan.layers]
    param_systems = [
        arith(lp.params) if lp.params else ar for lp, ar in zip(plan.layers, systems, strict=True)
    ]
    trace = _evaluate(
        net,
        plan.policy,
        systems,
        param_systems,
        arith(plan.loss),
        arith(plan.data),
        arith(plan.params),
        params,
        rows,
        loss_scale,
    )
    for lp in plan.layers:
        trace.formats[f"forward/{lp.layer}"] = trace.formats[f"backward/{lp.layer}"] = lp.output
        trace.ran_in[lp.layer] = {"compute": lp.compute, "params": lp.params, "output": lp.output}
    trace.formats["loss"] = plan.loss
    trace.ran_in["loss"] = {"compute": plan.loss, "params": None, "output": plan.loss}
    for key in trace.grads:
        trace.formats[f"grads/{key}"] = plan.params
    return trace


def _cast(src: Arith, dst: Arith, value: Any) -> Any:
    """``value`` of system ``src`` in system ``dst``: itself when they are one system, else
    rounded into ``dst`` from its float64 value (systems of float64 arrays)."""
    return value if src is dst else dst.asarray(src.to_float64(value))


def _evaluate(
    net: Network,
    system: str,
    systems: list[Arith],
    param_systems: list[Arith],
    loss_ar: Arith,
    data: Arith,
    store: Arith,
    params: dict[str, Any] | None,
    rows: np.ndarray | None,
    loss_scale: float,
) -> Trace:
    """The pass itself: layer i computes in ``systems[i]`` with its parameters, stored in
    ``store``, cast into ``param_systems[i]``; inputs and targets are stored in ``data``."""
    if rows is not None:
        net = net.with_data(net.x[rows], net.y[rows])
    stored = params if params is not None else {k: store.asarray(v) for k, v in net.params.items()}
    if not net.class_targets and data is not loss_ar:  # targets stored in data, cast for the loss
        net = net.with_data(net.x, data.to_float64(data.asarray(net.y)))
    h, prev = data.asarray(net.x), data
    trace = Trace(system=system, loss=None)
    inputs: list[Any] = []
    saved: list[dict[str, Any]] = []
    used: list[dict[str, Any]] = []
    for layer, ar, pa in zip(net.layers, systems, param_systems, strict=True):
        x = _cast(prev, ar, h)
        values = {
            f"{layer.name}.{p}": _cast(store, pa, stored[f"{layer.name}.{p}"]) for p in layer.params
        }
        for s, v in layer.stats.items():  # constants stored with the parameters
            values[f"{layer.name}.{s}"] = _cast(store, pa, store.asarray(v))
        h, keep = _forward(ar, layer, x, values)
        inputs.append(x)
        saved.append(keep)
        used.append(values)
        trace.forward[layer.name] = h
        prev = ar
    loss, grad = _loss(loss_ar, net, _cast(prev, loss_ar, h))
    if loss_scale != 1.0:
        grad = loss_ar.mul(grad, loss_ar.const(loss_scale))
    trace.loss = loss
    prev = loss_ar
    for index in range(len(net.layers) - 1, -1, -1):
        layer, ar = net.layers[index], systems[index]
        grad = _cast(prev, ar, grad)  # into the system of the layer's output
        trace.backward[layer.name] = grad
        grad, pgrads = _backward(
            ar, layer, inputs[index], saved[index], grad, used[index], need_input=index > 0
        )  # the data's own gradient (index 0) is never used: not computed
        if "bias" in pgrads and _exact(ar) and _feeds_batch_norm(net, index):
            # structural identity: batch norm subtracts the per-feature batch mean, so its
            # output does not depend on a per-feature bias added before it (dL/db == 0);
            # not for batch_norm_eval, which subtracts a constant running mean
            pgrads["bias"] = ar.mul(pgrads["bias"], ar.const(0.0))
        for pname, value in pgrads.items():
            trace.grads[f"{layer.name}.{pname}"] = _cast(ar, store, value)
        prev = ar
    # parameters in layer order, as Network.params lists them
    trace.grads = {name: trace.grads[name] for name in net.params}
    return trace


def _forward(ar: Arith, layer: Layer, x: Any, values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    kind = layer.kind
    if kind == "dense":
        w = values[f"{layer.name}.weight"]
        z = ar.matmul(x, w.T)  # z = x W^T (+ b)
        if "bias" in layer.params:
            z = ar.add(z, values[f"{layer.name}.bias"][None, :])
        return z, {"w": w}
    if kind == "relu":
        if not _exact(ar):  # torch: x < 0 ? +0 : x (NaN, -0 kept); backward: out <= 0 ? +0 : dy
            v = np.asarray(x, dtype=np.float64)
            return ar.where(v < 0, ar.asarray(np.zeros(v.shape)), x), {"mask": ~(v <= 0)}
        mask = ar.positive(x)  # relu'(0) = 0, as torch
        return ar.where(mask, x, ar.mul(x, ar.const(0.0))), {"mask": mask}
    if kind == "leaky_relu":
        mask = ar.positive(x)  # torch: x > 0 ? 1 : slope (slope at 0)
        slope = ar.const(layer.slope)
        return ar.where(mask, x, ar.mul(x, slope)), {"mask": mask, "slope": slope}
    if kind == "sigmoid":
        s = ar.sigmoid(x)
        return s, {"s": s}
    if kind == "tanh":
        t = ar.tanh(x)
        return t, {"t": t}
    if kind == "softmax":
        if _exact(ar):
            s, hot = _softmax_exact(ar, x)
            return s, {"s": s, "hot": hot}
        s = _softmax(ar, x)
        return s, {"s": s}
    if kind == "batch_norm":
        n = ar.const(float(x.shape[0]))
        mean = ar.div(ar.sum(x, axis=0, keepdims=True), n)
        xc = ar.sub(x, mean)
        var = ar.div(ar.sum(ar.mul(xc, xc), axis=0, keepdims=True), n)  # biased, as training BN
        inv = ar.div(ar.const(1.0), ar.sqrt(ar.add(var, ar.const(layer.eps))))
        xhat = ar.mul(xc, inv)
        gamma = values[f"{layer.name}.weight"][None, :]
        y = ar.add(ar.mul(xhat, gamma), values[f"{layer.name}.bias"][None, :])
        return y, {"xhat": xhat, "inv": inv, "gamma": gamma, "n": n}
    if kind == "batch_norm_eval":
        # y = (x - running_mean) * inv * w + b, inv = 1 / sqrt(running_var + eps): constants
        mean = values[f"{layer.name}.running_mean"][None, :]
        var = values[f"{layer.name}.running_var"][None, :]
        inv = ar.div(ar.const(1.0), ar.sqrt(ar.add(var, ar.const(layer.eps))))
        xhat = ar.mul(ar.sub(x, mean), inv)
        y, keep = xhat, {"xhat": xhat, "inv": inv}
        if "weight" in layer.params:
            keep["gamma"] = values[f"{layer.name}.weight"][None, :]
            y = ar.mul(y, keep["gamma"])
        if "bias" in layer.params:
            y = ar.add(y, values[f"{layer.name}.bias"][None, :])
        return y, keep
    raise AssertionError(f"unhandled layer kind {kind}")  # netfile validates kinds


def _backward(
    ar: Arith,
    layer: Layer,
    x: Any,
    keep: dict[str, Any],
    dy: Any,
    values: dict[str, Any],
    need_input: bool = True,
) -> tuple[Any, dict[str, Any]]:
    kind = layer.kind
    if kind == "dense":
        grads = {"weight": ar.matmul(dy.T, x)}  # dW = dz^T x
        if "bias" in layer.params:
            grads["bias"] = ar.sum(dy, axis=0)  # db = sum over the batch
        return (ar.matmul(dy, keep["w"]) if need_input else None), grads  # dx = dz W
    if kind == "relu":
        zero = ar.mul(dy, ar.const(0.0)) if _exact(ar) else ar.asarray(np.zeros(np.shape(dy)))
        return ar.where(keep["mask"], dy, zero), {}
    if kind == "leaky_relu":
        return ar.where(keep["mask"], dy, ar.mul(dy, keep["slope"])), {}
    if kind == "sigmoid":
        return ar.mul(dy, ar.sigmoid_deriv(x, keep["s"])), {}  # s (1 - s)
    if kind == "tanh":
        return ar.mul(dy, ar.tanh_deriv(x, keep["t"])), {}  # 1 - t^2
    if kind == "softmax":
        s = keep["s"]
        if "hot" in keep:
            return _softmax_backward_exact(ar, s, keep["hot"], dy), {}
        inner = ar.sum(ar.mul(dy, s), axis=1, keepdims=True)
        return ar.mul(s, ar.sub(dy, inner)), {}  # s * (dy - <dy, s>)
    if kind == "batch_norm":
        xhat, inv, gamma, n = keep["xhat"], keep["inv"], keep["gamma"], keep["n"]
        grads = {
            "weight": ar.sum(ar.mul(dy, xhat), axis=0),
            "bias": ar.sum(dy, axis=0),
        }
        dxhat = ar.mul(dy, gamma)
        s1 = ar.sum(dxhat, axis=0, keepdims=True)
        s2 = ar.sum(ar.mul(dxhat, xhat), axis=0, keepdims=True)
        # dx = inv/n * (n dxhat - sum(dxhat) - xhat sum(dxhat xhat))
        inner = ar.sub(ar.sub(ar.mul(dxhat, n), s1), ar.mul(xhat, s2))
        return ar.mul(inner, ar.div(inv, n)), grads
    if kind == "batch_norm_eval":
        # dx = dy * w * inv, dw = sum dy * xhat, db = sum dy (over the batch)
        grads = {}
        if "weight" in layer.params:
            grads["weight"] = ar.sum(ar.mul(dy, keep["xhat"]), axis=0)
        if "bias" in layer.params:
            grads["bias"] = ar.sum(dy, axis=0)
        dxhat = ar.mul(dy, keep["gamma"]) if "gamma" in keep else dy
        return ar.mul(dxhat, keep["inv"]), grads
    raise AssertionError(f"unhandled layer kind {kind}")


def _softmax(ar: Arith, z: Any) -> Any:
    e = ar.exp(ar.sub(z, ar.max(z, axis=1, keepdims=True)))
    return ar.div(e, ar.sum(e, axis=1, keepdims=True))


def _loss(ar: Arith, net: Network, out: Any) -> tuple[Any, Any]:
    """Loss (mean reduction) and dL/d(out)."""
    kind = net.loss.kind
    if kind == "mse":
        t = ar.asarray(net.y)
        r = ar.sub(out, t)
        loss = ar.div(_total(ar, ar.mul(r, r)), ar.const(float(r.size)))
        if _exact(ar):
            return loss, ar.mul(r, ar.div(ar.const(2.0), ar.const(float(r.size))))  # 2 r / N
        return loss, ar.mul(ar.const(2.0 / r.size), r)  # torch: round(2. / N) * r (* 1)
    if kind == "cross_entropy" and _exact(ar):
        t_values = np.eye(out.shape[1])[net.y.astype(int)] if net.class_targets else net.y
        return _cross_entropy_exact(ar, out, t_values)
    if kind == "bce" and _exact(ar):
        return _bce_exact(ar, out, np.asarray(net.y, dtype=np.float64))
    if kind == "cross_entropy":
        return _cross_entropy_torch(ar, net, out)
    if kind == "bce":
        terms = bce_terms_torch(ar, out, ar.asarray(net.y))  # (1 - t) z - log_sigmoid(z)
        count = ar.const(float(out.size))
        loss = ar.div(_total(ar, terms), count)
        return loss, ar.div(ar.bce_grad(out, net.y), count)  # (sigmoid(z) - t) / N
    raise AssertionError(f"unhandled loss {kind}")


def bce_terms_torch(ar: Any, x: Any, t: Any, weight: Any = None, pos_weight: Any = None) -> Any:
    """torch's CPU sequence for BCE with logits, each operation rounded: ``(1 - t) * x -
    l * log_sigmoid(x)``, log_sigmoid(x) = ``min(x, 0) - log1p(exp(-|x|))``, l = ``(pos_weight
    - 1) * t + 1``, then ``* weight``."""
    v = np.asarray(x, dtype=np.float64)
    low = ar.where(v > 0, ar.asarray(np.zeros(v.shape)), x)  # std::min(x, 0): -0, NaN kept
    logsig = ar.sub(low, ar.log1p(ar.exp(ar.mul(ar.abs(x), ar.const(-1.0)))))
    if pos_weight is not None:
        logsig = ar.mul(ar.add(ar.mul(ar.sub(pos_weight, ar.const(1.0)), t), ar.const(1.0)), logsig)
    terms = ar.sub(ar.mul(ar.sub(ar.const(1.0), t), x), logsig)
    return terms if weight is None else ar.mul(terms, weight)


def _cross_entropy_torch(ar: Arith, net: Network, out: Any) -> tuple[Any, Any]:
    """Cross-entropy (mean) and its gradient as torch computes them, each operation rounded:
    log_softmax, then class targets: nll_loss (``0 - logp[i, y_i] - ...``, over B) and its
    backward ``-(1 / B)`` at the target; probability targets: ``-sum(logp * t) / B`` and its
    backward ``-(1 / B) * t``; then log_softmax's backward ``g - exp(logp) * sum(g)``."""
    batch, classes = out.shape
    m = ar.max(out, axis=1, keepdims=True)
    shifted = ar.sub(out, m)
    logp = ar.sub(shifted, ar.log(ar.sum(ar.exp(shifted), axis=1, keepdims=True)))
    n = ar.const(float(batch))
    g = ar.mul(ar.div(ar.const(1.0), n), ar.const(-1.0))  # -(1 / B): exact negation
    if net.class_targets:
        hot = np.zeros((batch, classes), dtype=bool)
        hot[np.arange(batch), net.y.astype(int)] = True
        picked = np.asarray(logp)[np.arange(batch), net.y.astype(int)]  # a strict machine's
        loss = ar.add(ar.const(0.0), ar.sum(ar.mul(picked, ar.const(-1.0)), axis=0))
        loss = ar.div(loss, n)
        grad = ar.where(hot, np.broadcast_to(g, hot.shape), ar.asarray(np.zeros(hot.shape)))
    else:
        t = ar.asarray(net.y)
        loss = ar.div(ar.mul(_total(ar, ar.mul(logp, t)), ar.const(-1.0)), n)
        grad = ar.mul(np.broadcast_to(g, t.shape), t)
    dot = ar.sum(grad, axis=1, keepdims=True)
    return loss, ar.sub(grad, ar.mul(ar.exp(logp), dot))


def _exact(ar: Arith) -> bool:
    """Is ``ar`` an exact reference (balls), which takes the cancellation-free forms below?"""
    return bool(getattr(ar, "exact", False))


def _feeds_batch_norm(net: Network, index: int) -> bool:
    return index + 1 < len(net.layers) and net.layers[index + 1].kind == "batch_norm"


def log1p_of(ar: Arith, x: Any) -> Any:
    fn = getattr(ar, "log1p", None)
    return fn(x) if fn is not None else ar.log(ar.add(ar.const(1.0), x))


def _neg(ar: Arith, x: Any) -> Any:
    return ar.sub(ar.const(0.0), x)


def _row_max_mask(ar: Arith, z: Any) -> np.ndarray:
    """One-hot mask of a largest element per row (by midpoint; the first of ties)."""
    mid = ar.to_float64(z)
    hot = np.zeros(mid.shape, dtype=bool)
    hot[np.arange(mid.shape[0]), np.argmax(mid, axis=1)] = True
    return hot


def _pick(ar: Arith, x: Any, hot: np.ndarray) -> Any:
    """The element of each row that ``hot`` marks, as a column (an exact gather)."""
    return ar.sum(ar.mul(x, ar.asarray(hot.astype(np.float64))), axis=1, keepdims=True)


def shifted_exp_rows(ar: Arith, z: Any) -> tuple[Any, Any, Any, np.ndarray]:
    """(z - z_k, exp of it, sum over j != k of exp, hot) with z_k a row maximum and the
    k-th shifted value the exact 0, so that the sum of the others carries 1 - p_k."""
    hot = _row_max_mask(ar, z)
    shifted = ar.sub(z, _pick(ar, z, hot))
    shifted = ar.where(hot, ar.mul(shifted, ar.const(0.0)), shifted)
    e = ar.exp(shifted)
    others = ar.sum(ar.mul(e, ar.asarray((~hot).astype(np.float64))), axis=1, keepdims=True)
    return shifted, e, others, hot


def _softmax_exact(ar: Arith, z: Any) -> tuple[Any, np.ndarray]:
    _, e, others, hot = shifted_exp_rows(ar, z)
    return ar.div(e, ar.add(ar.const(1.0), others)), hot


def _softmax_backward_exact(ar: Arith, s: Any, hot: np.ndarray, dy: Any) -> Any:
    """s_i (dy_i - <dy, s>) without cancellation near a one-hot s: with k the row's largest
    probability, dy_i - <dy, s> = (dy_i - dy_k) + sum_{j != k} s_j (dy_k - dy_j)."""
    notk = ar.asarray((~hot).astype(np.float64))
    diff = ar.sub(_pick(ar, dy, hot), dy)  # dy_k - dy_j
    comp = ar.sum(ar.mul(ar.mul(s, diff), notk), axis=1, keepdims=True)
    return ar.mul(s, ar.add(ar.mul(_neg(ar, diff), notk), comp))


def _cross_entropy_exact(ar: Arith, out: Any, t_values: np.ndarray) -> tuple[Any, Any]:
    """Cross-entropy (mean over rows) and its gradient without cancellation.

    With z_k a row maximum, log sum_j e^(z_j - z_k) = log1p(sum_{j != k} e^(z_j - z_k)) and
    -sum_j t_j log p_j = S log1p(...) + sum_j t_j (z_k - z_j): a sum of non-negative terms.
    S = sum_j t_j is summed in the system (exactly enclosed), never in float64. The gradient is
    (p_j S - t_j) / B, the system's ``xent_grad`` (one-hot rows without cancellation).
    """
    shifted, e, others, _ = shifted_exp_rows(ar, out)
    t = ar.asarray(t_values)
    tsum = ar.sum(t, axis=1, keepdims=True)
    lse = log1p_of(ar, others)
    rows = ar.add(ar.mul(tsum, lse), ar.sum(ar.mul(t, _neg(ar, shifted)), axis=1, keepdims=True))
    n = ar.const(float(out.shape[0]))
    loss = ar.div(ar.sum(ar.sum(rows, axis=1), axis=0), n)
    grad = ar.xent_grad(e, ar.add(ar.const(1.0), others), t_values)
    return loss, ar.div(grad, n)


def _bce_exact(ar: Arith, z: Any, t_values: np.ndarray) -> tuple[Any, Any]:
    """BCE with logits (mean) and its gradient without cancellation: per element
    max(z, 0) - z t = z (1 - t) for z > 0 and -z t otherwise, plus log1p(e^-|z|);
    the gradient is the system's ``bce_grad`` (-sigmoid(-z) where t = 1)."""
    t = ar.asarray(t_values)
    pos = ar.positive(z)
    lin = ar.where(pos, ar.mul(z, ar.sub(ar.const(1.0), t)), ar.mul(_neg(ar, z), t))
    terms = ar.add(lin, log1p_of(ar, ar.exp(_neg(ar, ar.abs(z)))))
    count = ar.const(float(z.size))
    loss = ar.div(_total(ar, terms), count)
    grad = ar.bce_grad(z, t_values)
    return loss, ar.div(grad, count)


def _total(ar: Arith, a: Any) -> Any:
    """Sum of all elements of a 2-D array (rows first, then the row sums)."""
    return ar.sum(ar.sum(a, axis=1), axis=0)
