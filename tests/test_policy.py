"""Precision policies: which op ran in which precision, bit-identity with torch.autocast,
user policies from the network file, loss scaling in compare, and refused inputs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fpgrad.cli import main
from fpgrad.diagnose.comparison import compare
from fpgrad.errors import InputError
from fpgrad.model.netfile import load_network, parse_network
from fpgrad.model.network import Network
from fpgrad.model.policy import BUILTIN, Plan, Policy, parse_policy
from fpgrad.run.optim import OptimConfig
from fpgrad.run.torch_native import (
    build_modules,
    cast_values,
    loss_fn,
    one_torch_thread,
    to_dtype,
    to_float64,
    torch_trace,
)
from fpgrad.training import train
from tests.nets import net_from

LAYERS = [
    {"type": "dense", "name": "fc1", "out": 5, "init": "he_normal"},
    {"type": "batch_norm", "name": "bn"},
    {"type": "leaky_relu", "name": "lrelu"},
    {"type": "dense", "name": "fc2", "out": 5},
    {"type": "tanh", "name": "th"},
    {"type": "dense", "name": "fc3", "out": 4},
    {"type": "sigmoid", "name": "sg"},
    {"type": "dense", "name": "fc4", "out": 4},
    {"type": "relu", "name": "rl"},
    {"type": "dense", "name": "out", "out": 3},
]


def _net(loss: str, softmax: bool = False, seed: int = 1) -> Network:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, 4))
    if loss == "cross_entropy":
        y: np.ndarray = rng.integers(0, 3, 6)
    elif loss == "mse":
        y = rng.normal(size=(6, 3))
    else:
        y = rng.integers(0, 2, (6, 3)).astype(float)
    layers = LAYERS + ([{"type": "softmax", "name": "sm"}] if softmax else [])
    return net_from(layers, loss, x.tolist(), y.tolist(), seed=seed)


class _Float32Softmax(nn.Module):
    """Softmax as CUDA's autocast runs it: on a float32 copy of its input."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.softmax(h.float(), dim=1)


def _autocast_reference(net: Network, low: torch.dtype, cuda_softmax: bool = False):  # noqa: ANN202
    """The network run by torch.autocast('cpu') itself: float32 modules, autograd."""
    mods = build_modules(net, "float32")
    if cuda_softmax:
        mods = [_Float32Softmax() if isinstance(m, nn.Softmax) else m for m in mods]
    outs = []
    with one_torch_thread():
        h = to_dtype(net.x, "float32")
        with torch.autocast("cpu", dtype=low):
            for m in mods:
                h = m(h)
                h.retain_grad()
                outs.append(h)
            loss = loss_fn(net, h, "float32")
        loss.backward()
    params = [p for m in mods for p in m.parameters()]
    return outs, loss, params


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
@pytest.mark.parametrize(
    "name,low", [("autocast_cpu", torch.float16), ("autocast_cpu_bf16", torch.bfloat16)]
)
def test_cpu_autocast_policies_are_bit_identical_to_torch_autocast(
    loss: str, name: str, low: torch.dtype
) -> None:
    net = _net(loss, softmax=loss == "mse")
    trace = torch_trace(net, BUILTIN[name].resolve(net))
    outs, ref_loss, params = _autocast_reference(net, low)
    assert trace.loss == float(ref_loss.detach())
    for layer, out in zip(net.layers, outs, strict=True):
        assert trace.formats[f"forward/{layer.name}"] == str(out.dtype).removeprefix("torch.")
        assert np.array_equal(trace.forward[layer.name], to_float64(out), equal_nan=True)
        assert np.array_equal(trace.backward[layer.name], to_float64(out.grad), equal_nan=True)
    for key, p in zip(net.params, params, strict=True):
        assert trace.formats[f"grads/{key}"] == "float32"
        assert np.array_equal(trace.grads[key], to_float64(p.grad), equal_nan=True)


def test_cuda_autocast_policy_runs_softmax_and_loss_in_float32() -> None:
    net = _net("mse", softmax=True)
    trace = torch_trace(net, BUILTIN["autocast"].resolve(net))
    ran = trace.ran_in
    for name in ("fc1", "fc2", "fc3", "fc4", "out"):
        assert ran[name] == {"compute": "float16", "params": "float16", "output": "float16"}
    assert ran["bn"] == {"compute": "float16", "params": "float32", "output": "float16"}
    for name in ("lrelu", "th", "sg", "rl"):
        assert ran[name]["compute"] == "float16"
    assert ran["sm"]["compute"] == "float32" and ran["loss"]["compute"] == "float32"
    # the same as torch.autocast with softmax upcast the way CUDA's op list does it
    outs, ref_loss, params = _autocast_reference(net, torch.float16, cuda_softmax=True)
    assert trace.loss == float(ref_loss.detach())
    for key, p in zip(net.params, params, strict=True):
        assert np.array_equal(trace.grads[key], to_float64(p.grad))
    assert np.array_equal(trace.backward["out"], to_float64(outs[-2].grad))


def test_user_policy_rules_layer_beats_op_beats_group_beats_default() -> None:
    net = _net("cross_entropy")
    pol = parse_policy(
        "p",
        {
            "params": "float64",
            "data": "bfloat16",
            "default": "float32",
            "activation": "float16",
            "tanh": "bfloat16",
            "matmul": "input",
            "layers": {"fc3": "float64", "rl": "input"},
            "loss": "float16",
        },
    )
    plan = pol.resolve(net)
    want = {
        "fc1": ("bfloat16", "op dense"),  # input = the data's precision
        "bn": ("float32", "default"),
        "lrelu": ("float16", "op activation"),
        "fc2": ("float16", "op dense"),
        "th": ("bfloat16", "op tanh"),
        "fc3": ("float64", "layer fc3"),
        "sg": ("float16", "op activation"),
        "fc4": ("float16", "op dense"),
        "rl": ("float16", "layer rl"),
        "out": ("float16", "op dense"),
    }
    assert {lp.layer: (lp.compute, lp.rule) for lp in plan.layers} == want
    assert plan.loss == "float16" and plan.params == "float64" and plan.data == "bfloat16"
    trace = torch_trace(net, plan)
    for lp in plan.layers:  # what actually ran, observed from the tensors
        assert trace.ran_in[lp.layer]["compute"] == lp.compute
        assert trace.ran_in[lp.layer]["output"] == lp.output
        if lp.params:
            assert trace.ran_in[lp.layer]["params"] == lp.compute
    assert trace.ran_in["loss"]["compute"] == "float16"
    assert all(trace.formats[f"grads/{k}"] == "float64" for k in net.params)


def test_uniform_plan_is_the_plain_precision() -> None:
    net = _net("bce")
    for p in ("float16", "bfloat16", "float32"):
        a = torch_trace(net, p)
        b = torch_trace(net, Plan.uniform(net, p))
        assert a.loss == b.loss
        for k in net.params:
            assert np.array_equal(a.grads[k], b.grads[k], equal_nan=True)
        assert Plan.uniform(net, p).describe() == f"all {p}"


def test_casts_round_once_and_match_torch_from_float32() -> None:
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    f32 = torch.from_numpy(bits.view(np.float32).copy())
    f32 = f32[torch.isfinite(f32)]
    for dtype in (torch.float16, torch.bfloat16):
        ours = cast_values(f32, dtype)
        assert torch.equal(ours.isnan(), f32.to(dtype).isnan())
        ok = ~ours.isnan()
        assert torch.equal(ours[ok], f32.to(dtype)[ok])  # torch is right from float32
    # from float64, torch rounds twice (through float32); the policy cast rounds once
    x = torch.tensor([1.0 + 2.0**-11 + 2.0**-40], dtype=torch.float64)
    assert float(cast_values(x, torch.float16)) == 1.0 + 2.0**-10
    assert float(x.to(torch.float16)) == 1.0


def test_training_with_a_policy_equals_torch_autocast_training() -> None:
    net = _net("cross_entropy", seed=4)
    steps, lr = 4, 0.05
    r = train(net, steps, OptimConfig(lr=lr), runs="autocast_cpu", perturb=False)
    mods = build_modules(net, "float32")
    params = [p for m in mods for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=lr)
    with one_torch_thread():
        for _ in range(steps):
            opt.zero_grad()
            h = to_dtype(net.x, "float32")
            with torch.autocast("cpu", dtype=torch.float16):
                for m in mods:
                    h = m(h)
                loss = loss_fn(net, h, "float32")
            loss.backward()
            opt.step()
    flat = np.concatenate([to_float64(p).ravel() for p in params])
    assert np.array_equal(r.histories["autocast_cpu"].params[-1], flat)
    assert r.plans["autocast_cpu"]["loss"]["compute"] == "float32"
    assert "policy" in r.to_dict()["runs"]["autocast_cpu"]


def test_compare_reports_the_policy_of_every_column() -> None:
    net = _net("mse", softmax=True)
    c = compare(net, "float16,autocast")
    assert c.policies["float16"]["summary"] == "all float16"
    assert c.policies["autocast"]["observed"]["sm"]["compute"] == "float32"
    text = c.render()
    assert "Precision policies" in text and "softmax, loss float32" in text
    places = c.attribution["autocast"]["places"]
    assert {r["format"] for r in places if r["layer"] == "sm"} == {"float32"}
    assert c.to_dict()["policies"]["autocast"]["params"] == "float32"


def test_loss_scale_in_compare_recovers_underflowed_gradients() -> None:
    # y = 2^-4 * 2^-12 = 2^-16, dL/dy = 2y, dL/dw = 2y x = 2^-27: zero in float16 (below
    # half the smallest subnormal), 2^-13 (normal) when the loss is scaled by 2^14
    net = net_from(
        [{"type": "dense", "out": 1, "weight": [[2.0**-4]], "bias": [0.0]}],
        "mse",
        [[2.0**-12]],
        [[0.0]],
    )
    plain = compare(net, "float16,float32")
    scaled = compare(net, "float16,float32", loss_scale=2.0**14)
    assert plain.gradient("dense0.weight", (0, 0))["float16"]["verdict"] == "rounding_zero"
    g = scaled.gradient("dense0.weight", (0, 0))
    assert g["float16"]["verdict"] == "ok" and g["float16"]["value"] == 2.0**-13
    assert float(g["exact"]) == 2.0**-13
    assert scaled.summary["float16"]["rounding_zero"] == 0
    assert scaled.summary["float32"] == plain.summary["float32"]
    assert any("loss scale 16384" in n for n in scaled.notes)
    with pytest.raises(InputError, match="power of two"):
        compare(net, "float16", loss_scale=1000.0)
    # the emulated machine scales the same way
    em = compare(net, "float16:emulated", loss_scale=2.0**14)
    assert em.gradient("dense0.weight", (0, 0))["float16:emulated"]["value"] == 2.0**-13


def test_policies_in_the_network_file_and_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "net.toml"
    path.write_text(
        """
seed = 1
[[layer]]
type = "dense"
name = "hidden"
out = 3
[[layer]]
type = "sigmoid"
[[layer]]
type = "dense"
name = "head"
out = 2
[loss]
type = "cross_entropy"
[data]
x = [[1.0, 2.0], [0.5, -1.0]]
y = [0, 1]
[policy.safe_head]
extends = "autocast"
layers = { head = "float32" }
"""
    )
    net = load_network(path)
    assert set(net.policies) == {"safe_head"}
    assert main(["compare", str(path), "--policy", "safe_head", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"safe_head"' in out and '"rule": "layer head"' in out
    assert main(["policies", "--network", str(path)]) == 0
    out = capsys.readouterr().out
    assert "safe_head (network file)" in out and "| head (dense)" in out
    code = main(["train", str(path), "--steps", "2", "--policy", "safe_head+dynamic"])
    assert code == 0 and "safe_head+dynamic" in capsys.readouterr().out


BAD = [
    ({"softmaxx": "float32"}, "unknown key 'softmaxx'"),
    ({"dense": "float8"}, "not a policy precision"),
    ({"params": "input"}, "not a policy precision"),
    ({"layers": {"nope": "float16"}}, "no layer named 'nope'"),
    ({"extends": "autocast_gpu"}, "extends 'autocast_gpu'"),
    ({"layers": "float16"}, "layers must be a table"),
]


@pytest.mark.parametrize("table,message", BAD)
def test_bad_policies_are_refused_in_one_line(
    table: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = {
        "layer": [{"type": "dense", "out": 1}],
        "loss": {"type": "mse"},
        "data": {"x": [[1.0]], "y": [[1.0]]},
        "policy": {"p": table},
    }
    with pytest.raises(InputError, match=message):
        parse_network(doc)


def test_bad_policy_names_and_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError, match="is a precision name"):
        parse_policy("float16", {})
    with pytest.raises(InputError, match="built-in policy"):
        parse_policy("autocast", {})
    net = _net("mse")
    with pytest.raises(InputError, match="drop \\+master"):
        train(net, 1, runs="autocast+master")
    path = tmp_path / "n.toml"
    path.write_text(
        '[[layer]]\ntype = "dense"\nout = 1\n[loss]\ntype = "mse"\n'
        "[data]\nx = [[1.0]]\ny = [[1.0]]\n"
    )
    assert main(["compare", str(path), "--policy", "autocast_gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown precision 'autocast_gpu'" in err[0]
    assert main(["policies", "nope"]) == 2


def test_policy_dataclass_round_trip() -> None:
    p = Policy("x", params="float32", ops=(("dense", "float16"),))
    assert p.to_dict()["ops"] == {"dense": "float16"} and p.to_dict()["data"] == "float32"
    assert "dense float16" in p.describe()


def test_rounded_reference_of_a_policy_starts_from_its_stored_values() -> None:
    net = _net("mse", softmax=True)
    c = compare(net, "autocast,fp8_e5m2", reference="rounded")
    # autocast stores parameters and data in float32: its exact reference is taken there
    from fpgrad.graph.layers import exact_trace
    from fpgrad.numbers.rounding import round_to
    from fpgrad.reference.exact import decimal_string

    ref = exact_trace(net.map_values(lambda a: round_to(a, "float32")))
    want = decimal_string(ref.trace.grads["fc1.weight"][0, 0], ref.digits["grads/fc1.weight"][0, 0])
    fc1 = c.gradient("fc1.weight", (0, 0))
    assert fc1["autocast"]["exact"] == want != fc1["fp8_e5m2"]["exact"]
    assert c.policies["fp8_e5m2"]["summary"] == "all fp8_e5m2"
    assert c.policies["autocast"]["data"] == "float32"


# ---- policies with emulated formats (every op in the strict machine) -------------------


def test_uniform_emulated_policy_equals_the_emulated_precision() -> None:
    net = _net("cross_entropy", seed=2)
    for fmt in ("fp8_e4m3", "bfloat16:emulated:per_op"):
        pol = parse_policy("u", {"params": fmt, "default": fmt})
        net_p = replace(net, policies={"u": pol})
        c = compare(net_p, f"{fmt},u")
        assert c.policies["u"]["summary"] == f"all {c.precisions[0]}"
        for g in c.gradients:
            assert g["u"]["value"] == g[c.precisions[0]]["value"] or (
                np.isnan(g["u"]["value"]) and np.isnan(g[c.precisions[0]]["value"])
            )
        assert c.loss["u"]["value"] == c.loss[c.precisions[0]]["value"]


def test_fp8_matmul_policy_casts_by_hand() -> None:
    # w = 1.0625 stored in float32; the dense layer computes in fp8_e4m3, where 1.0625 is the
    # midpoint of 1 and 1.125 and rounds to 1 (even). y = 1 * 3 = 3; the float32 loss gives
    # dL/dy = 2 y = 6 (exact in fp8); dL/dw = 6 * 3 = 18 in fp8, arriving in float32 as 18.
    # Exact: 2 * (1.0625 * 3) * 3 = 19.125.
    net = net_from(
        [{"type": "dense", "name": "d", "out": 1, "weight": [[1.0625]], "bias": False}],
        "mse",
        [[3.0]],
        [[0.0]],
    )
    pol = parse_policy("fp8mm", {"params": "float32", "dense": "fp8_e4m3", "loss": "float32"})
    assert pol.emulated
    net = replace(net, policies={"fp8mm": pol})
    plan = pol.resolve(net)
    assert plan.layers[0].compute == "fp8_e4m3" and plan.loss == "float32:emulated"
    c = compare(net, "fp8mm")
    g = c.gradient("d.weight", (0, 0))
    assert g["fp8mm"]["value"] == 18.0 and float(g["exact"]) == 19.125
    assert c.loss["fp8mm"]["value"] == 9.0
    assert c.policies["fp8mm"]["observed"]["d"]["compute"] == "fp8_e4m3"
    places = {(r["layer"], r["direction"]): r["format"] for r in c.attribution["fp8mm"]["places"]}
    assert places[("d", "forward")] == "fp8_e4m3"
    r = train(net, 2, OptimConfig(lr=2.0**-6), runs="fp8mm", perturb=False)
    # step 1: w = 1.0625 - 18 * 2^-6 = 0.78125 in float32 (the fp8 copy is used only inside)
    assert r.histories["fp8mm"].params[1][0] == 1.0625 - 18 * 2.0**-6


def test_emulated_policies_refuse_float64_and_advise_predicts_only() -> None:
    from fpgrad.diagnose.advisor import advise

    net = _net("mse")
    bad = parse_policy("b", {"params": "float64", "dense": "fp8_e5m2"})
    with pytest.raises(InputError, match="float64 cannot be emulated"):
        bad.resolve(net)
    with pytest.raises(InputError, match="not a policy precision"):
        parse_policy("c", {"dense": "fp9"})
    pol = parse_policy("e5", {"extends": "autocast", "dense": "fp8_e5m2"})
    a = advise(replace(net, policies={"e5": pol}), policy="e5")
    assert a.format == "fp8_e5m2 (policy e5)" and a.dynamic is None
    assert any("predicted only" in n for n in a.notes)


def test_rounded_reference_keeps_the_original_exact_column() -> None:
    from fpgrad.graph.layers import exact_trace
    from fpgrad.reference.exact import decimal_string

    net = _net("mse", seed=5)
    c = compare(net, "fp8_e4m3,float16", reference="rounded")
    ref = exact_trace(net)
    g = c.gradient("fc1.weight", (0, 0))
    want = decimal_string(ref.trace.grads["fc1.weight"][0, 0], ref.digits["grads/fc1.weight"][0, 0])
    assert g["exact"] == want != g["fp8_e4m3"]["exact"]
