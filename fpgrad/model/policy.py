"""Precision policies: which precision each layer, the loss, the parameters and the data use.

A policy is torch.autocast made explicit, per op class and per layer. Its fields:

- ``params``: the precision parameters are stored (and updated) in, i.e. the master weights;
- ``data``: the precision inputs and targets are stored in (default: ``params``);
- per op class (``dense``, ``relu``, ``leaky_relu``, ``sigmoid``, ``tanh``, ``softmax``,
  ``batch_norm``, ``loss``; ``matmul``/``linear`` are aliases of ``dense``, ``activation``
  covers relu, leaky_relu, sigmoid and tanh) and per layer name (``layers``): the precision the
  op computes in, or ``input`` (compute in the precision of the incoming tensor, as autocast
  does for ops on neither of its lists); ``default`` for the rest (default ``input``).

An op computing in precision P casts its input, and its parameters, to P (a correct rounding
when narrowing; autograd casts the gradient back). Batch norm computing in ``input`` with
float32 parameters and a float16/bfloat16 input runs torch's mixed kernel, as under autocast.
Eval-mode batch norm (``batch_norm_eval``) is op class ``batch_norm``; its running statistics
are stored and cast with its parameters.

Built-in policies follow torch.autocast's op lists for the ops fpgrad has: ``autocast``
(CUDA, float16: matmuls in float16, softmax and losses in float32, float32 master weights),
``autocast_bf16``, and ``autocast_cpu`` / ``autocast_cpu_bf16`` (the CPU lists, where softmax
is not upcast). The plain precision ``float16`` is the uniform policy: everything in float16.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from fpgrad.errors import InputError
from fpgrad.numbers.formats import CATALOGUE, NATIVE, Format, get_format

if TYPE_CHECKING:
    from fpgrad.model.network import Network

INPUT = "input"
#: ``layer_norm`` applies to captured models only (fpgrad.graph.policy): layer networks have none
OP_CLASSES = (
    "dense", "relu", "leaky_relu", "sigmoid", "tanh", "softmax", "batch_norm", "layer_norm", "loss"
)  # fmt: skip
ALIASES = {"matmul": "dense", "linear": "dense"}
GROUPS = {"activation": ("relu", "leaky_relu", "sigmoid", "tanh")}
_FIELDS = ("params", "data", "default", "description", "layers", "extends")


def format_of(precision: str) -> Format:
    """The format of a precision name (``fp8_e4m3``, ``float16:emulated:per_op``, ...)."""
    return get_format(precision.split(":")[0])


def _emulated_name(precision: str) -> str:
    """A native name as the emulated machine's (``float32`` -> ``float32:emulated``)."""
    return f"{precision}:emulated" if precision in NATIVE else precision


@dataclass(frozen=True)
class Policy:
    """A named precision policy (see the module docstring); ``ops`` and ``layers`` map an op
    class or a layer name to a precision (native or emulated) or ``input``."""

    name: str
    params: str = "float32"
    data: str | None = None
    default: str = INPUT
    ops: tuple[tuple[str, str], ...] = ()
    layers: tuple[tuple[str, str], ...] = ()
    description: str = ""
    #: whose torch.autocast op list this follows: "cuda", "cpu", or "" (its own); ``extends`` keeps it
    autocast_device: str = ""

    def rule(self, layer: str, kind: str) -> tuple[str, str]:
        """The precision for a layer (or ``loss``) and the rule that chose it."""
        layers, ops = dict(self.layers), dict(self.ops)
        if layer in layers:
            return layers[layer], f"layer {layer}"
        if kind in ops:
            return ops[kind], f"op {kind}"
        for group, members in GROUPS.items():
            if kind in members and group in ops:
                return ops[group], f"op {group}"
        return self.default, "default"

    @property
    def emulated(self) -> bool:
        """True when some value names an emulated format: then every op runs emulated."""
        values = [self.params, self.data, self.default, *dict(self.ops).values()]
        values += list(dict(self.layers).values())
        return any(v is not None and v != INPUT and v not in NATIVE for v in values)

    def resolve(self, net: Network) -> Plan:
        """The concrete precision of every layer of ``net`` and of its loss (for an emulated
        policy, native names become the emulated machines of those formats)."""
        policy = replace(self, **_emulated_fields(self)) if self.emulated else self
        return policy._resolve(net)

    def _resolve(self, net: Network) -> Plan:
        unknown = [name for name, _ in self.layers if name not in {ly.name for ly in net.layers}]
        if unknown:
            names = ", ".join(ly.name for ly in net.layers)
            raise InputError(
                f"policy {self.name!r}: no layer named {unknown[0]!r} in network {net.name!r}; "
                f"layers: {names}"
            )
        data = self.data or self.params
        current = data
        plans: list[LayerPlan] = []
        for ly in net.layers:
            wanted, why = self.rule(ly.name, ly.op_class)
            compute = current if wanted == INPUT else wanted
            if not ly.params and not ly.stats:
                params = None
            elif (
                ly.op_class == "batch_norm" and wanted == INPUT and _mixed_bn(compute, self.params)
            ):
                params = self.params  # torch's mixed batch norm: float32 parameters kept
            else:
                params = compute
            plans.append(LayerPlan(ly.name, ly.kind, compute, params, compute, why))
            current = compute
        wanted, why = self.rule("loss", "loss")
        loss = current if wanted == INPUT else wanted
        return Plan(self.name, self.params, data, tuple(plans), loss, why, self.description)

    def describe(self) -> str:
        """One line: the description, or the fields as written."""
        if self.description:
            return self.description
        parts = [f"params {self.params}"]
        if self.data and self.data != self.params:
            parts.append(f"data {self.data}")
        parts += [f"{op} {p}" for op, p in self.ops]
        parts += [f"layer {name} {p}" for name, p in self.layers]
        parts.append(f"other ops {self.default}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": self.params,
            "data": self.data or self.params,
            "default": self.default,
            "ops": dict(self.ops),
            "layers": dict(self.layers),
            "description": self.description,
        }


def _mixed_bn(compute: str, params: str) -> bool:
    return compute in ("float16", "bfloat16") and params == "float32"


@dataclass(frozen=True)
class LayerPlan:
    """What one layer computes in: activations (``compute``), parameters as used by the op
    (``params``, None without parameters), its output, and the policy rule that chose it."""

    layer: str
    kind: str
    compute: str
    params: str | None
    output: str
    rule: str


@dataclass(frozen=True)
class Plan:
    """A policy resolved against one network."""

    policy: str
    params: str
    data: str
    layers: tuple[LayerPlan, ...]
    loss: str
    loss_rule: str
    description: str = ""

    @classmethod
    def uniform(cls, net: Network, precision: str) -> Plan:
        """Everything in ``precision``: what a plain precision (native or emulated) means."""
        return Policy(precision, params=precision, default=precision).resolve(net)

    def formats(self) -> set[str]:
        out = {self.params, self.data, self.loss}
        for lp in self.layers:
            out.add(lp.compute)
        return out

    @property
    def emulated(self) -> bool:
        """Every op runs in the strict emulated machine (:mod:`fpgrad.arith.emulated`)."""
        return any(p not in NATIVE for p in self.formats())

    def lowest(self) -> str:
        """The narrowest precision any tensor of the plan is in (by total bits, then by
        precision: float16 before bfloat16)."""
        return min(self.formats(), key=lambda p: (format_of(p).bits, format_of(p).precision, p))

    def is_uniform(self) -> bool:
        return len(self.formats()) == 1

    def describe(self) -> str:
        """One line: e.g. ``dense float16; softmax, loss float32; params float32``."""
        if self.is_uniform():
            return f"all {self.params}"
        groups: dict[str, list[str]] = {}
        for lp in self.layers:
            label = lp.kind
            if lp.params and lp.params != lp.compute:
                label += f" ({lp.params} params)"
            groups.setdefault(lp.compute, [])
            if label not in groups[lp.compute]:
                groups[lp.compute].append(label)
        groups.setdefault(self.loss, []).append("loss")
        parts = [f"{', '.join(v)} {k}" for k, v in groups.items()]
        parts.append(f"params {self.params}")
        if self.data != self.params:
            parts.append(f"data {self.data}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "summary": self.describe(),
            "uniform": self.is_uniform(),
            "params": self.params,
            "data": self.data,
            "layers": [
                {
                    "layer": lp.layer,
                    "kind": lp.kind,
                    "compute": lp.compute,
                    "params": lp.params,
                    "output": lp.output,
                    "rule": lp.rule,
                }
                for lp in self.layers
            ],
            "loss": {"compute": self.loss, "rule": self.loss_rule},
        }


def _autocast(name: str, low: str, softmax_fp32: bool, where: str) -> Policy:
    ops = [("dense", low), ("loss", "float32")]
    if softmax_fp32:
        ops.append(("softmax", "float32"))
    text = (
        f"torch.autocast({where!r}, dtype=torch.{low}): matmuls in {low}, "
        f"{'softmax and ' if softmax_fp32 else ''}losses in float32, other ops in their "
        "input's precision, float32 master weights"
    )
    return Policy(name, params="float32", ops=tuple(ops), description=text, autocast_device=where)


BUILTIN: dict[str, Policy] = {
    p.name: p
    for p in (
        _autocast("autocast", "float16", True, "cuda"),
        _autocast("autocast_bf16", "bfloat16", True, "cuda"),
        _autocast("autocast_cpu", "float16", False, "cpu"),
        _autocast("autocast_cpu_bf16", "bfloat16", False, "cpu"),
    )
}


def _precision(value: Any, where: str, allow_input: bool = True) -> str:
    """A native precision, an emulated one (canonical name), or ``input``."""
    allowed = list(NATIVE) + ([INPUT] if allow_input else [])
    hint = f"use one of {allowed} or an emulated format (fp8_e4m3, e5m7, bfloat16:emulated...)"
    if not isinstance(value, str):
        raise InputError(f"{where}: {value!r} is not a policy precision; {hint}")
    name = value.strip().lower()
    if name in allowed:
        return name
    from fpgrad.model.precision_names import parse_name

    try:
        p = parse_name(name)
    except InputError:
        raise InputError(f"{where}: {value!r} is not a policy precision; {hint}") from None
    if p.kind != "emulated":
        raise InputError(f"{where}: {value!r} is not a policy precision; {hint}")
    return p.canonical


def _emulated_fields(policy: Policy) -> dict[str, Any]:
    """An emulated policy's values with native names as emulated machines; float64 cannot be
    emulated (more than 9 exponent bits)."""

    def conv(v: str | None) -> str | None:
        if v == "float64":
            raise InputError(
                f"policy {policy.name!r}: float64 cannot be emulated, and a policy with an "
                "emulated format runs every op emulated; use float32 there"
            )
        return None if v is None or v == INPUT else _emulated_name(v)

    return {
        "params": conv(policy.params),
        "data": conv(policy.data),
        "default": conv(policy.default) or INPUT,
        "ops": tuple((k, conv(v) or INPUT) for k, v in policy.ops),
        "layers": tuple((k, conv(v) or INPUT) for k, v in policy.layers),
    }


def parse_policy(name: str, table: Any, where: str = "network") -> Policy:
    """A user policy from a ``[policy.NAME]`` table of a network file."""
    from fpgrad.model.validate import check_policy_name

    check_policy_name(name, where)
    at = f"{where}: [policy.{name}]"
    if not isinstance(table, Mapping):
        raise InputError(f"{at} must be a table of op = precision entries")
    if name.lower() in NATIVE or name.lower() in CATALOGUE or name.lower() == "exact":
        raise InputError(f"{at}: {name!r} is a precision name; give the policy another name")
    if name in BUILTIN:
        raise InputError(f"{at}: {name!r} is a built-in policy; use extends = {name!r} instead")
    base = Policy(name)
    if "extends" in table:
        parent = table["extends"]
        if not isinstance(parent, str) or parent not in BUILTIN:
            raise InputError(f"{at}: extends {parent!r}: known built-ins: {', '.join(BUILTIN)}")
        base = replace(BUILTIN[parent], name=name, description="")
    ops = dict(base.ops)
    layers = dict(base.layers)
    kw: dict[str, Any] = {}
    for key, value in table.items():
        if key == "extends":
            continue
        if key in ("params", "data"):
            kw[key] = _precision(value, f"{at}.{key}", allow_input=False)
        elif key == "default":
            kw[key] = _precision(value, f"{at}.default")
        elif key == "description":
            if not isinstance(value, str):
                raise InputError(f"{at}.description must be a string (got {value!r:.40})")
            kw[key] = value
        elif key == "layers":
            if not isinstance(value, Mapping):
                raise InputError(f"{at}.layers must be a table of layer name = precision")
            for layer, prec in value.items():
                layers[layer] = _precision(prec, f"{at}.layers.{layer}")
        else:
            op = ALIASES.get(key, key)
            if op not in OP_CLASSES and op not in GROUPS:
                known = [*OP_CLASSES, *ALIASES, *GROUPS, *_FIELDS]
                raise InputError(f"{at}: unknown key {key!r}; known: {', '.join(known)}")
            ops[op] = _precision(value, f"{at}.{key}")
    return replace(base, ops=tuple(ops.items()), layers=tuple(layers.items()), **kw)


def get_policy(name: str, user: Mapping[str, Policy] | None = None) -> Policy | None:
    """The built-in or user policy called ``name``, or None."""
    if user and name in user:
        return user[name]
    return BUILTIN.get(name.strip().lower())


def require_policy(name: str, user: Mapping[str, Policy] | None = None) -> Policy:
    """The built-in or user policy called ``name``; an unknown name is an InputError naming
    the closest known one and every known one."""
    pol = get_policy(name, user)
    if pol is None:
        from fpgrad.suggest import did_you_mean

        known = [*BUILTIN, *(user or {})]
        hint = did_you_mean(name, known)
        raise InputError(f"unknown policy {name!r}{hint}; known: {', '.join(known)}")
    return pol


__all__ = [
    "BUILTIN",
    "INPUT",
    "LayerPlan",
    "Plan",
    "Policy",
    "get_policy",
    "parse_policy",
    "require_policy",
]
