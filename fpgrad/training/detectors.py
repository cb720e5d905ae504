"""The dynamics detectors of one run against the exact run (stall, loss floor, limit cycle,
divergence, first overflow with its optimizer cause, swamped updates)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fpgrad.errors import InputError
from fpgrad.numbers.rounding import round_to
from fpgrad.run.optim import OptimConfig
from fpgrad.training.history import History
from fpgrad.training.runs import RunSpec


def run_detectors(
    h: History,
    exact: History,
    twin: History | None,
    cfg: OptimConfig,
    spec: RunSpec,
    stall_k: int = 5,
) -> tuple[list[float], dict[str, Any]]:
    """(distance to the exact run per step, the dynamics detectors) of one run's history;
    ``twin``: the history of its one-ulp perturbed twin, if it ran."""
    from fpgrad.training.dynamics import (
        detect_cycle,
        detect_diverged,
        detect_divergence,
        detect_loss_floor,
        detect_stall,
        relative_distance,
        without_false_calm,
    )

    distance = relative_distance(h.params, exact.params)
    twin_sep = relative_distance(twin.params, h.params) if twin is not None else None
    detectors = {
        "stall": detect_stall(h.moved, exact.moved, stall_k),
        "loss_floor": detect_loss_floor(h.loss, exact.loss),
        "limit_cycle": detect_cycle(h.state_hash),
        "divergence": detect_divergence(distance, twin_sep),
        "first_overflow": _with_cause(h.overflow_place, cfg, spec),
        "swamped_fraction": _swamped_fraction(h),
        "diverged": detect_diverged(h.params),
    }
    return distance, without_false_calm(detectors)


def _with_cause(
    place: dict[str, Any] | None, cfg: OptimConfig, spec: RunSpec
) -> dict[str, Any] | None:
    """The first non-finite value with the optimizer cause that explains it, if one does:
    Adam's eps rounding to 0 in the format of the optimizer state (then a zero second moment
    gives 0/0), or the second moment ``(1 - beta2) g^2`` underflowing (then the step is m/eps),
    each with its fix; else an update that overflowed the format."""
    if place is None:
        return None
    from fpgrad.model.policy import format_of

    state = "float32" if spec.master else spec.precision
    try:
        fmt = format_of(state)
    except InputError:
        return place
    fix = "keep the optimizer state in float32 (+master) or raise eps"
    if cfg.name == "adam":
        if float(round_to(np.array([cfg.eps]), fmt)[0]) == 0:
            cause = (
                f"Adam's eps = {cfg.eps:g} rounds to 0 in {fmt.name}: where the second moment "
                f"is 0, m / (sqrt(v) + eps) is 0/0 = NaN; fix: {fix}"
            )
        else:
            g_min = math.sqrt(fmt.smallest_subnormal / 2 / (1 - cfg.beta2))
            cause = (
                f"in {fmt.name} Adam's second moment (1 - beta2) g^2 underflows for |g| < "
                f"{g_min:.2g}, and then the step m / eps can overflow; fix: {fix}"
            )
    else:
        cause = (
            f"an update lr * g or a parameter overflowed {fmt.name} (largest {fmt.max:g}); "
            "fix: a smaller learning rate or a loss scale that leaves headroom"
        )
    return {**place, "cause": cause}


def _swamped_fraction(h: History) -> dict[str, Any]:
    asked = sum(h.updated)
    lost = sum(h.swamped)
    always = (
        all(s == u and u > 0 for s, u in zip(h.swamped, h.updated, strict=True))
        if h.updated
        else False
    )
    return {
        "total": lost / asked if asked else 0.0,
        "every_step_fully_swamped": always,
        "last": h.swamped[-1] / h.updated[-1] if h.updated and h.updated[-1] else 0.0,
    }
