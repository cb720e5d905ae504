"""Bring your own model: torch modules and state dicts become fpgrad networks.

Every supported module type round-trips: fpgrad's torch-native evaluation of the imported
network gives the original module's output, loss and gradients bit for bit in float16,
bfloat16, float32 and float64 (both on one torch thread: torch's batch-norm kernel sums in a
thread-dependent order). Unsupported modules are named, and files are never unpickled beyond tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fpgrad.cli import main
from fpgrad.errors import InputError
from fpgrad.model.from_torch import (
    import_module,
    load_model_file,
    load_state_dict,
    network_from_module,
    write_network,
)
from fpgrad.model.netfile import load_network
from fpgrad.run.torch_native import one_torch_thread, torch_trace


class Chain(nn.Module):
    """A module that is not a Sequential: its forward is followed by torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.flatten(x, 1)
        h = torch.tanh(F.leaky_relu(self.fc1(h), 0.3))
        return F.softmax(self.fc2(F.relu(h)), dim=-1)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


def _bn(**kw: Any) -> nn.Module:
    bn = nn.BatchNorm1d(5, **kw)
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            if bn.bias is not None:
                bn.bias.uniform_(-1.0, 1.0)
    return bn


# name: (module builder, input shape, loss, target kind)
CASES: dict[str, tuple[Any, tuple[int, ...], str, str]] = {
    "linear": (lambda: nn.Linear(4, 3), (6, 4), "mse", "real"),
    "linear_no_bias": (lambda: nn.Sequential(nn.Linear(4, 3, bias=False)), (6, 4), "mse", "real"),
    "relu": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)),
        (6, 4),
        "cross_entropy",
        "class",
    ),
    "leaky_relu": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.LeakyReLU(0.2), nn.Linear(5, 3)),
        (6, 4),
        "mse",
        "real",
    ),
    "sigmoid": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)),
        (6, 4),
        "bce",
        "binary",
    ),
    "tanh": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
        (6, 4),
        "cross_entropy",
        "probs",
    ),
    "batch_norm": (
        lambda: nn.Sequential(nn.Linear(4, 5), _bn(), nn.ReLU(), nn.Linear(5, 3)),
        (8, 4),
        "cross_entropy",
        "class",
    ),
    "batch_norm_no_stats": (
        lambda: nn.Sequential(nn.Linear(4, 5), _bn(track_running_stats=False), nn.Linear(5, 2)),
        (8, 4),
        "mse",
        "real",
    ),
    "batch_norm_affine_false": (
        lambda: nn.Sequential(nn.Linear(4, 5), _bn(affine=False), nn.Linear(5, 2)),
        (8, 4),
        "mse",
        "real",
    ),
    "batch_norm_bias_false": (
        lambda: nn.Sequential(nn.Linear(4, 5), _bn(bias=False), nn.Linear(5, 2)),
        (8, 4),
        "mse",
        "real",
    ),
    "softmax": (
        lambda: nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1)),
        (6, 4),
        "mse",
        "real",
    ),
    "softmax_last_dim": (
        lambda: nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1)),
        (6, 4),
        "mse",
        "real",
    ),
    "log_softmax_nll": (
        lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.LogSoftmax(dim=1)),
        (6, 4),
        "nll",
        "class",
    ),
    "flatten_identity_dropout": (
        lambda: nn.Sequential(
            nn.Flatten(), nn.Identity(), nn.Linear(12, 4), nn.Dropout(p=0.0), nn.Linear(4, 3)
        ),
        (6, 3, 4),
        "cross_entropy",
        "class",
    ),
    "dropout_eval": (
        lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(p=0.5).eval(), nn.Linear(4, 2)),
        (6, 4),
        "mse",
        "real",
    ),
    "nested": (
        lambda: nn.Sequential(
            nn.Sequential(nn.Linear(4, 5), nn.Tanh()), nn.Sequential(nn.Linear(5, 3))
        ),
        (6, 4),
        "cross_entropy",
        "class",
    ),
    "fx_chain": (Chain, (6, 3, 4), "mse", "real"),
}


def _targets(kind: str, batch: int, width: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "class":
        return torch.arange(batch) % width
    if kind == "probs":
        return torch.softmax(torch.randn(batch, width, generator=gen), dim=1)
    if kind == "binary":
        return (torch.rand(batch, width, generator=gen) > 0.5).double()
    return torch.randn(batch, width, generator=gen)


def _reference(module: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> Any:
    with one_torch_thread():
        out = module(x)
        if loss == "mse":
            value = F.mse_loss(out, y)
        elif loss == "bce":
            value = F.binary_cross_entropy_with_logits(out, y)
        elif loss == "nll":
            value = F.nll_loss(out, y)
        else:
            value = F.cross_entropy(out, y)
        value.backward()
    return out, value


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bitwise(case: str, dtype: torch.dtype) -> None:
    build, shape, loss, target = CASES[case]
    torch.manual_seed(1)
    module = build().to(dtype)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=gen).to(dtype)
    width = 3 if case not in ("sigmoid", "batch_norm_no_stats", "dropout_eval") else 2
    if "affine_false" in case or "bias_false" in case:
        width = 2
    y = _targets(target, shape[0], width, gen)
    if y.is_floating_point():
        y = y.to(dtype)
    imported = import_module(module, x, y, loss)
    net = imported.network
    precision = str(dtype).removeprefix("torch.")
    trace = torch_trace(net, precision)
    out, value = _reference(module, x, y, loss)

    assert trace.loss == value.item()
    if loss != "nll":  # with NLL the module's output is log-probabilities, fpgrad's the logits
        last = net.layers[-1].name
        assert np.array_equal(trace.forward[last], out.detach().double().numpy())
    torch_params = dict(module.named_parameters())
    compared = 0
    for ours, theirs in imported.param_names.items():
        if theirs in torch_params:
            g = torch_params[theirs].grad.double().numpy()
            assert np.array_equal(trace.grads[ours], g), (case, ours)
            compared += 1
        else:  # gamma = 1, beta = 0 of BatchNorm1d(affine=False) / bias=False
            assert "affine" in case or "bias_false" in case
    assert compared == len(torch_params)


def test_batch_norm_uses_batch_statistics_not_running_ones() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with torch.no_grad():  # running statistics far from the batch's: they must not be used
        model[1].running_mean.fill_(100.0)
        model[1].running_var.fill_(1e-6)
    x = torch.randn(5, 3, dtype=torch.float64)
    model = model.double()
    net = network_from_module(model, x, torch.zeros(5, 1, dtype=torch.float64), "mse")
    out, _ = _reference(model, x, torch.zeros(5, 1, dtype=torch.float64), "mse")
    assert np.array_equal(torch_trace(net, "float64").forward["2"], out.detach().numpy())
    model.eval()  # eval mode: the running statistics (tests/test_eval_batchnorm.py)
    assert network_from_module(model, x, torch.zeros(5, 1), "mse").layers[1].kind == (
        "batch_norm_eval"
    )


def test_names_follow_the_state_dict() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 3), nn.ReLU()), nn.Linear(3, 2))
    imported = import_module(model, torch.ones(2, 2), torch.tensor([0, 1]))
    assert [ly.name for ly in imported.network.layers] == ["0_0", "0_1", "1"]
    assert imported.param_names == {
        "0_0.weight": "0.0.weight",
        "0_0.bias": "0.0.bias",
        "1.weight": "1.weight",
        "1.bias": "1.bias",
    }


def test_weights_and_data_are_widened_exactly() -> None:
    lin = nn.Linear(3, 2).to(torch.bfloat16)
    x = torch.tensor([[1 / 3, 1e-30, 2.0**-140]], dtype=torch.float32)
    net = network_from_module(lin, x, torch.zeros(1, 2), "mse")
    assert np.array_equal(net.params["dense0.weight"], lin.weight.double().detach().numpy())
    assert np.array_equal(net.x, x.double().numpy())  # float32 subnormal kept exactly


@pytest.mark.parametrize(
    ("model", "loss", "message"),
    [
        (
            lambda: nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 1)),
            "mse",
            "unsupported module 'Conv1d' at index 1 (1); fpgrad supports: Linear",
        ),
        (
            lambda: nn.Sequential(
                nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Sequential(nn.Linear(4, 4), nn.ELU())
            ),
            "mse",
            "unsupported module 'ELU' at index 3 (1.1)",
        ),
        (Residual, "mse", "is not a chain at node 'add'"),
        (
            lambda: nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=0)),
            "mse",
            "dim=0 normalises over the batch",
        ),
        (
            lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)),
            "mse",
            "Dropout(p=0.5) in training mode is random",
        ),
        (
            lambda: nn.Sequential(nn.Linear(4, 4), nn.LogSoftmax(dim=1), nn.Linear(4, 4)),
            "cross_entropy",
            "LogSoftmax at index 1 (1) is supported only as the last module with NLLLoss",
        ),
        (lambda: nn.Linear(4, 4), "nll", "NLLLoss needs log-probabilities"),
        (lambda: nn.Linear(4, 4), nn.BCELoss(), "BCELoss takes probabilities"),
        (lambda: nn.Linear(4, 4), nn.L1Loss(), "unsupported loss L1Loss"),
        (lambda: nn.Linear(4, 4), nn.MSELoss(reduction="sum"), "fpgrad's losses take the mean"),
        (lambda: nn.Linear(4, 4), "hinge", "unknown loss 'hinge'"),
        (
            lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(5, 2)),
            "mse",
            "weight has shape [2, 5] but the input has 3 features",
        ),
    ],
)
def test_refused_models_are_named(model: Any, loss: Any, message: str) -> None:
    with pytest.raises(InputError) as info:
        network_from_module(model(), torch.randn(6, 4), torch.randn(6, 4), loss)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unsupported_function_in_forward_is_named() -> None:
    class Gelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.gelu(self.fc(x))

    with pytest.raises(InputError, match=r"unsupported operation 'call_function gelu' at index 1"):
        network_from_module(Gelu(), torch.randn(3, 4), torch.randn(3, 2), "mse")


def test_data_must_be_two_dimensional_without_flatten() -> None:
    with pytest.raises(InputError, match=r"start the model with nn.Flatten\(\)"):
        network_from_module(nn.Linear(4, 2), torch.randn(3, 2, 2), torch.randn(3, 2), "mse")


# ---- state dicts and model files ----------------------------------------------------------------


def _save_model(tmp_path: Path, modules: list[str], sd: dict[str, Any], **extra: str) -> Path:
    torch.save(sd, tmp_path / "model.pt")
    np.save(tmp_path / "x.npy", np.linspace(-1, 1, 24).reshape(6, 4))
    np.save(tmp_path / "y.npy", np.arange(6) % 3)
    lines = [f"{k} = {v}" for k, v in extra.items()]
    lines += [
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


def _mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))


def _same(a: Any, b: Any) -> None:
    assert [ly.kind for ly in a.layers] == [ly.kind for ly in b.layers]
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert a.loss == b.loss


@pytest.mark.parametrize(
    "modules",
    [
        ["Linear(4, 5)", "BatchNorm1d(5)", "Tanh()", "Linear(5, 3)"],
        ["Linear", "BatchNorm1d", "Tanh", "Linear"],  # shapes from the state dict
        [  # the lines of print(model)
            "(0): Linear(in_features=4, out_features=5, bias=True)",
            "(1): BatchNorm1d(5, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)",
            "(2): Tanh()",
            "(3): Linear(in_features=5, out_features=3, bias=True)",
        ],
    ],
)
def test_model_file_equals_the_module(tmp_path: Path, modules: list[str]) -> None:
    model = _mlp()
    path = _save_model(tmp_path, modules, model.state_dict())
    from_file = load_model_file(path).network
    x = np.linspace(-1, 1, 24).reshape(6, 4)
    direct = network_from_module(model, x, np.arange(6) % 3)
    _same(from_file, direct)


def test_model_file_with_paths_and_checkpoint_key(tmp_path: Path) -> None:
    model = Chain()
    sd = {"model": model.state_dict(), "epoch": torch.tensor(3)}
    path = _save_model(
        tmp_path,
        [
            "fc1: Linear(12, 5)",
            "LeakyReLU(0.3)",
            "Tanh()",
            "ReLU()",
            "fc2: Linear",
            "Softmax(dim=1)",
        ],
        sd,
        state_dict_key='"model"',
    )
    np.save(tmp_path / "x.npy", np.linspace(-1, 1, 72).reshape(6, 3, 4))
    with pytest.raises(InputError, match=r"start the model with nn.Flatten"):
        load_model_file(path)
    text = path.read_text().replace('"fc1: Linear(12, 5)"', '"Flatten()", "fc1: Linear(12, 5)"')
    path.write_text(text)
    net = load_model_file(path).network
    direct = network_from_module(model, np.linspace(-1, 1, 72).reshape(6, 3, 4), np.arange(6) % 3)
    assert [ly.kind for ly in net.layers] == [ly.kind for ly in direct.layers]
    for a, b in zip(net.params.values(), direct.params.values(), strict=True):
        assert np.array_equal(a, b)


def test_import_writes_an_exact_network_file(tmp_path: Path, capsys: Any) -> None:
    model = _mlp()
    path = _save_model(tmp_path, ["Linear", "BatchNorm1d", "Tanh", "Linear"], model.state_dict())
    out = tmp_path / "out" / "net.toml"
    assert main(["import", str(path), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    _same(load_network(out), load_model_file(path).network)
    files = write_network(load_model_file(path), tmp_path / "big.toml", data="npy")
    assert files[1].endswith("big.x.npy")
    _same(load_network(tmp_path / "big.toml"), load_model_file(path).network)
    # every command takes the model file directly
    assert main(["compare", str(path), "--precisions", "float16,float32"]) == 0
    assert "Gradient verdicts" in capsys.readouterr().out


def _one_line_error(args: list[str], capsys: Any, *needles: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fpgrad: error: "), err
    for n in needles:
        assert n in err, (n, err)


class Payload:
    """An object whose unpickling would create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_unexecuted(tmp_path: Path, capsys: Any) -> None:
    marker = tmp_path / "pwned"
    path = _save_model(tmp_path, ["Linear(4, 3)"], {})
    torch.save({"0.weight": torch.zeros(3, 4), "x": Payload(marker)}, tmp_path / "model.pt")
    _one_line_error(
        ["compare", str(path)], capsys, "torch.load(weights_only=True) refused it", "state_dict()"
    )
    assert not marker.exists()
    torch.save(nn.Linear(4, 3), tmp_path / "model.pt")  # a whole pickled module
    _one_line_error(["compare", str(path)], capsys, "refused it", "torch.nn.modules.linear.Linear")
    with pytest.raises(InputError, match="refused"):
        load_state_dict(tmp_path / "model.pt")


@pytest.mark.parametrize(
    ("modules", "sd", "needles"),
    [
        (["Linear(4, 3)"], {"1.weight": torch.zeros(3, 4)}, ["has no '0.weight'", "1.weight"]),
        (
            ["Linear(4, 5)"],
            {"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(3)},
            ["expects 0.weight of shape [5, 4] but the state dict holds [3, 4]"],
        ),
        (
            ["Linear(4, 3)"],
            {"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(3), "2.weight": torch.ones(1)},
            ["state dict key '2.weight' belongs to no module"],
        ),
        (["Linear(4, 3)", "Conv2d(1, 1, 3)"], {}, ["modules[1]: unsupported module 'Conv2d'"]),
        (["Linear(__import__('os').getcwd())"], {}, ["must be literals"]),
        (["Linear(4, 3, dtype='float16')"], {}, ["drop dtype="]),
        (["Linear(4, 3, nonsense=1)"], {}, ["modules[0]", "nonsense"]),
        (["Sequential(Linear(4, 3))"], {}, ["list the modules inside it one by one"]),
        (["Dropout(p=1.5)"], {}, ["modules[0]", "between 0 and 1"]),
        (
            ["Linear(4, 3)"],
            {"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(3, dtype=torch.int64)},
            ["needs floating-point weights"],
        ),
    ],
)
def test_bad_model_files_are_one_line_errors(
    tmp_path: Path, capsys: Any, modules: list[str], sd: dict[str, Any], needles: list[str]
) -> None:
    path = _save_model(tmp_path, modules, sd)
    _one_line_error(["compare", str(path)], capsys, *needles)


def test_bad_files_around_the_model(tmp_path: Path, capsys: Any) -> None:
    path = _save_model(tmp_path, ["Linear(4, 3)"], nn.Linear(4, 3).state_dict() | {})
    sd = {"0." + k: v for k, v in nn.Linear(4, 3).state_dict().items()}
    torch.save({"model": sd, "step": 3}, tmp_path / "model.pt")
    _one_line_error(["compare", str(path)], capsys, "state_dict_key = 'model'")
    (tmp_path / "model.pt").write_bytes(b"not a torch file")
    _one_line_error(["compare", str(path)], capsys, "not a state dict file of torch.save")
    (tmp_path / "model.pt").unlink()
    _one_line_error(["compare", str(path)], capsys, "No such file")
    text = path.read_text()
    path.write_text(text.replace('state_dict = "model.pt"\n', ""))
    _one_line_error(["advise", str(path)], capsys, "model file needs state_dict")
    path.write_text("extra = 1\n" + text)
    _one_line_error(["import", str(path), "--out", str(tmp_path / "n.toml")], capsys, "'extra'")
    torch.save(sd, tmp_path / "model.pt")
    path.write_text(text.replace('type = "cross_entropy"', 'type = "hinge"'))
    _one_line_error(["compare", str(path)], capsys, "unknown loss 'hinge'")
    path.write_text(text)
    np.save(tmp_path / "y.npy", np.arange(6) + 5)
    _one_line_error(["compare", str(path)], capsys, "class indices 0..2")


def test_safetensors_state_dict(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    model = _mlp()
    path = _save_model(tmp_path, ["Linear", "BatchNorm1d", "Tanh", "Linear"], {})
    st.save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    path.write_text(path.read_text().replace('"model.pt"', '"model.safetensors"'))
    direct = network_from_module(model, np.linspace(-1, 1, 24).reshape(6, 4), np.arange(6) % 3)
    _same(load_model_file(path).network, direct)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a safetensors file"):
        load_model_file(path)


def test_model_file_policies_name_torch_paths_and_survive_import(tmp_path: Path) -> None:
    from fpgrad.diagnose.comparison import compare
    from fpgrad.model.from_torch import network_toml
    from fpgrad.model.netfile import load_network

    path = _save_model(
        tmp_path, ["Linear(4, 5)", "BatchNorm1d(5)", "Tanh()", "Linear(5, 3)"], _mlp().state_dict()
    )
    path.write_text(
        path.read_text() + '[policy.head32]\nextends = "autocast"\nlayers = { "3" = "float32" }\n'
    )
    imported = load_model_file(path)
    net = imported.network
    plan = net.policies["head32"].resolve(net)
    head = plan.layers[-1]
    assert imported.origin[head.layer] == "3" and head.compute == "float32"
    assert plan.layers[0].compute == "float16"
    c = compare(net, "head32")
    assert c.policies["head32"]["observed"][head.layer]["compute"] == "float32"
    out = tmp_path / "net.toml"
    out.write_text(network_toml(imported))
    again = load_network(out)
    assert again.policies["head32"].resolve(again) == plan
    bad = path.read_text().replace('"3" = "float32"', '"9" = "float32"')
    path.write_text(bad)
    with pytest.raises(InputError, match="no layer named '9'"):
        load_model_file(path)


def _dropout_mlp() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(4, 5), nn.Dropout(p=0.2), nn.ReLU(), nn.Linear(5, 3))


def test_dropout_line_is_the_identity_as_in_eval_mode(tmp_path: Path, capsys: Any) -> None:
    from fpgrad.diagnose.comparison import compare

    model = _dropout_mlp()
    lines = [f"({i}): {m!r}" for i, m in enumerate(model)]  # the lines of print(model)
    assert lines[1] == "(1): Dropout(p=0.2, inplace=False)"
    path = _save_model(tmp_path, lines, model.state_dict())
    imported = load_model_file(path)
    x = np.linspace(-1, 1, 24).reshape(6, 4)
    _same(imported.network, network_from_module(model.eval(), x, np.arange(6) % 3))
    note = "modules[1] Dropout(p=0.2): evaluated as in eval mode, the identity"
    assert any(note in n for n in imported.notes) and imported.network.notes == tuple(
        imported.notes
    )
    assert any(note in n for n in compare(imported.network, "float32").notes)
    assert main(["compare", str(path), "--precisions", "float32"]) == 0
    assert f"note: {note}" in capsys.readouterr().out
    # the short form, and mode = "eval" (no batch norm to refuse)
    path = _save_model(
        tmp_path,
        ["Linear(4, 5)", "Dropout(p=0.2)", "ReLU()", "3: Linear"],
        model.state_dict(),
        mode='"eval"',
    )
    _same(load_model_file(path).network, imported.network)


def test_eval_mode_batch_norm_uses_running_statistics(tmp_path: Path, capsys: Any) -> None:
    modules = ["Linear(4, 5)", "BatchNorm1d(5)", "Tanh()", "Linear(5, 3)"]
    path = _save_model(tmp_path, modules, _mlp().state_dict(), mode='"eval"')
    assert load_model_file(path).network.layers[1].kind == "batch_norm_eval"
    # without running statistics torch's eval mode uses the batch statistics: accepted
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Tanh(), nn.Linear(5, 3)
    )
    modules[1] = "BatchNorm1d(5, track_running_stats=False)"
    path = _save_model(tmp_path, modules, model.state_dict(), mode='"eval"')
    x = np.linspace(-1, 1, 24).reshape(6, 4)
    _same(load_model_file(path).network, network_from_module(model.eval(), x, np.arange(6) % 3))
    path = _save_model(tmp_path, modules, model.state_dict(), mode='"inference"')
    _one_line_error(["compare", str(path)], capsys, "mode = 'inference'", '"train"', '"eval"')
    path = _save_model(tmp_path, modules, model.state_dict(), mode="1")
    _one_line_error(["compare", str(path)], capsys, "mode = 1")


_SOFTMAX_NET = """name = "twice"
[[layer]]
type = "dense"
name = "fc"
weight = [[1.0, -2.0], [0.5, 3.0]]
bias = [0.0, 0.25]
[[layer]]
type = "softmax"
name = "probs"
[loss]
type = "{loss}"
[data]
x = [[1.0, 0.5], [-1.0, 2.0]]
y = {y}
"""


def test_softmax_before_cross_entropy_warns(tmp_path: Path, capsys: Any) -> None:
    net = tmp_path / "net.toml"
    net.write_text(_SOFTMAX_NET.format(loss="cross_entropy", y="[0, 1]"))
    assert main(["compare", str(net), "--precisions", "float32"]) == 0
    captured = capsys.readouterr()
    warning = "layer 'probs': a softmax before cross_entropy applies softmax twice"
    assert captured.err.strip().splitlines() == [
        f"fpgrad: warning: {warning} (cross_entropy takes logits and applies its own); "
        "remove the softmax layer"
    ]
    assert f"note: warning: {warning}" in captured.out
    # a model file (Softmax last, cross_entropy), through import too
    model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1))
    path = _save_model(tmp_path, ["Linear(4, 3)", "Softmax(dim=1)"], model.state_dict())
    assert main(["import", str(path), "--out", str(tmp_path / "out.toml")]) == 0
    assert "softmax before cross_entropy applies softmax twice" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "out.toml"), "--precisions", "float32"]) == 0
    assert "layer '1': a softmax before cross_entropy" in capsys.readouterr().err
    # softmax under mse, and cross_entropy on logits: no warning
    net.write_text(_SOFTMAX_NET.format(loss="mse", y="[[1.0, 0.0], [0.0, 1.0]]"))
    assert main(["compare", str(net), "--precisions", "float32"]) == 0
    assert "warning" not in capsys.readouterr().err
    path = _save_model(tmp_path, ["Linear(4, 3)"], nn.Sequential(nn.Linear(4, 3)).state_dict())
    assert main(["compare", str(path), "--precisions", "float32"]) == 0
    assert "warning" not in (out := capsys.readouterr()).err and "warning" not in out.out
