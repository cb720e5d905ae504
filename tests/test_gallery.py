"""The gallery writer: bad input, failure isolation, determinism, and the HTML in a real browser."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from fpgrad import scenarios
from fpgrad.cli import main
from fpgrad.scenarios import dead_relu, gallery
from tests.browser import CHROMIUM, chromium_images


def _small(monkeypatch: pytest.MonkeyPatch, names: list[str], broken: str | None = None) -> None:
    """Run the gallery over small configurations (and optionally one scenario that raises)."""
    modules = {n: scenarios.get(n) for n in names if n != broken}

    def get(name: str):  # noqa: ANN202
        if name == broken:

            def explode(small: bool = False):  # noqa: ANN202, ARG001
                raise RuntimeError("scenario exploded on purpose")

            return SimpleNamespace(run=explode, CLAIM="broken")
        mod = modules[name]
        return SimpleNamespace(run=lambda: mod.run(small=True), CLAIM=mod.CLAIM)

    monkeypatch.setattr(scenarios, "available", lambda: list(names))
    monkeypatch.setattr(scenarios, "get", get)


def test_unknown_scenario_and_unwritable_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "--out", str(tmp_path), "--only", "no_such_thing"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown scenario 'no_such_thing'" in err
    assert main(["run", "no_such_thing"]) == 2
    capsys.readouterr()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["report", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write to output directory" in err


def test_failed_scenario_is_reported_and_others_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _small(monkeypatch, ["broken_one", "dead_relu"], broken="broken_one")
    code = main(["report", "--out", str(tmp_path)])
    assert code == 1
    assert "scenario exploded on purpose" in (tmp_path / "broken_one.md").read_text()
    assert "**Verdict (the claim holds).**" in (tmp_path / "dead_relu.md").read_text()
    index = (tmp_path / "index.html").read_text()
    assert "FAILED" in index and "dead_relu" in index
    assert "1 scenario(s) failed: broken_one" in capsys.readouterr().err


def test_gallery_is_bit_identical_when_regenerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _small(monkeypatch, ["dead_relu"])
    a, b = tmp_path / "a", tmp_path / "b"
    assert gallery.write_reports(a, progress=False) == []
    assert gallery.write_reports(b, progress=False) == []
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert {"index.html", "README.md", "dead_relu.md", "dead_relu_loss.png"} <= set(files)
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    text = (a / "index.html").read_text() + (a / "dead_relu.md").read_text()
    assert str(tmp_path) not in text  # no paths in the content
    assert not re.search(r"20\d\d-\d\d-\d\d", text)  # no dates


def test_scenario_json_is_strict(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    result = dead_relu.run(small=True)
    doc = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert doc["name"] == "dead_relu" and doc["holds"] is True


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed: `apt-get install chromium` "
    "(Debian) to run the browser check of the HTML index",
)
def test_index_opens_in_headless_chromium_with_its_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _small(monkeypatch, ["dead_relu"])
    out = tmp_path / "gallery"
    assert gallery.write_reports(out, progress=False) == []
    ok, total, dom = chromium_images(out / "index.html", tmp_path)
    assert total >= 1 and ok == total
    assert "dead_relu" in dom
