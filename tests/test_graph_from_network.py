"""Layer networks compiled to torch modules (:func:`fpgrad.graph.from_network.from_network`)
against the per-layer path, on the shipped example, gallery networks and random networks.

(a) native columns: loss, every gradient and every layer value bit for bit (sign of zero
included) against :func:`fpgrad.run.torch_native.torch_trace`, float16/bfloat16/float32/float64;
(b) exact reference: the certified balls of the two paths overlap everywhere, and every zero
one path proves is consistent with the other (the structural zero of a dense bias feeding
training-mode batch norm is proven on the layer path only: undetermined on the graph path);
(c) ``compare`` verdict counts per precision identical; (d) emulated formats: identical values
(both paths round torch's kernels' operations), and the one known difference (training batch
norm backward) pinned to the first layer value where they part.
"""

from __future__ import annotations

from collections import Counter
from functools import cache
from typing import Any

import mpmath
import numpy as np
import pytest

from fpgrad.diagnose.comparison import compare
from fpgrad.errors import InputError
from fpgrad.graph.compare import compare_graph, compare_graph_path
from fpgrad.graph.exact import exact_graph
from fpgrad.graph.from_network import from_network
from fpgrad.graph.interpret import interpret
from fpgrad.graph.layers import exact_trace
from fpgrad.graph.native import native_run
from fpgrad.graph.network import GraphNetwork
from fpgrad.graph.precisions import emulated_systems, parse_precisions
from fpgrad.model.netfile import load_network
from fpgrad.model.network import Network
from fpgrad.run.evaluate import Trace
from fpgrad.run.torch_native import torch_trace
from tests.nets import net_from

NATIVE = ("float16", "bfloat16", "float32", "float64")
EMULATED = ("fp8_e4m3", "bfloat16:emulated")
SHOWCASE = "fpgrad/examples/showcase.toml"


def _random(seed: int, kinds: list[str | None], loss: str, class_targets: bool = False) -> Network:
    """dense layers (weights in [-1, 1], biases in [-2, 1]: some ReLU units die), each followed
    by the layer kind given (None: none); batch 2-4, widths 2-3."""
    rng = np.random.default_rng(seed)
    batch, width = int(rng.integers(2, 5)), int(rng.integers(1, 4))
    x = rng.normal(0, 1, (batch, width))
    layers: list[dict[str, Any]] = []
    for kind in kinds:
        out = int(rng.integers(2, 4))
        w = rng.uniform(-1, 1, (out, width)).tolist()
        layers.append({"type": "dense", "weight": w, "bias": rng.uniform(-2, 1, out).tolist()})
        if kind == "batch_norm_eval":
            layers.append(
                {"type": kind, "running_mean": rng.normal(0, 1, out).tolist(),
                 "running_var": rng.uniform(0.1, 2, out).tolist(),
                 "weight": rng.uniform(0.5, 2, out).tolist(), "bias": rng.normal(0, 1, out).tolist()}
            )  # fmt: skip
        elif kind == "batch_norm":
            layers.append(
                {"type": kind, "weight": rng.uniform(0.5, 2, out).tolist(),
                 "bias": rng.normal(0, 1, out).tolist()}
            )  # fmt: skip
        elif kind == "leaky_relu":
            layers.append({"type": kind, "slope": 0.125})
        elif kind is not None:
            layers.append({"type": kind})
        width = out
    if class_targets:
        y: Any = rng.integers(0, width, batch).tolist()
    elif loss in ("cross_entropy", "bce"):
        y = rng.uniform(0, 1, (batch, width)).tolist()
    else:
        y = rng.normal(0, 1, (batch, width)).tolist()
    return net_from(layers, loss, x.tolist(), y, seed=seed)


#: name -> network; every layer kind and loss form (class and soft targets) appears
BUILDERS = {
    "showcase": lambda: load_network(SHOWCASE),
    "relu-ce-class": lambda: _random(37, ["relu"], "cross_entropy", True),
    "tanh-sigmoid-ce-class": lambda: _random(13, ["tanh", "sigmoid"], "cross_entropy", True),
    "relu-sigmoid-bce": lambda: _random(20, ["relu", "sigmoid"], "bce"),
    "softmax-bce": lambda: _random(8, ["softmax"], "bce"),
    "leaky-bce": lambda: _random(5, ["leaky_relu"], "bce"),
    "eval-bn-ce": lambda: _random(
        10, [None, "batch_norm_eval", "batch_norm_eval"], "cross_entropy"
    ),
    "eval-bn-mse": lambda: _random(18, ["batch_norm_eval", "batch_norm_eval"], "mse"),
    "relu-ce-soft": lambda: _random(34, ["relu"], "cross_entropy"),
    "tanh-sigmoid-mse": lambda: _random(0, ["tanh", "sigmoid"], "mse"),
    "ce-class-plain": lambda: _random(4, [None], "cross_entropy", True),
    "bn-ce-class": lambda: _random(1, ["batch_norm"], "cross_entropy", True),
    "tanh-bn-leaky-mse": lambda: _random(27, ["tanh", "batch_norm", "leaky_relu"], "mse"),
    "bn-mse": lambda: _random(3, ["batch_norm"], "mse"),
    "bce-batch3": lambda: _random(6, [None], "bce"),
}


@cache
def _net(name: str) -> Network:
    return BUILDERS[name]()  # type: ignore[no-untyped-call]


@cache
def _graph(name: str) -> GraphNetwork:
    return from_network(_net(name))


def _same_bits(a: Any, b: Any) -> np.ndarray:
    """Elementwise: equal values with the same sign bit, or both NaN."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    return both_nan | ((a == b) & (np.signbit(a) == np.signbit(b)))


def _layer_values(trace: Trace, net: Network) -> list[tuple[str, np.ndarray]]:
    """The layer path's layer values, forward from the input then backward from the loss."""
    fwd = [(f"forward/{ly.name}", trace.forward[ly.name]) for ly in net.layers]
    bwd = [(f"backward/{ly.name}", trace.backward[ly.name]) for ly in reversed(net.layers)]
    return fwd + bwd


def _first_unmatched(
    trace: Trace, net: Network, values: list[np.ndarray], signed: bool = True
) -> str | None:
    """The first layer value (in evaluation order) that no graph value equals bit for bit
    (``signed=False``: as numbers, -0.0 == 0.0)."""
    for key, ref in _layer_values(trace, net):
        ref = np.asarray(ref, dtype=np.float64)
        same = _same_bits if signed else lambda a, b: np.isnan(a) & np.isnan(b) | (a == b)
        if not any(v.shape == ref.shape and same(v, ref).all() for v in values):
            return key
    return None


def _float_values(values: dict[str, Any], to64: Any = None) -> list[np.ndarray]:
    out = []
    for v in values.values():
        if to64 is not None:
            try:
                v = to64(v)
            except Exception:  # noqa: BLE001 - tuples, integer arrays: not layer values
                continue
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            out.append(v)
    return out


# ---- the compiled module --------------------------------------------------------------------


def test_parameters_keep_the_network_keys_and_ops_their_layer() -> None:
    net, g = _net("showcase"), _graph("showcase")
    assert g.param_names == list(net.params) == [
        "hidden.weight", "hidden.bias", "logits.weight", "logits.bias"
    ]  # fmt: skip
    for name in g.param_names:
        assert np.array_equal(g.graph.params[name], net.params[name])
    paths = {g.graph.paths[n.name] for n in g.graph.ops}
    assert paths == {"hidden", "act", "logits", ""}  # "": the loss
    assert g.name == net.name


@pytest.mark.parametrize("name", ["a.b", "forward", "training", "names"])
def test_a_name_torch_cannot_take_is_one_line(name: str) -> None:
    net = net_from([{"type": "dense", "name": name, "out": 2}], "mse", [[1.0]], [[0.0, 1.0]])
    with pytest.raises(InputError, match=rf"layer '{name}'.*rename the layer"):
        from_network(net)


def test_training_batch_norm_on_one_sample_is_refused_as_on_the_layer_path() -> None:
    net = net_from(
        [{"type": "dense", "out": 2, "bias": False}, {"type": "batch_norm"}],
        "mse", [[1.0]], [[0.0, 1.0]],
    )  # fmt: skip
    with pytest.raises(InputError, match="needs at least 2 samples") as graph_err:
        from_network(net)
    with pytest.raises(InputError) as layer_err:
        torch_trace(net, "float32")
    assert str(graph_err.value) == str(layer_err.value)


# ---- (a) native columns bit for bit ---------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_native_columns_are_bit_identical(name: str) -> None:
    net, g = _net(name), _graph(name)
    for p in NATIVE:
        graph_run, layer_run = native_run(g.graph, p), torch_trace(net, p)
        assert _same_bits(graph_run.loss, layer_run.loss).all(), (name, p)
        for k in net.params:
            assert _same_bits(graph_run.grads[k], layer_run.grads[k]).all(), (name, p, k)
        # every forward and backward layer value is one of the graph's op outputs
        assert _first_unmatched(layer_run, net, _float_values(graph_run.values)) is None, (name, p)


@pytest.mark.parametrize("name", ["dead_relu", "fp8_formats", "deep_sigmoid_vanishing"])
def test_native_columns_of_gallery_networks(name: str) -> None:
    import importlib

    mod = importlib.import_module(f"fpgrad.scenarios.{name}")
    net = (
        mod.network("sigmoid", "xavier_normal", 3, 3) if name.startswith("deep") else mod.network()
    )
    g = from_network(net)
    for p in NATIVE:
        graph_run, layer_run = native_run(g.graph, p, keep=False), torch_trace(net, p)
        assert _same_bits(graph_run.loss, layer_run.loss).all(), p
        assert all(_same_bits(graph_run.grads[k], layer_run.grads[k]).all() for k in net.params)


# ---- (b) the exact reference ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_exact_references_agree(name: str) -> None:
    net, g = _net(name), _graph(name)
    layer, graph = exact_trace(net), exact_graph(g.graph).result
    for key in ["loss", *(f"grads/{k}" for k in net.params)]:
        lz, gz = layer.zero(key), graph.zero(key)
        # a zero either path proves lies in the other's ball
        (lm, lr), (gm, gr) = layer.enclosure(key), graph.enclosure(key)
        lm, gm = np.asarray(lm, dtype=object).ravel(), np.asarray(gm, dtype=object).ravel()
        lr, gr = np.ravel(lr), np.ravel(gr)
        for i in range(lm.size):
            gap = abs(mpmath.mpf(lm[i]) - mpmath.mpf(gm[i]))
            assert gap <= mpmath.mpf(float(lr[i])) + mpmath.mpf(float(gr[i])), (name, key, i)
        # the same zeros proven (the bias feeding training batch norm: by the layer path's
        # structural identity and by fpgrad/graph/identities.py)
        assert np.array_equal(lz, gz), (name, key)
        assert np.array_equal(layer.undetermined(key), graph.undetermined(key)), (name, key)


# ---- (c) compare verdict counts -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "precisions"),
    [
        ("showcase", (*NATIVE, *EMULATED)),
        ("relu-sigmoid-bce", (*NATIVE, *EMULATED)),
        ("eval-bn-ce", NATIVE),
        ("tanh-sigmoid-mse", NATIVE),
        ("ce-class-plain", NATIVE),
    ],
)
def test_compare_verdict_counts_are_identical(name: str, precisions: tuple[str, ...]) -> None:
    net = _net(name)
    spec = ",".join(precisions)
    layer = compare(net, spec, findings=False)
    graph = compare_graph(_graph(name), spec)
    assert graph.precisions == layer.precisions
    for p in layer.precisions:
        # the layer summary adds rounding-zero subkind counts; GraphComparison.counts has
        # the verdicts only: the subkinds are counted from its per-element verdicts
        sub = Counter(
            f"rounding_zero_{k}"
            for v in graph.verdicts[p].values()
            for k in v.subkind.astype(str).ravel()
            if k
        )
        subkinds = {k: sub[k] for k in layer.summary[p] if k.startswith("rounding_zero_")}
        assert {**graph.counts(p), **subkinds} == layer.summary[p], (name, p)


@pytest.mark.parametrize("name", ["bn-mse", "tanh-bn-leaky-mse"])
def test_verdicts_of_a_bias_before_batch_norm_agree_element_by_element(name: str) -> None:
    """The dense bias feeding training-mode batch norm: a proven zero on both paths, so its
    verdicts (structural zero or spurious nonzero) agree too, element by element."""
    net = _net(name)
    layer, graph = (
        compare(net, ",".join(NATIVE), findings=False),
        compare_graph(_graph(name), ",".join(NATIVE)),
    )
    for p in layer.precisions:
        for k in net.params:
            assert graph.verdicts[p][k].verdict.astype(str).ravel().tolist() == layer.verdicts(
                k, p
            ), (p, k)
    before = [a for a, b in zip(net.layers, net.layers[1:], strict=False) if b.kind == "batch_norm"]
    bias = f"{before[0].name}.bias"
    assert set(layer.verdicts(bias, "float64")) <= {"structural_zero", "spurious_nonzero"}


@pytest.mark.parametrize("name", ["dead_relu", "fp8_formats", "fp16_gradient_underflow"])
def test_gallery_verdict_counts_are_identical(name: str) -> None:
    import importlib

    net = importlib.import_module(f"fpgrad.scenarios.{name}").network()
    spec = ",".join((*NATIVE, *EMULATED))
    layer, graph = compare(net, spec, findings=False), compare_graph_path(net, spec)
    for p in layer.precisions:
        counts = graph.counts(p)
        assert counts == {k: n for k, n in layer.summary[p].items() if k in counts}, (name, p)


def test_where_the_signal_died_is_per_layer_against_per_op() -> None:
    """Recorded difference: the showcase in float16. The layer path names the first layer
    place with rounding zeros (the loss backward into the logits); the graph path the first
    aten op computing 0 where the exact value is not (the loss's log-softmax forward)."""
    net = _net("showcase")
    layer = compare(net, "float16", findings=False).attribution["float16"]
    first = layer["first_rounding_zero_backward"]
    assert (first["layer"], first["op"]) == ("logits", "loss backward (cross_entropy)")
    graph = compare_graph(_graph("showcase"), "float16").first_lost["float16"]
    assert graph is not None and graph.startswith("<top> (aten._log_softmax)")


@pytest.mark.parametrize("name", ["showcase", "eval-bn-mse"])
@pytest.mark.parametrize("kwargs", [{"loss_scale": 1024.0}, {"reference": "rounded"}])
def test_loss_scale_and_rounded_reference_verdicts_are_identical(
    name: str, kwargs: dict[str, Any]
) -> None:
    net, spec = _net(name), "float16,bfloat16"
    layer = compare(net, spec, findings=False, **kwargs)
    graph = compare_graph_path(net, spec, **kwargs)
    for p in layer.precisions:
        counts = graph.counts(p)
        assert counts == {k: n for k, n in layer.summary[p].items() if k in counts}, (name, p)


def test_autocast_policy_same_gradients_judged_in_other_formats() -> None:
    """Recorded difference: under the autocast policy both paths compute the same gradients,
    bit for bit; the layer path judges them in float32 (the parameters' master format), the
    graph path in float16 (the dtype torch's matmul computed them in): the counts differ."""
    net = _net("showcase")
    layer = compare(net, "autocast", findings=False)
    graph = compare_graph_path(net, "autocast")
    for k in net.params:
        assert _same_bits(layer.column(k).cols["autocast"].value, graph.grads["autocast"][k]).all()
    counts = graph.counts("autocast")
    assert counts != {k: n for k, n in layer.summary["autocast"].items() if k in counts}


def test_compare_graph_path_switch_runs_the_compiled_network() -> None:
    net = _net("showcase")
    c = compare_graph_path(net, "float16,float32")
    assert c.network == net.name and sorted(c.grads["float16"]) == sorted(net.params)
    layer = compare(net, "float16,float32", findings=False)
    assert all(
        c.counts("float16")[k] == n
        for k, n in layer.summary["float16"].items()
        if k in c.counts("float16")
    )
    assert c.counts("float16")["rounding_zero"] > 0  # the showcase's float16 underflow


# ---- (d) emulated formats -------------------------------------------------------------------


def _emulated(net: Network, g: GraphNetwork, name: str) -> tuple[Trace, Any, Any]:
    p = parse_precisions(name)[0]
    ar = emulated_systems()(p.name)
    return p.run(net, 1.0), interpret(g.graph, ar), ar


#: every network: the emulated columns of both paths round torch's own formulas (the loss
#: backward included: MSE's round(2/N) * r, cross-entropy's nll_loss_backward then
#: _log_softmax_backward_data, BCE's (1 - t) z - log_sigmoid(z))
IDENTICAL_EMULATED = [name for name in BUILDERS if name != "bn-ce-class"]


@pytest.mark.parametrize("name", IDENTICAL_EMULATED)
def test_emulated_values_are_identical(name: str) -> None:
    """Loss, every gradient bit for bit (sign of zero included), and every layer value of
    the layer path is a value of the graph's interpretation."""
    net, g = _net(name), _graph(name)
    for p in EMULATED:
        layer, graph, ar = _emulated(net, g, p)
        assert _same_bits(ar.to_float64(graph.loss), layer.loss).all(), (name, p)
        for k in net.params:
            assert _same_bits(ar.to_float64(graph.grads[k]), layer.grads[k]).all(), (name, p, k)
        values = _float_values(graph.values, ar.to_float64)
        assert _first_unmatched(layer, net, values) is None, (name, p)


def _eval_bn(affine: bool, bias: bool) -> Network:
    layer: dict[str, Any] = {"type": "batch_norm_eval", "running_mean": [0.5, -1.0],
                             "running_var": [0.25, 3.0]}  # fmt: skip
    if not affine:
        layer |= {"weight": False, "bias": False}
    elif not bias:
        layer |= {"weight": [1.5, -0.75], "bias": False}
    x, y = (
        [[1.0, 2.0, -1.0], [0.5, -3.0, 2.0], [0.0, 1.0, 1.0]],
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
    )
    dense = {"type": "dense", "weight": [[0.5, -1.0, 0.25], [1.0, 0.125, -0.5]], "bias": False}
    return net_from([dense, layer, {"type": "tanh"}], "mse", x, y)


@pytest.mark.parametrize(("affine", "bias"), [(False, False), (True, False)])
def test_eval_batch_norm_without_weight_or_bias(affine: bool, bias: bool) -> None:
    net = _eval_bn(affine, bias)
    g = from_network(net)
    assert g.param_names == list(net.params)
    for p in NATIVE:
        graph_run, layer_run = native_run(g.graph, p, keep=False), torch_trace(net, p)
        assert _same_bits(graph_run.loss, layer_run.loss).all(), p
        assert all(_same_bits(graph_run.grads[k], layer_run.grads[k]).all() for k in net.params)


RANDOM_KINDS = ["relu", "leaky_relu", "tanh", "sigmoid", "softmax", "batch_norm_eval", None]


@pytest.mark.parametrize("seed", range(8))
def test_native_columns_of_random_stacks(seed: int) -> None:
    """1-3 dense layers, each followed by a random layer kind; a random loss form."""
    rng = np.random.default_rng(1000 + seed)
    kinds = [RANDOM_KINDS[int(i)] for i in rng.integers(0, len(RANDOM_KINDS), rng.integers(1, 4))]
    loss = ["mse", "cross_entropy", "bce"][seed % 3]
    net = _random(1000 + seed, kinds, loss, class_targets=loss == "cross_entropy" and seed % 2 == 1)
    g = from_network(net)
    for p in NATIVE:
        graph_run, layer_run = native_run(g.graph, p, keep=False), torch_trace(net, p)
        assert _same_bits(graph_run.loss, layer_run.loss).all(), (kinds, loss, p)
        for k in net.params:
            assert _same_bits(graph_run.grads[k], layer_run.grads[k]).all(), (kinds, loss, p, k)
