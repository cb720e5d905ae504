"""Captured torch models in a sweep: the reference a cell carries (:class:`ScriptRef`), the
network hash (:func:`graph_hash`), loading per worker process and one compare cell.

A captured model (a user class, a traced graph) does not pickle, so a cell carries the
script's absolute spec and seed; the worker runs ``build()`` again (cached per process) and
refuses to compute when the network hash differs from the one the sweep recorded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fpgrad.errors import InputError

if TYPE_CHECKING:
    from fpgrad.graph.network import GraphNetwork


@dataclass(frozen=True)
class ScriptRef:
    """``/abs/script.py:build`` (or ``/abs/model.pt2:/abs/data.toml``) and the build's seed."""

    spec: str
    seed: int | None = None


def absolute_spec(spec: str) -> tuple[str, list[Path]]:
    """``spec`` with absolute paths, and the files whose bytes the network hash reads."""
    from fpgrad.graph.pt2 import is_pt2

    head, sep, tail = spec.partition(":")
    path = Path(head).resolve()
    if is_pt2(spec):
        data = Path(tail).resolve() if tail else path.with_suffix(".toml")
        return f"{path}:{data}", [path, data]
    return f"{path}{sep}{tail}", [path]


def graph_hash(net: GraphNetwork, files: list[Path], seed: int | None) -> str:
    """A digest of the script's (or program's and data file's) bytes, the build's seed and its
    output: the traced graph's code, parameters, buffers, inputs, targets and policies."""
    import numpy as np

    h = hashlib.sha256()

    def add(*parts: Any) -> None:
        for p in parts:
            h.update(repr(p).encode())
            h.update(b"\0")

    for f in files:
        try:
            h.update(f.read_bytes())
        except OSError as exc:
            raise InputError(f"cannot read {f}: {exc.strerror}") from None
    g = net.graph
    add(seed, g.gm.code, sorted((k, repr(v)) for k, v in net.policies.items()))
    arrays = [
        *((n, g.params[n]) for n in g.param_names),
        *((f"buffer {n}", b.detach().cpu().numpy()) for n, b in g.model.named_buffers()),
        *((f"input {i}", x) for i, x in enumerate(g.inputs)),
        ("targets", g.targets),
    ]
    for name, value in arrays:
        a = np.ascontiguousarray(value)
        add(name, a.dtype.str, a.shape)
        h.update(a.tobytes())
    return h.hexdigest()[:16]


_GRAPHS: dict[tuple[str, int | None], tuple[GraphNetwork, str]] = {}  #: this process's models
_KEEP = 4


def load(ref: ScriptRef, fresh: bool = False) -> tuple[GraphNetwork, str]:
    """The captured model of ``ref`` and its :func:`graph_hash` (cached per process;
    ``fresh``: build it again, as when the sweep starts, so that edits are seen)."""
    from fpgrad.graph.script import load_script

    key = (ref.spec, ref.seed)
    if fresh or key not in _GRAPHS:
        _GRAPHS.pop(key, None)
        net = load_script(ref.spec, ref.seed)
        digest = graph_hash(net, absolute_spec(ref.spec)[1], ref.seed)
        while len(_GRAPHS) >= _KEEP:
            _GRAPHS.pop(next(iter(_GRAPHS)))
        _GRAPHS[key] = (net, digest)
    return _GRAPHS[key]


def network(ref: ScriptRef, expected_hash: str) -> GraphNetwork:
    """The captured model of a cell, refused when it is not the one the sweep recorded."""
    net, digest = load(ref)
    if digest != expected_hash:  # this process built an older version: build it again
        net, digest = load(ref, fresh=True)
    if digest != expected_hash:
        raise InputError(
            f"{Path(ref.spec.partition(':')[0]).name} built another network in this worker (the script or "
            "its data changed during the sweep, or build() is not deterministic); fix it and rerun"
        )
    return net


def run_compare(net: GraphNetwork, axes: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    """One compare cell of a captured model: verdict counts, loss, first lost and inf/NaN."""
    from fpgrad.graph.compare import compare_graph

    precision = axes["precision"]
    c = compare_graph(
        net,
        [precision],
        exact_bits=opts["exact_bits"],
        allow_uncertified=opts["allow_uncertified"],
        loss_scale=axes.get("loss_scale", 1.0),
        reference=opts["reference"],
    )
    pol = c.policies.get(precision)
    return {
        "counts": c.counts(precision),
        "loss": {"value": c.loss[precision], "verdict": "", "kind": None},
        "first_rounding_zero": c.first_lost[precision],
        "first_nonfinite": c.first_nonfinite[precision],
        "certified_digits": c.exact.certified_digits,
        "exact_method": c.exact.method,
        "policy": pol["summary"] if pol else f"{c.kinds[precision]} {precision}",
    }
