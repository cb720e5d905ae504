"""``torch.utils.checkpoint`` as a plain call while fpgrad traces or runs a model."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch


class _Recompute:
    """``torch.utils.checkpoint``'s reentrant form, as a plain call (see :func:`no_checkpoint`)."""

    @staticmethod
    def apply(function: Callable[..., Any], _preserve: bool, *args: Any) -> Any:
        if torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args
        ):
            return function(*args)
        with torch.no_grad():  # torch's: no input that requires grad, no gradient through it
            return function(*args)


def _plain_generator(*_args: Any, **_kwargs: Any) -> Any:
    yield  # checkpoint(use_reentrant=False) runs its function between two next() calls


@contextmanager
def no_checkpoint() -> Any:
    """``torch.utils.checkpoint.checkpoint`` (either form, so ``checkpoint_sequential`` too) as
    a plain call of its function. Checkpointing saves memory by running the forward again in
    the backward; the recomputed values are the forward's own, so the loss and gradients are
    the same bit for bit, but the recomputation re-enters the modules inside the backward,
    which make_fx's module stack rejects and which would not pair op by op with the graph."""
    import torch.utils.checkpoint as ckpt

    saved = ckpt.CheckpointFunction, ckpt._checkpoint_without_reentrant_generator
    ckpt.CheckpointFunction = _Recompute  # type: ignore[misc,assignment]
    ckpt._checkpoint_without_reentrant_generator = _plain_generator
    try:
        yield
    finally:
        ckpt.CheckpointFunction = saved[0]  # type: ignore[misc]
        ckpt._checkpoint_without_reentrant_generator = saved[1]
