"""The exact training run in certified ball arithmetic: its balls enclose an independent
high-precision (mpmath) trajectory at every step; when they cannot vouch it says why in one
line and recomputes in Arb balls, which enclose a 2000-bit mpmath trajectory."""

from __future__ import annotations

import math
import re

import mpmath
import numpy as np
import pytest

from fpgrad.arith.mp import MPArith
from fpgrad.errors import InputError
from fpgrad.graph.layers import evaluate
from fpgrad.model.network import Network
from fpgrad.reference.exact import ARB_START_BITS, DEFAULT_MAX_BITS
from fpgrad.run.optim import ArithOptimizer, OptimConfig
from fpgrad.training import ExactRun, arb_bits_for, batch_schedule, exact_trajectory, train
from tests.nets import net_from

RNG = np.random.default_rng(11)
X = RNG.normal(size=(6, 3)).tolist()

NETS = {
    "tanh_mse": (
        [{"type": "dense", "out": 4}, {"type": "tanh"}, {"type": "dense", "out": 2}],
        "mse",
        RNG.normal(size=(6, 2)).tolist(),
    ),
    "bn_sigmoid_bce": (
        [
            {"type": "dense", "out": 4},
            {"type": "batch_norm"},
            {"type": "sigmoid"},
            {"type": "dense", "out": 2},
        ],
        "bce",
        RNG.integers(0, 2, (6, 2)).astype(float).tolist(),
    ),
    "leaky_softmax_ce": (
        [
            {"type": "dense", "out": 5, "init": "he_normal"},
            {"type": "leaky_relu", "slope": 0.1},
            {"type": "dense", "out": 3},
            {"type": "softmax"},
        ],
        "cross_entropy",
        [0, 1, 2, 0, 1, 2],
    ),
}
OPTIMIZERS = {
    "sgd_momentum_wd": OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": OptimConfig(name="adam", lr=0.01),
    "adamw": OptimConfig(name="adam", lr=0.01, weight_decay=0.1, decoupled=True),
}
_adam = OPTIMIZERS["adam"]


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("name", list(NETS))
def test_balls_enclose_the_mpmath_trajectory(name: str, opt: str) -> None:
    layers, loss, y = NETS[name]
    net = net_from(layers, loss, X, y, seed=3)
    cfg = OPTIMIZERS[opt]
    schedule = batch_schedule(6, 8, 4, seed=1)
    run, digits, method = exact_trajectory(net, cfg, schedule, 128)
    assert method == "fast" and digits >= 17
    ref = ExactRun(net, cfg, 300)  # independent: Arb balls at 300 bits (midpoints compared)
    ref.record_initial()
    for rows in schedule:
        ref.step(rows)
    for balls, mps in zip(run.exact_params, ref.exact_params, strict=True):
        scale = max(abs(v) for k in mps for v in np.ravel(mps[k]))
        for k, ball in balls.items():
            mid = np.asarray(run.ar.to_float64(ball))
            ctx = mpmath.MPContext()
            ctx.prec = 300
            words = [ctx.mpf(float(w)) for w in np.ravel(ball.mid[0])]
            rest = [np.ravel(ball.mid[i]) for i in range(1, ball.mid.shape[0])]
            for j, value in enumerate(np.ravel(mps[k])):
                center = words[j] + sum(ctx.mpf(float(r[j])) for r in rest)
                if center == 0 and np.ravel(ball.rad)[j] == 0 and value != 0:
                    # set to an exact zero: zero up to noise below 2^-75 of the largest value
                    assert abs(value) <= scale * ctx.mpf(2) ** -75, (k, j)
                    continue
                assert (
                    abs(center - value)
                    <= ctx.mpf(float(np.ravel(ball.rad)[j])) * (1 + ctx.mpf(2) ** -50)
                    + abs(value) * ctx.mpf(2) ** -250
                ), (k, j)
            assert mid.shape == np.shape(mps[k])


def test_out_of_range_values_fall_back_to_arb() -> None:
    # a weight of 2^-500 times an input of 2^-500: 2^-1000 is outside the balls' range
    net = net_from(
        [{"type": "dense", "out": 1, "weight": [[2.0**-500]], "bias": False}],
        "mse",
        [[2.0**-500]],
        [[1.0]],
    )
    r = train(net, 2, OptimConfig(lr=0.1), runs="float32", perturb=False)
    assert r.config["exact_method"] == "arb" and r.exact_certified_digits >= 17
    with pytest.raises(InputError, match="use --exact-method arb"):
        train(net, 2, OptimConfig(lr=0.1), runs="float32", exact_method="fast")
    fast = train(net_from(*_small()), 3, runs="float16", perturb=False)
    slow = train(net_from(*_small()), 3, runs="float16", perturb=False, exact_method="arb")
    assert fast.config["exact_method"] == "fast" and slow.config["exact_method"] == "arb"
    assert fast.exact.loss == slow.exact.loss and fast.exact.params[-1].tolist() == pytest.approx(
        slow.exact.params[-1].tolist(), rel=1e-15
    )
    assert "ball arithmetic at 150 bits" in fast.render()


def _small() -> tuple:
    layers, loss, y = NETS["tanh_mse"]
    return layers, loss, X, y


def test_fallback_names_its_step_and_reason(capsys: pytest.CaptureFixture[str]) -> None:
    # a hidden unit whose pre-activation is exactly 0 for one sample: its ReLU branch is
    # undecided in balls at step 1, so auto recomputes in Arb balls and says where and why
    net = net_from(
        [
            {"type": "dense", "weight": [[1.0, -1.0], [0.5, 0.25]], "bias": [0.0, 0.1]},
            {"type": "relu"},
            {"type": "dense", "weight": [[1.0, -2.0]], "bias": [0.0]},
        ],
        "mse",
        [[0.5, 0.5], [1.0, -1.0]],
        [[0.3], [0.1]],
    )
    schedule = batch_schedule(2, 3, None, 0)
    run, _, method = exact_trajectory(net, OptimConfig(lr=0.1), schedule, 64)
    assert method == "arb"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "recomputing in Arb balls" in err and "step 1" in err, err
    assert run.fallback and run.fallback in err
    result = train(net, steps=3, cfg=OptimConfig(lr=0.1), runs="float32", exact_bits=64)
    assert result.notes[0] == run.fallback and run.fallback in capsys.readouterr().err
    arb, _, method = exact_trajectory(net, OptimConfig(lr=0.1), schedule, 64, "arb")
    assert method == "arb" and arb.fallback is None and capsys.readouterr().err == ""


def test_balls_stop_at_the_first_step_below_17_digits(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # digits sink below 17 at step 3 (the radii are inflated there): auto stops the ball run
    # at step 3, not at the end of the schedule, and names that step
    layers, loss, y = NETS["tanh_mse"]
    net = net_from(layers, loss, X, y, seed=3)
    real_step = ExactRun.step

    def step(self: ExactRun, rows: np.ndarray) -> None:
        real_step(self, rows)
        if self.ar.name.startswith("ball") and len(self.history.loss) == 3:
            for ball in self.params.values():
                ball.rad[...] = np.abs(ball.mid[0]) * 1e-12  # 12 digits
        if self.ar.name.startswith("ball"):
            taken.append(len(self.history.loss))

    taken: list[int] = []
    monkeypatch.setattr(ExactRun, "step", step)
    _, _, method = exact_trajectory(net, OptimConfig(lr=0.1), batch_schedule(6, 8, 4, 1), 128)
    assert method == "arb" and taken == [1, 2, 3]
    err = capsys.readouterr().err
    assert "step 3: 12.0 certified digits" in err, err


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_kept_powers_give_the_same_balls(opt: str) -> None:
    # the bias corrections resume beta**t from the last step's power: the same products in
    # the same order as t products from 1 every step, so every ball is bit-identical
    layers, loss, y = NETS["tanh_mse"]
    net = net_from(layers, loss, X, y, seed=3)
    schedule = batch_schedule(6, 6, 4, seed=1)
    kept, fresh = (ExactRun(net, OPTIMIZERS[opt], 150, balls=True) for _ in range(2))
    fresh.opt._keep_powers = False
    for rows in schedule:
        kept.step(rows)
        fresh.step(rows)
        for k in kept.params:
            assert np.array_equal(kept.params[k].mid, fresh.params[k].mid)
            assert np.array_equal(kept.params[k].rad, fresh.params[k].rad)
    assert kept.opt._powers and not fresh.opt._powers


def test_arb_precision_forecast_keeps_17_digits_with_margin() -> None:
    cap = DEFAULT_MAX_BITS
    for rate, steps in [(0.0, 10), (0.21, 1000), (0.5, 300), (3.0, 8), (0.13, 1000)]:
        bits = arb_bits_for(rate, steps, cap)
        assert bits % 64 == 0 and ARB_START_BITS <= bits <= cap
        # the forecast leaves 10 digits and a quarter of the expected loss above 17
        assert bits * math.log10(2) >= 17 + 10 + 1.25 * rate * steps
        assert bits == ARB_START_BITS or (bits - 64) * math.log10(2) < 27 + 1.25 * rate * steps
    assert arb_bits_for(10.0, 1000, 2048) == 2048  # capped


@pytest.mark.parametrize(
    ("name", "opt"), [("tanh_mse", OptimConfig(name="adam", lr=0.1)), ("leaky_softmax_ce", _adam)]
)
def test_digit_loss_fallback_encloses_a_2000_bit_mpmath_trajectory(
    name: str, opt: OptimConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    # Adam's balls lose digits step by step and fall below 17 (step 74, step 89): auto says
    # where, how fast and which radii, and recomputes in Arb balls at the forecast precision;
    # those balls enclose an independent mpmath trajectory at 2000 bits at every step
    layers, loss, y = NETS[name]
    net = net_from(layers, loss, X, y, seed=3)
    schedule = batch_schedule(6, 150, 4, seed=1)
    run, digits, method = exact_trajectory(net, opt, schedule, 128)
    err = capsys.readouterr().err
    found = re.search(
        r"\(step (\d+): ([\d.]+) certified digits, ([\d.]+) lost per step; widest relative "
        r"radii: gradient .*, m .*, v .*, update .*, parameters [\d.e+-]+ \(.*\)\); recomputing "
        r"in Arb balls at (\d+) bits\n$",
        err,
    )
    assert found and err.count("\n") == 1, err
    step, low, rate, bits = (float(g) for g in found.groups())
    assert 17 >= low and 1 < step < 150  # low: printed to 0.1 digit
    assert run.bits == bits and method == "arb" and digits >= 17
    assert abs(bits - arb_bits_for(rate, 150, DEFAULT_MAX_BITS)) <= 64
    _assert_encloses_mpmath(run, net, opt, schedule)


def test_an_arb_run_below_17_digits_is_redone_at_more_bits(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a forecast that is too low (always 256 bits): the Arb run loses its digits before the
    # end, stops at a checked step and is redone at more bits, which certify >= 17
    import fpgrad.training.exact_run as train_mod

    layers, loss, y = NETS["tanh_mse"]
    net = net_from(layers, loss, X, y, seed=3)
    monkeypatch.setattr(train_mod, "arb_bits_for", lambda rate, steps, cap: ARB_START_BITS)
    seen: list[tuple[int, int]] = []
    real_step = ExactRun.step

    def step(self: ExactRun, rows: np.ndarray) -> None:
        real_step(self, rows)
        seen.append((self.bits, len(self.history.loss)))

    monkeypatch.setattr(ExactRun, "step", step)
    opt = OptimConfig(name="adam", lr=0.1)
    run, digits, method = exact_trajectory(net, opt, batch_schedule(6, 250, 4, 1), 128)
    tried = sorted({bits for bits, _ in seen if bits >= ARB_START_BITS})
    assert method == "arb" and digits >= 17 and len(tried) >= 2 and run.bits == tried[-1]
    assert tried == [ARB_START_BITS * 2**i for i in range(len(tried))]  # x2 each time
    for bits in tried[:-1]:  # each stopped early, at a checked step
        last = max(t for b, t in seen if b == bits)
        assert last < 250 and last % 10 == 0, (bits, last)
    assert f"at {ARB_START_BITS} bits" in capsys.readouterr().err


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_adaptive_arb_run_encloses_a_2000_bit_mpmath_trajectory(opt: str) -> None:
    # an Arb run told its horizon lowers its working precision as the radii grow and the
    # remaining steps shrink (working_bits); its balls still enclose an independent mpmath
    # trajectory at 2000 bits at every step, and certify >= 17 digits throughout
    layers, loss, y = NETS["leaky_softmax_ce"]  # cross-entropy: the softmax reuse too
    net = net_from(layers, loss, X, y, seed=3)
    cfg = OPTIMIZERS[opt]
    schedule = batch_schedule(6, 60, 4, seed=1)
    run = ExactRun(net, cfg, 512)
    run.horizon = len(schedule)
    run.record_initial()
    used = []
    for rows in schedule:
        run.step(rows)
        used.append(run.ar.prec)
    assert used[0] == 512 and min(used) < 320 and run.ball_digits() >= 17, used
    _assert_encloses_mpmath(run, net, cfg, schedule)


def test_working_bits_follow_the_accuracy_and_the_steps_left() -> None:
    # exact parameters: the full precision; then ARB_MARGIN_BITS above the least accurate one
    # (exact and sign-undecided balls left out); with a horizon, outside the probes no more
    # than the forecast for the steps left at the median rate of the last three probes
    from flint import arb

    from fpgrad.training.exact_run import ARB_MARGIN_BITS, ARB_RATE_STEPS, _forecast_bits

    layers, loss, y = NETS["tanh_mse"]
    net = net_from(layers, loss, X, y, seed=3)
    run = ExactRun(net, OptimConfig(lr=0.1), 1024)
    assert run.working_bits() == 1024
    key = next(iter(run.params))
    vals = np.asarray(run.params[key]).copy()
    run.params[key] = vals

    def at(done: int, bits: int) -> int:  # working_bits after ``done`` steps, at ``bits``
        vals.flat[0] = arb(1, 2.0**-bits)
        run.history.loss = [0.0] * done
        return run.working_bits()

    vals.flat[1] = arb(0, 1.0)  # contains 0: left out
    assert abs(at(0, 300) - (300 + ARB_MARGIN_BITS)) <= 2
    run.horizon, run._accuracy = 100, [(1, 600)]
    assert abs(at(10, 573) - (573 + ARB_MARGIN_BITS)) <= 2  # the first probe: no forecast
    # its end: 3 bits (0.9 digits) lost per step since its step 10 (steps 1-4 left out), 80
    # steps left
    got = at(ARB_RATE_STEPS, 600 - 3 * (ARB_RATE_STEPS - 1))
    assert run._rate is not None and abs(run._rate - 3 * math.log10(2)) < 0.02
    assert got == _forecast_bits(run._rate, 100 - ARB_RATE_STEPS) < 543
    assert abs(at(45, 400) - (400 + ARB_MARGIN_BITS)) <= 2  # the next probe (steps 40-59)
    # its end: 33 bits from its step 5 (0.66 digits per step); the median of 0.9, 0.7, 0.66
    run._rates, run._accuracy = [0.9, 0.7], [(44, 510), (45, 500)]
    got = at(60, 467)
    assert abs(run._rates[-1] - 33 * math.log10(2) / 15) < 0.05 and run._rate == 0.7  # +-1 bit
    assert got == _forecast_bits(0.7, 40)


def _assert_encloses_mpmath(
    run: ExactRun, net: Network, cfg: OptimConfig, schedule: list[np.ndarray]
) -> None:
    """Every Arb ball of ``run`` at every step encloses an independent trajectory of the same
    optimizer in mpmath at 2000 bits (rounded, no balls)."""
    mp = MPArith(2000)
    params = {k: mp.asarray(v) for k, v in net.params.items()}
    mp_opt, trail = ArithOptimizer(mp, params, cfg), [params]
    for rows in schedule:
        params = mp_opt.step(params, evaluate(net, mp, params, rows).grads)
        trail.append(params)
    ctx = mp.ctx
    for balls, mps in zip(run.exact_params, trail, strict=True):
        for k, values in balls.items():
            for ball, value in zip(np.ravel(values), np.ravel(mps[k]), strict=True):
                mid, rad = (ctx.mpf(tuple(map(int, x.man_exp()))) for x in (ball.mid(), ball.rad()))
                assert abs(mid - value) <= rad + abs(value) * ctx.mpf(2) ** -1900, (k, mid, value)
