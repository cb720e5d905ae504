"""tiny_learning_rate: updates below half an ulp of the weights are swamped in float16 and
bfloat16; fp32 master weights, stochastic rounding and Kahan-compensated updates compared."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fpgrad.model.netfile import parse_network
from fpgrad.model.network import Network
from fpgrad.numbers.formats import get_format
from fpgrad.numbers.rounding import round_to
from fpgrad.present.report.plots import save_png
from fpgrad.run.optim import OptimConfig
from fpgrad.run.torch_native import one_torch_thread
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs
from fpgrad.training import TrainResult, train

NAME = "tiny_learning_rate"
CLAIM = (
    "With a learning rate so small that lr * gradient is below half an ulp of the weights, "
    "float16 and bfloat16 swamp every update (w + update == w) and training stalls; fp32 "
    "master weights, stochastic rounding and Kahan-compensated updates let it learn."
)

W0 = [1.25, -1.5, 1.75, -1.125]  # weights in [1, 2): float16 ulp 2^-10, bfloat16 ulp 2^-7
DELTA = [2.0**-5, -(2.0**-5), 2.0**-5, -(2.0**-5)]  # the correction the data asks for
LR = 2.0**-8  # gradient 2 * DELTA: every requested update is 2^-12, a quarter of float16's ulp
PLAIN = ("float16", "bfloat16")
REMEDIES = (
    "float16+master",
    "bfloat16+master",
    "float16+sr",
    "float16+kahan",
    "bfloat16+sr",
    "bfloat16+kahan",
)
RUNS = (*PLAIN, "float32", *REMEDIES)


def network() -> Network:
    """Linear regression (no bias) from W0 to W0 + DELTA. The inputs are the 16 sign patterns
    of 4 features (X^T X / 16 = I), so the gradient is exactly 2 (w - w*) and the loss is
    ||w - w*||^2; the targets are multiples of 2^-5 below 8, exact in every format."""
    x = np.array([[1.0 if (i >> j) & 1 else -1.0 for j in range(4)] for i in range(16)])
    y = x @ (np.array(W0) + np.array(DELTA))
    for fmt in ("float16", "bfloat16"):
        assert np.array_equal(round_to(y, get_format(fmt)), y)
    doc = {
        "name": NAME,
        "layer": [{"type": "dense", "name": "lin", "weight": [W0], "bias": False}],
        "loss": {"type": "mse"},
        "data": {"x": x.tolist(), "y": y[:, None].tolist()},
    }
    return parse_network(doc, source=NAME)


def _update_over_half_ulp(net: Network, precision: str) -> float:
    """Largest |lr * g| / (half an ulp of its weight) at the initial point (float64 gradient)."""
    w = net.params["lin.weight"][0]
    g = 2.0 / net.x.shape[0] * net.x.T @ (net.x @ w - net.y[:, 0])
    fmt = get_format(precision)
    half = np.array([fmt.ulp(float(v)) / 2 for v in w])
    return float(np.max(np.abs(LR * g) / half))


def _pow2(v: float) -> str:
    return f"2^{int(np.log2(v))}" if v > 0 and float(np.log2(v)).is_integer() else f"{v:g}"


@records_runs
def run(small: bool = False) -> ScenarioResult:
    with one_torch_thread():
        return _run(small)


def _run(small: bool) -> ScenarioResult:
    net = network()
    steps = 60 if small else 300
    tr = train(
        net,
        steps=steps,
        cfg=OptimConfig(lr=LR),
        runs=",".join(RUNS),
        perturb=False,
        verdict_every=steps,
    )
    ratio = {p: _update_over_half_ulp(net, p) for p in (*PLAIN, "float32")}
    e_loss0, e_loss = tr.exact.loss[0], tr.exact.loss[-1]

    rows, stats = [], {}
    for label in tr.runs:
        h, det = tr.histories[label], tr.detectors[label]
        sw = det["swamped_fraction"]
        start, end = h.loss[0], h.loss[-1]
        moved_steps = sum(h.moved)
        stats[label] = {
            "swamped_fraction": sw["total"],
            "fully_swamped": sw["every_step_fully_swamped"],
            "moved_steps": moved_steps,
            "loss_start": start,
            "loss_end": end,
            "loss_drop": start / end if end > 0 else float("inf"),
            "loss_floor": det["loss_floor"]["detected"],
            "stall": det["stall"]["detected"],
            "distance": tr.distance[label][-1],
        }
        rows.append(
            [
                label,
                f"{sw['total']:.1%}",
                f"{moved_steps}/{steps}",
                f"{start:.4g}",
                f"{end:.4g}",
                f"{start / end:.3g}x" if end > 0 else "inf",
                f"{end / e_loss:.3g}",
                f"{tr.distance[label][-1]:.3g}",
                "yes" if det["loss_floor"]["detected"] else "no",
            ]
        )
    rows.append(
        [
            "exact",
            "-",
            f"{sum(tr.exact.moved)}/{steps}",
            f"{e_loss0:.4g}",
            f"{e_loss:.4g}",
            f"{e_loss0 / e_loss:.3g}x",
            "1",
            "0",
            "no",
        ]
    )

    plain_swamped = all(stats[p]["swamped_fraction"] >= 0.99 for p in PLAIN)
    plain_stuck = all(stats[p]["moved_steps"] == 0 and stats[p]["loss_floor"] for p in PLAIN)
    f32_free = stats["float32"]["swamped_fraction"] == 0.0
    exact_drop = e_loss0 / e_loss
    # a remedy "learns" when its loss falls by at least a quarter of the exact run's factor
    # (on a log scale) and it ends nearer the exact weights than the swamped run
    learns = {
        r: bool(
            np.log(stats[r]["loss_drop"]) >= 0.25 * np.log(exact_drop)
            and stats[r]["distance"] < stats[r.split("+")[0]]["distance"]
        )
        for r in REMEDIES
    }
    holds = plain_swamped and plain_stuck and f32_free and all(learns.values())

    def fmt_list(names: list[str]) -> str:
        return ", ".join(names) if names else "none"

    best = min(REMEDIES, key=lambda r: stats[r]["distance"])
    verdict = (
        f"At lr = {_pow2(LR)} the largest requested update is {ratio['float16']:.3g} of half a "
        f"float16 ulp and {ratio['bfloat16']:.3g} of half a bfloat16 ulp of its weight. "
        f"float16 and bfloat16 swamped {stats['float16']['swamped_fraction']:.0%} and "
        f"{stats['bfloat16']['swamped_fraction']:.0%} of the requested updates: their weights "
        f"never moved in {steps} steps and their loss stayed at its start "
        f"({'a loss floor was detected in both' if plain_stuck else 'no floor detected in both'}"
        f") while the exact loss fell {exact_drop:.3g}x. float32 swamped "
        f"{stats['float32']['swamped_fraction']:.1%}. Remedies that learned (loss down by at "
        f"least a quarter of the exact factor on a log scale, and nearer the exact weights "
        f"than the plain run): {fmt_list([r for r in REMEDIES if learns[r]])}; that did not: "
        f"{fmt_list([r for r in REMEDIES if not learns[r]])}. Nearest the exact run at the end: "
        f"{best} (relative distance {stats[best]['distance']:.3g} against "
        f"{stats['float16']['distance']:.3g} for plain float16)."
    )
    w_star = np.array(W0) + np.array(DELTA)
    at_zero = [r for r in REMEDIES if stats[r]["loss_end"] == 0.0]
    if at_zero:
        grids = sorted({r.split("+")[0] for r in at_zero})
        on_grid = all(np.array_equal(round_to(w_star, get_format(g)), w_star) for g in grids)
        verdict += f" {fmt_list(at_zero)} end at loss exactly 0, below the exact run: " + (
            f"the optimum w* lies on the {' and '.join(grids)} grid, and once the rounded "
            "weights land on it the low-precision gradient is exactly 0."
            if on_grid
            else "their rounded weights reproduce the targets exactly."
        )
    noisy = [r for r in REMEDIES if learns[r] and stats[r]["loss_end"] > 2 * e_loss]
    if noisy:
        verdict += (
            f" Escaping swamping is not matching the exact run: {fmt_list(noisy)} end above "
            "twice the exact loss (their weights stay on the low-precision grid"
            + (
                ", and stochastic rounding jitters them by an ulp"
                if any("+sr" in r for r in noisy)
                else ""
            )
            + ")."
        )

    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=(
            f"Linear regression without bias, MSE, 4 inputs; the batch is the {net.x.shape[0]} "
            f"sign patterns of the inputs (X^T X / n = I), so the gradient is exactly "
            f"2 (w - w*) and the targets (multiples of 2^-5) are exact in every format. The "
            f"weights start at {W0} (in [1, 2): float16's ulp there is 2^-10, bfloat16's "
            f"2^-7) and the data asks for a correction of {_pow2(abs(DELTA[0]))} per weight, "
            f"so every first update is lr * 2^-4 = {_pow2(LR * 2 * abs(DELTA[0]))}: "
            f"fine-tuning with plain SGD at lr = {_pow2(LR)}, "
            f"{steps} full-batch steps, in {', '.join(RUNS)} and exactly (mpmath at 128 bits, "
            f"certified {tr.exact_certified_digits:.1f} digits by a 256-bit run). "
            "+master keeps fp32 master weights, +sr rounds each update stochastically "
            "(seeded), +kahan carries a Kahan compensation term in the low precision."
        ),
        verdict=verdict,
        holds=holds,
        sections=[
            Section(
                "Swamping and what each run learned",
                "Swamped = the optimizer asked for a non-zero update but w + update == w in the "
                "run's precision (for +master: in the float32 master weights; for +kahan the "
                "weight often stays put while the compensation term accumulates, so its "
                "swamped fraction stays high although it learns). Loss ratio and distance are "
                "against the exact run at the last step.",
                [
                    "run",
                    "swamped updates",
                    "steps that moved w",
                    "loss[0]",
                    "loss[end]",
                    "loss fell",
                    "loss[end] / exact",
                    "distance to exact",
                    "loss floor",
                ],
                rows,
                figure=f"{NAME}_loss.png",
            ),
            Section(
                "Distance to the exact trajectory",
                "Relative distance ||w - w_exact|| / max(||w_exact||, ||w_0||) per step.",
                figure=f"{NAME}_distance.png",
            ),
        ],
        data={
            "steps": steps,
            "lr": LR,
            "update_over_half_ulp": ratio,
            "exact_loss_drop": exact_drop,
            "exact_certified_digits": tr.exact_certified_digits,
            "runs": stats,
            "remedy_learns": learns,
            "plain_swamped": plain_swamped,
            "plain_stuck": plain_stuck,
            "float32_never_swamped": f32_free,
        },
        figures={
            f"{NAME}_loss.png": lambda path: _loss_figure(tr, path),
            f"{NAME}_distance.png": lambda path: _distance_figure(tr, path),
        },
    )


_STYLE = {"float16": "C0", "bfloat16": "C1", "float32": "C2"}


def _line(ax, label: str, xs, ys) -> None:  # noqa: ANN001 - matplotlib axes and arrays
    base, _, policy = label.split(" ")[0].partition("+")
    style = {"": "-", "master": "--", "sr": ":", "kahan": "-."}[policy]
    ax.plot(xs, ys, style, color=_STYLE[base], label=label, lw=1.6)


def _loss_figure(tr: TrainResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    steps = np.arange(len(tr.exact.loss))
    ax.plot(steps, tr.exact.loss, "k-", lw=3, alpha=0.5, label="exact")
    drawn: dict[str, list[float]] = {}
    for label in tr.runs:
        loss = tr.histories[label].loss
        same = next((k for k, v in drawn.items() if v == loss), None)
        _line(ax, label + (f" (= {same})" if same else ""), steps, loss)
        drawn[label] = loss
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE; a drop to the axis is a loss of exactly 0)")
    ax.set_title(f"{NAME}: loss per run (colour: precision; style: policy)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(fig, path)


def _distance_figure(tr: TrainResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label in tr.runs:
        d = np.asarray(tr.distance[label], dtype=float)
        _line(ax, label, np.arange(len(d)), np.where(d > 0, d, np.nan))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("relative distance to the exact weights")
    ax.set_title(f"{NAME}: distance to the exact run")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(fig, path)
