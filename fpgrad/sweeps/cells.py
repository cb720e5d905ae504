"""One cell's work: the sweep's network (:class:`Source`, :func:`network_hash`), the tasks'
options, :func:`scale_init` and :func:`run_cell`."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fpgrad.diagnose.verdict_names import VERDICTS
from fpgrad.errors import InputError
from fpgrad.sweeps.grid import format_value

if TYPE_CHECKING:
    from fpgrad.model.network import Network
    from fpgrad.sweeps.captured import ScriptRef

COUNTS = VERDICTS  #: the verdict counts of a cell, in table order
#: options of each task (``sweep(..., **options)``) and their defaults
OPTIONS: dict[str, dict[str, Any]] = {
    # exact_bits None: fpgrad.reference.exact.DEFAULT_BITS
    "compare": {"exact_bits": None, "reference": "original", "allow_uncertified": False},
    "train": {
        "steps": None,
        "optimizer": "sgd",
        "momentum": 0.0,
        "weight_decay": 0.0,
        "decoupled": False,
        "batch_size": None,
        "exact_bits": 128,
        "verdict_every": None,
    },
}
DEFAULT_LR = 0.01  #: the learning rate of a training sweep without an lr axis


class Source:
    """The network of a sweep: a TOML network file or document (re-parsed per seed), a model
    file, a :class:`Network`, or a captured model's ``script.py:build`` / ``model.pt2``
    (built again per seed: ``build(seed=S)``)."""

    def __init__(self, network: str | Path | Mapping[str, Any] | Network):
        from fpgrad.graph.script import is_script
        from fpgrad.model.netfile import parse_network
        from fpgrad.model.network import Network

        self.doc: dict[str, Any] | None = None
        self.base = Path(".")
        self.where = "network"
        self.script: str | None = None  #: a captured model's absolute spec
        self._cache: dict[int | None, tuple[Any, str]] = {}
        if isinstance(network, (str, Path)) and is_script(str(network)):
            from fpgrad.sweeps import captured

            self.script = captured.absolute_spec(str(network))[0]
            self.where = str(network)
            self.network: Any = captured.load(captured.ScriptRef(self.script), fresh=True)[0]
            return
        if not isinstance(network, (str, Path, Mapping, Network)):
            raise InputError(
                "sweep a captured model by its script (script.py:build) or model.pt2: each "
                "worker builds it again"
            )
        if isinstance(network, Network):
            self.network = network
        elif isinstance(network, Mapping):
            self.doc = dict(network)
            self.network = parse_network(self.doc, base=self.base, source=self.where)
        else:
            from fpgrad.model.from_torch import is_model_doc, load_model_file, read_toml

            path = Path(network)
            doc = read_toml(path)
            if is_model_doc(doc):
                self.network = load_model_file(path).network
                self.where = str(path)
            else:
                self.doc, self.base, self.where = doc, path.parent, str(path)
                self.network = parse_network(doc, base=self.base, source=self.where)

    def at(self, seed: int | None) -> tuple[Any, str]:
        """The network with its init schemes drawn from ``seed`` (None, or a source without a
        TOML document: as given), and its :func:`network_hash`; a captured model: the
        :class:`~fpgrad.sweeps.captured.ScriptRef` a cell carries and its ``graph_hash``."""
        from fpgrad.model.netfile import parse_network

        if self.script is not None:
            from fpgrad.sweeps import captured

            if seed not in self._cache:
                ref = captured.ScriptRef(self.script, seed)
                self._cache[seed] = (ref, captured.load(ref, fresh=seed is not None)[1])
            return self._cache[seed]

        use = seed if self.doc is not None else None
        if use not in self._cache:
            net = self.network
            if self.doc is not None and use is not None:
                net = parse_network({**self.doc, "seed": use}, base=self.base, source=self.where)
            self._cache[use] = (net, network_hash(net))
        return self._cache[use]


def network_hash(net: Network) -> str:
    """A digest of everything a cell's result depends on in ``net`` (not its name)."""
    import numpy as np

    h = hashlib.sha256()

    def add(*parts: Any) -> None:
        for p in parts:
            h.update(repr(p).encode())
            h.update(b"\0")

    add(net.loss.kind, sorted((k, repr(v)) for k, v in net.policies.items()))
    for ly in net.layers:
        add(ly.name, ly.kind, ly.slope, ly.eps)
        for name, value in (*ly.params.items(), *ly.stats.items()):
            arr = np.ascontiguousarray(value, dtype=np.float64)
            add(name, arr.shape)
            h.update(arr.tobytes())
    for arr in (net.x, net.y):
        a = np.ascontiguousarray(arr)
        add(a.dtype.str, a.shape)
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def scale_init(net: Network, factor: float) -> Network:
    """Every dense layer's weight times ``factor`` (float64, rounded once); the rest unchanged."""
    if factor == 1.0:
        return net
    return net.with_params(
        {
            f"{ly.name}.weight": ly.params["weight"] * factor
            for ly in net.layers
            if ly.kind == "dense"
        }
    )


@dataclass(frozen=True)
class CellJob:
    """What a worker needs to run one cell (picklable; the network travels with it)."""

    task: str
    key: str
    axes: dict[str, Any]
    network: Network | ScriptRef
    network_hash: str
    options: dict[str, Any]


def run_cell(job: CellJob) -> dict[str, Any]:
    """Run one cell; a JSON-able record. Errors are recorded, never raised: ``status`` is
    ``ok``, ``input_error`` (the cell's input is refused) or ``internal_error`` (a bug)."""
    from fpgrad.jsonutil import jsonable

    record: dict[str, Any] = {"key": job.key, "axes": job.axes, "network_hash": job.network_hash}
    try:
        from fpgrad.sweeps import captured

        if isinstance(job.network, captured.ScriptRef):  # a captured model: build it here
            graph = captured.network(job.network, job.network_hash)
            if job.task == "compare":
                result = captured.run_compare(graph, job.axes, job.options)
            else:
                result = _run_train(job, graph)
        elif job.task == "compare":
            result = _run_compare(job)
        else:
            result = _run_train(job, scale_init(job.network, job.axes.get("init_scale", 1.0)))
        record.update(status="ok", **result)
    except InputError as exc:
        record.update(status="input_error", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on and exits 1
        record.update(status="internal_error", error=f"{type(exc).__name__}: {exc}")
    return jsonable(record)


def _run_compare(job: CellJob) -> dict[str, Any]:
    from fpgrad.diagnose.comparison import compare

    opts, axes = job.options, job.axes
    net = scale_init(job.network, axes.get("init_scale", 1.0))
    precision = axes["precision"]
    c = compare(
        net,
        precisions=[precision],
        exact_bits=opts["exact_bits"],
        reference=opts["reference"],
        allow_uncertified=opts["allow_uncertified"],
        loss_scale=axes.get("loss_scale", 1.0),
        exact=_exact_for(job, net),
        findings=False,  # a cell's record keeps counts, not the diagnosis in words
    )
    first = c.attribution[precision]["first_rounding_zero_backward"]
    return {
        "counts": c.summary[precision],
        "loss": {k: c.loss[precision][k] for k in ("value", "verdict", "kind")},
        "first_rounding_zero": f"{first['layer']} {first['quantity']}" if first else None,
        "certified_digits": c.certified_digits,
        "exact_method": c.exact_method,
        "policy": c.policies[precision]["summary"],
    }


_EXACT: dict[tuple[str, float, int, bool], Any] = {}  #: this process's recent exact traces
_EXACT_KEEP = 4


def _exact_for(job: CellJob, net: Network) -> Any:
    """The exact trace of the cell's network ``net`` (the job's network, init-scaled), shared
    by the cells of this process that evaluate the same network (other precisions, loss
    scales): it does not depend on them."""
    from fpgrad.graph.layers import exact_trace

    bits, allow = job.options["exact_bits"], job.options["allow_uncertified"]
    key = (job.network_hash, job.axes.get("init_scale", 1.0), bits, allow)
    if key not in _EXACT:
        while len(_EXACT) >= _EXACT_KEEP:
            _EXACT.pop(next(iter(_EXACT)))
        _EXACT[key] = exact_trace(net, bits, allow_uncertified=allow)
    return _EXACT[key]


def _run_train(job: CellJob, net: Any) -> dict[str, Any]:
    """One training cell of ``net`` (the job's network, init-scaled, or a captured model)."""
    from fpgrad.run.optim import OptimConfig
    from fpgrad.training import train

    opts, axes = job.options, job.axes
    run = axes["precision"]
    scale = axes.get("loss_scale", 1.0)
    if scale != 1.0:
        run += f"+scale={format_value(scale)}"
    cfg = OptimConfig(
        name=opts["optimizer"],
        lr=axes.get("lr", DEFAULT_LR),
        momentum=opts["momentum"],
        weight_decay=opts["weight_decay"],
        decoupled=opts["decoupled"],
    )
    r = train(
        net,
        steps=opts["steps"],
        cfg=cfg,
        runs=[run],
        batch_size=opts["batch_size"],
        seed=axes.get("seed", 0),
        exact_bits=opts["exact_bits"],
        verdict_every=opts["verdict_every"],
    )
    label = r.runs[0]
    h, det = r.histories[label], r.detectors[label]
    step = max(h.verdicts)
    counts = {v: h.verdicts[step].get(v, 0) for v in COUNTS}
    counts.update({k: n for k, n in h.verdicts[step].items() if k not in counts})
    overflow = det["first_overflow"]
    return {
        "counts": counts,
        "verdict_step": step,
        "loss": {"first": h.loss[0], "last": h.loss[-1], "exact_last": r.exact.loss[-1]},
        "distance": r.distance[label][-1],
        "swamped": det["swamped_fraction"]["total"],
        "skipped": sum(h.skipped),
        "nonfinite": any(h.nonfinite),
        "events": {
            "stall": det["stall"]["detected"],
            "loss_floor": det["loss_floor"]["detected"],
            "limit_cycle": det["limit_cycle"]["detected"],
            "chaotic": det["divergence"].get("twin", {}).get("verdict") == "chaotic",
            "first_overflow_step": overflow["step"] if overflow else None,
        },
        "certified_digits": r.exact_certified_digits,
        "policy": r.plans[label]["summary"],
    }
