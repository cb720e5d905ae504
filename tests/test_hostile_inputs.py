"""Hostile inputs found by the hostile-input round (branch hostile): each is refused in one
line with exit 2 at the command line, or with fpgrad's InputError in the Python API, never a
traceback, an internal error or a silently wrong table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import fpgrad
from fpgrad.cli import main
from fpgrad.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SHOWCASE = str(ROOT / "fpgrad" / "examples" / "showcase.toml")

SCRIPT = """
import torch


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    return model, torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]), torch.nn.CrossEntropyLoss()


def nan_input():
    m, x, y, loss = build()
    x[0, 0] = float("nan")
    return m, x, y, loss


def inf_weight():
    m, x, y, loss = build()
    with torch.no_grad():
        m[0].weight[0, 0] = float("inf")
    return m, x, y, loss


def nan_target():
    m, x, _, _ = build()
    return m, x, torch.full((5, 2), float("nan")), torch.nn.MSELoss()


def nan_loss_weight():
    m, x, y, _ = build()
    return m, x, y, torch.nn.CrossEntropyLoss(weight=torch.tensor([float("nan"), 1.0]))


def inf_running_var():
    m, x, y, loss = build()
    bn = torch.nn.BatchNorm1d(4)
    bn.running_var.fill_(float("inf"))
    model = torch.nn.Sequential(m[0], bn, m[1], m[2]).eval()
    return model, x, y, loss


def meta_model():
    m, x, y, loss = build()
    return m.to("meta"), x, y, loss


def sparse_input():
    m, x, y, loss = build()
    return m, x.to_sparse(), y, loss
"""


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fpgrad: error: "), err
    assert "internal error" not in err and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture()
def script(tmp_path: Path) -> Path:
    path = tmp_path / "model.py"
    path.write_text(SCRIPT)
    return path


# ---- captured models: non-finite or unreadable values ----------------------------------


@pytest.mark.parametrize(
    ("func", "needle"),
    [
        ("nan_input", "input 0 holds NaN"),
        ("inf_weight", "parameter '0.weight' holds inf"),
        ("nan_target", "targets hold NaN"),
        ("nan_loss_weight", "the loss's buffer 'weight' holds NaN"),
        ("inf_running_var", "buffer '1.running_var' holds inf"),
        ("meta_model", "meta tensor"),
        ("sparse_input", "sparse"),
    ],
)
def test_captured_values_must_be_finite_dense_and_real(
    script: Path, capsys: pytest.CaptureFixture[str], func: str, needle: str
) -> None:
    code, out, err = cli(["compare", f"{script}:{func}", "--precisions", "float32"], capsys)
    one_line_error(code, err, needle)
    assert out == ""


def test_a_minus_inf_mask_input_is_still_accepted() -> None:
    m = torch.nn.Linear(4, 4)
    mask = torch.tensor([0.0, float("-inf"), 0.0, 0.0])

    class Masked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = m

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.lin(x) + mask, -1)

    net = fpgrad.from_module(
        Masked(), (torch.ones(2, 4), mask), torch.zeros(2, 4), torch.nn.MSELoss()
    )
    assert net.param_names == ["lin.weight", "lin.bias"]


# ---- watch-report ----------------------------------------------------------------------

META = {"kind": "meta", "every": 1, "model": "M", "optimizer": "SGD", "scaler": False}
OP = {
    "zeros": 0, "subnormals": 0, "infs": 0, "nans": 0, "min_abs": 0.5, "max_abs": 1.0, "out": 0,
    "dtype": "float16", "numel": 4, "family": "exact", "zeros_created": 0, "zeros_inherited": 0,
    "zeros_undecided": 0, "subnormals_created": 0, "subnormals_inherited": 0,
    "subnormals_undecided": 0, "infs_created": 0, "infs_inherited": 0, "infs_undecided": 0,
    "nans_created": 0, "nans_inherited": 0, "nans_undecided": 0, "subnormal_share": 0.0,
    "underflow_share": 0.0, "kind": "op", "step": 0, "seq": 0, "module": "fc", "op": "aten.mm",
    "direction": "forward",
}  # fmt: skip
OPT = {
    "param": "fc.weight", "dtype": "float16", "numel": 4, "moved_share": 1.0,
    "update_weight_ratio": 0.01, "requested_nonzero": 4, "swamped": 0, "swamped_share": 0.0,
    "requested_update_weight_ratio": 0.01, "swamped_map": [0, 0, 0, 0], "kind": "optimizer",
    "step": 0, "direction": "optimizer",
}  # fmt: skip
STEP = {
    "kind": "step", "step": 0, "sampled": True, "ops": 1, "scale": None, "next_scale": None,
    "skipped": False, "first_nonfinite": None,
}  # fmt: skip


def _records(tmp_path: Path, recs: list[Any], raw: bytes | None = None) -> str:
    d = tmp_path / "w"
    d.mkdir(exist_ok=True)
    data = raw if raw is not None else "".join(json.dumps(r) + "\n" for r in recs).encode()
    (d / "records.jsonl").write_bytes(data)
    return str(d)


def _with(rec: dict, **change: Any) -> dict:
    out = {**rec, **change}
    return {k: v for k, v in out.items() if v is not _DROP}


_DROP = object()


def test_a_good_watch_directory_still_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _records(tmp_path, [META, OP, OPT, STEP])
    code, _, err = cli(["watch-report", d, "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err


@pytest.mark.parametrize(
    ("recs", "needle"),
    [
        ([META, _with(OP, zeros_created=_DROP), STEP], "zeros_created"),
        ([META, _with(OP, zeros_created="5"), STEP], "zeros_created"),
        ([META, _with(OP, zeros_created=[1]), STEP], "zeros_created"),
        ([META, _with(OP, zeros_created=-5), STEP], "zeros_created"),
        ([META, _with(OP, zeros_created=10**300), STEP], "zeros_created"),
        ([META, _with(OP, module=[1]), STEP], "module"),
        ([META, _with(OP, step="x"), STEP], "step"),
        ([META, _with(OP, step=_DROP), STEP], "step"),
        ([META, OP, _with(OPT, param=_DROP), STEP], "param"),
        ([META, OP, _with(OPT, swamped_map=[0, 1]), STEP], "swamped_map"),
        ([META, OP, _with(OPT, swamped_map="abc"), STEP], "swamped_map"),
        ([META, OP, _with(OPT, swamped_share="inf"), STEP], "swamped_share"),
        ([META, OP, OPT, _with(STEP, scale="big")], "scale"),
        ([META, OP, OPT, _with(STEP, skipped="yes")], "skipped"),
        ([META, OP, OPT, _with(STEP, step=_DROP)], "step"),
        ([_with(META, every="x"), OP, OPT, STEP], "every"),
        ([_with(META, every=0), OP, OPT, STEP], "every"),
    ],
)
def test_watch_records_of_the_wrong_shape_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], recs: list[dict], needle: str
) -> None:
    d = _records(tmp_path, recs)
    code, _, err = cli(["watch-report", d, "--out", str(tmp_path / "r")], capsys)
    one_line_error(code, err, "records.jsonl:", needle)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"kind": "meta", "model": "\xff\xfe"}\n', "not UTF-8"),
        (b'{"kind":"meta","x":' + b"[" * 100000 + b"]" * 100000 + b"}\n", "nest"),
        (b'{"kind":"meta","every":' + b"9" * 5000 + b"}\n", "digits"),
    ],
)
def test_watch_records_that_json_cannot_read_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: bytes, needle: str
) -> None:
    d = _records(tmp_path, [], raw=raw)
    code, _, err = cli(["watch-report", d, "--out", str(tmp_path / "r")], capsys)
    one_line_error(code, err, needle)


def test_watch_records_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    d = tmp_path / "w"
    d.mkdir()
    os.mkfifo(d / "records.jsonl")
    proc = subprocess.run(
        [sys.executable, "-m", "fpgrad", "watch-report", str(d), "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "pipe" in proc.stderr and proc.stderr.count("\n") == 1


# ---- options ---------------------------------------------------------------------------


def test_advise_for_a_format_the_policy_never_computes_in(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = cli(
        ["advise", SHOWCASE, "--policy", "autocast", "--format", "bfloat16", "--no-measure"], capsys
    )
    one_line_error(code, err, "bfloat16")


@pytest.mark.parametrize("spec", ["0..3..5", "2^0..2^2..2^4"])
def test_a_sweep_range_has_one_two_dot_separator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: str
) -> None:
    axis = "--seeds" if "^" not in spec else "--loss-scales"
    code, _, err = cli(
        ["sweep", SHOWCASE, "--out", str(tmp_path / "s"), axis, spec, "--workers", "0"], capsys
    )
    one_line_error(code, err, spec)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("command", ["compare", "advise"])
def test_an_empty_out_is_refused_not_ignored(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, out, err = cli(
        [command, SHOWCASE, "--out", "", "--precisions", "float16"][
            : 4 if command == "advise" else 6
        ],
        capsys,
    )
    one_line_error(code, err, "--out is empty")
    assert out == ""


# ---- the Python API --------------------------------------------------------------------

NET = fpgrad.load_network(SHOWCASE)


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: fpgrad.get_format(None), "format name must be a string"),
        (lambda: fpgrad.get_format(16), "format name must be a string"),
        (lambda: fpgrad.get_format(b"float16"), "format name must be a string"),
        (lambda: fpgrad.round_to([1.0], None), "format name must be a string"),
        (lambda: fpgrad.round_to(None, "float16"), "values"),
        (lambda: fpgrad.round_to("abc", "float16"), "values"),
        (lambda: fpgrad.round_to({1: 2}, "float16"), "values"),
        (lambda: fpgrad.round_to([1 + 2j], "float16"), "values"),
        (lambda: fpgrad.round_to([[1.0], [1.0, 2.0]], "float16"), "values"),
        (lambda: fpgrad.round_to([10**400], "float16"), "values"),
        (lambda: fpgrad.round_to(torch.ones(2, device="meta"), "float16"), "values"),
        (lambda: fpgrad.compare(None, "float16"), "fpgrad.load_network"),
        (lambda: fpgrad.compare(SHOWCASE, "float16"), "fpgrad.load_network"),
        (lambda: fpgrad.compare(NET, 16), "precisions"),
        (lambda: fpgrad.compare(NET, [16]), "precisions"),
        (lambda: fpgrad.compare(NET, "float16", exact_bits="150"), "exact_bits"),
        (lambda: fpgrad.compare(NET, "float16", loss_scale="2"), "loss_scale"),
        (lambda: fpgrad.compare(NET, "float16", exact_max_bits="x"), "exact_max_bits"),
        (lambda: fpgrad.train(None, steps=1), "fpgrad.load_network"),
        (lambda: fpgrad.train(NET, steps=True), "steps"),
        (lambda: fpgrad.train(NET, steps=10**12), "steps"),
        (lambda: fpgrad.train(NET, steps=1, cfg="sgd"), "cfg"),
        (lambda: fpgrad.train(NET, steps=1, runs=3), "runs"),
        (lambda: fpgrad.train(NET, steps=1, batch_size="2"), "batch_size"),
        (lambda: fpgrad.train(NET, steps=1, batch_size=2.5), "batch_size"),
        (lambda: fpgrad.train(NET, steps=1, seed=-1), "seed"),
        (lambda: fpgrad.train(NET, steps=1, seed="a"), "seed"),
        (lambda: fpgrad.train(NET, steps=1, exact_bits="x"), "exact_bits"),
        (lambda: fpgrad.train(NET, steps=1, verdict_every="x"), "verdict_every"),
        (lambda: fpgrad.advise(None, "float16"), "fpgrad.load_network"),
        (lambda: fpgrad.advise(NET, 16), "format name must be a string"),
        (lambda: fpgrad.advise(NET, "float16", exponents=(5,)), "exponents"),
        (lambda: fpgrad.advise(NET, "float16", exponents="0..5"), "exponents"),
        (lambda: fpgrad.advise(NET, "float16", exponents=(0.5, 3)), "exponents"),
        (lambda: fpgrad.load_network(None), "path"),
        (lambda: fpgrad.load_network(5), "path"),
        (lambda: fpgrad.sweep(SHOWCASE, grid="x", out_dir="unused", workers=0), "grid"),
        (lambda: fpgrad.sweep(SHOWCASE, grid={"seed": [1]}, out_dir=None, workers=0), "out_dir"),
        (
            lambda: fpgrad.sweep(SHOWCASE, grid={"seed": [1]}, out_dir="unused", workers="2"),
            "workers",
        ),
        (lambda: fpgrad.watch(torch.nn.Linear(2, 2), out=5), "out"),
    ],
)
def test_the_api_refuses_wrong_types_with_its_own_error(call: Any, needle: str) -> None:
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and needle in message, message


# ---- model files: a pickled payload ------------------------------------------------------


class _Payload:
    """Unpickled, it would create the file ``MARK`` (it never is)."""

    mark = ""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.mark}",))


def test_a_pickled_payload_in_a_state_dict_is_named_not_quoted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    payload = _Payload()
    payload.mark = str(tmp_path / "PWNED")
    torch.save({"0.weight": payload}, tmp_path / "m.pt")
    np.save(tmp_path / "x.npy", np.ones((2, 3)))
    np.save(tmp_path / "y.npy", np.zeros(2, dtype=np.int64))
    (tmp_path / "m.toml").write_text(
        'state_dict = "m.pt"\nmodules = ["Linear(3, 2)"]\n[loss]\ntype = "cross_entropy"\n'
        '[data]\nx_file = "x.npy"\ny_file = "y.npy"\n'
    )
    code, _, err = cli(["compare", str(tmp_path / "m.toml")], capsys)
    one_line_error(code, err, "posix.system", "never unpickles")
    assert "weights_only` set to `False" not in err
    assert not (tmp_path / "PWNED").exists()


# ---- names in a network file -----------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("name = 5", "name must be a string"),
        ('name = ["a"]', "name must be a string"),
        ('name = ""', "name must be a string"),
        ('name = "a\\nb"', "control character"),
        ('name = "a\\u0000b"', "control character"),
    ],
)
def test_a_network_name_is_a_short_printable_string(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, needle: str
) -> None:
    text = Path(SHOWCASE).read_text().replace('name = "showcase"', line)
    (tmp_path / "n.toml").write_text(text)
    code, out, err = cli(["compare", str(tmp_path / "n.toml"), "--precisions", "float16"], capsys)
    one_line_error(code, err, needle)
    assert out == ""


def test_a_layer_name_holds_no_control_character(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = Path(SHOWCASE).read_text().replace('name = "act"', 'name = "a\\nct"')
    (tmp_path / "n.toml").write_text(text)
    code, _, err = cli(["compare", str(tmp_path / "n.toml"), "--precisions", "float16"], capsys)
    one_line_error(code, err, "control character")


def test_a_captured_model_name_is_a_short_printable_string() -> None:
    for name in (5, "a\nb", ""):
        with pytest.raises(InputError, match="name"):
            fpgrad.from_module(torch.nn.Linear(2, 1), torch.ones(2, 2), torch.ones(2, 1),
                               torch.nn.MSELoss(), name=name)  # type: ignore[arg-type]  # fmt: skip


# ---- sweeps: cells.jsonl lines that JSON reads but fpgrad never writes -----------------


@pytest.mark.parametrize(
    ("pattern", "replacement"),
    [
        (r'"ok": \d+', '"ok": ' + "9" * 400),
        (r'"certified_digits": [0-9.e+-]+', '"certified_digits": NaN'),
    ],
)
def test_a_cell_line_fpgrad_never_writes_is_damaged_and_runs_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pattern: str, replacement: str
) -> None:
    out = tmp_path / "s"
    args = ["sweep", SHOWCASE, "--out", str(out), "--precisions", "float16", "--workers", "0"]
    code, _, err = cli(args, capsys)
    assert code == 0, err
    log = out / "cells.jsonl"
    head, cell = log.read_text().splitlines()
    bad = re.sub(pattern, replacement, cell, count=1)
    assert bad != cell
    log.write_text(f"{head}\n{bad}\n")
    code, _, err = cli([*args, "--json"], capsys)
    assert code == 0, err
    assert "line 2 is damaged" in err and "internal error" not in err


# ---- policy tables -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ('[policy."a,b"]\ndense = "float16"\n', "policy name"),
        ('[policy."a+b"]\ndense = "float16"\n', "policy name"),
        ('[policy."a\\nb"]\ndense = "float16"\n', "control character"),
        ('[policy.""]\ndense = "float16"\n', "policy name"),
        ("[policy.p]\ndescription = 5\n", "description must be a string"),
    ],
)
def test_a_policy_table_is_one_that_can_be_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, needle: str
) -> None:
    (tmp_path / "n.toml").write_text(Path(SHOWCASE).read_text() + "\n" + table)
    code, _, err = cli(["policies", "--network", str(tmp_path / "n.toml")], capsys)
    one_line_error(code, err, needle)


def test_from_module_policy_names_are_strings() -> None:
    with pytest.raises(InputError, match="policy name"):
        fpgrad.from_module(torch.nn.Linear(2, 1), torch.ones(2, 2), torch.ones(2, 1),
                           torch.nn.MSELoss(), policies={5: {"linear": "float32"}})  # type: ignore[dict-item]  # fmt: skip


# ---- empty option values -----------------------------------------------------------------


def test_an_empty_tensorboard_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    d = _records(tmp_path, [META, OP, OPT, STEP])
    code, _, err = cli(
        ["watch-report", d, "--out", str(tmp_path / "r"), "--tensorboard", ""], capsys
    )
    one_line_error(code, err, "--tensorboard is empty")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(InputError, match="tensorboard"):
        fpgrad.watch(torch.nn.Linear(2, 2), tensorboard="")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--policy", ","], "--policy"),
        (["--policy", "autocast,,autocast_bf16"], "--policy"),
        (["--verdict", ","], "--verdict"),
        (["--verdict", "rounding_zero,,nan"], "--verdict"),
    ],
)
def test_empty_names_in_a_list_option_name_that_option(
    capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    code, _, err = cli(["compare", SHOWCASE, "--precisions", "float16", *args], capsys)
    one_line_error(code, err, needle, "empty")


# ---- .pt2 data in a safetensors file -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32])
def test_a_safetensors_file_with_a_torch_only_dtype_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dtype: torch.dtype
) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    save_file({"x": x.to(dtype), "y": torch.tensor([0, 1, 0, 1]), "other": x.bfloat16()},
              tmp_path / "d.safetensors")  # fmt: skip
    (tmp_path / "m.toml").write_text(
        'inputs = ["d.safetensors:x"]\ntargets = "d.safetensors:y"\nloss = "cross_entropy"\n'
    )
    code, _, err = cli(["compare", str(tmp_path / "m.pt2"), "--precisions", "float32"], capsys)
    assert code == 0, err
