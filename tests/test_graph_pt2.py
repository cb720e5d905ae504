"""``fpgrad compare model.pt2``: a torch.export.save'd program with its data TOML; hostile
archives are refused in one line and never unpickled."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.errors import InputError
from fpgrad.graph.native import native_run
from fpgrad.graph.pt2 import load_pt2

ROOT = Path(__file__).resolve().parents[1]
MARK: list[str] = []


def _mark(value: str) -> torch.Tensor:
    """Called only if a hostile pickle is unpickled without restriction."""
    MARK.append(value)
    return torch.zeros(1)


class _Boom:
    def __reduce__(self):  # noqa: ANN204
        return (_mark, ("unpickled",))


def _save(tmp: Path, toml: str | None = None) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(approximate="tanh"), nn.LayerNorm(6),
                          nn.Linear(6, 3))  # fmt: skip
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    torch.export.save(torch.export.export(model, (x,)), tmp / "model.pt2")
    np.save(tmp / "x.npy", x.numpy())
    np.save(tmp / "y.npy", y.numpy())
    text = toml or 'inputs = ["x.npy"]\ntargets = "y.npy"\nloss = "cross_entropy"\n'
    (tmp / "model.toml").write_text(text)
    return model, x, y


def test_program_gives_the_models_own_gradients(tmp_path: Path) -> None:
    model, x, y = _save(tmp_path)
    net = load_pt2(str(tmp_path / "model.pt2"))
    ref = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    assert net.param_names == ref.param_names
    for precision in ("float32", "float64"):
        a, b = native_run(net.graph, precision), native_run(ref.graph, precision)
        for name in net.param_names:
            np.testing.assert_array_equal(a.grads[name], b.grads[name])


def test_safetensors_inputs_and_options(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    model, x, y = _save(tmp_path)
    save_file({"x": x.numpy(), "y": y.numpy()}, str(tmp_path / "d.safetensors"))
    (tmp_path / "data.toml").write_text('inputs = "d.safetensors:x"\ntargets = '
                                        '"d.safetensors:y"\nloss = "cross_entropy"\n'
                                        'reduction = "sum"\nlabel_smoothing = 0.1\n')  # fmt: skip
    net = load_pt2(f"{tmp_path / 'model.pt2'}:{tmp_path / 'data.toml'}")
    ref = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1))
    a, b = native_run(net.graph, "float32"), native_run(ref.graph, "float32")
    for name in net.param_names:
        np.testing.assert_array_equal(a.grads[name], b.grads[name])


def _rewrite(src: Path, dst: Path, change: dict[str, bytes]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        names = [info.filename.split("/", 1)[1] for info in zin.infolist()]
        for info in zin.infolist():
            data = change.get(info.filename.split("/", 1)[1], zin.read(info.filename))
            zout.writestr(info, data)
        for name, data in change.items():
            if name not in names:
                zout.writestr(f"model/{name}", data)


def test_hostile_archives_are_refused_and_never_unpickled(tmp_path: Path) -> None:
    _save(tmp_path)
    src = tmp_path / "model.pt2"
    boom = pickle.dumps(_Boom(), protocol=2)
    good = zipfile.ZipFile(src)
    config = json.loads(good.read("model/data/weights/model_weights_config.json"))
    config["config"]["0.weight"]["use_pickle"] = True
    cases = {
        "sample inputs": {"data/sample_inputs/model.pt": boom},
        "a pickled weight": {
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            "data/weights/weight_0": boom,
        },
        "broken json": {"models/model.json": b"{not json"},
        "an opaque constant": {
            "data/constants/model_constants_config.json": json.dumps(
                {
                    "config": {
                        "evil": {
                            "path_name": "opaque_obj_0",
                            "is_param": False,
                            "use_pickle": True,
                            "tensor_meta": None,
                        }
                    }
                }
            ).encode(),
            "data/constants/opaque_obj_0": pickle.dumps(_Boom()),
        },  # fmt: skip
    }
    for what, change in cases.items():
        _rewrite(src, tmp_path / "model.pt2.tmp", change)
        (tmp_path / "model.pt2.tmp").replace(tmp_path / "bad.pt2")
        (tmp_path / "bad.toml").write_text((tmp_path / "model.toml").read_text())
        with pytest.raises(InputError) as info:
            load_pt2(str(tmp_path / "bad.pt2"))
        assert "\n" not in str(info.value), what
        if what in ("sample inputs", "a pickled weight"):
            assert "pickled object (tests.test_graph_pt2._mark)" in str(info.value), what
        if what == "an opaque constant":
            assert "never unpickles arbitrary objects" in str(info.value)
    assert MARK == []
    (tmp_path / "junk.pt2").write_bytes(b"\x80\x04not a zip")
    (tmp_path / "junk.toml").write_text((tmp_path / "model.toml").read_text())
    with pytest.raises(InputError, match="not a torch.export.save archive"):
        load_pt2(str(tmp_path / "junk.pt2"))


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('inputs = ["x.npy"]\ntargets = "y.npy"\nloss = "hinge"\n', "use one of"),
        ('inputs = ["x.npy"]\ntargets = "y.npy"\n', "needs loss"),
        ('inputs = ["x.npz"]\ntargets = "y.npy"\nloss = "mse"\n', "use a .npy or .safetensors"),
        ('inputs = ["x.npy"]\ntargets = "y.npy"\nloss = "mse"\ndelta = 1.0\n', "'huber' only"),
        ('inputs = ["x.npy"]\ntargets = "y.npy"\nloss = "mse"\nseed = 1\n', "unknown key"),
    ],
)
def test_bad_data_files(tmp_path: Path, toml: str, message: str) -> None:
    _save(tmp_path, toml)
    with pytest.raises(InputError, match=message):
        load_pt2(str(tmp_path / "model.pt2"))


def test_cli_one_line_exit_2(tmp_path: Path) -> None:
    _save(tmp_path)
    (tmp_path / "model.toml").unlink()
    proc = subprocess.run([sys.executable, "-m", "fpgrad", "compare", str(tmp_path / "model.pt2")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "data file" in proc.stderr and "Traceback" not in proc.stderr
