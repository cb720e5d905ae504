"""Attack 23 on the watch's compiled Adam pass (fpgrad.watching.adam_pass): the step count in
the step's dtype, torch's addcmul order, and watched training against the float64 shadow and an
unwatched run in the corners (param groups, grads missing on some steps, state loaded, skipped
GradScaler steps)."""

from __future__ import annotations

import math

import pytest
import torch

import fpgrad
from fpgrad.watching import watcher
from fpgrad.watching.adam_pass import adam_updates
from fpgrad.watching.optimizer import widen
from fpgrad.watching.scratch import Scratch
from fpgrad.watching.shadow_optimizer import requested_updates


def _adam_at_step(step: torch.Tensor, betas: tuple[float, float]) -> tuple:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16))
    opt = torch.optim.Adam([p], lr=1e-3, betas=betas)
    p.grad = torch.randn(16)
    opt.step()
    opt.state[p]["step"] = step
    p.grad = torch.randn(16)
    return p, opt


@pytest.mark.parametrize("start", [2.0**24 - 1, 2.0**24, 2.0**24 + 2])
def test_a_float32_step_counts_as_torch_counts_it(start: float) -> None:
    # torch adds 1 to the float32 step in float32: 2^24 + 1 rounds back to 2^24; with betas
    # this close to 1 the bias corrections see it (2.4e-8 relative in the update)
    p, opt = _adam_at_step(torch.tensor(start), (1 - 2**-26, 1 - 2**-28))
    got = adam_updates(opt, widen([p], Scratch()), Scratch())
    ref = requested_updates(opt)  # torch's own float64 step on copies
    assert got is not None and ref is not None
    u, r = got[id(p)], ref[id(p)]
    assert float(((u - r).abs() / r.abs()).max()) < 1e-14


def test_a_float64_step_is_not_rounded_and_a_half_step_is_refused() -> None:
    p, opt = _adam_at_step(torch.tensor(2.0**25 + 5, dtype=torch.float64), (1 - 2**-26, 0.999))
    got = adam_updates(opt, widen([p], Scratch()), Scratch())
    ref = requested_updates(opt)
    assert got is not None and ref is not None
    assert float(((got[id(p)] - ref[id(p)]).abs() / ref[id(p)].abs()).max()) < 1e-14
    p, opt = _adam_at_step(torch.tensor(100.0, dtype=torch.bfloat16), (0.9, 0.999))
    assert adam_updates(opt, widen([p], Scratch()), Scratch()) is None


def test_the_second_moment_in_torchs_addcmul_order() -> None:
    # elements where v b2 + (1 - b2) (g g) and v b2 + ((1 - b2) g) g (torch's addcmul,
    # value * t1 * t2) round differently and the update sees it
    w = [-0.4619483248726868, 0.002264974486873239, -0.3611792628770023, -0.017733072421838303]
    g = [0.5988915895759828, 0.7562761915883005, -0.7074839752955493, 0.5662501676624614]
    m = [0.05883668368502612, 0.08915415564217946, 0.019142025667874818, 0.017904396423489954]
    v = [0.00032300784670653094, 0.00039291777092837713, 0.00024594134139968685,
         0.00013898922814479153]  # fmt: skip
    p = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=1e-3)
    opt.state[p] = {
        "step": torch.tensor(4.0),
        "exp_avg": torch.tensor(m, dtype=torch.float64),
        "exp_avg_sq": torch.tensor(v, dtype=torch.float64),
    }
    p.grad = torch.tensor(g, dtype=torch.float64)
    got = adam_updates(opt, widen([p], Scratch()), Scratch())
    assert got is not None
    c, ss = 1 - 0.999, (1e-3 / (1 - 0.9**5.0)) * -1
    bc2s = (1 - 0.999**5.0) ** 0.5
    for k in range(4):
        mk = m[k] + (1 - 0.9) * (g[k] - m[k])
        vk = v[k] * 0.999 + (c * g[k]) * g[k]
        want = (w[k] + (ss * mk) / (math.sqrt(vk) / bc2s + 1e-8)) - w[k]
        assert float(got[id(p)][k]).hex() == want.hex()


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _groups(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(
        [
            {"params": m[0].parameters(), "lr": 0.1, "betas": (0.0, 0.5), "weight_decay": 0.3},
            {"params": m[2].parameters(), "eps": 0.0, "weight_decay": 0.2,
             "decoupled_weight_decay": True},
        ],
        lr=1e-3,
    )  # fmt: skip


def _bias_grad_on_odd_steps(i: int, m: torch.nn.Module) -> None:
    if i % 2 == 0:
        m[0].bias.grad = None  # no grad on even steps: no state at step 0, then missing


def _inf_at_step_2(i: int, m: torch.nn.Module) -> None:
    if i == 2:
        m[0].weight.grad[0, 0] = float("inf")


CASES = {
    "groups": (_groups, None, False),
    "grads missing": (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2), _bias_grad_on_odd_steps, False),
    "scaler skips a step": (lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), _inf_at_step_2, True),
}  # fmt: skip


def _run(case: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> tuple:
    make, hook, scaled = CASES[case]
    m = _model()
    opt = make(m)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    if mode == "shadow":
        monkeypatch.setattr(watcher, "adam_updates", lambda *a: None)
    else:
        monkeypatch.setattr(watcher, "adam_updates", adam_updates)

    def body() -> None:
        for i in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x), y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if hook is not None:
                hook(i, m)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()

    if mode == "plain":
        body()
        return m, opt, scaler, []
    with fpgrad.watch(m, opt, scaler) as w:
        body()
    return m, opt, scaler, [r for r in w.records() if r["kind"] == "optimizer"]


@pytest.mark.parametrize("case", list(CASES))
def test_watched_corners_match_the_shadow_and_change_nothing(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = _run(case, "pass", monkeypatch)
    slow = _run(case, "shadow", monkeypatch)
    plain = _run(case, "plain", monkeypatch)
    assert fast[3] and len(fast[3]) == len(slow[3])
    for a, b in zip(fast[3], slow[3], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if k == "requested_update_weight_ratio":
                assert a[k] == pytest.approx(b[k], rel=1e-12)
            else:
                assert a[k] == b[k], (a["step"], a["param"], k)
    m, opt, scaler, _ = fast
    pm, popt, pscaler, _ = plain
    for p, q in zip(m.parameters(), pm.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(m.parameters(), pm.parameters(), strict=True):
        assert opt.state[p].keys() == popt.state[q].keys()
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], popt.state[q][k])
    if scaler is not None:
        assert scaler.get_scale() == pscaler.get_scale()


def _step_with_betas(betas: tuple[float, float], watched: bool) -> tuple:
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.randn(8, 4)
    err: Exception | None = None
    w = fpgrad.watch(m, opt)
    if watched:
        w.__enter__()
    for i in range(3):
        opt.zero_grad()
        m(x).sum().backward()
        if i == 2:
            opt.param_groups[0]["betas"] = betas  # set after construction (a scheduler may)
        try:
            opt.step()
        except Exception as e:  # torch's own step refuses these betas
            err = e
    if watched:
        w.__exit__(None, None, None)
    return type(err), {k: v.clone() for k, v in opt.state[m.weight].items()}, m.weight.detach()


@pytest.mark.parametrize("path", ["pass", "shadow"])
@pytest.mark.parametrize("betas", [(1.0, 0.999), (0.9, 1.5)])
def test_betas_torch_refuses_raise_from_torchs_step_as_unwatched(
    betas: tuple[float, float], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1 - b1^t = 0 (lr / 0) and 1 - b2^t < 0 (a complex root): the watch raised first
    # (ZeroDivisionError, TypeError), before torch's step counted the step and moved the moments
    if path == "shadow":
        monkeypatch.setattr(watcher, "adam_updates", lambda *a: None)
    want = _step_with_betas(betas, watched=False)
    got = _step_with_betas(betas, watched=True)
    assert want[0] is not None and got[0] is want[0]
    assert got[1].keys() == want[1].keys()
    assert all(torch.equal(got[1][k], want[1][k]) for k in want[1])
    assert torch.equal(got[2], want[2])


def test_a_step_that_raises_ends_there_and_the_next_step_is_recorded() -> None:
    # an exception inside optimizer.step() (its post-hook never runs), caught by the loop:
    # that step ends, not stepped, at the next forward, whose ops are recorded again
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 4)
    calls = {"n": 0}

    def flaky(*_: object) -> None:  # a pre-hook after the watch's: the step raises after it
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")

    with fpgrad.watch(model, opt) as w:
        opt.register_step_pre_hook(flaky)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            try:
                opt.step()
            except RuntimeError:
                pass
    recs = w.records()
    steps = [r for r in recs if r["kind"] == "step"]
    assert [s["step"] for s in steps] == [0, 1, 2]
    assert [s["skipped"] for s in steps] == [False, True, False]
    ops = [r for r in recs if r["kind"] == "op"]
    assert {r["step"] for r in ops} == {0, 1, 2}


def test_step_with_a_closure_records_no_optimizer_statistics_and_changes_nothing() -> None:
    def run(watched: bool) -> tuple[list[torch.Tensor], list[dict]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
        x, y = torch.randn(6, 4), torch.randn(6, 1)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        recs: list[dict] = []
        if watched:
            with fpgrad.watch(model, opt) as w:
                for _ in range(2):
                    opt.step(closure)
            recs = list(w.records())
        else:
            for _ in range(2):
                opt.step(closure)
        return [p.detach().clone() for p in model.parameters()], recs

    plain, _ = run(False)
    watched, recs = run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))
    # the closure's forward and backward run inside the step: not recorded per op (documented)
    assert not [r for r in recs if r["kind"] in ("optimizer", "op")]
    assert [r["skipped"] for r in recs if r["kind"] == "step"] == [False, False]
