"""Training in emulated formats (fp8 and any eXmY): hand-computed swamping, master weights,
stochastic rounding, loss scaling with unscaling in the low format or in float32."""

from __future__ import annotations

import numpy as np
import pytest

from fpgrad.errors import InputError
from fpgrad.numbers.rounding import round_to
from fpgrad.run.optim import OptimConfig
from fpgrad.training import train
from tests.nets import net_from


def square_net(w: float, x: float) -> object:
    """L = (w x)^2 on one sample (MSE against 0, no bias): dL/dw = 2 w x^2."""
    layer = {"type": "dense", "out": 1, "weight": [[w]], "bias": False}
    return net_from([layer], "mse", [[x]], [[0.0]])


def test_fp8_update_below_half_an_ulp_is_swamped_and_master_weights_keep_it() -> None:
    # w = 1, dL/dw = 2, lr = 2^-6: w - 2^-5 = 0.96875 is the midpoint of 0.9375 (mantissa
    # 111) and 1.0 (000) in fp8_e4m3: nearest-even keeps 1.0 forever.
    net = square_net(1.0, 1.0)
    r = train(net, 6, OptimConfig(lr=2.0**-6), runs="fp8_e4m3,fp8_e4m3+master", perturb=False)
    plain = r.histories["fp8_e4m3"]
    assert [p[0] for p in plain.params] == [1.0] * 7
    assert plain.swamped == [1] * 6 and plain.updated == [1] * 6
    assert r.detectors["fp8_e4m3"]["limit_cycle"]["period"] == 1
    # float32 master weights: 1 - 2^-5 (the low copy rounds back to 1.0, a tie), then the
    # gradient is still 2 and the master reaches 0.9375, which fp8 holds exactly; then
    # 0.9375 - 2 * 0.9375 * 2^-6 = 0.908203125
    master = r.histories["fp8_e4m3+master"]
    assert [p[0] for p in master.params[:4]] == [1.0, 0.96875, 0.9375, 0.908203125]
    assert master.swamped[:3] == [0, 0, 0]


def test_fp8_stochastic_rounding_moves_on_average() -> None:
    net = square_net(1.0, 1.0)
    r = train(net, 40, OptimConfig(lr=2.0**-6), runs="fp8_e4m3+sr", perturb=False, seed=3)
    w = [p[0] for p in r.histories["fp8_e4m3+sr"].params]
    assert w[-1] < 0.9  # nearest-even never leaves 1.0
    assert np.array_equal(round_to(np.array(w), "fp8_e4m3"), w)  # every value an fp8 value
    assert len(set(w)) > 3


def test_fp8_e5m2_loss_scale_needs_float32_unscaling() -> None:
    # y = 2^-4 * 2^-10 = 2^-14, dL/dy = 2^-13, dL/dw = 2^-23: below half the smallest e5m2
    # subnormal (2^-16). Scaled by 2^8 it is 2^-15 (representable); unscaling in e5m2 gives
    # 0 again, in float32 (+master) the exact 2^-23.
    net = square_net(2.0**-4, 2.0**-10)
    runs = "fp8_e5m2,fp8_e5m2+scale=256,fp8_e5m2+master+scale=256"
    r = train(net, 1, OptimConfig(lr=1.0), runs=runs, perturb=False)
    assert r.histories["fp8_e5m2"].verdicts[0].get("rounding_zero") == 1
    assert r.histories["fp8_e5m2+scale=256"].verdicts[0].get("rounding_zero") == 1
    assert r.histories["fp8_e5m2+master+scale=256"].verdicts[0] == {"ok": 1}
    assert r.histories["fp8_e5m2+master+scale=256"].params[1][0] == 2.0**-4 - 2.0**-23


def test_emulated_dynamic_scaling_skips_overflowing_steps() -> None:
    # GradScaler starts at 2^16: 2^16 * dL/dy overflows e5m7 (max 65280) at the first step
    net = square_net(1.0, 1.0)
    r = train(net, 3, OptimConfig(lr=2.0**-4), runs="e5m7+dynamic", perturb=False)
    h = r.histories["e5m7+dynamic"]
    assert h.skipped[0] and h.scale[:2] == [2.0**16, 2.0**15]
    assert r.detectors["e5m7+dynamic"]["first_overflow"]["step"] == 0


def test_emulated_run_refusals() -> None:
    net = square_net(1.0, 1.0)
    with pytest.raises(InputError, match="kahan is offered for torch runs only"):
        train(net, 1, runs="fp8_e4m3+kahan")
    with pytest.raises(InputError, match="unknown training precision 'fp9'"):
        train(net, 1, runs="fp9")
