"""fpgrad sweep of captured models (script.py:build): cells equal direct compares, the seed
axis calls build(seed=S), the network hash follows the script and its data, resume, local
processes and Dask give the same bytes, bad input is one line (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fpgrad.cli import main
from fpgrad.errors import InputError
from fpgrad.graph.compare import compare_graph
from fpgrad.graph.script import load_script
from fpgrad.sweeps import sweep

# a linear layer on inputs near float16's smallest normal: rounding zeros that a loss scale
# and the seed move; the data file's scale is read by build()
SCRIPT = '''
from pathlib import Path

import torch
from torch import nn


def build(seed: int = 0):
    torch.manual_seed(seed)
    scale = float((Path(__file__).parent / "scale.txt").read_text())
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(6, 3) * scale
    y = torch.randn(6, 2) * scale
    return model, x, y, nn.MSELoss()


def fixed():
    return build(0)
'''
GRID = {"seed": "0,1", "precision": "float16,float32", "loss_scale": "1,2^12"}
OUTPUTS = ("sweep.md", "sweep.json", "sweep.csv")


def script(tmp: Path, scale: str = "3e-7") -> str:
    (tmp / "scale.txt").write_text(scale)
    (tmp / "tiny.py").write_text(SCRIPT)
    return f"{tmp / 'tiny.py'}:build"


def same_outputs(a: Path, b: Path) -> None:
    def cells(d: Path) -> list[str]:
        return sorted((d / "cells.jsonl").read_text().splitlines())

    assert cells(a) == cells(b)
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    tmp = tmp_path_factory.mktemp("graphsweep")
    spec = script(tmp)
    return spec, tmp / "full", sweep(spec, "compare", GRID, tmp / "full", workers=0)


def test_cells_equal_compare_called_directly(full: tuple[str, Path, Any]) -> None:
    spec, _, result = full
    assert result.complete and result.ran == 8 and result.exit_code == 0
    counts, hashes = set(), {}
    for r in result.records:
        ax = r["axes"]
        assert r["status"] == "ok", r
        net = load_script(spec, ax["seed"])
        c = compare_graph(net, [ax["precision"]], loss_scale=ax["loss_scale"])
        assert r["counts"] == c.counts(ax["precision"]), r["key"]
        assert r["loss"]["value"] == c.loss[ax["precision"]]
        assert r["first_rounding_zero"] == c.first_lost[ax["precision"]]
        counts.add(tuple(sorted(r["counts"].items())))
        hashes.setdefault(ax["seed"], set()).add(r["network_hash"])
    assert len(counts) > 2  # the grid moves the verdicts
    assert all(len(h) == 1 for h in hashes.values()) and hashes[0] != hashes[1]


def test_rerun_reuses_every_cell_with_the_same_bytes(
    full: tuple[str, Path, Any], tmp_path: Path
) -> None:
    spec, out, _ = full
    before = {n: (out / n).read_bytes() for n in OUTPUTS}
    again = sweep(spec, "compare", GRID, out, workers=0)
    assert again.ran == 0 and again.reused == 8
    assert {n: (out / n).read_bytes() for n in OUTPUTS} == before


def test_changed_script_or_data_is_refused_until_restart(tmp_path: Path) -> None:
    spec = script(tmp_path)
    grid = {"precision": "float16"}
    sweep(spec, "compare", grid, tmp_path / "out", workers=0)
    (tmp_path / "tiny.py").write_text(SCRIPT + "\n# a comment\n")
    with pytest.raises(InputError, match="different network"):
        sweep(spec, "compare", grid, tmp_path / "out", workers=0)
    (tmp_path / "tiny.py").write_text(SCRIPT)
    assert sweep(spec, "compare", grid, tmp_path / "out", workers=0).reused == 1
    (tmp_path / "scale.txt").write_text("1e-3")  # the data the build reads
    with pytest.raises(InputError, match="different network"):
        sweep(spec, "compare", grid, tmp_path / "out", workers=0)
    assert sweep(spec, "compare", grid, tmp_path / "out", workers=0, restart=True).ran == 1


def test_a_worker_refuses_a_network_other_than_the_sweeps(tmp_path: Path) -> None:
    from fpgrad.sweeps import captured
    from fpgrad.sweeps.cells import CellJob, run_cell

    spec = script(tmp_path)
    ref = captured.ScriptRef(captured.absolute_spec(spec)[0])
    _, digest = captured.load(ref)
    opts = {"exact_bits": 150, "reference": "original", "allow_uncertified": False}
    axes = {"precision": "float32"}
    assert run_cell(CellJob("compare", "k", axes, ref, digest, opts))["status"] == "ok"
    bad = run_cell(CellJob("compare", "k", axes, ref, "0" * 16, opts))
    assert bad["status"] == "input_error" and "built another network" in bad["error"]


@pytest.mark.parametrize(
    ("tail", "args", "message"),
    [
        (":fixed", ["--seeds", "0,1"], "takes no seed argument"),
        (":build", ["--init-scales", "0.5"], "captured model"),
        (":build", ["--task", "train", "--steps", "2", "--precisions", "fp8_e4m3",
                    "--loss-scales", "1,1024"], "loss scaling of an emulated run"),
        (":nope", [], "defines no function nope()"),
    ],
)
def test_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tail: str, args: list[str], message: str
) -> None:
    spec = script(tmp_path).rsplit(":", 1)[0] + tail
    code = main(["sweep", spec, "--out", str(tmp_path / "out"), "--workers", "0", *args])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("fpgrad: error: ") and err.count("\n") == 1, err
    assert message in err


def test_cli_table_names_the_first_inf_nan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = script(tmp_path, "3e3")  # squares of 3e3: MSE overflows float16
    code = main(["sweep", spec, "--out", str(tmp_path / "o"), "--workers", "0",
                 "--precisions", "float16,float32", "--json"])  # fmt: skip
    out, _ = capsys.readouterr()
    assert code == 0
    doc = json.loads(out)
    first = {c["axes"]["precision"]: c["first_nonfinite"] for c in doc["cells"]}
    assert first["float32"] is None and first["float16"], first
    assert "first inf/nan" in (tmp_path / "o" / "sweep.md").read_text()


def test_train_cells_equal_train_called_directly(tmp_path: Path) -> None:
    from fpgrad.run.optim import OptimConfig
    from fpgrad.training import train

    spec = script(tmp_path)
    grid = {"seed": "0,1", "precision": "float16", "lr": "0.5", "loss_scale": "1,2^10"}
    result = sweep(spec, "train", grid, tmp_path / "out", workers=0, steps=3)
    assert result.complete and result.ran == 4
    lasts = set()
    for r in result.records:
        ax = r["axes"]
        assert r["status"] == "ok", r
        run = "float16" + ("" if ax["loss_scale"] == 1 else f"+scale={int(ax['loss_scale'])}")
        t = train(load_script(spec, ax["seed"]), 3, OptimConfig(lr=0.5), runs=[run],
                  seed=ax["seed"])  # fmt: skip
        h = t.histories[t.runs[0]]
        assert r["loss"]["last"] == h.loss[-1] and r["verdict_step"] == max(h.verdicts)
        assert r["counts"] == {**dict.fromkeys(r["counts"], 0), **h.verdicts[max(h.verdicts)]}
        lasts.add(r["loss"]["last"])
    assert len(lasts) > 1


@pytest.mark.slow
def test_local_processes_and_dask_give_identical_outputs(
    full: tuple[str, Path, Any], tmp_path: Path
) -> None:
    spec, reference, _ = full
    local = sweep(spec, "compare", GRID, tmp_path / "local", workers=2)
    assert local.ran == 8
    same_outputs(tmp_path / "local", reference)
    pytest.importorskip("distributed")
    from dask.distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        dask = sweep(spec, "compare", GRID, tmp_path / "dask", scheduler=cluster.scheduler_address)
    assert dask.ran == 8
    same_outputs(tmp_path / "dask", reference)


def test_a_pt2_program_sweeps_and_its_data_file_is_hashed(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3) * 1e-5, torch.tensor([0, 1, 1, 0, 1])
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "model.pt2")
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    (tmp_path / "model.toml").write_text(
        'inputs = ["x.npy"]\ntargets = "y.npy"\nloss = "cross_entropy"\n'
    )
    spec, grid = str(tmp_path / "model.pt2"), {"precision": "float16,float32"}
    r = sweep(spec, "compare", grid, tmp_path / "out", workers=0)
    assert [c["status"] for c in r.records] == ["ok", "ok"]
    assert r.records[0]["counts"] == compare_graph(load_script(spec), ["float16"]).counts("float16")
    with pytest.raises(InputError, match="no build"):
        sweep(spec, "compare", {"seed": "0,1"}, tmp_path / "seeds", workers=0)
    (tmp_path / "model.toml").write_text(
        'inputs = ["x.npy"]\ntargets = "y.npy"\nloss = "cross_entropy"\nreduction = "sum"\n'
    )
    with pytest.raises(InputError, match="different network"):
        sweep(spec, "compare", grid, tmp_path / "out", workers=0)
