"""Spatial transformers: ``affine_grid_generator`` (``F.affine_grid``, 2-D) and
``grid_sampler_2d(_backward)`` (``F.grid_sample``, 2-D: ``bilinear`` and ``nearest``,
``zeros`` and ``border`` padding, ``align_corners`` either way; ``reflection`` and ``bicubic``
are refused).

The affine grid is ``base @ theta^T`` with torch's base grid: ``linspace(-1, 1, n)`` (torch's
float64 values in every system but a machine, which rounds them into its format), times
``(n - 1) / n`` unless ``align_corners``, each step an operation of the system (the exact
systems then hold the same base grid as the traced backward, whose ``linspace``, ``mul`` and
``div`` are graph nodes).

Sampling follows torch's vectorized CPU kernel (``GridSamplerKernel.cpp``): the source
coordinate ``(g + 1) * sf`` (``align_corners``, ``sf = (n - 1) / 2``) or
``(g + 1) * sf - 0.5`` (``sf = n / 2``); ``border`` clamps it into ``[0, n - 1]`` and zeroes
its gradient where it is clamped, the bounds included (``c <= 0`` or ``c >= n - 1``);
bilinear: ``x_w = floor(x)``, ``w = x - x_w``, ``e = 1 - w`` (and ``n``, ``s`` along y),
weights ``nw = s e``, ``ne = s w``, ``sw = n e``, ``se = n w``, a corner outside the image
reads 0, ``out = nw_val nw + ne_val ne + sw_val sw + se_val se``; nearest: the value at
``round(x), round(y)`` (half to even), 0 outside. Backward: ``gx = sum_c ((ne_val - nw_val) s
+ (se_val - sw_val) n) gOut`` then ``gx * mult`` (``sf``, or 0 where clamped), ``gy`` alike
with ``(sw_val - nw_val) e + (se_val - ne_val) w``; the input gradient adds ``weight * gOut``
to each corner inside the image (nearest: ``gOut`` to its pixel; its grid gradient is 0).

The exact systems compute the real coordinates; every integer part (``floor``, ``round``)
and every clamp decision is proven by the system's sign test (:func:`steps._floor`): a
coordinate the balls cannot place escalates, then ends undetermined, never guessed. An
emulated machine rounds each step above in its format; its input gradient adds the addends
of each pixel in output order, corners ``nw, ne, sw, se`` within an output position (the
scalar kernel's order; the vectorized kernel takes a vector of positions corner by corner,
so a pixel two positions of one vector both reach may differ in its last bit) and
``gx`` sums the channels one after another: no bit equality with torch is claimed there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fpgrad.arith.base import ExactDerivatives
from fpgrad.errors import InputError
from fpgrad.graph import shapes
from fpgrad.graph.ops.registry import op
from fpgrad.graph.ops.resample import _scatter
from fpgrad.graph.ops.steps import _floor, _integral, _pos

_MODES = {0: "bilinear", 1: "nearest", 2: "bicubic"}
_PADS = {0: "zeros", 1: "border", 2: "reflection"}


def _check(cx: Any, interp: int, padding: int) -> None:
    if int(interp) not in (0, 1) or int(padding) not in (0, 1):
        raise InputError(
            f"{cx.label()}: grid_sample mode={_MODES.get(int(interp), interp)!r}, "
            f"padding_mode={_PADS.get(int(padding), padding)!r} is not supported "
            "(modes 'bilinear' and 'nearest', padding 'zeros' and 'border')"
        )


# ---- affine_grid ------------------------------------------------------------------------


def _base_axis(cx: Any, n: int, align: bool) -> Any:
    """torch's ``linspace_from_neg_one``: linspace(-1, 1, n), times (n - 1) / n unless
    ``align_corners``; 0 for n <= 1."""
    ar = cx.ar
    if n <= 1:
        return ar.asarray(np.zeros(max(n, 1)))
    r = ar.asarray(torch.linspace(-1, 1, n, dtype=torch.float64).numpy())
    if not align:
        r = ar.div(ar.mul(r, ar.const(float(n - 1))), ar.const(float(n)))
    return r


@op("aten.affine_grid_generator.default")
def affine_grid_generator(cx: Any, theta: Any, size: Any, align_corners: bool) -> Any:
    """(N, H, W, 2) grid ``base @ theta^T`` per batch entry (4-D sizes only)."""
    if len(size) != 4:
        raise InputError(f"{cx.label()}: only 2-D affine grids (4-D sizes) are supported")
    n, _, h, w = (int(v) for v in size)
    ar = cx.ar
    xs = shapes.expand(shapes.reshape(_base_axis(cx, w, bool(align_corners)), (1, w)), (h, w))
    ys = shapes.expand(shapes.reshape(_base_axis(cx, h, bool(align_corners)), (h, 1)), (h, w))
    ones = ar.asarray(np.ones((h, w)))
    base = shapes.reshape(shapes.stack([xs, ys, ones], 2), (h * w, 3))
    parts = [
        shapes.reshape(ar.matmul(base, shapes.transpose(shapes.index(theta, i), 0, 1)), (1, h, w, 2))
        for i in range(n)
    ]
    return shapes.cat(parts, 0)


# ---- grid_sample ------------------------------------------------------------------------


def _coords(cx: Any, g: Any, size: int, align: bool, border: bool) -> tuple[Any, Any]:
    """(source coordinate, its gradient multiplier as a (N, Ho, Wo) value of the system)."""
    ar = cx.ar
    exact = isinstance(ar, ExactDerivatives)
    sf = (size - 1) / 2 if align else size / 2
    if align:
        c = ar.mul(ar.add(g, ar.const(1.0)), ar.const(sf))
    elif exact:
        c = ar.sub(ar.mul(ar.add(g, ar.const(1.0)), ar.const(sf)), ar.const(0.5))
    else:  # torch's CPU build contracts (g + 1) * sf - 0.5 into one fused multiply-add
        c = ar.fma(ar.add(g, ar.const(1.0)), ar.const(sf), ar.const(-0.5))
    s = shapes.shape(c)
    if not border:
        return c, ar.asarray(np.full(s, float(np.float64(ar.const(sf))) if not exact else sf))
    top = float(size - 1)
    if exact:
        low = ~_pos(ar, c)  # c <= 0
        high = ~_pos(ar, ar.sub(ar.const(top), c))  # c >= n - 1
    else:
        v = np.asarray(c, dtype=np.float64)
        low, high = ~(v > 0), v >= top  # NaN clamps to 0 (torch's clamp_min(0, in))
    c = ar.where(low, ar.asarray(np.zeros(s)), c)
    c = ar.where(high & ~low, ar.asarray(np.full(s, top)), c)
    sfv = sf if exact else float(np.float64(ar.const(sf)))
    return c, ar.asarray(np.where(low | high, 0.0, sfv))


def _split_floor(cx: Any, c: Any) -> tuple[np.ndarray, Any, Any]:
    """(integer floor as int64, floor as a value, c - floor) of a coordinate."""
    ar = cx.ar
    if isinstance(ar, ExactDerivatives):
        f, frac = _floor(ar, c)
    else:
        f = ar.asarray(np.floor(np.asarray(c, dtype=np.float64)))
        frac = ar.sub(c, f)
    return _ints(ar, f), f, frac


def _ints(ar: Any, f: Any) -> np.ndarray:
    v = np.asarray(ar.to_float64(f), dtype=np.float64)
    v = np.where(np.isnan(v), -2.0, v)
    return np.clip(v, -2.0, 2.0**40).astype(np.int64)


def _gather(cx: Any, x: Any, iy: np.ndarray, ix: np.ndarray, ok: np.ndarray) -> Any:
    """(N, C, Ho, Wo) values of ``x`` at (iy, ix) per batch entry, 0 where not ``ok``."""
    n, c, h, w = shapes.shape(x)
    yi, xi = np.clip(iy, 0, h - 1)[:, None], np.clip(ix, 0, w - 1)[:, None]
    nidx, cidx = np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None]
    v = shapes.index(x, (nidx, cidx, yi, xi))
    s = shapes.shape(v)
    if ok.all():
        return v
    return cx.ar.where(np.broadcast_to(ok[:, None], s), v, cx.ar.asarray(np.zeros(s)))


def _inside(i: np.ndarray, n: int) -> np.ndarray:
    return (i > -1) & (i < n)


def _geometry(cx: Any, x: Any, grid: Any, interp: int, padding: int, align: bool) -> dict:
    """Everything forward and backward share: corners, their masks, weights, multipliers."""
    _check(cx, interp, padding)
    _, _, h, w = shapes.shape(x)
    border = int(padding) == 1
    gx, gy = shapes.index(grid, (..., 0)), shapes.index(grid, (..., 1))
    cxv, mx = _coords(cx, gx, w, bool(align), border)
    cyv, my = _coords(cx, gy, h, bool(align), border)
    geo: dict[str, Any] = {"mx": mx, "my": my, "h": h, "w": w}
    if int(interp) == 1:
        ix = _ints(cx.ar, _round(cx, cxv))
        iy = _ints(cx.ar, _round(cx, cyv))
        geo["near"] = (iy, ix, _inside(ix, w) & _inside(iy, h))
        return geo
    ix, _, wd = _split_floor(cx, cxv)
    iy, _, nd = _split_floor(cx, cyv)
    ar = cx.ar
    one = ar.const(1.0)
    ed, sd = ar.sub(one, wd), ar.sub(one, nd)
    corners = {  # name: (iy, ix, mask, weight)
        "nw": (iy, ix, _inside(ix, w) & _inside(iy, h), ar.mul(sd, ed)),
        "ne": (iy, ix + 1, _inside(ix + 1, w) & _inside(iy, h), ar.mul(sd, wd)),
        "sw": (iy + 1, ix, _inside(ix, w) & _inside(iy + 1, h), ar.mul(nd, ed)),
        "se": (iy + 1, ix + 1, _inside(ix + 1, w) & _inside(iy + 1, h), ar.mul(nd, wd)),
    }
    geo.update(corners=corners, w_=wd, e_=ed, n_=nd, s_=sd)
    return geo


def _round(cx: Any, c: Any) -> Any:
    if isinstance(cx.ar, ExactDerivatives):
        return _integral(cx, c, "round")
    return cx.ar.asarray(np.rint(np.asarray(c, dtype=np.float64)))


def _per_channel(cx: Any, v: Any, c: int) -> Any:
    """(N, Ho, Wo) -> (N, C, Ho, Wo)."""
    n, ho, wo = shapes.shape(v)
    return shapes.expand(shapes.unsqueeze(v, 1), (n, c, ho, wo))


@op("aten.grid_sampler_2d.default")
def grid_sampler_2d(cx: Any, x: Any, grid: Any, interp: int, padding: int, align_corners: bool) -> Any:
    """(N, C, Ho, Wo) samples (module docstring: the rule per system)."""
    geo = _geometry(cx, x, grid, interp, padding, align_corners)
    c = shapes.shape(x)[1]
    if "near" in geo:
        return _gather(cx, x, *geo["near"])
    ar, out = cx.ar, None
    for iy, ix, ok, wt in geo["corners"].values():
        v, wc = _gather(cx, x, iy, ix, ok), _per_channel(cx, wt, c)
        out = ar.mul(v, wc) if out is None else _fma(ar, v, wc, out)
    return out


def _fma(ar: Any, a: Any, b: Any, c: Any) -> Any:
    """``a b + c``: one rounding on a machine (torch's CPU build contracts the kernel's
    ``acc + a * b``), the exact product and sum in the exact systems."""
    if isinstance(ar, ExactDerivatives):
        return ar.add(ar.mul(a, b), c)
    return ar.fma(a, b, c)


def _channel_sum(cx: Any, t: Any, g: Any) -> Any:
    """``sum_c t g`` over axis 1 of (N, C, Ho, Wo): from +0, channel after channel, each
    ``acc + t g`` fused on a machine (torch's loop as its CPU build compiles it)."""
    ar = cx.ar
    if isinstance(ar, ExactDerivatives):
        return shapes.squeeze_dims(ar.sum(ar.mul(t, g), axis=1, keepdims=True), [1])
    n, _, ho, wo = shapes.shape(t)
    acc = ar.asarray(np.zeros((n, ho, wo)))
    for k in range(shapes.shape(t)[1]):
        acc = ar.fma(shapes.index(t, (slice(None), k)), shapes.index(g, (slice(None), k)), acc)
    return acc


def _input_grad(cx: Any, terms: list[tuple[Any, np.ndarray, np.ndarray, np.ndarray]],
                xs: tuple[int, ...]) -> Any:  # fmt: skip
    """Zeros of ``xs`` with each (N, C, Ho, Wo) addend added at its pixel (iy, ix) where its
    mask holds; position after position, the terms' order within a position."""
    n, c, h, w = xs
    vals = shapes.stack([t[0] for t in terms], 4)  # (N, C, Ho, Wo, K)
    flat = np.stack([np.where(ok, np.clip(iy, 0, h - 1) * w + np.clip(ix, 0, w - 1), h * w)
                     for _, iy, ix, ok in terms], -1)  # fmt: skip  (N, Ho, Wo, K); h*w: dropped
    vals = shapes.reshape(vals, (n, c, -1))
    idx = np.repeat(flat.reshape(n, 1, -1), c, axis=1).reshape(n * c, -1)
    out = _scatter(cx, vals, idx, (n, c, h * w + 1), 1)
    return shapes.reshape(shapes.index(out, (slice(None), slice(None), slice(0, h * w))), xs)


@op("aten.grid_sampler_2d_backward.default")
def grid_sampler_2d_backward(cx: Any, g: Any, x: Any, grid: Any, interp: int, padding: int,
                             align_corners: bool, mask: Any = (True, True)) -> tuple:  # fmt: skip
    """(grad wrt the input, grad wrt the grid) (module docstring)."""
    ar = cx.ar
    geo = _geometry(cx, x, grid, interp, padding, align_corners)
    xs = tuple(int(v) for v in shapes.shape(x))
    c = xs[1]
    if "near" in geo:
        gi = _input_grad(cx, [(g, *geo["near"])], xs) if mask[0] else None
        return gi, ar.asarray(np.zeros(shapes.shape(grid)))
    cs = geo["corners"]
    val = {k: _gather(cx, x, iy, ix, ok) for k, (iy, ix, ok, _) in cs.items()}
    pc = {k: _per_channel(cx, geo[k + "_"], c) for k in ("w", "e", "n", "s")}
    tx = _fma(ar, ar.sub(val["se"], val["sw"]), pc["n"], ar.mul(ar.sub(val["ne"], val["nw"]), pc["s"]))
    ty = _fma(ar, ar.sub(val["se"], val["ne"]), pc["w"], ar.mul(ar.sub(val["sw"], val["nw"]), pc["e"]))
    gx = ar.mul(_channel_sum(cx, tx, g), geo["mx"])
    gy = ar.mul(_channel_sum(cx, ty, g), geo["my"])
    gg = shapes.stack([gx, gy], 3)
    gi = None
    if mask[0]:
        terms = [(ar.mul(_per_channel(cx, wt, c), g), iy, ix, ok) for iy, ix, ok, wt in cs.values()]
        gi = _input_grad(cx, terms, xs)
    return gi, gg
