"""Reusable work buffers for the optimizer records. Fresh float64 tensors of a few hundred
kilobytes can cost more than the arithmetic done in them on CPU (a new large allocation is
mapped and zeroed page by page), so the records write their temporaries into buffers kept
across steps: one per (slot, dtype, device), grown to the largest size asked for and dropped
when the watch ends. :meth:`Scratch.layout` also keeps the per-tensor views of a buffer
across steps (slicing a tensor costs microseconds of Python per view)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Layout:
    """A ``(rows, n)`` buffer cut into one view per tensor shape and row: ``views[r][j]`` is
    row ``r``'s piece for shape ``j``, ``sizes[j]`` its element count."""

    buf: torch.Tensor
    views: list[list[torch.Tensor]]
    sizes: list[int]
    _heads: dict[int, torch.Tensor] = field(default_factory=dict)
    _rows: dict[int, torch.Tensor] = field(default_factory=dict)
    _parts: dict[tuple[int, int], tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def head(self, k: int) -> torch.Tensor:
        """The first ``k`` rows of the buffer (a cached view)."""
        got = self._heads.get(k)
        if got is None:
            got = self._heads[k] = self.buf[:k]
        return got

    def row(self, r: int) -> torch.Tensor:
        """Row ``r`` of the buffer, flat (a cached view)."""
        got = self._rows.get(r)
        if got is None:
            got = self._rows[r] = self.buf[r]
        return got

    def parts(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """Rows ``start:stop`` split per tensor: ``(stop - start, sizes[j])`` views (cached)."""
        got = self._parts.get((start, stop))
        if got is None:
            got = self._parts[(start, stop)] = self.buf[start:stop].split(self.sizes, dim=1)
        return got


class Scratch:
    """Flat buffers by slot name; :meth:`get` gives a contiguous tensor of a shape, its values
    undefined (every user writes it in full before reading)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        self._layouts: dict[tuple, tuple[torch.Tensor, Layout]] = {}

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

    def layout(
        self,
        slot: str,
        rows: int,
        shapes: list[torch.Size],
        dtype: torch.dtype,
        device: torch.device,
    ) -> Layout:
        """Slot ``slot`` as a ``(rows, sum of sizes)`` buffer with a view per row and shape,
        kept across calls while the buffer and the shapes stay the same."""
        key = (slot, dtype, device, rows, tuple(shapes))
        flat = self._bufs.get((slot, dtype, device))
        got = self._layouts.get(key)
        if got is not None and got[0] is flat:
            return got[1]
        sizes = [s.numel() for s in shapes]
        buf = self.get(slot, (rows, sum(sizes)), dtype, device)
        views = []
        for r in range(rows):
            row, o, vs = buf[r], 0, []
            for s, n in zip(shapes, sizes, strict=True):
                vs.append(row[o : o + n].view(s))
                o += n
            views.append(vs)
        lay = Layout(buf, views, sizes)
        for k in [k for k in self._layouts if k[:3] == key[:3]]:  # one layout per slot
            del self._layouts[k]
        self._layouts[key] = (self._bufs[(slot, dtype, device)], lay)
        return lay

    def clear(self) -> None:
        self._bufs.clear()
        self._layouts.clear()
