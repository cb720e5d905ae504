"""Side-by-side training: the same initial parameters in every precision and exactly.

A run is named by a precision and optional policies joined by ``+``:

- ``float16``, ``bfloat16``, ``float32``, ``float64``: torch modules and autograd in that dtype,
  optimizer state in that dtype;
- ``+master``: fp32 master weights (the optimizer updates float32 copies; each step computes
  in the low precision from the master weights rounded into it);
- ``+scale=S``: static loss scaling by a power of two S; ``+dynamic``: dynamic loss scaling with
  torch.amp.GradScaler's rules (see :mod:`fpgrad.run.scaling`);
- ``+sr``: updates rounded stochastically (seeded); ``+kahan``: Kahan-compensated updates.

The exact run (certified balls: multi-word at up to 150 bits, else Arb at escalating precision;
:func:`exact_trajectory`) is always computed. Mini-batches follow one seeded order shared by all runs.

Modules, in the order they build on each other: ``runs`` (run names, batches), ``history``,
``torch_run``, ``emulated_run``, ``exact_run`` (the certified trajectory), ``result``
(:class:`TrainResult`), ``detectors`` (stall, divergence, first overflow...), ``loop`` (:func:`train` and the detectors).
"""

from fpgrad.training.detectors import run_detectors
from fpgrad.training.emulated_run import EmulatedRun
from fpgrad.training.exact_run import (
    ARB_WATCH_EVERY,
    ExactRun,
    arb_bits_for,
    exact_check,
    exact_gradient_counts,
    exact_loss_at,
    exact_trajectory,
)
from fpgrad.training.history import History
from fpgrad.training.loop import train
from fpgrad.training.result import TrainResult
from fpgrad.training.runs import POLICIES, RunSpec, batch_schedule, parse_run, parse_runs
from fpgrad.training.torch_run import TorchRun

__all__ = [
    "ARB_WATCH_EVERY",
    "POLICIES",
    "EmulatedRun",
    "ExactRun",
    "History",
    "RunSpec",
    "TorchRun",
    "TrainResult",
    "arb_bits_for",
    "batch_schedule",
    "exact_check",
    "exact_gradient_counts",
    "exact_loss_at",
    "exact_trajectory",
    "parse_run",
    "parse_runs",
    "run_detectors",
    "train",
]
