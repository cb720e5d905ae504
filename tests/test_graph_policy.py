"""Precision policies, loss scales and the rounded reference on captured models
(fpgrad/graph/policy.py, fpgrad/graph/native.py, fpgrad/graph/compare.py)."""

from __future__ import annotations

import json
import operator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.cli import main
from fpgrad.errors import InputError
from fpgrad.graph.capture import OpRecorder
from fpgrad.graph.compare import compare_graph
from fpgrad.graph.native import model_in, native_run
from fpgrad.graph.policy import resolve
from fpgrad.model.policy import BUILTIN, parse_policy
from fpgrad.run.torch_native import one_torch_thread
from tests.graph_models import residual_mlp, transformer_block

_CASTS = {"aten._to_copy.default", "aten.detach.default", "aten.alias.default"}
_NOT_IN_GRAPH = {*_CASTS, "aten.lift_fresh.default"}  # torch.from_numpy in the test's own run


@pytest.fixture(scope="module")
def mlp() -> fpgrad.GraphNetwork:
    model, x, y = residual_mlp()
    policies = {
        "head32": {"params": "float16", "default": "float16", "layers": {"head": "float32"}},
        "dense_bf16": {"params": "float32", "dense": "bfloat16"},
        "all32": {"params": "float32", "default": "float32"},
    }
    return fpgrad.from_module(model, x * 1e-3, y, nn.CrossEntropyLoss(), policies=policies)


def _eager_autocast(net: fpgrad.GraphNetwork, dtype: torch.dtype) -> tuple[dict, list]:
    """The user's own code: float32 model, torch.autocast('cpu'), loss.backward()."""
    g = net.graph
    model = model_in(g, "float32")
    inputs = [
        torch.from_numpy(a).float() if a.dtype.kind == "f" else torch.from_numpy(a)
        for a in g.inputs
    ]
    with one_torch_thread():
        with torch.autocast("cpu", dtype=dtype):
            loss = g.loss_fn(model(*inputs), torch.from_numpy(g.targets))
        loss.backward()
    grads = {n: p.grad.double().numpy() for n, p in model.named_parameters()}
    rec = OpRecorder()  # every op of the same run by autograd.grad (no .grad accumulation)
    with one_torch_thread(), rec:
        with torch.autocast("cpu", dtype=dtype):
            loss = g.loss_fn(model(*inputs), torch.from_numpy(g.targets))
        again = torch.autograd.grad(loss, list(model.parameters()))
    for (n, g2), a in zip(grads.items(), again, strict=True):
        assert np.array_equal(g2, a.double().numpy()), n
    outs = [r[1] for r in rec.records if str(r[0]) not in _NOT_IN_GRAPH]
    return grads, outs


@pytest.mark.parametrize("name", ["autocast_cpu", "autocast_cpu_bf16"])
def test_cpu_autocast_is_bit_identical_to_torch_autocast(mlp, name: str) -> None:
    dtype = torch.float16 if name == "autocast_cpu" else torch.bfloat16
    grads, outs = _eager_autocast(mlp, dtype)
    plan = resolve(BUILTIN[name], mlp.graph)
    assert plan.how == "autocast"
    tr = native_run(mlp.graph, name, plan=plan)
    for k, g in grads.items():
        assert np.array_equal(tr.grads[k], g), k
    # intermediates: every op's output, in graph order, equals the user's eager run's
    ours = [
        n.name
        for n in mlp.graph.ops
        if n.target is not operator.getitem and str(n.target) not in _CASTS
    ]
    floats = [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]
    mine = [
        v
        for v in (tr.values.get(n) for n in ours)
        if isinstance(v, np.ndarray) and v.dtype.kind == "f"
    ]
    assert len(floats) == len(mine) > 100
    for a, b in zip(floats, mine, strict=True):
        assert np.array_equal(a.detach().double().numpy(), b, equal_nan=True)
    # the same lists by fpgrad's per-op casts (a user policy extending the built-in)
    own = parse_policy("mine", {"extends": name})
    plan2 = resolve(own, mlp.graph)
    assert plan2.how == "cast" and plan2.dtypes
    tr2 = native_run(mlp.graph, "mine", plan=plan2)
    for k, g in grads.items():
        assert np.array_equal(tr2.grads[k], g), k
    low = "float16" if dtype == torch.float16 else "bfloat16"
    assert tr.formats["grads/head.weight"] == low
    assert tr.formats["grads/blocks.0.norm.weight"] == "float32"  # RMSNorm's mul: not listed


def test_cast_mode_matches_autocast_on_the_transformer_block() -> None:
    model, inputs, targets = transformer_block()
    net = fpgrad.from_module(model, inputs, targets, nn.CrossEntropyLoss())
    real = native_run(net.graph, "a", plan=resolve(BUILTIN["autocast_cpu_bf16"], net.graph))
    cast = resolve(parse_policy("m", {"extends": "autocast_cpu_bf16"}), net.graph)
    mine = native_run(net.graph, "m", plan=cast)
    for k in net.param_names:
        assert np.array_equal(real.grads[k], mine.grads[k]), k


def test_policy_by_module_path_and_op_class(mlp) -> None:
    r = compare_graph(mlp, "head32,dense_bf16,all32,float32")
    f = r.formats
    assert f["head32"]["head.weight"] == "float32" and f["head32"]["inp.weight"] == "float16"
    assert f["head32"]["blocks.0.norm.weight"] == "float16"
    assert f["dense_bf16"]["inp.weight"] == "bfloat16"
    assert f["dense_bf16"]["blocks.1.norm.weight"] == "float32"
    # a policy casting everything to float32 is the float32 column, bit for bit
    for k in mlp.param_names:
        assert np.array_equal(r.grads["all32"][k], r.grads["float32"][k]), k
    assert r.policies["head32"]["how"] == "cast"
    plan = resolve(mlp.policies["head32"], mlp.graph)
    rules = {plan.rules[n] for n, p in mlp.graph.paths.items() if p == "head" and n in plan.rules}
    assert rules == {"module head"}  # its forward and its backward ops


def test_cuda_lists_cast_per_op(mlp) -> None:
    plan = resolve(BUILTIN["autocast"], mlp.graph)
    assert plan.how == "cuda"
    by_op: dict[str, set[str]] = {}
    for node in mlp.graph.ops:
        if node.name in plan.dtypes:
            by_op.setdefault(str(node.target).split(".")[1], set()).add(plan.dtypes[node.name])
    assert by_op["addmm"] == {"float16"} and by_op["rsqrt"] == {"float32"}
    assert by_op["_log_softmax"] == {"float32"} and "mean" not in by_op
    r = compare_graph(mlp, "autocast")
    assert "no GPU ran" in r.policies["autocast"]["ran"]


def test_loss_scale_scales_the_backward(mlp) -> None:
    s = 2.0**12
    tr = native_run(mlp.graph, "float16", loss_scale=s)
    model = model_in(mlp.graph, "float16")
    x = torch.from_numpy(mlp.graph.inputs[0]).half()
    with one_torch_thread():
        (nn.CrossEntropyLoss()(model(x), torch.from_numpy(mlp.graph.targets)) * s).backward()
    for k, p in model.named_parameters():
        assert np.array_equal(tr.grads[k], p.grad.double().numpy()), k
    one = compare_graph(mlp, "float32:emulated,float16")
    four = compare_graph(mlp, "float32:emulated,float16", loss_scale=4.0)
    for k in mlp.param_names:  # a power of two commutes with rounding away from the range ends
        g1 = one.grads["float32:emulated"][k]
        assert np.array_equal(four.grads["float32:emulated"][k], 4 * g1), k
    assert four.loss_scale == 4.0 and any("loss scale 4" in n for n in four.notes)
    big = compare_graph(mlp, "float16", loss_scale=s)
    assert big.counts("float16")["subnormal"] < one.counts("float16")["subnormal"]
    with pytest.raises(InputError, match="power of two"):
        compare_graph(mlp, "float16", loss_scale=3.0)


def test_rounded_reference(mlp) -> None:
    orig = compare_graph(mlp, "float16,float64")
    r = compare_graph(mlp, "float16,float64", reference="rounded")
    assert set(r.references) == {"float16", "float64"} and r.reference == "rounded"
    ex16 = r.references["float16"].arrays["grads/inp.weight"].hi
    assert not np.array_equal(ex16, orig.exact.arrays["grads/inp.weight"].hi)
    # float64 holds the values as written: its own reference is the original one
    for k in mlp.param_names:
        a = r.references["float64"].arrays[f"grads/{k}"]
        b = orig.exact.arrays[f"grads/{k}"]
        assert np.array_equal(a.hi, b.hi) and np.array_equal(a.lo, b.lo), k
    with pytest.raises(InputError, match="unknown reference"):
        compare_graph(mlp, "float16", reference="bogus")


def test_policy_refusals(mlp) -> None:
    emu = replace(mlp.policies["head32"], name="e", default="fp8_e4m3")
    with pytest.raises(InputError, match="emulated format"):
        resolve(emu, mlp.graph)
    bad = parse_policy("p", {"layers": {"nohere": "float32"}})
    with pytest.raises(InputError, match="no module path 'nohere'.*head"):
        resolve(bad, mlp.graph)
    with pytest.raises(InputError, match="unknown precision 'nosuch'"):
        compare_graph(mlp, "nosuch")


SCRIPT = """
import torch
from torch import nn

POLICIES = {"head32": {"params": "float16", "default": "float16", "layers": {"2": "float32"}}}

def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3) * 1e-4
    return model, x, torch.tensor([0, 1, 1, 0, 1]), nn.CrossEntropyLoss()
"""


def test_cli_policies_loss_scale_reference_and_advise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "net.py"
    script.write_text(SCRIPT)
    args = ["compare", f"{script}:build", "--precisions", "float16", "--policy",
            "autocast,head32", "--loss-scale", "256", "--reference", "rounded", "--json"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["loss_scale"] == 256 and out["reference"] == "rounded"
    assert out["policies"]["head32"]["gradient_formats"]["2.weight"] == "float32"
    assert out["policies"]["head32"]["gradient_formats"]["0.weight"] == "float16"
    assert main(["advise", f"{script}:build", "--json"]) == 0
    adv = json.loads(capsys.readouterr().out)
    assert adv["safe"] is not None and adv["sizes"]["gradients"]["nonzero"] == 3 * 4 + 4 + 4 * 2 + 2
    low, high = adv["safe"]
    assert low <= adv["recommended"]["exponent"] <= high
    rows = {r["exponent"]: r for r in adv["rows"]}
    assert rows[high]["measured"]["nonfinite"] == 0  # torch agrees: nothing overflows there
    assert main(["advise", f"{script}:build", "--policy", "head32", "--json"]) == 0
    adv = json.loads(capsys.readouterr().out)
    assert adv["format"] == "float16 (policy head32)"
    assert adv["sizes"]["gradients"]["elements"] == 3 * 4 + 4  # layer 2 is float32: not judged
    assert main(["advise", f"{script}:build", "--signals"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drop --signals" in err
    assert main(["policies", "--network", f"{script}:build", "head32", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["head32"]["modules"]
    assert set(shown["2"]) == {"float32"} and set(shown["0"]) == {"float16"}
    assert main(["compare", f"{script}:build", "--policy", "nope"]) == 2
    assert "unknown precision 'nope'" in capsys.readouterr().err


def test_layer_norm_op_class_on_the_transformer_block() -> None:
    model, inputs, targets = transformer_block()
    pol = parse_policy(
        "ln32", {"params": "bfloat16", "default": "bfloat16", "layer_norm": "float32"}
    )
    net = fpgrad.from_module(model, inputs, targets, nn.CrossEntropyLoss(), policies={"ln32": pol})
    plan = resolve(pol, net.graph)
    ln = {n: plan.dtypes[n] for n, p in net.graph.paths.items() if "layer_norm" in n}
    assert ln and set(ln.values()) == {"float32"}  # forward and backward of both LayerNorms
    tr = native_run(net.graph, "ln32", plan=plan)
    assert tr.formats["grads/ln1.weight"] == "float32"
    assert tr.formats["grads/mlp.0.weight"] == "bfloat16"
