"""graph_attention_fp16: a captured attention model in float16 whose hand-written softmax
(exp(s) / sum exp(s)) overflows once a score exceeds ln(65504) ~ 11.09; where the first inf
appears, and which precision policies fix it (the softmax module in float32, autocast's lists)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fpgrad.graph import from_module
from fpgrad.graph.compare import compare_graph
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs
from fpgrad.scenarios.captured import clean, column_data, columns_section

NAME = "graph_attention_fp16"
CLAIM = (
    "In float16, attention with a softmax written as exp(s) / sum(exp(s)) overflows as soon as "
    "a score exceeds ln(65504) ~ 11.09: the first inf appears in the softmax's exp, inf / inf "
    "is NaN and every gradient is NaN. Computing that softmax module in float32 (a precision "
    "policy by module path) fixes it; torch.autocast('cpu') does not (exp is on none of its "
    "lists), torch.autocast('cuda')'s float32 list (exp, sum) does."
)
FIX = "softmax_fp32"
POLICIES = {
    FIX: {
        "params": "float16",
        "default": "float16",
        "layers": {"attn.softmax": "float32"},
        "description": "everything in float16 except module attn.softmax in float32",
    }
}
COLUMNS = ("float16", "autocast_cpu", "autocast", FIX, "float32")


class NaiveSoftmax(nn.Module):
    """softmax(s) = exp(s) / sum(exp(s)) over the last axis, without subtracting the max."""

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        e = torch.exp(s)
        return e / e.sum(-1, keepdim=True)


class Attention(nn.Module):
    """Single-head self-attention: q, k, v projections, scaled scores, the naive softmax."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.softmax = NaiveSoftmax()
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-2, -1) / math.sqrt(self.d)
        return self.softmax(scores) @ self.v(x)


class Classifier(nn.Module):
    """Attention over 3 tokens of width 4, mean-pooled, a linear head to 3 classes."""

    def __init__(self, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.attn = Attention(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x).mean(1))


def build() -> tuple[nn.Module, torch.Tensor, torch.Tensor, nn.Module]:
    """The model, tokens with std 4 (scores up to ~13), targets and the loss."""
    torch.manual_seed(0)
    model = Classifier()
    x = torch.randn(2, 3, 4) * 4
    return model, x, torch.tensor([0, 2]), nn.CrossEntropyLoss()


@records_runs
def run(small: bool = False) -> ScenarioResult:
    """``small`` changes nothing: the model is already tiny (float16 matmul is slow on CPU)."""
    model, x, y, loss = build()
    with torch.no_grad():
        a = model.attn
        scores = a.q(x) @ a.k(x).transpose(-2, -1) / math.sqrt(a.d)
    top = float(scores.abs().max())
    net = from_module(model, x, y, loss, name=NAME, policies=POLICIES)
    result = compare_graph(net, list(COLUMNS))
    data = column_data(result)
    first16 = data["float16"]["first_nonfinite"] or ""
    overflow_in_softmax = first16.startswith("attn.softmax (aten.exp")
    all_nan = data["float16"]["nan"] == data["float16"]["gradients"]
    fixed = clean(data[FIX]) and data[FIX]["wrong_sign"] == 0
    cpu_fails = not clean(data["autocast_cpu"])
    cuda_fixes = clean(data["autocast"])
    holds = overflow_in_softmax and all_nan and fixed and cpu_fails and cuda_fixes
    verdict = (
        f"The largest score is {top:.2f} > ln(65504) = {math.log(65504):.2f}. In float16 the "
        f"first inf appears at {first16 or 'no op'}; {data['float16']['nan']} of "
        f"{data['float16']['gradients']} gradient elements are NaN. "
        f"{FIX} (the softmax module in float32) {'has no inf or NaN anywhere' if fixed else 'does not fix it'}"
        f" ({data[FIX]['ok']} gradient elements ok); autocast_cpu "
        f"{'still overflows at ' + str(data['autocast_cpu']['first_nonfinite']) if cpu_fails else 'has no inf'}; "
        f"autocast (CUDA lists) {'has no inf' if cuda_fixes else 'still overflows'}."
    )
    setup = (
        "A captured torch model (`fpgrad.from_module`): tokens (2 x 3 x 4, std 4) -> single-head "
        "attention (`attn.q`, `attn.k`, `attn.v`, scores / sqrt(4), softmax as the module "
        "`attn.softmax`: exp(s) / sum(exp(s))) -> mean over tokens -> `head` (3 classes), "
        "cross-entropy. Columns: float16 (everything in float16), `autocast_cpu` (the real "
        "`torch.autocast('cpu', torch.float16)` on this CPU), `autocast` (torch.autocast('cuda')'s "
        f"op lists applied by casting on this CPU; no GPU ran), `{FIX}` (a user policy: "
        "float16 parameters and ops, module `attn.softmax` in float32), float32. Every column "
        "is torch's eager autograd on this CPU; the exact reference is certified ball arithmetic."
    )
    sections = [
        columns_section(data),
        Section(
            "Why",
            f"exp(s) overflows float16 for s > {math.log(65504):.4f}; the scores reach {top:.2f}. "
            "Then sum(exp) is inf and inf / inf is NaN, which the backward spreads to every "
            "gradient. A softmax that subtracts the row maximum first (`torch.softmax`) never "
            "overflows; so does this one computed in float32 (exp(13) ~ 4.4e5 is finite).",
        ),
    ]
    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=setup,
        verdict=verdict,
        holds=holds,
        sections=sections,
        data={"largest_score": top, "columns": data, "score_limit": float(np.log(65504.0))},
    )
