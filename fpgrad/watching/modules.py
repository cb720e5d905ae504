"""Which module of the watched model is running, forward and backward.

Modelled on ``torch.utils.module_tracker.ModuleTracker``, but restricted to one model, keyed by
``named_modules`` paths and kept as a stack so the innermost module is known: forward pre/post
hooks push/pop in forward; in backward a multi-grad hook on a module's outputs pushes it and one
on its inputs pops it; the stack is cleared when the backward pass ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._pytree import tree_flatten

from fpgrad.watching.leaves import leaves

_PLAIN = (torch.Tensor, int, float, bool, str, type(None))


def _grad_tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x] if x.requires_grad else []
    flat = leaves(x)
    if not all(isinstance(t, _PLAIN) for t in flat):  # another container type: ask pytree
        flat, _ = tree_flatten(x)
    return [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]


def _grad_hook(ts: list[torch.Tensor], fn: Callable[..., None]) -> Any:
    """Call ``fn`` once the gradients of all of ``ts`` are computed in a backward pass: a plain
    tensor hook for one tensor (much cheaper), else a multi-grad hook. Of several tensors the
    leaves are left out (the non-leaves, else the first leaf alone): torch's multi-grad hook
    raises in ``torch.autograd.grad`` when one of its tensors is a leaf (pytorch#131753)."""
    if len(ts) > 1:
        ts = [t for t in ts if t.grad_fn is not None] or ts[:1]
    if len(ts) == 1:
        return ts[0].register_hook(lambda _grad: fn())
    return register_multi_grad_hook(ts, fn)


class ModuleStack:
    """The stack of module paths currently running; ``current`` is the innermost."""

    def __init__(self, model: torch.nn.Module, active: Callable[[], bool]) -> None:
        self.stack: list[str] = []
        self._current: tuple[tuple[str, ...], str] | None = None
        self._active = active
        self._handles: list[Any] = []
        self._grad_handles: list[Any] = []
        self._callback_queued = False
        for name, mod in model.named_modules():
            path = name or "(root)"
            # (with_kwargs: the inputs passed by keyword pop the module in backward too)
            self._handles.append(mod.register_forward_pre_hook(self._pre(path), with_kwargs=True))
            # (always_call: popped when the forward raises, too)
            self._handles.append(mod.register_forward_hook(self._post(path), always_call=True))

    @property
    def current(self) -> str:
        """The innermost running module: the latest entry that is no other entry's ancestor
        (in backward, a module and its parent can be entered by the same output's hook).
        Cached until the stack changes."""
        key = tuple(self.stack)
        if self._current is None or self._current[0] != key:
            self._current = (key, self._innermost())
        return self._current[1]

    def _innermost(self) -> str:
        for path in reversed(self.stack):
            if path == "(root)" and len(set(self.stack)) > 1:
                continue
            if not any(q.startswith(path + ".") for q in self.stack):
                return path
        return "(outside)"

    def _pop(self, path: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] == path:
                del self.stack[i]
                return

    def _bw_push(self, path: str) -> Callable[..., None]:
        def fn(*_: Any) -> None:
            if not self._callback_queued:
                torch.autograd.Variable._execution_engine.queue_callback(self._bw_done)
                self._callback_queued = True
            self.stack.append(path)

        return fn

    def _bw_pop(self, path: str) -> Callable[..., None]:
        return lambda *_: self._pop(path)

    def _bw_done(self) -> None:
        self.stack.clear()
        self._callback_queued = False

    def backward_ended(self) -> None:
        """No backward is running (the model's forward starts, outside backward): a backward
        that raised never ran its callback; drop what it left."""
        if self._callback_queued:
            self._bw_done()

    def _pre(self, path: str) -> Callable[..., None]:
        def hook(mod: torch.nn.Module, inputs: Any, kwargs: dict) -> None:
            self.stack.append(path)
            if self._active() and torch.is_grad_enabled():
                ts = _grad_tensors((inputs, kwargs) if kwargs else inputs)
                if ts:
                    self._grad_handles.append(_grad_hook(ts, self._bw_pop(path)))

        return hook

    def _post(self, path: str) -> Callable[..., None]:
        def hook(mod: torch.nn.Module, inputs: Any, output: Any) -> None:
            self._pop(path)
            if self._active() and torch.is_grad_enabled():
                ts = _grad_tensors(output)
                if ts:
                    self._grad_handles.append(_grad_hook(ts, self._bw_push(path)))

        return hook

    def clear_grad_hooks(self) -> None:
        for h in self._grad_handles:
            h.remove()
        self._grad_handles.clear()

    def close(self) -> None:
        self.clear_grad_hooks()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.stack.clear()
