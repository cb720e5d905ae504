"""dead_relu: a hidden layer with X W + B < 0 for every input learns nothing under plain SGD."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fpgrad.diagnose.comparison import compare
from fpgrad.model.netfile import parse_network
from fpgrad.model.network import Network
from fpgrad.present.report.plots import training_plots
from fpgrad.run.optim import OptimConfig
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs
from fpgrad.training import train

NAME = "dead_relu"
CLAIM = (
    "A network whose ReLU layer is dead (X W + B < 0 for every input) has zero gradients there "
    "and learns nothing with plain SGD, in every precision."
)


def network(batch: int = 16, width: int = 4) -> Network:
    """Inputs in [0, 1]^3, hidden weights <= 0 and biases -1: every pre-activation is < 0."""
    rng = np.random.default_rng(7)
    x = rng.uniform(0.0, 1.0, size=(batch, 3))
    y = rng.uniform(-1.0, 1.0, size=(batch, 1))
    w = -rng.uniform(0.1, 1.0, size=(width, 3))
    doc = {
        "name": NAME,
        "layer": [
            {"type": "dense", "name": "hidden", "weight": w.tolist(), "bias": [-1.0] * width},
            {"type": "relu", "name": "act"},
            {"type": "dense", "name": "out", "out": 1, "init": "xavier_uniform"},
        ],
        "loss": {"type": "mse"},
        "data": {"x": x.tolist(), "y": y.tolist()},
    }
    return parse_network(doc, source=NAME)


@records_runs
def run(small: bool = False) -> ScenarioResult:
    net = network(batch=4 if small else 16)
    steps = 10 if small else 100
    cmp = compare(net)
    tr = train(net, steps=steps, cfg=OptimConfig(lr=0.1), verdict_every=steps, perturb=False)
    sizes = {k: v.size for k, v in net.params.items()}
    n_hidden = sizes["hidden.weight"] + sizes["hidden.bias"]

    grad_rows, all_structural = [], True
    for p in cmp.precisions:
        v = cmp.verdicts("hidden.weight", p) + cmp.verdicts("hidden.bias", p)
        structural = sum(x == "structural_zero" for x in v)
        all_structural &= structural == len(v)
        grad_rows.append([p, structural, len(v), cmp.summary[p]["rounding_zero"]])

    move_rows, hidden_frozen, others_moved = [], True, True
    for label in ["exact", *tr.runs]:
        h = tr.exact if label == "exact" else tr.histories[label]
        p0 = h.params[0]
        changed = [int(np.sum(p[:n_hidden] != p0[:n_hidden])) for p in h.params]
        moved_rest = bool(np.any(h.params[-1][n_hidden:] != p0[n_hidden:]))
        hidden_frozen &= max(changed) == 0
        others_moved &= moved_rest
        move_rows.append(
            [
                label,
                max(changed),
                n_hidden,
                "yes" if moved_rest else "no",
                f"{h.loss[0]:.6g}",
                f"{h.loss[-1]:.6g}",
            ]
        )

    holds = all_structural and hidden_frozen
    verdict = (
        f"In all {len(cmp.precisions)} precisions every gradient of the dead layer is a structural "
        f"zero (exactly zero in exact arithmetic too), and over {steps} SGD steps none of its "
        f"{n_hidden} parameters changed in any run, exact included"
        if holds
        else "Some dead-layer parameter received a non-zero gradient or moved: see the tables"
    )
    verdict += (
        "; the output layer's bias still learns, so the loss moves while the dead layer stays dead."
        if others_moved
        else "."
    )
    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=(
            f"3-{sizes['hidden.bias']}-1 ReLU network, MSE, batch {net.x.shape[0]} with inputs in "
            "[0, 1]; hidden weights in [-1, -0.1] and biases -1, so X W + B < 0 for every input. "
            f"Plain SGD (lr 0.1, no momentum, no weight decay), {steps} full-batch steps from one "
            "initialisation in float16, bfloat16, float32, float64 and exactly (certified)."
        ),
        verdict=verdict,
        holds=holds,
        sections=[
            Section(
                "Gradients of the dead layer",
                "Verdicts per precision against the exact gradients.",
                [
                    "precision",
                    "structural zeros",
                    "dead-layer elements",
                    "rounding zeros (whole net)",
                ],
                grad_rows,
            ),
            Section(
                "Training",
                "Largest number of dead-layer parameters that ever differed from "
                "their initial value; whether any other parameter moved.",
                ["run", "dead-layer params changed", "of", "others moved", "loss[0]", "loss[end]"],
                move_rows,
                figure=f"{NAME}_loss.png",
            ),
        ],
        data={
            "all_structural": all_structural,
            "hidden_frozen": hidden_frozen,
            "others_moved": others_moved,
            "steps": steps,
        },
        figures={f"{NAME}_loss.png": lambda path: _loss_figure(tr, path)},
    )


def _loss_figure(tr, path: Path) -> None:  # noqa: ANN001 - a TrainResult
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        training_plots(tr, tmp)
        shutil.copyfile(Path(tmp) / "loss.png", path)
