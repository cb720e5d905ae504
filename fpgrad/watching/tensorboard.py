"""Watch records as TensorBoard scalars (``fpgrad.watch(..., tensorboard=DIR)`` and ``fpgrad
watch-report DIR --tensorboard TB``): the tags of :func:`fpgrad.present.report.watch_series.step_scalars`,
one point per sampled step, written with ``torch.utils.tensorboard.SummaryWriter``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fpgrad.errors import InputError
from fpgrad.present.report.watch_series import step_scalars
from fpgrad.watching.records import unwritable


class TensorBoardWriter:
    """Writes the scalars of each batch of records into an event file in ``logdir``."""

    def __init__(self, logdir: str | Path) -> None:
        if not str(logdir).strip():
            raise InputError("watch tensorboard= is empty; name a directory (or pass None)")
        try:
            import tensorboard  # noqa: F401  (SummaryWriter needs the package itself)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError(
                "watch tensorboard=: TensorBoard is not installed; pip install tensorboard"
            ) from None
        try:
            self._w = SummaryWriter(log_dir=str(logdir))
        except OSError as exc:
            raise unwritable("tensorboard", logdir, exc) from exc

    def write(self, recs: list[dict[str, Any]]) -> None:
        """Add the scalars of ``recs`` (whole steps) and flush, so TensorBoard sees them live."""
        for step, tags in sorted(step_scalars(recs).items()):
            for tag, value in tags.items():
                self._w.add_scalar(tag, value, global_step=step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()
