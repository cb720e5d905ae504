"""The diagnosis a user acts on: the inaccurate verdict, findings first, the rows that matter
first, filters, columnar results (JSON streaming, npz), the --out report in a real browser,
escaped Markdown tables, output directories checked before work."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fpgrad.cli import main
from fpgrad.diagnose.comparison import compare
from fpgrad.diagnose.verdicts import VERDICTS, ExactArray, classify, inaccurate_threshold
from fpgrad.model.netfile import load_network
from fpgrad.numbers.formats import get_format
from fpgrad.present.render import QUIET, ROW_ORDER, select_rows
from fpgrad.present.report.markdown import escape_cell, md_table, tables
from tests.browser import CHROMIUM, chromium_images

ROOT = Path(__file__).resolve().parent.parent
SHOWCASE = ROOT / "fpgrad" / "examples" / "showcase.toml"


@pytest.fixture(scope="module")
def showcase():  # noqa: ANN201 - a Comparison
    return compare(load_network(str(SHOWCASE)), precisions="float16,bfloat16")


# ---- the inaccurate verdict ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "fp8_e4m3"])
def test_inaccurate_threshold_is_sqrt_of_unit_roundoff(name: str) -> None:
    fmt = get_format(name)
    u = fmt.eps / 2  # unit roundoff: half the distance from 1 to the next number
    t = inaccurate_threshold(fmt)
    assert t == pytest.approx(math.sqrt(u), rel=1e-15)
    # just above and just below the threshold, on values of the format near 1
    grid = 2.0**-fmt.man_bits
    below = 1 + math.floor(t / grid) * grid  # relative error <= t: ok
    above = below + grid  # the next value of the format: relative error > t
    exact = ExactArray(np.ones(2), np.zeros(2), np.zeros(2, dtype=bool))
    v = classify(exact, np.array([above, below]), fmt)
    assert list(v.verdict) == ["inaccurate", "ok"]
    assert [VERDICTS[c] for c in v.code] == list(v.verdict)


def test_inaccurate_does_not_hide_more_specific_verdicts() -> None:
    f16 = get_format("float16")
    e = np.array([1.0, 1.0, 1e-6, 1.0])
    exact = ExactArray(e, np.zeros(4), np.zeros(4, dtype=bool))
    computed = np.array([-1.0, 0.5, 2e-6, 1.0 + 2**-10])  # wrong sign, inaccurate, subnormal, ok
    v = classify(exact, computed, f16)
    assert list(v.verdict) == ["wrong_sign", "inaccurate", "subnormal", "ok"]


def test_issue_example_bfloat16_gradient_30x_too_small_is_not_ok() -> None:
    bf16 = get_format("bfloat16")
    exact = ExactArray(np.array([-5.10e-04]), np.zeros(1), np.zeros(1, dtype=bool))
    v = classify(exact, np.array([-1.72e-05]), bf16)
    assert v.verdict[0] == "inaccurate"


# ---- rows that matter first, filters, bounded rendering -------------------------------------


def _rank(verdict: str) -> int:
    if verdict in ROW_ORDER:
        return ROW_ORDER.index(verdict)
    if verdict in QUIET:
        return len(ROW_ORDER) + 1 + QUIET.index(verdict)
    return len(ROW_ORDER)


def test_rows_that_matter_come_first(showcase) -> None:  # noqa: ANN001
    c = showcase
    # independent order from the per-element dicts: worst verdict over precisions, then position
    entries = c.gradients
    ranks = [min(_rank(e[p]["verdict"]) for p in c.precisions) for e in entries]
    expected = sorted(range(len(entries)), key=lambda i: (ranks[i], i))
    for limit in (1, 5, len(entries)):
        chosen, total = select_rows(c, limit)
        got = [(g.param, int(i)) for g, flat in chosen for i in flat]
        want = []
        for i in expected[:limit]:
            e = entries[i]
            g = c.column(e["param"])
            want.append((e["param"], int(np.ravel_multi_index(e["index"], g.shape))))
        assert got == want and total == len(entries)
    first = c.render(max_rows=3).split("rows that matter first)")[1].splitlines()[3]
    assert "ROUND-0" in first


def test_verdict_and_param_filters(showcase, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    c = showcase
    chosen, total = select_rows(c, 0, verdicts=["rounding_zero"])
    assert total == c.summary["float16"]["rounding_zero"] + 0 * c.summary["bfloat16"]["ok"]
    for g, flat in chosen:
        assert all(g.cols["float16"].code.ravel()[flat] == VERDICTS.index("rounding_zero"))
    chosen, total = select_rows(c, 0, param="logits.bias")
    assert total == 3 and {g.param for g, _ in chosen} == {"logits.bias"}
    assert main(["compare", str(SHOWCASE), "--precisions", "float16", "--verdict", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown verdict 'nope'" in err and "rounding_zero" in err
    assert main(["compare", str(SHOWCASE), "--precisions", "float16", "--param", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown parameter 'nope'" in err and "logits.bias" in err


def test_render_is_bounded_by_default() -> None:
    from tests.nets import net_from

    rng = np.random.default_rng(0)
    net = net_from(
        [{"type": "dense", "out": 12}, {"type": "tanh"}, {"type": "dense", "out": 3}],
        "mse",
        rng.normal(size=(4, 8)).tolist(),
        rng.normal(size=(4, 3)).tolist(),
    )
    c = compare(net, precisions="float32")
    n = sum(g.size for g in c.grads)
    assert n > 100
    text = c.render()
    table = text.split("rows that matter first)")[1].split("\n\n")[0]
    assert len([ln for ln in table.splitlines() if ln.startswith("| ")]) == 60 + 1  # + header
    assert f"({n - 60} more rows not shown" in text
    assert len(c.render(max_rows=0).splitlines()) > n


def test_per_parameter_summary_adds_up(showcase) -> None:  # noqa: ANN001
    c = showcase
    rows = c.parameter_summary()
    for p in c.precisions:
        total = {v: sum(r["counts"][v] for r in rows if r["precision"] == p) for v in VERDICTS}
        assert total == {v: c.summary[p][v] for v in VERDICTS}
    for r in rows:
        g = c.column(r["param"])
        mags = [abs(float(e["exact"])) for e in g.entries(np.arange(g.size), [], "original")]
        nonzero = [m for m in mags if m]
        assert r["exact_min"] == pytest.approx(min(nonzero), rel=1e-15)
        assert r["exact_max"] == pytest.approx(max(nonzero), rel=1e-15)
        normal = get_format(r["precision"]).smallest_normal
        assert r["below_normal"] == sum(m < normal for m in nonzero)


# ---- findings first ----------------------------------------------------------------------


def test_findings_name_the_first_death_and_the_advisors_scale(showcase) -> None:  # noqa: ANN001
    from fpgrad.diagnose.advisor import advise

    c = showcase
    c.source = "NET.toml"
    text = c.render()
    diagnosis = text.split("Diagnosis\n")[1].split("\n\n")[0].splitlines()
    first = c.attribution["float16"]["first_rounding_zero_backward"]
    assert any(first["op"] in ln and "first dies" in ln for ln in diagnosis)
    k = advise(load_network(str(SHOWCASE)), "float16", measure=False).recommended
    scale = f"--loss-scale {2.0**k:g}"
    assert any(
        f"2^{k}" in ln and f"fpgrad compare NET.toml --precisions float16 {scale}" in ln
        for ln in diagnosis
    )
    s = c.summary["float16"]
    assert f"{s['rounding_zero']} of " in diagnosis[0]
    # bfloat16 holds the showcase's tiny gradients (its losses come from a saturated softmax):
    # no loss scale is offered for it, a float32 loss is
    bf16 = [ln for ln in diagnosis if "--precisions bfloat16" in ln]
    assert bf16 and not any("loss-scale" in ln for ln in bf16)
    assert any("in float32 under a precision policy" in ln for ln in bf16)


@pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None,
    reason="the digits example needs scikit-learn (pip install -e .[example])",
)
def test_digits_example_opens_with_the_diagnosis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "digits_example.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        env=env,
    )
    net = str(tmp_path / "digits.toml")
    assert main(["compare", net, "--precisions", "float16,bfloat16,float32"]) == 0
    out = capsys.readouterr().out
    opening = out.split("\n\n")[1].splitlines()  # the block after the header
    assert opening[0] == "Diagnosis"
    assert "float16: going back from the loss, the signal first dies in loss backward" in "\n".join(
        opening
    )
    assert any("remedy: loss scale 2^" in ln and "advisor" in ln for ln in opening)
    rows = out.split("rows that matter first)")[1].splitlines()[3:8]
    assert all("ROUND-0" in r.split("|")[3] for r in rows), rows


# ---- columnar results: JSON streaming and npz ---------------------------------------------


def test_streamed_json_equals_the_dict(showcase) -> None:  # noqa: ANN001
    c = showcase
    doc = json.loads(c.to_json())
    assert doc == json.loads(json.dumps(c.to_dict()))
    assert doc["schema"] == "fpgrad.compare/2"
    assert len(doc["gradients"]) == sum(g.size for g in c.grads)
    compact = json.loads(c.to_json(indent=None))
    assert compact == doc


def test_npz_holds_every_element(showcase, tmp_path: Path) -> None:  # noqa: ANN001
    from fpgrad.present.report.own import write_npz

    c = showcase
    write_npz(c, tmp_path / "g.npz")
    with np.load(tmp_path / "g.npz", allow_pickle=False) as z:
        names = list(z["verdicts"])
        for g in c.grads:
            assert np.array_equal(z[f"{g.param}/exact_hi"], g.exact.hi)
            for p in c.precisions:
                verdicts = [names[i] for i in z[f"{g.param}/{p}/verdict"].ravel()]
                assert verdicts == c.verdicts(g.param, p)
                values = [e[p]["value"] for e in c.gradients if e["param"] == g.param]
                assert z[f"{g.param}/{p}/value"].ravel().tolist() == values


# ---- the --out report --------------------------------------------------------------------


def _model_file(tmp_path: Path) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    np.save(tmp_path / "x.npy", np.linspace(-1, 1, 24).reshape(6, 4) * 1e-8)
    np.save(tmp_path / "y.npy", np.arange(6) % 3)
    path = tmp_path / "model.toml"
    path.write_text(
        'state_dict = "model.pt"\nmodules = ["Linear(4, 5)", "ReLU()", "Linear(5, 3)"]\n'
        '[loss]\ntype = "cross_entropy"\n[data]\nx_file = "x.npy"\ny_file = "y.npy"\n'
    )
    return path


@pytest.mark.parametrize("kind", ["toml", "model_file"])
def test_out_dir_report(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = SHOWCASE if kind == "toml" else _model_file(tmp_path)
    out = tmp_path / "report"
    assert main(["compare", str(net), "--precisions", "float16", "--out", str(out)]) == 0
    capsys.readouterr()
    files = {p.name for p in out.iterdir()}
    assert {"compare.md", "compare.html", "compare.json", "gradients.npz"} <= files
    md = (out / "compare.md").read_text()
    for t in tables(md):
        assert len({len(r) for r in t}) == 1
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / link).stat().st_size > 1000
    assert "## Diagnosis" in md and str(tmp_path) not in md.split("## Diagnosis")[0]
    doc = json.loads((out / "compare.json").read_text())
    assert doc["summary"]["float16"]["rounding_zero"] > 0
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: `apt-get install chromium` for the browser check")
    ok, total, dom = chromium_images(out / "compare.html", tmp_path)
    assert total == 3 and ok == total
    assert "Diagnosis" in dom


def test_out_dir_checked_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["compare", str(SHOWCASE), "--out", str(blocker / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "directory" in err and "x" in err
    # a fresh process, as a user runs it: exit 2 in under 2 s, no training
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fpgrad",
            "train",
            str(SHOWCASE),
            "--steps",
            "100000",
            "--out",
            str(blocker / "x"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--out directory" in proc.stderr or "output directory" in proc.stderr
    assert elapsed < 2.0


# ---- Markdown tables ---------------------------------------------------------------------


def test_markdown_cells_are_escaped() -> None:
    text = md_table([["|w - 0.3|", 1.5], ["0,1,2,3 | 4,5", 2]], ["|exact|", "n"])
    parsed = tables(text)
    assert len(parsed) == 1 and {len(r) for r in parsed[0]} == {2}
    assert escape_cell(escape_cell("a|b")) == "a\\|b"  # escaping twice changes nothing


def test_gallery_index_escapes_cells() -> None:
    from types import SimpleNamespace

    from fpgrad.scenarios.gallery import _index_md

    fake = SimpleNamespace(claim="a |claim|", verdict="x | y", holds=True)
    parsed = tables(_index_md([("s", fake, "")]))  # type: ignore[list-item]
    assert {len(r) for r in parsed[0]} == {3}


def test_every_markdown_table_under_reports_has_constant_cells() -> None:
    """Fails on files written before the escaping: regenerate the gallery (make report)."""
    bad = []
    for path in sorted((ROOT / "reports").glob("*.md")):
        for t in tables(path.read_text()):
            if len({len(r) for r in t}) != 1:
                bad.append(path.name)
    assert not bad, f"tables with a varying cell count: {sorted(set(bad))}"


# ---- training output that does not mislead -----------------------------------------------


def test_float16_adam_diverges_and_names_eps(capsys: pytest.CaptureFixture[str]) -> None:
    from fpgrad.numbers.rounding import round_to
    from fpgrad.run.optim import OptimConfig
    from fpgrad.training import train

    net = load_network(str(SHOWCASE))
    cfg = OptimConfig(name="adam", lr=0.01)
    r = train(net, steps=3, cfg=cfg, runs="float16,float16+master", verdict_every=1)
    assert float(round_to(np.array([cfg.eps]), "float16")[0]) == 0  # the premise
    d = r.detectors["float16"]
    assert d["diverged"] == {"detected": True, "step": 1}
    assert not d["stall"]["detected"] and not d["limit_cycle"]["detected"]
    assert d["divergence"]["twin"]["verdict"] == "diverged"
    assert "eps = 1e-08 rounds to 0 in float16" in d["first_overflow"]["cause"]
    assert not r.detectors["float16+master"]["diverged"]["detected"]
    text = r.render()
    assert "DIVERGED at step 1" in text and "fixed point" not in text
    # the verdict table: every verdict column, rows that add up to the gradient's elements
    table = text.split("Gradient verdicts at the last checked step")[1].splitlines()[1:]
    heads = [c.strip() for c in table[0].strip("|").split("|")]
    assert heads[2:-1] == [*VERDICTS, "no_reference"]
    n = sum(v.size for v in net.params.values())
    for row in table[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert sum(int(x) for x in cells[2:-1]) == int(cells[-1]) == n


def test_advise_out_dir_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "advice"
    assert main(["advise", str(SHOWCASE), "--no-measure", "--out", str(out)]) == 0
    capsys.readouterr()
    md = (out / "advise.md").read_text()
    doc = json.loads((out / "advise.json").read_text())
    assert (
        f"2^{doc['recommended']['exponent']}" in md
        and (out / "lost_share.png").stat().st_size > 1000
    )
    for t in tables(md):
        assert len({len(r) for r in t}) == 1
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: `apt-get install chromium` for the browser check")
    ok, total, _ = chromium_images(out / "advise.html", tmp_path)
    assert total == 1 and ok == 1


# ---- small things a user expects ---------------------------------------------------------


def test_version_and_did_you_mean(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"fpgrad {version('fpgrad')}\n"
    cases = [
        (["formats", "bflaot16"], "(did you mean 'bfloat16'?)"),
        (["compare", str(SHOWCASE), "--precisions", "flaot16"], "(did you mean 'float16'?)"),
        (["compare", str(SHOWCASE), "--policy", "autocats"], "(did you mean 'autocast'?)"),
        (["run", "dead_relus"], "(did you mean 'dead_relu'?)"),
        (["policies", "autocast_bf61"], "(did you mean 'autocast_bf16'?)"),
        (
            ["train", str(SHOWCASE), "--steps", "1", "--precisions", "float16+mastr"],
            "(did you mean 'master'?)",
        ),
    ]
    for args, hint in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and hint in err, (args, err)
    assert main(["formats", "zzzzzz"]) == 2
    assert "did you mean" not in capsys.readouterr().err  # nothing close: no guess


def test_run_out_writes_the_figures_its_markdown_links(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from fpgrad import scenarios
    from fpgrad.scenarios import dead_relu

    small = SimpleNamespace(run=lambda: dead_relu.run(small=True), CLAIM=dead_relu.CLAIM)
    monkeypatch.setattr(scenarios, "get", lambda name: small)
    assert main(["run", "dead_relu", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "dead_relu.md").read_text()
    assert capsys.readouterr().out.strip() == md.strip()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links and all((tmp_path / link).stat().st_size > 1000 for link in links)


# ---- teaching: explain --mode and --with ----------------------------------------------------


def test_explain_mode_and_pair(capsys: pytest.CaptureFixture[str]) -> None:
    from fractions import Fraction

    from fpgrad.numbers.rounding import round_exact
    from fpgrad.present.explain import explain, pair

    third = explain("1/3", ["float16"], mode="toward_zero")["formats"][0]["value"]
    up = explain("1/3", ["float16"], mode="up")["formats"][0]["value"]
    assert Fraction(third) < Fraction(1, 3) < Fraction(up)
    assert Fraction(up) - Fraction(third) == Fraction(get_format("float16").ulp(third))
    # a + b: half an ulp of 1 in float16 is 2^-11; a smaller b is swamped, a tie goes to even
    rows = {p["format"]: p for p in pair("1", "2**-12", ["float16", "float32"])}
    assert rows["float16"]["sum"]["what"] == "swamped" and rows["float16"]["sum"]["value"] == 1.0
    assert rows["float32"]["sum"]["value"] == 1 + 2**-12
    assert pair("1", "2**-10", ["float16"])[0]["sum"]["what"] == "ok"
    # a * b: 1e-4 squared is below half float16's smallest subnormal (2^-25)
    prod = pair("1e-4", "1e-4", ["float16", "bfloat16"])
    assert [p["product"]["what"] for p in prod] == ["underflow", "ok"]
    a16 = round_exact(Fraction(1, 10**4), "bfloat16")
    assert prod[1]["product"]["value"] == round_exact(Fraction(a16) ** 2, "bfloat16")
    assert main(["explain", "1", "--with", "2**-12", "--mode", "toward_zero"]) == 0
    out = capsys.readouterr().out
    assert "mode     toward_zero" in out and "(swamped)" in out and "binade:" in out
    assert main(["explain", "1", "--mode", "stochastic"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stochastic modes have no single result" in err


def test_exact_strings_are_correctly_rounded(showcase) -> None:  # noqa: ANN001
    """Every exact string of the showcase against the exact word sum (Fractions): within half
    a unit of its last digit, ties to even, with all the certified digits."""
    import decimal
    from fractions import Fraction

    from fpgrad.graph.layers import exact_trace

    ex = exact_trace(load_network(str(SHOWCASE)))
    c = showcase
    for g in c.grads:
        flat = np.arange(g.size)
        strings = g.exact_strings(flat)
        words = ex.words(f"grads/{g.param}", flat)
        for i, text in enumerate(strings):
            exact = sum((Fraction(w) for w in words[:, i]), Fraction(0))
            if exact == 0:
                assert text == "0"
                continue
            d = decimal.Decimal(text)
            n = len(text.split("e")[0].replace("-", "").replace(".", ""))
            digits = g.digits.ravel()[i]
            assert n == (40 if math.isinf(digits) else max(1, int(digits)))
            unit = Fraction(10) ** (d.adjusted() - n + 1)
            assert abs(Fraction(d) - exact) <= unit / 2


def test_scenario_sections_escape_cells() -> None:
    from fpgrad.scenarios.base import Section

    sec = Section("t", headers=["run", "|w - 0.3|"], rows=[["float16", "0,1,2,3 | 4,5"]])
    parsed = tables(sec.markdown())
    assert len(parsed) == 1 and {len(r) for r in parsed[0]} == {2}


def test_train_out_writes_markdown_html_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "train"
    code = main(
        ["train", str(SHOWCASE), "--steps", "3", "--precisions", "float32", "--out", str(out)]
    )
    capsys.readouterr()
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"train.md", "train.html", "train.json", "loss.png"} <= names
    md = (out / "train.md").read_text()
    assert "![" in md and "loss.png" in md and "```" in md
    page = (out / "train.html").read_text()
    assert page.count("data:image/png;base64,") == sum(n.endswith(".png") for n in names)
    if not CHROMIUM:
        pytest.skip("Chromium is not installed: `apt-get install chromium` for the browser check")
    ok, total, _ = chromium_images(out / "train.html", tmp_path)
    assert total >= 1 and ok == total
