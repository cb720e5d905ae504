"""Run names and their grammar (``float16+master+scale=1024``), and the shared mini-batch order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fpgrad.errors import InputError
from fpgrad.model.network import Network
from fpgrad.model.policy import BUILTIN, Plan, Policy, get_policy
from fpgrad.numbers.formats import NATIVE, get_format
from fpgrad.run.scaling import StaticScaler
from fpgrad.suggest import did_you_mean

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
        from fpgrad.graph.precisions import get_precision

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
