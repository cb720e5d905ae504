"""Held-out model findings, round 3 (``scripts/heldout_models_f.py``): each fix checked against
torch.

Native columns equal torch's eager autograd bit for bit; the certified exact reference holds
torch float64's loss and gradients in its balls (plus a 1e-9 relative allowance for float64's
own rounding).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import fpgrad
from fpgrad.errors import InputError
from tests.oracle.native_exact import check

# ---- gradient checkpointing: the recomputation re-entered the modules inside the backward ------


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.first = nn.Linear(4, 4)
        self.b1 = nn.Sequential(nn.Linear(4, 6), nn.GELU())
        self.b2 = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.SiLU())
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.b1, self.first(x), use_reentrant=self.reentrant)
        h = checkpoint_sequential(self.b2, 2, h, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_is_a_plain_call(reentrant: bool) -> None:
    torch.manual_seed(0)
    m, x, y = _Checkpointed(reentrant), torch.randn(4, 4), torch.tensor([0, 2, 1, 0])
    check(m, x, y, nn.CrossEntropyLoss())
    net = fpgrad.from_module(m, x, y, nn.CrossEntropyLoss())
    assert "b2.2.weight" in net.param_names
    fpgrad.compare(net, "bfloat16,float16:emulated").render(max_rows=2)
    # the model's own checkpointing is untouched afterwards: torch still recomputes
    import torch.utils.checkpoint as ckpt

    assert ckpt.CheckpointFunction.__name__ == "CheckpointFunction"


def test_reentrant_checkpoint_of_data_only_gives_no_gradient_as_torch() -> None:
    """torch's reentrant checkpoint: no input requires grad, so no gradient reaches the
    parameters inside (eager leaves them None); fpgrad refuses as for any unused parameter."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b1, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(checkpoint(self.b1, x, use_reentrant=True))

    torch.manual_seed(0)
    with pytest.raises(InputError, match="parameter 'b1.weight' does not reach the loss"):
        fpgrad.from_module(M(), torch.randn(4, 4), torch.tensor([0, 2, 1, 0]),
                           nn.CrossEntropyLoss())  # fmt: skip


# ---- a float32 buffer made inside forward meeting scatter's float64 source: named as such -------


def test_scatter_of_float32_zeros_names_the_dtype() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            e = self.lin(x).squeeze(-1)
            return torch.zeros(2).scatter(0, torch.tensor([0, 1, 0]), e)

    with pytest.raises(InputError, match="dtype=x.dtype"):
        fpgrad.from_module(M(), torch.randn(3, 3), torch.randn(2), nn.MSELoss())
