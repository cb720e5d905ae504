"""Held-out probe models, part 5 (PReLU, InstanceNorm, LayerNorm over two dims, Unfold patches,
nearest-exact interpolation, a temporal conv net, weighted label smoothing, multi-task losses,
frozen and shared parameters, buffers, ``no_grad`` inside forward, tuple outputs, eval dropout,
a tied autoencoder), registered in :data:`heldout_models_a.MODELS`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from heldout_models_a import Case, model
from torch import nn


@model
def prelu_per_channel() -> Case:
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.PReLU(3, init=0.1), nn.Flatten(),
                      nn.Linear(3 * 2 * 2, 4), nn.PReLU(), nn.Linear(4, 2))  # fmt: skip
    return m, torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 1]), nn.CrossEntropyLoss()


@model
def instancenorm_affine() -> Case:
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.InstanceNorm2d(3, affine=True),
                      nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))  # fmt: skip
    return m, torch.randn(2, 1, 4, 4), torch.tensor([0, 1]), nn.CrossEntropyLoss()


class LN2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.ln = nn.LayerNorm([5, 4])
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.proj(x))).mean(1).squeeze(-1)


@model
def layernorm_last2() -> Case:
    return LN2(), torch.randn(3, 5, 3), torch.randn(3), nn.MSELoss()


class UnfoldPatches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unfold = nn.Unfold(kernel_size=2, stride=2)
        self.embed = nn.Linear(4, 6)
        self.fold = nn.Fold(output_size=(4, 4), kernel_size=2, stride=2)
        self.back = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.unfold(x).transpose(1, 2)  # (B, 4 patches, 4)
        h = F.gelu(self.embed(p))
        return self.fold(self.back(h).transpose(1, 2))


@model
def unfold_fold_patches() -> Case:
    return UnfoldPatches(), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), nn.L1Loss()


class NearestExact(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(2 * 5 * 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(self.c(x), size=(5, 5), mode="nearest-exact")
        return self.head(h.flatten(1))


@model
def interp_nearest_exact() -> Case:
    return NearestExact(), torch.randn(2, 1, 3, 3), torch.tensor([1, 0]), nn.CrossEntropyLoss()


class TCN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torch.nn.utils import weight_norm

        self.c1 = weight_norm(nn.Conv1d(2, 3, 3, padding=2))
        self.c2 = weight_norm(nn.Conv1d(3, 3, 3, padding=4, dilation=2))
        self.down = nn.Conv1d(2, 3, 1)
        self.out = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x)[:, :, :-2])  # chomp: causal
        h = F.relu(self.c2(h)[:, :, :-4])
        return self.out(F.relu(h + self.down(x))[:, :, -1]).squeeze(-1)


@model
def tcn_weight_norm_legacy() -> Case:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = TCN()
    return m, torch.randn(3, 2, 6), torch.randn(3), nn.SmoothL1Loss()


@model
def ce_smoothing_weights() -> Case:
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1)
    return m, torch.randn(6, 4), torch.tensor([0, 1, 2, 2, 1, 0]), loss


class MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.cls, self.reg = nn.Linear(6, 3), nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return torch.cat([self.cls(h), self.reg(h)], dim=1)


def two_losses(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    a = F.cross_entropy(out[:, :3], y[:, 0].long())
    b = F.mse_loss(out[:, 3], y[:, 1])
    return a + 0.5 * b


@model
def multitask_two_losses() -> Case:
    y = torch.stack([torch.tensor([0.0, 2, 1, 1]), torch.randn(4)], 1)
    return MultiTask(), torch.randn(4, 4), y, two_losses


@model
def frozen_submodule() -> Case:
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    for p in m[0].parameters():
        p.requires_grad_(False)
    return m, torch.randn(4, 4), torch.tensor([0, 1, 1, 0]), nn.CrossEntropyLoss()


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.block = nn.Linear(4, 4)  # applied three times
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for _ in range(3):
            h = h + torch.tanh(self.block(h))
        return self.out(h).squeeze(-1)


@model
def shared_weights() -> Case:
    return Shared(), torch.randn(5, 3), torch.randn(5), nn.MSELoss()


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, -0.25, 1.0]))
        self.register_buffer("scale", torch.tensor([2.0, 0.5, 1.5]))
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x - self.mean) * self.scale)


@model
def buffer_in_forward() -> Case:
    return WithBuffer(), torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), nn.CrossEntropyLoss()


class NoGradInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        with torch.no_grad():
            s = h.abs().amax(-1, keepdim=True) + 1  # a detached normaliser
        return self.fc2(torch.relu(h / s))


@model
def no_grad_in_forward() -> Case:
    return NoGradInside(), torch.randn(4, 3), torch.tensor([0, 1, 1, 0]), nn.CrossEntropyLoss()


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.elu(self.body(x))
        return self.a(h), self.b(h).squeeze(-1)


def tuple_loss(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    logits, r = out
    return F.cross_entropy(logits, (y > 0).long()) + F.l1_loss(r, y)


@model
def tuple_output() -> Case:
    return TupleOut(), torch.randn(4, 3), torch.randn(4), tuple_loss


@model
def dropout_eval() -> Case:
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2),
                      nn.AlphaDropout(0.2))  # fmt: skip
    return m.eval(), torch.randn(4, 4), torch.tensor([0, 1, 0, 1]), nn.CrossEntropyLoss()


class TiedAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(3, 6) * 0.4)
        self.b_enc, self.b_dec = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(F.linear(x, self.W, self.b_enc))
        return F.linear(h, self.W.t(), self.b_dec)


@model
def tied_autoencoder() -> Case:
    x = torch.randn(4, 6)
    return TiedAE(), x, x, nn.MSELoss()


class Hypernet(nn.Module):
    """Weights produced by another network (a hypernetwork), applied with ``bmm``."""

    def __init__(self) -> None:
        super().__init__()
        self.hyper = nn.Linear(2, 3 * 2)
        self.head = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w = self.hyper(z).reshape(-1, 2, 3)
        return self.head(torch.bmm(w, x.unsqueeze(-1)).squeeze(-1).relu()).squeeze(-1)


@model
def hypernetwork_bmm() -> Case:
    return Hypernet(), (torch.randn(4, 3), torch.randn(4, 2)), torch.randn(4), nn.MSELoss()
