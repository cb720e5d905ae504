"""Detectors over training trajectories; each returns a computed verdict and where it begins.

- stall: parameters bit-identical for ``k`` consecutive steps while the exact run still moves;
- loss floor: the run's loss flat over the last window while above the exact loss, which
  still falls;
- limit cycle: an exact recurrence of the whole state (parameters, optimizer and scaler
  state): period and first step (period 1 is a fixed point);
- divergence: relative distance to the exact parameters, its growth rate (least-squares slope
  of log2 distance per step) and the first step where it exceeds a threshold; with a one-ulp
  perturbed twin, ``chaotic`` when the twins separate exponentially, ``stable`` otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def detect_stall(moved: list[bool], exact_moved: list[bool], k: int = 5) -> dict[str, Any]:
    """First run of >= k steps where the run did not move but the exact run did."""
    start, length = None, 0
    best: tuple[int, int] | None = None
    for t, (m, em) in enumerate(zip(moved, exact_moved, strict=True)):
        if not m and em:
            if start is None:
                start, length = t, 0
            length += 1
            if length >= k and best is None:
                best = (start, length)
            if best is not None and best[0] == start:
                best = (start, length)
        else:
            start, length = None, 0
    if best is None:
        return {"detected": False, "k": k}
    until_end = best[0] + best[1] == len(moved)
    return {
        "detected": True,
        "k": k,
        "start_step": best[0],
        "length": best[1],
        "until_end": until_end,
    }


def detect_loss_floor(
    loss: list[float], exact_loss: list[float], window: int | None = None, flat_tol: float = 1e-3
) -> dict[str, Any]:
    """Plateau of the run's loss above the exact loss over the last ``window`` steps."""
    n = len(loss)
    window = window or max(5, n // 5)
    if n < window + 1:
        return {"detected": False, "reason": "too few steps"}
    tail = np.asarray(loss[-window:], dtype=np.float64)
    etail = np.asarray(exact_loss[-window:], dtype=np.float64)
    if not np.all(np.isfinite(tail)):
        return {"detected": False, "reason": "non-finite loss"}
    level = float(tail[-1])
    spread = float(np.max(tail) - np.min(tail))
    flat = spread <= flat_tol * max(abs(level), np.finfo(float).tiny)
    exact_falls = etail[-1] < etail[0]
    above = level > float(etail[-1]) * (1 + 1e-2) and level > 0
    detected = bool(flat and exact_falls and above)
    out: dict[str, Any] = {"detected": detected, "floor": level, "exact_final": float(etail[-1])}
    if detected:  # first step from which the loss stays within the plateau band
        band = max(spread, flat_tol * abs(level))
        arr = np.asarray(loss, dtype=np.float64)
        inside = np.abs(arr - level) <= band
        start = n - 1
        while start > 0 and inside[start - 1]:
            start -= 1
        out["start_step"] = int(start)
        out["ratio_to_exact"] = level / float(etail[-1]) if etail[-1] > 0 else math.inf
    return out


def detect_cycle(state_hash: list[str]) -> dict[str, Any]:
    """First exact recurrence of the whole state: ``first_step`` s and ``period`` p with
    state[s] == state[s + p]."""
    seen: dict[str, int] = {}
    for t, h in enumerate(state_hash):
        if h in seen:
            s = seen[h]
            return {"detected": True, "first_step": s, "period": t - s, "fixed_point": t - s == 1}
        seen[h] = t
    return {"detected": False}


def relative_distance(params: list[np.ndarray], exact_params: list[np.ndarray]) -> list[float]:
    """||p_t - e_t|| / max(||e_t||, ||e_0||): relative to the parameters' scale, which stays
    meaningful when the exact parameters converge to zero."""
    out = []
    start = float(np.linalg.norm(exact_params[0])) if exact_params else 0.0
    for p, e in zip(params, exact_params, strict=True):
        norm = max(float(np.linalg.norm(e)), start)
        with np.errstate(all="ignore"):
            d = float(np.linalg.norm(p - e))
        out.append(d / norm if norm > 0 else d)
    return out


def growth_rate(dist: list[float], threshold: float) -> float | None:
    """Least-squares slope of log2(distance) per step over the steps where 0 < d, up to the
    first step beyond ``threshold`` (after that the run has left the trajectory and the
    distance no longer measures growth)."""
    t = np.arange(len(dist), dtype=np.float64)
    d = np.asarray(dist, dtype=np.float64)
    beyond = np.flatnonzero(~np.isfinite(d) | (d >= threshold))
    end = int(beyond[0]) if beyond.size else d.size
    ok = (t < end) & (d > 0)
    if ok.sum() < 3:
        return None
    slope = np.polyfit(t[ok], np.log2(d[ok]), 1)[0]
    return float(slope)


def detect_divergence(
    dist: list[float], twin_sep: list[float] | None = None, threshold: float = 0.1
) -> dict[str, Any]:
    """Distance to the exact run; chaos test from the separation of a one-ulp perturbed twin."""
    d = np.asarray(dist, dtype=np.float64)
    beyond = np.flatnonzero(~np.isfinite(d) | (d > threshold))
    out: dict[str, Any] = {
        "threshold": threshold,
        "final_distance": float(d[-1]) if d.size else None,
        "exceeds_at_step": int(beyond[0]) if beyond.size else None,
        "growth_log2_per_step": growth_rate(dist, threshold),
    }
    if twin_sep is not None:
        sep = np.asarray(twin_sep, dtype=np.float64)
        rate = growth_rate(twin_sep, threshold)
        finite = sep[np.isfinite(sep)]
        grown = finite.size > 0 and sep[0] > 0 and float(np.max(finite)) > 2.0**10 * float(sep[0])
        chaotic = bool(rate is not None and rate > 0.05 and grown)
        out["twin"] = {
            "initial_separation": float(sep[0]) if sep.size else None,
            "final_separation": float(sep[-1]) if sep.size else None,
            "growth_log2_per_step": rate,
            "verdict": "chaotic" if chaotic else "stable",
        }
    return out


def first_overflow(nonfinite: list[bool]) -> int | None:
    return next((t for t, bad in enumerate(nonfinite) if bad), None)


def detect_diverged(params: list[np.ndarray]) -> dict[str, Any]:
    """The first step whose parameters hold NaN or inf: the run diverged there, and stall,
    fixed point, limit cycle, loss floor and a stable twin mean nothing after it."""
    for t, p in enumerate(params):
        if not np.all(np.isfinite(p)):
            return {"detected": True, "step": t}
    return {"detected": False}


def without_false_calm(detectors: dict[str, Any]) -> dict[str, Any]:
    """``detectors`` of a diverged run with stall, loss floor and limit cycle withdrawn (a NaN
    state repeats bit for bit, a NaN loss is flat) and the twin's verdict ``diverged``."""
    div = detectors.get("diverged", {})
    if not div.get("detected"):
        return detectors
    why = {"detected": False, "reason": f"diverged at step {div['step']}"}
    out = {**detectors, "stall": why, "loss_floor": why, "limit_cycle": why}
    if "twin" in detectors.get("divergence", {}):
        out["divergence"] = {
            **detectors["divergence"],
            "twin": {**detectors["divergence"]["twin"], "verdict": "diverged"},
        }
    return out
