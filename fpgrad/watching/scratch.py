"""Reusable work buffers for the optimizer records. Fresh float64 tensors of a few hundred
kilobytes can cost more than the arithmetic done in them on CPU (a new large allocation is
mapped and zeroed page by page), so the records write their temporaries into buffers kept
across steps: one per (slot, dtype, device), grown to the largest size asked for and dropped
when the watch ends."""

from __future__ import annotations

import torch


class Scratch:
    """Flat buffers by slot name; :meth:`get` gives a contiguous tensor of a shape, its values
    undefined (every user writes it in full before reading)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(
        self,
        slot: str,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        key = (slot, dtype, device)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self._bufs[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def clear(self) -> None:
        self._bufs.clear()
