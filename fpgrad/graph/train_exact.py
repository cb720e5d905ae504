"""The exact references of captured-model training: the certified trajectory through the
graph (:class:`GraphExactRun` under :func:`fpgrad.training.exact_trajectory`) and the certified
gradients at a run's own parameters (:func:`exact_check`)."""

from __future__ import annotations

import dataclasses
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from fpgrad.diagnose.verdicts import VERDICTS, classify
from fpgrad.errors import InputError
from fpgrad.graph.interpret import interpret
from fpgrad.graph.ops.pointwise import MissingSlot
from fpgrad.run.optim import OptimConfig
from fpgrad.training.exact_run import ExactRun, _exact_loss, exact_trajectory
from fpgrad.training.history import _flat

if TYPE_CHECKING:
    from fpgrad.graph.train_runs import Trainee


class _NoSlot(Exception):
    """The multi-word balls lack an op of the graph (then the exact run uses Arb balls)."""


class GraphExactRun(ExactRun):
    """The exact run of a captured model: the graph interpreted in the run's balls."""

    net: Trainee
    #: the first evaluation (1-based step; steps + 1: the final loss) in which Arb balls took
    #: a branch they could not decide (a max-pool tie): nothing is proven from there
    unproven_at: int | None = None

    def trace(self, rows: np.ndarray) -> Any:
        try:
            it = interpret(self.net.graph_at(rows), self.ar, self.params, keep=False)
        except MissingSlot as exc:
            raise _NoSlot(str(exc)) from None
        untracked = getattr(self.ar, "untracked", None)
        if self.unproven_at is None and untracked is not None and untracked():
            self.unproven_at = len(self.history.loss) + 1
        return SimpleNamespace(loss=it.loss, grads=it.grads, forward={})

    def ball_digits(self) -> float:
        """As :meth:`ExactRun.ball_digits`; 0 once a branch was taken undecided."""
        return 0.0 if self.unproven_at is not None else super().ball_digits()

    def _digits(self, steps: list[dict[str, Any]]) -> float:
        """The fewest certified digits of the parameter elements whose sign the balls decide
        (as ``compare`` counts: exact zeros and balls around 0 left out); the balls around 0
        of the last step are kept in :attr:`undetermined` (name -> (count, largest radius))."""
        from fpgrad.reference.exact import arb_digits, ball_digits
        from fpgrad.training.exact_run import _is_ball

        digits_of = ball_digits if _is_ball(next(iter(self.params.values()), None)) else arb_digits
        worst = float(self._cap())
        self.undetermined: dict[str, tuple[int, float]] = {}
        for i, params in enumerate(steps):
            for name, value in params.items():
                d, zero, undet, rad = digits_of(value, self._cap())
                kept = d[~zero & ~undet]
                if kept.size:
                    worst = min(worst, float(np.min(kept)))
                if i == len(steps) - 1 and undet.any():
                    radius = float(np.max(np.asarray(rad, dtype=np.float64)[undet]))
                    self.undetermined[name] = (int(undet.sum()), radius)
        return worst


def exact_run(
    net: Trainee,
    cfg: OptimConfig,
    schedule: list[np.ndarray],
    bits: int,
    method: str,
    progress: bool,
    max_bits: int | None,
) -> tuple[ExactRun, float, str]:
    """:func:`fpgrad.training.exact_trajectory` through the graph; an op the multi-word balls
    lack sends the run to Arb balls (announced in one line), or is refused under ``fast``."""
    from fpgrad.reference.exact import ALIASES

    try:
        return exact_trajectory(
            net, cfg, schedule, bits, method, progress, max_bits, run_type=GraphExactRun
        )
    except _NoSlot as exc:
        if ALIASES.get(method, method) == "fast":
            raise InputError(
                f"the fast exact run cannot evaluate this model ({exc}); use --exact-method arb"
            ) from None
        why = (
            f"the ball exact run cannot evaluate this model (step 1: {exc}); computing in Arb balls"
        )
        print(f"fpgrad train: {why}", file=sys.stderr)
    run, digits, used = exact_trajectory(
        net, cfg, schedule, bits, "arb", progress, max_bits, run_type=GraphExactRun
    )
    run.fallback = why
    return run, digits, used


def exact_check(
    net: Trainee,
    params: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    precision: str,
    bits: int,
    max_bits: int | None = None,
    rows: np.ndarray | None = None,
) -> tuple[dict[str, int], float | None]:
    """Verdict counts of ``grads`` against the certified exact gradients of the graph at the
    same (float64) parameters on the samples ``rows`` (None: all), and the exact loss there;
    at non-finite parameters there is no exact reference (counted as nan, overflow or
    ``no_reference``; loss None)."""
    from fpgrad.graph.exact import exact_graph
    from fpgrad.numbers.formats import get_format
    from fpgrad.reference.exact import DEFAULT_MAX_BITS

    if not all(np.all(np.isfinite(v)) for v in params.values()):
        flat = _flat(list(grads.values()))
        nan, inf = int(np.isnan(flat).sum()), int(np.isinf(flat).sum())
        return {"nan": nan, "overflow": inf, "no_reference": flat.size - nan - inf}, None
    at = dataclasses.replace(
        net.graph_at(rows), params={k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    )
    cap = DEFAULT_MAX_BITS if max_bits is None else max_bits
    exact = exact_graph(at, bits, allow_uncertified=True, max_bits=cap)
    fmt = get_format(precision)
    counts: dict[str, int] = {}
    for k, g in grads.items():
        v = classify(exact.result.exact_array(f"grads/{k}"), g, fmt)
        found = np.bincount(v.code.ravel(), minlength=len(VERDICTS))
        for name, n in zip(VERDICTS, found.tolist(), strict=True):
            if n:
                counts[name] = counts.get(name, 0) + n
    return counts, _exact_loss(exact.result)
