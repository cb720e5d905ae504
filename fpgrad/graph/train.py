"""Training a captured model side by side in torch dtypes and exactly.

Runs take the grammar of :func:`fpgrad.training.parse_run`: ``float16``, ``bfloat16``, ``float32``,
``float64`` with ``+master``, ``+scale=S``, ``+dynamic``, ``+sr``, ``+kahan``. Each is eager torch
training of the user's module (a copy, parameters and floating buffers correctly rounded into
the dtype) on one thread: forward, ``backward()`` of the loss times the scale, the gradients
unscaled, the update of :class:`fpgrad.run.optim.TorchOptimizer` (torch.optim's SGD and Adam, bit
for bit). The exact run interprets the captured graph in certified balls at every step and
applies the same optimizer formulas in the balls (:func:`fpgrad.training.exact_trajectory` with
:class:`fpgrad.graph.train_exact.GraphExactRun`), so the radii bound the exact trajectory.

An emulated format (``fp8_e4m3``, ``bfloat16:emulated``, with ``+master`` or ``+sr``) interprets
the graph on the strict machine and updates as :class:`fpgrad.training.EmulatedRun`. Full batch,
or mini-batches (``--batch-size``: every input and the targets cut along their first dimension;
the model captured once more at that batch size, its data replaced per batch). Precision policies
(``autocast_cpu``, ``autocast``, the model's own) run natively as in ``compare``: under the real
``torch.autocast("cpu")`` around the forward and the loss, or each op cast to its precision.
Refused: policies naming an emulated format, loss scaling of emulated runs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fpgrad.errors import InputError
from fpgrad.graph.native import kernels_of
from fpgrad.graph.train_exact import exact_check, exact_run
from fpgrad.graph.train_runs import GraphEmulatedRun, GraphTorchRun, Trainee
from fpgrad.numbers.formats import get_format
from fpgrad.run.optim import OptimConfig
from fpgrad.run.torch_native import one_torch_thread
from fpgrad.training.detectors import run_detectors
from fpgrad.training.history import History
from fpgrad.training.result import TrainResult
from fpgrad.training.runs import RunSpec, batch_schedule, parse_runs

if TYPE_CHECKING:
    from fpgrad.graph.network import GraphNetwork


def parse_graph_runs(runs: str | list[str] | None, policies: Any = None) -> list[RunSpec]:
    """The runs of :func:`fpgrad.training.parse_runs` a captured model can train (``policies``:
    the model's own, by name, so that naming one is refused as a policy)."""
    specs = parse_runs(runs, policies or None)
    for s in specs:
        if s.policy is not None and s.emulated:
            raise InputError(
                f"run {s.label!r}: policy {s.policy.name!r} names an emulated format; on "
                "captured models policies run natively only (train the format as a plain run)"
            )
        if s.emulated and (s.loss_scale is not None or s.dynamic):
            raise InputError(
                f"run {s.label!r}: loss scaling of an emulated run of a captured model is not "
                "implemented; scale natively (float16+scale=S) or drop the scale"
            )
    return specs


def _scaled_cause(
    place: dict[str, Any] | None, h: History, fmt: str, seed: str | None = None
) -> None:
    """A backward pass that overflowed under a loss scale gets that as its cause (``fmt``: the
    narrowest format the run computes in; ``seed``: the loss's, where the backward starts;
    default ``fmt``)."""
    if place is None or place["direction"] != "backward" or place["step"] >= len(h.scale):
        return
    scale = h.scale[place["step"]]
    seed = seed or fmt
    largest = get_format(seed.split(":")[0]).max
    if scale > largest:
        place["cause"] = (
            f"the loss scale {scale:g} is above {seed}'s largest value ({largest:g}): the backward "
            f"pass starts at inf; use a scale of at most {2.0 ** math.floor(math.log2(largest)):g}"
        )
    elif scale != 1.0:
        place["cause"] = (
            f"with the loss scale {scale:g} the backward pass produced inf/NaN in {fmt} first at "
            f"{place['op']}; a smaller loss scale leaves headroom (+dynamic halves it and skips "
            "the step)"
        )


def _narrowest(run: Any) -> str:
    """The narrowest format a run computes in: a policy's narrowest op precision."""
    plans = getattr(run, "plans", {})
    names = {d for plan in plans.values() for d in plan.dtypes.values()} or {run.spec.precision}
    return min(names, key=lambda n: (get_format(n.split(":")[0]).bits, n))


def _plan(spec: RunSpec, run: Any) -> dict[str, Any]:
    """What the run computed in, for the report."""
    plan = (
        run.plans.get(run.net.samples) or next(iter(run.plans.values()), None)
        if spec.policy
        else None
    )
    if plan is not None:
        text = (
            f"policy {spec.policy.name}: {plan.describe()}; params {plan.params}, data {plan.data}"  # type: ignore[union-attr]
        )
        if plan.how == "autocast":
            text += f"; autocast to {plan.autocast_dtype} around the forward and the loss"
    elif spec.emulated:
        text = f"emulated {spec.precision} (fpgrad's strict machine interprets the captured graph)"
    else:
        text = f"native torch {spec.precision} on this CPU (eager module, one thread)"
    if spec.master:
        text += "; float32 master weights"
    if spec.dynamic:
        text += "; dynamic loss scaling (GradScaler's rules)"
    elif spec.loss_scale is not None:
        text += f"; loss scale {spec.loss_scale:g}"
    if spec.update != "nearest":
        text += f"; {spec.update} updates"
    return {"summary": text, "uniform": True}


def train_graph(
    net: GraphNetwork,
    steps: int,
    cfg: OptimConfig | None = None,
    runs: str | list[str] | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    exact_bits: int = 128,
    verdict_every: int | None = None,
    stall_k: int = 5,
    progress: bool = False,
    exact_method: str = "auto",
    exact_max_bits: int | None = None,
) -> TrainResult:
    """Train the captured ``net`` for ``steps`` steps in every run and exactly, from the
    parameters it was captured with (:func:`fpgrad.training.train`'s result): full batch, or
    with ``batch_size`` seeded mini-batches (:func:`fpgrad.training.runs.batch_schedule`: the
    same samples in every run) of every input and the targets along their first dimension."""
    from fpgrad.reference.exact import MIN_BITS

    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer (got {steps})")
    if exact_bits < MIN_BITS:
        raise InputError(f"--exact-bits {exact_bits} is too low: use at least {MIN_BITS}")
    trainee = Trainee(net.graph, net.name)
    n = trainee.samples
    if batch_size is not None and batch_size < n:
        trainee.check_batches()
    schedule = batch_schedule(n, steps, batch_size, seed)
    cfg = cfg or OptimConfig()
    specs = parse_graph_runs(runs, getattr(net, "policies", None))
    every = verdict_every or max(1, steps // 10)
    with one_torch_thread():
        native = {
            s.label: (GraphEmulatedRun if s.emulated else GraphTorchRun)(trainee, s, cfg, seed)
            for s in specs
        }
        for label, r in native.items():
            with kernels_of(label):  # the model's own failure in a dtype: one line
                r.record_initial()
        iterator: Any = range(steps)
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc="fpgrad train", unit="step", leave=False)
        for t in iterator:  # every run's step first: a refusal comes before exact work
            rows = schedule[t]
            stepped = []
            for label, run in native.items():
                with kernels_of(label):
                    stepped.append((run, run.current_params(), run.step(rows)))
            if t % every and t != steps - 1:
                continue
            for run, before, grads in stepped:
                counts, loss = exact_check(
                    trainee, before, grads, run.grad_format, exact_bits, exact_max_bits, rows
                )
                run.history.verdicts[t] = counts
                if loss is not None:
                    run.history.exact_loss_at_params[t] = loss
        last = schedule[-1]  # the final loss is taken on the last batch, as for networks
        for run in native.values():
            run.history.loss.append(run.final_loss(last))
            _, loss = exact_check(trainee, run.current_params(), {}, "float64", exact_bits,
                                  exact_max_bits, last)  # fmt: skip
            if loss is not None:
                run.history.exact_loss_at_params[steps] = loss
        exact, digits, method = exact_run(
            trainee, cfg, schedule, exact_bits, exact_method, progress, exact_max_bits
        )
    for h in (exact.history, *(r.history for r in native.values())):
        h.dead_units.clear()  # no layers: not counted (an empty list in the JSON, not zeros)
    notes = [exact.fallback] if exact.fallback else []
    unproven = getattr(exact, "unproven_at", None)
    if unproven is not None:
        notes.append(
            f"step {unproven}: the Arb exact run met a branch its balls cannot decide (a max-pool "
            "window with tied values); the exact trajectory is not proven from there"
        )
    undetermined = getattr(exact, "undetermined", {})
    if undetermined and unproven is None:
        n = sum(c for c, _ in undetermined.values())
        radius = max(r for _, r in undetermined.values())
        notes.append(
            f"{n} parameter elements of the exact run ({', '.join(undetermined)}) end as balls "
            f"around 0 of radius <= {radius:.1e}: their exact values lie that close to 0, sign "
            "undetermined; the certified digits count the other elements"
        )
    if digits < 17 and unproven is None:
        notes.append(f"the exact trajectory certifies only {digits:.1f} digits: raise --exact-bits")
    notes.append(
        "captured model: torch dtypes are eager torch training of the module on this CPU, "
        "emulated formats interpret the captured graph on fpgrad's strict machine, the exact "
        "run interprets it in certified balls"
    )
    distance: dict[str, list[float]] = {}
    detectors: dict[str, dict[str, Any]] = {}
    spec_of = {s.label: s for s in specs}
    for label, run in native.items():
        distance[label], detectors[label] = run_detectors(
            run.history, exact.history, None, cfg, spec_of[label], stall_k
        )
        _scaled_cause(
            detectors[label]["first_overflow"], run.history, _narrowest(run),
            getattr(run, "loss_format", None),
        )  # fmt: skip
    config = {
        "steps": steps,
        "optimizer": cfg.__dict__,
        "batch_size": batch_size if batch_size is not None and batch_size < n else None,
        "seed": seed,
        "exact_bits": exact_bits,
        "exact_method": method,
        "exact_working_bits": exact.bits,
        "verdict_every": every,
        "model": "captured",
    }
    return TrainResult(
        net.name,
        config,
        [s.label for s in specs],
        {k: r.history for k, r in native.items()},
        exact.history,
        digits,
        detectors,
        distance,
        notes,
        {s.label: _plan(s, native[s.label]) for s in specs},
    )
