"""The result of a training: every run's history, detectors, verdicts, text, JSON and plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fpgrad.training.history import History


@dataclass
class TrainResult:
    """Histories of every run and the exact run, with detector verdicts (:func:`train`)."""

    network: str
    config: dict[str, Any]
    runs: list[str]
    histories: dict[str, History]
    exact: History
    exact_certified_digits: float
    detectors: dict[str, dict[str, Any]]
    distance: dict[str, list[float]]
    notes: list[str] = field(default_factory=list)
    #: per run: the plan it computed with (:meth:`fpgrad.model.policy.Plan.to_dict`)
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from fpgrad.jsonutil import jsonable

        def hist(h: History, exact: bool = False) -> dict[str, Any]:
            d: dict[str, Any] = {
                "loss": h.loss,
                "grad_norm": h.grad_norm,
                "dead_units": h.dead_units,
                "moved": h.moved,
            }
            if not exact:
                d.update(
                    swamped=h.swamped,
                    updated=h.updated,
                    nonfinite=h.nonfinite,
                    skipped=h.skipped,
                    loss_scale=h.scale,
                    distance_to_exact=self.distance[h.label],
                    verdicts={str(k): v for k, v in sorted(h.verdicts.items())},
                    first_overflow=h.overflow_place,
                    exact_loss_at_params={
                        str(k): v for k, v in sorted(h.exact_loss_at_params.items())
                    },
                )
            return d

        return jsonable(
            {
                "schema": "fpgrad.train/1",
                "network": self.network,
                "config": self.config,
                "exact": {
                    "bits": self.config["exact_bits"],
                    "certified_digits": self.exact_certified_digits,
                    **hist(self.exact, exact=True),
                },
                "runs": {
                    r: {
                        **hist(self.histories[r]),
                        "detectors": self.detectors[r],
                        "policy": self.plans.get(r),
                    }
                    for r in self.runs
                },
                "notes": self.notes,
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def render(self) -> str:
        from fpgrad.present.render import render_training

        return render_training(self)

    def plot(self, out_dir: str) -> list[str]:
        from fpgrad.present.report.plots import training_plots

        return training_plots(self, out_dir)
