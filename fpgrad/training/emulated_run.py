"""A run on the strict emulated machine of a format (every operation rounded into it)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fpgrad.graph.layers import evaluate, evaluate_plan
from fpgrad.model.network import Network
from fpgrad.numbers.rounding import round_to
from fpgrad.run.optim import ArithOptimizer, OptimConfig
from fpgrad.run.scaling import DynamicScaler, StaticScaler
from fpgrad.training.history import History, _flat
from fpgrad.training.runs import RunSpec
from fpgrad.training.torch_run import _first_nonfinite, _Run


class EmulatedRun(_Run):
    """One emulated precision (any format, :mod:`fpgrad.arith.emulated`) with its options:
    forward, backward and optimizer in the strict machine, the update ``w - lr d`` rounded
    once (as torch's kernels); ``+master`` runs the optimizer in emulated float32,
    ``+sr`` rounds every optimizer operation stochastically."""

    def __init__(
        self, net: Network, spec: RunSpec, cfg: OptimConfig, seed: int, perturb: bool = False
    ):
        from fpgrad.arith.emulated import EmulatedArith
        from fpgrad.graph.precisions import get_precision
        from fpgrad.numbers.rounding import Mode
        from fpgrad.run.runlog import record

        record(spec.label, "emulated")
        self.plan = None
        if spec.policy is not None:  # an emulated policy: parameters in its params system
            from fpgrad.graph.precisions import emulated_systems

            self.plan = spec.policy.resolve(net)
            self.systems = emulated_systems(seed)
            p = get_precision(self.plan.params)
        else:
            p = get_precision(spec.precision)
        self.net, self.spec, self.fmt = net, spec, p.fmt
        acc = p.accumulation or "fp32"
        self.ar = EmulatedArith(p.fmt, acc, p.mode, rng=np.random.default_rng([seed, 2]))
        self.params = {k: self.ar.asarray(v) for k, v in net.params.items()}
        if perturb:  # the one-ulp twin: first weight nudged to the next value above
            first = next(iter(self.params))
            w = self.params[first].reshape(-1)
            w[0] = round_to(np.nextafter(w[0], math.inf), self.fmt, Mode.UP)
        self.master: dict[str, np.ndarray] | None = None
        if spec.master:
            self.opt_ar = EmulatedArith("float32", acc, rng=np.random.default_rng([seed, 3]))
            self.master = {k: v.copy() for k, v in self.params.items()}  # exact in float32
        elif spec.update == "stochastic":
            self.opt_ar = EmulatedArith(
                p.fmt, acc, Mode.STOCHASTIC, rng=np.random.default_rng([seed, 3])
            )
        else:
            self.opt_ar = self.ar
        self.opt = ArithOptimizer(self.opt_ar, self.targets(), cfg, fused=True)
        self.scaler: DynamicScaler | StaticScaler | None = None
        if spec.dynamic:
            self.scaler = DynamicScaler()
        elif spec.loss_scale is not None:
            self.scaler = StaticScaler(spec.loss_scale)
        self.grad_format = "float32" if spec.master else p.fmt.name
        self.history = History(spec.label)

    def targets(self) -> dict[str, np.ndarray]:
        return self.master if self.master is not None else self.params

    def vector(self) -> np.ndarray:
        return _flat(list(self.targets().values()))

    def low_vector(self) -> np.ndarray:
        """The parameters the forward pass uses, flattened to float64."""
        return _flat(list(self.params.values()))

    def step(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        net, hist, oa = self.net, self.history, self.opt_ar
        scale = self.scaler.scale if self.scaler is not None else 1.0
        if self.plan is not None:
            trace = evaluate_plan(net, self.plan, self.systems, self.params, rows, scale)
        else:
            trace = evaluate(net, self.ar, self.params, rows, loss_scale=scale)
        if hist.overflow_place is None:
            hist.overflow_place = _first_nonfinite(
                net,
                self.params,
                trace.forward,
                trace.loss,
                trace.backward,
                trace.grads,
                len(hist.loss),
            )
        grads = {k: oa.asarray(g) for k, g in trace.grads.items()}  # widening: exact
        if scale != 1.0:
            grads = {k: oa.mul(g, oa.const(1.0 / scale)) for k, g in grads.items()}
        finite = all(bool(np.all(np.isfinite(g))) for g in grads.values())
        take = self.scaler.update(finite) if self.scaler is not None else True
        before = self.vector()
        if take:
            self.apply(grads)
        g64 = {k: np.asarray(g, dtype=np.float64) for k, g in grads.items()}
        self._record(
            float(trace.loss),
            g64,
            _flat(list(self.opt.intended.values())) if take else None,
            before,
            finite,
            take,
            scale,
            trace.forward,
        )
        return g64

    def apply(self, grads: dict[str, Any]) -> None:
        """The optimizer's update of what it updates; with master weights the parameters
        are the masters rounded once into the format."""
        new = self.opt.step(self.targets(), grads)
        if self.master is not None:
            self.master = new
            self.params = {k: self.ar.asarray(v) for k, v in new.items()}  # one rounding
        else:
            self.params = new

    def final_loss(self, rows: np.ndarray) -> float:
        """The unscaled loss at the current parameters on ``rows`` in the run's machine."""
        if self.plan is not None:
            trace = evaluate_plan(self.net, self.plan, self.systems, self.params, rows)
        else:
            trace = evaluate(self.net, self.ar, self.params, rows)
        return float(trace.loss)

    def current_params(self) -> dict[str, np.ndarray]:
        """The parameters the forward pass uses, as float64 arrays."""
        return {k: np.array(v, dtype=np.float64) for k, v in self.params.items()}
