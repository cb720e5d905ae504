"""cnn_digits_loss_scaling: a small CNN (Conv2d, SiLU, AvgPool2d, Flatten, Linear) captured from
torch and trained in float16 on scikit-learn's 8x8 digits, with and without loss scaling, beside
the certified exact trajectory through the captured graph (:mod:`fpgrad.graph.train`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fpgrad.errors import InputError
from fpgrad.run.torch_native import one_torch_thread
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs

NAME = "cnn_digits_loss_scaling"
CLAIM = (
    "Training a small CNN in float16 loses gradient bits to underflow (exact gradients below "
    "float16's smallest normal number come out as subnormals or zeros), and loss scaling "
    "recovers them."
)
SCALE = 1024.0
RUNS = ("float16", f"float16+scale={SCALE:g}", f"float16+master+scale={SCALE:g}")
GOOD_BITS = 8  #: a gradient element with fewer correct bits than this has lost bits
PRETRAIN = 200  #: float32 Adam steps before the comparison (a model that already fits)
TRAIN_ROWS, BATCH = 256, 64
LR, MOMENTUM = 0.05, 0.9


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1797 images of 8x8 pixels 0..16, classes 0..9), read from
    its CSV file without importing scikit-learn (as ``load_digits`` reads it)."""
    spec = importlib.util.find_spec("sklearn")
    path = (
        Path(spec.origin).parent / "datasets/data/digits.csv.gz" if spec and spec.origin else None
    )
    if path is None or not path.is_file():
        raise InputError(
            f"scenario {NAME} needs scikit-learn's bundled digits data; install scikit-learn "
            "(pip install 'fpgrad[example]')"
        )
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1], data[:, -1].astype(np.int64)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.SiLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )


PRETRAINING = "float32 pretraining (torch.optim.Adam, weights shipped)"
WEIGHTS = Path(__file__).with_name("cnn_digits_pretrained.npz")  #: pretrain()'s result, shipped


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """TRAIN_ROWS samples of the digits (pixels / 16, exact in float32) in a seeded order."""
    x_all, y_all = digits()
    order = np.random.default_rng(0).permutation(len(x_all))[:TRAIN_ROWS]
    x = torch.tensor(x_all[order] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x, torch.from_numpy(y_all[order])


def pretrain() -> nn.Module:
    """The CNN after PRETRAIN float32 Adam steps on :func:`batch`. Its bits depend on the CPU's
    torch kernels (AVX2 and AVX-512 sum in different orders), so the scenario reads the result
    shipped in :data:`WEIGHTS` (``python scripts/pretrain_cnn_digits.py`` writes it again)."""
    x, y = batch()
    model = cnn()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    with one_torch_thread():
        for _ in range(PRETRAIN):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def pretrained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The pretrained CNN (:func:`pretrain`'s float32 weights as shipped in :data:`WEIGHTS`,
    the same on every machine) and the first BATCH samples: the batch every run trains on."""
    from fpgrad.run.runlog import record

    record(PRETRAINING, "native")
    model = cnn()
    with np.load(WEIGHTS, allow_pickle=False) as data:
        state = {k: torch.from_numpy(data[k].copy()) for k in data.files}
    model.load_state_dict(state, strict=True)
    x, y = batch()
    return model, x[:BATCH], y[:BATCH]


def _bits(net: Any, runs: dict[str, Any]) -> dict[str, Any]:
    """Correct bits of each run's first gradient (all runs start from the same float16
    parameters) against the certified exact gradient there, per element."""
    import dataclasses

    from fpgrad.graph.exact import exact_graph

    first = next(iter(runs.values()))
    at = dataclasses.replace(net.graph, params=first.current_params())
    exact = exact_graph(at)
    e = np.concatenate([exact.result.exact_array(f"grads/{k}").hi.ravel() for k in first.names])
    keep = e != 0
    out: dict[str, Any] = {"exact": e[keep], "certified_digits": exact.certified_digits}
    for label, run in runs.items():
        g = run.step()
        flat = np.concatenate([g[k].ravel() for k in run.names])[keep]
        rel = np.abs(flat - e[keep]) / np.abs(e[keep])
        out[label] = np.minimum(-np.log2(np.maximum(rel, 2.0**-60)), 60.0)
    return out


@records_runs
def run(small: bool = False) -> ScenarioResult:
    from fpgrad.graph import from_module
    from fpgrad.graph.train import parse_graph_runs
    from fpgrad.graph.train_runs import GraphTorchRun, Trainee
    from fpgrad.numbers.formats import get_format
    from fpgrad.run.optim import OptimConfig
    from fpgrad.training import train

    steps = 4 if small else 10
    model, x, y = pretrained()
    net = from_module(model, x, y, nn.CrossEntropyLoss(), name="digits_cnn")
    cfg = OptimConfig(lr=LR, momentum=MOMENTUM)
    result = train(net, steps, cfg, runs=list(RUNS), verdict_every=steps)
    with one_torch_thread():
        fresh = {
            s.label: GraphTorchRun(Trainee(net.graph, net.name), s, cfg, 0)
            for s in parse_graph_runs(list(RUNS))
        }
        bits = _bits(net, fresh)
    f16 = get_format("float16")
    e = np.abs(bits["exact"])
    below = e < f16.smallest_normal
    lost = {r: int(np.sum(bits[r] < GOOD_BITS)) for r in RUNS}
    lost_below = {r: int(np.sum((bits[r] < GOOD_BITS) & below)) for r in RUNS}
    zeros = {r: int(np.sum(bits[r] <= 0)) for r in RUNS}
    underflowing = int(below.sum())
    plain, scaled, master = RUNS

    def recovers(r: str) -> bool:
        return lost_below[r] <= lost_below[plain] // 10

    swamp = {r: 100 * result.detectors[r]["swamped_fraction"]["total"] for r in RUNS}
    head = (
        f"{underflowing} of {e.size} exact gradient elements lie below float16's smallest normal "
        f"(2^-14); float16 computes {lost_below[plain]} of them with fewer than {GOOD_BITS} "
        f"correct bits"
    )
    if underflowing == 0 or lost_below[plain] == 0:
        holds: bool | None = False
        verdict = f"{head}: no gradient bits were lost to underflow."
    elif recovers(scaled):
        holds = True
        verdict = f"{head}; loss scaling by {SCALE:g} leaves {lost_below[scaled]}."
    elif recovers(master):
        holds = None
        verdict = (
            f"{head}; loss scaling by {SCALE:g} alone leaves {lost_below[scaled]} (unscaling the "
            "gradients in float16, the parameters' dtype, underflows them again), with float32 "
            f"master weights (gradients unscaled in float32) {lost_below[master]} remain: "
            "loss scaling recovers them only together with float32 gradients."
        )
    else:
        holds = False
        verdict = (
            f"{head}; loss scaling by {SCALE:g} leaves {lost_below[scaled]}, and with float32 "
            f"master weights (gradients unscaled in float32) {lost_below[master]} remain. "
            f"Scaling by {SCALE:g} lifts every backward value {int(np.log2(SCALE))} binades "
            "further from float16's underflow threshold and these elements still lose their bits: "
            "here they are lost to rounding (float16's 11-bit significand), not to underflow. "
            "What float32 master weights change is the update: "
            f"float16 leaves {swamp[plain]:.0f}% of requested updates swamped ({swamp[scaled]:.0f}% "
            f"with loss scaling), master weights {swamp[master]:.1f}%."
        )
    runs_table = []
    for r in RUNS:
        h = result.histories[r]
        runs_table.append(
            [
                r,
                f"{h.loss[0]:.6g}",
                f"{h.loss[-1]:.6g}",
                f"{h.exact_loss_at_params[steps]:.6g}",
                f"{result.distance[r][-1]:.3g}",
                f"{swamp[r]:.1f}%",
                sum(h.skipped),
            ]
        )
    runs_table.append(
        ["exact", f"{result.exact.loss[0]:.6g}", f"{result.exact.loss[-1]:.6g}", "", "0", "", ""]
    )
    verdict_rows = [
        [
            r,
            t,
            *(
                c.get(v, 0)
                for v in (
                    "ok",
                    "rounding_zero",
                    "subnormal",
                    "wrong_sign",
                    "inaccurate",
                    "overflow",
                )
            ),
        ]  # fmt: skip
        for r in RUNS
        for t, c in sorted(result.histories[r].verdicts.items())
    ]
    data = {
        "steps": steps,
        "elements": int(e.size),
        "below_float16_normal": underflowing,
        "lost_bits": lost,
        "lost_bits_below_normal": lost_below,
        "computed_zero": zeros,
        "certified_digits": {
            "trajectory": result.exact_certified_digits,
            "first_gradient": bits["certified_digits"],
        },  # fmt: skip
        "exact_method": result.config["exact_method"],
        "loss_end": {r: result.histories[r].loss[-1] for r in RUNS},
        "exact_loss_end": result.exact.loss[-1],
        "distance": {r: result.distance[r][-1] for r in RUNS},
        "swamped_percent": swamp,
    }
    setup = (
        "`Conv2d(1, 4, 3, padding=1) -> SiLU -> AvgPool2d(2) -> Flatten -> Linear(64, 10)`, "
        f"cross-entropy, pretrained in float32 ({PRETRAIN} torch.optim.Adam steps, lr 0.02, on "
        f"{TRAIN_ROWS} digits, pixels / 16) so the loss is small, then captured with "
        f"`fpgrad.from_module` on a batch of {BATCH} and trained {steps} full-batch SGD steps "
        f"(lr {LR}, momentum {MOMENTUM}) by `fpgrad.train`: the runs {', '.join(RUNS)} are eager "
        "torch training of the module on this CPU (parameters rounded into float16; +master keeps "
        "float32 master weights and unscales the gradients in float32); the exact run interprets "
        "the captured graph in certified balls each step "
        f"({result.config['exact_method']}, trajectory certified to "
        f"{result.exact_certified_digits:.1f} digits). Correct bits: -log2 of each element's "
        "relative error at the first step (all runs start from the same float16 parameters) "
        "against the certified exact gradient there."
    )
    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=setup,
        verdict=verdict,
        holds=holds,
        sections=[
            Section(
                "Gradient bits at the first step",
                text=f"Elements with fewer than {GOOD_BITS} correct bits, all and among the "
                f"{underflowing} whose exact value lies below float16's smallest normal "
                f"(2^-14); computed zero: no correct bit.",
                headers=[
                    "run",
                    f"< {GOOD_BITS} bits",
                    "of them below 2^-14",
                    "computed 0",
                    "median bits",
                    "median bits below 2^-14",
                ],  # fmt: skip
                rows=[
                    [
                        r,
                        lost[r],
                        lost_below[r],
                        zeros[r],
                        f"{np.median(bits[r]):.1f}",
                        f"{np.median(bits[r][below]):.1f}" if underflowing else "-",
                    ]  # fmt: skip
                    for r in RUNS
                ],
                figure=f"{NAME}_bits.png",
            ),
            Section(
                "Training",
                text="Loss at the start and at the final parameters; the certified exact loss at "
                "each run's final parameters; relative distance of its parameters from the exact "
                "trajectory; share of requested updates that left the weight unchanged.",
                headers=[
                    "run",
                    "loss[0]",
                    "loss[end]",
                    "exact loss at its params",
                    "distance",
                    "swamped",
                    "skipped",
                ],  # fmt: skip
                rows=runs_table,
                figure=f"{NAME}_loss.png",
            ),
            Section(
                "Gradient verdicts (fpgrad train)",
                text="Against the certified exact gradients at each run's own parameters, in the "
                "run's gradient format (float32 for +master).",
                headers=[
                    "run",
                    "step",
                    "ok",
                    "rounding_zero",
                    "subnormal",
                    "wrong_sign",
                    "inaccurate",
                    "overflow",
                ],  # fmt: skip
                rows=verdict_rows,
            ),
        ],
        data=data,
        figures={
            f"{NAME}_bits.png": lambda path: _bits_figure(bits, path),
            f"{NAME}_loss.png": lambda path: _loss_figure(result, path),
        },
        cpu_dependent="every run is torch's float16 CPU kernels; another CPU may round the "
        "convolution differently and move the counts.",
    )


def _bits_figure(bits: dict[str, Any], path: Path) -> None:
    from fpgrad.present.report.plots import plt, save_png

    e = np.log2(np.abs(bits["exact"]))
    fig, ax = plt.subplots(figsize=(8, 4))
    for r, marker in zip(RUNS, ("o", "x", "+"), strict=True):
        ax.scatter(e, bits[r], s=10, marker=marker, label=r, alpha=0.6)
    ax.axvline(-14, color="k", lw=0.8, ls="--", label="float16 smallest normal")
    ax.axvline(-24, color="k", lw=0.8, ls=":", label="float16 smallest subnormal")
    ax.set_xlabel("log2 |exact gradient|")
    ax.set_ylabel("correct bits")
    ax.legend(fontsize=8)
    save_png(fig, path)


def _loss_figure(result: Any, path: Path) -> None:
    from fpgrad.present.report.plots import plt, save_png

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(result.exact.loss, "k-", lw=2, label="exact")
    for r in RUNS:
        ax.plot(result.histories[r].loss, "-o", ms=3, label=r)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    save_png(fig, path)
