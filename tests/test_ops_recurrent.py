"""Recurrent layers (fpgrad.graph.ops.recurrent): nn.RNN (tanh, relu), nn.LSTM, nn.GRU and
their cells.

(1) native float32/float64 (bfloat16 for the cells) columns equal torch eager autograd bit for
bit; (2) the certified exact reference against tests.oracle.recurrent (the recurrences written
from their definitions in mpmath, differentiated by central differences), with a saturated
gate (pre-activations of +-50) and a dead relu unit (an exact zero gradient); (3) the strict
machine (bfloat16:emulated) against fpgrad.round_to op by op on one GRU cell step; (4) the
in-place rule: a write into a piece of a split is accepted only for a fresh temporary.
"""

from __future__ import annotations

import copy
import functools
import operator
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.arith.emulated import EmulatedArith
from fpgrad.errors import InputError
from fpgrad.graph.exact import exact_graph
from fpgrad.graph.interpret import interpret
from fpgrad.graph.native import native_run
from tests.oracle import graph_reference as R
from tests.oracle import recurrent as O
from tests.oracle.graph_reference import CTX
from tests.test_graph_oracle import _claims

#: torch.backends.mkldnn.flags() notes oneDNN's TF32 flag on every use
pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")


class Seq(nn.Module):
    """A recurrent layer read at its last step, then a linear map to 2 outputs."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        width = rnn.hidden_size * (2 if rnn.bidirectional else 1)
        self.o = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x)[0]
        return self.o(out[:, -1] if self.rnn.batch_first else out[-1])


class Cell(nn.Module):
    """Two steps of a cell (the second from the first's state), then a linear map."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell
        self.o = nn.Linear(cell.hidden_size, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.cell(x[0])
        state = self.cell(x[1], state)
        return self.o(state[0] if isinstance(state, tuple) else state)


#: name -> (module, x shape, oracle kind, layer options)
LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str, dict[str, Any]]] = {
    "rnn_tanh": (lambda: nn.RNN(2, 3, batch_first=True), (2, 3, 2), "rnn_tanh",
                 {"batch_first": True}),
    "rnn_relu_2layers": (lambda: nn.RNN(2, 3, num_layers=2, nonlinearity="relu"), (3, 2, 2),
                         "rnn_relu", {"num_layers": 2}),
    "lstm": (lambda: nn.LSTM(2, 2, batch_first=True), (2, 3, 2), "lstm", {"batch_first": True}),
    "lstm_bidirectional": (lambda: nn.LSTM(2, 2, bidirectional=True), (2, 2, 2), "lstm",
                           {"bidirectional": True}),
    "gru": (lambda: nn.GRU(2, 3), (3, 2, 2), "gru", {}),
    "gru_2layers_batch_first": (lambda: nn.GRU(2, 2, num_layers=2, batch_first=True),
                                (2, 2, 2), "gru", {"num_layers": 2, "batch_first": True}),
}  # fmt: skip
CELLS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "rnn_cell_tanh": (lambda: nn.RNNCell(2, 3), "rnn_tanh"),
    "rnn_cell_relu": (lambda: nn.RNNCell(2, 3, nonlinearity="relu"), "rnn_relu"),
    "lstm_cell": (lambda: nn.LSTMCell(2, 3), "lstm"),
    "gru_cell": (lambda: nn.GRUCell(2, 3), "gru"),
}


def _layer_oracle(kind: str, hidden: int, opts: dict[str, Any]) -> Callable:
    def forward(p: dict, x: np.ndarray, t: np.ndarray) -> Any:
        sub = {k.removeprefix("rnn."): v for k, v in p.items() if k.startswith("rnn.")}
        out = O.layers(kind, sub, x, hidden, **opts)
        last = out[:, -1] if opts.get("batch_first") else out[-1]
        return R.mse(R.linear(last, p["o.weight"], p["o.bias"]), t)

    return forward


def _cell_oracle(kind: str) -> Callable:
    def forward(p: dict, x: np.ndarray, t: np.ndarray) -> Any:
        sub = {k.removeprefix("cell.") + "_": v for k, v in p.items() if k.startswith("cell.")}
        h = np.full((x.shape[1], p["cell.weight_hh"].shape[1]), CTX.mpf(0), dtype=object)
        c = h.copy() if kind == "lstm" else None
        for step in (0, 1):
            h, c = O.cell(kind, sub, "_", x[step], h, c)
        return R.mse(R.linear(h, p["o.weight"], p["o.bias"]), t)

    return forward


def _model(case: str) -> tuple[nn.Module, torch.Tensor, Callable]:
    torch.manual_seed(7)
    if case in LAYERS:
        make, shape, kind, opts = LAYERS[case]
        rnn = make()
        model: nn.Module = Seq(rnn)
        return model, torch.randn(shape), _layer_oracle(kind, rnn.hidden_size, opts)
    make_cell, kind = CELLS[case]
    model = Cell(make_cell())
    return model, torch.randn(2, 2, 2), _cell_oracle(kind)


ALL = sorted(LAYERS) + sorted(CELLS)


@functools.cache
def _captured(case: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable, Any]:
    """(model, x, y, oracle, net): one capture per case for both tests (time)."""
    model, x, oracle = _model(case)
    y = torch.randn(model(x).shape)
    return model, x, y, oracle, fpgrad.from_module(model, x, y, nn.MSELoss())


def _check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, oracle: Callable, net: Any) -> Any:
    """tests.test_graph_oracle.check on a captured net: every claim of the certified loss and
    gradients holds for the oracle (central differences at 120 digits)."""
    ex = exact_graph(net.graph).result
    assert ex.certified_digits >= 17 and ex.undetermined_count == 0
    params = {n: R.mp(p) for n, p in model.named_parameters()}
    value, grads = R.gradients(lambda p: oracle(p, R.mp(x), R.mp(y)), params)
    scale = max([CTX.mpf(1), abs(value)] + [abs(v) for g in grads.values() for v in g.ravel()])
    err = R.REL_ERR * scale
    _claims(ex, "loss", np.array(value, dtype=object).reshape(()), err)
    for name, g in grads.items():
        _claims(ex, f"grads/{name}", g, err)
    return ex


@pytest.mark.parametrize("case", ALL)
def test_exact_reference_against_the_oracle(case: str) -> None:
    _check(*_captured(case))


def _same(a: Any, b: Any) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and np.array_equal(a.view(np.int64), b.view(np.int64))


def _eager(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> Any:
    m = copy.deepcopy(model).to(dtype)
    loss = nn.MSELoss()(m(x.to(dtype)), y.to(dtype))
    loss.backward()
    return loss, dict(m.named_parameters())


@pytest.mark.parametrize("case", ALL)
def test_native_columns_are_torch_eager_bit_for_bit(case: str) -> None:
    """float32 nn.LSTM runs oneDNN's fused kernel on CPU: compared with oneDNN off (torch then
    runs the cell's ops, the graph's); with it on the native column is refused (below)."""
    model, x, y, _, net = _captured(case)
    dtypes = [(torch.float32, "float32"), (torch.float64, "float64")]
    if case in CELLS or case.startswith("gru"):
        dtypes.append((torch.bfloat16, "bfloat16"))
    with torch.backends.mkldnn.flags(enabled=False):
        for dtype, name in dtypes:
            loss, params = _eager(model, x, y, dtype)
            run = native_run(net.graph, name)
            assert _same(run.loss, loss.detach().double().numpy()), name
            for pname, p in params.items():
                assert _same(run.grads[pname], p.grad.double().numpy()), (name, pname)


def test_float32_lstm_on_onednn_is_torch_without_op_values() -> None:
    """torch runs float32 nn.LSTM on CPU through oneDNN's fused mkldnn_rnn_layer, whose ops
    the float64 trace does not hold: the native column is still torch's loss and gradients,
    bit for bit, without op-by-op values (a note says so); the ops' alignment names oneDNN."""
    from fpgrad.graph.capture import OpRecorder, align, joint_function

    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN: float32 LSTM runs the graph's ops")
    model, x, y, _, net = _captured("lstm_bidirectional")
    loss, params = _eager(model, x, y, torch.float32)
    run = native_run(net.graph, "float32")
    assert run.fused and run.values == {}
    assert _same(run.loss, loss.detach().double().numpy())
    for pname, p in params.items():
        assert _same(run.grads[pname], p.grad.double().numpy()), pname
    result = fpgrad.compare(net, "float32,bfloat16:emulated")
    assert any("oneDNN" in n for n in result.notes)
    assert result.counts("float32")["ok"] > 0
    m = copy.deepcopy(model).float()
    rec = OpRecorder()
    with rec:
        joint_function(m, [n for n, _ in m.named_parameters()], nn.MSELoss())(
            [p.detach().clone().requires_grad_() for p in m.parameters()], x, y
        )
    with pytest.raises(InputError, match="mkldnn_rnn_layer"):
        align([n for n in net.graph.ops if n.target is not operator.getitem], rec.records)


class _DtypeLSTM(Seq):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * 2 if x.dtype == torch.float32 else x)


def test_lstm_forward_that_depends_on_its_dtype_is_still_refused() -> None:
    """The oneDNN exception holds only where the run with oneDNN off is the graph op for op."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    torch.manual_seed(2)
    model, x = _DtypeLSTM(nn.LSTM(2, 2, batch_first=True)), torch.randn(2, 3, 2)
    net = fpgrad.from_module(model, x, torch.randn(2, 2), nn.MSELoss())
    with pytest.raises(InputError, match="diverges"):
        native_run(net.graph, "float32")


# ---- corners ------------------------------------------------------------------------------
def test_saturated_gates_keep_their_digits() -> None:
    """LSTM and GRU cells whose gates see pre-activations of +-50: sigmoid'(50) = 1.9e-22 is
    taken from z (s(z) s(-z)), not 1 - s, so the fast balls suffice (with 1 - s they escalate
    to Arb: measured). The GRU's own forward ``(h - n) z + n`` cancels ~72 bits where z ~ 1
    (torch's formula, kept): ~19 digits there, ~41 for the LSTM."""
    for case, least in (("lstm_cell", 35), ("gru_cell", 17)):
        model, x, oracle = _model(case)
        with torch.no_grad():
            cell = model.cell
            cell.weight_ih.zero_()
            cell.weight_hh.zero_()
            n = cell.bias_ih.numel()
            cell.bias_ih.copy_(torch.tensor([50.0, -50.0] * (n // 2) + [50.0] * (n % 2)))
            cell.bias_hh.zero_()
            cell.weight_ih[:, 0] = 1e-3  # every gate still depends on the data
        y = torch.randn(model(x).shape)
        ex = _check(model, x, y, oracle, fpgrad.from_module(model, x, y, nn.MSELoss()))
        assert ex.method == "fast"
        for name in ("cell.bias_ih", "cell.weight_ih"):
            d = np.asarray(ex.digits[f"grads/{name}"], dtype=np.float64)
            nonzero = ~ex.zero(f"grads/{name}").reshape(d.shape)
            assert nonzero.any() and d[nonzero].min() > least, (case, name)


def test_dead_relu_unit_has_exact_zero_gradients() -> None:
    """A relu RNN unit whose pre-activation is -100 at every step: its incoming weights get
    exactly zero gradient (torch's too), and the exact reference claims a zero only there."""
    torch.manual_seed(3)
    model = Seq(nn.RNN(2, 3, nonlinearity="relu", batch_first=True))
    with torch.no_grad():
        model.rnn.bias_ih_l0[1] = -100.0
    x = torch.randn(2, 3, 2)
    y = torch.randn(2, 2)
    net = fpgrad.from_module(model, x, y, nn.MSELoss())
    ex = _check(model, x, y, _layer_oracle("rnn_relu", 3, {"batch_first": True}), net)
    zero = ex.zero("grads/rnn.weight_ih_l0").reshape(3, 2)
    assert zero[1].all() and not zero[[0, 2]].any()
    _, params = _eager(model, x, y, torch.float32)
    assert (params["rnn.weight_ih_l0"].grad[1] == 0).all()


# ---- the in-place rule --------------------------------------------------------------------
class _Writes(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 4))
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x * self.w
        base = g.t().t() if self.how == "view" else x if self.how == "input" else g
        a, b = base.unsafe_chunk(2, 1)
        if self.how == "base_written":  # the pieces would see this write
            g.mul_(2.0)
            return (a * b * self.w[:, :2]).sum(1)
        a.sigmoid_()
        out = (a * b * self.w[:, :2]).sum(1)
        return out + g.sum(1) if self.how == "read" else out  # read: g changed under it


def test_split_piece_write_needs_a_fresh_unread_base() -> None:
    """Accepted for a fresh temporary read only through its split (and then equal to torch
    float64 bit for bit); refused where the base is read after the write, is a view (not
    proven), or is the model's input."""
    x, y = torch.randn(2, 4), torch.randn(2)
    net = fpgrad.from_module(_Writes("fresh"), x, y, nn.MSELoss())
    loss, params = _eager(net.graph.model, x, y, torch.float64)
    run = native_run(net.graph, "float64")
    assert _same(run.grads["w"], params["w"].grad.numpy())
    ex = exact_graph(net.graph).result
    mid, rad = ex.enclosure("grads/w")
    assert np.all(np.abs(np.asarray(mid, dtype=np.float64) - run.grads["w"])
                  <= np.asarray(rad, dtype=np.float64) + 1e-15 * np.abs(run.grads["w"]))  # fmt: skip
    for how in ("read", "view", "input"):
        with pytest.raises(InputError, match="writes through a view"):
            fpgrad.from_module(_Writes(how), x, y, nn.MSELoss())
    with pytest.raises(InputError, match="through a view"):  # unsafe_split's pieces are views
        fpgrad.from_module(_Writes("base_written"), x, y, nn.MSELoss())


# ---- the strict machine -------------------------------------------------------------------
def test_bfloat16_emulated_gru_cell_by_hand() -> None:
    """One GRU cell step in bfloat16:emulated: add_ on the split pieces, sigmoid_, mul_ and
    tanh_ against round_to (sums) and mpmath's correctly rounded functions, from the graph's
    own input values."""
    from fpgrad.numbers.formats import get_format
    from fpgrad.numbers.rounding import Mode, round_exact

    fmt = get_format("bfloat16")

    def rnd(v: Any) -> np.ndarray:
        return np.asarray(fpgrad.round_to(np.asarray(v, dtype=np.float64), "bfloat16"))

    def cr(fn: Callable, arr: np.ndarray) -> np.ndarray:
        out = []
        for v in np.asarray(arr, dtype=np.float64).ravel():
            with CTX.workdps(200):
                sign, man, exp, _ = CTX.mpf(fn(CTX.mpf(float(v))))._mpf_
            exact = Fraction(-int(man) if sign else int(man)) * Fraction(2) ** int(exp)
            out.append(round_exact(exact, fmt,
                                   Mode.NEAREST_EVEN))  # fmt: skip
        return np.array(out).reshape(np.shape(arr))

    torch.manual_seed(11)
    model = Cell(nn.GRUCell(2, 3))
    x = torch.randn(2, 2, 2) * 2
    net = fpgrad.from_module(model, x, torch.randn(2, 2), nn.MSELoss())
    tr = interpret(net.graph, EmulatedArith("bfloat16"))
    val = lambda n: np.asarray(tr.values[n.name], dtype=np.float64)  # noqa: E731
    seen = set()
    for node in net.graph.ops:
        key = str(node.target)
        args = [a for a in node.args if hasattr(a, "op")]
        if key == "aten.add_.Tensor":
            want = rnd(val(args[0]) + val(args[1]))
        elif key == "aten.mul_.Tensor":
            want = rnd(val(args[0]) * val(args[1]))
        elif key == "aten.sigmoid_.default":
            want = cr(lambda v: 1 / (1 + CTX.exp(-v)), val(args[0]))
        elif key == "aten.tanh_.default":
            want = cr(CTX.tanh, val(args[0]))
        else:
            continue
        seen.add(key)
        assert _same(val(node), want), node.name
    assert seen == {"aten.add_.Tensor", "aten.mul_.Tensor", "aten.sigmoid_.default",
                    "aten.tanh_.default"}  # fmt: skip


@pytest.mark.parametrize("case", ["gru_cell", "lstm_cell", "gru"])
def test_native_node_values_are_taken_before_in_place_writes(case: str) -> None:
    """The native column's value of a node whose storage a later in-place op overwrites
    (the gate pieces, ``add`` before ``tanh_``) is the value its op produced, as in the
    graph: every node of torch's float32 run is within 1e-4 of float32:emulated's."""
    _, _, _, _, net = _captured(case)
    run = native_run(net.graph, "float32")
    tr = interpret(net.graph, EmulatedArith("float32"))
    compared = 0
    for node in net.graph.ops:
        if node.name in run.values and node.name in tr.values:
            a = np.asarray(run.values[node.name], dtype=np.float64)
            b = np.asarray(tr.values[node.name], dtype=np.float64)
            if a.shape == b.shape:
                compared += 1
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=node.name)
    assert compared > 40
