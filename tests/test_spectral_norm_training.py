"""Spectral norm in training mode: the power iteration writes its vectors into buffers through
``out=`` (``aten.div.out``). Native columns bit for bit, the exact column against an mpmath
oracle written from torch's documented algorithm, the user's model untouched, and the reads
that cannot be replayed refused in one line."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import fpgrad
from tests.oracle import graph_reference as R
from tests.oracle.native_exact import check
from tests.test_graph_oracle import check as oracle_check


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4)), nn.Tanh(),
                         nn.Linear(4, 2))  # fmt: skip


def test_training_spectral_norm_native_and_exact() -> None:
    m = _model()
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    check(m, x, y, nn.MSELoss())


def test_training_spectral_norm_against_oracle() -> None:
    """sigma = u . (W v) after one power step from the buffers (u, v held constant: torch
    computes them without gradient), then W / sigma; gradients by central differences."""
    m = _model(1)
    sn = m[0].parametrizations.weight[0]
    v0 = R.mp(sn._v.detach())  # torch's step: u = normalize(W v), v = normalize(W^T u)
    w0 = R.mp(m[0].parametrizations.weight.original.detach())
    x, y = torch.randn(5, 3), torch.randn(5, 2)

    def normalize(a: np.ndarray) -> np.ndarray:
        n = R.CTX.sqrt(sum(v * v for v in a))
        return a / max(n, R.CTX.mpf(sn.eps))

    u = normalize(w0.dot(v0))  # the vectors come from the unperturbed weight
    v = normalize(w0.T.dot(u))

    def f(p: dict, xs: np.ndarray, t: np.ndarray) -> object:
        w = p["0.parametrizations.weight.original"]
        sigma = u.dot(w.dot(v))
        h = np.vectorize(R.CTX.tanh, otypes=[object])(R.linear(xs, w / sigma, p["0.bias"]))
        return R.mse(R.linear(h, p["2.weight"], p["2.bias"]), t)

    oracle_check(m, x, y, nn.MSELoss(), f)


def test_training_spectral_norm_leaves_the_model_and_repeats() -> None:
    m = _model(2)
    sn = m[0].parametrizations.weight[0]
    u, v = sn._u.clone(), sn._v.clone()
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    first = fpgrad.compare(fpgrad.from_module(m, x, y, nn.MSELoss()), "float16,float32")
    second = fpgrad.compare(fpgrad.from_module(m, x, y, nn.MSELoss()), "float16,float32")
    assert torch.equal(sn._u, u) and torch.equal(sn._v, v)
    assert first.render() == second.render()


class ReadsAfterWrite(nn.Module):
    """``torch.div(.., out=self.buf)`` and then a read of ``self.buf``: the graph holds the
    buffer's old value for that read, eager the written one."""

    def __init__(self, read_after: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("buf", torch.ones(3))
        self.read_after = read_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            w = torch.div(self.lin.weight.sum(0), 2.0, out=self.buf)
        return self.lin(x) * (self.buf if self.read_after else w)


def test_buffer_read_after_its_out_write() -> None:
    """make_fx hands the op's node to later reads of the buffer: replayed as eager."""
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    check(ReadsAfterWrite(True), x, y, nn.MSELoss())
    check(ReadsAfterWrite(False), x, y, nn.MSELoss())


def test_a_get_attr_read_after_the_write_is_refused() -> None:
    """A graph whose second ``get_attr`` of the buffer follows the write (its value in the
    graph is the one before): named, not replayed."""
    from types import SimpleNamespace

    from torch import fx

    from fpgrad.graph.out_writes import out_written_reads

    g = fx.Graph()
    x = g.placeholder("x")
    buf = g.get_attr("buf")
    w = g.call_function(torch.ops.aten.div.out, (x, 2.0), {"out": buf})
    again = g.get_attr("buf")
    late = g.call_function(torch.ops.aten.mul.Tensor, (w, again))
    g.output(late)
    bad = out_written_reads(SimpleNamespace(gm=SimpleNamespace(graph=g)))  # type: ignore[arg-type]
    assert bad == [late]
    assert not out_written_reads(SimpleNamespace(gm=SimpleNamespace(graph=_without(g, again))))  # type: ignore[arg-type]


def _without(g: object, node: object) -> object:
    """``g`` with ``node``'s reader reading the op's own node instead."""
    from torch import fx

    assert isinstance(g, fx.Graph)
    for user in list(node.users):  # type: ignore[attr-defined]
        user.replace_input_with(node, user.args[0])
    g.erase_node(node)
    return g
