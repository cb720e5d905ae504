"""gradscaler_skipped_steps: fpgrad.watch on an ordinary autocast + GradScaler loop; every step
GradScaler skips is one where some op created an inf (its exact result on its own inputs is
finite), and the NaNs that follow are inherited."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from fpgrad.present.report.watch import CREATOR_HEADERS, _scale, creators, first_status
from fpgrad.run.runlog import record
from fpgrad.run.torch_native import one_torch_thread
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs
from fpgrad.watching import watch

NAME = "gradscaler_skipped_steps"
CLAIM = (
    "GradScaler skips exactly the steps in which some op created an inf or NaN (an op whose exact "
    "result on its own inputs is finite: a float16 overflow), and every NaN after it is inherited "
    "from that inf; watching the loop with fpgrad.watch changes none of its results."
)
INIT_SCALE = 2.0**24
GROWTH_INTERVAL = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _train(model: nn.Module, steps: int, watched: bool) -> tuple[list[torch.Tensor], Any]:
    """The user's loop: Adam, MSE in float32 on float16 autocast logits, a GradScaler."""
    record("torch.autocast('cpu', float16) + GradScaler", "native")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)
    w = watch(model, opt, scaler) if watched else None

    def loop() -> None:
        for _ in range(steps):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = ((model(x).float() - y) ** 2).mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    with one_torch_thread():
        if w is not None:
            with w:
                loop()
        else:
            loop()
    return [p.detach().clone() for p in model.parameters()], w


@records_runs
def run(small: bool = False) -> ScenarioResult:
    steps = 10 if small else 24
    base = _model()
    plain, _ = _train(copy.deepcopy(base), steps, watched=False)
    watched, w = _train(copy.deepcopy(base), steps, watched=True)
    identical = all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))
    recs = w.records()
    ops = [r for r in recs if r["kind"] == "op"]
    step_recs = [r for r in recs if r["kind"] == "step"]
    created_at = {
        s["step"]: sum(r["infs_created"] + r["nans_created"] for r in ops if r["step"] == s["step"])
        for s in step_recs
    }
    nan_created = sum(r["nans_created"] for r in ops)
    skipped = [s["step"] for s in step_recs if s["skipped"]]
    overflowed = [s for s, n in created_at.items() if n]
    explained = all(
        s["first_nonfinite"] is not None and s["first_nonfinite"]["created"]
        for s in step_recs
        if s["skipped"]
    )
    holds = bool(skipped) and skipped == overflowed and explained and not nan_created and identical
    firsts = sorted(
        {
            (s["first_nonfinite"]["op"], s["first_nonfinite"]["module"])
            for s in step_recs
            if s["skipped"] and s["first_nonfinite"]
        }
    )
    verdict = (
        f"{len(skipped)} of {steps} steps were skipped, and they are exactly the {len(overflowed)} "
        "steps in which an op created an inf; each skip's first inf was created by "
        + ", ".join(f"`{op}` in `{mod}`" for op, mod in firsts)
        + f"; no op created a NaN ({sum(r['nans'] for r in ops)} NaNs seen, all inherited); "
        "watched and unwatched training give bit-identical parameters."
        if holds
        else "The skipped steps and the steps where an op created an inf or NaN differ, or "
        "watching changed the result: see the tables."
    )
    step_rows = [
        [
            s["step"],
            f"{s['scale']:g}",
            "yes" if s["skipped"] else "no",
            created_at[s["step"]],
            *(
                (f["op"], f["module"], f["direction"], first_status(f))
                if (f := s["first_nonfinite"])
                else ("-", "-", "-", "-")
            ),
        ]
        for s in step_recs
    ]
    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=(
            "8-16-4 ReLU MLP with float32 weights, batch 32, MSE on float16 autocast outputs "
            f"(torch.autocast on CPU), Adam lr 0.01, GradScaler(init_scale=2^24, "
            f"growth_interval={GROWTH_INTERVAL}), {steps} steps of the ordinary loop, once "
            "unwatched and once inside `fpgrad.watch(model, opt, scaler)` (every op of every "
            "step recorded, created vs inherited decided by a float64 recompute per op)."
        ),
        verdict=verdict,
        holds=holds,
        sections=[
            Section(
                "Steps",
                text="Infs/NaNs created: summed over the step's ops. First inf/NaN: the first op "
                "in execution order that created one.",
                headers=[
                    "step",
                    "loss scale",
                    "skipped",
                    "infs/NaNs created",
                    "first inf/NaN op",
                    "module",
                    "direction",
                    "kind",
                ],
                rows=step_rows,
                figure=f"{NAME}_scale.png",
            ),
            Section(
                "Ops that created special values (all steps)",
                headers=CREATOR_HEADERS,
                rows=creators(ops),
            ),
        ],
        data={
            "steps": steps,
            "skipped": skipped,
            "overflow_steps": overflowed,
            "nans_created": nan_created,
            "first_ops": [list(f) for f in firsts],
            "bit_identical": identical,
            "scales": [s["scale"] for s in step_recs],
        },
        figures={f"{NAME}_scale.png": lambda path: _scale(step_recs, path)},
    )
