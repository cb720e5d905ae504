"""The hostile-input campaign's fast sample: every input of issue 18 that once broke the
exit-code contract, and a seeded sample of mutated files and options, through the CLI in this
process under a time and memory limit (the full campaign: scripts/fuzz_inputs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fpgrad.fuzz import Case, cases, known_cases, run_case

KNOWN = known_cases()


@pytest.mark.parametrize("index", range(len(KNOWN)))
def test_known_hostile_input_keeps_the_contract(tmp_path: Path, index: int) -> None:
    outcome = run_case(KNOWN[index], tmp_path, seconds=20)
    assert outcome.problem is None, (KNOWN[index].argv, outcome.problem, outcome.err)
    assert outcome.code == (0 if KNOWN[index].kind == "known-ok" else 2), outcome.err


def test_seeded_sample_keeps_the_contract(tmp_path: Path) -> None:
    bad = []
    for i, case in enumerate(cases(seed=12345, n=60)):
        d = tmp_path / str(i)
        d.mkdir()
        outcome = run_case(case, d, seconds=20)
        if outcome.problem:
            bad.append((case.argv, outcome.problem, outcome.err))
    assert not bad, bad


def test_the_campaign_detects_a_broken_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The judge is not vacuous: an exit 1, a second line and a hang are each reported."""
    import fpgrad.cli as cli

    net = tmp_path / "n"
    net.mkdir()

    def boom(args: object) -> int:
        raise RuntimeError("bug")

    monkeypatch.setattr(cli, "_formats", boom)
    assert run_case(Case("t", ["formats"]), tmp_path / "n").problem == "exit 1"

    def two_lines(args: object) -> int:
        from fpgrad.errors import InputError

        raise InputError("first\nsecond")  # one_line joins it: still one line

    monkeypatch.setattr(cli, "_formats", two_lines)
    assert run_case(Case("t", ["formats"]), net).problem is None

    def sleeper(args: object) -> int:
        import time

        time.sleep(5)
        return 0

    monkeypatch.setattr(cli, "_formats", sleeper)
    assert run_case(Case("t", ["formats"]), net, seconds=0.5).problem.startswith("hang")

    def leak(args: object) -> int:
        import sys

        print("fpgrad: error: CANARY-7f3a", file=sys.stderr)
        return 2

    monkeypatch.setattr(cli, "_formats", leak)
    assert run_case(Case("t", ["formats"]), net).problem == "a message quotes a data file's content"
