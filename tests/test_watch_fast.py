"""The shortcuts that make fpgrad.watching cheap report exactly what the full computation does:
selection ops without the float64 recompute, float-indicator counts, the reused float64 shadow
optimizer, the optimizer-state statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fpgrad
from fpgrad.numbers.formats import get_format
from fpgrad.watching import classify, splitting, structural
from fpgrad.watching.classify import FORMAT_OF, basic_stats, op_stats
from fpgrad.watching.optimizer import ShadowOptimizer, param_stats, requested_updates


def _mlp_records(dtype: torch.dtype, autocast: bool, factor: float) -> list[dict]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU()
    )
    m.append(torch.nn.Linear(32, 4)).to(dtype)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(16, 8, generator=g) * factor).to(dtype)
    y = torch.randint(0, 4, (16,), generator=g)
    with fpgrad.watch(m, opt) as w:
        for _ in range(2):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                h = m(x)
            torch.nn.functional.cross_entropy(h.float(), y).backward()
            opt.step()
    recs = w.records()
    return recs.to_dict("records") if hasattr(recs, "to_dict") else recs


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:  # NaN-safe equality (pandas fills missing values with NaN)
            assert x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]), (k, x, y)


@pytest.mark.parametrize(
    ("dtype", "autocast", "factor"),
    [(torch.float32, False, 1.0), (torch.float32, True, 1.0), (torch.float16, False, 2.0**-12)],
)
def test_selection_shortcut_reports_what_the_recompute_does(
    monkeypatch, dtype: torch.dtype, autocast: bool, factor: float
) -> None:
    fast = _mlp_records(dtype, autocast, factor)
    shortcut = [r for r in fast if r["kind"] == "op" and r["zeros"] and r["op"].count("relu")]
    assert shortcut  # the ReLU outputs (and threshold_backward) have zeros: the shortcut ran
    nll = [r for r in fast if r.get("op") == "aten.nll_loss_backward.default"]
    assert nll and all(r["zeros"] for r in nll)  # the off-target zeros: that shortcut ran too
    monkeypatch.setattr(structural, "SELECTION_OPS", frozenset())  # where it is read
    monkeypatch.setattr(splitting, "SELECTION_OPS", frozenset())
    monkeypatch.setattr(classify, "_mm_zeros_structural", lambda *_: False)
    monkeypatch.setattr(classify, "_nll_zeros_structural", lambda *_: False)
    _same(fast, _mlp_records(dtype, autocast, factor))


def test_selection_needs_inputs_and_scalars_in_the_output_format() -> None:
    sel = structural._selection_exact
    x16, x32 = torch.ones(3, dtype=torch.float16), torch.ones(3)
    relu, clamp = torch.ops.aten.relu.default, torch.ops.aten.clamp.default
    assert sel(relu, (x32,), {}, torch.float32) and sel(relu, (x16,), {}, torch.float32)
    assert not sel(relu, (x32,), {}, torch.float16)  # a float32 input in a float16 output
    assert sel(clamp, (x32, 0.5), {}, torch.float32)
    assert not sel(clamp, (x32, 0.1), {}, torch.float32)  # 0.1 rounds in float32
    assert not sel(torch.ops.aten.mul.Tensor, (x32, x32), {}, torch.float32)
    # clamp to a bound that float32 flushes to zero creates the zero: recomputed, created
    st = op_stats(clamp, (torch.tensor([0.0, 1.0]), 1e-50), {}, torch.tensor([0.0, 1.0]))[0]
    assert (st["zeros_created"], st["zeros_inherited"]) == (1, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_basic_stats_finite_with_zeros_and_subnormals_match_numpy(dtype: torch.dtype) -> None:
    sn = get_format(FORMAT_OF[dtype]).smallest_normal
    g = torch.Generator().manual_seed(7)
    for sub in (False, True):
        x = torch.randn(500, generator=g).to(dtype)
        x[::3] = 0
        if sub:
            x[1::7] = torch.tensor(sn / 4, dtype=dtype)
        a = np.abs(x.to(torch.float64).numpy())
        st = basic_stats(x, sn)
        assert st["zeros"] == int((a == 0).sum())
        assert st["subnormals"] == int(((a > 0) & (a < sn)).sum()) == (72 if sub else 0)
        assert st["min_abs"] == a[a > 0].min() and st["max_abs"] == a.max()
    assert basic_stats(torch.zeros(4, dtype=dtype), sn)["min_abs"] is None


def _train_shadows(opt_cls: type, **kw: object) -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(40))
    b = torch.nn.Parameter(torch.randn(5))
    opt = opt_cls([{"params": [w]}, {"params": [b], "lr": 0.05}], **kw)
    shadow = ShadowOptimizer()
    for step in range(3):
        opt.zero_grad()
        loss = (w**2).sum() + (b.sum() if step != 1 else 0 * w.sum())  # b: no grad at step 1
        loss.backward()
        if step == 1:
            b.grad = None
        opt.param_groups[0]["lr"] *= 0.5  # a schedule: the shadow follows the groups
        reused, fresh = shadow.requested_updates(opt), requested_updates(opt)
        assert reused is not None and fresh is not None and reused.keys() == fresh.keys()
        for k in fresh:
            assert torch.equal(reused[k], fresh[k])
        opt.step()


@pytest.mark.parametrize(
    ("opt_cls", "kw"),
    [(torch.optim.Adam, {"lr": 0.1}), (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})],
)
def test_reused_shadow_optimizer_equals_a_fresh_one(opt_cls: type, kw: dict) -> None:
    _train_shadows(opt_cls, **kw)


@pytest.mark.parametrize(
    ("opt_cls", "kw"),
    [
        (torch.optim.Adam, {"lr": 0.1, "weight_decay": 0.01}),
        (torch.optim.Adam, {"lr": 0.1, "amsgrad": True}),
        (torch.optim.AdamW, {"lr": 0.1}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5}),
        (torch.optim.Adagrad, {"lr": 0.1}),
    ],
)
def test_shadow_multi_tensor_step_equals_the_single_tensor_one(opt_cls: type, kw: dict) -> None:
    # the shadow steps with foreach=True; the single-tensor float64 step is the reference
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in ((33, 7), (7,), (1,))]
    opt = opt_cls(ps, **kw)
    shadow = ShadowOptimizer()
    for _ in range(4):
        for p in ps:
            p.grad = torch.randn_like(p) * 10.0 ** torch.randint(-30, 3, p.shape)
        got = shadow.requested_updates(opt)
        ref = [p.detach().double().clone().requires_grad_() for p in ps]
        for r, p in zip(ref, ps, strict=True):
            r.grad = p.grad.double()
        ropt = opt_cls(ref, **(kw | {"foreach": False}))
        for r, p in zip(ref, ps, strict=True):
            ropt.state[r] = {
                k: v.double() if v.is_floating_point() and k != "step" else v.clone()
                for k, v in opt.state[p].items()
            }
        before = [r.detach().clone() for r in ref]
        ropt.step()
        assert got is not None
        for p, r, b in zip(ps, ref, before, strict=True):
            assert torch.equal(got[id(p)], r.detach() - b)
        opt.step()


def _mm_structural_brute(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every zero of a @ b has no non-zero product (numpy: supports as integers)."""
    t = (a @ b).numpy()
    overlap = (a.numpy() != 0).astype(np.int64) @ (b.numpy() != 0).astype(np.int64)
    return bool(((t != 0) | (overlap == 0)).all())


@pytest.mark.parametrize("rows", [1, 3, 200])
@pytest.mark.parametrize("cancel", [False, True])
def test_mm_structural_zeros_equal_a_brute_force_check(rows: int, cancel: bool) -> None:
    # zeros in a few rows (one small support product) or many rows of a wide product (the
    # other paths), with and
    # without a zero made by cancellation (1*1 + 1*(-1)), which is not structural
    g = torch.Generator().manual_seed(rows)
    a = torch.randn(256, 64, generator=g)
    b = torch.randn(64, 48 if rows < 200 else 512, generator=g)  # 200 rows: too many
    zero_rows = torch.randperm(256, generator=g)[:rows]
    a[zero_rows, :60] = 0  # those rows meet b only in its last 4 rows...
    b[60:, :20] = 0  # ...where the first 20 columns are 0: zeros at (zero row, j < 20)
    if cancel:
        i = int(zero_rows[0])
        a[i, 60:62], b[60:62, 30] = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0])
        a[i, 62:], b[62:, 30] = 0, 0
    t = a @ b
    zeros = int((t == 0).sum())
    assert zeros >= 20 * rows
    mm = torch.ops.aten.mm.default
    assert structural._mm_zeros_structural(mm, (a, b), t, zeros) == _mm_structural_brute(a, b)
    assert structural._mm_zeros_structural(mm, (a, b), t, zeros) is (not cancel)


def test_param_stats_state_counts_and_eps_share_match_numpy() -> None:
    g = torch.Generator().manual_seed(3)
    p = torch.randn(300, generator=g)
    before = p.clone()
    p.data[::2] += 1e-3
    sn = get_format("float32").smallest_normal
    m = torch.randn(300, generator=g)
    m[::5], m[1::9] = 0.0, sn / 8
    v = torch.rand(300, generator=g) * 4e-16  # around eps^2 = 1e-16
    v[::4] = 0.0
    clean = torch.rand(300, generator=g) + 1.0
    state = {"step": torch.tensor(2.0), "exp_avg": m, "exp_avg_sq": v, "other": clean}
    rec = param_stats("w", p, before, None, state, {"eps": 1e-8})
    am, av = np.abs(m.double().numpy()), v.double().numpy()
    assert rec["state_exp_avg_zero_share"] == (am == 0).sum() / 300
    assert rec["state_exp_avg_subnormal_share"] == ((am > 0) & (am < sn)).sum() / 300
    assert rec["state_exp_avg_sq_zero_share"] == (av == 0).sum() / 300
    assert rec["state_other_zero_share"] == rec["state_other_subnormal_share"] == 0
    assert rec["eps_dominated_share"] == (np.sqrt(av) < 1e-8).sum() / 300
    assert 0 < rec["eps_dominated_share"] < 1 and rec["moved_share"] == 0.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_in_place_statistics_never_touch_the_model(dtype: torch.dtype) -> None:
    # the statistics work in place on temporaries; a float64 parameter widened "to float64" is
    # the parameter itself, so this checks they never write into it
    def train(watched: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        m.to(dtype)
        opt = torch.optim.Adam(m.parameters(), lr=0.01)
        x = torch.randn(6, 4, dtype=dtype)
        with fpgrad.watch(m, opt) if watched else _Null():
            for _ in range(3):
                opt.zero_grad()
                m(x).square().mean().backward()
                opt.step()
        state = [t for s in opt.state.values() for t in s.values()]
        return [p.detach().clone() for p in m.parameters()] + state

    for a, b in zip(train(False), train(True), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_mm_structural_zeros_shortcut_matches_the_recompute(monkeypatch) -> None:
    mm = torch.ops.aten.mm.default
    a = torch.tensor([[1.0, 0.0, 0.0], [1.0, -1.0, 0.0], [2.0**-60, 1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0], [5.0, 0.0]])
    # row 0: supports disjoint from column 0 (a structural zero); row 1, column 1: 1 - 1 cancels
    # (an exact zero, but the supports overlap: the shortcut declines, the recompute decides)
    out = mm(a[:1], b)  # one zero, structural
    assert structural._mm_zeros_structural(mm, (a[:1], b), out, 1)
    out = mm(a[1:2], b)  # two zeros: (1,0) structural, (1,1) a cancellation
    assert not structural._mm_zeros_structural(mm, (a[1:2], b), out, 2)
    # a float32-underflowing product: fl32 gives 0, the exact result 2^-60 * 5 is not
    x, y = torch.tensor([[2.0**-100, 0.0]]), torch.tensor([[2.0**-60], [1.0]])
    out = mm(x, y)
    assert out.item() == 0.0 and not structural._mm_zeros_structural(mm, (x, y), out, 1)
    fast = [op_stats(mm, (x, y), {}, mm(x, y))[0] for x, y in ((a, b), (a[:1], b), (x, y))]
    monkeypatch.setattr(classify, "_mm_zeros_structural", lambda *_: False)
    slow = [op_stats(mm, (x, y), {}, mm(x, y))[0] for x, y in ((a, b), (a[:1], b), (x, y))]
    assert fast == slow and fast[2]["zeros_created"] == 1


def test_mm_zero_lines_count_dead_rows_and_columns_only() -> None:
    nan = float("nan")
    a = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, nan], [-0.0, 0.0]])  # rows 0, 3 zero
    b = torch.tensor([[1.0, 0.0, 3.0], [1.0, 0.0, 0.0]])  # column 1 zero
    assert structural._zero_lines(a, b) == 2 * 3 + 1 * 4 - 2 * 1


def test_nll_backward_shortcut_matches_the_recompute(monkeypatch) -> None:
    nll_bw = torch.ops.aten.nll_loss_backward.default
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(6, 4, generator=g), 1)
    target = torch.tensor([0, 1, 2, 3, -100, 1])
    cases = [  # (weight, reduction, grad_output): mean / sum, an ignored row, a zero weight
        (None, 1, torch.tensor(1.0)),
        (None, 2, torch.tensor(2.0**-30)),
        (torch.tensor([1.0, 0.0, 1.0, 1.0]), 1, torch.tensor(1.0)),  # class 1: on-target zeros
        (None, 1, torch.tensor(2.0**-149)),  # -go / 5 underflows: created zeros on target
    ]
    fast, slow, took = [], [], []
    for w, red, go in cases:
        tw = torch.tensor(5.0)
        args = (go, lp, target, w, red, -100, tw)
        out = nll_bw(*args)
        took.append(structural._nll_zeros_structural(nll_bw, args, {}, out, int((out == 0).sum())))
        fast.append(op_stats(nll_bw, args, {}, out)[0])
    monkeypatch.setattr(classify, "_nll_zeros_structural", lambda *_: False)
    for w, red, go in cases:
        args = (go, lp, target, w, red, -100, torch.tensor(5.0))
        slow.append(op_stats(nll_bw, args, {}, nll_bw(*args))[0])
    assert took == [True, True, False, False]
    assert fast == slow
    assert fast[0]["zeros"] == 24 - 5 and fast[0]["zeros_inherited"] == 19
    assert fast[3]["zeros_created"] == 5


@pytest.mark.parametrize(
    "values",
    [
        [1.0, 2.0, 3.0],  # no zero: the plain record from aminmax(t) alone
        [-0.0, 0.0, 1.0, -2.0, 1e-40],  # zeros of both signs and a subnormal
        [-0.0, -0.0],  # only zeros
        [float("nan"), 1.0, -1.0],  # NaN: |t| is computed after all
        [float("inf"), 0.0, 5.0],
    ],
)
@pytest.mark.parametrize("op", ["relu", "abs", "exp"])
def test_nonnegative_outputs_skip_abs_and_equal_the_reference(values: list, op: str) -> None:
    from tests.watch_reference import classify as ref

    x = torch.tensor(values)
    func = getattr(torch.ops.aten, op).default
    out = x.clone() if op == "relu" else func(x)  # relu's output keeps the -0.0s as given
    assert op_stats(func, (x,), {}, out) == ref.op_stats(func, (x,), {}, out)


@pytest.mark.parametrize(
    "values",
    [
        [3.0],
        [-2.5, 1.0, 7.0],  # mixed signs: the plain record from Python magnitudes
        [0.0],
        [-0.0, 1.0],
        [1e-40, 1.0],  # a float32 subnormal
        [float("nan")],
        [1.0, float("nan"), 2.0],  # min/max of Python floats would miss this NaN
        [float("inf"), 1.0],
        [float("-inf")],
        [1.0] * 16,
        [-1.5] * 17,  # above TINY: the tensor path
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_tiny_outputs_checked_in_python_equal_the_reference(
    values: list, dtype: torch.dtype
) -> None:
    from tests.watch_reference import classify as ref

    x = torch.tensor(values, dtype=dtype)
    for op in ("clone", "neg"):
        func = getattr(torch.ops.aten, op).default
        out = func(x)
        assert op_stats(func, (x,), {}, out) == ref.op_stats(func, (x,), {}, out)


def test_scratch_layout_views_are_kept_until_the_buffer_or_shapes_change() -> None:
    from fpgrad.watching.scratch import Scratch

    sc = Scratch()
    shapes = [torch.Size([3, 4]), torch.Size([5])]
    lay = sc.layout("x", 2, shapes, torch.float64, torch.device("cpu"))
    assert lay.buf.shape == (2, 17) and [v.shape for v in lay.views[1]] == shapes
    lay.views[1][1].fill_(7.0)  # the views are the buffer's rows, cut per shape
    assert lay.row(1)[12:].tolist() == [7.0] * 5 and lay.parts(1, 2)[1].tolist() == [[7.0] * 5]
    assert sc.layout("x", 2, shapes, torch.float64, torch.device("cpu")) is lay  # kept
    other = sc.layout("x", 2, [torch.Size([40])], torch.float64, torch.device("cpu"))
    assert other is not lay and other.buf.data_ptr() != lay.buf.data_ptr()  # grown: new
    again = sc.layout("x", 2, shapes, torch.float64, torch.device("cpu"))
    assert again is not lay  # rebuilt on the grown buffer
    assert again.buf.data_ptr() == other.buf.data_ptr()
    sc.clear()
    assert sc.layout("x", 1, shapes, torch.float64, torch.device("cpu")).buf.shape == (1, 17)


@pytest.mark.parametrize("between", [False, True])
def test_flat_step_records_equal_the_per_parameter_records(between: bool) -> None:
    """The batched optimizer records (flat state rows; for exp_avg_sq first only 'non-zero' and
    'below the largest threshold') equal param_stats per parameter, with zeros only below the
    thresholds (the short way) and with subnormals and values around eps^2 (all four rows)."""
    from fpgrad.watching import optimizer
    from fpgrad.watching.scratch import Scratch

    g = torch.Generator().manual_seed(5)
    ps = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (300, 40, 7)]
    opt = torch.optim.Adam(ps, lr=1e-3, eps=1e-8)
    sn = get_format("float32").smallest_normal
    for k, p in enumerate(ps):
        p.grad = torch.randn(p.shape, generator=g)
        m = torch.randn(p.shape, generator=g)
        v = torch.rand(p.shape, generator=g) + 0.5
        m[:: 3 + k] = v[:: 3 + k] = p.grad[:: 3 + k] = 0.0  # stay zero through the step
        if between and k != 1:  # where the gradient is 0: scaled by beta1, beta2
            m[1 :: 5 + k] = p.grad[1 :: 5 + k] = 0.0
            m[1 :: 5 + k] = sn / 4
            v[1 :: 5 + k] = torch.rand(len(v[1 :: 5 + k]), generator=g) * 4e-16
            v[2 :: 7 + k] = p.grad[2 :: 7 + k] = 0.0
            v[2 :: 7 + k] = sn / 2
        opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": m, "exp_avg_sq": v}
    names = {id(p): f"p{k}" for k, p in enumerate(ps)}
    sc = Scratch()
    before = optimizer.widen(ps, sc)
    req = ShadowOptimizer().requested_updates(opt, before)
    opt.step()
    flat = optimizer.step_records(opt, names, before, req, sc)
    one = [
        param_stats(names[id(p)], p, before[id(p)], req[id(p)], opt.state[p], opt.param_groups[0])
        for p in ps
    ]
    assert flat == one
    shares = [r["eps_dominated_share"] for r in flat]
    zeros = [r["state_exp_avg_sq_zero_share"] for r in flat]
    assert (shares != zeros) is between and all(z > 0 for z in zeros)


def test_dispatch_frames_stay_out_of_dynamo() -> None:
    """The watch's __torch_dispatch__ (without torch's per-call disable wrapper) is marked for
    Dynamo to skip and runs the watcher with Dynamo's frame callback off, restored after."""
    from torch._C._dynamo.eval_frame import get_eval_frame_callback

    from fpgrad.watching import watcher

    seen = []
    m = torch.nn.Linear(3, 2)
    with fpgrad.watch(m) as w:
        on_op = w._on_op

        def spy(func, args, kwargs):  # type: ignore[no-untyped-def]
            seen.append(get_eval_frame_callback())
            return on_op(func, args, kwargs)

        w._on_op = spy  # type: ignore[method-assign]
        m(torch.ones(1, 3)).sum().backward()
    assert watcher._Mode.__dict__["__torch_dispatch__"]._torchdynamo_disable
    assert seen and all(cb is None for cb in seen)


def test_shadow_step_skips_torch_step_wrapper_and_global_hooks() -> None:
    # the float64 shadow steps without torch's step wrapper: a global step hook of the user's
    # sees the user's optimizer only, and the unwrapped step updates as the wrapped one does
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from fpgrad.watching.optimizer import _plain_step

    seen: list[int] = []
    handle = register_optimizer_step_pre_hook(lambda o, a, k: seen.append(id(o)))
    try:
        torch.manual_seed(0)
        m = torch.nn.Linear(5, 3)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        x = torch.randn(4, 5)
        with fpgrad.watch(m, opt) as w:
            for _ in range(2):
                opt.zero_grad()
                m(x).square().sum().backward()
                opt.step()
        assert seen == [id(opt)] * 2 and w._shadow_opt._shadow is not None
        seen.clear()
        pairs = []
        for _ in range(2):
            q = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
            q.grad = torch.full_like(q, 0.5)
            pairs.append((q, torch.optim.AdamW([q], lr=0.1, weight_decay=0.1)))
        for _ in range(3):
            _plain_step(pairs[0][1])
            pairs[1][1].step()
        assert seen == [id(pairs[1][1])] * 3  # the wrapper (and its hooks) ran for .step() only
        assert torch.equal(pairs[0][0], pairs[1][0])
    finally:
        handle.remove()
