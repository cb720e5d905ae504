"""The loss-scale advisor (:mod:`fpgrad.diagnose.advisor`) on a captured model.

The advisor's logic is reused as is (:func:`fpgrad.diagnose.advisor.advice_from_values`); this module
supplies its inputs from the graph: the certified exact gradients (those a policy computes
in the format, from the dtype torch computed each in), the seed dL/dL = 1, and torch's real
backward of S * loss at each scale (:func:`fpgrad.graph.native.native_run`, natively, or the
policy's run). Backward signals are not judged on captured models (``scope="all"`` is refused).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from fpgrad.diagnose.advisor.advice import Advice
from fpgrad.diagnose.advisor.core import advice_from_values
from fpgrad.diagnose.advisor.measure import _TorchMeasure
from fpgrad.diagnose.advisor.scales import SCOPES, TORCH_FORMATS, _Limits, _Values
from fpgrad.errors import InputError
from fpgrad.graph.exact import exact_graph
from fpgrad.graph.native import native_run
from fpgrad.graph.policy import GraphPlan, resolve
from fpgrad.numbers.formats import get_format
from fpgrad.reference.exact import DEFAULT_BITS, DEFAULT_MAX_BITS, ExactResult

if TYPE_CHECKING:
    from fpgrad.graph.network import GraphNetwork


class _GraphMeasure(_TorchMeasure):
    """torch's backward of S * loss on the captured model (as the layer advisor measures)."""

    def __init__(
        self, net: GraphNetwork, precision: str, exact: Any, names: list[str], fmts: list[str],
        plan: GraphPlan | None,
    ) -> None:  # fmt: skip
        self.graph, self.precision, self.plan, self.names = net.graph, precision, plan, names
        self.exact = [exact.exact_array(f"grads/{k}") for k in names]
        self.fmts = [get_format(f) for f in fmts]
        self.cache: dict[int, list[np.ndarray]] = {}

    def grads(self, k: int) -> list[np.ndarray]:
        if k not in self.cache:
            tr = native_run(
                self.graph, self.precision, keep=False, loss_scale=math.ldexp(1.0, k),
                plan=self.plan,
            )  # fmt: skip
            self.cache[k] = [tr.grads[n] for n in self.names]
        return self.cache[k]


def advise_graph(
    net: GraphNetwork,
    fmt: str | None = None,
    bits: int = DEFAULT_BITS,
    *,
    policy: str | None = None,
    scope: str = "gradients",
    headroom: int = 3,
    exponents: tuple[int, int] | None = None,
    measure: bool = True,
    allow_uncertified: bool = False,
    exact_max_bits: int = DEFAULT_MAX_BITS,
    progress: bool | None = None,
    exact: ExactResult | None = None,
) -> Advice:
    """Loss-scale advice for a captured model in ``fmt`` (default float16, or a policy's
    narrowest format); with ``policy`` only the gradients it computes in ``fmt`` are judged.
    ``exact``: a certified trace of this same graph (``exact_graph(...).result``), reused."""
    if scope not in SCOPES:
        raise InputError(f"unknown scope {scope!r}; use gradients or all")
    if scope == "all":
        raise InputError(
            "captured models are advised on their gradients only (backward signals are not "
            "collected yet); drop --signals"
        )
    if not isinstance(headroom, int) or headroom < 0:
        raise InputError(f"headroom must be a non-negative integer of binades (got {headroom!r})")
    plan = None
    if policy is not None:
        from fpgrad.model.policy import require_policy

        plan = resolve(require_policy(policy, net.policies), net.graph)
    names = net.param_names
    if plan is not None:  # which format torch computed each gradient in (an unscaled run)
        trace = native_run(net.graph, plan.policy, keep=False, plan=plan)
        formats = [trace.formats[f"grads/{n}"] for n in names]
        if fmt is None:
            fmt = min(set(formats), key=lambda n: (get_format(n).bits, get_format(n).precision))
    fmt = fmt or "float16"
    f = get_format(fmt)
    if f.exp_bits > 8:
        raise InputError(
            f"{f.name} needs no loss scale (its range covers every exact gradient here); "
            "advise for float16, bfloat16 or an 8-bit format"
        )
    if plan is None:
        formats = [f.name] * len(names)
    if exact is None:  # else: a certified trace of this same graph, reused
        exact = exact_graph(net.graph, bits, allow_uncertified, max_bits=exact_max_bits).result
    judged = [n for n, g in zip(names, formats, strict=True) if g == f.name]
    grads = _Values.of([exact.exact_array(f"grads/{n}") for n in judged])
    signals = _Values.of([])
    loss_fmt = f.name if plan is None else trace.formats.get("loss", plan.params)
    n_seed = 1 if loss_fmt == f.name else 0
    seed = _Values(np.ones(n_seed), np.zeros(n_seed), 0)
    measurer = None
    if measure and f.name in TORCH_FORMATS:
        precision = f.name if plan is None else plan.policy
        measurer = _GraphMeasure(net, precision, exact, names, formats, plan)
    note = None
    if plan is not None:
        note = (
            f"policy {plan.policy} ({plan.describe()}): judged are the gradients torch computed "
            f"in {f.name}: {', '.join(judged) or 'none'}"
            + ("; the seed" if n_seed else "")
            + ("; measured: torch running the policy" if measurer is not None else "")
        )
    _Limits.of(f)  # the format's thresholds exist (raises for formats without them)
    advice = advice_from_values(
        net.name, f, exact, bits, grads, signals, seed, measurer, scope=scope,
        headroom=headroom, exponents=exponents, measure=measure, progress=progress,
        policy=plan.policy if plan is not None else None, policy_note=note,
    )  # fmt: skip
    advice.notes.append(
        "captured model: gradients and the seed are judged; backward signals are not collected"
    )
    return advice
