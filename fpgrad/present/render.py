"""Readable text tables for results (tabulate). Reads results; computes no science."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from tabulate import tabulate

from fpgrad.diagnose.verdicts import VERDICTS
from fpgrad.errors import InputError

if TYPE_CHECKING:
    from fpgrad.diagnose.result import Comparison, GradColumns

_SHORT = {
    "ok": "ok",
    "structural_zero": "STRUCT-0",
    "rounding_zero": "ROUND-0",
    "subnormal": "subnormal",
    "overflow": "OVERFLOW",
    "nan": "NaN",
    "wrong_sign": "WRONG-SIGN",
    "spurious_nonzero": "spurious",
    "inaccurate": "INACCURATE",
    "undetermined": "UNDETERMINED",
}


def fmt_value(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "-0" if math.copysign(1.0, x) < 0 else "0"
    return f"{x:.6g}"


def _cell(col: dict[str, Any]) -> str:
    verdict = col["verdict"]
    text = f"{fmt_value(col['value'])} {_SHORT.get(verdict, verdict.upper())}"
    if verdict == "rounding_zero":
        text += f" ({col['kind']})"
    elif verdict == "inaccurate":
        text += f" rel {col['rel_err']:.2g}"
    elif verdict in ("ok", "subnormal", "wrong_sign") and "ulps" in col:
        text += f" {col['ulps']:.3g}ulp"
    elif verdict == "ok":
        text += f" rel {col['rel_err']:.2g}"
    return text


def _loss_cell(col: dict[str, Any]) -> str:
    text = _SHORT.get(col["verdict"], col["verdict"]) + (f" ({col['kind']})" if col["kind"] else "")
    shows_error = col["verdict"] in ("ok", "inaccurate")
    return text + (f", rel. error {col['rel_err']:.2g}" if shows_error else "")


def _exact_short(s: str) -> str:
    if s == "0":
        return "0"
    mant, _, exp = s.partition("e")
    return f"{mant[:12]}e{exp}" if exp else mant[:12]


def exact_method_text(method: str, bits: int) -> str:
    """How the exact values were obtained, in words."""
    if method == "fast":
        return f"ball arithmetic at {bits} bits (rigorous error bounds)"
    return f"Arb ball arithmetic at {bits} bits (rigorous error bounds)"


def policy_table(plans: dict[str, dict[str, Any]], columns: list[str]) -> str:
    """Layers (and the loss) against columns: the precision each op computed in."""
    return tabulate(policy_rows(plans, columns), headers=["op", *columns], tablefmt="github")


def policy_rows(plans: dict[str, dict[str, Any]], columns: list[str]) -> list[list[str]]:
    """The rows of :func:`policy_table`: each layer, the loss, where parameters and data are
    stored."""
    first = plans[columns[0]]
    rows = []
    for i, lp in enumerate(first["layers"]):
        row = [f"{lp['layer']} ({lp['kind']})"]
        for col in columns:
            cell = plans[col]["layers"][i]
            text = cell["compute"]
            if cell["params"] and cell["params"] != cell["compute"]:
                text += f" (params {cell['params']})"
            row.append(text)
        rows.append(row)
    rows.append(["loss"] + [plans[col]["loss"]["compute"] for col in columns])
    rows.append(
        ["parameters stored in"]
        + [plans[col].get("master", plans[col]["params"]) for col in columns]
    )
    rows.append(["data stored in"] + [plans[col]["data"] for col in columns])
    return rows


#: element-table order: what a user came for first; a verdict not named here (added later)
#: comes after these and before ``ok`` and structural zeros, which come last
ROW_ORDER = (
    "rounding_zero",
    "overflow",
    "nan",
    "wrong_sign",
    "inaccurate",
    "spurious_nonzero",
    "subnormal",
)
QUIET = ("ok", "structural_zero")


def verdict_ranks() -> np.ndarray:
    """Rank of each verdict (indexed as fpgrad.diagnose.verdicts.VERDICTS) in the element table."""
    ranks = [
        ROW_ORDER.index(v)
        if v in ROW_ORDER
        else len(ROW_ORDER) + 1 + QUIET.index(v)
        if v in QUIET
        else len(ROW_ORDER)
        for v in VERDICTS
    ]
    return np.array(ranks, dtype=np.int16)


def select_rows(
    c: Comparison,
    max_rows: int | None,
    verdicts: list[str] | None = None,
    param: str | None = None,
) -> tuple[list[tuple[GradColumns, np.ndarray]], int]:
    """The element rows to show: ``(tensor, flat indices)`` in table order (the worst verdict of
    the row over the precisions by :data:`ROW_ORDER`, then parameter order, then index) and the
    number of rows that pass the filters. Vectorised: no per-element Python work."""
    grads = [c.column(param)] if param is not None else c.grads
    wanted = None
    if verdicts:
        unknown = [v for v in verdicts if v not in VERDICTS]
        if unknown:
            raise InputError(
                f"unknown verdict {unknown[0]!r} in --verdict; use any of {', '.join(VERDICTS)}"
            )
        wanted = np.array([v in verdicts for v in VERDICTS])
    table = verdict_ranks()
    ranks, masks = [], []
    for g in grads:
        codes = [g.cols[p].code.ravel() for p in c.precisions]
        rank = np.min([table[code] for code in codes], axis=0) if codes else np.zeros(0)
        mask = (
            np.ones(g.size, dtype=bool)
            if wanted is None
            else np.any([wanted[code] for code in codes], axis=0)
        )
        ranks.append(rank)
        masks.append(mask)
    total = int(sum(int(m.sum()) for m in masks))
    limit = total if not max_rows else min(max_rows, total)
    chosen: list[tuple[GradColumns, np.ndarray]] = []
    left = limit
    for r in sorted({int(x) for x in table}):
        for g, rank, mask in zip(grads, ranks, masks, strict=True):
            if left <= 0:
                break
            idx = np.flatnonzero((rank == r) & mask)[:left]
            if idx.size:
                chosen.append((g, idx))
                left -= idx.size
    return chosen, total


def _magnitude(x: float | None) -> str:
    return "-" if x is None else f"2^{math.log2(x):.1f}"


def parameter_rows(c: Comparison) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the per-parameter summary: counts per verdict (those that occur),
    the range of non-zero exact magnitudes and how many lie below the format's normal range."""
    summary = c.parameter_summary()
    shown = [v for v in VERDICTS if any(r["counts"][v] for r in summary)] or ["ok"]
    heads = ["parameter", "precision", "size", *shown, "exact magnitude", "below normal"]
    rows = []
    for r in summary:
        share = (
            f"{r['below_normal']} ({100 * r['below_normal'] / r['nonzero']:.3g}%)"
            if (r["nonzero"])
            else "0"
        )
        rows.append(
            [r["param"], r["precision"], r["size"]]
            + [r["counts"][v] for v in shown]
            + [f"{_magnitude(r['exact_min'])} .. {_magnitude(r['exact_max'])}", share]
        )
    return heads, rows


def element_rows(c: Comparison, chosen: list[tuple[GradColumns, np.ndarray]]) -> list[list[str]]:
    """Rows of the element table for the chosen elements: decimal strings for these only."""
    rows = []
    for g, flat in chosen:
        for e in g.entries(flat, c.precisions, c.reference):
            label = f"{e['param']}[{','.join(str(i) for i in e['index'])}]"
            rows.append([label, _exact_short(e["exact"])] + [_cell(e[p]) for p in c.precisions])
    return rows


def findings_lines(c: Comparison) -> list[str]:
    """The diagnosis in words, each remedy with the command that checks it."""
    out = []
    for f in c.findings:
        text = ("- " if f["kind"] != "remedy" else "  - remedy: ") + f["text"]
        if f.get("command"):
            text += f"; check: `{f['command'].replace('{net}', c.source)}`"
        out.append(text)
    return out


def signal_indices(c: Comparison) -> list[int]:
    """The places of "where the signal died" to show: every layer value of a layer network;
    the op outputs of a captured model with a rounding zero, subnormal or overflow."""
    places = [c.attribution[p]["places"] for p in c.precisions]
    if not c.kinds:
        return list(range(len(places[0])))
    # a native column without op-by-op values (oneDNN's fused LSTM) has no places
    places = [ps for ps in places if ps]
    keys = ("rounding_zero", "subnormal", "overflow")
    n = len(places[0]) if places else 0
    return [i for i in range(n) if any(ps[i][k] for ps in places for k in keys)]


def signal_rows(c: Comparison, max_rows: int | None = None) -> tuple[list[list[str]], int]:
    """Rows (tensor, produced by, counts per precision) of the places shown, at most
    ``max_rows`` on a captured model, and how many were left out."""
    places = [c.attribution[p]["places"] for p in c.precisions]
    chosen = signal_indices(c)
    shown = chosen[:max_rows] if c.kinds and max_rows else chosen
    rows = []
    for i in shown:
        place = next(ps for ps in places if ps)[i]
        label = f"{place['direction'][:3]} {place['layer']} {place['quantity']}"
        counts = (
            f"{r['rounding_zero']}/{r['subnormal']}/{r['overflow']}" if r else "-"
            for r in (ps[i] if ps else None for ps in places)
        )
        rows.append([label, place["op"], *counts])
    return rows, len(chosen) - len(shown)


def signal_table(c: Comparison, max_rows: int | None) -> list[str]:
    """Where the signal died: counts per tensor (a layer network's layer values, or a captured
    model's op outputs with a count) and precision."""
    what = "op output" if c.kinds else "tensor"
    out = [f"Where the signal died (counts per {what}: rounding zeros / subnormals / overflows)"]
    rows, hidden = signal_rows(c, max_rows)
    if not rows:
        return [*out, "(no op output holds a rounding zero, a subnormal or an overflow)"]
    out.append(tabulate(rows, headers=["tensor", "produced by", *c.precisions], tablefmt="github"))
    if hidden:
        out.append(f"({hidden} more op outputs with a count; --json gives every op)")
    return out


def render_comparison(
    c: Comparison,
    max_rows: int | None = 60,
    verdicts: list[str] | None = None,
    param: str | None = None,
) -> str:
    lines = [
        f"fpgrad compare: {c.network}",
        f"reference: {c.reference}; exact = {exact_method_text(c.exact_method, c.working_bits)}, "
        f"certified {c.certified_digits:.1f} significant digits",
    ]
    lines += [f"note: {n}" for n in c.notes[1:]]
    if c.findings:
        lines += ["", "Diagnosis", *findings_lines(c)]
    loss_rows = [["exact", _exact_short(c.loss["exact"]), ""]]
    loss_rows += [[p, fmt_value(c.loss[p]["value"]), _loss_cell(c.loss[p])] for p in c.precisions]
    lines += [
        "",
        "Loss",
        tabulate(loss_rows, headers=["precision", "loss", "verdict"], tablefmt="github"),
    ]

    verdict_cols = [v for v in VERDICTS if any(c.summary[p][v] for p in c.precisions)] or ["ok"]
    rows = [
        [p] + [c.summary[p][v] for v in verdict_cols] + [c.policies[p]["summary"]]
        for p in c.precisions
    ]
    lines += [
        "",
        "Gradient verdicts (counts)"
        + (f", loss scale {c.loss_scale:g}" if c.loss_scale != 1 else ""),
        tabulate(rows, headers=["precision", *verdict_cols, "policy"], tablefmt="github"),
    ]
    graph_policies = [p for p in c.precisions if c.policies[p].get("graph")]
    if any(not c.policies[p]["uniform"] for p in c.precisions) and graph_policies:
        lines += ["", "Precision policies (captured model: what torch ran)"]
        lines += [
            f"{p}: {c.policies[p]['ran']}" for p in c.precisions if not c.policies[p]["uniform"]
        ]
    elif any(not c.policies[p]["uniform"] for p in c.precisions):
        lines += ["", "Precision policies (what each op computed in; params: its parameters)"]
        lines.append(policy_table(c.policies, c.precisions))

    heads, prow = parameter_rows(c)
    lines += ["", "Per parameter", tabulate(prow, headers=heads, tablefmt="github")]

    chosen, total = select_rows(c, max_rows, verdicts, param)
    grad_rows = element_rows(c, chosen)
    what = []
    if verdicts:
        what.append(f"verdict {','.join(verdicts)}")
    if param is not None:
        what.append(f"parameter {param}")
    lines += [
        "",
        "Gradients (value, verdict, error in ulps of that format; rows that matter first"
        + (f"; only {' and '.join(what)}" if what else "")
        + ")",
        tabulate(grad_rows, headers=["gradient", "exact", *c.precisions], tablefmt="github"),
    ]
    hidden = total - len(grad_rows)
    if hidden:
        lines.append(
            f"({hidden} more rows not shown; --max-rows 0 shows all, --verdict and --param "
            "filter, --json or --out give every element)"
        )

    lines += ["", *signal_table(c, max_rows)]
    for p in c.precisions:
        a = c.attribution[p]
        first = a["first_rounding_zero_backward"]
        if first:
            lines.append(
                f"{p}: going back from the loss, rounding zeros first appear in {first['layer']} "
                f"{first['quantity']} ({first['rounding_zero']} elements), produced by {first['op']}"
            )
        fwd = a["first_rounding_zero_forward"]
        if fwd:
            lines.append(
                f"{p}: forward values rounded to zero first at {fwd['layer']} {fwd['quantity']} ({fwd['op']})"
            )
        if a["first_overflow"]:
            o = a["first_overflow"]
            lines.append(
                f"{p}: first overflow (inf/NaN) at {o['layer']} {o['quantity']} ({o['op']})"
            )
    return "\n".join(lines)


def _detector_text(d: dict[str, Any]) -> dict[str, str]:
    stall = d["stall"]
    floor = d["loss_floor"]
    cyc = d["limit_cycle"]
    div = d["divergence"]
    out = {
        "stall": (
            f"from step {stall['start_step']} ({stall['length']} steps"
            + (", to the end)" if stall["until_end"] else ")")
        )
        if stall["detected"]
        else "-",
        "loss floor": (
            f"{floor['floor']:.3g} from step {floor['start_step']} "
            f"({floor['ratio_to_exact']:.3g}x exact)"
        )
        if floor["detected"]
        else "-",
        "limit cycle": ("fixed point" if cyc["fixed_point"] else f"period {cyc['period']}")
        + f" from step {cyc['first_step']}"
        if cyc["detected"]
        else "-",
        "divergence": (
            f"d={fmt_value(div['final_distance'])}"
            + (
                f", >{div['threshold']} at step {div['exceeds_at_step']}"
                if div["exceeds_at_step"] is not None
                else ""
            )
            + (f", twin: {div['twin']['verdict']}" if "twin" in div else "")
        ),
        "overflow": (
            f"step {d['first_overflow']['step']} {d['first_overflow']['layer']} "
            f"{d['first_overflow']['quantity']}"
        )
        if d["first_overflow"]
        else "-",
        "swamped": f"{100 * d['swamped_fraction']['total']:.1f}%",
    }
    if d.get("diverged", {}).get("detected"):
        gone = f"DIVERGED at step {d['diverged']['step']} (NaN/inf parameters)"
        out["stall"] = out["loss floor"] = out["limit cycle"] = gone
    return out


def render_training(r: Any) -> str:
    cfg = r.config
    opt = cfg["optimizer"]
    lines = [
        f"fpgrad train: {r.network}, {cfg['steps']} steps, {opt['name']} lr={opt['lr']}"
        + (f" momentum={opt['momentum']}" if opt["momentum"] else "")
        + (
            f" weight_decay={opt['weight_decay']}{' (decoupled)' if opt['decoupled'] else ''}"
            if opt["weight_decay"]
            else ""
        )
        + (f", batch {cfg['batch_size']}" if cfg["batch_size"] else ", full batch"),
        f"exact run: {exact_method_text(cfg['exact_method'], cfg['exact_working_bits'])}, "
        f"trajectory certified to {r.exact_certified_digits:.1f} digits",
    ]
    lines += [f"note: {n}" for n in r.notes]
    rows = [
        [
            "exact",
            fmt_value(r.exact.loss[0]),
            fmt_value(r.exact.loss[-1]),
            "",
            "",
            "",
            "",
            "",
            "",
            "",
        ]
    ]
    for label in r.runs:
        h = r.histories[label]
        t = _detector_text(r.detectors[label])
        rows.append(
            [
                label,
                fmt_value(h.loss[0]),
                fmt_value(h.loss[-1]),
                t["swamped"],
                t["stall"],
                t["loss floor"],
                t["limit cycle"],
                t["divergence"],
                t["overflow"],
                str(sum(h.skipped)),
            ]
        )
    heads = [
        "run",
        "loss[0]",
        "loss[end]",
        "swamped",
        "stall",
        "loss floor",
        "limit cycle",
        "distance to exact",
        "first overflow",
        "skipped",
    ]
    lines += ["", tabulate(rows, headers=heads, tablefmt="github")]
    for label in r.runs:
        first = r.detectors[label]["first_overflow"]
        if first and first.get("cause"):
            lines.append(f"{label}: first overflow at step {first['step']}: {first['cause']}")
    if r.plans:
        lines += ["", "Policy of each run (what each op computed in)"]
        lines += [f"- {label}: {r.plans[label]['summary']}" for label in r.runs]
        if any(not r.plans[label]["uniform"] for label in r.runs):
            lines += ["", policy_table(r.plans, r.runs)]
    columns = [*VERDICTS, "no_reference"]  # every verdict: the rows add up to the elements
    vrows = []
    for label in r.runs:
        h = r.histories[label]
        last = max(h.verdicts)
        counts = h.verdicts[last]
        vrows.append(
            [label, last]
            + [counts.get(v, 0) for v in columns]
            + [sum(counts.get(v, 0) for v in columns)]
        )
    lines += [
        "",
        "Gradient verdicts at the last checked step (against exact gradients at the run's own "
        "parameters; no_reference: no exact gradient at non-finite parameters)",
        tabulate(vrows, headers=["run", "step", *columns, "elements"], tablefmt="github"),
    ]
    return "\n".join(lines)
