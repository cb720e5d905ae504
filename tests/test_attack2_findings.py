"""Adversarial review (attack2): eval-mode batch norm, long exact training, structural zeros on
captured graphs. Each test is an attack that found no false certificate; it stays here so a
regression would show. Independent oracles: mpmath formulas written here (batch norm eval:
tests/test_eval_batchnorm.py's ``_mp_reference`` at 400 digits; training: the layer formulas
of tests/oracle/reference.py at 3000 bits with the optimizer written by hand) and torch
float64 for the captured graphs.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gmpy2 import mpq
from torch import nn

import fpgrad
import tests.oracle.reference as ref
from fpgrad.arith import arb as arbmod
from fpgrad.arith.ball import Ball
from fpgrad.cli import main
from fpgrad.errors import InputError
from fpgrad.graph.layers import exact_trace
from fpgrad.model.from_torch import import_module
from fpgrad.model.netfile import parse_network
from fpgrad.model.policy import parse_policy
from fpgrad.run.optim import OptimConfig
from fpgrad.run.torch_native import one_torch_thread, to_float64, torch_trace
from fpgrad.training import batch_schedule, exact_trajectory, train
from tests.test_eval_batchnorm import _mp_reference

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched")


# ---- eval-mode batch norm ---------------------------------------------------------------------
def _bn_net(eps: float, mean: list[float], var: list[float]) -> Any:
    return parse_network(
        {
            "layer": [
                {
                    "type": "dense",
                    "name": "fc",
                    "weight": [[0.5, -1.25, 2.0], [1.5, 0.75, -0.5], [-2.0, 0.25, 1.0]],
                    "bias": [0.125, -0.375, 0.0625],
                },
                {
                    "type": "batch_norm_eval",
                    "name": "bn",
                    "eps": eps,
                    "running_mean": mean,
                    "running_var": var,
                    "weight": [1.5, -0.75, 0.9],
                    "bias": [0.1, 0.0, -0.3],
                },
                {"type": "dense", "name": "out", "weight": [[1.0, 0.5, -0.25], [0.3, -1.0, 2.0]]},
            ],
            "loss": {"type": "mse"},
            "data": {
                "x": [[1.0, -0.5, 0.25], [0.75, 2.0, -1.5], [-0.3, 0.1, 0.9], [2.2, -1.0, 0.0]],
                "y": [[0.5, -1.0], [1.0, 0.0], [-0.25, 0.75], [0.0, 1.5]],
            },
        }
    )


# x @ fc.weight.T + fc.bias, first row, first unit: 0.5 + 0.625 + 0.5 + 0.125 = 1.75
BN_CASES = {
    "running_var 0": (1e-5, [0.3, -0.2, 1.1], [0.0, 0.0, 0.0]),
    "mean far from x (cancellation)": (1e-5, [1e16, -1e17, 3e20], [0.7, 2.5, 0.01]),
    "x - mean exactly 0 with var 0": (1e-5, [1.75, -0.2, 1.1], [0.0, 2.5, 0.01]),
    "eps huge": (1e30, [0.3, -0.2, 1.1], [0.7, 2.5, 0.01]),
    "eps subnormal, var 0 (1 / sqrt(5e-324))": (5e-324, [0.3, -0.2, 1.1], [0.0, 0.0, 0.0]),
    "subnormal var": (1e-300, [0.3, -0.2, 1.1], [5e-324, 1e-310, 0.0]),
    "var near float64 max": (1e-5, [0.3, -0.2, 1.1], [1e300, 1.7e308, 1e200]),
    "mean 1e300, var 1e-300": (1e-5, [1e300, -1e300, 1e-300], [1e300, 1e-300, 1.0]),
}


@pytest.mark.parametrize("case", list(BN_CASES))
def test_eval_batch_norm_extreme_statistics_are_enclosed(case: str) -> None:
    """The fast balls certify or refuse (range, NaN radius); Arb always certifies; every
    enclosure holds the 400-digit mpmath value."""
    net = _bn_net(*BN_CASES[case])
    try:
        r = exact_trace(net, method="fast")
    except InputError as e:
        assert "use method='arb'" in str(e)
        r = exact_trace(net, method="arb")
    assert r.certified_digits >= 17
    mpmath.mp.dps = 400
    for key, want in _mp_reference(net).items():
        mid, rad = r.enclosure(key)
        assert not r.undetermined(key).any()
        for m, rr, w in zip(
            np.ravel(mid), np.ravel(rad), np.ravel(np.asarray(want, dtype=object)), strict=True
        ):
            assert abs(mpmath.mpf(m) - w) <= mpmath.mpf(float(rr)) + abs(w) * mpmath.mpf(10) ** -300


def test_eval_batch_norm_eps_zero_is_a_one_line_refusal(tmp_path: Any, capsys: Any) -> None:
    """eps = 0 with running_var = 0 would divide by 0: refused, in a network file and import."""
    path = tmp_path / "net.toml"
    path.write_text(
        '[[layer]]\ntype = "dense"\nweight = [[1.0]]\n'
        '[[layer]]\ntype = "batch_norm_eval"\neps = 0.0\nrunning_mean = [0.0]\nrunning_var = [0.0]\n'
        '[loss]\ntype = "mse"\n[data]\nx = [[1.0]]\ny = [[0.0]]\n'
    )
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eps must be positive" in err, err
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, eps=0.0)).eval()
    with torch.no_grad():
        model[1].running_var.zero_()
    with pytest.raises(InputError, match="eps must be a finite number in"):
        import_module(model, torch.ones(4, 2), torch.zeros(4, 3))


@pytest.mark.parametrize("low", ["float16", "bfloat16"])
def test_eval_batch_norm_statistics_overflowing_the_compute_dtype(low: str) -> None:
    """A policy computing batch norm in float16 casts running_var 1e6 to inf (invstd 0) and
    running_mean 7e4 to inf: the native column is torch's, bit for bit, infinities included."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5)
    model = nn.Sequential(nn.Linear(4, 5), bn, nn.Tanh(), nn.Linear(5, 3)).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.0, -7e4, 0.0, 65520.0, 1e-8]))
        bn.running_var.copy_(torch.tensor([1e6, 1.0, 0.0, 65504.0, 1e-45]))
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0, 1e-3]))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(7))
    net = import_module(model, x, torch.arange(6) % 3).network
    trace = torch_trace(net, parse_policy("p", {"batch_norm": low}).resolve(net))
    d = getattr(torch, low)
    with one_torch_thread():
        h = model[0](x)
        want = F.batch_norm(
            h.to(d), *(t.to(d) for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)),
            False, 0.0, bn.eps,
        )  # fmt: skip
    assert np.array_equal(trace.forward["1"], to_float64(want), equal_nan=True)
    if low == "float16":
        assert np.isinf(trace.forward["1"][:, 1]).all()  # the mean overflowed: -inf outputs


# ---- long exact training against an independent trajectory ----------------------------------
PREC = 3000


def _oracle_trajectory(net: Any, cfg: OptimConfig, steps: int) -> list[dict[str, np.ndarray]]:
    """Full-batch training in mpmath at PREC bits: tests/oracle/reference.py's forward and
    backward, the optimizer's formulas written out here (torch.optim's, as documented)."""
    ctx = mpmath.MPContext()
    ctx.prec = PREC
    mpf = np.frompyfunc(
        lambda v: (
            ctx.mpf(int(v.numerator)) / int(v.denominator)
            if isinstance(v, type(mpq(0)))
            else ctx.mpf(v)
        ),
        1,
        1,
    )
    params = {k: mpf(ref._q(v)).astype(object) for k, v in net.params.items()}
    lr, wd, mom = ctx.mpf(cfg.lr), ctx.mpf(cfg.weight_decay), ctx.mpf(cfg.momentum)
    b1, b2, eps = ctx.mpf(cfg.beta1), ctx.mpf(cfg.beta2), ctx.mpf(cfg.eps)
    buf: dict[str, Any] = {}
    m = {k: p * 0 for k, p in params.items()}
    v = {k: p * 0 for k, p in params.items()}
    sqrt = np.frompyfunc(ctx.sqrt, 1, 1)
    out_traj = [dict(params)]
    keep_q = ref._q
    ref._q = lambda a: a if isinstance(a, np.ndarray) and a.dtype == object else keep_q(a)
    try:
        for t in range(1, steps + 1):
            layers = tuple(
                dataclasses.replace(ly, params={p: params[f"{ly.name}.{p}"] for p in ly.params})
                for ly in net.layers
            )
            values, _ = ref.evaluate(dataclasses.replace(net, layers=layers), PREC)
            new = {}
            for k, w in params.items():
                g = mpf(values[f"grads/{k}"]).astype(object)
                if cfg.decoupled and cfg.weight_decay:
                    w = w * (1 - lr * wd)
                elif cfg.weight_decay:
                    g = g + wd * w
                if cfg.name == "sgd":
                    if cfg.momentum:
                        buf[k] = g if k not in buf else buf[k] * mom + g
                        g = buf[k]
                    new[k] = w - lr * g
                else:
                    m[k] = m[k] * b1 + g * (1 - b1)
                    v[k] = v[k] * b2 + g * g * (1 - b2)
                    denom = sqrt(v[k]) / ctx.sqrt(1 - b2**t) + eps
                    new[k] = w - lr / (1 - b1**t) * (m[k] / denom)
            params = new
            out_traj.append(dict(params))
    finally:
        ref._q = keep_q
    return out_traj


def _mid_rad(value: Any) -> tuple[list[Any], list[Any]]:
    """Exact midpoints and radii of balls (multi-word or Arb) as mpmath numbers."""
    if isinstance(value, Ball):
        words = [np.ravel(w) for w in value.mid]
        mids = [sum(mpmath.mpf(float(w)) for w in ws) for ws in zip(*words, strict=True)]
        return mids, [mpmath.mpf(float(r)) for r in np.ravel(value.rad)]
    arr = np.asarray(value, dtype=object)
    rads = []
    for b in arr.ravel():
        r = b.rad()
        rads.append(
            mpmath.mpf(0) if r == 0 else mpmath.mpf(tuple(int(i) for i in r.mid().man_exp()))
        )
    return list(arbmod.to_mpf(arr, 4 * PREC).ravel()), rads


def _assert_encloses(net: Any, cfg: OptimConfig, steps: int) -> float:
    sched = batch_schedule(net.x.shape[0], steps, None, 0)
    run, digits, _ = exact_trajectory(net, cfg, sched, 128)
    mpmath.mp.prec = 4 * PREC
    slack = mpmath.mpf(2) ** (-PREC + 40)  # the oracle's own rounding
    for t, (ours, theirs) in enumerate(zip(run.exact_params, _oracle_trajectory(net, cfg, steps),
                                            strict=True)):  # fmt: skip
        for k, want in theirs.items():
            mids, rads = _mid_rad(ours[k])
            for mi, ra, w in zip(mids, rads, np.ravel(want), strict=True):
                assert abs(mi - w) <= ra + abs(w) * slack, (t, k, mi, w, ra)
                if digits >= 17 and w != 0:  # the claim, element by element
                    assert abs(mi - w) <= abs(w) * mpmath.mpf(10) ** (-digits + 1), (t, k)
    return digits


def _net(layers: list[dict[str, Any]], loss: str, x: Any, y: Any) -> Any:
    return parse_network({"layer": layers, "loss": {"type": loss}, "data": {"x": x, "y": y}})


# unit 0's pre-activation is exactly 0 at step 0 (relu'(0) = 0); weight decay scales w and b by
# the same factor, so it stays exactly 0: the balls cannot decide the branch (they fall back)
KINK = _net(
    [
        {"type": "dense", "name": "a", "weight": [[0.5], [1.0]], "bias": [-0.5, 0.25]},
        {"type": "relu"},
        {"type": "dense", "name": "o", "weight": [[1.0, -0.75]], "bias": [0.0]},
    ],
    "mse",
    [[1.0], [1.0]],
    [[0.3], [0.1]],
)
TRAIN_CASES = {
    "relu input exactly 0, weight decay": (KINK, OptimConfig(lr=0.1, weight_decay=0.01)),
    "relu input exactly 0, momentum": (KINK, OptimConfig(lr=0.1, momentum=0.9)),
    "dead unit, adamw (v = 0: eps alone)": (
        KINK,
        OptimConfig(name="adam", lr=0.01, weight_decay=0.1, decoupled=True),
    ),
    "tiny gradients against adam's eps": (
        _net(
            [{"type": "dense", "name": "a", "weight": [[0.5, -1.0]], "bias": [0.25]}],
            "mse",
            [[1.0, 2.0], [0.5, 0.5]],
            [[-1.25 + 1e-12], [1e-13]],
        ),
        OptimConfig(name="adam", lr=0.01),
    ),
    "gradient exactly 0 at the optimum, adam with weight decay": (
        _net(
            [{"type": "dense", "name": "a", "weight": [[0.5, -1.0]], "bias": [0.25]}],
            "mse",
            [[1.0, 2.0], [0.5, 0.5]],
            [[-1.25], [0.0]],
        ),
        OptimConfig(name="adam", lr=0.01, weight_decay=0.01),
    ),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_exact_trajectory_encloses_an_independent_trajectory(case: str) -> None:
    net, cfg = TRAIN_CASES[case]
    assert _assert_encloses(net, cfg, 8) >= 17


def test_a_parameter_zero_by_cancellation_is_never_certified() -> None:
    """Soft targets at the optimum, inputs +1 and -1: the weight's gradient is exactly 0 by
    cancellation (both rows have the same logits) and stays so; no ball proves it, so the run
    claims 0 digits (undetermined) rather than a certified zero, and still encloses."""
    p = [0.25, 0.25, 0.5]
    net = _net(
        [
            {
                "type": "dense",
                "name": "a",
                "weight": [[0.0]] * 3,
                "bias": [float(np.log(v)) for v in p],
            }
        ],
        "cross_entropy",
        [[1.0], [-1.0]],
        [p, p],
    )
    run, digits, _ = exact_trajectory(
        net, OptimConfig(name="adam", lr=0.01), batch_schedule(2, 3, None, 0), 128, max_bits=512
    )
    assert digits == 0.0
    w = np.asarray(run.exact_params[-1]["a.weight"], dtype=object).ravel()
    assert not arbmod.exact_zero(w).any() and arbmod.contains_zero(w).all()


def test_few_digits_note_names_the_unsigned_parameter_and_the_option_that_helps() -> None:
    """Finding (wrong message): the note said "raise --exact-bits" although the Arb run had
    stopped at its cap (--exact-bits cannot pass --exact-max-bits), and did not say which
    parameter held a ball containing 0 (here a.weight, exactly 0 by cancellation)."""
    p = [0.25, 0.25, 0.5]
    net = _net(
        [
            {
                "type": "dense",
                "name": "a",
                "weight": [[0.0]] * 3,
                "bias": [float(np.log(v)) for v in p],
            }
        ],
        "cross_entropy",
        [[1.0], [-1.0]],
        [p, p],
    )
    r = train(net, 3, OptimConfig(name="adam", lr=0.01), runs="float64", exact_max_bits=512)
    note = r.notes[-1]
    assert "certifies only 0.0 digits" in note and "balls containing 0 in a.weight" in note
    assert "raise --exact-max-bits (the Arb run stopped at its cap, 512 bits)" in note
    assert "a.bias" not in note


# ---- structural zeros on captured graphs -----------------------------------------------------
CE = nn.CrossEntropyLoss()


class _BNTwo(nn.Module):
    """A bias feeding training batch norm and, directly, another branch: not zero."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Linear(4, 3), nn.BatchNorm1d(3)
        self.h, self.h2 = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.a(x)
        return self.h(torch.tanh(self.bn(z))) + self.h2(torch.tanh(z))


class _Tied(nn.Module):
    """One Linear used before batch norm and again at the output: its bias is not zero."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Linear(3, 3), nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(torch.tanh(self.bn(self.a(x))))


class _LN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.ln, self.h = nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(torch.tanh(self.ln(self.a(x))))


class _BNNoStats(nn.Module):
    """BatchNorm1d(track_running_stats=False) in eval mode still uses the batch statistics:
    the bias before it is exactly 0."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3, track_running_stats=False)
        self.h = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(torch.tanh(self.bn(self.a(x))))


def _eval_bn() -> nn.Module:
    m = _BNNoStats()
    m.bn = nn.BatchNorm1d(3)
    with torch.no_grad():
        m.bn.running_mean.copy_(torch.tensor([0.3, -1.0, 0.5]))
        m.bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
    return m.eval()


_PER_KEY = torch.linspace(0.5, 2, 6)[None, None, :, None]
_SOME_KEYS = torch.tensor([1.0, 0, 1, 0, 0, 1])[None, None, :, None]


class _Attn(nn.Module):
    """SDPA over q/k/v Linears; ``per_key``: keys scaled per key (k.bias not zero);
    ``some_keys``: a second bias added to three keys only (not zero; k.bias still zero)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(4, 4) for _ in range(4))
        self.kind = kind
        if kind == "some_keys":
            self.kb = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x)[:, None], self.k(x)[:, None], self.v(x)[:, None]
        k = k * _PER_KEY if self.kind == "per_key" else k + _SOME_KEYS * self.kb
        return self.o(F.scaled_dot_product_attention(q, k, v)[:, 0]).flatten(0, 1)


class _Mix(nn.Module):
    """Linear(4, 6) viewed as (N, 3 channels, 2) before BatchNorm1d(3): a bias element per
    (channel, position), the norm per channel: the bias gradient is not zero."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.h = nn.Linear(4, 6), nn.BatchNorm1d(3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(torch.tanh(self.bn(self.a(x).view(-1, 3, 2))).flatten(1))


GRAPH_CASES = {
    "key bias with a per-key scale (SDPA)": (lambda: _Attn("per_key"), set()),
    "a bias added to some keys only (SDPA)": (lambda: _Attn("some_keys"), {"k.bias"}),
    "bias per (channel, position) before BatchNorm1d per channel": (_Mix, set()),
    "bias feeds batch norm and another branch": (_BNTwo, set()),
    "weight-tied linear before batch norm and at the output": (_Tied, set()),
    "bias before LayerNorm": (_LN, set()),
    "bias before eval batch norm (running statistics)": (_eval_bn, set()),
    "bias before BatchNorm1d(track_running_stats=False), eval": (
        lambda: _BNNoStats().eval(),
        {"a.bias"},
    ),
}


@pytest.mark.parametrize("case", list(GRAPH_CASES))
def test_structural_zeros_on_near_misses(case: str) -> None:
    from fpgrad.graph.exact import exact_graph

    make, zero_params = GRAPH_CASES[case]
    torch.manual_seed(0)
    model = make()
    x = torch.randn(5, 3 if "tied" in case else 4)
    y = torch.tensor([0, 1, 2, 0, 1])
    if "SDPA" in case:
        x, y = torch.randn(2, 6, 4), torch.arange(12) % 4
    ex = exact_graph(fpgrad.from_module(model, (x,), y, CE).graph)
    m64 = copy.deepcopy(model).double()
    named = list(m64.named_parameters())
    grads = torch.autograd.grad(CE(m64(x.double()), y), [p for _, p in named])
    for (name, _), g in zip(named, grads, strict=True):
        t = g.numpy()
        zero = ex.result.zero(f"grads/{name}")
        assert not ex.result.undetermined(f"grads/{name}").any(), name
        if name in zero_params:
            assert zero.all() and np.abs(t).max() < 1e-15, name
        else:
            assert not zero.any(), name
            assert np.allclose(ex.float64(f"grads/{name}"), t, rtol=1e-9, atol=0), name
