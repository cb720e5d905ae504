"""The fast watch statistics record exactly what the reference implementation (the code before
the fast paths, kept in tests/watch_reference/, with multi-grad hooks for every module) records, on small models that exercise every
path: zeros created and inherited, subnormals, infs and NaNs with a GradScaler, dead ReLU units
(structural ``mm`` zeros), dropout, convolutions, Adam and SGD."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import register_multi_grad_hook

import fpgrad
from fpgrad.watching import modules, optimizer, watcher
from fpgrad.watching.scratch import Scratch
from tests.watch_reference import classify as ref_classify
from tests.watch_reference import optimizer as ref_optimizer


class Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def _mlp(dtype: torch.dtype, factor: float, dead: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Linear(8, 24),
        Scale(factor),
        torch.nn.ReLU(),
        torch.nn.Linear(24, 24),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.25),
        torch.nn.Linear(24, 4),
    )
    if dead:  # units that never fire: whole zero rows and columns in the gradients
        with torch.no_grad():
            m[0].bias[:8] = -100.0
    return m.to(dtype)


def _conv() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(27, 4),
    )


CASES = {
    "float32-adam-dead": (lambda: _mlp(torch.float32, 1.0, dead=True), "adam", None, None, 1.0),
    "float16-sgd-underflow": (lambda: _mlp(torch.float16, 2.0**-20), "sgd", None, None, 1.0),
    "float16-subnormals": (lambda: _mlp(torch.float16, 2.0**-12), "adam", None, None, 2.0**-4),
    "autocast16-scaler-overflow": (
        lambda: _mlp(torch.float32, 4096.0),
        "adam",
        torch.float16,
        2.0**10,
        10.0,
    ),
    "autocast-bf16-adam": (lambda: _mlp(torch.float32, 1.0), "adam", torch.bfloat16, None, 1.0),
    "conv-float32": (_conv, "sgd", None, None, 1.0),
}


def _records(case: str) -> list[dict]:
    make, opt_name, autocast, scale, gain = CASES[case]
    m = make()
    dtype = next(m.parameters()).dtype
    if opt_name == "adam":
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    g = torch.Generator().manual_seed(1)
    shape = (16, 1, 8, 8) if case.startswith("conv") else (16, 8)
    x = (torch.randn(shape, generator=g) * gain).to(dtype)
    y = torch.randint(0, 4, (16,), generator=g)
    torch.manual_seed(2)  # dropout draws
    with fpgrad.watch(m, opt, scaler) as w:
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=autocast or torch.float16, enabled=bool(autocast)):
                out = m(x)
            loss = torch.nn.functional.cross_entropy(out.float(), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
    return list(w._records)


def _reference_widen(params: list[torch.Tensor], scratch: object) -> dict:
    return {id(p): p.detach().to(torch.float64, copy=True) for p in params}


def _reference_step_records(
    opt: torch.optim.Optimizer, names: dict, before: dict, requested: dict | None, scratch: object
) -> list[dict]:
    recs = []
    for g in opt.param_groups:
        for p in g["params"]:
            if id(p) not in before:
                continue
            req = None if requested is None else requested.get(id(p))
            name = names.get(id(p), f"param{len(recs)}")
            state = opt.state.get(p, {})
            recs.append(ref_optimizer.param_stats(name, p, before[id(p)], req, state, g))
    return recs


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys(), (x, y)
        for k in x:  # NaN-safe equality
            assert x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]), (k, x, y)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_statistics_equal_the_reference(monkeypatch, case: str) -> None:
    fast = _records(case)
    ops = [r for r in fast if r["kind"] == "op"]
    assert ops and [r for r in fast if r["kind"] in ("optimizer", "step")]
    monkeypatch.setattr(watcher, "op_stats", ref_classify.op_stats)
    monkeypatch.setattr(watcher, "step_records", _reference_step_records)
    monkeypatch.setattr(watcher, "widen", _reference_widen)
    monkeypatch.setattr(watcher, "ShadowOptimizer", ref_optimizer.ShadowOptimizer)
    monkeypatch.setattr(modules, "_grad_hook", register_multi_grad_hook)  # module paths
    _same(fast, _records(case))


def test_the_cases_reach_every_kind_of_special_value() -> None:
    # the comparison above is only as good as what the cases produce: zeros created and
    # inherited, subnormals, infs created, NaNs, swamped updates
    recs = [r for case in CASES for r in _records(case)]
    ops = [r for r in recs if r["kind"] == "op"]
    for key in ("zeros_created", "zeros_inherited", "subnormals", "infs_created", "nans"):
        assert any(r[key] for r in ops), key
    assert any(r.get("swamped") for r in recs if r["kind"] == "optimizer")


@pytest.mark.parametrize("case", ["float32-adam-dead", "float16-subnormals"])
def test_per_parameter_fallback_equals_the_reference(monkeypatch, case: str) -> None:
    # the path taken for very many parameters (and for non-finite updates or state)
    monkeypatch.setattr(optimizer, "BATCH_LIMIT", 0)
    fast = _records(case)
    monkeypatch.setattr(optimizer, "_flat_state_counts", lambda *a: None)
    _same(_opt(_records(case)), _opt(fast))
    monkeypatch.setattr(watcher, "step_records", _reference_step_records)
    monkeypatch.setattr(watcher, "widen", _reference_widen)
    _same(fast, _records(case))


def _opt(recs: list[dict]) -> list[dict]:
    return [r for r in recs if r["kind"] == "optimizer"]


@pytest.mark.parametrize("near", [False, True])
def test_eps_share_equals_the_reference_near_and_away_from_eps(near: bool) -> None:
    # exp_avg_sq values around eps^2: torch's float64 sqrt is not always correctly rounded, so
    # elements within 2^-30 of eps go the per-parameter way (torch's own sqrt); others are
    # decided by the threshold
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(300, dtype=torch.float64))  # float32 has no value that
    opt = torch.optim.Adam([w], lr=1e-3, eps=1e-8)  # close to eps^2 = 1e-16; float64 has
    w.grad = torch.randn(300, dtype=torch.float64)
    opt.step()
    v = opt.state[w]["exp_avg_sq"]
    v.copy_(torch.logspace(-20, -12, 300))  # 1e-16 = eps^2 in the middle
    if near:
        v[7] = 1e-16
        v[8] = torch.nextafter(v[7], torch.tensor(0.0, dtype=v.dtype))
    else:
        v[(v - 1e-16).abs() < 1e-20] = 2e-16
    before = {id(w): w.detach().to(torch.float64, copy=True)}  # the records read the state
    flat = optimizer._flat_state_counts([(opt.param_groups[0], w)], [opt.state[w]], Scratch())
    assert (flat is None) == near
    got = optimizer.step_records(opt, {id(w): "w"}, before, None, Scratch())
    ref = _reference_step_records(opt, {id(w): "w"}, before, None, None)
    _same(got, ref)
    assert 0 < got[0]["eps_dominated_share"] < 1
