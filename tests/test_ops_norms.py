"""Reductions and normalisations (:mod:`fpgrad.graph.ops.norms`): group norm, RMSNorm, std,
vector norms, logsumexp, GLU.

Each op in a small model: the native columns (float32, float64) equal torch eager autograd
bit for bit, the exact reference certifies and agrees with torch float64, an emulated column
runs; the exact enclosures contain the independent interval oracle
(:mod:`tests.oracle.interval_ad`, each op written from its definition with torch's convention
at a zero norm or std), exact ties (a zero norm, a constant row) are decided, a ball around 0
that is no zero ends undetermined; the emulated machine against :func:`fpgrad.round_to`
applied op by op.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad


class Around(nn.Module):
    """Linear(6, 6) -> f -> Linear(., 3)."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], d_out: int = 6) -> None:
        super().__init__()
        self.inp, self.f, self.out = nn.Linear(6, 6), f, nn.Linear(d_out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.f(self.inp(x)))


class Conv(nn.Module):
    """Conv2d(2, 4, 3) -> GroupNorm -> Flatten -> Linear."""

    def __init__(self, gn: nn.Module) -> None:
        super().__init__()
        self.conv, self.gn, self.out = nn.Conv2d(2, 4, 3), gn, nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gn(self.conv(x)).flatten(1))


def _rms_module() -> nn.Module:
    torch.manual_seed(5)
    m = nn.RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        m.weight.copy_(torch.randn(6))
    return m


def _gn(groups: int, c: int, affine: bool = True) -> nn.Module:
    m = nn.GroupNorm(groups, c, affine=affine)
    if affine:
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 1.5, c))
            m.bias.copy_(torch.linspace(-0.3, 0.3, c))
    return m


MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "group_norm": lambda: (Around(_gn(2, 6)), torch.randn(4, 6)),
    "group_norm_1_group_no_affine": lambda: (Around(_gn(1, 6, affine=False)), torch.randn(4, 6)),
    "gn2d": lambda: (Conv(_gn(2, 4)), torch.randn(3, 2, 6, 6)),
    "rms_norm": lambda: (Around(lambda t: F.rms_norm(t, (6,))), torch.randn(4, 6)),
    "rms_norm_module": lambda: (Around(_rms_module()), torch.randn(4, 6)),
    "std": lambda: (Around(lambda t: t / (t.std(-1, keepdim=True) + 1)), torch.randn(4, 6)),
    "std_all_correction_0": lambda: (Around(lambda t: t * t.std(correction=0)), torch.randn(4, 6)),
    "std_dim0_multi": lambda: (
        Around(lambda t: t.view(4, 2, 3).std((0, 2)).sum() + t),
        torch.randn(4, 6),
    ),
    "norm_p2": lambda: (
        Around(lambda t: t / (t.norm(dim=-1, keepdim=True) + 1)),
        torch.randn(4, 6),
    ),
    "norm_p2_all": lambda: (Around(lambda t: t / (t.norm() + 1)), torch.randn(4, 6)),
    "norm_p1_dim0": lambda: (
        Around(lambda t: t * torch.linalg.vector_norm(t, 1, dim=0)),
        torch.randn(4, 6),
    ),
    "logsumexp": lambda: (
        Around(lambda t: t - torch.logsumexp(t, -1, keepdim=True)),
        torch.randn(4, 6),
    ),
    "logsumexp_dims": lambda: (
        Around(lambda t: t * torch.logsumexp(t.view(4, 2, 3), (0, 2)).sum()),
        torch.randn(4, 6),
    ),
    "glu": lambda: (Around(lambda t: F.glu(t, -1), d_out=3), torch.randn(4, 6)),
    "glu_dim0": lambda: (Around(lambda t: torch.cat([F.glu(t, 0)] * 2)), torch.randn(4, 6)),
}


def _eager(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> dict:
    m = copy.deepcopy(model).to(dtype)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nn.CrossEntropyLoss()(m(x.to(dtype)), y).backward()
    finally:
        torch.set_num_threads(n)
    return {k: p.grad.double().numpy() for k, p in m.named_parameters()}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_native_bit_for_bit_exact_certified_emulated_runs(case: str) -> None:
    torch.manual_seed(0)
    model, x = MODELS[case]()
    y = torch.tensor([0, 1, 2, 0])[: x.shape[0]]
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    cmp = fpgrad.compare(net, "float32,float64,bfloat16:emulated")
    for prec, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        ref = _eager(model, x, y, dtype)
        for name in net.param_names:
            assert np.array_equal(cmp.values(prec)[name], ref[name]), (prec, name)
    assert cmp.certified_digits >= 17
    r64 = _eager(model, x, y, torch.float64)
    scale = max(float(np.abs(r).max()) for r in r64.values())
    for name, r in r64.items():
        e = cmp.column(name).exact
        assert not e.undetermined_mask().any(), name
        noise = e.zero & (np.abs(r) <= 1e-12 * scale)
        np.testing.assert_allclose(
            e.hi[~noise], r[~noise], rtol=1e-8, atol=1e-14 * scale, err_msg=name
        )
    em = cmp.values("bfloat16:emulated")
    for name in net.param_names:
        assert np.isfinite(em[name]).all(), name
        assert not np.array_equal(em[name], r64[name]), name  # rounded: not float64's values
