"""The diagnosis of a comparison in words: what each precision lost, where the signal died, and
the remedies the data supports, each with the command that checks it.

Computed from a :class:`~fpgrad.diagnose.comparison.Comparison`'s columnar results (counts, attribution)
and, for the loss-scale remedy, :func:`fpgrad.diagnose.advisor.advise` over the same exact trace (no
second exact evaluation, no torch measurement). A finding is a dict: ``kind`` ("lost", "ok",
"loss", "where" or "remedy"), ``precision``, ``text`` and, for remedies, ``command`` with
``{net}`` standing for the network's path (filled in when shown).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fpgrad.diagnose.verdicts import inaccurate_threshold, underflows
from fpgrad.errors import InputError
from fpgrad.model.network import Network
from fpgrad.model.policy import BUILTIN, format_of
from fpgrad.numbers.formats import Format, get_format

if TYPE_CHECKING:
    from fpgrad.diagnose.result import Comparison
    from fpgrad.graph.precisions import Precision
    from fpgrad.reference.exact import ExactResult

#: a format narrower than this many exponent bits is offered bfloat16 as a remedy
_BF16 = get_format("bfloat16")


def diagnose(
    c: Comparison, net: Network, exact: ExactResult, precs: list[Precision]
) -> list[dict[str, Any]]:
    """Findings and remedies per precision, in the order they are shown."""
    out: list[dict[str, Any]] = []
    nonzero = sum(int((~g.exact.zero & ~g.exact.undetermined_mask()).sum()) for g in c.grads)
    cache: dict[tuple[str, ...], Any] = {}  # the advisor's sorted magnitudes, built once
    for p in precs:
        out += _precision_findings(c, net, exact, p, nonzero, cache)
    return out


def _narrowest(c: Comparison, p: Precision) -> Format:
    plan = c.policies[p.name]
    if p.kind == "policy" and plan.get("graph"):  # a captured model: the gradients' formats
        names = set(plan["gradient_formats"].values())
        return min((format_of(n) for n in names), key=lambda f: (f.bits, f.precision))
    if p.kind == "policy":
        names = {lp["compute"] for lp in plan["layers"]} | {plan["loss"]["compute"]}
        return min((format_of(n) for n in names), key=lambda f: (f.bits, f.precision))
    return p.fmt


def _precision_findings(
    c: Comparison,
    net: Network,
    exact: ExactResult,
    p: Precision,
    nonzero: int,
    cache: dict[tuple[str, ...], Any],
) -> list[dict[str, Any]]:
    name = p.name
    s = c.summary[name]
    fmt = _narrowest(c, p)
    lost = s["rounding_zero"] + s["overflow"] + s["nan"]
    damaged = s["wrong_sign"] + s.get("inaccurate", 0)
    out: list[dict[str, Any]] = []

    def add(kind: str, text: str, command: str | None = None) -> None:
        out.append({"kind": kind, "precision": name, "text": text, "command": command})

    if lost == 0 and damaged == 0 and s["subnormal"] == 0:
        add("ok", f"{name}: every one of the {nonzero} non-zero exact gradients survives")
    else:
        if lost:
            parts = [
                f"{s['rounding_zero_underflow']} underflow (below half the smallest subnormal)",
                f"{s['rounding_zero_lost']} lost upstream (an intermediate died first)",
            ]
            parts += [f"{s[k]} {k}" for k in ("overflow", "nan") if s[k]]
            text = (
                f"{name}: {lost} of {nonzero} non-zero exact gradients lost ({', '.join(parts)})"
                if lost <= nonzero
                else f"{name}: {lost} gradients lost ({', '.join(parts)}; only {nonzero} exact "
                "gradients are certified non-zero: the others are zero or undetermined)"
            )
        else:
            text = f"{name}: none of the {nonzero} non-zero exact gradients lost"
        more = []
        if s["wrong_sign"]:
            more.append(f"{s['wrong_sign']} have the wrong sign")
        if s.get("inaccurate", 0):
            more.append(
                f"{s['inaccurate']} are inaccurate (relative error above "
                f"{inaccurate_threshold(fmt):.2g}, what rounding in {fmt.name} explains)"
            )
        if s["subnormal"]:
            more.append(f"{s['subnormal']} are subnormal (fewer significant bits)")
        add("lost", text + ("; " + ", ".join(more) if more else ""))
    loss = c.loss[name]
    if loss["verdict"] != "ok":
        add(
            "loss",
            f"{name}: the loss itself is {loss['verdict']}"
            + (f" ({loss['kind']})" if loss["kind"] else "")
            + (f", relative error {loss['rel_err']:.2g}" if math.isfinite(loss["rel_err"]) else ""),
        )
    att = c.attribution[name]
    first = att["first_rounding_zero_backward"]
    if first:
        add(
            "where",
            f"{name}: going back from the loss, the signal first dies in {first['op']}: "
            f"{first['rounding_zero']} rounding zeros in {first['layer']} {first['quantity']}",
        )
    if att["first_rounding_zero_forward"]:
        f = att["first_rounding_zero_forward"]
        add("where", f"{name}: forward values first round to zero in {f['op']}")
    if att["first_overflow"]:
        o = att["first_overflow"]
        add(
            "where",
            f"{name}: the first inf/NaN appears in {o['op']} ({o['layer']} {o['quantity']})",
        )
    captured_overflow = not isinstance(net, Network) and att["first_overflow"]
    if lost or s["subnormal"] or captured_overflow:
        _remedies(c, net, exact, p, fmt, add, cache)
    return out


def _remedies(
    c: Comparison,
    net: Network,
    exact: ExactResult,
    p: Precision,
    fmt: Format,
    add: Any,
    cache: dict[tuple[str, ...], Any],
) -> None:
    name = p.name
    column = f"--policy {name}" if p.kind == "policy" else f"--precisions {name}"
    s = c.summary[name]
    small = s["rounding_zero_underflow"] + s["rounding_zero_lost"] + s["subnormal"]
    if small and fmt.exp_bits <= 8 and c.loss_scale == 1.0:
        try:
            adv = _advise(net, exact, p, fmt, cache)
        except InputError:
            adv = None
        if adv is not None and adv.safe is not None and adv.recommended > 0:
            k = adv.recommended
            add(
                "remedy",
                f"loss scale 2^{k} = {2.0**k:g} (the advisor's recommended scale for "
                f"{adv.format}; no exact gradient underflows at 2^{adv.safe[0]} .. "
                f"2^{adv.safe[1]})",
                f"fpgrad compare {{net}} {column} --loss-scale {2.0**k:g}",
            )
            if p.kind != "policy":
                add(
                    "remedy",
                    f"float32 master weights with that scale, unscaled in float32 "
                    f"({name}+master+scale={2.0**k:g}): small updates are not swamped",
                    f"fpgrad train {{net}} --steps 20 --precisions {name},"
                    f"{name}+master+scale={2.0**k:g}",
                )
        elif adv is not None and adv.safe is None:
            add(
                "remedy",
                f"no loss scale keeps every exact gradient in {adv.format} (advisor: {adv.reason})",
                f"fpgrad advise {{net}} --format {adv.format}",
            )
    if fmt.exp_bits < _BF16.exp_bits and s["rounding_zero_underflow"]:
        under = sum(int(underflows(g.exact, _BF16).sum()) for g in c.grads)
        if under == 0:
            add(
                "remedy",
                f"bfloat16 ({_BF16.exp_bits} exponent bits) holds every exact gradient that "
                f"{fmt.name} underflows, at {_BF16.precision} significant bits instead of "
                f"{fmt.precision}",
                "fpgrad compare {net} --precisions bfloat16",
            )
    first = c.attribution[name]["first_rounding_zero_backward"]
    if not isinstance(net, Network):  # a captured model: the first op, in execution order,
        # computing 0 where the exact value is not, or inf/NaN (later ones may be inherited)
        died = next(
            (r for r in c.attribution[name]["places"] if r["rounding_zero"] or r["overflow"]),
            None,
        )
        if died and p.kind != "policy":
            add(
                "remedy",
                f"compute {died['op']} in float32 under a precision policy (a rule for its "
                "module path or op class; autocast keeps softmax, norms, exp, log and the losses "
                "in float32)",
                f"fpgrad compare {{net}} --precisions {name} --policy autocast",
            )
    elif first and p.kind != "policy":
        op = first["op"]
        layer = _producer(net, op)
        where = 'loss = "float32"' if layer is None else f'layers = {{ {layer} = "float32" }}'
        auto = BUILTIN["autocast"].resolve(net).to_dict()
        computes = (
            auto["loss"]["compute"]
            if layer is None
            else next(lp["compute"] for lp in auto["layers"] if lp["layer"] == layer)
        )
        add(
            "remedy",
            f"compute {op} in float32 under a precision policy ([policy.NAME] with {where} in "
            "the network file)" + ("; autocast already does" if computes == "float32" else ""),
            f"fpgrad compare {{net}} --precisions {name} --policy autocast"
            if computes == "float32"
            else "fpgrad policies --network {net}",
        )


def _advise(
    net: Any, exact: ExactResult, p: Precision, fmt: Format, cache: dict[tuple[str, ...], Any]
) -> Any:
    """The loss-scale advisor over the comparison's own exact trace (no torch measurement)."""
    policy = p.name if p.kind == "policy" else None
    if not isinstance(net, Network):  # a captured model
        from fpgrad.graph.advise import advise_graph

        return advise_graph(
            net, fmt.name if policy is None else None, exact.bits, policy=policy, measure=False,
            allow_uncertified=True, exact=exact,
        )  # fmt: skip
    from fpgrad.diagnose.advisor import advise

    return advise(
        net, fmt.name if policy is None else None, exact.bits, policy=policy, measure=False,
        allow_uncertified=True, exact=exact, values_cache=cache,
    )  # fmt: skip


def _producer(net: Network, op: str) -> str | None:
    """The layer whose backward produced a signal (``op`` as compare's places name it); None
    for the loss's backward."""
    if op.startswith("loss backward"):
        return None
    head = op.split(" backward", 1)[0]
    names = [ly.name for ly in net.layers]
    return head if head in names else None
