"""``fpgrad.watch``: observe every aten op of the user's own training loop, changing nothing.

A step starts at the model's first forward call after the previous step ended, and ends after
``scaler.update()`` (with a GradScaler), else after ``optimizer.step()`` (with an optimizer),
else at the model's next forward call (each forward, with its backward, is a step); a forward
in backward (``torch.utils.checkpoint``'s recompute) neither starts nor ends one. On sampled
steps (every ``every``-th, from step 0) a ``TorchDispatchMode`` sees each aten op forward and
backward: it runs the op exactly as it would run unwatched and then records statistics of the
outputs (fpgrad.watching.classify); view ops, which copy nothing, and ops returning uninitialised
memory (``empty``, ``empty_like``, ...: :data:`UNINITIALISED`) are not recorded. Ops after the
backward pass and outside the model (GradScaler's unscaling, gradient clipping) have direction
``post-backward``. Ops inside ``optimizer.step()`` run unobserved and are summarised per
parameter (fpgrad.watching.optimizer). Unsampled steps run with no mode installed.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch._C._dynamo.eval_frame import set_eval_frame
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from fpgrad.errors import InputError
from fpgrad.watching.adam_pass import adam_updates
from fpgrad.watching.casts import forget, written
from fpgrad.watching.classify import op_stats
from fpgrad.watching.modules import ModuleStack
from fpgrad.watching.optimizer import ShadowOptimizer, step_records, widen
from fpgrad.watching.records import JsonlWriter, read_records
from fpgrad.watching.scratch import Scratch
from fpgrad.watching.tensorboard import TensorBoardWriter

#: Ops whose outputs hold uninitialised memory (garbage until written): never recorded.
UNINITIALISED = frozenset(
    "empty empty_like empty_strided new_empty new_empty_strided empty_permuted".split()
)


class _Mode(TorchDispatchMode):
    """Hands each aten op to the watcher. torch wraps a mode's ``__torch_dispatch__`` in
    ``torch._disable_dynamo`` (about 1 us of Python per op); this mode opts out of that wrapper
    and does the same itself: the frame is marked for Dynamo to skip (once, when a watch
    starts) and Dynamo's frame callback is off while the watcher runs (``set_eval_frame(None)``,
    the prior callback restored after), so no frame of the watcher is compiled."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self, watcher: Watcher) -> None:
        super().__init__()
        self.watcher = watcher

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        prior = set_eval_frame(None)
        try:
            plain = self.watcher._plain.get(id(func))  # a view: run it, nothing to record
            if plain is not None and plain[0] is func:
                return plain[1](*args, **(kwargs or {}))
            return self.watcher._on_op(func, args, kwargs or {})
        finally:
            set_eval_frame(prior)


#: The watch now entered (one at a time: each would see the other's ops and its statistics).
_ACTIVE: list[Watcher] = []


#: The code of torch's step wrapper (``Optimizer.profile_hook_step``), which runs the step hooks.
_STEP_CODE = getattr(
    torch.optim.Optimizer.profile_hook_step(lambda *a, **k: None), "__code__", None
)


def _nested(opt: Any) -> bool:
    """Whether a step hook runs for a step called inside another step of ``opt``: a subclass
    whose ``step`` calls ``super().step()`` runs torch's wrapper, and so the hooks, twice once
    the parent class has its wrapper too. Such an inner step is part of the outer one."""
    f, seen = sys._getframe(1), 0
    while f is not None:
        if f.f_code is _STEP_CODE and f.f_locals.get("self") is opt:
            seen += 1
            if seen > 1:
                return True
        f = f.f_back  # type: ignore[assignment]
    return False


def _clone(x: Any) -> Any:
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


class Watcher:
    """The context manager returned by :func:`watch`; ``records()`` gives what it saw."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scaler: Any = None,
        out: str | None = None,
        every: int = 1,
        tensorboard: str | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"watch: model must be a torch.nn.Module (got {type(model).__name__})")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise InputError("watch: optimizer must be a torch.optim.Optimizer or None")
        if scaler is not None and not (hasattr(scaler, "update") and hasattr(scaler, "get_scale")):
            raise InputError("watch: scaler must be a torch.amp.GradScaler or None")
        for option, value in (("out", out), ("tensorboard", tensorboard)):
            if value is not None and (
                isinstance(value, bytes) or not isinstance(value, (str, os.PathLike))
            ):
                raise InputError(f"watch: {option} must be a directory path (str or pathlib.Path) "
                                 f"or None (got {type(value).__name__})")  # fmt: skip
            if value is not None and not str(value).strip():
                raise InputError(f"watch: {option} is empty; name a directory (or pass None)")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"watch: every must be a positive integer (got {every!r})")
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.out, self.every, self.tensorboard = out, every, tensorboard
        self._records: list[dict[str, Any]] = []
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._mode = _Mode(self)
        self._ops: dict[int, tuple[Any, bool, bool, str, Any]] = {}
        #: id of an op neither mutable nor recorded (views, ...) -> (the op, its ``_op``)
        self._plain: dict[int, tuple[Any, Any]] = {}
        self._scratch = Scratch()
        self._shadow_opt = ShadowOptimizer()
        self._step = 0
        self._before: dict[int, torch.Tensor] | None = None  # float64 weights before a step
        self._requested: dict[int, torch.Tensor] | None = None  # the requested updates
        self._in_step = self._sampling = self._mode_on = self._closure = False
        self._in_closure = 0  # a step's closure is running (its forwards are within the step)
        self._phase = "model"

    # ---- public ---------------------------------------------------------------------------
    def records(self) -> Any:
        """All records so far (a pandas DataFrame when pandas is installed, else dicts). With
        ``out=DIR`` they are read back from DIR/records.jsonl (memory holds none of them)."""
        recs = read_records(self.out) if self.out is not None else list(self._records)
        try:
            import pandas as pd
        except ImportError:
            return recs
        return pd.DataFrame(recs)

    def __enter__(self) -> Watcher:
        if _ACTIVE:
            raise InputError(
                "watch: another fpgrad.watch is active (one at a time; watch several models "
                "as one nn.Module holding them)"
            )
        if not getattr(_Mode.__torch_dispatch__, "_torchdynamo_disable", False):
            from torch._dynamo.decorators import skip  # torch.optim imports it anyway

            skip(_Mode.__torch_dispatch__)
        self._writer = JsonlWriter(self.out) if self.out is not None else None
        self._tb = TensorBoardWriter(self.tensorboard) if self.tensorboard is not None else None
        self._handles = [self.model.register_forward_pre_hook(self._on_forward, prepend=True)]
        self._stack = ModuleStack(self.model, lambda: self._sampling)
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._opt_pre))
            self._handles.append(self.optimizer.register_step_post_hook(self._opt_post))
        if self.scaler is not None:
            original = self.scaler.update
            self._prior_update = vars(self.scaler).get("update")

            def update(new_scale: Any = None) -> None:
                if not self._in_step:  # (an update with no forward since the last step)
                    self._begin_step()
                used = self._own_read(self.scaler.get_scale)
                try:
                    original(new_scale)
                except BaseException:  # (no inf checks recorded, ...): the step ends here
                    self._end_step(scale=used)
                    raise
                self._end_step(scale=used, next_scale=self._own_read(self.scaler.get_scale))

            self.scaler.update = update
        self._emit(
            [
                {
                    "kind": "meta",
                    "every": self.every,
                    "model": type(self.model).__name__,
                    "optimizer": type(self.optimizer).__name__ if self.optimizer else None,
                    "scaler": self.scaler is not None
                    and bool(getattr(self.scaler, "is_enabled", lambda: True)()),
                }
            ]
        )
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if self._in_step:  # cut by the exit: neither stepped nor skipped is known
            self._end_step(cut=True)
        for h in self._handles:
            h.remove()
        self._stack.close()
        if self.scaler is not None and "update" in vars(self.scaler):
            if self._prior_update is not None:
                self.scaler.update = self._prior_update
            else:
                del self.scaler.update
        if self._writer is not None:
            self._writer.close()
        if self._tb is not None:
            self._tb.close()
        self._scratch.clear()

    def _own_read(self, read: Any) -> float:
        """``float(read())`` run unobserved: the watch's own ops (the loss scale's
        ``_local_scalar_dense``) take no op number of the user's step."""
        prior, self._phase = self._phase, "optimizer"
        try:
            return float(read())
        finally:
            self._phase = prior

    # ---- steps ----------------------------------------------------------------------------
    def _emit(self, recs: list[dict[str, Any]]) -> None:
        if self._tb is not None:
            self._tb.write(recs)
        if self._writer is not None:
            self._writer.write(recs)
        else:
            self._records.extend(recs)

    def _on_forward(self, module: Any, inputs: Any) -> None:
        if torch._C._current_graph_task_id() != -1:
            return  # a recompute in backward (torch.utils.checkpoint): within the step
        # a new forward: ops outside the model are forward again (gradient accumulation), and
        # what a backward that raised left on the module stack is dropped
        self._backward_seen = False
        self._stack.backward_ended()
        self._end_raised_step()
        if self._in_step and self.optimizer is None and self.scaler is None:
            self._end_step()
        if not self._in_step:
            self._begin_step()

    def _end_raised_step(self) -> None:
        """The previous ``optimizer.step()`` raised (its post-hook never ran: the phase is still
        the optimizer's, and no closure of it runs) and the loop went on: that step ends here,
        not stepped."""
        if self._phase == "optimizer" and not self._in_closure:
            self._phase = "model"
            self._before = self._requested = None
            if self._in_step:
                self._end_step()

    def _begin_step(self) -> None:
        self._in_step, self._stepped, self._backward_seen = True, False, False
        self._sampling = self._step % self.every == 0
        self._seq = 0
        self._pending: list[dict[str, Any]] = []
        self._first: dict[str, Any] | None = None
        if self._sampling:
            self._mode.__enter__()
            self._mode_on = True

    def _end_step(
        self, scale: float | None = None, next_scale: float | None = None, cut: bool = False
    ) -> None:
        if self._mode_on:
            self._mode.__exit__(None, None, None)
            self._mode_on = False
        self._stack.clear_grad_hooks()
        if cut:
            skipped = None
        elif self.optimizer is not None:
            skipped = not self._stepped
        elif scale is not None and next_scale is not None:
            skipped = next_scale < scale
        else:
            skipped = None
        rec = {
            "kind": "step",
            "step": self._step,
            "sampled": self._sampling,
            "ops": self._seq,
            "scale": scale,
            "next_scale": next_scale,
            "skipped": skipped,
            "first_nonfinite": self._first,
        }
        self._emit([*self._pending, rec])
        self._pending = []
        forget()  # counts of this step's outputs: the casts of later steps read new tensors
        self._step += 1
        self._in_step = self._sampling = False

    # ---- ops --------------------------------------------------------------------------------
    def _op_info(self, func: Any) -> tuple[Any, bool, bool, str, Any]:
        """(the op, mutable, not recorded, name, what runs it) of an aten op, cached per op (by
        ``id``: an OpOverload's ``__hash__`` is Python code; the op kept to check the entry is
        its own). An OpOverload runs as its ``_op`` (what its ``__call__`` calls, one Python
        frame less); an op neither mutable nor recorded also goes to :attr:`_plain`."""
        info = self._ops.get(id(func))
        if info is None or info[0] is not func:
            skip = func.is_view or func.overloadpacket.__name__ in UNINITIALISED
            mutable = func._schema.is_mutable
            run = getattr(func, "_op", None) if isinstance(func, torch._ops.OpOverload) else None
            run = run if callable(run) else func
            info = self._ops[id(func)] = (func, mutable, skip, str(func), run)
            if skip and not mutable:
                self._plain[id(func)] = (func, run)
        return info

    def _on_op(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if not self._sampling or self._phase == "optimizer":
            return func(*args, **kwargs)
        _, mutable, skip, op, run = self._op_info(func)
        before = None
        if mutable and not skip:
            before = tree_map(_clone, (args, kwargs))
        out = run(*args, **kwargs)
        if mutable:  # (through an alias such as ``y.data``, y's version is unchanged)
            written(func, args, kwargs)
        if skip:
            return out
        backward = torch._C._current_graph_task_id() != -1
        self._backward_seen |= backward
        if not backward and self._stack._callback_queued:  # a backward raised: drop its stack
            self._stack.backward_ended()
        a, k = before if before is not None else (args, kwargs)
        module = self._stack.current
        if backward:
            direction = "backward"
        elif self._backward_seen and module == "(outside)":
            direction = "post-backward"
        else:
            direction = "forward"
        for row in op_stats(func, a, k, out):
            row.update(
                kind="op", step=self._step, seq=self._seq, module=module, op=op, direction=direction
            )
            if self._first is None and row["infs"] + row["nans"]:
                self._first = {
                    "seq": self._seq,
                    "module": module,
                    "op": op,
                    "direction": row["direction"],
                    "created": row["infs_created"] + row["nans_created"] > 0,
                    "inherited": row["infs_inherited"] + row["nans_inherited"]
                    == row["infs"] + row["nans"],
                }
            elif (
                self._first is not None
                and not self._first["created"]
                and row["infs_created"] + row["nans_created"]
            ):
                self._first = {
                    "seq": self._seq,
                    "module": module,
                    "op": op,
                    "direction": row["direction"],
                    "created": True,
                    "inherited": False,
                }
            self._pending.append(row)
        self._seq += 1
        return out

    # ---- optimizer ------------------------------------------------------------------------
    def _opt_pre(self, opt: Any, args: Any, kwargs: Any) -> Any:
        if _nested(opt):
            return None
        self._end_raised_step()  # (no forward since it)
        if not self._in_step:  # (a step with no forward since the last one)
            self._begin_step()
        self._phase = "optimizer"
        self._before = self._requested = None
        # ``step(closure)`` (args: the optimizer, then the step's own): the closure's forward and
        # backward run inside the step (their ops unrecorded) and make the gradients the step
        # uses, so no optimizer record either
        positional = len(args) > 1 and args[1] is not None
        self._closure = positional or kwargs.get("closure") is not None
        if self._mode_on:  # the optimizer's own ops are not recorded: run them unobserved
            self._mode.__exit__(None, None, None)
            self._mode_on = False
        if self._sampling and not self._closure:  # float64 copies for the statistics
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            self._before = widen(params, self._scratch)
            self._requested = adam_updates(opt, self._before, self._scratch)
            if self._requested is None:
                self._requested = self._shadow_opt.requested_updates(opt, self._before)
        if not self._closure:
            return None
        # the closure runs marked, so that a forward after a step whose closure raised ends it
        closure = args[1] if positional else kwargs["closure"]

        def marked(*a: Any, **k: Any) -> Any:
            self._in_closure += 1
            try:
                return closure(*a, **k)
            finally:
                self._in_closure -= 1

        if positional:
            return (args[0], marked, *args[2:]), kwargs
        return args, {**kwargs, "closure": marked}

    def _opt_post(self, opt: Any, args: Any, kwargs: Any) -> None:
        if _nested(opt):
            return
        self._stepped, self._closure = True, False
        if self._before is not None:
            recs = step_records(opt, self._names, self._before, self._requested, self._scratch)
            for rec in recs:
                rec.update(kind="optimizer", step=self._step, direction="optimizer")
            self._pending.extend(recs)
            self._before = self._requested = None
        self._phase = "model"
        if self.scaler is None:
            self._end_step()
        elif self._sampling and self._in_step:
            self._mode.__enter__()
            self._mode_on = True


def watch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    out: str | None = None,
    every: int = 1,
    tensorboard: str | None = None,
) -> Watcher:
    """Watch a training loop: ``with fpgrad.watch(model, opt, scaler) as w: ...``; then
    ``w.records()``. ``out=DIR`` writes DIR/records.jsonl as it goes (flushed per step);
    ``every=N`` observes steps 0, N, 2N, ... only; ``tensorboard=DIR`` also writes per-module
    and per-parameter scalars there (fpgrad.watching.tensorboard; needs ``pip install
    tensorboard``)."""
    return Watcher(model, optimizer, scaler, out, every, tensorboard)
