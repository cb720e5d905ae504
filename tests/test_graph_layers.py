"""Layer networks on the graph path (:mod:`fpgrad.graph.layers`): the tapped graph returns every
layer's output and dL/d(output), bit for bit those of torch's eager autograd per layer, and
the exact trace certifies them (checked against independent oracles in test_exact_oracle.py)."""

from __future__ import annotations

import numpy as np
import pytest

from fpgrad.errors import InputError
from fpgrad.graph.from_network import from_network
from fpgrad.graph.layers import evaluate, exact_trace, tapped
from fpgrad.graph.native import native_run
from fpgrad.model.netfile import load_network
from fpgrad.run.torch_native import torch_trace
from tests.nets import net_from


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and np.array_equal(a.view(np.int64), b.view(np.int64))


@pytest.mark.parametrize("precision", ["float16", "bfloat16", "float32"])
def test_taps_are_torchs_layer_values_bit_for_bit(precision: str) -> None:
    net = load_network("fpgrad/examples/showcase.toml")
    g = from_network(net, taps=True).graph
    plain = native_run(from_network(net).graph, precision, keep=False)
    run, ref = native_run(g, precision), torch_trace(net, precision)
    assert g.taps == [ly.name for ly in net.layers]
    for k in net.params:  # tapping changes no gradient
        assert _same(run.grads[k], plain.grads[k]) and _same(run.grads[k], ref.grads[k])
    for layer in g.taps:
        value, grad = run.taps[layer]
        assert _same(value, ref.forward[layer]), layer
        assert _same(grad, ref.backward[layer]), layer


def test_mini_batches_reuse_one_capture_per_batch_size() -> None:
    net = load_network("fpgrad/examples/showcase.toml")
    rows = np.arange(net.x.shape[0] // 2)
    first, again = tapped(net, rows), tapped(net, rows[::-1].copy())
    assert first.gm is again.gm  # captured once
    assert np.array_equal(again.inputs[0], net.x[rows[::-1]])
    from fpgrad.arith.ball import BallArith

    half = evaluate(net, BallArith(150), rows=rows)
    whole = exact_trace(net.with_data(net.x[rows], net.y[rows]))
    for k in net.params:
        assert np.array_equal(
            whole.exact_array(f"grads/{k}").hi, half.grads[k].mid[0]
        ) or np.allclose(
            whole.exact_array(f"grads/{k}").hi, half.grads[k].mid[0], rtol=1e-15, atol=0
        )


def test_training_batch_norm_on_one_sample_is_one_line() -> None:
    net = net_from(
        [{"type": "dense", "out": 2}, {"type": "batch_norm"}], "mse", [[1.0, 2.0]], [[0.0, 1.0]]
    )
    with pytest.raises(InputError, match="at least 2 samples"):
        exact_trace(net)
