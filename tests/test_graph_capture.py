"""Captured models (fpgrad.from_module): native columns bit for bit, exact reference, refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from fpgrad.diagnose.comparison import compare
from fpgrad.diagnose.verdicts import VERDICTS
from fpgrad.errors import InputError
from fpgrad.graph.native import native_run
from tests.graph_models import residual_mlp, small_cnn, transformer_block

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def eager_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss, dtype) -> dict:  # noqa: ANN001
    """The model's own autograd in ``dtype`` (one thread), gradients as float64 arrays."""
    m = copy.deepcopy(model).to(dtype)
    xx = x.to(dtype) if x.is_floating_point() else x
    yy = y.to(dtype) if y.is_floating_point() else y
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loss(m(xx), yy).backward()
    finally:
        torch.set_num_threads(n)
    return {k: p.grad.double().numpy() for k, p in m.named_parameters()}


def assert_close_to_float64(cmp, model, x, y, loss) -> None:  # noqa: ANN001
    """Exact gradients agree with torch float64 to 1e-8 relative (zeros: to float64 noise)."""
    ref = eager_grads(model, x, y, loss, torch.float64)
    for name, r in ref.items():
        e = cmp.column(name).exact.hi
        scale = np.max(np.abs(r)) or 1.0
        np.testing.assert_allclose(e, r, rtol=1e-8, atol=1e-13 * scale, err_msg=name)


@pytest.fixture(scope="module")
def mlp_comparison():  # noqa: ANN201
    model, x, y = residual_mlp()
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    return model, x, y, net, compare(net, "float16,bfloat16,float32")


def test_residual_mlp_float32_is_eager_autograd_bit_for_bit(mlp_comparison) -> None:  # noqa: ANN001
    model, x, y, net, cmp = mlp_comparison
    assert net.param_names == [k for k, _ in model.named_parameters()]
    for prec, dtype in DTYPES.items():
        ref = eager_grads(model, x, y, nn.CrossEntropyLoss(), dtype)
        for name in net.param_names:
            assert np.array_equal(cmp.values(prec)[name], ref[name]), (prec, name)


def test_residual_mlp_exact_matches_float64_and_certifies(mlp_comparison) -> None:  # noqa: ANN001
    model, x, y, net, cmp = mlp_comparison
    assert cmp.certified_digits >= 17
    assert_close_to_float64(cmp, model, x, y, nn.CrossEntropyLoss())
    counts = cmp.counts("float32")
    assert sum(counts[v] for v in VERDICTS) == sum(p.numel() for p in model.parameters())


def test_native_intermediates_are_the_eager_kernels_values(mlp_comparison) -> None:  # noqa: ANN001
    model, x, y, net, _ = mlp_comparison
    tr = native_run(net.graph, "float16")
    m = copy.deepcopy(model).half()
    want = (
        m.inp(x.half()).detach().double().numpy()
    )  # the first Linear, as eager float16 computes it
    first = next(n for n in net.graph.ops if net.graph.paths[n.name] == "inp"
                 and str(n.target) == "aten.addmm.default")  # fmt: skip
    assert np.array_equal(tr.values[first.name], want)


def test_module_paths_name_forward_and_backward_ops(mlp_comparison) -> None:  # noqa: ANN001
    g = mlp_comparison[3].graph
    labels = {g.label(n) for n in g.ops}
    assert "blocks.0.ff.0 (aten.addmm)" in labels
    assert "blocks.1.ff.1 (aten.tanh_backward)" in labels
    assert "blocks.0.norm (aten.rsqrt)" in labels
    assert "blocks.0.ff.1 (aten.threshold_backward)" in labels


def test_mse_tuple_inputs_and_callable_loss() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 2)
            self.b = nn.Linear(2, 2, bias=False)

        def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.a(u)) * self.b(v) / 3.0 - v

    torch.manual_seed(1)
    model, u, v, t = Two(), torch.randn(5, 3), torch.randn(5, 2), torch.randn(5, 2)

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, target, reduction="sum")

    net = fpgrad.from_module(model, (u, v), t, loss)
    cmp = compare(net, "float32,float32:emulated")
    assert cmp.certified_digits >= 17
    m64 = copy.deepcopy(model).double()
    loss(m64(u.double(), v.double()), t.double()).backward()
    for name, p in m64.named_parameters():
        np.testing.assert_allclose(cmp.column(name).exact.hi, p.grad.numpy(), rtol=1e-12)
        emulated = cmp.values("float32:emulated")[name]  # a strict float32 machine: near
        np.testing.assert_allclose(emulated, p.grad.numpy(), rtol=2e-5, atol=1e-6)


def test_unsupported_ops_are_all_named_in_one_line() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.act = AntiAliased()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.lgamma(self.act(self.lin(x).view(2, 1, 1, 3)).view(2, 3) + 3)

    class AntiAliased(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, size=(1, 3), mode="bicubic", antialias=True)

    with pytest.raises(InputError) as err:
        fpgrad.from_module(Odd(), torch.randn(2, 3), torch.zeros(2, 3), nn.MSELoss())
    msg = str(err.value)
    assert "\n" not in msg
    assert "aten._upsample_bicubic2d_aa.default in act" in msg and "aten.lgamma.default in <top>" in msg
    assert "_upsample_bicubic2d_aa_backward.default in act" in msg  # backward ops too, with their module
    assert "aten.digamma.default in <top>" in msg


def test_bad_arguments_are_input_errors() -> None:
    with pytest.raises(InputError, match="nn.Module"):
        fpgrad.from_module(lambda x: x, torch.ones(2), torch.ones(2), nn.MSELoss())  # type: ignore[arg-type]
    with pytest.raises(InputError, match="tensors"):
        fpgrad.from_module(nn.Linear(2, 2), [1.0, 2.0], torch.ones(2), nn.MSELoss())


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: transformer_block(), id="transformer"),
        pytest.param(lambda: small_cnn(train=True), id="cnn-train"),
        pytest.param(lambda: small_cnn(train=False), id="cnn-eval"),
    ],
)
def test_done_when_models(build) -> None:  # noqa: ANN001
    """float32 column = eager float32 autograd bit for bit; exact = float64 to 1e-8; >= 17 digits."""
    model, inputs, y = build()
    loss = nn.CrossEntropyLoss()
    net = fpgrad.from_module(model, inputs, y, loss)
    cmp = compare(net, "float32")
    assert cmp.certified_digits >= 17
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    m32 = copy.deepcopy(model)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loss(m32(*xs), y).backward()
    finally:
        torch.set_num_threads(n)
    m64 = copy.deepcopy(model).double()
    loss(m64(*(t.double() if t.is_floating_point() else t for t in xs)), y).backward()
    scale = max(float(p.grad.abs().max()) for p in m64.parameters())
    for (name, p32), (_, p64) in zip(m32.named_parameters(), m64.named_parameters(), strict=True):
        assert np.array_equal(cmp.values("float32")[name], p32.grad.double().numpy()), name
        e, r = cmp.column(name).exact, p64.grad.numpy()
        # exact zeros, proven or undetermined (a ball around 0, e.g. the key bias of attention,
        # zero by the softmax's shift invariance): float64 cancellation noise
        unknown = e.undetermined_mask()
        assert np.all(e.rad[unknown] <= 1e-12 * scale), name
        noise = (e.zero | unknown) & (np.abs(r) <= 1e-12 * scale)
        np.testing.assert_allclose(e.hi[~noise], r[~noise], rtol=1e-8, atol=0, err_msg=name)


def test_attribution_names_where_the_signal_died() -> None:
    """Batch norm of conv outputs whose spread is below float16's resolution: x - mean is 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 3))  # fmt: skip
    x, y = torch.randn(4, 1, 4, 4) * 1e-3, torch.tensor([0, 1, 2, 0])
    cmp = compare(fpgrad.from_module(model, x, y, nn.CrossEntropyLoss()), "float16,float32")
    att = cmp.attribution
    # the batch norm's output is the first op computing 0 where the exact value is not
    assert att["float16"]["first_lost"].startswith("1 (aten.native_batch_norm[0]): ")
    assert att["float16"]["first_rounding_zero_forward"]["op"] == "1 (aten.native_batch_norm[0])"
    assert att["float32"]["first_lost"] is None
    assert att["float16"]["first_nonfinite"] is None and att["float32"]["first_nonfinite"] is None
    assert "forward values first round to zero in 1 (aten.native_batch_norm[0])" in cmp.render()


def test_training_mode_dropout_is_refused_with_the_fix() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    with pytest.raises(InputError, match=r"bernoulli_.float in 1 \(dropout.*model\.eval\(\)"):
        fpgrad.from_module(model, torch.randn(2, 3), torch.zeros(2, 3), nn.MSELoss())
    fpgrad.from_module(model.eval(), torch.randn(2, 3), torch.zeros(2, 3), nn.MSELoss())


def test_float32_constants_made_in_the_forward_are_named_with_the_fix() -> None:
    class Eye(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) @ torch.eye(3)

    with pytest.raises(InputError) as err:
        fpgrad.from_module(Eye(), torch.randn(2, 3), torch.zeros(2, 3), nn.MSELoss())
    msg = str(err.value)
    assert "\n" not in msg and "dtype=x.dtype" in msg and "control flow" not in msg

    class Typed(Eye):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) @ torch.eye(3, dtype=x.dtype)

    fpgrad.from_module(Typed(), torch.randn(2, 3), torch.zeros(2, 3), nn.MSELoss())


def test_an_empty_batch_is_refused_in_one_line() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    empty = torch.zeros(0, dtype=torch.long)
    with pytest.raises(InputError, match=r"input 0 is empty \(shape \(0, 3\)\).*at least one"):
        fpgrad.from_module(model, torch.randn(0, 3), empty, nn.CrossEntropyLoss())
    with pytest.raises(InputError, match="targets is empty"):
        fpgrad.from_module(model, torch.randn(2, 3), empty, nn.CrossEntropyLoss())


def test_sums_over_empty_slices_are_exact_zeros() -> None:
    class EmptySums(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            return h + h[:, :0].sum() + h[:, 2:2].sum(dim=1, keepdim=True)

    torch.manual_seed(0)
    model, x, y = EmptySums(), torch.randn(2, 3), torch.zeros(2, 4)
    cmp = compare(fpgrad.from_module(model, x, y, nn.MSELoss()), "float32,bfloat16:emulated")
    assert_close_to_float64(cmp, model, x, y, nn.MSELoss())
