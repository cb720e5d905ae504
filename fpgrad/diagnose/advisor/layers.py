"""The advisor on a layer network (a captured model goes to :mod:`fpgrad.graph.advise`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fpgrad.diagnose.advisor.advice import Advice
from fpgrad.diagnose.advisor.core import advice_from_values
from fpgrad.diagnose.advisor.measure import _TorchMeasure
from fpgrad.diagnose.advisor.scales import (
    SCOPES,
    TORCH_FORMATS,
    _Limits,
    _Values,
)
from fpgrad.errors import InputError
from fpgrad.graph.layers import exact_trace
from fpgrad.model.network import Network
from fpgrad.model.policy import Plan, format_of
from fpgrad.numbers.formats import get_format
from fpgrad.reference.exact import DEFAULT_BITS, DEFAULT_MAX_BITS, ExactResult


def _in_format(net: Network, plan: Plan | None, fmt: str) -> dict[str, Any]:
    """Layers whose parameter gradients, outputs (and so backward signals) and loss the plan
    computes in ``fmt``; everything without a plan."""
    if plan is None:
        names = {ly.name for ly in net.layers}
        return {"params": names, "out": names, "loss": True}

    def same(p: str | None) -> bool:
        return p is not None and format_of(p).name == fmt

    return {
        "params": {lp.layer for lp in plan.layers if same(lp.params)},
        "out": {lp.layer for lp in plan.layers if same(lp.output)},
        "loss": same(plan.loss),
    }


def _sizes_text(in_f: dict[str, Any]) -> str:
    params = ", ".join(sorted(in_f["params"])) or "none"
    return f"gradients of {params}; signals of {len(in_f['out'])} layer(s)" + (
        "; the seed" if in_f["loss"] else ""
    )


def advise(
    net: Network,
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
    exact: ExactResult | None = None,
    progress: bool | None = None,
    values_cache: dict[tuple[str, ...], Any] | None = None,
) -> Advice:
    """Loss-scale advice for ``net`` in the format ``fmt`` (see the module docstring).

    ``scope``: "gradients" (underflow of parameter gradients decides the safe range) or "all"
    (backward signals too). ``exponents``: the table's rows (lo, hi) as powers of two; default
    around the safe range. ``measure``: torch's backward at each row's scale and the dynamic
    scaler (torch formats only). ``fmt`` defaults to float16, or with a precision ``policy``
    (``autocast``, a network file's own) to its narrowest format: only values the policy
    computes in ``fmt`` are judged (gradients of layers computing in it, signals output in it,
    the seed if the loss is), and torch is measured running the policy. ``exact``: a
    precomputed ``exact_trace(net, bits)`` of this same network, reused. ``progress``: bars on
    stderr for phases over 2 s (None: when stderr is a terminal). ``values_cache``: a dict
    shared by calls with the same ``exact`` (the sorted magnitudes of each group of keys are
    built once; compare's diagnosis advises float16 and bfloat16 on one trace). A captured model
    (:func:`fpgrad.from_module`) is advised by :func:`fpgrad.graph.advise.advise_graph`.
    """
    from fpgrad.diagnose import api_args

    api_args.check_network(net, "advise")
    if fmt is not None and not isinstance(fmt, str):
        get_format(fmt)  # the one-line refusal of a name that is not a string
    api_args.check_int(bits, "bits", "advise")
    api_args.check_exponents(exponents, "advise")
    if not isinstance(net, Network):
        from fpgrad.graph.advise import advise_graph

        return advise_graph(
            net, fmt, bits, policy=policy, scope=scope, headroom=headroom, exponents=exponents,
            measure=measure, allow_uncertified=allow_uncertified, exact_max_bits=exact_max_bits,
            progress=progress,
        )  # fmt: skip
    plan = None
    if policy is not None:
        from fpgrad.model.policy import require_policy

        plan = require_policy(policy, net.policies).resolve(net)
    if fmt is None:
        fmt = plan.lowest().split(":")[0] if plan is not None else "float16"
    if scope not in SCOPES:
        raise InputError(f"unknown scope {scope!r}; use gradients or all")
    if not isinstance(headroom, int) or headroom < 0:
        raise InputError(f"headroom must be a non-negative integer of binades (got {headroom!r})")
    f = get_format(fmt)
    if f.exp_bits > 8:
        raise InputError(
            f"{f.name} needs no loss scale (its range covers every exact gradient here); "
            "advise for float16, bfloat16 or an 8-bit format"
        )
    if exact is None:
        exact = exact_trace(
            net,
            bits,
            allow_uncertified=allow_uncertified,
            max_bits=exact_max_bits,
            progress=progress,
        )
    in_f = _in_format(net, plan, f.name)

    def values(keys: list[str]) -> _Values:
        if values_cache is None:
            return _Values.of([exact.exact_array(k) for k in keys])
        if tuple(keys) not in values_cache:
            values_cache[tuple(keys)] = _Values.of([exact.exact_array(k) for k in keys])
        return values_cache[tuple(keys)]

    grads = values(
        [
            f"grads/{ly.name}.{p}"
            for ly in net.layers
            if ly.name in in_f["params"]
            for p in ly.params
        ]
    )
    signals = values([f"backward/{ly.name}" for ly in net.layers if ly.name in in_f["out"]])
    n_seed = 1 if in_f["loss"] else 0  # dL/dL = 1: the backward pass starts at S
    seed = _Values(np.ones(n_seed), np.zeros(n_seed), 0)
    lim = _Limits.of(f)
    measurer = (
        _TorchMeasure(net, f.name, exact, lim, plan)
        if measure and f.name in TORCH_FORMATS and (plan is None or not plan.emulated)
        else None
    )
    policy_note = None
    if plan is not None:
        policy_note = (
            f"policy {plan.policy} ({plan.describe()}): judged are the values it computes in "
            f"{f.name}: {_sizes_text(in_f)}"
            + ("; measured: torch running the policy" if measurer is not None else "")
        )
    return advice_from_values(
        net.name, f, exact, bits, grads, signals, seed, measurer, scope=scope,
        headroom=headroom, exponents=exponents, measure=measure, progress=progress,
        policy=plan.policy if plan is not None else None, policy_note=policy_note,
    )  # fmt: skip
