"""``fpgrad.watch(..., tensorboard=DIR)`` and ``fpgrad watch-report DIR --tensorboard TB``: the
event files read back with TensorBoard's own reader hold the records' per-module and
per-parameter series, value for value."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import fpgrad
from fpgrad.cli import main
from fpgrad.errors import InputError
from fpgrad.watching.records import read_records
from tests.test_watch import Net, _data, scaled_steps

pytest.importorskip("tensorboard")


def _scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _expected(recs: list[dict]) -> dict[str, dict[int, float]]:
    """The series, summed here from the records (float32, as TensorBoard stores scalars)."""
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    sums: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for r in recs:
        if r["kind"] == "op":
            a = sums[(r["module"], r["step"])]
            a[0] += r["zeros_created"]
            a[1] += r["subnormals"]
            a[2] += r["numel"]
            a[3] += r["infs_created"] + r["nans_created"]
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for (m, s), (zc, sub, n, ovf) in sums.items():
        out[f"zeros_created/{m}"][s] = f32(zc)
        out[f"subnormal_share/{m}"][s] = f32(sub / n)
        out[f"overflows_created/{m}"][s] = f32(ovf)
    for r in recs:
        if r["kind"] == "optimizer" and r.get("swamped_share") is not None:
            out[f"swamped_share/{r['param']}"][r["step"]] = f32(r["swamped_share"])
        if r["kind"] == "step" and r["scale"] is not None:
            out["loss_scale"][r["step"]] = f32(r["scale"])
        if r["kind"] == "step" and r["skipped"] is not None:
            out["skipped"][r["step"]] = float(r["skipped"])
    return dict(out)


def test_live_scalars_are_the_records_series(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    m = Net(2.0**-20).half()  # the scaling creates zeros in its backward
    opt = torch.optim.SGD(m.parameters(), lr=1e-6)  # tiny updates: swamped in float16
    x, y = _data()
    with fpgrad.watch(m, opt, out=str(tmp_path / "w"), tensorboard=str(tmp_path / "tb")):
        for _ in range(3):
            opt.zero_grad()
            ((m(x.half()) - y.half()) ** 2).mean().backward()
            opt.step()
    recs = read_records(tmp_path / "w")
    got = _scalars(tmp_path / "tb")
    assert got == _expected(recs)
    assert all(got["zeros_created/scale"][s] > 0 for s in range(3))
    assert max(got["swamped_share/fc2.weight"].values()) > 0
    assert got["skipped"] == {0: 0.0, 1: 0.0, 2: 0.0}
    # the same series from the records directory afterwards, through the CLI
    assert main(["watch-report", str(tmp_path / "w"), "--tensorboard", str(tmp_path / "tb2")]) == 0
    assert "TensorBoard" in capsys.readouterr().out
    assert _scalars(tmp_path / "tb2") == got


def test_loss_scale_and_overflow_series_with_gradscaler(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = Net(4096.0)  # overflows float16 in the forward under autocast
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with fpgrad.watch(m, opt, scaler, tensorboard=str(tmp_path / "tb"), every=2) as w:
        scaled_steps(m, opt, scaler, 3)
        recs = list(w._records)
    got = _scalars(tmp_path / "tb")
    assert got == _expected(recs)
    assert got["loss_scale"] == {0: 1024.0, 1: 512.0, 2: 256.0}
    assert got["skipped"] == {0: 1.0, 1: 1.0, 2: 1.0}
    # op series only on sampled steps (0 and 2); the inf is created in "scale"
    assert set(got["overflows_created/scale"]) == {0, 2}
    assert got["overflows_created/scale"][0] > 0


def test_without_tensorboard_one_line_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if not installed
    m = Net(1.0)
    with pytest.raises(InputError, match="pip install tensorboard") as e:
        with fpgrad.watch(m, tensorboard=str(tmp_path / "tb")):
            pass
    assert "\n" not in str(e.value)
