"""Progress bars of long phases: on stderr only past the delay, only when enabled."""

from __future__ import annotations

import time

import pytest

from fpgrad import progress
from fpgrad.diagnose.advisor import advise
from fpgrad.diagnose.comparison import compare
from tests.nets import net_from


def _net():  # noqa: ANN202
    return net_from(
        [{"type": "dense", "out": 3}, {"type": "tanh"}, {"type": "dense", "out": 2}],
        "mse",
        [[0.5, -1.0], [0.25, 2.0]],
        [[0.1, 0.2], [0.3, -0.4]],
    )


def test_phase_shows_only_after_the_delay(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert list(progress.phase(range(3), "quick", enabled=True)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "DELAY_S", 0.05)

    def slow():  # noqa: ANN202
        for i in range(3):
            time.sleep(0.06)
            yield i

    assert list(progress.phase(slow(), "slow phase", enabled=True)) == [0, 1, 2]
    assert "slow phase" in capsys.readouterr().err
    assert list(progress.phase(slow(), "off", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_compare_and_advise_show_their_phases(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    net = _net()
    quiet = compare(net, "float32", progress=False)
    assert capsys.readouterr().err == ""
    loud = compare(net, "float32", progress=True)
    assert "fpgrad compare: precisions" in capsys.readouterr().err
    assert loud.to_json() == quiet.to_json()  # bars change nothing else
    quiet_a = advise(net, "float16", measure=False, progress=False)
    assert capsys.readouterr().err == ""
    loud_a = advise(net, "float16", measure=False, progress=True)
    err = capsys.readouterr().err
    assert "fpgrad advise: counts per scale" in err and "fpgrad advise: rows" in err
    assert loud_a.render() == quiet_a.render()
