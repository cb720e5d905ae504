"""Per-module and per-parameter series of watch records: what the report's timelines plot and
what ``tensorboard=DIR`` writes (one aggregation for both)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any


def module_sums(ops: list[dict[str, Any]]) -> dict[str, dict[int, list[int]]]:
    """Module path -> step -> [created zeros, subnormals, output elements, created infs + NaNs],
    summed over the op records (forward, backward and post-backward) of that module and step."""
    per: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0, 0]))
    for r in ops:
        a = per[r["module"]][r["step"]]
        a[0] += r["zeros_created"]
        a[1] += r["subnormals"]
        a[2] += r["numel"]
        a[3] += r["infs_created"] + r["nans_created"]
    return per


def step_scalars(recs: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Step -> TensorBoard tag -> value: per module ``zeros_created/M``, ``subnormal_share/M``
    (subnormals over output elements) and ``overflows_created/M`` (created infs + NaNs); per
    parameter ``swamped_share/P`` (when the optimizer's requested update is known); per step
    ``loss_scale`` and ``skipped`` (1.0 / 0.0) when a GradScaler / optimizer tells."""
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for m, by_step in module_sums([r for r in recs if r["kind"] == "op"]).items():
        for s, (zc, sub, n, ovf) in by_step.items():
            out[s][f"zeros_created/{m}"] = float(zc)
            out[s][f"subnormal_share/{m}"] = sub / max(n, 1)
            out[s][f"overflows_created/{m}"] = float(ovf)
    for r in recs:
        if r["kind"] == "optimizer" and r.get("swamped_share") is not None:
            out[r["step"]][f"swamped_share/{r['param']}"] = float(r["swamped_share"])
        elif r["kind"] == "step":
            if r.get("scale") is not None:
                out[r["step"]]["loss_scale"] = float(r["scale"])
            if r.get("skipped") is not None:
                out[r["step"]]["skipped"] = float(bool(r["skipped"]))
    return dict(out)
