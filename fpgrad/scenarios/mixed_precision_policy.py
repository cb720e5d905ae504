"""mixed_precision_policy: does torch.autocast (float16 matmuls, float32 softmax, loss and
master weights) keep a confident classifier's float16 gradients from underflowing? Compared
with pure float16, autocast_bf16, autocast with the advisor's loss scale, and a user policy
that keeps the last dense layer in float32; then a short Adam run of each remedy.

Long module: one gallery scenario: its network, its runs, its computed verdict and its report
text.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fpgrad.diagnose.advisor import advise
from fpgrad.diagnose.comparison import compare
from fpgrad.graph.layers import exact_trace
from fpgrad.model.netfile import parse_network
from fpgrad.model.network import Network
from fpgrad.numbers.formats import get_format
from fpgrad.present.render import policy_rows
from fpgrad.present.report.plots import save_png
from fpgrad.run.optim import OptimConfig
from fpgrad.run.torch_native import one_torch_thread
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs
from fpgrad.training import TrainResult, train

NAME = "mixed_precision_policy"
CLAIM = (
    "torch.autocast (float32 master weights, float32 softmax and loss, float16 matmuls) is "
    "enough to keep float16 gradients from underflowing."
)

FEATURES, HIDDEN, CLASSES, BATCH = 4, 8, 6, 8
SEED = 3
GAIN = 32.0  # output weights: std sqrt(1/8) times 32, a confident output layer
MARGIN = (6.0, 10.0)  # nats between the predicted class and the runner-up
MAX_GAP = 24.0  # nats between the predicted class and the least likely one
CANDIDATES = 4000
USER = "autocast_fp32_head"
USER_TABLE = {"extends": "autocast", "layers": {"out": "float32"}}
COLUMNS = ("float16", "float32", "autocast", "autocast_bf16", USER)
OPT = OptimConfig(name="adam", lr=1e-3)
STEPS, STEPS_SMALL, VERDICT_EVERY = 20, 10, 5
F16_FLUSH = 2.0**-25  # |v| <= 2^-25 rounds to 0 in float16 (ties to even)
VERDICT_COLUMNS = ("ok", "structural_zero", "rounding_zero", "subnormal", "wrong_sign")


def _grid(a: np.ndarray, step: float = 2.0**-8) -> np.ndarray:
    return np.round(a / step) * step


def _logits(w1: np.ndarray, w2: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ w1.T, 0.0) @ w2.T


def network() -> Network:
    """A 4-8-6 ReLU classifier whose 8 inputs it labels itself, each with a margin of 6 to 10
    nats over the runner-up and at most 24 over the least likely class; cross-entropy."""
    rng = np.random.default_rng(SEED)
    w1 = _grid(rng.normal(size=(HIDDEN, FEATURES)) * math.sqrt(2 / FEATURES))
    w2 = _grid(rng.normal(size=(CLASSES, HIDDEN)) * math.sqrt(1 / HIDDEN)) * GAIN
    cand = _grid(rng.normal(size=(CANDIDATES, FEATURES)))
    z = np.sort(_logits(w1, w2, cand), axis=1)
    margin, gap = z[:, -1] - z[:, -2], z[:, -1] - z[:, 0]
    keep = np.flatnonzero((margin >= MARGIN[0]) & (margin <= MARGIN[1]) & (gap <= MAX_GAP))
    x = cand[keep[:BATCH]]
    y = _logits(w1, w2, x).argmax(axis=1)
    doc = {
        "name": NAME,
        "seed": SEED,
        "layer": [
            {"type": "dense", "name": "hidden", "out": HIDDEN, "weight": w1.tolist()},
            {"type": "relu", "name": "act"},
            {"type": "dense", "name": "out", "out": CLASSES, "weight": w2.tolist()},
        ],
        "loss": {"type": "cross_entropy"},
        "data": {"x": x.tolist(), "y": y.tolist()},
        "policy": {USER: USER_TABLE},
    }
    return parse_network(doc, source=NAME)


def _batch_facts(net: Network) -> dict[str, Any]:
    """Margins (to the runner-up), largest logit gaps and class counts, in float64."""
    p = net.params
    h = np.maximum(net.x @ p["hidden.weight"].T + p["hidden.bias"], 0.0)
    z = h @ p["out.weight"].T + p["out.bias"]
    y = np.asarray(net.y, dtype=int)
    zy = z[np.arange(len(y)), y]
    others = np.where(np.eye(CLASSES, dtype=bool)[y], np.inf, zy[:, None] - z)
    return {
        "margins": [float(v) for v in others.min(axis=1)],
        "max_gaps": [float(v) for v in (zy - z.min(axis=1))],
        "accuracy": float(np.mean(z.argmax(axis=1) == y)),
        "class_counts": np.bincount(y, minlength=CLASSES).tolist(),
    }


def _log2_span(values: list[float]) -> list[float] | None:
    mags = [math.log2(abs(v)) for v in values if v != 0]
    return [min(mags), max(mags)] if mags else None


def _exponents(safe: list[int] | None) -> str:
    return "empty" if safe is None else f"2^{safe[0]} .. 2^{safe[1]}"


def _span_text(span: list[float] | None) -> str:
    return "none" if span is None else f"2^{span[0]:.1f} to 2^{span[1]:.1f}"


def _counts(summary: dict[str, int]) -> list[int]:
    return [summary[v] for v in VERDICT_COLUMNS] + [summary["overflow"] + summary["nan"]]


@records_runs
def run(small: bool = False) -> ScenarioResult:
    with one_torch_thread():
        return _run(small)


def _run(small: bool) -> ScenarioResult:
    net = network()
    batch = _batch_facts(net)
    c = compare(net, ",".join(COLUMNS))
    adv = advise(net, "float16", measure=False)
    adv_ac = advise(net, policy="autocast", measure=False)
    k = adv.recommended
    in_autocast_range = adv_ac.safe is not None and adv_ac.safe[0] <= k <= adv_ac.safe[1]
    scaled_label = f"autocast, S=2^{k}"
    cs = compare(net, "autocast", loss_scale=adv.recommended_scale)
    summary = {col: c.summary[col] for col in COLUMNS}
    summary[scaled_label] = cs.summary["autocast"]
    plans = {col: c.policies[col] for col in COLUMNS}
    plans[scaled_label] = cs.policies["autocast"]
    labels = [*COLUMNS[:4], scaled_label, USER]
    zeros = {col: summary[col]["rounding_zero"] for col in labels}

    exact = [float(g["exact"]) for g in c.gradients]
    n_total, n_nonzero = len(exact), sum(e != 0 for e in exact)
    scaled_by = {(g["param"], tuple(g["index"])): g["autocast"] for g in cs.gradients}
    lost = [g for g in c.gradients if g["autocast"]["verdict"] == "rounding_zero"]
    lost_exact = [float(g["exact"]) for g in lost]
    below = sum(abs(e) <= F16_FLUSH for e in lost_exact)
    lost_span = _log2_span(lost_exact)
    by_param = dict(sorted(Counter(g["param"] for g in lost).items()))
    grad_span = _log2_span(exact)
    lifted = grad_span[0] + k if grad_span else None  # smallest |exact gradient| times S

    ex = exact_trace(net)
    signal = ex.exact_array("backward/out")
    signal_vals = [float(v) for v in signal.hi[~signal.zero]]
    signal_span = _log2_span(signal_vals)
    signal_below = sum(abs(v) <= F16_FLUSH for v in signal_vals)
    att = c.attribution["autocast"]
    first = att["first_rounding_zero_backward"]
    first_row = (
        next(
            r
            for r in att["places"]
            if (r["layer"], r["direction"], r["quantity"])
            == (first["layer"], first["direction"], first["quantity"])
        )
        if first
        else None
    )

    steps = STEPS_SMALL if small else STEPS
    runs = [
        "autocast",
        "autocast+dynamic",
        f"autocast+scale={adv.recommended_scale:g}",
        f"float16+master+scale={adv.recommended_scale:g}",
        USER,
    ]
    tr = train(
        net, steps, OPT, runs=runs, perturb=False, verdict_every=VERDICT_EVERY, exact_bits=128
    )
    training = _training_facts(tr)

    holds = zeros["autocast"] == 0
    verdict = _verdict_text(
        holds=holds,
        zeros=zeros,
        n_nonzero=n_nonzero,
        f16=summary["float16"],
        by_param=by_param,
        below=below,
        lost_span=lost_span,
        first=first,
        first_row=first_row,
        signal_span=signal_span,
        k=k,
        lifted=lifted,
        scaled_label=scaled_label,
    )
    verdict += " " + _training_text(training, steps)

    verdict_rows = [[col, plans[col]["summary"], *_counts(summary[col])] for col in labels]
    plan_rows = policy_rows(plans, labels)
    zero_rows = [
        [
            f"{g['param']}{g['index']}",
            f"{float(g['exact']):.4g}",
            f"{math.log2(abs(float(g['exact']))):.1f}",
            g["float16"]["verdict"]
            + (f" ({g['float16']['kind']})" if g["float16"]["kind"] else ""),
            f"rounding_zero ({g['autocast']['kind']})",
            g["autocast_bf16"]["verdict"],
            scaled_by[(g["param"], tuple(g["index"]))]["verdict"],
            g[USER]["verdict"],
        ]
        for g in lost
    ]
    place_rows = [
        [
            f"{r['layer']} {r['quantity']}",
            r["op"],
            r["format"],
            r["size"],
            r["rounding_zero"],
            r["subnormal"],
            r["exact_subnormal_range"],
        ]
        for r in att["places"]
        if r["direction"] == "backward"
    ]
    train_rows = [
        [
            label,
            t["plan"],
            " / ".join(str(v) for v in t["rounding_zeros"].values()),
            t["frozen"],
            f"{t['distance']:.3g}",
            f"{t['loss']:.6g}",
            f"2^{math.log2(t['scale']):.0f}",
            t["skipped"],
        ]
        for label, t in training["runs"].items()
    ]
    m = batch["margins"]
    present = [i for i, n in enumerate(batch["class_counts"]) if n]
    setup = (
        f"A {FEATURES}-{HIDDEN}-{CLASSES} ReLU classifier (biases zero), cross-entropy, "
        f"batch {BATCH}. Hidden weights normal with std sqrt(2/{FEATURES}), output weights with "
        f"std sqrt(1/{HIDDEN}) times {GAIN:g} (a confident output layer), on a 2^-8 grid (seed "
        f"{SEED}). The batch: "
        f"the first {BATCH} of {CANDIDATES} N(0, 1) inputs that the network classifies with a "
        f"margin of {MARGIN[0]:g} to {MARGIN[1]:g} nats over the runner-up and at most "
        f"{MAX_GAP:g} over the least likely class, labelled with its own predictions "
        f"(accuracy {100 * batch['accuracy']:.0f}%; margins {min(m):.1f} to {max(m):.1f} nats; "
        f"classes {', '.join(map(str, present))} present, the other "
        f"{CLASSES - len(present)} absent). So p - t is tiny: the exact loss gradient of the "
        f"logits, (p - t)/{BATCH}, has |exact| from {_span_text(signal_span)}, "
        f"{signal_below} of its {len(signal_vals)} non-zero elements at or below 2^-25. "
        "One forward and backward pass per column, against the certified exact gradients "
        f"({c.certified_digits:.1f} digits): pure float16, float32, the built-in policies "
        "autocast and autocast_bf16, autocast with loss scale S, and the user policy "
        f"{USER} (autocast with the last dense layer in float32). S = 2^{k} is what "
        f"fpgrad.diagnose.advisor.advise recommends for this network in float16 ({adv.reason}); "
        "for the autocast policy (float32 loss: no cap by the seed) its safe range is "
        f"{_exponents(adv_ac.safe)} and it recommends 2^{adv_ac.recommended}. 2^{k} is "
        f"{'inside' if in_autocast_range else 'outside'} that range and also serves "
        "float16+master, whose float16 loss holds no scale above 65504. "
        f"Then {steps} full-batch Adam steps (lr {OPT.lr:g}) of autocast, autocast+dynamic, "
        f"autocast+scale=S, float16+master+scale=S and {USER}, with verdicts of the "
        f"parameter gradients every {VERDICT_EVERY} steps."
    )
    user_toml = (
        f'```toml\n[policy.{USER}]\nextends = "autocast"\nlayers = {{ out = "float32" }}\n```'
    )
    data = {
        "batch": batch,
        "elements": n_total,
        "nonzero": n_nonzero,
        "gradient_log2_range": grad_span,
        "summary": summary,
        "rounding_zeros": zeros,
        "plans": {col: plans[col]["summary"] for col in labels},
        "autocast_zeros": [
            {"param": g["param"], "index": g["index"], "exact": g["exact"]} for g in lost
        ],
        "autocast_zeros_by_param": by_param,
        "autocast_zeros_below_f16_flush": below,
        "autocast_zeros_log2_range": lost_span,
        "autocast_first_rounding_zero_backward": first,
        "logit_gradient_log2_range": signal_span,
        "logit_gradient_below_f16_flush": signal_below,
        "scale_log2": k,
        "advisor": {
            "float16": {"safe": adv.safe, "recommended": k, "reason": adv.reason},
            "autocast": {
                "safe": adv_ac.safe,
                "recommended": adv_ac.recommended,
                "reason": adv_ac.reason,
            },
        },
        "smallest_gradient_times_scale_log2": lifted,
        "training": training,
        "certified_digits": c.certified_digits,
    }
    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=setup,
        verdict=verdict,
        holds=holds,
        sections=[
            Section(
                "Gradient verdicts per column",
                f"Over all {n_total} gradient elements ({n_nonzero} with a non-zero exact "
                "value). The policy column is the plan each column ran (what each op computed "
                "in). autocast's parameter gradients are float32, so they are judged in "
                "float32: its rounding zeros are of kind lost (an intermediate killed them).",
                [
                    "column",
                    "policy",
                    "ok",
                    "structural zero",
                    "rounding zero",
                    "subnormal",
                    "wrong sign",
                    "inf/NaN",
                ],
                verdict_rows,
                figure=f"{NAME}_verdicts.png",
            ),
            Section(
                "What each op computed in",
                f"From each column's plan. The user policy is a `[policy.{USER}]` table of the "
                f"network file:\n\n{user_toml}",
                ["layer", *labels],
                plan_rows,
            ),
            Section(
                "The gradients autocast loses",
                "Every element autocast rounds to 0, with its exact value and its verdict in "
                "the other columns.",
                [
                    "element",
                    "exact",
                    "log2 abs(exact)",
                    "float16",
                    "autocast",
                    "autocast_bf16",
                    scaled_label,
                    USER,
                ],
                zero_rows,
            ),
            Section(
                "Where autocast's backward signals die",
                "autocast's backward signals dL/d(output), from the loss back, against the "
                "exact ones in the format each was in; 'exact subnormal range' counts exact "
                "values below that format's smallest normal.",
                [
                    "signal",
                    "computed by",
                    "format",
                    "elements",
                    "rounding zeros",
                    "subnormal",
                    "exact subnormal range",
                ],
                place_rows,
            ),
            Section(
                f"Training: {steps} Adam steps",
                "Rounding zeros of the parameter gradients against the exact gradients at the "
                f"same parameters (steps {', '.join(map(str, training['verdict_steps']))}); "
                "'frozen' counts weights the exact run moves and the run never moves; distance "
                "is ||w - w_exact|| / max(||w_exact||, ||w_0||) at the end; S is the loss "
                "scale at the end.",
                [
                    "run",
                    "policy",
                    "rounding zeros",
                    "frozen",
                    "distance to exact",
                    "loss",
                    "S",
                    "skipped steps",
                ],
                train_rows,
            ),
        ],
        data=data,
        figures={f"{NAME}_verdicts.png": lambda path: _figure(labels, summary, n_nonzero, path)},
    )


def _training_facts(tr: TrainResult) -> dict[str, Any]:
    ex0, ex1 = tr.exact.params[0], tr.exact.params[-1]
    moved_exact = ex1 != ex0
    out: dict[str, Any] = {}
    steps: list[int] = []
    for label in tr.runs:
        h = tr.histories[label]
        steps = sorted(h.verdicts)
        out[label] = {
            "plan": tr.plans[label]["summary"],
            "rounding_zeros": {t: h.verdicts[t].get("rounding_zero", 0) for t in steps},
            "frozen": int(np.sum(moved_exact & (h.params[-1] == h.params[0]))),
            "distance": float(tr.distance[label][-1]),
            "loss": float(h.loss[-1]),
            "scale": float(h.scale[-1]),
            "skipped": int(sum(h.skipped)),
        }
    return {
        "runs": out,
        "verdict_steps": steps,
        "exact_loss": [float(tr.exact.loss[0]), float(tr.exact.loss[-1])],
        "exact_moved": int(np.sum(moved_exact)),
    }


def _verdict_text(
    *,
    holds: bool,
    zeros: dict[str, int],
    n_nonzero: int,
    f16: dict[str, int],
    by_param: dict[str, int],
    below: int,
    lost_span: list[float] | None,
    first: dict[str, Any] | None,
    first_row: dict[str, Any] | None,
    signal_span: list[float] | None,
    k: int,
    lifted: float | None,
    scaled_label: str,
) -> str:
    f16_text = (
        f"pure float16 {f16['rounding_zero']} ({f16['rounding_zero_underflow']} underflow, "
        f"{f16['rounding_zero_lost']} lost)"
    )
    if holds:
        return (
            f"Here autocast rounds none of the {n_nonzero} non-zero exact gradients to 0; "
            f"float32 has {zeros['float32']} rounding zeros and {f16_text}."
        )
    where = ", ".join(f"{n} in {p}" for p, n in by_param.items())
    text = (
        f"Under autocast {zeros['autocast']} of {n_nonzero} non-zero exact gradient elements "
        f"are still exactly 0 ({where}); float32 has {zeros['float32']} and {f16_text}. "
    )
    if below == zeros["autocast"]:
        text += f"Every one has |exact| at or below 2^-25 ({_span_text(lost_span)}): "
    else:
        text += (
            f"{below} of them have |exact| at or below 2^-25 ({_span_text(lost_span)} for all): "
        )
    text += (
        "half float16's smallest subnormal. autocast runs each dense layer's backward, the "
        "weight gradient (dL/dz)^T a included, as a float16 matmul, so these values round to 0 "
        "in float16 and the cast to the float32 parameter gradient comes after: float32 master "
        "weights and a float32 loss cannot bring them back. "
    )
    if first and first_row:
        text += (
            f"Going back from the loss, the first rounding zeros are in {first['layer']} "
            f"{first['quantity']} ({first['op']}): {first['rounding_zero']} of "
            f"{first_row['size']} elements of the loss gradient, computed in float32 as "
            f"(p - t)/B (exact {_span_text(signal_span)}: confident predictions make p - t "
            f"tiny), round to 0 when cast to {first_row['format']} for that matmul. "
        )
    remedies = [
        f"autocast_bf16 leaves {zeros['autocast_bf16']} (bfloat16 has float32's exponent "
        f"range, down to 2^{math.log2(get_format('bfloat16').smallest_subnormal):.0f})",
        f"{scaled_label} (the advisor's float16 scale) leaves {zeros[scaled_label]}"
        + (
            f" (the smallest exact gradient times S is 2^{lifted:.1f}, above 2^-25)"
            if lifted is not None and lifted > -25
            else ""
        ),
        f"{USER} (autocast with the last dense layer in float32) leaves {zeros[USER]}"
        + (" (that layer's matmul backward then runs in float32)" if zeros[USER] == 0 else ""),
    ]
    text += "Remedies: " + "; ".join(remedies) + "."
    return text


def _between(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo} to {hi}"


def _training_text(training: dict[str, Any], steps: int) -> str:
    runs = training["runs"]
    a = runs["autocast"]
    zs = list(a["rounding_zeros"].values())
    fixes = [label for label in runs if label.startswith("autocast+") or label == USER]
    clean = [label for label in fixes if not any(runs[label]["rounding_zeros"].values())]
    text = (
        f"In {steps} Adam steps autocast keeps {_between(zs)} rounding zeros per "
        f"checked step, and {a['frozen']} weights that the exact run moves never move (Adam "
        "divides by sqrt(v) + eps, so even these tiny gradients move a float32 weight; a zero "
        f"does not); it ends {a['distance']:.3g} from the exact weights."
    )
    if clean:
        dist = ", ".join(f"{runs[label]['distance']:.3g}" for label in clean)
        text += f" {', '.join(clean)} have no rounding zeros at any checked step (ending {dist})"
        if all(runs[label]["distance"] < a["distance"] for label in clean):
            worst = max(runs[label]["distance"] for label in clean)
            text += f": all of them at least {a['distance'] / worst:.1f}x nearer the exact weights"
        text += "."
    f16 = next((label for label in runs if label.startswith("float16+master")), None)
    if f16:
        fz = list(runs[f16]["rounding_zeros"].values())
        text += (
            f" {f16} (float16 throughout, float32 master weights) keeps {_between(fz)} "
            f"rounding zeros and ends {runs[f16]['distance']:.3g} away."
        )
    return text


def _figure(
    labels: list[str], summary: dict[str, dict[str, int]], n_nonzero: int, path: Path
) -> None:
    import matplotlib.pyplot as plt

    colors = {
        "ok": "C2",
        "structural_zero": "0.75",
        "rounding_zero": "C3",
        "subnormal": "C1",
        "wrong_sign": "C4",
        "inf/NaN": "k",
    }
    fig, ax = plt.subplots(figsize=(8, 4.4), constrained_layout=True)
    rows = list(range(len(labels)))[::-1]
    left = np.zeros(len(labels))
    for i, v in enumerate(colors):
        counts = np.array([_counts(summary[col])[i] for col in labels], dtype=float)
        if not counts.any():
            continue
        ax.barh(rows, counts, left=left, color=colors[v], label=v, height=0.6)
        for r, x0, n in zip(rows, left, counts, strict=True):
            if n:
                ax.text(x0 + n / 2, r, f"{n:.0f}", ha="center", va="center", fontsize=8)
        left += counts
    ax.set_yticks(rows, labels)
    ax.set_xlim(0, left.max())
    ax.set_xlabel(f"gradient elements ({n_nonzero} with a non-zero exact value)")
    ax.set_title(f"{NAME}: verdicts of every gradient element per column")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(colors))
    save_png(fig, path)
