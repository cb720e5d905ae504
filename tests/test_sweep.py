"""fpgrad sweep: grid parsing and errors, results equal to direct calls, local processes and a
Dask cluster agree byte for byte, resume after an interruption, failures recorded, outputs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from fpgrad.cli import main
from fpgrad.diagnose.comparison import compare
from fpgrad.errors import InputError
from fpgrad.model.netfile import parse_network
from fpgrad.run.optim import OptimConfig
from fpgrad.sweeps import Grid, scale_init, sweep
from fpgrad.sweeps import cells as sweep_mod
from fpgrad.training import train

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# big init (std 4) and a tiny input feature (below float16's smallest subnormal): rounding zeros
# in float16 that seeds and loss scales move
NET = """
name = "tiny"
seed = 0

[[layer]]
type = "dense"
out = 3
init = {scheme = "normal", std = 4.0}

[[layer]]
type = "relu"

[[layer]]
type = "dense"
out = 2
init = {scheme = "normal", std = 4.0}

[loss]
type = "cross_entropy"

[data]
x = [[1.0, 1e-8], [1.5, -1e-8], [0.75, 2e-8], [1.25, 0.0]]
y = [0, 1, 0, 1]
"""
GRID = {"seed": "0,1", "precision": "float16,bfloat16", "loss_scale": "1,2^10"}
OUTPUTS = ("sweep.md", "sweep.json", "sweep.csv", "sweep.png")


def net_file(tmp_path: Path, text: str = NET) -> str:
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return str(path)


def cell_lines(out: Path) -> list[str]:
    """cells.jsonl without its completion order: the header, then the cells sorted."""
    lines = (out / "cells.jsonl").read_text().splitlines()
    return [lines[0], *sorted(lines[1:])]


def same_outputs(a: Path, b: Path) -> None:
    assert cell_lines(a) == cell_lines(b)
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    """One uninterrupted sweep of 8 cells in this process: the reference run."""
    tmp = tmp_path_factory.mktemp("sweep")
    path = net_file(tmp)
    result = sweep(path, "compare", GRID, tmp / "full", workers=0)
    return path, tmp / "full", result


# ---- the grid --------------------------------------------------------------------------


def test_grid_axes_values_and_keys() -> None:
    g = Grid.parse(
        "train",
        {"init-scales": [0.5, 1], "loss_scale": "2^0..2^2", "seeds": "0..1", "lr": "1e-3"},
    )
    assert [a for a, _ in g.axes] == ["seed", "precision", "lr", "loss_scale", "init_scale"]
    assert g.values["precision"] == ("float16", "bfloat16", "float32", "float64")
    assert g.values["loss_scale"] == (1.0, 2.0, 4.0)
    assert len(g) == 2 * 4 * 1 * 3 * 2 == len(g.cells())
    cells = g.cells()
    assert cells[0].key == "seed=0,precision=float16,lr=0.001,loss_scale=1,init_scale=0.5"
    assert cells[1].key.endswith("loss_scale=1,init_scale=1")  # the last axis varies fastest
    assert g.varying() == ["seed", "precision", "loss_scale", "init_scale"]
    # canonical names: fp16 is float16 (then given twice), runs keep their policies
    with pytest.raises(InputError, match="float16 given twice"):
        Grid.parse("compare", {"precision": "float16,fp16"})
    assert Grid.parse("train", {"precision": "Float16+Master"}).values["precision"] == (
        "float16+master",
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "0.1"], "lr is for --task train"),
        (["--loss-scale", "3"], "not a power of two"),
        (["--precisions", "float17"], "unknown precision"),
        (["--precisions", "float16,"], "empty value"),
        (["--precisions", "exact"], "exact is the reference"),
        (["--seeds", "x"], "not a non-negative integer"),
        (["--seeds", "3..1"], "empty range"),
        (["--init-scale", "-1"], "must be >= 0"),
        (["--init-scale", "nan"], "not finite"),
        (["--task", "train"], "needs --steps"),
        (["--task", "train", "--steps", "2", "--lr", "0"], "must be positive"),
        (["--task", "train", "--steps", "2", "--optimizer", "rmsprop"], "unknown optimizer"),
        (["--steps", "3"], "it is a train option"),
        (["--task", "train", "--steps", "2", "--reference", "rounded"], "a compare option"),
        (["--exact-bits", "8"], "too low"),
        (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "not both"),
        (
            [
                "--task",
                "train",
                "--steps",
                "2",
                "--precisions",
                "float16+dynamic",
                "--loss-scale",
                "4",
            ],
            "already sets a loss scale",
        ),
        (["--task", "fit"], "invalid choice"),
    ],
)
def test_bad_grids_and_options_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code = main(["sweep", net_file(tmp_path), "--out", str(tmp_path / "out"), *args])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("fpgrad: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_seed_axis_needs_a_network_with_init(tmp_path: Path) -> None:
    net = parse_network(tomllib.loads(NET))
    with pytest.raises(InputError, match="no init to re-draw"):
        sweep(net, "compare", {"seed": "0,1"}, tmp_path, workers=0)


# ---- results -----------------------------------------------------------------------------


def test_compare_cells_equal_compare_called_directly(full: tuple[str, Path, Any]) -> None:
    path, out, result = full
    doc = tomllib.loads(Path(path).read_text())
    assert result.complete and result.ran == 8 and result.exit_code == 0
    assert [r["key"] for r in result.records] == [
        c.key for c in Grid.parse("compare", GRID).cells()
    ]
    counts = set()
    for r in result.records:
        ax = r["axes"]
        net = parse_network({**doc, "seed": ax["seed"]})
        c = compare(net, precisions=[ax["precision"]], loss_scale=ax["loss_scale"])
        assert r["status"] == "ok"
        assert r["counts"] == c.summary[ax["precision"]], r["key"]
        assert r["loss"]["verdict"] == c.loss[ax["precision"]]["verdict"]
        counts.add(r["counts"]["rounding_zero"])
    assert len(counts) > 1  # the grid does move the verdicts


def test_init_scale_multiplies_dense_weights_only(tmp_path: Path) -> None:
    doc = tomllib.loads(NET)
    net = parse_network(doc)
    scaled = scale_init(net, 0.25)
    for k, v in net.params.items():
        expected = v * 0.25 if k.endswith(".weight") else v
        assert (scaled.params[k] == expected).all(), k
    r = sweep(doc, "compare", {"precision": "float16", "init_scale": "0.25"}, tmp_path, workers=0)
    assert r.records[0]["counts"] == compare(scaled, precisions="float16").summary["float16"]


@pytest.mark.slow
def test_local_processes_and_dask_give_identical_outputs(
    full: tuple[str, Path, Any], tmp_path: Path
) -> None:
    pytest.importorskip("distributed")
    from dask.distributed import LocalCluster

    path, reference, _ = full
    local = sweep(path, "compare", GRID, tmp_path / "local", workers=2)
    assert local.ran == 8
    same_outputs(tmp_path / "local", reference)
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        dask = sweep(path, "compare", GRID, tmp_path / "dask", scheduler=cluster.scheduler_address)
    assert dask.ran == 8
    same_outputs(tmp_path / "dask", reference)


def test_train_sweep_over_learning_rates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tomllib.loads(NET)
    grid = {"precision": "float16,float16+master", "lr": "0.05,0.5"}
    r = sweep(doc, "train", grid, tmp_path, workers=0, progress=True, steps=2, verdict_every=1)
    assert "fpgrad sweep: 100%" in capsys.readouterr().err  # the progress bar
    assert [x["key"] for x in r.records] == [
        "precision=float16,lr=0.05",
        "precision=float16,lr=0.5",
        "precision=float16+master,lr=0.05",
        "precision=float16+master,lr=0.5",
    ]
    cell = r.record("precision=float16+master,lr=0.5")
    direct = train(parse_network(doc), steps=2, cfg=OptimConfig(lr=0.5), runs="float16+master")
    h = direct.histories["float16+master"]
    assert cell["verdict_step"] == 1
    assert {k: n for k, n in cell["counts"].items() if n} == h.verdicts[1]
    assert cell["loss"]["last"] == h.loss[-1]
    assert cell["distance"] == direct.distance["float16+master"][-1]
    assert r.record("precision=float16,lr=0.05")["loss"]["exact_last"] != cell["loss"]["exact_last"]
    assert "| float16+master | 0.5" in (tmp_path / "sweep.md").read_text()


def test_scheduler_without_dask_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed fails
    args = ["sweep", net_file(tmp_path), "--out", str(tmp_path / "o"), "--precisions", "float16"]
    assert main([*args, "--scheduler", "tcp://127.0.0.1:8786"]) == 2
    assert "pip install 'fpgrad[dask]'" in capsys.readouterr().err


# ---- resume ------------------------------------------------------------------------------


def test_resume_runs_only_the_missing_cells(
    full: tuple[str, Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, reference, _ = full
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    lines = (out / "cells.jsonl").read_text().splitlines(keepends=True)
    kept, lost = lines[:-3], lines[-3:]
    # an interruption: three cells never written, the last one cut in the middle of its line
    (out / "cells.jsonl").write_text("".join(kept) + lost[0][:40])
    ran: list[str] = []
    real = sweep_mod.run_cell

    def counting(job: Any) -> dict[str, Any]:
        ran.append(job.key)
        return real(job)

    monkeypatch.setattr(sweep_mod, "run_cell", counting)
    result = sweep(path, "compare", GRID, out, workers=0)
    assert sorted(ran) == sorted(json.loads(x)["key"] for x in lost)
    assert (result.ran, result.reused) == (3, 5)
    same_outputs(out, reference)


def test_max_cells_leaves_the_rest_pending_then_finishes(
    full: tuple[str, Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, reference, _ = full
    args = ["sweep", path, "--out", str(tmp_path), "--workers", "0"]
    args += ["--seeds", "0,1", "--precision", "float16", "--precision", "bfloat16"]
    args += ["--loss-scales", "1,1024"]
    assert main([*args, "--max-cells", "3"]) == 0
    out, err = capsys.readouterr()
    assert "3 cells run, 0 from cells.jsonl; 5 pending" in err
    assert out.count("| pending") == 5
    assert json.loads((tmp_path / "sweep.json").read_text())["complete"] is False
    assert main(args) == 0
    assert "5 cells run, 3 from cells.jsonl" in capsys.readouterr().err
    same_outputs(tmp_path, reference)


def test_changed_options_or_network_are_refused_until_restart(
    full: tuple[str, Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, reference, _ = full
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    path = net_file(tmp_path)
    base = ["sweep", path, "--out", str(out), "--workers", "0", "--precisions", "float16"]
    assert main([*base, "--exact-bits", "120"]) == 2
    err = capsys.readouterr().err
    assert "exact_bits=150 (now 120)" in err and "--restart" in err and err.count("\n") == 1
    Path(path).write_text(NET.replace("std = 4.0", "std = 3.0", 1))  # the network changes
    assert main([*base, "--seeds", "0", "--loss-scales", "1"]) == 2
    assert "from a different network" in capsys.readouterr().err
    assert main([*base, "--seeds", "0", "--loss-scales", "1", "--restart"]) == 0
    assert "1 cells run, 0 from" in capsys.readouterr().err


# ---- failures and outputs ----------------------------------------------------------------


def test_failing_cells_are_recorded_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = sweep_mod._run_compare

    def flaky(job: Any) -> dict[str, Any]:
        if job.axes["precision"] == "bfloat16":
            raise InputError("bfloat16 refused here")
        if job.axes["precision"] == "float32":
            raise RuntimeError("boom")
        return real(job)

    monkeypatch.setattr(sweep_mod, "_run_compare", flaky)
    args = ["sweep", net_file(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0"]
    args += ["--precisions", "float16,bfloat16,float32"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "| bfloat16    |" in out and "bfloat16 refused here" in out
    assert "RuntimeError: boom" in out
    assert (
        "1 cell(s) failed with internal errors, first precision=float32: RuntimeError: boom" in err
    )
    monkeypatch.setattr(sweep_mod, "_run_compare", real)
    assert main(args) == 0  # the internal error is retried, the refused cell is kept
    out, err = capsys.readouterr()
    assert "1 cells run, 2 from cells.jsonl; 1 refused" in err
    assert "boom" not in out and "bfloat16 refused here" in out


def test_outputs_are_strict_and_deterministic(
    full: tuple[str, Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, reference, result = full
    doc = json.loads((reference / "sweep.json").read_text())
    assert doc["schema"] == "fpgrad.sweep/1" and doc["complete"] is True
    assert doc["axes"] == {
        "seed": [0, 1],
        "precision": ["float16", "bfloat16"],
        "loss_scale": [1.0, 1024.0],
    }
    assert [c["key"] for c in doc["cells"]] == [r["key"] for r in result.records]
    md = (reference / "sweep.md").read_text()
    assert md.startswith("# fpgrad sweep: tiny (compare)")
    assert md.count("\n| ") == 1 + 8  # header and one row per cell
    csv_lines = (reference / "sweep.csv").read_text().splitlines()
    assert csv_lines[0].startswith("key,seed,precision,loss_scale,status,ok,")
    assert len(csv_lines) == 9
    assert (reference / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # everything reused: the outputs are written again, byte for byte; the table goes to stdout
    out = tmp_path / "again"
    shutil.copytree(reference, out)
    args = ["sweep", path, "--out", str(out), "--seeds", "0,1", "--precisions", "float16,bfloat16"]
    assert main([*args, "--loss-scales", "1,1024", "--json"]) == 0
    stdout, err = capsys.readouterr()
    assert json.loads(stdout) == doc
    assert "0 cells run, 8 from cells.jsonl" in err
    same_outputs(out, reference)


def test_policies_and_emulated_formats_on_the_precision_axis(tmp_path: Path) -> None:
    doc = tomllib.loads(NET)
    grid = {"precision": "float16,autocast,fp8_e4m3"}
    r = sweep(doc, "compare", grid, tmp_path / "c", workers=0)
    assert (
        r.record("precision=autocast")["policy"]
        == compare(parse_network(doc), "autocast").policies["autocast"]["summary"]
    )
    md = (tmp_path / "c" / "sweep.md").read_text()
    assert "- float16: all float16" in md and "- fp8_e4m3: all fp8_e4m3" in md
    assert "- autocast: " in md and "params float32" in md
    t = sweep(
        doc, "train", {"precision": "autocast,fp8_e4m3+master"}, tmp_path / "t", workers=0, steps=2
    )
    assert "float32 master weights" in t.record("precision=fp8_e4m3+master")["policy"]


def test_count_columns_are_the_verdicts() -> None:
    from fpgrad.diagnose.verdicts import VERDICTS
    from fpgrad.sweeps.cells import COUNTS

    assert COUNTS == VERDICTS


def test_cells_of_one_network_share_its_exact_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fpgrad.graph.layers

    calls = []
    real = fpgrad.graph.layers.exact_trace

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fpgrad.graph.layers, "exact_trace", counting)
    from fpgrad.sweeps import cells

    cells._EXACT.clear()
    grid = {"precision": "float16,bfloat16", "loss_scale": "1,2^10", "init_scale": "1,0.5"}
    r = sweep(tomllib.loads(NET), "compare", grid, tmp_path, workers=0)
    assert r.ran == 8 and len(calls) == 2  # one per network (init scale), not per cell
