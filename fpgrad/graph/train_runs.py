"""The runs of captured-model training: a mini-batch's graph (:class:`Trainee`), a torch dtype
or precision policy trained eagerly (:class:`GraphTorchRun`), an emulated format interpreting the
graph (:class:`GraphEmulatedRun`); :func:`fpgrad.graph.train.train_graph` runs them side by side."""

from __future__ import annotations

import copy
import dataclasses
import operator
import warnings
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fpgrad.errors import InputError
from fpgrad.graph.capture import Graph, copy_model, joint_function, loss_in
from fpgrad.graph.interpret import interpret
from fpgrad.graph.native import _NAMES, _into, model_in
from fpgrad.graph.ops.pointwise import MissingSlot
from fpgrad.graph.policy import CastMode, GraphPlan, how_key, resolve, scaled_seed
from fpgrad.run.optim import OptimConfig
from fpgrad.run.torch_native import DTYPES
from fpgrad.training.emulated_run import EmulatedRun
from fpgrad.training.history import _flat
from fpgrad.training.runs import RunSpec
from fpgrad.training.torch_run import _TorchState


@dataclasses.dataclass
class Trainee:
    """A captured model as the training code sees a network: its float64 parameters by name,
    its graph, no layers (no dead-unit count); :meth:`graph_at` a mini-batch's graph."""

    graph: Graph
    name: str
    layers: tuple[()] = ()
    #: batch size -> the model captured on that many samples (data replaced per batch)
    batches: dict[int, Graph] = dataclasses.field(default_factory=dict)

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self.graph.params

    @property
    def samples(self) -> int:
        """The number of samples ``build()`` returned (the first dimension of the inputs)."""
        x = self.graph.inputs[0] if self.graph.inputs else None
        return int(np.shape(x)[0]) if x is not None and np.ndim(x) else 1

    def check_batches(self) -> None:
        """Mini-batches cut every input and the targets along their first dimension: each
        must hold one entry per sample (else a one-line InputError)."""
        n = self.samples
        named = [*(f"input {i}" for i in range(len(self.graph.inputs))), "the targets"]
        for what, a in zip(named, [*self.graph.inputs, self.graph.targets], strict=True):
            if np.ndim(a) == 0 or np.shape(a)[0] != n:
                raise InputError(
                    f"--batch-size cuts every input and the targets into samples along their "
                    f"first dimension, but {what} has shape {tuple(np.shape(a))} for {n} samples; "
                    "return per-sample tensors from build() or drop --batch-size"
                )

    def all_rows(self, rows: np.ndarray | None) -> bool:
        """Whether ``rows`` is every sample in order (None: all)."""
        return rows is None or (
            len(rows) == self.samples and np.array_equal(rows, np.arange(self.samples))
        )

    def graph_at(self, rows: np.ndarray | None) -> Graph:
        """The graph on the samples ``rows`` (None: all of them, the captured graph): the model
        captured once per batch size, its data replaced by these samples."""
        if self.all_rows(rows):
            return self.graph
        rows = np.asarray(rows, dtype=np.int64)
        g = self.graph
        b = int(rows.size)
        if b not in self.batches:
            from fpgrad.graph.capture import capture

            first = [torch.from_numpy(np.ascontiguousarray(a[:b])) for a in (*g.inputs, g.targets)]
            self.batches[b] = capture(g.model, tuple(first[:-1]), first[-1], g.loss_fn)
        return dataclasses.replace(
            self.batches[b],
            params=g.params,
            inputs=[np.ascontiguousarray(a[rows]) for a in g.inputs],
            targets=np.ascontiguousarray(g.targets[rows]),
        )


class GraphTorchRun(_TorchState):
    """One torch dtype with its options: the module trained eagerly, as a torch loop does."""

    def __init__(self, net: Trainee, spec: RunSpec, cfg: OptimConfig, seed: int) -> None:
        from fpgrad.run.runlog import record

        self.net, self.spec = net, spec
        graph = net.graph
        #: a policy run: batch size -> the policy resolved on that batch's graph
        self.plans: dict[int, GraphPlan] = {}
        self.seeded: dict[tuple[int, float], list[fx.Node]] = {}  #: see :meth:`_nodes`
        plan = self._plan(None)
        record(spec.label, "native" if plan is None else how_key(plan))
        params = plan.params if plan is not None else spec.precision
        data = plan.data if plan is not None else spec.precision
        self.model = model_in(graph, params)
        named = dict(self.model.named_parameters())
        self.names = list(graph.param_names)
        self.params = [named[n] for n in self.names]
        self.inputs = [_into(x, data) for x in graph.inputs]
        self.y = _into(graph.targets, data)
        self.loss_fn = loss_in(graph.loss_fn, DTYPES[params], params)
        self._init_state(spec, cfg, seed)

    def _plan(self, rows: np.ndarray | None) -> GraphPlan | None:
        """The run's policy resolved on the graph of these samples (None: no policy)."""
        if self.spec.policy is None:
            return None
        b = self.net.samples if rows is None else len(rows)
        if b not in self.plans:
            self.plans[b] = resolve(self.spec.policy, self.net.graph_at(rows))
        return self.plans[b]

    def _nodes(self, rows: np.ndarray | None, scale: float) -> list[fx.Node]:
        """The op nodes a cast policy's run follows: the graph of these samples with the
        backward seeded by ``scale`` (:func:`fpgrad.graph.policy.scaled_seed`)."""
        key = (self.net.samples if rows is None else len(rows), scale)
        if key not in self.seeded:
            graph = scaled_seed(self.net.graph_at(rows), scale)
            self.seeded[key] = [n for n in graph.ops if n.target is not operator.getitem]
        return self.seeded[key]

    def _cast_joint(
        self, plan: GraphPlan, rows: np.ndarray | None, scale: float, params: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(loss, gradients of ``scale`` * loss) on the samples ``rows``, each op cast to its
        precision under ``plan`` (:class:`fpgrad.graph.policy.CastMode`, the graph's ops in
        order), at ``params`` (tensors that require grad)."""
        inputs, y = self._data(rows)
        mode = CastMode(
            self._nodes(rows, scale), plan.dtypes, keep_f64=plan.how == "cuda", owners=plan.owners
        )
        fn = joint_function(self.model, self.names, self.loss_fn, scale)
        with mode:
            out = fn(params, *inputs, y)
        mode.finish()
        return out[0], out[1]

    def _loss_and_grads(self, rows: np.ndarray | None, scale: float) -> torch.Tensor:
        """Forward and backward of ``scale`` * loss on the samples ``rows``, the parameters'
        ``.grad`` set; the loss. A policy run: under the real ``torch.autocast("cpu")`` around
        the forward and the loss (as a user's loop), or each op cast to its precision
        (:class:`fpgrad.graph.policy.CastMode`, the graph's ops in order)."""
        plan = self._plan(rows)
        if plan is not None and plan.how != "autocast":
            loss, grads = self._cast_joint(plan, rows, scale, self.params)
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
            return loss
        inputs, y = self._data(rows)
        if plan is not None:
            with torch.autocast("cpu", dtype=DTYPES[plan.autocast_dtype]):
                loss = self.loss_fn(self.model(*inputs), y)
        else:
            loss = self.loss_fn(self.model(*inputs), y)
        (loss * scale if scale != 1.0 else loss).backward()
        return loss

    def current_params(self) -> dict[str, np.ndarray]:
        """The parameters the forward pass uses, as float64 arrays by name."""
        return {
            k: p.detach().to(torch.float64).numpy().copy()
            for k, p in zip(self.names, self.params, strict=True)
        }

    def _data(self, rows: np.ndarray | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The inputs and targets of the samples ``rows`` (None: all)."""
        if self.net.all_rows(rows):
            return self.inputs, self.y
        idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return [x[idx] for x in self.inputs], self.y[idx]

    def step(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """One optimizer step on the samples ``rows`` (None: all); the unscaled gradients in
        float64."""
        hist = self.history
        for p in self.params:
            p.grad = None
        scale = self.scaler.scale if self.scaler is not None else 1.0
        loss = self._loss_and_grads(rows, scale)
        self.loss_format = _NAMES[loss.dtype]  #: where the backward starts (for reports)
        grads, finite = self._unscaled(scale)
        if hist.overflow_place is None:
            named = dict(zip(self.names, self.params, strict=True))
            hist.overflow_place = _first_nonfinite_place(
                named, loss, dict(zip(self.names, grads, strict=True)), len(hist.loss)
            )
            located = hist.overflow_place is not None and self.spec.policy is None
            if located and hist.overflow_place["direction"] != "parameter":  # type: ignore[index]
                hist.overflow_place = (
                    self._module_place(scale, len(hist.loss), rows) or hist.overflow_place
                )
        return self._update(self.names, grads, finite, loss, scale, {})

    def _module_place(
        self, scale: float, step: int, rows: np.ndarray | None = None
    ) -> dict[str, Any] | None:
        """The first leaf module whose output (forward) or input gradient (backward) holds
        inf/NaN, from a second pass of this step on a copy of the model with hooks (they
        observe; the training itself runs without them); None when none is found or the
        model refuses backward hooks (in-place ops on a module's input)."""
        model = copy_model(self.model)
        found: list[dict[str, Any]] = []

        def bad(values: Any) -> bool:
            items = values if isinstance(values, (tuple, list)) else (values,)
            return any(
                isinstance(t, torch.Tensor) and t.is_floating_point()
                and not bool(torch.isfinite(t).all())
                for t in items
            )  # fmt: skip

        def place(name: str, mod: nn.Module, direction: str, quantity: str) -> None:
            if not found:
                kind = type(mod).__name__
                found.append({"step": step, "layer": name, "direction": direction,
                              "quantity": quantity, "op": f"{name} ({kind}) {direction}"})  # fmt: skip

        def forward_hook(name: str) -> Any:
            def hook(mod: nn.Module, _inputs: Any, out: Any) -> None:  # returns None: observes
                if bad(out):
                    place(name, mod, "forward", "output")

            return hook

        def backward_hook(name: str) -> Any:
            def hook(mod: nn.Module, grad_in: Any, _grad_out: Any) -> None:
                if bad(grad_in):
                    place(name, mod, "backward", "dL/d(input)")

            return hook

        for name, mod in model.named_modules():
            if next(mod.children(), None) is None:  # leaf modules
                mod.register_forward_hook(forward_hook(name))
                mod.register_full_backward_hook(backward_hook(name))
        loss_fn = copy.deepcopy(self.loss_fn)
        if isinstance(loss_fn, nn.Module):  # the loss module: its backward runs first
            loss_fn.register_full_backward_hook(backward_hook("loss"))
        inputs, y = self._data(rows)
        try:
            with warnings.catch_warnings():  # the first module's input needs no gradient
                warnings.simplefilter("ignore", UserWarning)
                loss = loss_fn(model(*inputs), y)
                if bad(loss) and not found:
                    return None  # the loss itself: the simple place says so
                (loss * scale if scale != 1.0 else loss).backward()
        except RuntimeError:
            return None
        return found[0] if found else None

    def final_loss(self, rows: np.ndarray | None = None) -> float:
        """The unscaled loss at the current parameters on the samples ``rows`` (None: all),
        forward only."""
        plan = self._plan(rows)
        if plan is not None and plan.how != "autocast":  # the policy's forward and loss
            params = [p.detach().requires_grad_() for p in self.params]
            return float(self._cast_joint(plan, rows, 1.0, params)[0].detach().to(torch.float64))
        inputs, y = self._data(rows)
        with torch.no_grad(), torch.autocast(
            "cpu", dtype=DTYPES[plan.autocast_dtype] if plan else torch.bfloat16,
            enabled=plan is not None,
        ):  # fmt: skip
            return float(self.loss_fn(self.model(*inputs), y).to(torch.float64))


class GraphEmulatedRun(EmulatedRun):
    """One emulated format (:mod:`fpgrad.arith.emulated`) with +master or +sr: the graph
    interpreted on the strict machine, then the optimizer of :class:`EmulatedRun` (the update
    rounded once, as torch's kernels). No loss scaling: the graph's backward starts at 1."""

    net: Trainee  # type: ignore[assignment]

    def step(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        hist, oa = self.history, self.opt_ar
        try:
            it = interpret(self.net.graph_at(rows), self.ar, self.params, keep=False)
        except MissingSlot as exc:
            raise InputError(f"{self.spec.label}: {exc}; train it natively instead") from None
        grads = {k: oa.asarray(g) for k, g in it.grads.items()}  # widening: exact
        finite = all(bool(np.all(np.isfinite(g))) for g in grads.values())
        if hist.overflow_place is None:
            hist.overflow_place = _first_nonfinite_place(
                self.params, it.loss, grads, len(hist.loss)
            )
        before = self.vector()
        self.apply(grads)
        g64 = {k: np.asarray(g, dtype=np.float64) for k, g in grads.items()}
        intended = _flat(list(self.opt.intended.values()))
        self._record(float(it.loss), g64, intended, before, finite, True, 1.0, {})
        return g64

    def final_loss(self, rows: np.ndarray | None = None) -> float:
        graph = self.net.graph_at(rows)
        return float(interpret(graph, self.ar, self.params, keep=False).loss)


def _first_nonfinite_place(
    params: dict[str, Any], loss: Any, grads: dict[str, Any], step: int
) -> dict[str, Any] | None:
    """The first of: a parameter, the loss, a parameter gradient (graph order) holding inf/NaN
    at this step (values: tensors or float64 arrays), or None."""

    def bad(v: Any) -> bool:
        if isinstance(v, torch.Tensor):
            return not bool(torch.isfinite(v).all())
        return not bool(np.all(np.isfinite(np.asarray(v, dtype=np.float64))))

    def where(name: str, direction: str, quantity: str, op: str) -> dict[str, Any]:
        layer = name.rsplit(".", 1)[0] if "." in name else name
        return {"step": step, "layer": layer, "direction": direction, "quantity": quantity,
                "op": op}  # fmt: skip

    for name, p in params.items():
        if bad(p):
            return where(name, "parameter", name, "the previous update")
    if bad(loss):
        return where("loss", "forward", "L", "the forward pass or the loss")
    for name, g in grads.items():
        if bad(g):
            return where(name, "backward", f"dL/d{name}", "the backward pass")
    return None
