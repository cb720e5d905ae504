"""Eval-mode batch norm (``batch_norm_eval``): running statistics as constants.

Native columns bit for bit against the model's own eager autograd (every dtype, autocast,
affine=False and bias=False), the exact reference against torch float64 and against an
independent mpmath computation, the emulated fp8 machine by hand, the structural zero of a
bias before batch norm that must not hold here, import and model files, training, bad input.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fpgrad.arith.emulated import EmulatedArith
from fpgrad.cli import main
from fpgrad.graph.layers import evaluate, exact_trace
from fpgrad.model.from_torch import import_module, load_model_file, network_toml
from fpgrad.model.netfile import parse_network
from fpgrad.model.policy import BUILTIN
from fpgrad.run.optim import OptimConfig
from fpgrad.run.torch_native import one_torch_thread, to_float64, torch_trace
from fpgrad.training import train

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _model(affine: bool = True, bias: bool = True, seed: int = 0) -> nn.Sequential:
    """Linear -> BatchNorm1d (eval, running statistics far from the batch's) -> Tanh -> Linear."""
    torch.manual_seed(seed)
    bn = nn.BatchNorm1d(5, affine=affine, bias=bias)
    model = nn.Sequential(nn.Linear(4, 5), bn, nn.Tanh(), nn.Linear(5, 3))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(5, generator=gen) * 0.7)
        bn.running_var.copy_(torch.rand(5, generator=gen) * 3 + 0.05)
        if affine:
            bn.weight.copy_(torch.randn(5, generator=gen))
            if bias:
                bn.bias.copy_(torch.randn(5, generator=gen))
    return model.eval()


def _data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(6, 4, generator=gen).to(dtype), torch.arange(6) % 3


def _eager(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
    """The model's own forward and autograd on one thread; every layer's output kept."""
    outs = []
    with one_torch_thread():
        h = x
        for m in model:
            h = m(h)
            h.retain_grad()
            outs.append(h)
        loss = F.cross_entropy(h, y)
        loss.backward()
    return outs, loss


def _assert_native(trace: Any, imported: Any, model: nn.Module, outs: list, loss: Any) -> None:
    assert trace.loss == loss.item()
    for layer, out in zip(imported.network.layers, outs, strict=True):
        assert np.array_equal(trace.forward[layer.name], to_float64(out)), layer.name
        assert np.array_equal(trace.backward[layer.name], to_float64(out.grad)), layer.name
    torch_params = dict(model.named_parameters())
    assert set(imported.param_names.values()) == set(torch_params)
    for ours, theirs in imported.param_names.items():
        assert np.array_equal(trace.grads[ours], to_float64(torch_params[theirs].grad)), ours


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_is_bit_identical_to_eager_autograd(
    dtype: torch.dtype, affine: bool, bias: bool
) -> None:
    model = _model(affine, bias).to(dtype)
    x, y = _data(dtype)
    imported = import_module(model, x, y)
    assert imported.network.layers[1].kind == "batch_norm_eval"
    want = {"weight", "bias"} if affine and bias else {"weight"} if affine else set()
    assert set(imported.network.layers[1].params) == want
    trace = torch_trace(imported.network, str(dtype).removeprefix("torch."))
    outs, loss = _eager(model, x, y)
    _assert_native(trace, imported, model, outs, loss)
    # the running statistics are the module's, untouched by the pass
    bn = model[1]
    assert bn.num_batches_tracked.item() == 0


@pytest.mark.parametrize(
    "name,low", [("autocast_cpu", torch.float16), ("autocast_cpu_bf16", torch.bfloat16)]
)
def test_autocast_policies_are_bit_identical_to_torch_autocast(name: str, low: torch.dtype) -> None:
    model = _model()
    x, y = _data(torch.float32)
    imported = import_module(model, x, y)
    net = imported.network
    trace = torch_trace(net, BUILTIN[name].resolve(net))
    # batch norm runs torch's mixed kernel: low-precision input, float32 statistics and weights
    assert trace.ran_in["1"] == {
        "compute": str(low)[6:],
        "params": "float32",
        "output": str(low)[6:],
    }
    outs = []
    with one_torch_thread():
        h = x
        with torch.autocast("cpu", dtype=low):
            for m in model:
                h = m(h)
                h.retain_grad()
                outs.append(h)
            loss = F.cross_entropy(h.float(), y)
        loss.backward()
    _assert_native(trace, imported, model, outs, loss)


def test_policy_computing_batch_norm_in_float16_casts_the_statistics() -> None:
    from fpgrad.model.policy import parse_policy

    model = _model()
    x, y = _data(torch.float32)
    net = import_module(model, x, y).network
    plan = parse_policy("bn16", {"batch_norm": "float16"}).resolve(net)
    trace = torch_trace(net, plan)
    assert trace.ran_in["1"] == {"compute": "float16", "params": "float16", "output": "float16"}
    with one_torch_thread():
        h = model[0](x)
        bn = model[1]
        want = F.batch_norm(
            h.half(),
            bn.running_mean.half(),
            bn.running_var.half(),
            bn.weight.half(),
            bn.bias.half(),
            False,
            0.0,
            bn.eps,
        )
    # float32 -> float16 casts are one rounding, so torch's .half() is the policy's cast
    assert np.array_equal(trace.forward["1"], to_float64(want))


# ---- the exact reference ---------------------------------------------------------------------


def _small_net() -> Any:
    """dense (bias) -> batch_norm_eval -> dense -> mse, as a network file."""
    return parse_network(
        {
            "layer": [
                {
                    "type": "dense",
                    "name": "fc",
                    "weight": [[0.5, -1.25, 2.0], [1.5, 0.75, -0.5], [-2.0, 0.25, 1.0]],
                    "bias": [0.125, -0.375, 0.0625],
                },
                {
                    "type": "batch_norm_eval",
                    "name": "bn",
                    "eps": 1e-5,
                    "running_mean": [0.3, -0.2, 1.1],
                    "running_var": [0.7, 2.5, 0.01],
                    "weight": [1.5, -0.75, 0.9],
                    "bias": [0.1, 0.0, -0.3],
                },
                {"type": "dense", "name": "out", "weight": [[1.0, 0.5, -0.25], [0.3, -1.0, 2.0]]},
            ],
            "loss": {"type": "mse"},
            "data": {
                "x": [[1.0, -0.5, 0.25], [0.75, 2.0, -1.5], [-0.3, 0.1, 0.9], [2.2, -1.0, 0.0]],
                "y": [[0.5, -1.0], [1.0, 0.0], [-0.25, 0.75], [0.0, 1.5]],
            },
        }
    )


def _mp_reference(net: Any) -> dict[str, np.ndarray]:
    """The same network computed independently in mpmath at 80 digits (plain formulas)."""
    mpmath.mp.dps = 80
    mp = np.vectorize(mpmath.mpf, otypes=[object])
    x, t = mp(net.x), mp(net.y)
    w1, b1 = mp(net.params["fc.weight"]), mp(net.params["fc.bias"])
    bn = net.layers[1]
    mean, var = mp(bn.stats["running_mean"]), mp(bn.stats["running_var"])
    g, be = mp(net.params["bn.weight"]), mp(net.params["bn.bias"])
    w2 = mp(net.params["out.weight"])
    inv = np.array([1 / mpmath.sqrt(v + mpmath.mpf(bn.eps)) for v in var], dtype=object)
    z1 = x.dot(w1.T) + b1
    xhat = (z1 - mean) * inv
    yb = xhat * g + be
    out = yb.dot(w2.T)
    n = out.size
    loss = ((out - t) ** 2).sum() / n
    dout = 2 * (out - t) / n
    dyb = dout.dot(w2)
    dz1 = dyb * g * inv
    return {
        "loss": np.array(loss, dtype=object),
        "forward/bn": yb,
        "backward/fc": dz1,
        "grads/fc.weight": dz1.T.dot(x),
        "grads/fc.bias": dz1.sum(axis=0),
        "grads/bn.weight": (dyb * xhat).sum(axis=0),
        "grads/bn.bias": dyb.sum(axis=0),
        "grads/out.weight": dout.T.dot(yb),
    }


@pytest.mark.parametrize("method", ["fast", "arb"])
def test_exact_encloses_an_independent_mpmath_computation(method: str) -> None:
    net = _small_net()
    r = exact_trace(net, method=method)
    assert r.certified_digits >= 17
    for key, want in _mp_reference(net).items():
        mid, rad = r.enclosure(key)
        for m, rr, w in zip(
            np.ravel(mid), np.ravel(rad), np.ravel(np.asarray(want, dtype=object)), strict=True
        ):
            assert abs(mpmath.mpf(m) - w) <= mpmath.mpf(float(rr)) + abs(w) * mpmath.mpf(10) ** -60
            assert float(rr) <= 1e-17 * abs(float(w)), (key, rr, w)  # and it is tight


def test_exact_agrees_with_torch_float64() -> None:
    net = _small_net()
    r = exact_trace(net)
    t64 = torch_trace(net, "float64")
    for key in ("forward/bn", "backward/fc", "grads/fc.weight", "grads/bn.weight"):
        section, name = key.split("/")
        got = getattr(t64, section)[name]
        want = np.array([float(v) for v in np.ravel(r.midpoints(key))]).reshape(got.shape)
        assert np.allclose(got, want, rtol=1e-12, atol=1e-15), key


def test_bias_before_eval_batch_norm_has_a_nonzero_gradient() -> None:
    """The structural zero (a bias before training-mode batch norm has gradient 0) does not
    hold with running statistics: the exact gradient is certified, nonzero, and torch's."""
    net = _small_net()
    r = exact_trace(net)
    assert not r.zero("grads/fc.bias").any() and not r.undetermined("grads/fc.bias").any()
    exact = np.array([float(v) for v in r.midpoints("grads/fc.bias")])
    assert np.all(np.abs(exact) > 1e-3)
    native = torch_trace(net, "float64").grads["fc.bias"]
    assert np.allclose(native, exact, rtol=1e-12)
    # the same network with training-mode batch norm: there the zero is proven
    doc_layers = [dict(ly) for ly in _train_mode_layers()]
    trained = parse_network({"layer": doc_layers, "loss": {"type": "mse"}, "data": _data_doc(net)})
    assert exact_trace(trained).zero("grads/fc.bias").all()


def _train_mode_layers() -> list[dict[str, Any]]:
    net = _small_net()
    return [
        {"type": "dense", "name": "fc", "weight": net.params["fc.weight"].tolist()},
        {"type": "batch_norm", "name": "bn"},
        {"type": "dense", "name": "out", "weight": net.params["out.weight"].tolist()},
    ]


def _data_doc(net: Any) -> dict[str, Any]:
    return {"x": net.x.tolist(), "y": net.y.tolist()}


# ---- the emulated machine, by hand -----------------------------------------------------------


def test_emulated_fp8_e4m3_by_hand() -> None:
    """x = 3 through dense(w=1) -> batch_norm_eval(mean 0.5, var 2, eps 1, w 1.5, b 0.25) -> mse
    against t = 1, every operation rounded to fp8 e4m3 (3 fraction bits):
    sqrt(2 + 1) = 1.732 -> 1.75; 1 / 1.75 = 0.571 -> 0.5625; (3 - 0.5) * 0.5625 = 1.40625 ->
    1.375; 1.375 * 1.5 = 2.0625 -> 2; 2 + 0.25 = 2.25. Loss (2.25 - 1)^2 = 1.5625 -> 1.5 (tie to
    even); dL/dy = 1.25 * 2 = 2.5; dw = 2.5 * 1.375 = 3.4375 -> 3.5; db = 2.5;
    dx = (2.5 * 1.5) * 0.5625 = 2.109 -> 2; dense dW = 2 * 3 = 6."""
    net = parse_network(
        {
            "layer": [
                {"type": "dense", "name": "fc", "weight": [[1.0]], "bias": False},
                {
                    "type": "batch_norm_eval",
                    "name": "bn",
                    "eps": 1.0,
                    "running_mean": [0.5],
                    "running_var": [2.0],
                    "weight": [1.5],
                    "bias": [0.25],
                },
            ],
            "loss": {"type": "mse"},
            "data": {"x": [[3.0]], "y": [[1.0]]},
        }
    )
    t = evaluate(net, EmulatedArith("fp8_e4m3"))
    assert float(t.forward["bn"][0, 0]) == 2.25
    assert float(t.loss) == 1.5
    assert float(t.backward["bn"][0, 0]) == 2.5
    assert float(t.grads["bn.weight"][0]) == 3.5
    assert float(t.grads["bn.bias"][0]) == 2.5
    assert float(t.backward["fc"][0, 0]) == 2.0
    assert float(t.grads["fc.weight"][0, 0]) == 6.0
    # the exact reference of the same network: (2.5 / sqrt 3) * 1.5 + 0.25
    r = exact_trace(net)
    want = 2.5 / mpmath.sqrt(3) * mpmath.mpf(1.5) + mpmath.mpf(0.25)
    mid, rad = r.enclosure("forward/bn")
    assert abs(mpmath.mpf(mid[0, 0]) - want) <= mpmath.mpf(float(rad[0, 0])) + mpmath.mpf(1e-30)


# ---- files, import, training -----------------------------------------------------------------


def test_network_file_round_trip_of_an_import() -> None:
    model = _model(affine=False)
    x, y = _data(torch.float32)
    imported = import_module(model, x, y)
    text = network_toml(imported)
    assert 'type = "batch_norm_eval"' in text and "running_var = [" in text
    import tomllib

    again = parse_network(tomllib.loads(text))
    bn, bn2 = imported.network.layers[1], again.layers[1]
    assert bn2.kind == "batch_norm_eval" and bn2.params == {} and bn2.eps == bn.eps
    for k in ("running_mean", "running_var"):
        assert np.array_equal(bn.stats[k], bn2.stats[k])
    assert any("eval mode" in n for n in imported.notes)


def _save(tmp_path: Path, modules: list[str], sd: dict[str, Any], mode: str = "eval") -> Path:
    torch.save(sd, tmp_path / "model.pt")
    x, _ = _data(torch.float32)
    np.save(tmp_path / "x.npy", x.double().numpy())
    np.save(tmp_path / "y.npy", np.arange(6) % 3)
    lines = [
        f'mode = "{mode}"',
        'state_dict = "model.pt"',
        "modules = " + json.dumps(modules),
        "[loss]",
        'type = "cross_entropy"',
        "[data]",
        'x_file = "x.npy"',
        'y_file = "y.npy"',
    ]
    path = tmp_path / "model.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_model_file_in_eval_mode_is_the_eval_module(tmp_path: Path) -> None:
    model = _model()
    path = _save(
        tmp_path, ["Linear(4, 5)", "BatchNorm1d(5)", "Tanh()", "Linear(5, 3)"], model.state_dict()
    )
    imported = load_model_file(path)
    assert [ly.kind for ly in imported.network.layers][1] == "batch_norm_eval"
    x, y = _data(torch.float32)
    trace = torch_trace(imported.network, "float32")
    outs, loss = _eager(model, x, y)
    _assert_native(trace, imported, model, outs, loss)
    # the same file in training mode uses the batch statistics
    path = _save(tmp_path, ["Linear", "BatchNorm1d", "Tanh", "Linear"], model.state_dict(), "train")
    assert load_model_file(path).network.layers[1].kind == "batch_norm"


def test_training_keeps_batch_norm_in_eval_mode() -> None:
    """fpgrad train on a batch_norm_eval network equals torch SGD on the eval-mode model:
    running statistics never change, only weight and bias are trained."""
    model = _model()
    x, y = _data(torch.float32)
    net = import_module(model, x, y).network
    steps, lr = 3, 0.1
    r = train(net, steps, OptimConfig(lr=lr), runs="float32", perturb=False)
    ref = copy.deepcopy(model)
    before = ref[1].running_mean.clone(), ref[1].running_var.clone()
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    with one_torch_thread():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            opt.step()
    flat = np.concatenate([to_float64(p).ravel() for p in ref.parameters()])
    assert np.array_equal(r.histories["float32"].params[-1], flat)
    assert torch.equal(ref[1].running_mean, before[0]) and torch.equal(
        ref[1].running_var, before[1]
    )


# ---- bad input -------------------------------------------------------------------------------


def _one_line(args: list[str], capsys: Any, *needles: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fpgrad: error: "), err
    for n in needles:
        assert n in err, (n, err)


def test_missing_running_statistics_in_a_model_file(tmp_path: Path, capsys: Any) -> None:
    sd = {k: v for k, v in _model().state_dict().items() if k != "1.running_var"}
    path = _save(tmp_path, ["Linear(4, 5)", "BatchNorm1d(5)", "Tanh()", "Linear(5, 3)"], sd)
    _one_line(["compare", str(path)], capsys, "no 1.running_var", 'mode = "eval"')


def test_non_finite_running_statistics_in_a_state_dict(tmp_path: Path, capsys: Any) -> None:
    sd = _model().state_dict()
    sd["1.running_var"][2] = float("nan")
    path = _save(tmp_path, ["Linear(4, 5)", "BatchNorm1d(5)", "Tanh()", "Linear(5, 3)"], sd)
    _one_line(["compare", str(path)], capsys, "running_var", "non-finite value nan")


_BN = {"type": "batch_norm_eval", "running_mean": [0.0, 1.0], "running_var": [1.0, 2.0]}


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"running_var": None}, "needs running_var"),
        ({"running_mean": None}, "needs running_mean"),
        ({"running_var": [1.0, -0.5]}, "running_var must be >= 0"),
        ({"running_mean": [1.0]}, "running_mean has shape [1]; expected [2]"),
        ({"weight": False}, "weight = false needs bias = false"),
        ({"eps": 0.0}, "eps must be positive"),
        ({"momentum": 0.1}, "unknown key 'momentum'"),
        ({"running_mean": ["a", 1.0]}, "running_mean: expected numbers"),
        ({"bias": False, "bias_init": "zeros"}, "bias = false has no bias_init"),
    ],
)
def test_bad_network_files_are_one_line(
    tmp_path: Path, capsys: Any, change: dict[str, Any], needle: str
) -> None:
    spec = {**_BN, **change}
    lines = ["[[layer]]", 'type = "dense"', "out = 2", "[[layer]]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in spec.items() if v is not None]
    lines += ["[loss]", 'type = "mse"', "[data]", "x = [[1.0, 2.0]]", "y = [[0.0, 1.0]]"]
    path = tmp_path / "net.toml"
    path.write_text("\n".join(lines) + "\n")
    _one_line(["compare", str(path)], capsys, needle)


def test_sweep_cells_depend_on_the_running_statistics() -> None:
    from dataclasses import replace

    from fpgrad.sweeps.cells import network_hash

    net = _small_net()
    bn = net.layers[1]
    moved = {**bn.stats, "running_var": bn.stats["running_var"] * 2}
    other = replace(net, layers=(net.layers[0], replace(bn, stats=moved), net.layers[2]))
    assert network_hash(other) != network_hash(net)


def test_rounded_reference_rounds_the_running_statistics() -> None:
    """reference = "rounded" starts from the values the run holds: the running statistics are
    stored with the parameters, so they are rounded into that format too."""
    from fpgrad.diagnose.comparison import _rounded
    from fpgrad.model.policy import Plan
    from fpgrad.numbers.formats import get_format
    from fpgrad.numbers.rounding import round_to

    net = _small_net()
    f16, f32 = get_format("float16"), get_format("float32")
    for rounded, fmt in (
        (net.map_values(lambda a: round_to(a, f16)), f16),
        (_rounded(net, Plan.uniform(net, "float16")), f16),
        (_rounded(net, BUILTIN["autocast"].resolve(net)), f32),  # stored in float32
    ):
        for k, v in net.layers[1].stats.items():
            got = rounded.layers[1].stats[k]
            assert np.array_equal(got, round_to(v, fmt)) and not np.array_equal(got, v), k


def test_folding_into_a_dense_layer_is_not_what_torch_computes() -> None:
    """Why batch_norm_eval is its own kind: the fold into a dense layer (weight diag(gamma /
    sqrt(running_var + eps)), bias beta - gamma running_mean / sqrt(running_var + eps), both
    computed in float64 and rounded once) gives other values than torch's eval-mode
    BatchNorm1d, while batch_norm_eval's native column is torch's own. Prints the counts
    (``pytest -s``) quoted in the README."""
    from fpgrad.run.torch_native import to_dtype

    gen = torch.Generator().manual_seed(11)
    x64 = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    bn = nn.BatchNorm1d(8, dtype=torch.float64).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(8, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(8, generator=gen, dtype=torch.float64) * 2 + 0.1)
        bn.weight.copy_(torch.randn(8, generator=gen, dtype=torch.float64))
        bn.bias.copy_(torch.randn(8, generator=gen, dtype=torch.float64))
    gamma, beta = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    scale = gamma / np.sqrt(bn.running_var.numpy() + bn.eps)
    shift = beta - scale * bn.running_mean.numpy()
    for name in ("float16", "bfloat16", "float32"):
        dtype = getattr(torch, name)
        mod = copy.deepcopy(bn)
        for t in (mod.running_mean, mod.running_var, mod.weight, mod.bias):
            t.data = to_dtype(t.detach().numpy(), name)
        x = to_dtype(x64.numpy(), name)
        with one_torch_thread(), torch.no_grad():
            want = mod(x)
            folded = F.linear(x, to_dtype(np.diag(scale), name), to_dtype(shift, name))
            net = import_module(mod, x, torch.zeros(64, 8, dtype=dtype), "mse").network
        differ = int((want != folded).sum())
        print(f"{name}: the fold differs from torch in {differ} of {want.numel()} values")
        assert differ > 0
        assert np.array_equal(torch_trace(net, name).forward[net.layers[0].name], to_float64(want))
