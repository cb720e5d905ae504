"""A run in torch: the network as torch modules, real autograd, torch.optim's formulas."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch

from fpgrad.model.network import Network
from fpgrad.run.optim import OptimConfig, TorchOptimizer
from fpgrad.run.scaling import DynamicScaler, StaticScaler
from fpgrad.run.torch_native import TorchModel
from fpgrad.training.history import History, _dead_units, _flat
from fpgrad.training.runs import RunSpec


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


class _TorchState(_Run):
    """What a run trained by torch keeps besides its module: the float32 master copies
    (``+master``), the optimizer over what it updates, the loss scaler, the format of the
    gradients it judges and its history. ``params``: the tensors the forward pass uses."""

    params: list[torch.Tensor]
    spec: RunSpec

    def _init_state(self, spec: RunSpec, cfg: OptimConfig, seed: int) -> None:
        self.master = (
            [p.detach().to(torch.float32).clone() for p in self.params] if spec.master else None
        )
        self.opt = TorchOptimizer(self.targets(), cfg, spec.update, seed)
        self.scaler: DynamicScaler | StaticScaler | None = None
        if spec.dynamic:
            self.scaler = DynamicScaler()
        elif spec.loss_scale is not None:
            self.scaler = StaticScaler(spec.loss_scale)
        self.grad_format = "float32" if spec.master else spec.precision
        self.history = History(spec.label)

    def targets(self) -> list[torch.Tensor]:
        """The tensors the optimizer updates (float32 masters or the parameters)."""
        return self.master if self.master is not None else self.params

    def vector(self) -> np.ndarray:
        return _flat([t.detach().to(torch.float64).numpy() for t in self.targets()])

    def low_vector(self) -> np.ndarray:
        """The parameters the forward pass uses, flattened to float64."""
        return _flat([p.detach().to(torch.float64).numpy() for p in self.params])

    def _unscaled(self, scale: float) -> tuple[list[torch.Tensor], bool]:
        """The parameters' gradients after a backward of ``scale * loss``, unscaled (in float32
        with master weights, as GradScaler), and whether all are finite."""
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in self.params]
        if self.master is not None:
            grads = [g.to(torch.float32) for g in grads]
        if scale != 1.0:
            grads = [g * (1.0 / scale) for g in grads]
        return grads, all(bool(torch.isfinite(g).all()) for g in grads)

    def _update(
        self,
        names: list[str],
        grads: list[torch.Tensor],
        finite: bool,
        loss: torch.Tensor,
        scale: float,
        outputs: dict[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        """The scaler's decision, the optimizer step (masters rounded back into the parameters:
        one correct rounding), the step recorded; the unscaled gradients in float64."""
        take = self.scaler.update(finite) if self.scaler is not None else True
        before = self.vector()
        if take:
            self.opt.step(grads)
        if self.master is not None:
            with torch.no_grad():
                for low, high in zip(self.params, self.master, strict=True):
                    low.copy_(high.to(low.dtype))
        g64 = {k: g.detach().to(torch.float64).numpy() for k, g in zip(names, grads, strict=True)}
        intended = _flat(self.opt.intended) if take else None
        loss64 = float(loss.detach().to(torch.float64))
        self._record(loss64, g64, intended, before, finite, take, scale, outputs)
        return g64


class TorchRun(_TorchState):
    """One precision with its policies, trained with torch autograd."""

    def __init__(
        self, net: Network, spec: RunSpec, cfg: OptimConfig, seed: int, perturb: bool = False
    ):
        from fpgrad.run.runlog import policy_how, record

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
        self._init_state(spec, cfg, seed)

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
        grads, finite = self._unscaled(scale)
        return self._update(list(net.params), grads, finite, loss, scale, outputs)

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
    from fpgrad.diagnose.comparison import places

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
