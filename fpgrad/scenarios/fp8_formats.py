"""fp8_formats: one network in fp8 e4m3 and e5m2 (emulated, every operation correctly
rounded) against float16 and bfloat16: e4m3 loses small gradients to its range, e5m2 keeps
their range but not their precision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fpgrad.diagnose.comparison import Comparison, compare
from fpgrad.model.netfile import parse_network
from fpgrad.model.network import Network
from fpgrad.numbers.formats import get_format
from fpgrad.present.report.plots import gradient_magnitudes
from fpgrad.run.torch_native import one_torch_thread
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs

NAME = "fp8_formats"
CLAIM = (
    "In fp8, e4m3 (smallest subnormal 2^-9, max 448) loses small gradients to underflow, while "
    "e5m2 (smallest subnormal 2^-16, but only 2 mantissa bits) keeps their range and loses "
    "precision instead; float16 and bfloat16 lose far fewer."
)

PRECISIONS = ("fp8_e4m3", "fp8_e5m2", "float16", "bfloat16")
SCALES = (1.0, 0.25, 0.03, 0.004)  # feature scales: gradients spanning four decades


def network(batch: int = 8) -> Network:
    """4-8-3 tanh classifier, cross-entropy; input features on scales 1 to 0.004."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(batch, len(SCALES))) * np.array(SCALES)
    x = np.round(x * 1024) / 1024
    y = rng.integers(0, 3, size=batch)
    doc = {
        "name": NAME,
        "seed": 1,
        "layer": [
            {"type": "dense", "name": "hidden", "out": 8, "init": "xavier_uniform"},
            {"type": "tanh", "name": "act"},
            {"type": "dense", "name": "logits", "out": 3, "init": "xavier_uniform"},
        ],
        "loss": {"type": "cross_entropy"},
        "data": {"x": x.tolist(), "y": y.tolist()},
    }
    return parse_network(doc, source=NAME)


def _stats(cmp: Comparison, p: str) -> dict[str, Any]:
    fmt = get_format(p)
    exact = np.array([abs(float(g["exact"])) for g in cmp.gradients])
    nonzero = exact > 0
    ok = [g[p]["rel_err"] for g in cmp.gradients if g[p]["verdict"] == "ok"]
    s = cmp.summary[p]
    return {
        "smallest_subnormal": fmt.smallest_subnormal,
        "mantissa_bits": fmt.precision - 1,
        "below_half_subnormal": int(np.sum(nonzero & (exact <= fmt.smallest_subnormal / 2))),
        "below_normal": int(np.sum(nonzero & (exact < fmt.smallest_normal))),
        "underflow": s["rounding_zero_underflow"],
        "lost": s["rounding_zero_lost"],
        "subnormal": s["subnormal"],
        "wrong_sign": s["wrong_sign"],
        "overflow": s["overflow"] + s["nan"],
        "ok": s["ok"],
        "median_rel_err_ok": float(np.median(ok)) if ok else None,
        "max_rel_err_ok": float(np.max(ok)) if ok else None,
    }


@records_runs
def run(small: bool = False) -> ScenarioResult:
    with one_torch_thread():
        return _run(small)


def _run(small: bool) -> ScenarioResult:
    net = network(batch=4 if small else 8)
    cmp = compare(net, precisions=",".join(PRECISIONS))
    n = len(cmp.gradients)
    n_nonzero = sum(float(g["exact"]) != 0 for g in cmp.gradients)
    st = {p: _stats(cmp, p) for p in PRECISIONS}
    e4, e5 = st["fp8_e4m3"], st["fp8_e5m2"]

    # precision on the same elements: those both fp8 formats call ok
    both = [
        g
        for g in cmp.gradients
        if g["fp8_e4m3"]["verdict"] == "ok" and g["fp8_e5m2"]["verdict"] == "ok"
    ]
    med = {
        p: float(np.median([g[p]["rel_err"] for g in both])) if both else None
        for p in ("fp8_e4m3", "fp8_e5m2")
    }
    range_loss = {p: st[p]["underflow"] + st[p]["subnormal"] for p in PRECISIONS}
    precision_loss = {p: st[p]["wrong_sign"] + st[p]["lost"] for p in PRECISIONS}
    not_ok = {p: n_nonzero - st[p]["ok"] for p in PRECISIONS}

    e4_range_limited = e4["underflow"] > e5["underflow"] and range_loss["fp8_e4m3"] > 0
    e5_precision_limited = (
        med["fp8_e5m2"] is not None
        and med["fp8_e4m3"] is not None
        and med["fp8_e5m2"] > med["fp8_e4m3"]
    )
    wider_better = all(
        not_ok[p] < min(not_ok["fp8_e4m3"], not_ok["fp8_e5m2"]) for p in ("float16", "bfloat16")
    ) and all(
        (st[p]["median_rel_err_ok"] or 0) < (e4["median_rel_err_ok"] or 1)
        for p in ("float16", "bfloat16")
    )
    holds = e4_range_limited and e5_precision_limited and wider_better

    first = cmp.attribution["fp8_e4m3"]["first_rounding_zero_backward"]
    verdict = (
        f"Of {n_nonzero} non-zero exact gradients, fp8_e4m3 rounds {e4['underflow']} to zero "
        f"by underflow ({e4['below_half_subnormal']} lie at or below 2^-10, half its smallest "
        f"subnormal, where even correct rounding of the exact value gives 0) and holds {e4['subnormal']} more only as "
        f"subnormals, with {e4['lost']} lost and {e4['wrong_sign']} of wrong sign; fp8_e5m2 "
        f"underflows {e5['underflow']} and has {e5['subnormal']} subnormals, but gets "
        f"{e5['wrong_sign']} signs wrong and loses {e5['lost']} through rounded intermediates. "
        f"On the {len(both)} gradients both call ok, the median relative error is "
        + (
            f"{med['fp8_e4m3']:.3g} for e4m3 (3 mantissa bits) and {med['fp8_e5m2']:.3g} for "
            "e5m2 (2 bits)"
            if both
            else "undefined"
        )
        + f". So e4m3 is {'range-limited' if e4_range_limited else 'not range-limited here'} "
        f"and e5m2 {'precision-limited' if e5_precision_limited else 'not precision-limited here'}"
        f". float16 has {not_ok['float16']} and bfloat16 {not_ok['bfloat16']} non-ok gradients "
        f"(against {not_ok['fp8_e4m3']} and {not_ok['fp8_e5m2']}), with median relative errors "
        f"{st['float16']['median_rel_err_ok']:.2g} and {st['bfloat16']['median_rel_err_ok']:.2g}."
    )
    if first:
        verdict += (
            f" In e4m3 the first rounding zeros going back from the loss are in {first['layer']} "
            f"{first['quantity']} ({first['op']})."
        )

    rows = [
        [
            p,
            st[p]["mantissa_bits"],
            f"{st[p]['smallest_subnormal']:.3g}",
            st[p]["below_half_subnormal"],
            st[p]["ok"],
            st[p]["subnormal"],
            st[p]["underflow"],
            st[p]["lost"],
            st[p]["wrong_sign"],
            st[p]["overflow"],
            "-" if st[p]["median_rel_err_ok"] is None else f"{st[p]['median_rel_err_ok']:.3g}",
            "-" if st[p]["max_rel_err_ok"] is None else f"{st[p]['max_rel_err_ok']:.3g}",
        ]
        for p in PRECISIONS
    ]
    loss_rows = [
        [p, f"{cmp.loss[p]['value']:.6g}", cmp.loss[p]["verdict"], f"{cmp.loss[p]['rel_err']:.3g}"]
        for p in PRECISIONS
    ]
    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=(
            f"A 4-8-3 tanh classifier (Xavier init, seed 1), cross-entropy, batch "
            f"{net.x.shape[0]}; the four input features have scales {', '.join(map(str, SCALES))}"
            ", so the first layer's weight gradients span four decades. One forward and "
            "backward pass in fp8_e4m3 and fp8_e5m2 (fpgrad's strict emulated machine: every "
            "operation correctly rounded into the format, dot products accumulated in float32 "
            "and rounded once, as fp8 matrix units do) and in float16 and bfloat16 (torch), "
            f"against the certified exact gradients ({cmp.certified_digits:.1f} digits)."
        ),
        verdict=verdict,
        holds=holds,
        sections=[
            Section(
                "Gradient verdicts per format",
                f"Over all {n} gradient elements ({n_nonzero} with a non-zero exact value). "
                "'below half subnormal' counts exact gradients that correct rounding alone sends "
                "to 0 in that format; underflow and lost are the two kinds of rounding zero; "
                "relative errors are over the elements with verdict ok.",
                [
                    "format",
                    "mantissa bits",
                    "smallest subnormal",
                    "below half subnormal",
                    "ok",
                    "subnormal",
                    "underflow",
                    "lost",
                    "wrong sign",
                    "inf/NaN",
                    "median rel. err",
                    "max rel. err",
                ],
                rows,
                figure=f"{NAME}_magnitudes.png",
            ),
            Section(
                "Loss",
                "The loss in each format against the exact loss.",
                ["format", "loss", "verdict", "rel. error"],
                loss_rows,
            ),
        ],
        data={
            "stats": st,
            "median_rel_err_common": med,
            "common_ok": len(both),
            "range_loss": range_loss,
            "precision_loss": precision_loss,
            "not_ok": not_ok,
            "e4m3_range_limited": e4_range_limited,
            "e5m2_precision_limited": e5_precision_limited,
            "wider_formats_better": wider_better,
            "certified_digits": cmp.certified_digits,
        },
        figures={f"{NAME}_magnitudes.png": lambda path: _figure(cmp, path)},
    )


def _figure(cmp: Comparison, path: Path) -> None:
    gradient_magnitudes(cmp, path)
