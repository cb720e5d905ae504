"""The gradscaler_skipped_steps scenario: its verdict is computed from the watch records."""

from __future__ import annotations

from fpgrad import scenarios
from fpgrad.scenarios import gradscaler_skipped_steps as sc


def test_registered() -> None:
    assert "gradscaler_skipped_steps" in scenarios.available()
    assert scenarios.get("gradscaler_skipped_steps") is sc


def test_skips_are_the_created_overflows(tmp_path) -> None:
    r = sc.run(small=True)
    d = r.data
    assert r.holds is True
    # scale 2^24 overflows float16 at once: the first steps are skipped, the scale halves each
    assert d["skipped"][:3] == [0, 1, 2]
    assert d["scales"][:3] == [2.0**24, 2.0**23, 2.0**22]
    assert d["skipped"] == d["overflow_steps"] and d["nans_created"] == 0
    assert d["bit_identical"] is True
    # a step that was not skipped keeps or grows the scale; a skipped one halves it
    for i in range(d["steps"] - 1):
        ratio = d["scales"][i + 1] / d["scales"][i]
        assert (ratio == 0.5) == (i in d["skipped"]) and ratio in (0.5, 1.0, 2.0)
    md = r.markdown()
    assert "the claim holds" in md and "aten._to_copy.default" in md
    r.figures[f"{sc.NAME}_scale.png"](tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000
