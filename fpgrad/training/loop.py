"""The training of a network in every run and exactly, from one initialisation, and its detectors."""

from __future__ import annotations

from typing import Any

from fpgrad.errors import InputError
from fpgrad.model.network import Network
from fpgrad.run.optim import OptimConfig
from fpgrad.run.torch_native import one_torch_thread
from fpgrad.training.detectors import run_detectors
from fpgrad.training.emulated_run import EmulatedRun
from fpgrad.training.exact_run import (
    _few_digits_note,
    exact_check,
    exact_loss_at,
    exact_trajectory,
)
from fpgrad.training.result import TrainResult
from fpgrad.training.runs import RunSpec, batch_schedule, parse_runs
from fpgrad.training.torch_run import TorchRun


def train(
    net: Network | Any,
    steps: int,
    cfg: OptimConfig | None = None,
    runs: str | list[str] | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    exact_bits: int = 128,
    verdict_every: int | None = None,
    stall_k: int = 5,
    perturb: bool = True,
    progress: bool = False,
    exact_method: str = "auto",
    exact_max_bits: int | None = None,
) -> TrainResult:
    """Train ``net`` for ``steps`` steps in every run and exactly, from one initialisation.

    ``exact_method``: how the exact run is computed and certified (:func:`exact_trajectory`);
    ``exact_max_bits``: the cap of its precision escalation (default 8192). A captured model
    (:func:`fpgrad.from_module`) trains by :func:`fpgrad.graph.train.train_graph`.
    """
    from fpgrad.diagnose import api_args
    from fpgrad.graph.network import GraphNetwork
    from fpgrad.model.validate import MAX_OPTION_COUNT, MAX_STEPS

    api_args.check_network(net, "train")
    api_args.check_int(steps, "steps", "train", high=MAX_STEPS)
    if cfg is not None and not isinstance(cfg, OptimConfig):
        raise InputError(f"train: cfg must be an fpgrad.run.optim.OptimConfig or None (got "
                         f"{type(cfg).__name__})")  # fmt: skip
    api_args.check_names(runs, "runs", "train")
    api_args.check_int(batch_size, "batch_size", "train", high=MAX_OPTION_COUNT, none=True)
    api_args.check_int(seed, "seed", "train", low=0)
    api_args.check_int(exact_bits, "exact_bits", "train")
    api_args.check_int(verdict_every, "verdict_every", "train", 1, MAX_STEPS, none=True)
    api_args.check_int(exact_max_bits, "exact_max_bits", "train", none=True)
    if isinstance(net, GraphNetwork):
        from fpgrad.graph.train import train_graph

        return train_graph(
            net, steps, cfg, runs, batch_size, seed, exact_bits, verdict_every, stall_k,
            progress, exact_method, exact_max_bits,
        )  # fmt: skip
    with one_torch_thread():
        return _train(
            net,
            steps,
            cfg,
            runs,
            batch_size,
            seed,
            exact_bits,
            verdict_every,
            stall_k,
            perturb,
            progress,
            exact_method,
            exact_max_bits,
        )


def _train(
    net: Network,
    steps: int,
    cfg: OptimConfig | None,
    runs: str | list[str] | None,
    batch_size: int | None,
    seed: int,
    exact_bits: int,
    verdict_every: int | None,
    stall_k: int,
    perturb: bool,
    progress: bool,
    exact_method: str,
    exact_max_bits: int | None,
) -> TrainResult:
    from fpgrad.reference.exact import MIN_BITS

    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer (got {steps})")
    if exact_bits < MIN_BITS:
        raise InputError(f"--exact-bits {exact_bits} is too low: use at least {MIN_BITS}")
    cfg = cfg or OptimConfig()
    specs = parse_runs(runs, net.policies)
    schedule = batch_schedule(net.x.shape[0], steps, batch_size, seed)
    every = verdict_every or max(1, steps // 10)

    def make(s: RunSpec, twin: bool = False) -> TorchRun | EmulatedRun:
        return (EmulatedRun if s.emulated else TorchRun)(net, s, cfg, seed, perturb=twin)

    torch_runs = {s.label: make(s) for s in specs}
    spec_of = {s.label: s for s in specs}
    twins = {s.label: make(s, twin=True) for s in specs} if perturb else {}
    exact, digits, exact_method = exact_trajectory(
        net, cfg, schedule, exact_bits, exact_method, progress, exact_max_bits
    )
    for r in (*torch_runs.values(), *twins.values()):
        r.record_initial()
    iterator = range(steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="fpgrad train", unit="step", leave=False)
    for t in iterator:
        rows = schedule[t]
        for label, run in torch_runs.items():
            before = run.current_params()
            grads = run.step(rows)
            if t % every == 0 or t == steps - 1:
                counts, loss = exact_check(
                    net, before, grads, run.grad_format, rows, exact_bits, exact_max_bits
                )
                run.history.verdicts[t] = counts
                if loss is not None:
                    run.history.exact_loss_at_params[t] = loss
            if label in twins:
                twins[label].step(rows)
    for run in torch_runs.values():  # the loss at the final parameters, run's own and exact
        run.record_final(schedule[-1])
        loss = exact_loss_at(net, run.current_params(), schedule[-1], exact_bits, exact_max_bits)
        if loss is not None:
            run.history.exact_loss_at_params[steps] = loss
    notes = [exact.fallback] if exact.fallback else []
    if digits < 17:
        notes.append(_few_digits_note(exact, digits, exact_method, exact_max_bits))
    distance: dict[str, list[float]] = {}
    detectors: dict[str, dict[str, Any]] = {}
    for label, run in torch_runs.items():
        twin = twins[label].history if label in twins else None
        distance[label], detectors[label] = run_detectors(
            run.history, exact.history, twin, cfg, spec_of[label], stall_k
        )
    config = {
        "steps": steps,
        "optimizer": cfg.__dict__,
        "batch_size": batch_size,
        "seed": seed,
        "exact_bits": exact_bits,
        "exact_method": exact_method,
        "exact_working_bits": exact.bits,
        "verdict_every": every,
    }
    return TrainResult(
        net.name,
        config,
        [s.label for s in specs],
        {k: r.history for k, r in torch_runs.items()},
        exact.history,
        digits,
        detectors,
        distance,
        notes,
        {s.label: _plan_dict(net, s) for s in specs},
    )


def _plan_dict(net: Network, spec: RunSpec) -> dict[str, Any]:
    """The run's plan, with fp32 master weights named when +master keeps them."""
    d = spec.plan(net).to_dict()
    if spec.master:
        d["summary"] += "; float32 master weights"
        d["master"] = "float32"
        d["uniform"] = False
    return d
