"""torch's real backward at each loss scale, and where GradScaler's rules settle."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fpgrad.diagnose.advisor.scales import (
    _Limits,
)
from fpgrad.diagnose.verdicts import ExactArray, classify
from fpgrad.model.network import Network
from fpgrad.model.policy import Plan
from fpgrad.numbers.formats import get_format


class _TorchMeasure:
    """torch's real backward at a loss scale, as fpgrad.training computes it (loss * S, backward):
    in one precision, or running a policy's plan."""

    def __init__(
        self, net: Network, precision: str, exact: Any, lim: _Limits, plan: Plan | None = None
    ):
        from fpgrad.run.torch_native import TorchModel

        self.net = net
        self.model = TorchModel(net, plan or Plan.uniform(net, precision))
        self.params = list(self.model.named_params().values())
        self.exact = [exact.exact_array(f"grads/{k}") for k in net.params]
        # the format each gradient is computed in (a dense layer's: its compute format)
        self.fmts = [
            get_format(lp.params or lp.compute)
            for ly, lp in zip(net.layers, self.model.plan.layers, strict=True)
            for _ in ly.params
        ]
        self.cache: dict[int, list[np.ndarray]] = {}

    def grads(self, k: int) -> list[np.ndarray]:
        if k not in self.cache:
            from fpgrad.run.torch_native import one_torch_thread

            with one_torch_thread():
                for p in self.params:
                    p.grad = None
                h = self.model.inputs(self.net)
                for index in range(len(self.net.layers)):
                    h = self.model.layer(index, h)
                loss = self.model.loss(self.net, h)
                scale = math.ldexp(1.0, k)
                (loss * scale if scale != 1.0 else loss).backward()
                self.cache[k] = [
                    p.grad.detach().double().numpy().copy()
                    if p.grad is not None
                    else np.zeros(tuple(p.shape))
                    for p in self.params
                ]
        return self.cache[k]

    def at(self, k: int) -> dict[str, int]:
        out = {"rounding_zero": 0, "underflow": 0, "lost": 0, "nonfinite": 0}
        for ex, g, fmt in zip(self.exact, self.grads(k), self.fmts, strict=True):
            scaled = ExactArray(np.ldexp(ex.hi, k), np.ldexp(ex.lo, k), ex.zero)
            v = classify(scaled, g, fmt)
            rz = v.verdict == "rounding_zero"
            out["rounding_zero"] += int(rz.sum())
            out["underflow"] += int((rz & (v.subkind == "underflow")).sum())
            out["lost"] += int((rz & (v.subkind == "lost")).sum())
            out["nonfinite"] += int(np.isin(v.verdict, ("overflow", "nan")).sum())
        return out

    def dynamic(self, max_steps: int = 200) -> dict[str, Any]:
        """Where torch.amp.GradScaler's rules settle at these parameters: start at 2^16, halve
        and skip on inf/NaN; growth needs 2000 clean steps, so the first clean scale stays."""
        from fpgrad.run.scaling import DynamicScaler

        scaler = DynamicScaler()
        start = int(math.log2(scaler.scale))
        history = []
        for _ in range(max_steps):
            k = int(math.log2(scaler.scale))
            finite = all(bool(np.all(np.isfinite(g))) for g in self.grads(k))
            history.append({"exponent": k, "finite": finite})
            if scaler.update(finite):
                break
        return {
            "start": start,
            "settled": int(math.log2(scaler.scale)),
            "skipped": sum(not h["finite"] for h in history),
            "steps": history,
        }
