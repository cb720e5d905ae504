"""Precision names to runnable number systems.

``float16``, ``bfloat16``, ``float32``, ``float64``: torch dtypes with real autograd (native).
``exact`` names the certified reference, which every comparison computes anyway.

Any other format of the catalogue or a custom ``eXmY`` (``fp8_e4m3``, ``fp8_e5m2``, ``tf32``,
``e5m7``) names the strict emulated machine of :mod:`fpgrad.arith.emulated`; so does a native
format with the qualifier ``:emulated``. Qualifiers, in any order after the format:

- ``:emulated`` (implied by every other qualifier and by a non-native format);
- an accumulation for dot products and sums: ``:fp32`` (default: exact products, float32
  accumulator, one rounding), ``:per_op`` (round every product and every add, left to right)
  or ``:exact`` (one rounding of the exact sum);
- a rounding mode for every operation (default ``nearest_even``): ``:stochastic`` (seed 0),
  ``:toward_zero``, ``:up``, ``:down``, ... (see :class:`~fpgrad.numbers.rounding.Mode`).

Names are canonical: the format's catalogue name, ``:emulated`` for a native format, then the
non-default qualifiers (``fp16:emulated:fp32`` is ``float16:emulated``).

>>> [p.name for p in parse_precisions("float16,e5m2,bf16:per_op,tf32:stochastic")]
['float16', 'fp8_e5m2', 'bfloat16:emulated:per_op', 'tf32:stochastic']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fpgrad.arith.base import Arith
from fpgrad.errors import InputError
from fpgrad.model.network import Network
from fpgrad.model.policy import BUILTIN, Plan, Policy, format_of, get_policy
from fpgrad.model.precision_names import ACCUMULATIONS, DEFAULT_ACCUMULATION, parse_name
from fpgrad.numbers.formats import CATALOGUE, NATIVE, Format, get_format
from fpgrad.numbers.rounding import Mode
from fpgrad.run.evaluate import Trace

DEFAULT_PRECISIONS = ("float16", "bfloat16", "float32", "float64")
EMULATED_SEED = 0  #: seed of the generator of stochastic rounding (one per evaluation)


@dataclass(frozen=True)
class Precision:
    """A named way to evaluate a network: a format and the machine that computes in it."""

    name: str
    fmt: Format
    kind: str  #: "native" (torch kernels) or "emulated" (strict machine, fpgrad.arith.emulated)
    runner: Callable[[Network, str, float], Trace] = field(repr=False)
    accumulation: str | None = None  #: emulated: "fp32", "per_op" or "exact"
    mode: Mode = Mode.NEAREST_EVEN  #: emulated: rounding mode of every operation
    policy: Policy | None = None  #: kind "policy": the precision policy it runs

    def run(self, net: Network, loss_scale: float = 1.0) -> Trace:
        """Forward and backward; with ``loss_scale`` S the backward starts from S * loss."""
        from fpgrad.run.runlog import policy_how, record

        if self.policy is not None:
            how = policy_how(self.policy.autocast_device, self.policy.resolve(net).emulated)
        else:
            how = self.kind
        record(self.name, how)
        return self.runner(net, self.name, loss_scale)

    def plan(self, net: Network) -> Plan:
        """What each layer of ``net`` computes in (uniform for a plain precision)."""
        if self.policy is not None:
            return self.policy.resolve(net)
        return Plan.uniform(net, self.name)

    def format_of(self, key: str, trace: Trace) -> Format:
        """The format the value ``key`` of ``trace`` was in."""
        name = trace.formats.get(key)
        return format_of(name) if name else self.fmt


def _native_runner(net: Network, name: str, loss_scale: float = 1.0) -> Trace:
    from fpgrad.run.torch_native import (
        torch_trace,  # torch import deferred: CLI start-up stays fast
    )

    return torch_trace(net, name, loss_scale)


def emulated_systems(seed: int = EMULATED_SEED) -> Callable[[str], Arith]:
    """Emulated precision name -> its strict machine (one per name, stochastic ones seeded)."""
    from fpgrad.arith.emulated import EmulatedArith

    made: dict[str, Arith] = {}

    def system(name: str) -> Arith:
        if name not in made:
            p = get_precision(name)
            if p.kind != "emulated":
                raise InputError(f"{name!r} is not an emulated precision")
            made[name] = EmulatedArith(
                p.fmt, p.accumulation or DEFAULT_ACCUMULATION, p.mode, rng=seed + len(made)
            )
        return made[name]

    return system


def _policy_precision(policy: Policy) -> Precision:
    """A policy as a comparison column; ``fmt`` is a fallback, each value carries its own."""

    def run(net: Network, name: str, loss_scale: float = 1.0) -> Trace:
        plan = policy.resolve(net)
        if plan.emulated:
            from fpgrad.graph.layers import evaluate_plan

            trace = evaluate_plan(net, plan, emulated_systems(), loss_scale=loss_scale)
            trace.loss = float(trace.loss)
        else:
            from fpgrad.run.torch_native import torch_trace

            trace = torch_trace(net, plan, loss_scale)
        trace.system = name
        return trace

    return Precision(policy.name, get_format("float16"), "policy", run, policy=policy)


def _emulated_runner(
    fmt: Format, accumulation: str, mode: Mode
) -> Callable[[Network, str, float], Trace]:
    def run(net: Network, name: str, loss_scale: float = 1.0) -> Trace:
        from fpgrad.arith.emulated import EmulatedArith
        from fpgrad.graph.layers import evaluate

        ar = EmulatedArith(fmt, accumulation=accumulation, mode=mode, rng=EMULATED_SEED)
        trace = evaluate(
            net, ar, loss_scale=loss_scale
        )  # asarray rounds data and parameters into fmt first
        trace.system = name
        trace.loss = float(trace.loss)
        return trace

    return run


def _known() -> str:
    formats = ", ".join(f for f in CATALOGUE if f not in NATIVE)
    return (
        f"known precisions: {', '.join(NATIVE)} (torch), exact, any format emulated "
        f"({formats}, eXmY, or a native one with :emulated); qualifiers "
        f":{'|:'.join(ACCUMULATIONS)} (accumulation) and a rounding mode "
        f"(:{'|:'.join(m.value for m in Mode)}); policies: {', '.join(BUILTIN)} or a "
        "[policy.NAME] of the network file"
    )


def get_precision(name: str, policies: dict[str, Policy] | None = None) -> Precision:
    """The precision called ``name`` (see the module docstring for the grammar), or the
    built-in or user (``policies``) precision policy of that name."""
    policy = get_policy(name.strip(), policies)
    if policy is not None:
        return _policy_precision(policy)
    parsed = parse_name(name, _known, [*BUILTIN, *(policies or {})])
    if parsed.kind == "native":
        return Precision(parsed.canonical, parsed.fmt, "native", _native_runner)
    accumulation = parsed.accumulation or DEFAULT_ACCUMULATION
    return Precision(
        parsed.canonical,
        parsed.fmt,
        "emulated",
        _emulated_runner(parsed.fmt, accumulation, parsed.mode),
        accumulation,
        parsed.mode,
    )


def parse_precisions(
    spec: str | list[str] | tuple[str, ...] | None, policies: dict[str, Policy] | None = None
) -> list[Precision]:
    """Comma-separated names (or a list) to precisions, in order, without duplicates or 'exact';
    names of precision policies (built-in or in ``policies``) are accepted too."""
    if spec is None:
        names: list[str] = list(DEFAULT_PRECISIONS)
    elif isinstance(spec, str):
        names = [s for s in spec.split(",")]
    else:
        names = list(spec)
    out: list[Precision] = []
    for name in names:
        if not name.strip():
            raise InputError("empty precision name in --precisions; separate names by commas")
        if name.strip().lower() == "exact":
            continue
        p = get_precision(name, policies)
        if p.name not in [q.name for q in out]:
            out.append(p)
    if not out:
        raise InputError("no precision to compare; name at least one, e.g. --precisions float16")
    return out
