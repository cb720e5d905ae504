"""``fpgrad train`` on captured models: native runs are a plain torch loop bit for bit, the
exact run is the certified trajectory through the graph, bad runs are refused in one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.cli import main
from fpgrad.errors import InputError
from fpgrad.run.optim import OptimConfig
from fpgrad.training import train


def _mlp(act: nn.Module | None = None) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), act or nn.SiLU(), nn.Linear(6, 3))
    return model, torch.randn(10, 4), torch.randint(0, 3, (10,))


def _cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.SiLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    )
    return model, torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,))


def _torch_loop(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype,
    make_opt: object,
    steps: int,
    scale: float = 1.0,
) -> np.ndarray:
    """The loop a user writes: the module in the dtype, backward of the scaled loss, the
    gradients unscaled, torch.optim's step; the final parameters flattened to float64."""
    m = copy.deepcopy(model).to(dtype)
    opt = make_opt(m.parameters())  # type: ignore[operator]
    loss_fn = nn.CrossEntropyLoss()
    xd = x.to(dtype)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(m(xd), y)
        (loss * scale if scale != 1.0 else loss).backward()
        if scale != 1.0:
            for p in m.parameters():
                p.grad = p.grad * (1.0 / scale)
        opt.step()
    return np.concatenate([p.detach().to(torch.float64).numpy().ravel() for p in m.parameters()])


@pytest.mark.parametrize(
    ("build", "run", "dtype", "cfg", "make_opt", "scale"),
    [
        (
            _mlp,
            "float32",
            torch.float32,
            OptimConfig(lr=0.1, momentum=0.9, weight_decay=1e-3),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
            1.0,
        ),
        (
            _mlp,
            "float16+scale=1024",
            torch.float16,
            OptimConfig(lr=0.1, momentum=0.5),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5),
            1024.0,
        ),
        (
            _cnn,
            "bfloat16",
            torch.bfloat16,
            OptimConfig(name="adam", lr=0.01, weight_decay=0.01, decoupled=True),
            lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01),
            1.0,
        ),
        (
            _cnn,
            "float32",
            torch.float32,
            OptimConfig(name="adam", lr=0.01),
            lambda ps: torch.optim.Adam(ps, lr=0.01),
            1.0,
        ),
    ],
)
def test_native_run_is_the_torch_loop_bit_for_bit(
    build, run, dtype, cfg, make_opt, scale  # noqa: ANN001
) -> None:
    model, x, y = build()
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    steps = 4
    result = train(net, steps, cfg, runs=run, verdict_every=steps)
    ours = result.histories[run].params[-1]
    with fpgrad.run.torch_native.one_torch_thread():
        theirs = _torch_loop(model, x, y, dtype, make_opt, steps, scale)
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)
    assert not np.array_equal(ours, result.histories[run].params[0])  # it trained


def test_exact_run_is_certified_and_tracks_float64() -> None:
    model, x, y = _cnn()
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    r = train(net, 3, cfg=OptimConfig(lr=0.5, momentum=0.9), runs="float64,float16")
    assert r.config["exact_method"] == "fast" and r.exact_certified_digits >= 17
    exact, f64 = np.array(r.exact.loss), np.array(r.histories["float64"].loss)
    assert exact.shape == f64.shape == (4,)
    assert np.all(np.abs(exact - f64) <= 1e-12 * np.abs(exact))
    assert exact[-1] < exact[0]  # the exact run moved downhill
    d64, d16 = r.distance["float64"][-1], r.distance["float16"][-1]
    assert d64 < 1e-12 < d16
    last = r.histories["float16"].verdicts[2]
    assert sum(last.values()) == sum(p.numel() for p in model.parameters())
    assert "captured model" in r.render()


def test_exact_trajectory_equals_the_layer_networks_exact_trajectory() -> None:
    """The same MLP as a layer network (fpgrad's own evaluator) and as a captured graph: two
    certified trajectories of the same exact values, so their losses agree to float64."""
    from fpgrad.model.from_torch import network_from_module

    model, x, y = _mlp(nn.Tanh())
    cfg = OptimConfig(lr=0.5, momentum=0.9)
    layered = train(network_from_module(model, x, y), 4, cfg, runs="float32", perturb=False)
    graphed = train(fpgrad.from_module(model, x, y, nn.CrossEntropyLoss()), 4, cfg, runs="float32")
    a, b = np.array(layered.exact.loss), np.array(graphed.exact.loss)
    assert a.shape == b.shape == (5,) and a[-1] < a[0]
    assert np.all(np.abs(a - b) <= 2e-16 * np.abs(a))


def test_missing_ball_op_falls_back_to_arb_with_one_note(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fpgrad.arith.ball import BallArith
    from fpgrad.arith.ball_functions import BallFunctions

    # the fast balls without GELU's normal CDF (defined on BallArith's functions mixin)
    monkeypatch.delattr(BallFunctions, "ncdf")
    assert not hasattr(BallArith, "ncdf")
    model, x, y = _mlp(nn.GELU())
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    r = train(net, 2, OptimConfig(lr=0.1), runs="float32")
    assert r.config["exact_method"] == "arb" and r.exact_certified_digits >= 17
    assert any("step 1" in n and "Arb balls" in n for n in r.notes)
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(InputError, match="--exact-method arb"):
        train(net, 2, OptimConfig(lr=0.1), runs="float32", exact_method="fast")


def test_zero_bias_before_batch_norm_stays_an_undetermined_ball() -> None:
    """A zero bias in front of batch norm has exact gradient 0 at every step, which no ball
    proves: its elements stay balls around 0, named in a note, outside the certified digits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].bias.zero_()
    net = fpgrad.from_module(model, torch.randn(8, 4), torch.randint(0, 2, (8,)),
                             nn.CrossEntropyLoss())  # fmt: skip
    r = train(net, 2, OptimConfig(lr=0.1), runs="float32")
    assert r.config["exact_method"] == "fast" and r.exact_certified_digits >= 17
    note = [n for n in r.notes if "balls around 0" in n]
    assert len(note) == 1 and note[0].startswith("3 parameter elements of the exact run (0.bias)")


def test_undecidable_max_pool_tie_is_not_certified() -> None:
    """Windows of equal inexact values: neither ball kind can prove which is the first
    maximum, so the trajectory certifies 0 digits and a note names the step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(4, 1, 2, 2).repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    net = fpgrad.from_module(model, x, torch.randint(0, 3, (4,)), nn.CrossEntropyLoss())
    r = train(net, 2, OptimConfig(lr=0.1), runs="float32", exact_max_bits=256)
    assert r.config["exact_method"] == "arb" and r.exact_certified_digits == 0.0
    # step 1 starts from exact float64 parameters: its ties are exact and decided
    assert any(n.startswith("step 2: the Arb exact run met a branch") for n in r.notes)


def test_emulated_run_interprets_the_graph_and_rounds_updates_once() -> None:
    from fpgrad.graph.compare import compare_graph
    from fpgrad.graph.train import parse_graph_runs
    from fpgrad.graph.train_runs import GraphEmulatedRun, Trainee
    from fpgrad.numbers.formats import get_format
    from fpgrad.numbers.rounding import round_to

    model, x, y = _cnn()
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    spec = parse_graph_runs("fp8_e4m3")[0]
    first = GraphEmulatedRun(Trainee(net.graph, net.name), spec, OptimConfig(lr=0.1), 0).step()
    theirs = compare_graph(net, "fp8_e4m3").grads["fp8_e4m3"]
    assert all(np.array_equal(first[k], theirs[k]) for k in net.param_names)
    r = train(net, 3, OptimConfig(lr=0.5, momentum=0.9), runs="bfloat16:emulated")
    final = r.histories["bfloat16:emulated"].params[-1]
    assert np.array_equal(round_to(final, get_format("bfloat16")), final)  # stored in bfloat16
    assert not np.array_equal(final, r.histories["bfloat16:emulated"].params[0])


def test_first_overflow_names_the_module_and_the_loss_scale() -> None:
    model, x, y = _mlp(nn.Tanh())
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    r = train(net, 2, OptimConfig(lr=0.1), runs="float16,float16+scale=65536")
    assert r.detectors["float16"]["first_overflow"] is None
    first = r.detectors["float16+scale=65536"]["first_overflow"]
    assert first["step"] == 0 and first["direction"] == "backward"
    # 65536 is above float16's largest value: d(loss * 65536)/d loss is already inf
    assert first["layer"] == "loss" and first["op"] == "loss (CrossEntropyLoss) backward"
    assert "above float16's largest value (65504)" in first["cause"] and "32768" in first["cause"]
    assert r.histories["float16+scale=65536"].skipped == [True, True]  # static: never taken
    with torch.no_grad():
        model[2].weight.mul_(300)  # dL/dh = W^T dL/dlogits overflows under the scale
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    r = train(net, 1, OptimConfig(lr=0.1), runs="float16+scale=16384")
    first = r.detectors["float16+scale=16384"]["first_overflow"]
    assert first["op"] == "2 (Linear) backward" and first["quantity"] == "dL/d(input)"
    assert first["cause"].startswith("with the loss scale 16384 the backward pass produced")


SCRIPT = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return model, torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]), nn.CrossEntropyLoss()
"""


def test_cli_trains_a_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "net.py"
    script.write_text(SCRIPT)
    out = tmp_path / "rep"
    args = ["train", f"{script}:build", "--steps", "3", "--lr", "0.5"]
    args += ["--precisions", "float16,float16+dynamic", "--json", "--out", str(out)]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert list(res["runs"]) == ["float16", "float16+dynamic"]
    assert len(res["runs"]["float16"]["loss"]) == 4 and res["exact"]["certified_digits"] >= 17
    assert res["runs"]["float16"]["dead_units"] == [] and res["config"]["model"] == "captured"
    dyn = res["runs"]["float16+dynamic"]
    assert dyn["loss_scale"][0] == 65536.0
    for t in range(2):  # GradScaler's rule: a step with inf/NaN gradients is skipped, scale/2
        halved = dyn["loss_scale"][t + 1] == dyn["loss_scale"][t] / 2
        assert dyn["skipped"][t] == dyn["nonfinite"][t] == halved
    assert {"train.md", "train.html", "train.json", "loss.png"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--precisions", "fp8_e4m3+scale=4"], "loss scaling of an emulated run"),
        (["--precisions", "float16+bogus"], "unknown policy 'bogus'"),
    ],
)
def test_cli_refusals_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    script = tmp_path / "net.py"
    script.write_text(SCRIPT)
    assert main(["train", f"{script}:build", "--steps", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_mini_batches_are_the_torch_loop_and_the_exact_run_follows_them() -> None:
    """--batch-size: the same seeded batches in every run; float32 is the user's loop over
    them bit for bit; the exact run steps on the same batches (batch norm: the batch's own
    statistics) and tracks float64."""
    from fpgrad.training.runs import batch_schedule

    model, x, y = _cnn()
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    steps, b = 4, 3
    cfg = OptimConfig(lr=0.2, momentum=0.9)
    r = train(net, steps, cfg, runs="float32,float64", batch_size=b, seed=5)
    assert r.config["batch_size"] == b
    schedule = batch_schedule(6, steps, b, 5)
    assert len({tuple(rows) for rows in schedule}) > 1  # the batches differ
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9)
    with fpgrad.run.torch_native.one_torch_thread():
        for rows in schedule:
            idx = torch.from_numpy(rows)
            opt.zero_grad()
            nn.CrossEntropyLoss()(m(x[idx]), y[idx]).backward()
            opt.step()
    theirs = np.concatenate([p.detach().double().numpy().ravel() for p in m.parameters()])
    assert np.array_equal(r.histories["float32"].params[-1], theirs)
    assert r.exact_certified_digits >= 17
    exact, f64 = np.array(r.exact.loss), np.array(r.histories["float64"].loss)
    assert exact.shape == f64.shape == (steps + 1,)
    assert np.all(np.abs(exact - f64) <= 1e-12 * np.abs(exact))
    full = train(net, steps, cfg, runs="float64")  # full batch: another trajectory
    assert not np.allclose(full.exact.loss, r.exact.loss)


def test_mini_batches_need_per_sample_inputs_and_targets() -> None:
    from fpgrad.examples.transformer_block import build

    model, inputs, targets, loss = build()  # 2 sequences, 10 token targets
    net = fpgrad.from_module(model, inputs, targets, loss)
    with pytest.raises(InputError, match=r"the targets has shape \(10,\) for 2 samples") as err:
        train(net, 2, runs="float32", batch_size=1)
    assert "\n" not in str(err.value)


def test_autocast_policy_trains_as_the_users_autocast_loop() -> None:
    """autocast_cpu: float32 parameters, torch.autocast("cpu", bfloat16) around the forward
    and the loss, backward outside: the loop a user writes, bit for bit."""
    model, x, y = _mlp()
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    cfg = OptimConfig(lr=0.1, momentum=0.9)
    r = train(net, 3, cfg, runs="autocast_cpu_bf16", verdict_every=3)
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    with fpgrad.run.torch_native.one_torch_thread():
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.CrossEntropyLoss()(m(x), y)
            loss.backward()
            opt.step()
    theirs = np.concatenate([p.detach().double().numpy().ravel() for p in m.parameters()])
    h = r.histories["autocast_cpu_bf16"]
    assert np.array_equal(h.params[-1], theirs)
    assert "autocast to bfloat16" in r.plans["autocast_cpu_bf16"]["summary"]
    f32 = train(net, 3, cfg, runs="float32", verdict_every=3).histories["float32"].params[-1]
    assert not np.array_equal(h.params[-1], f32)  # bfloat16 products: another trajectory


def test_cast_policy_first_gradients_are_compares_column() -> None:
    """Policies cast per op (the built-in ``autocast``: torch's CUDA lists; a module-path
    policy): a training step's gradients of S * loss are compare's policy column, bit for bit;
    the exact run and the verdicts follow."""
    from fpgrad.graph.compare import compare_graph
    from fpgrad.graph.train import parse_graph_runs
    from fpgrad.graph.train_runs import GraphTorchRun, Trainee

    model, x, y = _cnn()
    tables = {"conv16": {"default": "float32", "layers": {"0": "float16"}}}
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss(), policies=tables)
    for name in ("autocast", "conv16"):
        spec = parse_graph_runs(f"{name}+scale=256", net.policies)[0]
        run = GraphTorchRun(Trainee(net.graph, net.name), spec, OptimConfig(lr=0.1), 0)
        with fpgrad.run.torch_native.one_torch_thread():
            grads = run.step(None)  # unscaled (by 1/256: exact here), as float64
        column = compare_graph(net, name, loss_scale=256.0).grads[name]
        for k in net.param_names:
            assert np.array_equal(grads[k] * 256.0, column[k]), (name, k)
        r = train(net, 2, OptimConfig(lr=0.1), runs=f"{name}+scale=256", verdict_every=1)
        h = r.histories[f"{name}+scale=256"]
        assert sum(h.verdicts[0].values()) == sum(p.numel() for p in model.parameters())
        assert not np.array_equal(h.params[0], h.params[-1])
        assert r.exact_certified_digits >= 17 and "each op's inputs cast" in str(r.plans) or (
            "op lists emulated" in str(r.plans)
        )


def test_policy_naming_an_emulated_format_is_refused_in_training() -> None:
    model, x, y = _mlp()
    net = fpgrad.from_module(
        model, x, y, nn.CrossEntropyLoss(), policies={"f8": {"default": "fp8_e4m3"}}
    )
    with pytest.raises(InputError, match="policies run natively only") as err:
        train(net, 1, runs="f8")
    assert "\n" not in str(err.value)
