"""Optimizers with torch.optim's exact formulas, in any number system.

:class:`TorchOptimizer` updates torch tensors in place and reproduces torch.optim.SGD and
torch.optim.Adam/AdamW (single-tensor CPU path) bit for bit, state kept in the parameters'
dtype; it also applies an update with stochastic rounding or Kahan compensation. The same
formulas over :class:`~fpgrad.arith.base.Arith` drive the exact run (:class:`ArithOptimizer`).

SGD (heavy ball, as torch.optim.SGD, dampening 0):
    d = g + wd * w  (L2; decoupled: w *= 1 - lr * wd first);  buf = momentum * buf + d
    (buf = d on the first step);  w -= lr * buf
Adam (as torch.optim.Adam; decoupled weight decay as AdamW):
    m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2
    w -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fpgrad.arith.base import Arith
from fpgrad.errors import InputError
from fpgrad.numbers.formats import get_format
from fpgrad.numbers.rounding import Mode, round_to

OPTIMIZERS = ("sgd", "adam")
UPDATE_MODES = ("nearest", "stochastic", "kahan")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters (float64 values, converted by each run as torch does)."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    decoupled: bool = False  #: AdamW-style decoupled weight decay (w *= 1 - lr*wd)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.name!r}; use sgd or adam")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"learning rate must be positive and finite (got {self.lr})")
        if not 0 <= self.momentum < 1:
            raise InputError(f"momentum must be in [0, 1) (got {self.momentum})")
        if self.name == "adam" and self.momentum:
            raise InputError(
                f"momentum {self.momentum} is SGD's: torch.optim.Adam has none (its first "
                f"moment's decay is beta1 = {self.beta1}); drop --momentum or use --optimizer sgd"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(f"weight decay must be >= 0 (got {self.weight_decay})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise InputError("Adam needs 0 <= beta1, beta2 < 1 and eps > 0")


class TorchOptimizer:
    """torch.optim's update on a list of tensors; ``intended`` keeps the last update in float64.

    ``update="nearest"`` applies ``w.add_(d, alpha=-lr)`` exactly as torch.optim does (one
    rounding of w - lr*d); ``"stochastic"`` rounds the float64 value w - lr*d stochastically
    into the dtype (seeded); ``"kahan"`` keeps a compensation term in the dtype.
    """

    def __init__(
        self, params: list[torch.Tensor], cfg: OptimConfig, update: str = "nearest", seed: int = 0
    ) -> None:
        if update not in UPDATE_MODES:
            raise InputError(f"unknown update rounding {update!r}; use {', '.join(UPDATE_MODES)}")
        self.params = params
        self.cfg = cfg
        self.update = update
        self.rng = np.random.default_rng(seed)
        self.steps = 0
        self.buf: list[torch.Tensor | None] = [None] * len(params)
        self.m = [torch.zeros_like(p) for p in params] if cfg.name == "adam" else []
        self.v = [torch.zeros_like(p) for p in params] if cfg.name == "adam" else []
        self.comp = [torch.zeros_like(p) for p in params] if update == "kahan" else []
        self.intended: list[np.ndarray] = [np.zeros(tuple(p.shape)) for p in params]

    def state_bytes(self) -> bytes:
        """The optimizer state, for exact recurrence detection."""
        tensors = [b for b in self.buf if b is not None] + [*self.m, *self.v, *self.comp]
        return b"".join(t.to(torch.float64).numpy().tobytes() for t in tensors)  # exact widening

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        cfg = self.cfg
        self.steps += 1
        for i, (w, g) in enumerate(zip(self.params, grads, strict=True)):
            if cfg.decoupled and cfg.weight_decay:
                w.mul_(1 - cfg.lr * cfg.weight_decay)
            elif cfg.weight_decay:
                g = g.add(w, alpha=cfg.weight_decay)
            if cfg.name == "sgd":
                d = g
                if cfg.momentum:
                    if self.buf[i] is None:
                        self.buf[i] = g.clone()
                    else:
                        self.buf[i].mul_(cfg.momentum).add_(g)  # type: ignore[union-attr]
                    d = self.buf[i]  # type: ignore[assignment]
                self._apply(i, w, d, None, -cfg.lr)
            else:
                self.m[i].lerp_(g, 1 - cfg.beta1)
                self.v[i].mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
                bc1 = 1 - cfg.beta1**self.steps
                bc2_sqrt = (1 - cfg.beta2**self.steps) ** 0.5
                denom = (self.v[i].sqrt() / bc2_sqrt).add_(cfg.eps)
                self._apply(i, w, self.m[i], denom, -cfg.lr / bc1)

    def _apply(
        self, i: int, w: torch.Tensor, d: torch.Tensor, denom: torch.Tensor | None, alpha: float
    ) -> None:
        d64 = d.to(torch.float64)
        if denom is not None:
            d64 = d64 / denom.to(torch.float64)
        self.intended[i] = (alpha * d64).numpy().copy()  # the update the optimizer asks for
        if self.update == "nearest":
            if denom is None:
                w.add_(d, alpha=alpha)
            else:
                w.addcdiv_(d, denom, value=alpha)
            return
        name = {
            torch.float16: "float16",
            torch.bfloat16: "bfloat16",
            torch.float32: "float32",
            torch.float64: "float64",
        }[w.dtype]
        if self.update == "stochastic":
            target = w.to(torch.float64).numpy() + self.intended[i]
            rounded = round_to(target, get_format(name), Mode.STOCHASTIC, rng=self.rng)
            w.copy_(torch.from_numpy(rounded).to(w.dtype))
            return
        # Kahan: y = u - c; t = w + y; c = (t - w) - y; w = t, every op in the dtype
        u = torch.from_numpy(round_to(self.intended[i], get_format(name))).to(w.dtype)
        y = u - self.comp[i]
        t = w + y
        self.comp[i] = (t - w) - y
        w.copy_(t)


class ArithOptimizer:
    """The same formulas over an Arith (the exact run). State lives in that number system."""

    def __init__(
        self, ar: Arith, params: dict[str, Any], cfg: OptimConfig, fused: bool = False
    ) -> None:
        self.ar = ar
        self.cfg = cfg
        self.fused = fused  #: w - a*d with one rounding (ar.fma), as torch's add_/addcdiv_
        self.intended: dict[str, np.ndarray] = {}  #: fused: the last update in float64
        #: not fused: the last update ``lr * d`` (Adam: ``lr / bc1 * m / denom``) per parameter,
        #: in the machine (kept to say which quantity's radius grew)
        self.update: dict[str, Any] = {}
        self.steps = 0
        self.buf: dict[str, Any] = {}
        zeros = {k: ar.mul(v, ar.const(0.0)) for k, v in params.items()}
        self.m = dict(zeros) if cfg.name == "adam" else {}
        self.v = dict(zeros) if cfg.name == "adam" else {}
        # beta**t as t products in a row; a deterministic machine keeps the last power (the
        # same products, so the same values) instead of redoing t products per parameter
        self._powers: dict[float, tuple[int, Any]] = {}
        self._keep_powers = not getattr(ar, "stochastic", False)

    def step(self, params: dict[str, Any], grads: dict[str, Any]) -> dict[str, Any]:
        ar, cfg = self.ar, self.cfg
        self.steps += 1
        lr = ar.const(cfg.lr)
        out = {}
        for k, w in params.items():
            g = grads[k]
            if cfg.decoupled and cfg.weight_decay:
                w = ar.mul(w, ar.sub(ar.const(1.0), ar.mul(lr, ar.const(cfg.weight_decay))))
            elif cfg.weight_decay:
                g = ar.add(g, ar.mul(w, ar.const(cfg.weight_decay)))
            if cfg.name == "sgd":
                if cfg.momentum:
                    prev = self.buf.get(k)
                    self.buf[k] = (
                        g if prev is None else ar.add(ar.mul(prev, ar.const(cfg.momentum)), g)
                    )
                    g = self.buf[k]
                if self.fused:
                    out[k] = self._update(k, w, g, None, cfg.lr)
                else:
                    self.update[k] = ar.mul(lr, g)
                    out[k] = ar.sub(w, self.update[k])
                continue
            b1, b2 = ar.const(cfg.beta1), ar.const(cfg.beta2)
            one = ar.const(1.0)
            fast = None if self.fused else getattr(ar, "adam_update", None)
            if fast is not None:  # the same operations in one pass (Arb balls)
                bc1 = ar.sub(one, self._power(b1, cfg.beta1, self.steps))
                bc2 = ar.sub(one, self._power(b2, cfg.beta2, self.steps))
                scalars = [b1, ar.sub(one, b1), b2, ar.sub(one, b2), ar.sqrt(bc2)]
                done = fast(
                    self.m[k], self.v[k], g, w, [*scalars, ar.const(cfg.eps), ar.div(lr, bc1)]
                )
                if done is not None:
                    self.m[k], self.v[k], self.update[k], out[k] = done
                    continue
            self.m[k] = ar.add(ar.mul(self.m[k], b1), ar.mul(g, ar.sub(one, b1)))
            self.v[k] = ar.add(ar.mul(self.v[k], b2), ar.mul(ar.mul(g, g), ar.sub(one, b2)))
            bc1 = ar.sub(one, self._power(b1, cfg.beta1, self.steps))
            bc2 = ar.sub(one, self._power(b2, cfg.beta2, self.steps))
            denom = ar.add(ar.div(ar.sqrt(self.v[k]), ar.sqrt(bc2)), ar.const(cfg.eps))
            if self.fused:
                rate = cfg.lr / (1 - cfg.beta1**self.steps)
                out[k] = self._update(k, w, self.m[k], denom, rate)
            else:
                self.update[k] = ar.mul(ar.div(lr, bc1), ar.div(self.m[k], denom))
                out[k] = ar.sub(w, self.update[k])
        return out

    def state_bytes(self) -> bytes:
        """The optimizer state as float64 bytes (strict machines: float64 arrays)."""
        arrays = [*self.buf.values(), *self.m.values(), *self.v.values()]
        return b"".join(np.asarray(self.ar.to_float64(a)).tobytes() for a in arrays)

    def _update(self, k: str, w: Any, d: Any, denom: Any, rate: float) -> Any:
        """w - rate * d (/ denom) with one rounding of the update, as torch's kernels; the
        rate is a float64 number, as torch passes it, converted by the machine."""
        ar = self.ar
        if denom is not None:
            d = ar.div(d, denom)
        d64 = np.asarray(ar.to_float64(d), dtype=np.float64)
        self.intended[k] = -rate * d64
        return ar.fma(ar.const(-rate), d, w)  # type: ignore[attr-defined]

    def _power(self, base: Any, beta: float, n: int) -> Any:
        """base**n (base: the machine's ``beta``) as n products in a row from 1, resumed from
        the last power when kept."""
        ar = self.ar
        done, out = self._powers.get(beta, (0, None)) if self._keep_powers else (0, None)
        if out is None or done > n:
            done, out = 0, ar.const(1.0)
        for _ in range(n - done):
            out = ar.mul(out, base)
        if self._keep_powers:
            self._powers[beta] = (n, out)
        return out
