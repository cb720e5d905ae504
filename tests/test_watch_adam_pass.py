"""The compiled Adam/AdamW pass of the watch (fpgrad.watching.adam_pass): bit for bit the float64
update of torch's order of operations with each operation correctly rounded (a Python-float
oracle), within a rounding of torch's own float64 step, and refused where it does not apply."""

from __future__ import annotations

import math

import pytest
import torch

import fpgrad
from fpgrad.watching import adam_pass, watcher
from fpgrad.watching.adam_pass import adam_updates
from fpgrad.watching.optimizer import widen
from fpgrad.watching.scratch import Scratch


def _oracle(
    w: float, g: float, m: float, v: float, group: dict, t: float, decoupled: bool
) -> float:
    """One element of the requested update in Python floats (IEEE double, math.sqrt correctly
    rounded), torch's multi-tensor Adam step in its order."""
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    wk = w
    if wd != 0:
        if decoupled:
            wk = w * (1 - lr * wd)
        else:
            g = g + wd * w
    wl = 1 - b1
    m = m + wl * (g - m) if abs(wl) < 0.5 else g - (g - m) * (1 - wl)
    v = v * b2
    v = v + ((1 - b2) * g) * g
    ss = (lr / (1 - b1**t)) * -1
    den = math.sqrt(v) / (1 - b2**t) ** 0.5
    den = den + eps
    q = wk + (ss * m) / den
    return q - w


def _setup(cls: type, dtype: torch.dtype, steps: int = 3, **kw: float) -> tuple:
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in ((33, 7), (7,), (1,), (130,))]
    opt = cls(ps, **kw)
    for _ in range(steps):  # state initialised, moments of several magnitudes
        for p in ps:
            p.grad = torch.randn_like(p) * 10.0 ** float(torch.randint(-6, 2, ()))
        opt.step()
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
        p.grad.view(-1)[::5] = 0.0  # zero gradients: moments decay, updates stay non-zero
    return ps, opt


CASES = [
    (torch.optim.Adam, {}),
    (torch.optim.Adam, {"weight_decay": 0.1}),
    (torch.optim.AdamW, {}),
    (torch.optim.AdamW, {"weight_decay": 0.3, "lr": 0.05}),
    (torch.optim.Adam, {"betas": (0.3, 0.99)}),  # lerp weight 0.7: torch's other formula
    (torch.optim.Adam, {"betas": (0.5, 0.9), "eps": 0.0}),  # weight 0.5; eps 0
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls,kw", CASES)
def test_bit_for_bit_with_the_python_float_oracle(cls: type, kw: dict, dtype: torch.dtype) -> None:
    ps, opt = _setup(cls, dtype, **kw)
    before = widen(ps, Scratch())
    got = adam_updates(opt, before, Scratch())
    assert got is not None
    group = opt.param_groups[0]
    decoupled = group.get("decoupled_weight_decay", cls is torch.optim.AdamW)
    for p in ps:
        st = opt.state[p]
        t = float(st["step"]) + 1
        cols = [
            x.detach().double().reshape(-1).tolist()
            for x in (p, p.grad, st["exp_avg"], st["exp_avg_sq"])
        ]
        want = [_oracle(w, g, m, v, group, t, decoupled) for w, g, m, v in zip(*cols, strict=True)]
        have = got[id(p)].reshape(-1).tolist()
        assert [x.hex() for x in have] == [x.hex() for x in want]


@pytest.mark.parametrize("cls,kw", CASES)
def test_within_a_rounding_of_torchs_float64_step(cls: type, kw: dict) -> None:
    ps, opt = _setup(cls, torch.float32, **kw)
    before = widen(ps, Scratch())
    got = adam_updates(opt, before, Scratch())
    assert got is not None
    # torch's own float64 step on float64 copies (what the float64 shadow runs)
    qs = [torch.nn.Parameter(p.detach().double()) for p in ps]
    ref = cls(qs, **kw)
    for p, q in zip(ps, qs, strict=True):
        q.grad = p.grad.double()
        st = opt.state[p]
        ref.state[q] = {k: (v.clone() if k == "step" else v.double()) for k, v in st.items()}
    ref.step()
    for p, q in zip(ps, qs, strict=True):
        u_torch = (q.detach() - before[id(p)]).reshape(-1)
        u = got[id(p)].reshape(-1)
        assert torch.equal(u == 0, u_torch == 0)
        w = before[id(p)].reshape(-1).abs()
        # a last-bit difference of the step moves q by at most an ulp of w, plus u's own
        tol = 2 * torch.finfo(torch.float64).eps * (w + u.abs())
        assert bool(((u - u_torch).abs() <= tol).all())


def _refused(opt: torch.optim.Optimizer, ps: list) -> bool:
    return adam_updates(opt, widen(ps, Scratch()), Scratch()) is None


@pytest.mark.parametrize(
    "kw", [{"amsgrad": True}, {"maximize": True}, {"lr": torch.tensor(1e-3)}, {"foreach": True}]
)
def test_refused_outside_the_plain_forms(kw: dict) -> None:
    ps, opt = _setup(torch.optim.Adam, torch.float32, **kw)
    assert _refused(opt, ps) == ("foreach" not in kw)  # foreach: the same step, taken


def test_refused_before_the_state_exists_and_for_other_optimizers() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    w.grad = torch.randn(5)
    assert _refused(torch.optim.Adam([w]), [w])  # first step: no state yet
    ps, _ = _setup(torch.optim.SGD, torch.float32, lr=0.1, momentum=0.9)
    assert _refused(torch.optim.SGD(ps, lr=0.1), ps)

    class MyAdam(torch.optim.Adam):  # a subclass may step differently
        pass

    ps, opt = _setup(MyAdam, torch.float32)
    assert _refused(opt, ps)
    ps, opt = _setup(torch.optim.Adam, torch.bfloat16)
    assert _refused(opt, ps)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    with fpgrad.watch(model, opt) as w:
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return [r for r in w.records() if r["kind"] == "optimizer"]


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_watch_records_match_the_float64_shadow(monkeypatch, cls: type) -> None:
    calls = []
    real = adam_pass.adam_updates

    def counted(*a: object) -> object:
        got = real(*a)  # type: ignore[arg-type]
        calls.append(got is not None)
        return got

    def run() -> list[dict]:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        return _train(model, cls(model.parameters(), lr=1e-2, weight_decay=0.01), 4)

    monkeypatch.setattr(watcher, "adam_updates", counted)
    fast = run()
    assert calls == [False, True, True, True]  # the first step has no state yet
    monkeypatch.setattr(watcher, "adam_updates", lambda *a: None)
    slow = run()
    assert len(fast) == len(slow) == 4 * 4
    for a, b in zip(fast, slow, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if k == "requested_update_weight_ratio":
                assert a[k] == pytest.approx(b[k], rel=1e-12)
            else:
                assert a[k] == b[k], k
