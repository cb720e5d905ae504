"""attack20: recurrent layers, resampling and pooling geometry, convolution edge cases, margin
losses at their kinks, exact training trajectories and the train CLI, against independent
oracles (mpmath, fractions)."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from fpgrad import cli
from fpgrad.errors import InputError
from fpgrad.graph.exact import exact_graph
from fpgrad.run.optim import OptimConfig


def _contains(ex, key: str, truth: list) -> None:  # noqa: ANN001
    mid, rad = ex.enclosure(key)
    for m, r, t in zip(mid.reshape(-1), np.asarray(rad).reshape(-1), truth, strict=True):
        assert abs(mpmath.mpf(m) - t) <= mpmath.mpf(float(r)) * (1 + 1e-12) + 1e-300, (
            key, m, r, t)  # fmt: skip


# ---- training: the optimizer's settings ------------------------------------------------------


def test_adam_with_momentum_is_refused(tmp_path, capsys) -> None:  # noqa: ANN001
    """Was: ``fpgrad train ... --optimizer adam --momentum 0.9`` exited 0 with the header
    'adam lr=0.01 momentum=0.9' while every run (torch's and the exact one) ignored the
    momentum: torch.optim.Adam has none (its first moment decays by beta1)."""
    with pytest.raises(InputError, match="torch.optim.Adam has none"):
        OptimConfig(name="adam", momentum=0.9)
    script = tmp_path / "tiny.py"
    script.write_text(
        "import torch\nfrom torch import nn\n\n\ndef build():\n    torch.manual_seed(0)\n"
        "    m = nn.Linear(3, 2)\n"
        "    return m, torch.randn(4, 3), torch.randn(4, 2), nn.MSELoss()\n"
    )
    argv = ["train", f"{script}:build", "--steps", "1", "--optimizer", "adam",
            "--momentum", "0.9", "--precisions", "float32"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "momentum" in capsys.readouterr().err
    # --decoupled without --weight-decay was silently a no-op
    argv = ["train", f"{script}:build", "--steps", "1", "--optimizer", "adam", "--decoupled",
            "--precisions", "float32"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--decoupled" in err and err.count("\n") == 1


# ---- attacks that held: kinks of the margin losses and of ReLU after exact cancellation ------


class _Pair(nn.Module):
    def __init__(self, a: list, b: list, margin: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))
        self.margin = margin

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.margin_ranking_loss(self.a, self.b, y, margin=self.margin)


@pytest.mark.parametrize(
    ("a", "b", "margin", "y", "loss", "ga"),
    [
        # real and float64 both land on the kink: clamp_min passes the gradient (x >= 0)
        (0.1, 0.2, 0.1, -1.0, mpmath.mpf(0), 1),
        # real -2**-53 (no gradient) where float64 rounds a - b to 1 and sees the kink
        (1 + 2.0**-52, 2.0**-53, 1.0, 1.0, mpmath.mpf(0), 0),
        # real +2**-53 (active) where float64 sees 0
        (1 + 2.0**-52, 2.0**-53, -1.0, -1.0, mpmath.mpf(2) ** -53, 1),
    ],
)
def test_margin_ranking_follows_the_real_kink(a, b, margin, y, loss, ga) -> None:  # noqa: ANN001
    """max(0, -y (a - b) + margin): the exact reference decides the kink on the real
    argument (torch's clamp_min passes the gradient at equality)."""
    m = _Pair([a], [b], margin)
    net = fpgrad.from_module(m, torch.tensor([y], dtype=torch.float64), torch.zeros(()),
                             lambda o, t: o)  # fmt: skip
    ex = exact_graph(net.graph).result
    _contains(ex, "loss", [loss])
    _contains(ex, "grads/a", [mpmath.mpf(-y * ga)])
    _contains(ex, "grads/b", [mpmath.mpf(y * ga)])
    assert ex.undetermined_count == 0


class _Logits(nn.Module):
    def __init__(self, v: list) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(v, dtype=torch.float64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.x + z


@pytest.mark.parametrize("p", [1, 2])
def test_multi_margin_term_float64_drops(p: int) -> None:
    """z = (1 - x_t) + x_d with x_t = -2**-60, x_d = -1: float64 rounds 1 + 2**-60 to 1 and
    z to 0 (no term); the real z = 2**-60 > 0 is a term, and its gradient is certified."""
    m = _Logits([[-(2.0**-60), -1.0, 0.5, -3.0]])
    net = fpgrad.from_module(m, torch.zeros(1, 4, dtype=torch.float64), torch.tensor([0]),
                             nn.MultiMarginLoss(p=p))  # fmt: skip
    ex = exact_graph(net.graph).result
    mpmath.mp.prec = 300
    x = [mpmath.mpf(v) for v in (-(2.0**-60), -1.0, 0.5, -3.0)]
    z = [1 - x[0] + v for v in x[1:]]
    act = [v if v > 0 else 0 for v in z]
    _contains(ex, "loss", [sum(v**p for v in act) / 4])
    g = [(1 if p == 1 else 2 * v) / mpmath.mpf(4) if v > 0 else 0 for v in z]
    _contains(ex, "grads/x", [-sum(g), *g])
    assert ex.undetermined_count == 0


class _ConvRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(1, 1, 4, bias=False).double()
        with torch.no_grad():
            self.c.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.c(x))


def test_conv_cancelling_to_exact_zero_before_relu() -> None:
    """A window 1 + 2**-60 - 1 - 2**-60: exactly 0, proven, so relu's gradient there is 0
    (threshold_backward: out > 0); the next window is 2 (active)."""
    x = torch.tensor([1.0, 2.0**-60, -1.0, -(2.0**-60), 3.0], dtype=torch.float64).reshape(1, 1, 5)
    net = fpgrad.from_module(_ConvRelu(), x, torch.zeros(1, 1, 2, dtype=torch.float64),
                             nn.MSELoss())  # fmt: skip
    ex = exact_graph(net.graph).result
    xs = [mpmath.mpf(v) for v in x.reshape(-1).tolist()]
    _contains(ex, "loss", [mpmath.mpf(2)])
    _contains(ex, "grads/c.weight", [2 * v for v in xs[1:]])
    assert ex.undetermined_count == 0 and ex.certified_digits >= 17


def _relu_rnn(h0: float) -> tuple[nn.Module, tuple, torch.Tensor]:
    m = nn.RNN(1, 1, nonlinearity="relu").double()
    with torch.no_grad():
        for p, v in zip(m.parameters(), (1.0, 1.0, 1.0, -1.0), strict=True):
            p.fill_(v)

    class S(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            return self.m(x, h)[0]

    x = torch.tensor([2.0**-60, 0.5], dtype=torch.float64).reshape(2, 1, 1)
    return S(), (x, torch.tensor([[[h0]]], dtype=torch.float64)), x


@pytest.mark.parametrize("h0", [-(2.0**-60), 0.0])
def test_relu_rnn_preactivation_at_the_kink(h0: float) -> None:
    """Step 1's pre-activation 2**-60 + 1 + h0 - 1: exactly 0 with h0 = -2**-60 (relu' = 0),
    2**-60 > 0 with h0 = 0 where float64 gets 0; against the recurrence in mpmath."""
    model, inputs, _ = _relu_rnn(h0)
    y = torch.tensor([0.3, 0.2], dtype=torch.float64).reshape(2, 1, 1)
    net = fpgrad.from_module(model, inputs, y, nn.MSELoss())
    ex = exact_graph(net.graph).result
    mpmath.mp.prec = 300
    xs, ys, hs, pre = [mpmath.mpf(2) ** -60, mpmath.mpf(0.5)], [mpmath.mpf(0.3), mpmath.mpf(0.2)], \
        [mpmath.mpf(h0)], []  # fmt: skip
    for v in xs:
        pre.append(v + 1 + hs[-1] - 1)
        hs.append(max(pre[-1], 0))
    gih = ghh = gb = gh = mpmath.mpf(0)
    for t in (1, 0):
        gh += hs[t + 1] - ys[t]
        gp = gh if pre[t] > 0 else 0
        gih, ghh, gb, gh = gih + gp * xs[t], ghh + gp * hs[t], gb + gp, gp
    _contains(ex, "loss", [sum((hs[t + 1] - ys[t]) ** 2 for t in (0, 1)) / 2])
    _contains(ex, "grads/m.weight_ih_l0", [gih])
    _contains(ex, "grads/m.weight_hh_l0", [ghh])
    _contains(ex, "grads/m.bias_ih_l0", [gb])
    assert ex.undetermined_count == 0


# ---- attacks that held: the exact training trajectory against torch.optim's formulas ---------


def _ball_mids(v) -> tuple[list, np.ndarray]:  # noqa: ANN001
    from fpgrad.arith.ball import Ball

    if isinstance(v, Ball):
        words = np.asarray(v.mid).reshape(np.asarray(v.mid).shape[0], -1)
        return [sum(mpmath.mpf(float(w)) for w in col) for col in words.T], \
            np.asarray(v.rad).reshape(-1)  # fmt: skip
    arr = np.asarray(v, dtype=object).reshape(-1)
    return [mpmath.mpf(a.mid().str(200, radius=False)) for a in arr], \
        np.array([float(a.rad()) for a in arr])  # fmt: skip


def _optimizer_oracle(w0: np.ndarray, b0: np.ndarray, x: np.ndarray, y: np.ndarray,
                      cfg: OptimConfig, steps: int) -> dict[str, list]:  # fmt: skip
    """torch.optim's SGD (momentum, L2) / Adam / AdamW in mpmath on y = x W^T + b, MSE."""
    mp = mpmath.mpf
    lr, wd, b1, b2 = mp(cfg.lr), mp(cfg.weight_decay), mp(cfg.beta1), mp(cfg.beta2)
    p = {"weight": [mp(float(v)) for v in w0.ravel()], "bias": [mp(float(v)) for v in b0]}
    n, d = x.shape
    o = b0.shape[0]
    st = {k: {"m": [mp(0)] * len(v), "v": [mp(0)] * len(v), "buf": None} for k, v in p.items()}
    for t in range(1, steps + 1):
        g = {k: [mp(0)] * len(v) for k, v in p.items()}
        for i in range(n):
            for j in range(o):
                pred = sum(p["weight"][j * d + k] * mp(float(x[i, k])) for k in range(d))
                r = 2 * (pred + p["bias"][j] - mp(float(y[i, j]))) / (n * o)
                for k in range(d):
                    g["weight"][j * d + k] += r * mp(float(x[i, k]))
                g["bias"][j] += r
        for k in p:
            w, gk = p[k], g[k]
            if cfg.decoupled:
                w = [v * (1 - lr * wd) for v in w]
            else:
                gk = [a + wd * v for a, v in zip(gk, w, strict=True)]
            if cfg.name == "sgd":
                if cfg.momentum:
                    buf = st[k]["buf"]
                    buf = gk if buf is None else [mp(cfg.momentum) * a + c
                                                  for a, c in zip(buf, gk, strict=True)]  # fmt: skip
                    st[k]["buf"] = gk = buf
                p[k] = [v - lr * a for v, a in zip(w, gk, strict=True)]
                continue
            m = [b1 * a + (1 - b1) * c for a, c in zip(st[k]["m"], gk, strict=True)]
            v2 = [b2 * a + (1 - b2) * c * c for a, c in zip(st[k]["v"], gk, strict=True)]
            st[k]["m"], st[k]["v"] = m, v2
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            p[k] = [w_ - lr / bc1 * a / (mpmath.sqrt(c) / mpmath.sqrt(bc2) + mp(cfg.eps))
                    for w_, a, c in zip(w, m, v2, strict=True)]  # fmt: skip
    return p


@pytest.mark.parametrize("method", ["fast", "arb"])
@pytest.mark.parametrize(
    "cfg",
    [
        OptimConfig("sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
        OptimConfig("adam", lr=0.01, weight_decay=0.1),
        OptimConfig("adam", lr=0.01, weight_decay=0.1, decoupled=True),
        OptimConfig("adam", lr=0.3, beta1=0.0, beta2=0.5, eps=1e-3),
    ],
)
def test_exact_trajectory_encloses_torch_optims_formulas(cfg: OptimConfig, method: str) -> None:
    """Five full-batch steps: every certified parameter ball holds the mpmath trajectory of
    torch.optim's documented update (bias corrections, eps outside the root, L2 vs AdamW)."""
    from fpgrad.graph.train_exact import exact_run
    from fpgrad.graph.train_runs import Trainee
    from fpgrad.training.runs import batch_schedule

    torch.manual_seed(0)
    m = nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    net = fpgrad.from_module(m, x, y, nn.MSELoss())
    tr = Trainee(net.graph, net.name)
    run, digits, _ = exact_run(tr, cfg, batch_schedule(tr.samples, 5, None, 0), 128, method,
                               False, None)  # fmt: skip
    mpmath.mp.prec = 600
    truth = _optimizer_oracle(m.weight.detach().numpy(), m.bias.detach().numpy(), x.numpy(),
                              y.numpy(), cfg, 5)  # fmt: skip
    for name in ("weight", "bias"):
        mids, rads = _ball_mids(run.params[name])
        for a, r, t in zip(mids, rads, truth[name], strict=True):
            assert abs(a - t) <= mpmath.mpf(float(r)) * (1 + 1e-12), (name, a, r, t)
    assert digits >= 17


def test_adam_at_an_exact_relu_kink_is_not_vouched_for() -> None:
    """Adam's first step sends w and b of relu(w + b) to exactly 0 (lr = (4 + eps) / 8 with
    g = 4): the balls cannot prove the ReLU input 0 (the root of v), so relu' at step 2 is
    undecided. The trajectory's balls hold both branches' parameters (the truth is torch's
    relu'(0) = 0, momentum alone moving them) and fewer than 17 digits are claimed."""
    from fpgrad.graph.train_exact import exact_run
    from fpgrad.graph.train_runs import Trainee
    from fpgrad.training.runs import batch_schedule

    class R(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Linear(1, 1).double()
            with torch.no_grad():
                self.l.weight.fill_(0.5)
                self.l.bias.fill_(0.5)

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.l(v))

    eps = 2.0**-10
    cfg = OptimConfig("adam", lr=0.5 + 2.0**-13, eps=eps)
    x, y = torch.ones(1, 1, dtype=torch.float64), -torch.ones(1, 1, dtype=torch.float64)
    net = fpgrad.from_module(R(), x, y, nn.MSELoss())
    tr = Trainee(net.graph, net.name)
    run, digits, _ = exact_run(tr, cfg, batch_schedule(tr.samples, 2, None, 0), 128, "arb",
                               False, 512)  # fmt: skip
    mpmath.mp.prec = 300
    b1, b2, lr = mpmath.mpf(0.9), mpmath.mpf(0.999), mpmath.mpf(cfg.lr)
    assert lr * 4 / (4 + mpmath.mpf(eps)) == mpmath.mpf(0.5)  # step 1 lands on 0 exactly
    for g2 in (0, 2):  # relu'(0) = 0 (torch) and the other branch
        m2, v2 = b1 * (1 - b1) * 4 + (1 - b1) * g2, b2 * (1 - b2) * 16 + (1 - b2) * g2**2
        w2 = -lr / (1 - b1**2) * m2 / (mpmath.sqrt(v2 / (1 - b2**2)) + mpmath.mpf(eps))
        for name in ("l.weight", "l.bias"):
            mids, rads = _ball_mids(run.params[name])
            assert abs(mids[0] - w2) <= mpmath.mpf(float(rads[0])), (name, g2)
    assert digits < 17
    from fpgrad.training.exact_run import _few_digits_note

    note = _few_digits_note(run, digits, "arb", 512)  # why, not only 'raise --exact-bits'
    assert "stayed undecided" in note and "exactly at its kink" in note
