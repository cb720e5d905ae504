"""Side-by-side training: the same initial parameters in every precision and exactly.

A run is named by a precision and optional policies joined by ``+``:

- ``float16``, ``bfloat16``, ``float32``, ``float64``: torch modules and autograd in that dtype,
  optimizer state in that dtype;
- ``+master``: fp32 master weights (the optimizer updates float32 copies; each step computes
  in the low precision from the master weights rounded into it);
- ``+scale=S``: static loss scaling by a power of two S; ``+dynamic``: dynamic loss scaling with
  torch.amp.GradScaler's rules (see :mod:`fpgrad.scaling`);
- ``+sr``: updates rounded stochastically (seeded); ``+kahan``: Kahan-compensated updates.

The exact run (certified balls: multi-word at up to 150 bits, else Arb at escalating precision;
:func:`exact_trajectory`) is always computed. Mini-batches follow one seeded order shared by all runs.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fpgrad.errors import InputError
from fpgrad.evaluate import evaluate, evaluate_plan
from fpgrad.formats import NATIVE, get_format
from fpgrad.network import Network
from fpgrad.optim import ArithOptimizer, OptimConfig, TorchOptimizer
from fpgrad.policy import BUILTIN, Plan, Policy, get_policy
from fpgrad.rounding import round_to
from fpgrad.scaling import DynamicScaler, StaticScaler
from fpgrad.suggest import did_you_mean
from fpgrad.torch_native import TorchModel, one_torch_thread
from fpgrad.verdicts import VERDICTS, classify

POLICIES = ("master", "scale=S", "dynamic", "sr", "kahan")


@dataclass(frozen=True)
class RunSpec:
    """A precision and its mixed-precision policies."""

    label: str
    precision: str
    master: bool = False
    loss_scale: float | None = None
    dynamic: bool = False
    update: str = "nearest"
    policy: Policy | None = None  #: a precision policy: ``precision`` is its parameters'
    emulated: bool = False  #: a strict emulated machine (:mod:`fpgrad.arith.emulated`)

    def plan(self, net: Network) -> Plan:
        """What each layer computes in during this run."""
        if self.policy is not None:
            return self.policy.resolve(net)
        return Plan.uniform(net, self.precision)


def parse_run(text: str, policies: dict[str, Policy] | None = None) -> RunSpec:
    parts = [p.strip().lower() for p in text.split("+")]
    named = get_policy(text.split("+")[0].strip(), policies)  # user policy names keep case
    precision = named.params if named is not None else parts[0]
    if named is not None:
        parts[0] = named.name
    emulated = named is not None and named.emulated
    if named is None and precision not in NATIVE:
        from fpgrad.precisions import get_precision

        try:
            prec = get_precision(precision)
        except InputError:
            raise InputError(
                f"unknown training precision {parts[0]!r}; use one of {', '.join(NATIVE)}, an "
                "emulated format (fp8_e4m3, e5m7, float16:emulated, ...), or a precision policy "
                f"({', '.join(BUILTIN)} or the network file's [policy.NAME]) with optional "
                f"options +{', +'.join(POLICIES)}"
            ) from None
        precision = parts[0] = prec.name
        emulated = True
    kw: dict[str, Any] = {"policy": named, "emulated": emulated}
    for policy in parts[1:]:
        if policy == "master":
            kw["master"] = True
        elif policy == "dynamic":
            kw["dynamic"] = True
        elif policy in ("sr", "kahan"):
            if "update" in kw:
                raise InputError(f"run {text!r}: choose one of +sr and +kahan")
            kw["update"] = "stochastic" if policy == "sr" else "kahan"
        elif policy.startswith("scale="):
            try:
                scale = float(policy[6:])
            except ValueError:
                raise InputError(
                    f"run {text!r}: loss scale {policy[6:]!r} is not a number"
                ) from None
            StaticScaler(scale)  # validates: a power of two
            kw["loss_scale"] = scale
        else:
            raise InputError(
                f"run {text!r}: unknown policy {policy!r}{did_you_mean(policy, POLICIES)}; "
                f"known: +{', +'.join(POLICIES)}"
            )
    if named is not None and kw.get("master"):
        raise InputError(
            f"run {text!r}: a policy keeps its parameters in its own precision "
            f"({named.params}); drop +master or set params in the policy"
        )
    if kw.get("dynamic") and kw.get("loss_scale"):
        raise InputError(f"run {text!r}: choose static (+scale=S) or dynamic scaling, not both")
    if emulated and kw.get("update") == "kahan":
        raise InputError(f"run {text!r}: +kahan is offered for torch runs only; use +sr or +master")
    if emulated and kw.get("master"):
        fmt = get_format(precision.split(":")[0])
        if fmt.exp_bits > 8 or fmt.man_bits > 23:
            raise InputError(f"run {text!r}: float32 master weights cannot hold {fmt.name} values")
    return RunSpec(label="+".join(parts), precision=precision, **kw)


def parse_runs(
    spec: str | list[str] | None, policies: dict[str, Policy] | None = None
) -> list[RunSpec]:
    names = list(NATIVE) if spec is None else (spec.split(",") if isinstance(spec, str) else spec)
    runs: list[RunSpec] = []
    for name in names:
        if not name.strip():
            raise InputError("empty run name in --precisions; separate names by commas")
        if name.strip().lower() == "exact":
            continue
        run = parse_run(name, policies)
        if run.label not in [r.label for r in runs]:
            runs.append(run)
    if not runs:
        raise InputError("no run to train; name at least one precision, e.g. --precisions float16")
    return runs


def batch_schedule(n: int, steps: int, batch_size: int | None, seed: int) -> list[np.ndarray]:
    """Row indices of every step: full batch, or seeded epoch permutations cut into batches."""
    if batch_size is None or batch_size >= n:
        return [np.arange(n)] * steps
    if batch_size < 1:
        raise InputError(f"batch size must be positive (got {batch_size})")
    rng = np.random.default_rng([seed, 1])
    rows: list[np.ndarray] = []
    while len(rows) < steps:
        perm = rng.permutation(n)
        rows += [
            np.sort(perm[i : i + batch_size]) for i in range(0, n - batch_size + 1, batch_size)
        ]
    return rows[:steps]


@dataclass
class History:
    """Per-step records of one run (index t: after t steps; index 0 is the initial state)."""

    label: str
    #: loss at the parameters after t steps, on step t+1's batch; the last entry (index
    #: ``steps``) is one extra forward pass at the final parameters, on the last step's batch
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    swamped: list[int] = field(default_factory=list)  # intended update != 0 but w unchanged
    updated: list[int] = field(default_factory=list)  # elements with a non-zero intended update
    nonfinite: list[bool] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    dead_units: list[int] = field(default_factory=list)
    moved: list[bool] = field(default_factory=list)  # any parameter changed in this step
    params: list[np.ndarray] = field(default_factory=list)  # float64 vector after t steps
    state_hash: list[str] = field(default_factory=list)  # whole state after t steps
    verdicts: dict[int, dict[str, int]] = field(default_factory=dict)  # step -> verdict counts
    overflow_place: dict[str, Any] | None = None
    #: step -> certified exact loss at the run's own parameters after that many steps
    exact_loss_at_params: dict[int, float] = field(default_factory=dict)


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return (
        np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
        if arrays
        else np.zeros(0)
    )


def _dead_units(net: Network, outputs: dict[str, np.ndarray]) -> int:
    """Units of activation layers whose output is zero on every sample of the batch."""
    return sum(
        int(np.sum(np.all(outputs[ly.name] == 0, axis=0))) for ly in net.layers if ly.is_activation
    )


class _Run:
    """What every non-exact run shares: the state hash of the cycle detector and the first
    record. Subclasses give ``vector()`` (the optimizer's parameters), ``low_vector()``, ``opt``,
    ``scaler`` and ``history``."""

    net: Network
    history: History
    opt: Any
    scaler: DynamicScaler | StaticScaler | None

    def vector(self) -> np.ndarray:
        raise NotImplementedError

    def low_vector(self) -> np.ndarray:
        raise NotImplementedError

    def state_hash(self) -> str:
        """The whole state: parameters, their low copies, optimizer state, loss scaler."""
        h = hashlib.sha1(self.vector().tobytes())
        h.update(self.low_vector().tobytes())
        h.update(self.opt.state_bytes())
        if self.scaler is not None:
            h.update(repr((self.scaler.scale, getattr(self.scaler, "clean_steps", 0))).encode())
        return h.hexdigest()

    def record_initial(self) -> None:
        self.history.params.append(self.vector())
        self.history.state_hash.append(self.state_hash())

    def final_loss(self, rows: np.ndarray) -> float:
        raise NotImplementedError

    def record_final(self, rows: np.ndarray) -> None:
        """Append the loss at the final parameters on ``rows`` (one extra forward pass)."""
        self.history.loss.append(self.final_loss(rows))

    def _record(
        self,
        loss: float,
        grads: dict[str, np.ndarray],
        intended: np.ndarray | None,
        before: np.ndarray,
        finite: bool,
        take: bool,
        scale: float,
        outputs: dict[str, np.ndarray],
    ) -> None:
        """One step's history, after the update (``intended``: None when it was skipped)."""
        hist, after = self.history, self.vector()
        intended = np.zeros_like(after) if intended is None else intended
        hist.loss.append(loss)
        g64 = _flat(list(grads.values()))
        hist.grad_norm.append(float(np.linalg.norm(g64)) if np.all(np.isfinite(g64)) else math.inf)
        asked = (intended != 0) & np.isfinite(intended)
        hist.updated.append(int(asked.sum()))
        hist.swamped.append(int(np.sum(asked & (after == before))))
        hist.nonfinite.append(not finite or not math.isfinite(loss))
        hist.skipped.append(not take)
        hist.scale.append(scale)
        hist.dead_units.append(_dead_units(self.net, outputs))
        hist.moved.append(bool(np.any((after != before) & ~(np.isnan(after) & np.isnan(before)))))
        hist.params.append(after)
        hist.state_hash.append(self.state_hash())


class TorchRun(_Run):
    """One precision with its policies, trained with torch autograd."""

    def __init__(
        self, net: Network, spec: RunSpec, cfg: OptimConfig, seed: int, perturb: bool = False
    ):
        from fpgrad.runlog import policy_how, record

        device = spec.policy.autocast_device if spec.policy is not None else None
        record(spec.label, "native" if device is None else policy_how(device, False))
        self.net, self.spec = net, spec
        self.model = TorchModel(net, spec.plan(net))
        self.modules = self.model.modules
        self.params = list(self.model.named_params().values())
        if perturb:  # the one-ulp twin of the chaos test: first weight nudged up by one ulp
            with torch.no_grad():
                w = self.params[0].view(-1)
                w[0] = torch.nextafter(w[0], torch.tensor(math.inf, dtype=w.dtype))
        self.master = (
            [p.detach().to(torch.float32).clone() for p in self.params] if spec.master else None
        )
        targets = self.master if self.master is not None else self.params
        self.opt = TorchOptimizer(targets, cfg, spec.update, seed)
        self.scaler: DynamicScaler | StaticScaler | None = None
        if spec.dynamic:
            self.scaler = DynamicScaler()
        elif spec.loss_scale is not None:
            self.scaler = StaticScaler(spec.loss_scale)
        self.grad_format = "float32" if spec.master else spec.precision
        self.history = History(spec.label)

    def targets(self) -> list[torch.Tensor]:
        return self.master if self.master is not None else self.params

    def vector(self) -> np.ndarray:
        return _flat([t.detach().to(torch.float64).numpy() for t in self.targets()])

    def low_vector(self) -> np.ndarray:
        """The parameters the forward pass uses, flattened to float64."""
        return _flat([p.detach().to(torch.float64).numpy() for p in self.params])

    def step(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        net, hist = self.net, self.history
        part = net.with_data(net.x[rows], net.y[rows])
        for t in self.params:
            t.grad = None
        h = self.model.inputs(part)
        outputs: dict[str, np.ndarray] = {}
        kept: dict[str, torch.Tensor] = {}
        for index, layer in enumerate(net.layers):
            h = self.model.layer(index, h)
            h.retain_grad()
            kept[layer.name] = h
            outputs[layer.name] = h.detach().to(torch.float64).numpy()
        loss = self.model.loss(part, h)
        scale = self.scaler.scale if self.scaler is not None else 1.0
        (loss * scale if scale != 1.0 else loss).backward()
        if hist.overflow_place is None:
            named = dict(zip(net.params, self.params, strict=True))
            hist.overflow_place = _first_nonfinite(
                net,
                named,
                kept,
                loss,
                {k: t.grad for k, t in kept.items()},
                {k: t.grad for k, t in named.items()},
                len(hist.loss),
            )
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in self.params]
        if self.master is not None:
            grads = [g.to(torch.float32) for g in grads]  # unscale in float32, as GradScaler
        if scale != 1.0:
            grads = [g * (1.0 / scale) for g in grads]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        take = self.scaler.update(finite) if self.scaler is not None else True
        before = self.vector()
        if take:
            self.opt.step(grads)
        if self.master is not None:
            with torch.no_grad():
                for low, high in zip(self.params, self.master, strict=True):
                    low.copy_(high.to(low.dtype))  # float32 -> low precision: one correct rounding
        g64 = {
            k: g.detach().to(torch.float64).numpy() for k, g in zip(net.params, grads, strict=True)
        }
        self._record(
            float(loss.detach().to(torch.float64)),
            g64,
            _flat(self.opt.intended) if take else None,
            before,
            finite,
            take,
            scale,
            outputs,
        )
        return g64

    def final_loss(self, rows: np.ndarray) -> float:
        """The unscaled loss at the current parameters on ``rows``, forward only."""
        part = self.net.with_data(self.net.x[rows], self.net.y[rows])
        with torch.no_grad():
            h = self.model.inputs(part)
            for index in range(len(self.net.layers)):
                h = self.model.layer(index, h)
            return float(self.model.loss(part, h).to(torch.float64))

    def current_params(self) -> dict[str, np.ndarray]:
        """The low-precision parameters (what the forward pass uses) as float64 arrays."""
        return {
            k: t.detach().to(torch.float64).numpy().copy()
            for k, t in zip(self.net.params, self.params, strict=True)
        }


def _first_nonfinite(
    net: Network,
    params: dict[str, Any],
    forward: dict[str, Any],
    loss: Any,
    backward: dict[str, Any],
    grads: dict[str, Any],
    step: int,
) -> dict[str, Any] | None:
    """The first tensor of this step holding inf/NaN, in the order they are computed: the
    parameters, forward outputs, the loss, backward signals (from the loss back), then the
    parameter gradients. Values are torch tensors or numpy arrays (None: not computed)."""
    from fpgrad.compare import places

    def where(layer: str, direction: str, quantity: str, op: str) -> dict[str, Any]:
        return {
            "step": step,
            "layer": layer,
            "direction": direction,
            "quantity": quantity,
            "op": op,
        }

    def bad(t: Any) -> bool:
        if t is None:
            return False
        if isinstance(t, torch.Tensor):
            return not bool(torch.isfinite(t).all())
        return not bool(np.all(np.isfinite(np.asarray(t, dtype=np.float64))))

    for name, p in params.items():
        if bad(p):
            return where(name.split(".")[0], "parameter", name, "the previous update")
    steps = places(net)
    for place in steps:
        if place.direction == "forward" and bad(forward[place.layer]):
            return where(place.layer, "forward", place.quantity, place.op)
    if bad(loss):
        return where("loss", "forward", "L", f"loss forward ({net.loss.kind})")
    for place in steps:
        if place.direction == "backward" and bad(backward.get(place.layer)):
            return where(place.layer, "backward", place.quantity, place.op)
    for name, g in grads.items():
        if bad(g):
            layer = name.split(".")[0]
            return where(layer, "backward", f"dL/d{name}", f"{layer} backward (parameter gradient)")
    return None


class EmulatedRun(_Run):
    """One emulated precision (any format, :mod:`fpgrad.arith.emulated`) with its options:
    forward, backward and optimizer in the strict machine, the update ``w - lr d`` rounded
    once (as torch's kernels); ``+master`` runs the optimizer in emulated float32,
    ``+sr`` rounds every optimizer operation stochastically."""

    def __init__(
        self, net: Network, spec: RunSpec, cfg: OptimConfig, seed: int, perturb: bool = False
    ):
        from fpgrad.arith.emulated import EmulatedArith
        from fpgrad.precisions import get_precision
        from fpgrad.rounding import Mode
        from fpgrad.runlog import record

        record(spec.label, "emulated")
        self.plan = None
        if spec.policy is not None:  # an emulated policy: parameters in its params system
            from fpgrad.precisions import emulated_systems

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
            new = self.opt.step(self.targets(), grads)
            if self.master is not None:
                self.master = new
                self.params = {k: self.ar.asarray(v) for k, v in new.items()}  # one rounding
            else:
                self.params = new
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


class ExactRun:
    """The exact run: the optimizer's formulas in certified balls, the multi-word balls of
    :mod:`fpgrad.arith.ball` (``balls``, at the fast level at or above ``bits``) or Arb balls
    at ``bits`` (:mod:`fpgrad.arith.arb`); the radii bound every value (:meth:`ball_digits`)."""

    def __init__(self, net: Network, cfg: OptimConfig, bits: int, balls: bool = False):
        from fpgrad.runlog import record

        record("exact", "exact")
        self.net = net
        if balls:
            from fpgrad.arith.ball import LEVELS, BallArith

            self.ar: Any = BallArith(min(level for level in LEVELS if level >= bits))
        else:
            from fpgrad.arith.arb import ArbArith

            self.ar = ArbArith(bits)
        self.bits = self.ar.bits if balls else bits
        self.params = {k: self.ar.asarray(v) for k, v in net.params.items()}
        self.opt = ArithOptimizer(self.ar, self.params, cfg)
        self.history = History(f"exact@{bits}")
        self.exact_params: list[dict[str, Any]] = []
        self.failed_at: int | None = None  #: the first step the balls could not vouch for
        #: why the ball run gave way to Arb balls (one line, with the step), or None
        self.fallback: str | None = None
        self.grads: dict[str, Any] = {}  #: the last step's gradients (kept for radius_report)

    def vector(self) -> np.ndarray:
        return _flat([self.ar.to_float64(v) for v in self.params.values()])

    def record_initial(self) -> None:
        self.history.params.append(self.vector())
        self.exact_params.append(dict(self.params))

    def step(self, rows: np.ndarray) -> None:
        trace = evaluate(self.net, self.ar, self.params, rows)
        new = self.opt.step(self.params, trace.grads)
        self.grads = trace.grads
        moved = any(_changed(new[k], self.params[k]) for k in new)
        self.params = new
        hist = self.history
        hist.loss.append(float(np.asarray(self.ar.to_float64(trace.loss))))
        g = _flat([self.ar.to_float64(v) for v in trace.grads.values()])
        hist.grad_norm.append(float(np.linalg.norm(g)))
        outs = {k: self.ar.to_float64(v) for k, v in trace.forward.items()}
        hist.dead_units.append(_dead_units(self.net, outs))
        hist.moved.append(moved)
        hist.params.append(self.vector())
        self.exact_params.append(dict(new))
        if self.failed_at is None and self.failed():
            self.failed_at = len(hist.loss)

    def record_final(self, rows: np.ndarray) -> None:
        """Append the loss at the final parameters on ``rows`` (one extra forward pass)."""
        trace = evaluate(self.net, self.ar, self.params, rows)
        self.history.loss.append(float(np.asarray(self.ar.to_float64(trace.loss))))
        if self.failed_at is None and self.failed():  # the balls could not vouch for it
            self.failed_at = len(self.history.loss) - 1

    def digits_now(self) -> float:
        """Certified significant digits of the current parameters (as :meth:`ball_digits`)."""
        return self._digits([self.params])

    def _cap(self) -> int:
        return math.floor(self.bits * math.log10(2))

    def failed(self) -> bool:
        """Multi-word balls could not vouch (a value out of range, a ReLU branch undecided:
        their values are no longer enclosures). Arb balls always enclose."""
        if _is_ball(next(iter(self.params.values()), None)):
            nan = any(
                np.isnan(b.rad).any() or np.isnan(b.mid[0]).any() for b in self.params.values()
            )
            return bool(self.ar.range_errors or self.ar.uncertain_branches or nan)
        return False

    def radius_report(self) -> str:
        """Where the radii stand after the last step, for the fallback line: the widest
        relative radius (radius / |midpoint|, zero midpoints aside) of the gradient, of the
        optimizer's state (momentum buffer; Adam's m and v), of the update and of the
        parameters, each with its parameter's name; multi-word balls only ("" otherwise)."""
        if not _is_ball(next(iter(self.params.values()), None)):
            return ""
        opt = self.opt
        parts = [
            ("gradient", self.grads),
            ("momentum buffer", opt.buf),
            ("m", opt.m),
            ("v", opt.v),
            ("update", opt.update),
            ("parameters", self.params),
        ]
        said = []
        for what, values in parts:
            worst, where = 0.0, ""
            for k, b in values.items():
                m = np.abs(b.mid[0])
                nonzero = m > 0
                top = (
                    float(np.max(np.asarray(b.rad)[nonzero] / m[nonzero])) if nonzero.any() else 0.0
                )
                if top > worst or not where:
                    worst, where = top, k
            if where:
                said.append(f"{what} {worst:.1e} ({where})")
        return "widest relative radii: " + ", ".join(said)

    def ball_digits(self) -> float:
        """Certified significant digits of every parameter at every step, from the radii
        (capped by what the working precision carries; exact zeros do not count, a ball that
        contains 0 otherwise counts as 0 digits)."""
        return self._digits(self.exact_params)

    def unsigned_params(self) -> list[str]:
        """Parameters whose ball contains 0 without being exactly 0 at some step (their
        certified digits count as 0)."""
        from fpgrad.exact import arb_digits, ball_digits

        digits_of = ball_digits if _is_ball(next(iter(self.params.values()), None)) else arb_digits
        names: list[str] = []
        for params in self.exact_params:
            for name, value in params.items():
                if name not in names and digits_of(value, self._cap())[2].any():
                    names.append(name)
        return names

    def _digits(self, steps: list[dict[str, Any]]) -> float:
        from fpgrad.exact import arb_digits, ball_digits

        digits_of = ball_digits if _is_ball(next(iter(self.params.values()), None)) else arb_digits
        worst = float(self._cap())
        for params in steps:
            for value in params.values():
                d, zero, _, _ = digits_of(value, self._cap())
                kept = d[~zero]
                if kept.size:
                    worst = min(worst, float(np.min(kept)))
        return worst


def _few_digits_note(exact: ExactRun, digits: float, method: str, max_bits: int | None) -> str:
    """Why the exact trajectory certifies fewer than 17 digits and which option can help:
    the Arb run stops at its cap (--exact-bits alone cannot pass it); parameters whose balls
    contain 0 are named (a value exactly 0 by cancellation stays unsigned at every precision)."""
    from fpgrad.exact import DEFAULT_MAX_BITS

    cap = DEFAULT_MAX_BITS if max_bits is None else max_bits
    names = exact.unsigned_params()
    where = ""
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        where = (
            f"; balls containing 0 in {shown} (a value exactly 0 by cancellation stays "
            "undetermined at every precision)"
        )
    if method == "arb" and exact.bits >= cap:
        fix = f"raise --exact-max-bits (the Arb run stopped at its cap, {cap} bits)"
    else:
        fix = "raise --exact-bits or use --exact-method arb"
    return f"the exact trajectory certifies only {digits:.1f} digits{where}: {fix}"


def _is_ball(a: Any) -> bool:
    from fpgrad.arith.ball import Ball

    return isinstance(a, Ball)


def _changed(a: Any, b: Any) -> bool:
    if _is_ball(a):
        return bool(np.any(a.mid != b.mid))
    if isinstance(a, np.ndarray) and a.dtype == object:  # Arb balls: midpoints moved
        return any(x.mid() != y.mid() for x, y in zip(a.ravel(), b.ravel(), strict=True))
    return bool(np.any(a != b))


ARB_WATCH_EVERY = 10  #: an Arb run checks its certified digits every this many steps


def arb_bits_for(lost_per_step: float, steps: int, cap: int) -> int:
    """The Arb precision expected to keep 17 certified digits over ``steps`` steps that lose
    ``lost_per_step`` digits each (as measured on a shorter run): 17 digits, 10 more, and a
    quarter more than ``lost_per_step * steps``, in bits, rounded up to a multiple of 64;
    at least :data:`fpgrad.exact.ARB_START_BITS`, at most ``cap``. A forecast, not a
    certificate: the run it starts says itself how many digits it certified."""
    from fpgrad.exact import ARB_START_BITS

    digits = 27 + 1.25 * max(lost_per_step, 0.0) * steps
    bits = 64 * math.ceil(digits / math.log10(2) / 64)
    return min(max(bits, ARB_START_BITS), cap)


def exact_trajectory(
    net: Network,
    cfg: OptimConfig,
    schedule: list[np.ndarray],
    bits: int,
    method: str = "auto",
    progress: bool = False,
    max_bits: int | None = None,
) -> tuple[ExactRun, float, str]:
    """The certified exact run over ``schedule``: (run, certified digits, method).

    ``method="fast"``: multi-word balls (at most 150 bits); ``"arb"``: Arb balls from
    ``max(bits, 256)`` bits; ``"auto"``: fast when ``bits`` <= 150 and the balls vouch for at
    least 17 digits, else Arb balls. A run that certifies fewer than 17 digits stops at that
    step and the trajectory is recomputed in Arb balls at the precision that the digits it
    lost per step forecast for the whole schedule (:func:`arb_bits_for`; at least twice the
    last precision), up to ``max_bits`` (default :data:`fpgrad.exact.DEFAULT_MAX_BITS`), where
    the run goes to the end whatever it certifies. A fall back is announced on stderr in one
    line (the step, the digits, the widest radii), on a terminal or not.
    """
    from fpgrad.arith.ball import MAX_BITS
    from fpgrad.exact import ALIASES, ARB_START_BITS, DEFAULT_MAX_BITS

    cap_bits = DEFAULT_MAX_BITS if max_bits is None else max_bits
    n = len(schedule)

    def steps(run: ExactRun, what: str, watch: bool = False) -> tuple[int | None, float]:
        """Run the schedule; ``watch``: stop at the first checked step (balls: every step;
        Arb: step 1 and every ARB_WATCH_EVERY steps) whose parameters certify fewer than 17
        digits, and return (that step, digits lost per step since step 1)."""
        run.record_initial()
        iterator: Any = schedule
        if progress:
            from tqdm import tqdm

            iterator = tqdm(schedule, desc=f"fpgrad train: exact ({what})", leave=False)
        first: tuple[int, float] | None = None
        # Arb digits cost a Python loop per element: checked every ARB_WATCH_EVERY steps
        every = 1 if _is_ball(next(iter(run.params.values()), None)) else ARB_WATCH_EVERY
        for rows in iterator:
            run.step(rows)
            if run.failed():
                return None, 0.0
            t = len(run.history.loss)
            if watch and (t % every == 0 or t == 1):
                d = run.digits_now()
                first = (t, d) if first is None else first
                if d < 17:
                    return t, (first[1] - d) / max(t - first[0], 1)
        run.record_final(schedule[-1])
        return None, 0.0

    method = ALIASES.get(method, method)
    if method not in ("auto", "fast", "arb"):
        raise InputError(f"unknown exact method {method!r}; use auto, fast or arb")
    fallback = None
    prec = min(max(bits, ARB_START_BITS), cap_bits)
    if method != "arb" and bits <= MAX_BITS:
        run = ExactRun(net, cfg, bits, balls=True)
        low, rate = steps(run, "balls", watch=method == "auto")
        if not run.failed():
            digits = run.ball_digits()
            if digits >= 17 or method == "fast":
                return run, digits, "fast"
            if low is not None:
                prec = max(prec, arb_bits_for(rate, n, cap_bits))
                why = (
                    f"step {low}: {digits:.1f} certified digits, {rate:.2f} lost per step; "
                    f"{run.radius_report()}"
                )
            else:
                why = f"{digits:.1f} certified digits after {n} steps; {run.radius_report()}"
        else:
            why = (
                f"step {run.failed_at}: a value out of 2**-800..2**800, a ReLU input too close "
                "to 0 or a NaN radius"
            )
        if method == "fast":
            raise InputError(
                f"the fast exact run cannot certify this training ({why}); use --exact-method arb"
            )
        fallback = (
            f"the ball exact run cannot vouch ({why}); recomputing in Arb balls at {prec} bits"
        )
        print(f"fpgrad train: {fallback}", file=sys.stderr)
    while True:
        exact = ExactRun(net, cfg, prec)
        exact.fallback = fallback
        low, rate = steps(exact, f"arb {prec} bits", watch=prec < cap_bits)
        if low is None:  # to the end: an unchecked step may still hold fewer than 17 digits
            digits = exact.ball_digits()
            if digits >= 17 or prec >= cap_bits:
                return exact, digits, "arb"
        prec = min(max(2 * prec, arb_bits_for(rate, n, cap_bits)), cap_bits)


def exact_gradient_counts(
    net: Network,
    params: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    precision: str,
    rows: np.ndarray,
    bits: int,
    max_bits: int | None = None,
) -> dict[str, int]:
    """Verdict counts of ``grads`` against the certified exact gradients at the same
    parameters and batch (:func:`fpgrad.exact.exact_trace`, noise around exact zeros removed).

    At non-finite parameters there is no exact gradient: elements are counted as nan or
    overflow by their own values, the rest as ``no_reference``.
    """
    return exact_check(net, params, grads, precision, rows, bits, max_bits)[0]


def _exact_at(
    net: Network, params: dict[str, np.ndarray], rows: np.ndarray, bits: int, max_bits: int | None
) -> Any:
    """The certified exact trace at float64 ``params`` on ``rows``; None at non-finite ones."""
    from fpgrad.exact import DEFAULT_MAX_BITS, exact_trace

    if not all(np.all(np.isfinite(v)) for v in params.values()):
        return None
    wide = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    part = net.with_params(wide).with_data(net.x[rows], net.y[rows])
    cap = DEFAULT_MAX_BITS if max_bits is None else max_bits
    return exact_trace(part, bits, allow_uncertified=True, max_bits=cap)


def _exact_loss(exact: Any) -> float:
    """The exact loss of a certified trace, rounded to float64 (hi + lo)."""
    a = exact.exact_array("loss")
    return float(np.asarray(a.hi, dtype=np.float64).sum() + np.asarray(a.lo).sum())


def exact_loss_at(
    net: Network,
    params: dict[str, np.ndarray],
    rows: np.ndarray,
    bits: int,
    max_bits: int | None = None,
) -> float | None:
    """The certified exact loss at float64 ``params`` on ``rows``; None at non-finite ones."""
    exact = _exact_at(net, params, rows, bits, max_bits)
    return None if exact is None else _exact_loss(exact)


def exact_check(
    net: Network,
    params: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    precision: str,
    rows: np.ndarray,
    bits: int,
    max_bits: int | None = None,
) -> tuple[dict[str, int], float | None]:
    """(:func:`exact_gradient_counts`, the exact loss at ``params`` or None at non-finite
    parameters), from one exact trace."""
    exact = _exact_at(net, params, rows, bits, max_bits)
    if exact is None:
        flat = _flat(list(grads.values()))
        nan, inf = int(np.isnan(flat).sum()), int(np.isinf(flat).sum())
        return {"nan": nan, "overflow": inf, "no_reference": flat.size - nan - inf}, None
    fmt = get_format(precision)
    counts: dict[str, int] = {}
    for k, g in grads.items():
        v = classify(exact.exact_array(f"grads/{k}"), g, fmt)
        found = np.bincount(v.code.ravel(), minlength=len(VERDICTS))
        for name, n in zip(VERDICTS, found.tolist(), strict=True):
            if n:
                counts[name] = counts.get(name, 0) + n
    return counts, _exact_loss(exact)


@dataclass
class TrainResult:
    """Histories of every run and the exact run, with detector verdicts (:func:`train`)."""

    network: str
    config: dict[str, Any]
    runs: list[str]
    histories: dict[str, History]
    exact: History
    exact_certified_digits: float
    detectors: dict[str, dict[str, Any]]
    distance: dict[str, list[float]]
    notes: list[str] = field(default_factory=list)
    #: per run: the plan it computed with (:meth:`fpgrad.policy.Plan.to_dict`)
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from fpgrad.jsonutil import jsonable

        def hist(h: History, exact: bool = False) -> dict[str, Any]:
            d: dict[str, Any] = {
                "loss": h.loss,
                "grad_norm": h.grad_norm,
                "dead_units": h.dead_units,
                "moved": h.moved,
            }
            if not exact:
                d.update(
                    swamped=h.swamped,
                    updated=h.updated,
                    nonfinite=h.nonfinite,
                    skipped=h.skipped,
                    loss_scale=h.scale,
                    distance_to_exact=self.distance[h.label],
                    verdicts={str(k): v for k, v in sorted(h.verdicts.items())},
                    first_overflow=h.overflow_place,
                    exact_loss_at_params={
                        str(k): v for k, v in sorted(h.exact_loss_at_params.items())
                    },
                )
            return d

        return jsonable(
            {
                "schema": "fpgrad.train/1",
                "network": self.network,
                "config": self.config,
                "exact": {
                    "bits": self.config["exact_bits"],
                    "certified_digits": self.exact_certified_digits,
                    **hist(self.exact, exact=True),
                },
                "runs": {
                    r: {
                        **hist(self.histories[r]),
                        "detectors": self.detectors[r],
                        "policy": self.plans.get(r),
                    }
                    for r in self.runs
                },
                "notes": self.notes,
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def render(self) -> str:
        from fpgrad.render import render_training

        return render_training(self)

    def plot(self, out_dir: str) -> list[str]:
        from fpgrad.report.plots import training_plots

        return training_plots(self, out_dir)


def train(
    net: Network,
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
    ``exact_max_bits``: the cap of its precision escalation (default 8192).
    """
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
    from fpgrad.dynamics import (
        detect_cycle,
        detect_diverged,
        detect_divergence,
        detect_loss_floor,
        detect_stall,
        relative_distance,
        without_false_calm,
    )
    from fpgrad.exact import MIN_BITS

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
        h = run.history
        distance[label] = relative_distance(h.params, exact.history.params)
        twin_sep = (
            relative_distance(twins[label].history.params, h.params) if label in twins else None
        )
        detectors[label] = {
            "stall": detect_stall(h.moved, exact.history.moved, stall_k),
            "loss_floor": detect_loss_floor(h.loss, exact.history.loss),
            "limit_cycle": detect_cycle(h.state_hash),
            "divergence": detect_divergence(distance[label], twin_sep),
            "first_overflow": _with_cause(h.overflow_place, cfg, spec_of[label]),
            "swamped_fraction": _swamped_fraction(h),
            "diverged": detect_diverged(h.params),
        }
        detectors[label] = without_false_calm(detectors[label])
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


def _with_cause(
    place: dict[str, Any] | None, cfg: OptimConfig, spec: RunSpec
) -> dict[str, Any] | None:
    """The first non-finite value with the optimizer cause that explains it, if one does:
    Adam's eps rounding to 0 in the format of the optimizer state (then a zero second moment
    gives 0/0), or the second moment ``(1 - beta2) g^2`` underflowing (then the step is m/eps),
    each with its fix; else an update that overflowed the format."""
    if place is None:
        return None
    from fpgrad.policy import format_of
    from fpgrad.rounding import round_to

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


def _plan_dict(net: Network, spec: RunSpec) -> dict[str, Any]:
    """The run's plan, with fp32 master weights named when +master keeps them."""
    d = spec.plan(net).to_dict()
    if spec.master:
        d["summary"] += "; float32 master weights"
        d["master"] = "float32"
        d["uniform"] = False
    return d


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
