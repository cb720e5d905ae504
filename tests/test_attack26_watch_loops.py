"""Attack 26 on ``fpgrad.watch`` in realistic training loops: step boundaries, module paths and
directions when the loop accumulates gradients, evaluates, checkpoints, calls
``torch.autograd.grad``, raises mid-step and goes on, or nests watches."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fpgrad
from fpgrad.errors import InputError


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _ops(w: Any, step: int | None = None) -> list[dict]:
    return [r for r in w.records() if r["kind"] == "op" and step in (None, r["step"])]


def _steps(w: Any) -> list[dict]:
    return [r for r in w.records() if r["kind"] == "step"]


def test_an_optimizer_step_before_any_forward_is_a_step_of_its_own() -> None:
    # it raised AttributeError ('Watcher' object has no attribute '_seq') into the loop
    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with fpgrad.watch(m, opt) as w:
        opt.step()
        m(torch.randn(3, 4)).sum().backward()
        opt.step()
    assert [(s["step"], s["ops"], s["skipped"]) for s in _steps(w)] == [
        (0, 0, False),
        (1, 12, False),
    ]


def test_the_loss_of_a_later_micro_batch_is_forward_not_post_backward() -> None:
    # gradient accumulation: after the first micro-batch's backward, the second micro-batch's
    # loss (outside the model) was labelled post-backward
    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with fpgrad.watch(m, opt) as w:
        for _ in range(2):
            ((m(torch.randn(3, 4)) - 1.0) ** 2).mean().backward()
        opt.step()
    subs = [r["direction"] for r in _ops(w) if r["op"] == "aten.sub.Tensor"]
    assert subs == ["forward", "forward"]


def test_an_eval_pass_cut_by_the_exit_is_not_a_skipped_step() -> None:
    # the trailing no_grad evaluation opens a step the exit ends: it was recorded skipped=True
    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sc = torch.amp.GradScaler("cpu")
    with fpgrad.watch(m, opt, sc) as w:
        opt.zero_grad()
        sc.scale(m(torch.randn(3, 4)).sum()).backward()
        sc.step(opt)
        sc.update()
        with torch.no_grad():
            m(torch.randn(3, 4))
    assert [s["skipped"] for s in _steps(w)] == [False, None]


class _Fails(nn.Module):
    fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("forward fails")
        return x * 2


def test_a_forward_that_raises_leaves_no_module_on_the_stack() -> None:
    # the failing module stayed on the stack: later ops outside the model were attributed to it
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), _Fails(), nn.Linear(8, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with fpgrad.watch(m, opt) as w:
        m[1].fail = True
        with pytest.raises(RuntimeError, match="forward fails"):
            m(torch.randn(3, 4))
        m[1].fail = False
        m(torch.randn(3, 4)).sum().backward()
        opt.step()
    sums = [r["module"] for r in _ops(w) if r["op"] == "aten.sum.default"]
    assert sums == ["(outside)"]


class _FailsBackward(torch.autograd.Function):
    fail = False

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        if _FailsBackward.fail:
            raise RuntimeError("backward fails")
        return g


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(_FailsBackward.apply(self.a(x)))


def test_a_backward_that_raises_leaves_no_module_on_the_stack() -> None:
    # the failed backward never ran its end callback, and no later one was queued: the module
    # stack was never cleared again, so unscaling and clipping were "forward" in module "a"
    torch.manual_seed(0)
    m = _Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sc = torch.amp.GradScaler("cpu")
    with fpgrad.watch(m, opt, sc) as w:
        for fail in (True, False, False):
            opt.zero_grad()
            _FailsBackward.fail = fail
            x = torch.randn(3, 4)
            out = m(x)
            try:
                sc.scale(out.sum()).backward()
            except RuntimeError:
                continue
            sc.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            sc.step(opt)
            sc.update()
    _FailsBackward.fail = False
    for step in (0, 1):
        rows = _ops(w, step)
        norm = [(r["module"], r["direction"]) for r in rows if "vector_norm" in r["op"]]
        assert norm == [("(outside)", "post-backward")]
        randn = [(r["module"], r["direction"]) for r in rows if r["op"] == "aten.randn.default"]
        assert all(d == "(outside)" for d, _ in randn)


def test_a_checkpointed_model_recomputed_in_backward_stays_in_its_step() -> None:
    # without an optimizer a step ends at the model's next forward: the recompute of a
    # checkpointed model in backward ended the step mid-backward (four steps for two passes)
    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with fpgrad.watch(m) as w:
        for _ in range(2):
            x = torch.randn(3, 4, requires_grad=True)
            checkpoint(m, x, use_reentrant=False).sum().backward()
    assert len(_steps(w)) == 2
    mms = [r["module"] for r in _ops(w, 1) if r["op"] == "aten.mm.default"]
    assert mms == ["2", "2", "0", "0"]


def test_a_second_watch_inside_a_first_is_refused_and_the_first_goes_on() -> None:
    # nested, each mode saw the other's statistics ops, and the inner exit removed the outer's
    # GradScaler.update wrapper: the outer merged all later steps into one
    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sc = torch.amp.GradScaler("cpu")

    def one() -> None:
        opt.zero_grad()
        sc.scale(m(torch.randn(3, 4)).sum()).backward()
        sc.step(opt)
        sc.update()

    with fpgrad.watch(m, opt, sc) as w:
        one()
        with pytest.raises(InputError, match="another fpgrad.watch"):
            with fpgrad.watch(m, opt, sc):
                one()
        one()
        one()
    assert [s["ops"] > 0 for s in _steps(w)] == [True, True, True]
    assert "update" not in vars(sc)
    with fpgrad.watch(m, opt, sc) as w2:  # after the exit, a new watch is fine
        one()
    assert len(_steps(w2)) == 1


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.f(torch.stack([x, t], -1)).squeeze(-1)


def test_autograd_grad_with_respect_to_several_leaf_inputs() -> None:
    # a physics-informed loss: torch's multi-grad hook on the module's two leaf inputs raised
    # "A leaf node was passed to _will_engine_execute_node" inside torch.autograd.grad
    torch.manual_seed(0)
    m = _TwoInputs()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with fpgrad.watch(m, opt) as w:
        x = torch.randn(5, requires_grad=True)
        t = torch.randn(5, requires_grad=True)
        du_dx, du_dt = torch.autograd.grad(m(x, t).sum(), [x, t], create_graph=True)
        (du_dt - du_dx).pow(2).mean().backward()
        opt.step()
    assert [s["skipped"] for s in _steps(w)] == [False]
    assert any(r["module"] == "f" and r["direction"] == "backward" for r in _ops(w))


class _KwargBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        assert hidden is not None
        return torch.tanh(self.lin(hidden))


class _KwargNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.blk, self.c = nn.Linear(4, 8), _KwargBlock(), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.blk(hidden=self.a(x) * 3.0))


def test_a_module_called_with_keyword_inputs_leaves_the_stack_in_backward() -> None:
    # the pre-hook saw the positional inputs only: no hook popped "blk" in backward, and the
    # backward of the root's own ``* 3.0`` was attributed to it
    torch.manual_seed(0)
    m = _KwargNet()
    with fpgrad.watch(m) as w:
        m(torch.randn(3, 4)).sum().backward()
    muls = [(r["module"], r["direction"]) for r in _ops(w) if r["op"] == "aten.mul.Tensor"]
    assert muls == [("(root)", "forward"), ("(root)", "backward")]


def test_the_watchs_own_loss_scale_reads_take_no_op_number(monkeypatch) -> None:
    # scaler.update() is wrapped; the wrapper's two get_scale() reads are the watch's, not the
    # user's: no op record or op number for them (GradScaler.step's one found_inf .item() is)
    from fpgrad.watching import watcher

    seen: list[str] = []
    real = watcher.op_stats

    def logged(func, args, kwargs, out):  # type: ignore[no-untyped-def]
        seen.append(str(func))
        return real(func, args, kwargs, out)

    monkeypatch.setattr(watcher, "op_stats", logged)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x = torch.randn(3, 4)
    with fpgrad.watch(model, opt, scaler) as w:
        for _ in range(2):
            opt.zero_grad()
            scaler.scale(model(x).square().sum()).backward()
            scaler.step(opt)
            scaler.update()
    assert seen.count("aten._local_scalar_dense.default") == 2  # one per step: scaler.step's
    assert [r["scale"] for r in w.records() if r["kind"] == "step"] == [65536.0, 65536.0]
