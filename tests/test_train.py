"""Training side by side: dead units, swamping, master weights, cycles, loss scaling, optimizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fpgrad.errors import InputError
from fpgrad.run.optim import OptimConfig, TorchOptimizer
from fpgrad.run.scaling import DynamicScaler
from fpgrad.training import train
from tests.nets import net_from

DEAD = dict(
    layers=[
        {"type": "dense", "weight": [[1.0, 2.0], [-1.0, -1.0]], "bias": [0.5, -4.0]},
        {"type": "relu"},
        {"type": "dense", "weight": [[1.0, -2.0]], "bias": [0.0]},
    ],
    loss="mse",
    x=[[1.0, 0.5], [0.25, 2.0], [3.0, 1.0]],
    y=[[0.0], [1.0], [0.5]],
)
# parameter vector layout: dense0.weight (4), dense0.bias (2), dense2.weight (2), dense2.bias (1)
DEAD_ROW = [2, 3, 5]  # unit 1's weights and bias


def test_dead_relu_never_changes_under_plain_sgd_in_any_precision() -> None:
    net = net_from(**DEAD)
    r = train(net, steps=12, cfg=OptimConfig(lr=0.05), perturb=False, verdict_every=100)
    for label in [*r.runs, "exact"]:
        h = r.exact if label == "exact" else r.histories[label]
        start = h.params[0][DEAD_ROW]
        for p in h.params:
            assert np.array_equal(p[DEAD_ROW], start), label
        assert all(d >= 1 for d in h.dead_units), label
    assert any(h.moved[0] for h in r.histories.values())  # the live unit does learn


def test_momentum_moves_a_unit_after_it_died_and_weight_decay_only_shrinks_it() -> None:
    # unit 0 starts alive on one sample; a big first step pushes it dead; momentum keeps moving it
    net = net_from(
        [
            {"type": "dense", "weight": [[1.0]], "bias": [-0.5]},
            {"type": "relu"},
            {"type": "dense", "weight": [[4.0]], "bias": [0.0]},
        ],
        "mse",
        x=[[1.0]],
        y=[[-3.0]],
    )
    r = train(
        net,
        steps=6,
        cfg=OptimConfig(lr=0.25, momentum=0.9),
        runs="float32",
        perturb=False,
        verdict_every=100,
    )
    h = r.exact
    assert h.dead_units[0] == 0 and h.dead_units[1] == 1  # alive at step 0, dead after step 1
    w = np.array([p[0] for p in h.params])
    assert np.all(np.diff(w[1:]) != 0)  # still moving on momentum alone while dead

    # weight decay on the dead unit of DEAD: weights shrink in magnitude, the unit stays dead
    net = net_from(**DEAD)
    r = train(
        net,
        steps=10,
        cfg=OptimConfig(lr=0.05, weight_decay=0.5),
        runs="float64",
        perturb=False,
        verdict_every=100,
    )
    rows = np.array([p[DEAD_ROW] for p in r.exact.params])
    assert np.all(np.abs(rows[1:]) < np.abs(rows[:-1]))
    assert all(d >= 1 for d in r.exact.dead_units)


def _swamp_net(update: float, lr: float):  # noqa: ANN202
    # one weight w = 1, x = 1, MSE: dL/dw = 2 (w - y); choose y so that lr * g = update
    y = 1.0 - update / lr / 2
    return net_from(
        [{"type": "dense", "weight": [[1.0]], "bias": False}], "mse", x=[[1.0]], y=[[y]]
    )


def test_swamping_float16_at_2_12_and_bfloat16_at_2_9_fixed_by_master_weights() -> None:
    lr = 2.0**-10
    r = train(
        _swamp_net(2.0**-12, lr),
        steps=8,
        cfg=OptimConfig(lr=lr),
        runs="float16,float32,float16+master",
        perturb=False,
        verdict_every=100,
    )
    f16 = r.histories["float16"]
    assert f16.swamped == [1] * 8 and not any(f16.moved)  # every step swamped: w stays 1.0
    assert r.detectors["float16"]["swamped_fraction"]["every_step_fully_swamped"]
    assert r.detectors["float16"]["limit_cycle"]["fixed_point"]
    assert r.detectors["float16"]["stall"]["detected"]
    floor = r.detectors["float16"]["loss_floor"]  # stuck at w = 1 while the exact loss falls
    assert floor["detected"] and floor["floor"] == r.histories["float16"].loss[0]
    assert not r.detectors["float32"]["loss_floor"]["detected"]
    assert all(r.histories["float32"].moved) and sum(r.histories["float32"].swamped) == 0
    assert r.histories["float16+master"].params[-1][0] < 1.0  # master weights accumulate
    assert r.exact.moved[-1]  # the exact run keeps moving

    lr = 2.0**-7
    r = train(
        _swamp_net(2.0**-9, lr),
        steps=8,
        cfg=OptimConfig(lr=lr),
        runs="bfloat16,float32,bfloat16+master",
        perturb=False,
        verdict_every=100,
    )
    assert r.histories["bfloat16"].swamped == [1] * 8
    assert all(r.histories["float32"].moved)
    assert r.histories["bfloat16+master"].params[-1][0] < 1.0


def test_stochastic_rounding_and_kahan_updates_escape_swamping() -> None:
    lr = 2.0**-10
    r = train(
        _swamp_net(2.0**-12, lr),
        steps=16,
        cfg=OptimConfig(lr=lr),
        runs="float16+sr,float16+kahan",
        perturb=False,
        verdict_every=100,
    )
    assert r.histories["float16+kahan"].params[-1][0] < 1.0
    sr = r.histories["float16+sr"]
    assert any(sr.moved) and sum(sr.swamped) < len(sr.swamped)  # some updates land


def test_float16_limit_cycle_while_exact_converges() -> None:
    # w <- w - lr * 2 (w - y) with lr = 0.99: factor -0.98, exact converges slowly by oscillating;
    # float16 runs out of states near y and repeats a cycle
    net = net_from(
        [{"type": "dense", "weight": [[1.0]], "bias": False}], "mse", x=[[1.0]], y=[[0.3]]
    )
    r = train(
        net, steps=400, cfg=OptimConfig(lr=0.99), runs="float16", perturb=False, verdict_every=1000
    )
    cyc = r.detectors["float16"]["limit_cycle"]
    assert cyc["detected"] and cyc["period"] in (1, 2, 4)
    assert r.exact.loss[-1] < r.exact.loss[-50]  # exact still converging at the end
    assert r.exact.moved[-1]


def test_torch_optimizer_matches_torch_optim_bitwise() -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for name, kw, ref in [
            (
                "sgd",
                dict(momentum=0.9, weight_decay=0.01),
                lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
            ),
            (
                "adam",
                dict(weight_decay=0.01),
                lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
            ),
            (
                "adam",
                dict(weight_decay=0.01, decoupled=True),
                lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01),
            ),
        ]:
            lr = 0.1 if name == "sgd" else 0.01
            w0 = torch.randn(5, 3, generator=gen).to(dtype)
            a, b = w0.clone(), w0.clone().requires_grad_(True)
            ours = TorchOptimizer([a], OptimConfig(name=name, lr=lr, **kw))
            theirs = ref([b])
            for _ in range(5):
                g = torch.randn(5, 3, generator=gen).to(dtype)
                ours.step([g])
                b.grad = g.clone()
                theirs.step()
                nan = torch.isnan(
                    a
                )  # float16 Adam makes NaNs (eps = 1e-8 rounds to 0): same places
                assert torch.equal(nan, torch.isnan(b.detach())), (dtype, name, kw)
                assert torch.equal(a[~nan], b.detach()[~nan]), (dtype, name, kw)


def test_dynamic_scaler_follows_torch_gradscaler() -> None:
    pattern = [True, True, False, True, True, True, True, False, False, True, True, True, True]
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=3
    )
    ours = DynamicScaler(interval=3)
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([w], lr=1.0)
    for finite in pattern:
        assert ours.scale == scaler.get_scale()
        opt.zero_grad()
        loss = (w * 1.0).sum() * (1.0 if finite else float("inf"))
        scaler.scale(loss).backward()
        before = w.detach().clone()
        scaler.step(opt)
        scaler.update()
        took = not torch.equal(before, w.detach())
        assert ours.update(finite) == took
    assert ours.scale == scaler.get_scale()


def test_bad_training_input(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # noqa: ANN001
    from fpgrad.cli import main

    path = tmp_path / "n.toml"
    path.write_text(
        '[[layer]]\ntype = "dense"\nout = 1\n[loss]\ntype = "mse"\n[data]\nx = [[1.0]]\ny = [[0.5]]\n'
    )
    for args, needle in [
        (["--steps", "0"], "steps must be a positive integer"),
        (["--steps", "3", "--lr", "-1"], "learning rate must be positive"),
        (["--steps", "3", "--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'"),
        (["--steps", "3", "--precisions", "float16+scale=1000"], "must be a power of two"),
        (["--steps", "3", "--precisions", "float16+turbo"], "unknown policy 'turbo'"),
        (["--steps", "3", "--momentum", "1.5"], "momentum must be in [0, 1)"),
        (["--steps", "3", "--batch-size", "0"], "batch size must be positive"),
    ]:
        code = main(["train", str(path), *args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err, (args, err)


def test_nan_runs_are_reported_not_crashed() -> None:
    # huge learning rate: float16 overflows to inf then NaN; the run goes on and says where
    net = net_from(
        [{"type": "dense", "weight": [[2.0]], "bias": [0.0]}], "mse", x=[[100.0]], y=[[0.0]]
    )
    r = train(
        net, steps=5, cfg=OptimConfig(lr=10.0), runs="float16", perturb=False, verdict_every=100
    )
    h = r.histories["float16"]
    assert any(h.nonfinite)
    place = r.detectors["float16"]["first_overflow"]
    assert place is not None and place["step"] == h.nonfinite.index(True)
    assert r.to_json()  # strict JSON even with inf/NaN inside


def _tanh_map(lr: float) -> tuple:  # noqa: UP006
    # w <- w - 2 lr (tanh w - 0) sech^2 w: bounded; chaotic at lr = 3 (Lyapunov ~0.75/step,
    # measured in float64), contracting at lr = 0.25
    net = net_from(
        [{"type": "dense", "weight": [[0.3]], "bias": False}, {"type": "tanh"}],
        "mse",
        x=[[1.0]],
        y=[[0.0]],
    )
    return net, OptimConfig(lr=lr)


def test_chaos_at_the_edge_of_stability_is_told_from_a_stable_orbit() -> None:
    net, cfg = _tanh_map(3.0)
    # chaos amplifies the exact run's own rounding too: the certificate must show it
    try:  # the fast balls alone: chaos eats their digits, or blows a radius up entirely
        r = train(
            net, 60, cfg, runs="float32", verdict_every=1000, perturb=False, exact_method="fast"
        )
        assert r.exact_certified_digits < 25  # 150 bits carry 45 digits; ~0.3 lost per step
    except InputError as exc:
        assert "cannot certify" in str(exc)
    # by default the exact run raises its precision until 17 digits are certified again
    r = train(net, steps=60, cfg=cfg, runs="float32", verdict_every=1000, perturb=False)
    assert r.exact_certified_digits >= 17 and r.config["exact_working_bits"] > 150
    r = train(net, steps=60, cfg=cfg, runs="float32,float64", verdict_every=1000, exact_bits=256)
    for label in r.runs:
        div = r.detectors[label]["divergence"]
        assert div["twin"]["verdict"] == "chaotic", label
        assert div["growth_log2_per_step"] > 0.5, label
    d32 = r.detectors["float32"]["divergence"]["exceeds_at_step"]
    d64 = r.detectors["float64"]["divergence"]["exceeds_at_step"]
    assert d32 is not None and (d64 is None or d32 < d64)  # fewer digits, earlier divergence
    assert r.exact_certified_digits >= 17

    net, cfg = _tanh_map(0.25)
    r = train(net, steps=60, cfg=cfg, runs="float32", verdict_every=1000)
    assert r.detectors["float32"]["divergence"]["twin"]["verdict"] == "stable"
    assert r.detectors["float32"]["divergence"]["exceeds_at_step"] is None


ONE_WEIGHT = dict(
    layers=[{"type": "dense", "weight": [[1.0]], "bias": [0.0]}], loss="mse", x=[[2.0]], y=[[1.0]]
)


def test_loss_end_is_the_loss_at_the_final_parameters_after_one_sgd_step() -> None:
    # by hand: out = 1*2 + 0 = 2, L0 = (2-1)^2 = 1, dL/dw = 2*1*2 = 4, dL/db = 2*1 = 2;
    # lr 1/8: w1 = 0.5, b1 = -0.25, out = 0.75, L1 = 0.0625 (the pre-fix loss[end] was L0 = 1)
    net = net_from(**ONE_WEIGHT)
    runs = "float16,float32,float16:emulated"
    r = train(net, steps=1, cfg=OptimConfig(lr=0.125), runs=runs, perturb=False)
    for h in [r.exact, *r.histories.values()]:
        assert h.loss == [1.0, 0.0625], h.label
    for label in r.runs:
        assert r.histories[label].exact_loss_at_params == {0: 1.0, 1: 0.0625}
    d = r.to_dict()
    assert d["exact"]["loss"][-1] == 0.0625
    assert d["runs"]["float16"]["loss"][-1] == 0.0625
    assert d["runs"]["float16"]["exact_loss_at_params"] == {"0": 1.0, "1": 0.0625}
    assert "| exact " in r.render() and "0.0625" in r.render()


def test_exact_loss_at_params_differs_from_a_rounded_run_and_is_plotted(
    tmp_path, monkeypatch
) -> None:  # noqa: ANN001
    # float16 holds w = 0.7001953125, b = 0.0999755859375, x = 0.333251953125, and its output
    # w*x + b = 0.3333... rounds to 0.333251953125 = y: float16's loss is 0 at every step (zero
    # gradient, no move), but at those parameters on the float64 data the residual is
    # 0.7001953125/3 + b - y = 2^-13 (to 1e-16), so the exact loss there is 2^-26
    net = net_from(
        [{"type": "dense", "weight": [[0.7]], "bias": [0.1]}],
        "mse",
        x=[[1 / 3]],
        y=[[0.333251953125]],
    )
    r = train(net, steps=4, cfg=OptimConfig(lr=0.5), runs="float16", perturb=False, verdict_every=2)
    h = r.histories["float16"]
    assert h.loss == [0.0] * 5 and sorted(h.exact_loss_at_params) == [0, 2, 3, 4]
    for v in h.exact_loss_at_params.values():
        assert abs(v - 2.0**-26) < 1e-6 * 2.0**-26
    assert r.to_dict()["runs"]["float16"]["exact_loss_at_params"]["4"] == h.exact_loss_at_params[4]
    import fpgrad.present.report.plots as plots

    legends: list[list[str]] = []
    save = plots.save_png

    def spy(fig, path) -> None:  # noqa: ANN001
        legends.append([t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()])
        save(fig, path)

    monkeypatch.setattr(plots, "save_png", spy)
    paths = r.plot(str(tmp_path))
    assert (tmp_path / "loss.png").stat().st_size > 0 and str(tmp_path / "loss.png") in paths
    assert legends[0] == [  # the exact series is drawn even where the run's own is off the scale
        "exact",
        "float16 (never > 0: off the log scale)",
        "float16: exact loss at its parameters",
    ]
