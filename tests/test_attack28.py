"""attack28 on ``fpgrad.watch``: exceptions inside ``scaler.step``/``optimizer.step`` and
``scaler.update``, GradScaler with ``step(closure)``. The float64 shadow of the optimizer is the
user's own class: its exceptions (an assert on the dtype, a NaN check) escaped from the watch
before the real step ran, and its random draws advanced the user's generator."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import fpgrad


def _recs(w: Any) -> list[dict]:
    recs = w.records()
    return recs.to_dict("records") if hasattr(recs, "to_dict") else recs


class NaNCheck(Exception):
    pass


class CheckedSGD(torch.optim.SGD):
    """Steps, then raises if a weight went non-finite (the update is done before the raise)."""

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        if any(not torch.isfinite(p).all() for g in self.param_groups for p in g["params"]):
            raise NaNCheck("non-finite weight")
        return loss


class Float32SGD(torch.optim.SGD):
    """Asserts float32 parameters: the float64 shadow fails the assert, the real step not."""

    def step(self, closure: Any = None) -> Any:
        assert all(p.dtype == torch.float32 for g in self.param_groups for p in g["params"])
        return super().step(closure)


class NoisySGD(torch.optim.SGD):
    """Langevin-like: Gaussian noise on each weight after the step (draws from torch's RNG)."""

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        with torch.no_grad():
            for g in self.param_groups:
                for p in g["params"]:
                    p.add_(torch.randn_like(p), alpha=1e-3)
        return loss


def _loop(cls: type, watched: bool) -> tuple[list, list, Any, torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = cls(m.parameters(), lr=0.1)
    torch.manual_seed(1)
    caught, steps = [], []

    def run() -> None:
        for i in range(3):
            opt.zero_grad()
            x = torch.randn(3, 4)
            if i == 1:
                x[0, 0] = float("nan")
            m(x).pow(2).sum().backward()
            try:
                opt.step()
            except NaNCheck as e:
                caught.append((str(e), e.__traceback__ is not None))
            with torch.no_grad():
                for p in m.parameters():
                    p.nan_to_num_(0.0)

    if watched:
        with fpgrad.watch(m, opt) as w:
            run()
        steps = [(r["step"], r["skipped"]) for r in _recs(w) if r["kind"] == "step"]
    else:
        run()
    return caught, steps, (list(m.parameters()), opt.state_dict()), torch.get_rng_state()


@pytest.mark.parametrize("cls", [CheckedSGD, Float32SGD, NoisySGD])
def test_the_shadow_of_the_users_optimizer_changes_nothing(cls: type) -> None:
    # CheckedSGD: the shadow's NaNCheck escaped from the watch's pre-hook, the real step never
    # ran (weights not updated); Float32SGD: AssertionError from the watch, unwatched none;
    # NoisySGD: the shadow's randn_like advanced torch's RNG (other noise, other weights)
    caught, steps, (ps, st), rng = _loop(cls, watched=True)
    caught0, _, (ps0, st0), rng0 = _loop(cls, watched=False)
    assert caught == caught0
    assert steps == [(0, False), (1, cls is CheckedSGD), (2, False)], steps
    assert all(torch.equal(p, q) for p, q in zip(ps, ps0, strict=True))
    assert str(st) == str(st0)
    assert torch.equal(rng, rng0)


def test_a_scaler_update_that_raises_ends_its_step() -> None:
    # scaler.step(opt, closure=...) is refused by GradScaler before the optimizer runs, and the
    # loop's scaler.update() then raises "No inf checks were recorded": the step stayed open and
    # the next iteration's forward and backward joined it (one step for two, skipped None)
    torch.manual_seed(0)
    m = nn.Linear(4, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sc = torch.amp.GradScaler("cpu")
    caught = []
    with fpgrad.watch(m, opt, sc) as w:
        for _ in range(2):
            x = torch.randn(3, 4)

            def closure(x: torch.Tensor = x) -> torch.Tensor:
                loss = m(x).sum()
                sc.scale(loss).backward()
                return loss

            opt.zero_grad()
            sc.scale(m(x).sum()).backward()
            try:
                sc.step(opt, closure=closure)
            except RuntimeError as e:
                caught.append(type(e).__name__)
            try:
                sc.update()
            except AssertionError as e:
                caught.append(type(e).__name__)
    assert caught == ["RuntimeError", "AssertionError"] * 2
    steps = [r for r in _recs(w) if r["kind"] == "step"]
    assert [(s["step"], s["skipped"], s["scale"]) for s in steps] == [
        (0, True, 65536.0),
        (1, True, 65536.0),
    ]
    forwards = [
        r["step"] for r in _recs(w) if r["kind"] == "op" and r["op"] == "aten.addmm.default"
    ]
    assert forwards == [0, 1]  # one forward per step (the closure never ran)


@pytest.mark.parametrize("every", [1, 2])
def test_a_step_hook_raising_inside_scaler_step_then_update(every: int) -> None:
    # (held) a user step pre-hook registered after the watch raises inside scaler.step; the
    # loop catches it and calls scaler.update(): that step is skipped, the next ones sampled
    def run(watched: bool) -> tuple[list, Any]:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.Adam(m.parameters(), lr=0.01)
        sc = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        w = fpgrad.watch(m, opt, sc, every=every) if watched else None
        if w is not None:
            w.__enter__()
        calls = [0]

        def hook(*_: Any) -> None:
            calls[0] += 1
            if calls[0] == 2:
                raise NaNCheck("hook")

        opt.register_step_pre_hook(hook)
        for _ in range(4):
            opt.zero_grad()
            sc.scale(m(torch.randn(3, 4)).pow(2).sum()).backward()
            try:
                sc.step(opt)
            except NaNCheck:
                pass
            sc.update()
        if w is not None:
            w.__exit__(None, None, None)
        state = (list(m.parameters()), opt.state_dict(), sc.get_scale(), sc._get_growth_tracker())
        steps = [] if w is None else [r for r in _recs(w) if r["kind"] == "step"]
        return [(s["step"], s["sampled"], s["skipped"]) for s in steps], state

    steps, (ps, st, scale, tracker) = run(True)
    _, (ps0, st0, scale0, tracker0) = run(False)
    assert steps == [(i, i % every == 0, i == 1) for i in range(4)]
    assert all(torch.equal(p, q) for p, q in zip(ps, ps0, strict=True))
    assert str(st) == str(st0) and (scale, tracker) == (scale0, tracker0)


class SuperSGD(torch.optim.SGD):
    """A subclass whose step calls ``super().step()`` (torch runs the step hooks twice)."""

    def step(self, closure: Any = None) -> Any:
        return super().step(closure)


@pytest.mark.parametrize("scaler", [False, True])
def test_a_subclass_step_calling_super_step_is_one_step(scaler: bool) -> None:
    # once an SGD exists, SGD.step has torch's hook wrapper too: the inner pre-hook took the
    # outer step for one that raised (ended it: skipped=True, two records per step)
    m = nn.Linear(4, 2)
    torch.optim.SGD(m.parameters(), lr=0.1)  # wraps SGD.step
    opt = SuperSGD(m.parameters(), lr=0.1)
    sc = torch.amp.GradScaler("cpu") if scaler else None
    with fpgrad.watch(m, opt, sc) as w:
        for _ in range(3):
            opt.zero_grad()
            loss = m(torch.randn(3, 4)).sum()
            if sc is not None:
                sc.scale(loss).backward()
                sc.step(opt)
                sc.update()
            else:
                loss.backward()
                opt.step()
    recs = _recs(w)
    assert [(r["step"], r["skipped"]) for r in recs if r["kind"] == "step"] == [
        (i, False) for i in range(3)
    ]
    assert [r["step"] for r in recs if r["kind"] == "optimizer"] == [0, 0, 1, 1, 2, 2]
