"""dead_relu_remedies: momentum, weight decay, batch norm, leaky ReLU and He init against dead
ReLU units, side by side in every precision and exactly.

Long module: one gallery scenario: its network, its runs, its computed verdict and its report
text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fpgrad.diagnose.comparison import compare
from fpgrad.model.netfile import parse_network
from fpgrad.model.network import Network
from fpgrad.present.report.plots import save_png
from fpgrad.run.optim import OptimConfig
from fpgrad.run.torch_native import one_torch_thread
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs
from fpgrad.training import TrainResult, train

NAME = "dead_relu_remedies"
CLAIM = (
    "Remedies for dead ReLU units: momentum carries earlier non-zero gradients past a unit's "
    "death, weight decay shrinks a dead unit but does not revive it, and batch norm before "
    "the ReLU, leaky ReLU and He initialisation keep units alive. Which of them revive a dead "
    "unit, in every precision?"
)

HIDDEN = 4
BATCH = 8
LR = 0.1
LR_DYING = 0.5  # large enough to kill the units of a live initialisation within a few steps
WEIGHT_DECAY = 0.1
MOMENTUM = 0.9
SLOPE = 0.01  # torch's default negative slope
RUNS = ("float16", "bfloat16", "float32", "float64")
RUNS_SMALL = ("float16", "bfloat16")  # the test suite's reduced configuration


@dataclass(frozen=True)
class Variant:
    key: str
    title: str
    start: str  # "dead" (bad init), "alive" (killed by a large step), "he"
    act: str = "relu"
    batch_norm: bool = False
    lr: float = LR
    momentum: float = 0.0
    weight_decay: float = 0.0


VARIANTS = (
    Variant("plain", "plain SGD (bad init)", "dead"),
    Variant("weight_decay", f"weight decay {WEIGHT_DECAY} (L2)", "dead", weight_decay=WEIGHT_DECAY),
    Variant("leaky", f"leaky ReLU (slope {SLOPE})", "dead", act="leaky_relu"),
    Variant("batch_norm", "batch norm before the ReLU", "dead", batch_norm=True),
    Variant("he_init", "He init (he_normal, bias 0)", "he"),
    Variant("dying_plain", f"plain SGD, lr {LR_DYING} (live init)", "alive", lr=LR_DYING),
    Variant(
        "dying_momentum",
        f"SGD + momentum {MOMENTUM}, lr {LR_DYING} (live init)",
        "alive",
        lr=LR_DYING,
        momentum=MOMENTUM,
    ),
)


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    x = rng.uniform(0.0, 1.0, size=(BATCH, 2))
    y = (2.0 * np.maximum(x[:, 0] - 0.3, 0.0) + 0.5 * x[:, 1])[:, None]
    bad = -rng.uniform(0.1, 1.0, size=(HIDDEN, 2))  # <= 0 weights on inputs >= 0: dead
    live = rng.uniform(0.1, 1.0, size=(HIDDEN, 2))
    return x, y, bad, live


def network(v: Variant) -> Network:
    """2-HIDDEN-1 network on inputs in [0, 1]^2, targets 2 relu(x0 - 0.3) + 0.5 x1."""
    x, y, bad, live = _data()
    hidden: dict[str, Any] = {"type": "dense", "name": "hidden"}
    if v.start == "dead" and v.batch_norm:
        # no bias before batch norm (it cancels out; its exact gradient is 0, see the report)
        hidden.update(weight=bad.tolist(), bias=False)
    elif v.start == "dead":
        hidden.update(weight=bad.tolist(), bias=[-1.0] * HIDDEN)
    elif v.start == "alive":
        hidden.update(weight=live.tolist(), bias=[0.1] * HIDDEN)
    else:
        hidden.update(out=HIDDEN, init="he_normal")
    layers: list[dict[str, Any]] = [hidden]
    if v.batch_norm:
        layers.append({"type": "batch_norm", "name": "bn"})
    act: dict[str, Any] = {"type": v.act, "name": "act"}
    if v.act == "leaky_relu":
        act["slope"] = SLOPE
    layers.append(act)
    out: dict[str, Any] = {"type": "dense", "name": "out"}
    if v.start == "alive":
        out.update(weight=[[1.0, 0.8, -0.6, 0.5]], bias=[0.0])
    else:
        out.update(out=1, init="xavier_uniform")
    layers.append(out)
    doc = {
        "name": f"{NAME}_{v.key}",
        "seed": 3,
        "layer": layers,
        "loss": {"type": "mse"},
        "data": {"x": x.tolist(), "y": y.tolist()},
    }
    return parse_network(doc, source=NAME)


def unflatten(net: Network, vec: np.ndarray) -> dict[str, np.ndarray]:
    out, i = {}, 0
    for k, v in net.params.items():
        out[k] = np.asarray(vec[i : i + v.size], dtype=np.float64).reshape(v.shape)
        i += v.size
    return out


def preactivations(net: Network, vec: np.ndarray) -> np.ndarray:
    """The activation's input [batch, units] at parameters ``vec``, in float64 (batch norm
    with the batch statistics)."""
    p = unflatten(net, vec)
    z = net.x @ p["hidden.weight"].T + p.get("hidden.bias", 0.0)
    if "bn.weight" in p:
        eps = next(ly.eps for ly in net.layers if ly.kind == "batch_norm")
        z = (z - z.mean(axis=0)) / np.sqrt(z.var(axis=0) + eps) * p["bn.weight"] + p["bn.bias"]
    return z


def _unit_slice(net: Network) -> list[np.ndarray]:
    """Indices of each hidden unit's incoming weights and bias in the flat parameter vector."""
    n_in = net.x.shape[1]
    bias = [HIDDEN * n_in + u for u in range(HIDDEN)] if "hidden.bias" in net.params else []
    return [np.array([*range(u * n_in, (u + 1) * n_in), *bias[u : u + 1]]) for u in range(HIDDEN)]


def run_stats(net: Network, params: list[np.ndarray]) -> dict[str, Any]:
    inactive = [np.all(preactivations(net, p) <= 0, axis=0) for p in params]
    counts = [int(a.sum()) for a in inactive]
    ever = np.any(inactive, axis=0)
    revived = int(np.sum(ever & ~inactive[-1]))
    died = int(np.sum(~inactive[0] & inactive[-1]))
    slices = _unit_slice(net)
    moved_dead = 0  # (unit, step) pairs where an inactive unit's parameters changed
    for t in range(len(params) - 1):
        for u in range(HIDDEN):
            if inactive[t][u] and np.any(params[t + 1][slices[u]] != params[t][slices[u]]):
                moved_dead += 1
    first_dead = [next((t for t, a in enumerate(inactive) if a[u]), None) for u in range(HIDDEN)]
    maxz_end = preactivations(net, params[-1]).max(axis=0)
    maxz_death = [
        float(preactivations(net, params[t]).max(axis=0)[u]) if t is not None else None
        for u, t in enumerate(first_dead)
    ]
    dead_norm = [
        float(np.linalg.norm(params[-1][slices[u]]) / np.linalg.norm(params[0][slices[u]]))
        for u in range(HIDDEN)
        if inactive[0][u]
    ]
    return {
        "inactive": counts,
        "start": counts[0],
        "end": counts[-1],
        "max": max(counts),
        "revived": revived,
        "died": died,
        "moved_while_dead": moved_dead,
        "first_dead_step": first_dead,
        "max_z_at_death": maxz_death,
        "max_z_end": [float(v) for v in maxz_end],
        "dead_norm_ratio": dead_norm,
    }


def outcome(s: dict[str, Any], act: str = "relu") -> str:
    """A run's outcome in words; a leaky unit with z <= 0 is inactive, not dead."""
    dead = "dead" if act == "relu" else "inactive"
    if s["max"] == 0:
        return "active throughout"
    if s["revived"]:
        return f"revived {s['revived']}"
    if s["start"] and s["end"] >= s["start"] and not s["died"]:
        return f"stays {dead} ({s['end']}/{HIDDEN})"
    return f"{s['died']} became {dead}, none revived ({s['end']}/{HIDDEN} {dead})"


def zero_gradient_units(net: Network, vec: np.ndarray, precision: str) -> tuple[int, int]:
    """(units whose incoming weight gradient is entirely zero in ``precision``, in exact
    arithmetic) at parameters ``vec``."""
    c = compare(net.with_params(unflatten(net, vec)), precisions=precision)
    zero_p = zero_e = 0
    for u in range(HIDDEN):
        row = [g for g in c.gradients if g["param"] == "hidden.weight" and g["index"][0] == u]
        zero_p += all(g[precision]["value"] == 0 for g in row)
        zero_e += all(float(g["exact"]) == 0 for g in row)
    return zero_p, zero_e


@records_runs
def run(small: bool = False) -> ScenarioResult:
    with one_torch_thread():
        return _run(small)


def _run(small: bool) -> ScenarioResult:
    steps = 10 if small else 30
    runs = RUNS_SMALL if small else RUNS
    results: dict[str, dict[str, Any]] = {}
    trains: dict[str, TrainResult] = {}
    for v in VARIANTS:
        net = network(v)
        cfg = OptimConfig(lr=v.lr, momentum=v.momentum, weight_decay=v.weight_decay)
        tr = train(
            net,
            steps=steps,
            cfg=cfg,
            runs=",".join(runs),
            perturb=False,
            verdict_every=steps,
            exact_bits=128,
        )
        trains[v.key] = tr
        stats = {"exact": run_stats(net, tr.exact.params)}
        for label in tr.runs:
            stats[label] = run_stats(net, tr.histories[label].params)
        zero = {
            label: zero_gradient_units(net, tr.histories[label].params[-1], label)
            for label in tr.runs
        }
        zero["exact"] = (zero_gradient_units(net, tr.exact.params[-1], "float64")[1],) * 2
        outcomes = {label: outcome(s, v.act) for label, s in stats.items()}
        results[v.key] = {
            "variant": v,
            "net": net,
            "stats": stats,
            "outcomes": outcomes,
            "zero_grad": {k: z[0] for k, z in zero.items()},
            "same_everywhere": len(set(outcomes.values())) == 1,
        }

    labels = ["exact", *runs]
    rows = []
    for v in VARIANTS:
        r = results[v.key]
        row: list[Any] = [v.title]
        for label in labels:
            s = r["stats"][label]
            row.append(
                f"{s['start']} -> {s['end']}"
                + (f" (max {s['max']})" if s["max"] > max(s["start"], s["end"]) else "")
            )
        row.append(
            r["outcomes"]["exact"] + ("" if r["same_everywhere"] else " (differs by precision)")
        )
        row.append(" / ".join(str(r["zero_grad"][label]) for label in labels))
        rows.append(row)

    detail_rows = []
    for v in VARIANTS:
        r = results[v.key]
        for label in labels:
            s = r["stats"][label]
            detail_rows.append(
                [
                    v.title,
                    label,
                    s["revived"],
                    s["died"],
                    s["moved_while_dead"],
                    ", ".join(f"{z:.3g}" for z in s["max_z_end"]),
                    ", ".join(f"{q:.3f}" for q in s["dead_norm_ratio"]) or "-",
                ]
            )

    # the sub-claims, each computed over every run (exact included)
    def every(key: str, pred) -> bool:  # noqa: ANN001 - a predicate on run stats
        return all(pred(s) for s in results[key]["stats"].values())

    decay = (1 - LR * WEIGHT_DECAY) ** steps
    wd_shrinks = every(
        "weight_decay", lambda s: s["dead_norm_ratio"] and max(s["dead_norm_ratio"]) < 1
    )
    wd_no_revive = every("weight_decay", lambda s: s["revived"] == 0 and s["end"] == s["start"])
    plain_dead = every(
        "plain", lambda s: s["end"] == s["start"] == HIDDEN and s["moved_while_dead"] == 0
    )
    bn_alive = every("batch_norm", lambda s: s["max"] == 0)
    leaky_grads = all(z == 0 for z in results["leaky"]["zero_grad"].values())
    leaky_revives = every("leaky", lambda s: s["revived"] > 0)
    he_alive = every("he_init", lambda s: s["max"] == 0)
    mom = results["dying_momentum"]["stats"]
    mom_died = all(s["max"] > 0 for s in mom.values())
    mom_moves = all(s["moved_while_dead"] > 0 for s in mom.values())
    dp = results["dying_plain"]["stats"]
    dp_frozen = all(s["moved_while_dead"] == 0 for s in dp.values())
    he_net = results["he_init"]["net"]
    w_he = he_net.params["hidden.weight"]
    he_nonpos = int(np.sum(np.all(w_he <= 0, axis=1)))  # with bias 0 and inputs >= 0: dead

    claims = {
        "momentum_moves_dead_units": mom_died and mom_moves,
        "weight_decay_shrinks_without_reviving": wd_shrinks and wd_no_revive,
        "batch_norm_keeps_units_alive": bn_alive,
        "leaky_relu_keeps_gradients": leaky_grads,
        "he_init_keeps_units_alive": he_alive,
    }
    revivers = [
        VARIANTS_BY_KEY[k].title
        for k in ("weight_decay", "leaky", "dying_momentum")
        if every(k, lambda s: s["revived"] > 0)
    ]
    n_true = sum(claims.values())
    holds = True if n_true == len(claims) else (False if n_true == 0 else None)

    ex = {k: results[k]["stats"]["exact"] for k in results}
    parts = [
        (
            "None of the remedies revives a unit that is already dead"
            if not revivers
            else f"Revived a dead unit: {', '.join(revivers)}"
        )
        + f" (over {steps} steps, in every precision and exactly)."
    ]
    parts.append(
        f"Plain SGD: {outcome(ex['plain'])}, its parameters frozen in every run."
        if plain_dead
        else f"Plain SGD: {outcome(ex['plain'])}."
    )
    wd_ratios = [max(s["dead_norm_ratio"]) for s in results["weight_decay"]["stats"].values()]
    parts.append(
        f"Weight decay shrinks the dead units' parameters to {min(wd_ratios):.3f} .. "
        f"{max(wd_ratios):.3f} of their size ((1 - lr wd)^{steps} = {decay:.3f}) and "
        + ("revives none, as claimed." if wd_no_revive else "revives some, against the claim.")
    )
    parts.append(
        "Batch norm before the ReLU: the same dead weights give "
        + (
            "units alive on part of every batch throughout."
            if bn_alive
            else f"{outcome(ex['batch_norm'])}."
        )
    )
    lk = ex["leaky"]
    if leaky_revives:
        leaky_end = "they revive"
    else:
        zs, z0 = lk["max_z_end"], lk["max_z_at_death"]
        leaky_end = (
            f"none becomes active ({lk['end']}/{HIDDEN} inactive at the end; the units' largest "
            f"pre-activations moved from {min(z0):.4g} .. {max(z0):.4g} to "
            f"{min(zs):.4g} .. {max(zs):.4g})"
        )
    grads_text = (
        "every unit keeps a non-zero gradient" if leaky_grads else "some units have zero gradients"
    )
    lk_runs = results["leaky"]["stats"]
    possible = steps * HIDDEN
    partial = {
        k: s["moved_while_dead"] for k, s in lk_runs.items() if s["moved_while_dead"] < possible
    }
    swamp_text = ""
    if leaky_grads and partial:
        swamp_text = (
            "; of the inactive units' non-zero updates, only "
            + ", ".join(f"{n}/{possible} in {k}" for k, n in partial.items())
            + " changed the weights (the others were swamped: w + update == w)"
        )
    parts.append(f"Leaky ReLU: {grads_text} but {leaky_end}{swamp_text}.")
    he = ex["he_init"]
    parts.append(
        "He init: "
        + (
            "every unit alive throughout."
            if he_alive
            else f"{he['start']} of {HIDDEN} units dead from step 0 ({he_nonpos} have only "
            f"non-positive weights, and with bias 0 on inputs >= 0 they never fire), "
            f"{he['end']} at the end."
        )
    )
    md = ex["dying_momentum"]
    dpe = ex["dying_plain"]
    deeper = [
        (a, b) for a, b in zip(md["max_z_at_death"], md["max_z_end"], strict=True) if a is not None
    ]
    parts.append(
        f"Dying units (live init, lr {LR_DYING}): plain SGD kills {dpe['died']} of {HIDDEN} and "
        f"{'freezes them' if dp_frozen else 'moves them'}; with momentum {MOMENTUM} "
        f"{md['died']} die, "
        + (
            f"keep moving after death ({md['moved_while_dead']} unit-steps in exact arithmetic)"
            + (
                " in the direction that killed them"
                if all(b < a for a, b in deeper)
                else ", not all of them further down"
            )
            + ": their largest pre-activation goes from "
            + ", ".join(f"{a:.3g}" for a, _ in deeper)
            + " at death to "
            + ", ".join(f"{b:.3g}" for _, b in deeper)
            + f" at the end, and {md['revived']} revive."
            if mom_moves
            else "and they do not move after death."
        )
    )
    verdict = " ".join(parts)

    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=(
            f"2-{HIDDEN}-1 network, MSE, batch {BATCH} with inputs in [0, 1]^2 and targets "
            "2 relu(x0 - 0.3) + 0.5 x1. Bad init: hidden weights in [-1, -0.1], biases -1 "
            "(every pre-activation < 0: all units dead). Variants on the bad init, plain SGD lr "
            f"{LR}: weight decay {WEIGHT_DECAY}; leaky ReLU slope {SLOPE}; batch norm (batch "
            "statistics, gamma 1, beta 0) between the dense layer (bad weights, no bias: "
            "batch norm cancels it) and the ReLU; He init "
            "(he_normal, bias 0) instead of the bad init. Dying units: a live init (weights in "
            f"[0.1, 1], biases 0.1) trained at lr {LR_DYING}, plain and with momentum "
            f"{MOMENTUM}. {steps} full-batch steps in {', '.join(runs)} and exactly (128 bits). "
            "A unit is inactive when its ReLU input is <= 0 on every sample (evaluated in "
            "float64 at the run's parameters); zero-gradient units are counted by comparing "
            "at each run's final parameters (in its precision; exact for the exact run)."
        ),
        verdict=verdict,
        holds=holds,
        sections=[
            Section(
                "Inactive units, start -> end, per run",
                "Outcome of the exact run (and whether every precision agrees); last column: "
                "units whose incoming weight gradient is entirely zero at the end "
                f"({' / '.join(labels)}).",
                ["variant", *labels, "outcome", "zero-gradient units"],
                rows,
                figure=f"{NAME}_preactivations.png",
            ),
            Section(
                "Details",
                "Revived: units inactive at some step and active at the end; died: active at "
                "the start and inactive at the end; moved while dead: unit-steps where an "
                "inactive unit's parameters changed; max z at the end per unit; dead units' "
                "parameter norm, end / start.",
                [
                    "variant",
                    "run",
                    "revived",
                    "died",
                    "moved while dead",
                    "max z per unit (end)",
                    "dead norm ratio",
                ],
                detail_rows,
            ),
        ],
        data={
            "steps": steps,
            "claims": claims,
            "revivers": revivers,
            "outcomes": {k: results[k]["outcomes"] for k in results},
            "stats": {k: results[k]["stats"] for k in results},
            "zero_gradient_units": {k: results[k]["zero_grad"] for k in results},
            "weight_decay_factor": decay,
            "he_nonpositive_units": he_nonpos,
        },
        figures={f"{NAME}_preactivations.png": lambda path: _figure(results, trains, path)},
    )


VARIANTS_BY_KEY = {v.key: v for v in VARIANTS}


def _figure(results: dict[str, dict[str, Any]], trains: dict[str, TrainResult], path: Path) -> None:
    import matplotlib.pyplot as plt

    n = len(VARIANTS)
    cols = 4
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.2 * rows), squeeze=False)
    for ax, v in zip(axes.ravel(), VARIANTS, strict=False):
        net = results[v.key]["net"]
        tr = trains[v.key]
        for label, style, lw in (
            ("exact", "-", 2.0),
            ("float16", "--", 1.2),
            ("bfloat16", ":", 1.2),
        ):
            h = tr.exact if label == "exact" else tr.histories[label]
            maxz = np.array([preactivations(net, p).max(axis=0) for p in h.params])
            for u in range(HIDDEN):
                ax.plot(
                    maxz[:, u],
                    style,
                    color=f"C{u}",
                    lw=lw,
                    label=f"unit {u}" if label == "exact" else None,
                )
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(v.title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axes[0, 0].set_ylabel("max over samples of z (ReLU input)", fontsize=8)
    axes[1, 0].set_ylabel("max over samples of z (ReLU input)", fontsize=8)
    handles, labs = axes[0, 0].get_legend_handles_labels()
    spare = axes.ravel()[n] if n < rows * cols else axes[0, 0]
    spare.legend(
        handles,
        labs,
        loc="center",
        fontsize=9,
        title="exact solid, float16 dashed,\nbfloat16 dotted; dead below 0",
    )
    fig.suptitle(f"{NAME}: each unit's largest pre-activation over training")
    fig.tight_layout()
    save_png(fig, path)
