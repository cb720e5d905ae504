"""The watch report: Markdown and a self-contained HTML page from the records of a watch run.

Tables: skipped steps with the first op that produced an inf/NaN, the ops that created zeros /
infs / NaNs (module, op, direction; created vs inherited vs undecided), the first backward op
whose gradient flushed to zero, and per parameter the swamped-update share, update-to-weight
ratio and optimizer-state underflow. Plots (PNG, embedded as base64 in the HTML): per-module
timelines of created zeros, subnormal share and created overflows; the loss-scale history with
skipped steps; swamped-update shares per parameter and step, and the last sampled step's maps.
"""

from __future__ import annotations

import base64
import html
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tabulate import tabulate  # noqa: E402

from fpgrad.errors import InputError  # noqa: E402
from fpgrad.present.report.plots import save_png  # noqa: E402
from fpgrad.present.report.watch_series import module_sums  # noqa: E402

_TOP = 8


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _by_kind(recs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in recs:
        out[r["kind"]].append(r)
    return out


#: the columns of :func:`creators`' rows
CREATOR_HEADERS = [
    "module",
    "op",
    "direction",
    "zeros created",
    "zeros inherited",
    "zeros undecided",
    "subnormals created",
    "infs created",
    "NaNs created",
]


def creators(ops: list[dict]) -> list[list[Any]]:
    """Per (module, op, direction), summed over steps: zeros created / inherited / undecided,
    created infs and NaNs; rows with anything created, most created zeros first."""
    acc: dict[tuple, list[int]] = defaultdict(lambda: [0] * 6)
    for r in ops:
        a = acc[(r["module"], r["op"], r["direction"])]
        for i, k in enumerate(
            (
                "zeros_created",
                "zeros_inherited",
                "zeros_undecided",
                "subnormals_created",
                "infs_created",
                "nans_created",
            )
        ):
            a[i] += r[k]
    rows = [[*k, *v] for k, v in acc.items() if v[0] or v[3] or v[4] or v[5]]
    return sorted(rows, key=lambda row: (-row[3], -row[7] - row[8], row[0], row[1]))


def _timelines(ops: list[dict], path: Path) -> None:
    per = module_sums(ops)
    top = sorted(per, key=lambda m: -sum(v[0] + v[1] + v[3] for v in per[m].values()))[:_TOP]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    for i, m in enumerate(top):
        steps = sorted(per[m])
        vals = np.array([per[m][s] for s in steps], dtype=float)
        kw = {"marker": "o", "ms": 3, "label": m, "color": f"C{i}"}
        axes[0].plot(steps, vals[:, 0], **kw)
        axes[1].plot(steps, vals[:, 1] / np.maximum(vals[:, 2], 1), **kw)
        axes[2].plot(steps, vals[:, 3], **kw)
    axes[0].set_ylabel("zeros created")
    axes[1].set_ylabel("subnormal share")
    axes[2].set_ylabel("infs+NaNs created")
    axes[2].set_xlabel("step")
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle("Per module (forward and backward ops), sampled steps")
    fig.tight_layout()
    save_png(fig, path)


def _scale(steps: list[dict], path: Path) -> None:
    xs = [s["step"] for s in steps if s["scale"] is not None]
    ys = [s["scale"] for s in steps if s["scale"] is not None]
    sk = [(s["step"], s["scale"]) for s in steps if s["skipped"] and s["scale"] is not None]
    fig, ax = plt.subplots(figsize=(8, 2.8))
    ax.step(xs, ys, where="post", label="loss scale used")
    if sk:
        ax.scatter(*zip(*sk, strict=False), marker="x", color="C3", zorder=3, label="skipped step")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def _swamped(opt: list[dict], path: Path) -> None:
    params = sorted({r["param"] for r in opt})
    steps = sorted({r["step"] for r in opt})
    grid = np.full((len(params), len(steps)), np.nan)
    for r in opt:
        if r.get("swamped_share") is not None:
            grid[params.index(r["param"]), steps.index(r["step"])] = r["swamped_share"]
    last = [r for r in opt if r["step"] == steps[-1] and r.get("swamped_map")]
    fig, axes = plt.subplots(
        1, 1 + len(last[:4]), figsize=(8, 0.6 + 0.35 * len(params) + 1.5), squeeze=False
    )
    ax = axes[0, 0]
    im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(params)), params, fontsize=7)
    every = max(1, len(steps) // 8)
    ax.set_xticks(range(0, len(steps), every), [str(s) for s in steps[::every]], fontsize=7)
    ax.set_xlabel("step")
    ax.set_title("swamped share", fontsize=9)
    fig.colorbar(im, ax=ax)
    for ax, r in zip(axes[0, 1:], last, strict=False):
        m = np.array(r["swamped_map"], dtype=float)
        side = int(math.ceil(math.sqrt(m.size)))
        img = np.full(side * side, np.nan)
        img[: m.size] = m
        ax.imshow(img.reshape(side, side), vmin=0, vmax=1, cmap="magma", interpolation="nearest")
        ax.set_title(f"{r['param']}\nstep {r['step']}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_png(fig, path)


def first_status(first: dict) -> str:
    """created / inherited / undecided: the verdict on a step's first op with an inf or NaN.
    Records written before the ``inherited`` key said only whether it created one: their
    other firsts are undecided (inherited is not proven)."""
    if first["created"]:
        return "created"
    return "inherited" if first.get("inherited", False) else "undecided"


def build(recs: list[dict], out: Path) -> tuple[str, list[str]]:
    """The Markdown text and the PNG files it refers to (written into ``out``)."""
    k = _by_kind(recs)
    ops, opt, steps = k["op"], k["optimizer"], k["step"]
    meta = k["meta"][0] if k["meta"] else {}
    lines = [f"# Watched run: {meta.get('model', '?')}", ""]
    skipped = [s for s in steps if s["skipped"]]
    lines.append(
        f"{len(steps)} steps, {sum(s['sampled'] for s in steps)} sampled "
        f"(every {meta.get('every', '?')}), {len(skipped)} skipped; "
        f"optimizer {meta.get('optimizer')}, GradScaler {'yes' if meta.get('scaler') else 'no'}."
    )
    lines += ["", "## Skipped steps and the first op that produced an inf or NaN", ""]
    rows = [
        [
            s["step"],
            _fmt(s["scale"]),
            _fmt(s["next_scale"]),
            _fmt(s["skipped"]),
            *(
                (f["module"], f["op"], f["direction"], first_status(f))
                if (f := s["first_nonfinite"])
                else (("not sampled",) + ("-",) * 3 if not s["sampled"] else ("none",) + ("-",) * 3)
            ),
        ]
        for s in steps
        if s["skipped"] or s["first_nonfinite"]
    ]
    lines.append(
        tabulate(
            rows,
            headers=[
                "step",
                "scale",
                "next scale",
                "skipped",
                "module",
                "first inf/NaN op",
                "direction",
                "kind",
            ],
            tablefmt="github",
            disable_numparse=True,
        )
        if rows
        else "None."
    )
    first_flush = next(
        (r for r in ops if r["direction"] == "backward" and r["zeros_created"]), None
    )
    lines += ["", "## Where zeros, infs and NaNs are created", ""]
    if first_flush:
        lines.append(
            f"First backward op whose gradient flushed to zero: `{first_flush['op']}` in "
            f"`{first_flush['module']}` (step {first_flush['step']}, "
            f"{first_flush['zeros_created']} of {first_flush['numel']} elements created "
            f"zeros, {first_flush['zeros_inherited']} inherited)."
        )
        lines.append("")
    elif ops:
        lines += [
            "No backward op created a zero (every gradient zero is inherited or undecided).",
            "",
        ]
    rows = creators(ops)
    lines.append(
        tabulate(
            rows[:20],
            headers=CREATOR_HEADERS,
            tablefmt="github",
        )
        if rows
        else "No op created a zero, subnormal, inf or NaN."
    )
    if opt:
        lines += ["", "## Optimizer: swamped updates and state underflow", ""]
        last = {}
        for r in opt:
            last[r["param"]] = r
        rows = [
            [
                p,
                r["dtype"],
                _fmt(r.get("swamped_share")),
                _fmt(r.get("update_weight_ratio")),
                _fmt(r.get("requested_update_weight_ratio")),
                _fmt(r.get("state_exp_avg_sq_zero_share")),
                _fmt(r.get("eps_in_state_dtype")),
            ]
            for p, r in last.items()
        ]
        lines.append(
            f"Last sampled step ({max(r['step'] for r in opt)}); swamped: requested "
            "update non-zero but the weight did not move."
        )
        lines.append("")
        lines.append(
            tabulate(
                rows,
                headers=[
                    "parameter",
                    "dtype",
                    "swamped share",
                    "update/weight",
                    "requested update/weight",
                    "exp_avg_sq zero share",
                    "eps in state dtype",
                ],
                tablefmt="github",
                disable_numparse=True,
            )
        )
    pngs = []
    lines += ["", "## Plots", ""]
    if ops:
        _timelines(ops, out / "watch_timelines.png")
        pngs.append("watch_timelines.png")
    if any(s["scale"] is not None for s in steps):
        _scale(steps, out / "watch_scale.png")
        pngs.append("watch_scale.png")
    if any(r.get("swamped_share") is not None for r in opt):
        _swamped(opt, out / "watch_swamped.png")
        pngs.append("watch_swamped.png")
    lines += [f"![{p}]({p})" for p in pngs]
    return "\n".join(lines) + "\n", pngs


def _html(md: str, out: Path, pngs: list[str]) -> str:
    """A self-contained page: tables and text from the Markdown, images inlined."""
    body, table = [], []

    def flush() -> None:
        if table:
            rows = [[c.strip() for c in t.strip().strip("|").split("|")] for t in table]
            body.append(tabulate(rows[2:], headers=rows[0], tablefmt="html"))
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("![") and line[2:].split("]")[0] in pngs:
            name = line[2:].split("]")[0]
            data = base64.b64encode((out / name).read_bytes()).decode()
            body.append(f'<p><img alt="{name}" src="data:image/png;base64,{data}"></p>')
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = "body{font-family:sans-serif;max-width:1000px;margin:auto}td,th{padding:2px 8px}"
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fpgrad watch</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_report(recs: list[dict[str, Any]], dest: Path) -> Path:
    """Write watch.md, watch.html and the PNGs of a watch run's records into ``dest``."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {str(dest)!r}: cannot create it ({exc.strerror})") from exc
    md, pngs = build(recs, dest)
    (dest / "watch.md").write_text(md, encoding="utf-8")
    (dest / "watch.html").write_text(_html(md, dest, pngs), encoding="utf-8")
    return dest
