"""fpgrad.watching on tiny float16 models: created vs inherited, overflow and skipped steps,
bit-identical training, the optimizer records, the JSON lines and the report."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fpgrad
from fpgrad.cli import main
from fpgrad.errors import InputError
from fpgrad.watching.classify import op_stats
from fpgrad.watching.records import read_records


class Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Net(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.scale = Scale(factor)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.scale(self.fc1(x))))


def _data(seed: int = 0, gain: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g) * gain, torch.randn(32, 4, generator=g)


def _ops(w: fpgrad.watching.Watcher, **match: object) -> list[dict]:
    return [
        r for r in w.records() if r["kind"] == "op" and all(r[k] == v for k, v in match.items())
    ]


def test_scaling_creates_zeros_in_backward_and_later_ops_inherit() -> None:
    torch.manual_seed(0)
    m = Net(2.0**-20).half()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = _data()
    x, y = x.half(), y.half()
    with fpgrad.watch(m, opt) as w:
        opt.zero_grad()
        ((m(x) - y) ** 2).mean().backward()
        opt.step()
    back = _ops(w, direction="backward")
    scale = [r for r in back if r["module"] == "scale" and r["op"] == "aten.mul.Tensor"]
    assert len(scale) == 1 and scale[0]["zeros_created"] > 0
    s = scale[0]
    # every zero of the scaling's gradient is accounted for, none undecided
    assert s["zeros_created"] + s["zeros_inherited"] == s["zeros"]
    # on the activation-gradient path (same shape) nothing before it created a zero
    assert all(
        r["zeros_created"] == 0 for r in back if r["seq"] < s["seq"] and r["numel"] == s["numel"]
    )
    # (fc2's weight gradient, tiny activations times the output gradient, creates its own)
    assert [r["module"] for r in back if r["seq"] < s["seq"] and r["zeros_created"]] == ["fc2"]
    # fc1's weight gradient (mm) and bias gradient (sum) come after: zeros, all inherited
    later = [r for r in back if r["module"] == "fc1" and r["seq"] > s["seq"] and r["zeros"]]
    assert later and all(r["zeros_inherited"] == r["zeros"] for r in later)
    assert {r["op"] for r in later} >= {"aten.mm.default"}


def scaled_steps(
    m: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    n: int,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """``n`` float16-autocast GradScaler steps of a mean squared error on ``data`` (default
    ``_data(gain=10)``)."""
    x, y = data if data is not None else _data(gain=10.0)
    for _ in range(n):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = ((m(x).float() - y) ** 2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def test_forward_overflow_names_the_op_and_gradscaler_skip_points_to_it() -> None:
    torch.manual_seed(0)
    m = Net(4096.0)  # float32 weights, float16 compute under autocast
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with fpgrad.watch(m, opt, scaler) as w:
        scaled_steps(m, opt, scaler, 2)
    steps = [r for r in w.records() if r["kind"] == "step"]
    assert [s["skipped"] for s in steps] == [True, True]
    assert [s["scale"] for s in steps] == [1024.0, 512.0]
    first = steps[0]["first_nonfinite"]
    assert first["module"] == "scale" and first["op"] == "aten.mul.Tensor"
    assert first["direction"] == "forward" and first["created"]
    fw = _ops(w, step=0, direction="forward")
    boom = [r for r in fw if r["seq"] == first["seq"]][0]
    assert boom["infs_created"] == boom["infs"] > 0
    assert all(r["infs"] == 0 for r in fw if r["seq"] < first["seq"])
    # no optimizer step ran, so no per-parameter records
    assert not [r for r in w.records() if r["kind"] == "optimizer"]


class DropNet(Net):
    def __init__(self) -> None:
        super().__init__(2.0**-6)
        self.drop = torch.nn.Dropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.scale(self.fc1(x)))))


def _train(m: torch.nn.Module, watched: bool, every: int = 1) -> list[torch.Tensor]:
    torch.manual_seed(1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    data = _data(seed=3)
    if watched:
        with fpgrad.watch(m, opt, scaler, every=every):
            scaled_steps(m, opt, scaler, 4, data)
    else:
        scaled_steps(m, opt, scaler, 4, data)
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return [p.detach().clone() for p in m.parameters()] + state + [scaler._scale.clone()]


@pytest.mark.parametrize("every", [1, 3])
def test_watching_changes_nothing(every: int) -> None:
    torch.manual_seed(0)
    m0 = DropNet()
    plain = _train(copy.deepcopy(m0), watched=False)
    watched = _train(copy.deepcopy(m0), watched=True, every=every)
    assert len(plain) == len(watched)
    for a, b in zip(plain, watched, strict=False):
        assert a.dtype == b.dtype and torch.equal(
            a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)
        )


def test_optimizer_records_swamping_and_flushed_adam_eps() -> None:
    torch.manual_seed(0)
    m = Net(1.0).half()
    opt = torch.optim.Adam(m.parameters(), lr=1e-6, eps=1e-8)
    x, y = _data()
    with fpgrad.watch(m, opt) as w:
        opt.zero_grad()
        ((m(x.half()) - y.half()) ** 2).mean().backward()
        opt.step()
    recs = {r["param"]: r for r in w.records() if r["kind"] == "optimizer"}
    assert set(recs) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    r = recs["fc1.weight"]
    state = opt.state[m.fc1.weight]
    blown = ~torch.isfinite(m.fc1.weight)
    # float16 Adam: eps=1e-8 flushes to 0 in the state's format, so where the second moment
    # underflowed to 0 the step divides by 0 and the weight leaves the finite range ...
    assert r["eps_in_state_dtype"] == 0.0 and r["eps_flushed"]
    assert r["state_exp_avg_sq_zero_share"] == float(blown.float().mean()) > 0
    assert torch.equal(blown, state["exp_avg_sq"] == 0)
    # ... and the others are asked to move by about lr = 1e-6: all but the smallest do not
    moved = round(r["moved_share"] * 128)
    assert r["requested_nonzero"] == 128 and r["swamped"] == 128 - moved
    assert 0 <= moved - int(blown.sum()) <= 4 and r["swamped_share"] > 0.6
    assert 0 < r["requested_update_weight_ratio"] < 1e-4


def test_exact_fallback_decides_what_float64_cannot() -> None:
    mm = torch.ops.aten.mm.default
    b = torch.ones(3, 1)
    zero = torch.zeros(1, 1)
    tiny = torch.tensor([[1.0, 2.0**-60, -1.0]])  # float64 sum: 0, exact: 2^-60
    st = op_stats(mm, (tiny, b), {}, zero)[0]
    assert (st["zeros_created"], st["zeros_inherited"], st["zeros_undecided"]) == (1, 0, 0)
    cancel = torch.tensor([[1.0, 1.0, -2.0]])  # exactly zero
    st = op_stats(mm, (cancel, b), {}, zero)[0]
    assert (st["zeros_created"], st["zeros_inherited"], st["zeros_undecided"]) == (0, 1, 0)
    clear = torch.tensor([[1.0, 2.0**-30, -1.0]])  # float64 proves it non-zero, no fallback
    st = op_stats(mm, (clear, b), {}, zero)[0]
    assert st["zeros_created"] == 1


def test_out_dir_jsonl_and_report(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    m = Net(2.0**-20).half()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = _data()
    out = tmp_path / "run"
    with fpgrad.watch(m, opt, out=str(out), every=2) as w:
        for _ in range(3):
            opt.zero_grad()
            ((m(x.half()) - y.half()) ** 2).mean().backward()
            opt.step()
    on_disk = read_records(out)
    assert json.loads(json.dumps(on_disk[0]))["kind"] == "meta"
    # the same run kept in memory (no out=) gives the same records
    torch.manual_seed(0)
    m2 = Net(2.0**-20).half()
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    with fpgrad.watch(m2, opt2, every=2) as w2:
        for _ in range(3):
            opt2.zero_grad()
            ((m2(x.half()) - y.half()) ** 2).mean().backward()
            opt2.step()

    def key(r: dict) -> tuple:
        return tuple(str(r.get(k)) for k in ("kind", "step", "op", "module", "zeros_created"))

    assert [key(r) for r in on_disk] == [key(r) for r in w2.records()]
    assert w.records() == on_disk
    steps = [r for r in on_disk if r["kind"] == "step"]
    assert [s["sampled"] for s in steps] == [True, False, True]
    assert not [r for r in on_disk if r["kind"] == "op" and r["step"] == 1]
    assert main(["watch-report", str(out), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "watch.md").read_text()
    assert "scale" in md and "aten.mul.Tensor" in md
    html = (tmp_path / "rep" / "watch.html").read_text()
    assert "data:image/png;base64," in html and '<img src="watch' not in html


def test_bad_input(tmp_path, capsys) -> None:
    with pytest.raises(InputError):
        fpgrad.watch(3)
    with pytest.raises(InputError):
        fpgrad.watch(Net(1.0), every=0)
    assert main(["watch-report", str(tmp_path / "missing")]) == 2
    (tmp_path / "records.jsonl").write_text("{not json\n{}\n")
    assert main(["watch-report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("fpgrad: error:") for e in err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_basic_stats_match_numpy(dtype: torch.dtype) -> None:
    import numpy as np

    from fpgrad.numbers.formats import get_format
    from fpgrad.watching.classify import FORMAT_OF, basic_stats

    sn = get_format(FORMAT_OF[dtype]).smallest_normal
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(
        -160, 140, (300,), generator=g
    )
    x[:7] = torch.tensor([0.0, -0.0, float("inf"), float("nan"), sn, -sn / 2, 1e300])
    t = x.to(dtype)
    a = np.abs(t.to(torch.float64).numpy())
    fin = np.isfinite(a) & (a > 0)
    st = basic_stats(t, sn)
    assert st["zeros"] == int((a == 0).sum())
    assert st["subnormals"] == int(((a > 0) & (a < sn)).sum())
    assert st["infs"] == int(np.isinf(a).sum()) and st["nans"] == int(np.isnan(a).sum())
    assert st["min_abs"] == a[fin].min() and st["max_abs"] == a[fin].max()
    clean = torch.tensor([1.0, -2.0, 3.0], dtype=dtype)
    assert basic_stats(clean, sn) == {
        "zeros": 0,
        "subnormals": 0,
        "infs": 0,
        "nans": 0,
        "min_abs": 1.0,
        "max_abs": 3.0,
    }


class InPlace(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.act = torch.nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h.mul_(2.0**-30)  # in place: classified on the input as it was before the op
        return self.act(h)


def test_in_place_ops_and_steps_without_optimizer() -> None:
    torch.manual_seed(0)
    m = InPlace().half()
    x = torch.randn(8, 4).half()
    with fpgrad.watch(m) as w:
        for _ in range(2):
            m(x).sum().backward()
        with torch.no_grad():
            m(x)
    steps = [r for r in w.records() if r["kind"] == "step"]
    assert len(steps) == 3  # each forward (with its backward) is a step
    mul = _ops(w, step=0, op="aten.mul_.Tensor")
    assert len(mul) == 1 and mul[0]["zeros_created"] == mul[0]["zeros"] == 32
    relu = _ops(w, step=0, op="aten.relu_.default")
    assert relu[0]["zeros_inherited"] == 32  # relu of exact zeros
    assert not _ops(w, step=2, direction="backward")


def test_import_fpgrad_stays_cheap() -> None:
    import subprocess
    import sys

    code = "import sys, fpgrad; print('torch' in sys.modules, 'fpgrad.watching' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    from fpgrad.watching import Watcher

    assert fpgrad.watch.__name__ == "watch" and Watcher.__name__ == "Watcher"


def test_add_with_alpha_zero_is_undecided_not_inherited() -> None:
    add = torch.ops.aten.add.Tensor
    out = torch.zeros(2)
    # a + alpha * b with alpha = 0.5: float64 gives 0 for the first element, but with alpha not
    # +-1 a float64 zero proves nothing (alpha * b rounds in general): undecided; the second,
    # -0.1f + 0.5 * 0.3f, is non-zero in float64 hence exactly: created
    a, b = torch.tensor([-0.5, -0.1]), torch.tensor([1.0, 0.3])
    st = op_stats(add, (a, b), {"alpha": 0.5}, out)[0]
    assert (st["zeros_created"], st["zeros_inherited"], st["zeros_undecided"]) == (1, 0, 1)
    # without alpha the float64 zero is the exact zero: inherited
    st = op_stats(add, (torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])), {}, out)[0]
    assert (st["zeros_created"], st["zeros_inherited"]) == (0, 2)


def test_dropout_records_are_deterministic_and_skip_uninitialised_outputs() -> None:
    # dropout allocates its mask with aten.empty_like (garbage until written): recording that
    # output made the records change from run to run; it is not recorded now
    def run() -> list[dict]:
        torch.manual_seed(0)
        m = DropNet()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        x, y = _data(seed=5)
        with fpgrad.watch(m, opt) as w:
            for _ in range(3):
                opt.zero_grad()
                ((m(x) - y) ** 2).mean().backward()
                opt.step()
        return list(w._records)

    a, b = run(), run()
    ops = [r["op"] for r in a if r["kind"] == "op"]
    assert "aten.bernoulli_.float" in ops or any("dropout" in o for o in ops)
    assert not [o for o in ops if "empty" in o]
    assert json.dumps(a, default=str) == json.dumps(b, default=str)


class _Quantised(torch.nn.Module):
    """Straight-through rounding and a top-2 gate in bfloat16: round/floor of values in
    (-0.5, 0.5) and (0, 1) are exactly 0 (their zeros are inherited: the exact integer part is
    0), and the values topk/sort pick are input elements (zeros among them inherited)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 6).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x)) * 0.49
        q = h + (h.round() - h).detach() + ((h.abs()).floor() - h).detach()
        v, _ = torch.relu(h).topk(2, -1)
        s, _ = torch.sort(torch.relu(h), -1)
        return q + v.sum(-1, keepdim=True) + s


def test_integer_parts_and_selections_are_decided_not_undecided() -> None:
    torch.manual_seed(0)
    model = _Quantised()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    x = torch.randn(16, 8, dtype=torch.bfloat16)
    y = torch.randn(16, 6, dtype=torch.bfloat16)
    twin = copy.deepcopy(model)
    opt2 = torch.optim.SGD(twin.parameters(), 0.1)
    with fpgrad.watch(model, opt) as w:
        for _ in range(2):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
    for _ in range(2):
        opt2.zero_grad()
        ((twin(x) - y) ** 2).mean().backward()
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    seen = set()
    for op in ("aten.round.default", "aten.floor.default", "aten.topk.default", "aten.sort.default"):
        for r in _ops(w, op=op):
            seen.add(op)
            assert r["zeros_undecided"] == 0 and r["zeros_created"] == 0, r
            assert r["zeros_inherited"] == r["zeros"]
    assert len(seen) == 4 and any(r["zeros"] for r in _ops(w, op="aten.round.default"))
