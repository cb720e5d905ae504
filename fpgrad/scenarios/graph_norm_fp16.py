"""graph_norm_fp16: a captured model with a hand-written RMSNorm in float16: activations above
256 square to inf, the mean is inf, rsqrt(inf) = 0 and the norm silently outputs 0; where the
first inf appears, and the policy (the norm module in float32) that fixes it."""

from __future__ import annotations

import torch
from torch import nn

from fpgrad.graph import from_module
from fpgrad.graph.compare import compare_graph
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs
from fpgrad.scenarios.captured import clean, column_data, columns_section

NAME = "graph_norm_fp16"
CLAIM = (
    "In float16, a hand-written RMSNorm (x * rsqrt(mean(x^2) + eps)) breaks once an activation "
    "exceeds 256: x^2 overflows to inf (float16's max is 65504), the mean is inf and "
    "rsqrt(inf) = 0, so the norm outputs 0 for that row without any NaN; the gradients stay "
    "finite but wrong. Computing the norm module in float32 (a precision policy by module path) "
    "fixes it; torch.autocast('cpu') does not, torch.autocast('cuda')'s float32 list (pow, "
    "rsqrt) does, and bfloat16's range avoids it."
)
FIX = "norm_fp32"
POLICIES = {
    FIX: {
        "params": "float16",
        "default": "float16",
        "layers": {"norm": "float32"},
        "description": "everything in float16 except module norm in float32",
    }
}
COLUMNS = ("float16", "bfloat16", "autocast_cpu", "autocast", FIX, "float32")


class RMSNorm(nn.Module):
    """RMSNorm written by hand: pow, mean, rsqrt."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Net(nn.Module):
    """``inp`` (4 -> 4), ``norm`` (RMSNorm), ``head`` (4 -> 3 classes)."""

    def __init__(self, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.inp(x)))


def build() -> tuple[nn.Module, torch.Tensor, torch.Tensor, nn.Module]:
    """The model, inputs with std 1000 (activations up to ~740), targets and the loss."""
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(4, 4) * 1000
    return model, x, torch.tensor([0, 2, 1, 1]), nn.CrossEntropyLoss()


@records_runs
def run(small: bool = False) -> ScenarioResult:
    """``small`` changes nothing: the model is already tiny."""
    model, x, y, loss = build()
    with torch.no_grad():
        h = model.inp(x)
    # squares at or above 65520 (65504 plus half its ulp, a tie to even) round to inf
    rows_over = int(((h.to(torch.float16).double() ** 2) >= 65520).any(-1).sum())
    top = float(h.abs().max())
    net = from_module(model, x, y, loss, name=NAME, policies=POLICIES)
    result = compare_graph(net, list(COLUMNS))
    data = column_data(result)
    first16 = data["float16"]["first_nonfinite"] or ""
    lost16 = result.first_lost["float16"] or ""
    overflow_in_norm = first16 == "norm (aten.pow)"
    finite_but_wrong = (
        data["float16"]["nan"] == 0 and data["float16"]["overflow"] == 0
        and data["float16"]["ok"] < data["float16"]["gradients"]
        and lost16.startswith("norm (aten.rsqrt)")
    )  # fmt: skip
    fixed = clean(data[FIX]) and data[FIX]["wrong_sign"] == 0
    others = {p: clean(data[p]) for p in ("bfloat16", "autocast_cpu", "autocast")}
    holds = (
        overflow_in_norm and finite_but_wrong and fixed
        and others == {"bfloat16": True, "autocast_cpu": False, "autocast": True}
    )  # fmt: skip
    f16 = data["float16"]
    verdict = (
        f"Activations reach {top:.0f}; in {rows_over} of {len(h)} rows some x^2 exceeds float16's "
        "range. "
        f"In float16 the first inf appears at {first16 or 'no op'}; the first op computing 0 "
        f"where the exact value is not is {lost16 or 'none'}; no gradient is NaN or inf, but "
        f"only {f16['ok']} of {f16['gradients']} are ok ({f16['wrong_sign']} wrong sign, "
        f"{f16['inaccurate']} inaccurate). {FIX}: "
        f"{'no inf anywhere, no wrong sign' if fixed else 'not fixed'} ({data[FIX]['ok']} ok). "
        + "; ".join(f"{p}: {'clean' if ok else 'overflows'}" for p, ok in others.items())
        + "."
    )
    setup = (
        "A captured torch model (`fpgrad.from_module`): inputs (4 x 4, std 1000) -> `inp` "
        "(Linear 4 -> 4) -> `norm` (RMSNorm written by hand: x * rsqrt(x.pow(2).mean(-1) + "
        "1e-6) * weight) -> `head` (Linear 4 -> 3), cross-entropy. Columns: float16, bfloat16, "
        "`autocast_cpu` (the real `torch.autocast('cpu', torch.float16)` on this CPU), "
        "`autocast` (torch.autocast('cuda')'s op lists applied by casting on this CPU; no GPU "
        f"ran), `{FIX}` (a user policy: float16 parameters and ops, module `norm` in float32), "
        "float32. Every column is torch's eager autograd on this CPU; the exact reference is "
        "certified ball arithmetic."
    )
    sections = [
        columns_section(data),
        Section(
            "Why no NaN",
            "x.pow(2) is inf for |x| > 255.9 in float16, so mean(x^2) + eps is inf and "
            "rsqrt(inf) = 0: the row is multiplied by 0. The forward goes on with zeros instead "
            "of NaN, the loss is finite, and the backward computes finite gradients of the "
            "wrong function; a NaN check (GradScaler's) sees nothing. In float32 (or bfloat16, "
            "max ~3.4e38) the squares are finite.",
        ),
    ]
    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=setup,
        verdict=verdict,
        holds=holds,
        sections=sections,
        data={"largest_activation": top, "rows_overflowing": rows_over, "columns": data},
    )
