"""The result of a comparison: typed records, columnar per tensor.

:class:`Comparison` is what ``fpgrad compare`` returns for a network file and for a captured
torch model alike: the loss, one :class:`GradColumns` per parameter (numpy arrays per
precision: values, verdict codes, errors; decimal strings made only for the elements shown),
counts per precision and parameter, where the signal died, the diagnosis in words, and JSON
written streaming. :class:`Scaled` sees an exact result through a loss scale.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from fpgrad.diagnose.verdicts import SUBKINDS, VERDICTS, ExactArray
from fpgrad.errors import InputError
from fpgrad.jsonutil import json_numbers, json_strings, jsonable
from fpgrad.numbers.decimals import decimal_strings
from fpgrad.reference.exact import ExactResult, decimal_string

SCHEMA = "fpgrad.compare/2"
DEFAULT_ROWS = 60  # element rows shown by default (the rows that matter first)


@dataclass
class Column:
    """One precision's values of one gradient tensor, columnar (numpy arrays of its shape)."""

    value: np.ndarray  # float64: the computed value
    code: np.ndarray  # uint8: index of the verdict in fpgrad.diagnose.verdicts.VERDICTS
    kind: (
        np.ndarray
    )  # uint8: index of the rounding zero's subkind in fpgrad.diagnose.verdicts.SUBKINDS
    rel_err: np.ndarray
    ulps: np.ndarray
    digits: np.ndarray
    #: reference "rounded": this precision's own exact values (else None: the shared ones)
    exact: ExactArray | None = None
    exact_digits: np.ndarray | None = None
    below_normal: float = 0.0  # the format's smallest normal (for the summary table)


@dataclass
class GradColumns:
    """One parameter's gradient: exact values (hi + lo, zero mask, certified digits) and a
    :class:`Column` per precision. No Python object per element."""

    param: str
    shape: tuple[int, ...]
    exact: ExactArray
    digits: np.ndarray
    cols: dict[str, Column]
    #: decimal strings of chosen elements: (precision or "", flat indices) -> strings
    _strings: Any = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def exact_strings(self, flat: np.ndarray, precision: str | None = None) -> list[str]:
        """Decimal strings (all certified digits) of the elements ``flat`` (row-major), made
        only for those; ``precision``: its own exact values under reference "rounded"."""
        return self._strings(flat, precision)

    def entry(self, flat: int, precisions: list[str], reference: str) -> dict[str, Any]:
        """The JSON entry of one element (as ``Comparison.gradients`` lists it)."""
        return self.entries(np.array([flat]), precisions, reference)[0]

    def entries(
        self, flat: np.ndarray, precisions: list[str], reference: str
    ) -> list[dict[str, Any]]:
        """JSON entries of the elements ``flat``: decimal strings for these only."""
        flat = np.asarray(flat, dtype=np.int64)
        exact = self.exact_strings(flat)
        idx = np.unravel_index(flat, self.shape) if self.shape else ()
        own = {p: self.exact_strings(flat, p) for p in precisions if reference == "rounded"}
        names, kinds = np.asarray(VERDICTS, dtype=object), np.asarray(SUBKINDS, dtype=object)
        cols = {}
        for p in precisions:
            c = self.cols[p]
            cols[p] = (
                c.value.ravel()[flat].tolist(),
                names[c.code.ravel()[flat]].tolist(),
                kinds[c.kind.ravel()[flat]].tolist(),
                c.rel_err.ravel()[flat].tolist(),
                c.ulps.ravel()[flat].tolist(),
                c.digits.ravel()[flat].tolist(),
            )
        index = np.stack(idx, axis=1).tolist() if idx else [[] for _ in range(flat.size)]
        out = []
        for j in range(flat.size):
            entry: dict[str, Any] = {"param": self.param, "index": index[j], "exact": exact[j]}
            for p in precisions:
                value, verdict, kind, rel, ulps, digits = cols[p]
                col: dict[str, Any] = {
                    "value": value[j],
                    "verdict": verdict[j],
                    "kind": kind[j] or None,
                    "rel_err": rel[j],
                    "ulps": ulps[j],
                    "digits": digits[j],
                }
                if reference == "rounded":
                    col["exact"] = own[p][j]
                entry[p] = col
            out.append(entry)
        return out

    def lines(self, flat: np.ndarray, precisions: list[str], reference: str) -> list[str]:
        """``json.dumps`` of each of :meth:`entries` (strict: non-finite as "inf", "nan"), made
        column by column: numbers by ``repr`` in bulk, one ``str.format`` per element."""
        flat = np.asarray(flat, dtype=np.int64)
        if flat.size == 0:
            return []
        rounded = reference == "rounded"
        idx = np.unravel_index(flat, self.shape) if self.shape else ()
        index = ("[" + ", ".join(["{}"] * len(idx)) + "]").format
        columns: list[list[str]] = [
            list(map(index, *(i.tolist() for i in idx))) if idx else ["[]"] * flat.size,
            json_strings(self.exact_strings(flat)),
        ]
        verdict = np.asarray([json.dumps(v) for v in VERDICTS], dtype=object)
        kind = np.asarray([json.dumps(k or None) for k in SUBKINDS], dtype=object)
        parts = ['{{"param": ' + _braces(json.dumps(self.param)) + ', "index": {}, "exact": {}']
        for p in precisions:
            c = self.cols[p]
            columns += [
                json_numbers(c.value.ravel()[flat]),
                verdict[c.code.ravel()[flat]].tolist(),
                kind[c.kind.ravel()[flat]].tolist(),
                json_numbers(c.rel_err.ravel()[flat]),
                json_numbers(c.ulps.ravel()[flat]),
                json_numbers(c.digits.ravel()[flat]),
            ]
            fields = ["value", "verdict", "kind", "rel_err", "ulps", "digits"]
            if rounded:
                columns.append(json_strings(self.exact_strings(flat, p)))
                fields.append("exact")
            body = ", ".join(f'"{f}": {{}}' for f in fields)
            parts.append(", " + _braces(json.dumps(p)) + ": {{" + body + "}}")
        template = "".join(parts) + "}}"
        return list(map(template.format, *columns))

    def counts(self, precision: str) -> np.ndarray:
        """Verdict counts (in VERDICTS order) of this tensor in ``precision``."""
        return np.bincount(self.cols[precision].code.ravel(), minlength=len(VERDICTS))


@dataclass
class Comparison:
    """The result of :func:`compare`; renders as tables (:meth:`render`) or JSON (:meth:`to_json`,
    :meth:`write_json`, streaming). Gradients are columnar (:attr:`grads`, one
    :class:`GradColumns` per parameter); :attr:`gradients` lists one dict per element."""

    network: str
    precisions: list[str]
    reference: str
    exact_bits: int
    exact_method: str
    certified_digits: float
    vanishing: int
    loss: dict[str, Any]
    grads: list[GradColumns]
    summary: dict[str, dict[str, int]]
    attribution: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    loss_scale: float = 1.0
    #: per column: the plan it ran (what each layer computed in) and the dtypes observed
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the exact reference's working and cap bits, undetermined count and escalations
    exact_info: dict[str, Any] = field(default_factory=dict)
    #: captured models: precision -> how it ran ("native", "emulated", "policy")
    kinds: dict[str, str] = field(default_factory=dict)
    #: the diagnosis in words (fpgrad.diagnose.diagnosis): findings and remedies with their commands
    findings: list[dict[str, Any]] = field(default_factory=list)
    #: how commands in the findings name the network (the CLI sets the path it was given)
    source: str = "NET"

    def _head(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "network": self.network,
            "reference": self.reference,
            "exact": {
                "bits": self.exact_bits,
                "method": self.exact_method,
                "certified_digits": self.certified_digits,
                **self.exact_info,
                "vanishing_values": self.vanishing,
            },
            "precisions": self.precisions,
            "policies": self.policies,
            "loss_scale": self.loss_scale,
            "loss": self.loss,
            "summary": self.summary,
            "parameters": self.parameter_summary(),
            "findings": [_with_source(f, self.source) for f in self.findings],
            **({"kinds": self.kinds} if self.kinds else {}),
        }

    def to_dict(self) -> dict[str, Any]:
        """Every field, gradients one dict per element (use :meth:`write_json` for large models)."""
        out = self._head()
        out["gradients"] = self.gradients
        out["attribution"] = self.attribution
        out["notes"] = self.notes
        return jsonable(out)

    def to_json(self, indent: int | None = 2) -> str:
        buf = io.StringIO()
        self.write_json(buf, indent=indent)
        return buf.getvalue()

    def write_json(self, fp: IO[str], indent: int | None = 2, chunk: int = 16384) -> None:
        """Strict JSON to ``fp``, the gradient entries written ``chunk`` at a time (memory stays
        bounded by one chunk's dicts and strings)."""
        head = jsonable(self._head())
        tail = jsonable({"attribution": self.attribution, "notes": self.notes})
        text = json.dumps(head, indent=indent, allow_nan=False)
        fp.write(text[:-1].rstrip() + ",\n" if indent is not None else text[:-1] + ",")
        pad = " " * (indent or 0)
        fp.write(f'{pad}"gradients": [' + ("\n" if indent is not None else ""))
        first = True
        sep = ",\n" if indent is not None else ","
        for g in self.grads:
            for start in range(0, g.size, chunk):
                flat = np.arange(start, min(start + chunk, g.size))
                items = g.lines(flat, self.precisions, self.reference)  # one element a line
                if items:
                    lead = "" if first else sep
                    fp.write(lead + pad * 2 + (sep + pad * 2).join(items))
                    first = False
        fp.write(("\n" + pad if indent is not None and not first else "") + "],")
        rest = json.dumps(tail, indent=indent, allow_nan=False)
        fp.write(("\n" if indent is not None else "") + rest[1:].lstrip("\n") + "\n")

    def render(
        self,
        max_rows: int | None = DEFAULT_ROWS,
        verdicts: list[str] | None = None,
        param: str | None = None,
    ) -> str:
        """Text tables: findings, loss, verdict counts, per-parameter summary, the element rows
        that matter first (at most ``max_rows``; None or 0: all), where the signal died.
        ``verdicts``/``param`` filter the element table."""
        from fpgrad.present.render import render_comparison

        return render_comparison(self, max_rows=max_rows, verdicts=verdicts, param=param)

    @property
    def working_bits(self) -> int:
        """The precision the exact reference worked at (an Arb escalation raises it above the
        requested :attr:`exact_bits`)."""
        return int(self.exact_info.get("working_bits", self.exact_bits))

    @property
    def gradients(self) -> list[dict[str, Any]]:
        """One dict per gradient element (param, index, exact string, per precision: value,
        verdict, kind, rel_err, ulps, digits): convenient on small models, a Python object per
        element on large ones (prefer :attr:`grads`)."""
        return [
            e
            for g in self.grads
            for e in g.entries(np.arange(g.size), self.precisions, self.reference)
        ]

    def counts(self, precision: str) -> dict[str, int]:
        """Verdict counts of the gradient elements in ``precision``."""
        return self.summary[precision]

    def values(self, precision: str) -> dict[str, np.ndarray]:
        """The gradients ``precision`` computed (float64 views), by parameter name."""
        return {g.param: g.cols[precision].value.reshape(g.shape) for g in self.grads}

    def column(self, param: str) -> GradColumns:
        """The columnar gradient of one parameter."""
        for g in self.grads:
            if g.param == param:
                return g
        raise InputError(
            f"unknown parameter {param!r}; parameters: {', '.join(g.param for g in self.grads)}"
        )

    def verdicts(self, param: str, precision: str) -> list[str]:
        """Verdicts of every element of one parameter's gradient, in row-major order."""
        names = np.asarray(VERDICTS, dtype=object)
        return names[self.column(param).cols[precision].code.ravel()].tolist()

    def gradient(self, param: str, index: tuple[int, ...]) -> dict[str, Any]:
        """The entry of one gradient element (exact string and per-precision columns)."""
        g = self.column(param)
        try:
            flat = int(np.ravel_multi_index(tuple(index), g.shape)) if g.shape else 0
        except ValueError:
            raise KeyError(f"{param}{list(index)}") from None
        return g.entry(flat, self.precisions, self.reference)

    def parameter_summary(self) -> list[dict[str, Any]]:
        """Per parameter and precision: verdict counts, the smallest and largest non-zero exact
        magnitude, and how many non-zero exact values lie below the format's normal range
        (non-zero: certified so; undetermined values are in neither)."""
        rows = []
        for g in self.grads:  # undetermined values (the ball holds 0) have no magnitude
            mag = np.abs(g.exact.hi[~g.exact.zero & ~g.exact.undetermined_mask()])
            lo = float(mag.min()) if mag.size else None
            hi = float(mag.max()) if mag.size else None
            for p in self.precisions:
                c = g.cols[p]
                counts = g.counts(p)
                rows.append(
                    {
                        "param": g.param,
                        "precision": p,
                        "size": g.size,
                        "counts": {v: int(n) for v, n in zip(VERDICTS, counts, strict=True)},
                        "exact_min": lo,
                        "exact_max": hi,
                        "nonzero": int(mag.size),
                        "below_normal": int(np.sum(mag < c.below_normal)),
                    }
                )
        return rows


def _with_source(finding: dict[str, Any], source: str) -> dict[str, Any]:
    out = dict(finding)
    if out.get("command"):
        out["command"] = out["command"].replace("{net}", source)
    return out


def _braces(text: str) -> str:
    """``text`` as a literal inside a ``str.format`` template."""
    return text.replace("{", "{{").replace("}", "}}")


class Scaled:
    """An exact result seen through a loss scale S: backward values and gradients times S."""

    def __init__(self, ref: ExactResult, scale: float):
        self.ref, self.scale = ref, scale
        self.k = int(math.log2(scale))
        self.digits = ref.digits

    def scaled(self, key: str) -> bool:
        return self.k != 0 and key.split("/")[0] in ("backward", "grads")

    def exact_array(self, key: str) -> ExactArray:
        ex = self.ref.exact_array(key)
        if not self.scaled(key):
            return ex
        rad = None if ex.rad is None else np.ldexp(ex.rad, self.k)
        return ExactArray(
            np.ldexp(ex.hi, self.k), np.ldexp(ex.lo, self.k), ex.zero, rad, ex.undetermined
        )

    def strings(self, key: str, flat: np.ndarray) -> list[str]:
        """Decimal strings (certified digits) of the elements ``flat`` of ``key``, times S;
        converts only these elements (integer arithmetic on the fast method's words)."""
        digits = self.digits[key].ravel()[flat]
        k = self.k if self.scaled(key) else 0
        words = self.ref.words(key, flat)
        if words is not None:
            out = decimal_strings(np.ldexp(words, k), digits)  # exact: a power of two
        else:
            values = self.ref.mp_values(key, flat)
            out = [
                decimal_string(v if k == 0 or v == 0 else v.context.ldexp(v, k), float(d))
                for v, d in zip(values, digits, strict=True)
            ]
        ex = self.exact_array(key)
        unknown = ex.undetermined_mask().ravel()[flat]
        if unknown.any():  # no digit is proven: show the bound |e| <= r
            assert ex.rad is not None
            rad = ex.rad.ravel()[flat]
            out = [f"|e| <= {r:.3g}" if u else o for o, u, r in zip(out, unknown, rad, strict=True)]
        return out


def summary_of(grads: list[GradColumns], precision: str) -> dict[str, int]:
    counts = sum((g.counts(precision) for g in grads), np.zeros(len(VERDICTS), dtype=np.int64))
    out = {v: int(n) for v, n in zip(VERDICTS, counts, strict=True)}
    kinds = sum(
        (np.bincount(g.cols[precision].kind.ravel(), minlength=len(SUBKINDS)) for g in grads),
        np.zeros(len(SUBKINDS), dtype=np.int64),
    )
    out["rounding_zero_underflow"] = int(kinds[SUBKINDS.index("underflow")])
    out["rounding_zero_lost"] = int(kinds[SUBKINDS.index("lost")])
    return out
