"""Issue 15: every gallery report says which runs were native torch on this CPU and which
emulated, and names what depends on the CPU (fpgrad.run.runlog, ScenarioResult.runs)."""

from __future__ import annotations

import re

import pytest

from fpgrad import scenarios
from fpgrad.diagnose.comparison import compare
from fpgrad.model.netfile import load_network
from fpgrad.run.runlog import HOW, record, recording, runs_line
from tests.test_diagnosis import SHOWCASE

#: what each scenario must report it ran, and how (a subset: the runs the claim rests on)
EXPECTED: dict[str, dict[str, str]] = {
    "dead_relu": {"float16": "native", "float64": "native", "exact": "exact"},
    "fp8_formats": {"fp8_e4m3": "emulated", "fp8_e5m2": "emulated", "float16": "native"},
    "mixed_precision_policy": {"autocast": "cuda_policy", "float16": "native"},
    "gradscaler_skipped_steps": {"torch.autocast('cpu', float16) + GradScaler": "native"},
    "cnn_digits_loss_scaling": {"float16+scale=1024": "native", "exact": "exact"},
}


@pytest.mark.parametrize("name", scenarios.available())
def test_every_report_has_a_runs_line_and_a_cpu_line(name: str) -> None:
    result = scenarios.get(name).run(small=True)
    assert result.runs, f"{name} recorded no runs"
    for run, how in EXPECTED.get(name, {}).items():
        assert result.runs.get(run) == how, (name, run, result.runs)
    md = result.markdown()
    lines = md.splitlines()
    assert runs_line(result.runs) in lines
    for run, how in result.runs.items():
        assert re.search(
            rf"{re.escape(HOW[how])}: [^;]*{re.escape(run)}",
            lines[lines.index(runs_line(result.runs))],
        )
    assert sum(line.startswith("**CPU-dependent.** ") for line in lines) == 1
    if name == "similar_gradients_from_init":
        assert "Constant init under training" in result.cpu_dependent
    native = [r for r, how in result.runs.items() if how not in ("emulated", "exact")]
    if not result.cpu_dependent and native:
        assert ", ".join(native) in md


def test_autocast_is_emulated_cuda_list_and_cpu_lists_are_native_policies() -> None:
    net = load_network(str(SHOWCASE))
    with recording() as runs:
        compare(net, "float16,autocast,autocast_cpu,fp8_e5m2")
    assert runs == {
        "exact": "exact",
        "float16": "native",
        "autocast": "cuda_policy",
        "autocast_cpu": "policy",
        "fp8_e5m2": "emulated",
    }
    line = runs_line(runs)
    assert "torch.autocast('cuda') op list, emulated here on the CPU" in line
    assert "native torch on this CPU: float16;" in line


def test_recording_nests_and_is_off_outside() -> None:
    record("float16", "native")  # no recording open: nothing to receive it, no error
    with recording() as outer:
        with recording() as inner:
            record("fp8_e4m3", "emulated")
        record("float32", "native")
    assert inner == {"fp8_e4m3": "emulated"}
    assert outer == {"fp8_e4m3": "emulated", "float32": "native"}
    with pytest.raises(ValueError, match="unknown run kind"):
        record("float16", "gpu")
    assert runs_line({}) == "**Runs.** none recorded."
