"""Held-out model findings, round 2 (``scripts/heldout_models_d.py``, ``_e``): each fix checked
against torch.

Native columns equal torch's eager autograd bit for bit; the certified exact reference holds
torch float64's loss and gradients in its balls (plus a 1e-9 relative allowance for float64's
own rounding) or, where torch float64 is itself inexact, the mpmath oracle's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from fpgrad.errors import InputError
from tests.oracle.native_exact import check

# ---- casts to integers inside a loss (float targets -> class indices) -------------------------


def _two_task_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Class labels and a regression target in one float tensor: ``y[:, 0].long()``."""
    return F.cross_entropy(out[:, :3], y[:, 0].long()) + 0.5 * F.mse_loss(out[:, 3], y[:, 1])


def _mask_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(y > 0).long()`` as classes, ``(y > 0).float()`` as a weight, ``y.trunc`` by cast."""
    w = (y > 0).float() + 0.5
    return F.cross_entropy(out[:, :2], (y > 0).long()) + (w * (out[:, 2] - y).abs()).mean() \
        + (out[:, 3] * (2.5 * y).to(torch.int32)).mean()  # fmt: skip


def test_float_targets_cast_to_class_indices() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4))
    y = torch.stack([torch.tensor([0.0, 2, 1, 1]), torch.randn(4)], 1)
    check(m, torch.randn(4, 4), y, _two_task_loss)
    y2 = torch.tensor([0.5, -0.25, 1.75, -1.5, 0.0, -0.0])
    check(m, torch.randn(6, 4), y2, _mask_loss)
    net = fpgrad.from_module(m, torch.randn(6, 4), y2, _mask_loss)
    fpgrad.compare(net, "bfloat16:emulated,float32").render(max_rows=2)


# ---- frozen parameters (requires_grad=False): constants, as buffers -----------------------------


class LoRA(nn.Module):
    """A frozen base layer plus a trainable low-rank update, then a frozen head's bias only."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(4, 5)
        self.a, self.b = nn.Parameter(torch.randn(2, 4) * 0.3), nn.Parameter(torch.randn(5, 2))
        self.head = nn.Linear(5, 3)
        self.base.requires_grad_(False)
        self.head.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.base(x) + x @ self.a.t() @ self.b.t()))


def test_frozen_parameters_get_no_gradient() -> None:
    torch.manual_seed(0)
    m, x, y = LoRA(), torch.randn(4, 4), torch.tensor([0, 2, 1, 1])
    check(m, x, y, nn.CrossEntropyLoss())
    net = fpgrad.from_module(m, x, y, nn.CrossEntropyLoss())
    assert net.param_names == ["a", "b", "head.bias"]
    res = fpgrad.compare(net, "bfloat16,float16:emulated")
    assert set(res.values("bfloat16")) == {"a", "b", "head.bias"}
    m.requires_grad_(False)
    with pytest.raises(InputError, match="no parameters that require gradients"):
        fpgrad.from_module(m, x, y, nn.CrossEntropyLoss())


# ---- in-place activations on a batch norm's output (MobileNetV2's BN + ReLU6(inplace=True)) ----


def _inverted_residual(train: bool) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(2, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU6(inplace=True),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4),
        nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Hardswish(inplace=True), nn.Flatten(),
        nn.Linear(4 * 2 * 2, 2))  # fmt: skip
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.train(train)


def test_inplace_activation_on_batch_norm_output() -> None:
    """The item of a batch norm's (or max pool's) output tuple is a fresh tensor, not a view:
    ReLU6(inplace=True) after it runs as a new value (it was refused as a write through a
    view)."""
    x, y = torch.randn(3, 2, 4, 4) * 3, torch.tensor([0, 1, 1])
    for train in (False, True):
        check(_inverted_residual(train), x, y, nn.CrossEntropyLoss())


# ---- torch.nn.utils.weight_norm (legacy): a non-leaf ``weight`` attribute ----------------------


class LegacyWeightNormTCN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import warnings

        from torch.nn.utils import weight_norm

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation notice
            self.c1 = weight_norm(nn.Conv1d(2, 3, 3, padding=2))
            self.fc = weight_norm(nn.Linear(3, 1), dim=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x)[:, :, :-2])  # causal: chomp the right padding
        return self.fc(h[:, :, -1]).squeeze(-1)


def test_legacy_weight_norm_is_copied_and_captured() -> None:
    """torch refuses to deepcopy the module (its ``weight`` is a non-leaf tensor the
    pre-hook recomputes); capture crashed with torch's RuntimeError."""
    torch.manual_seed(0)
    m, x, y = LegacyWeightNormTCN(), torch.randn(3, 2, 5), torch.randn(3)
    check(m, x, y, nn.MSELoss())
    net = fpgrad.from_module(m, x, y, nn.MSELoss())
    assert net.param_names == ["c1.bias", "c1.weight_g", "c1.weight_v", "fc.bias",
                               "fc.weight_g", "fc.weight_v"]  # fmt: skip
    fpgrad.compare(net, "bfloat16,float16:emulated").render(max_rows=2)


# ---- mv, dot, vdot (spectral_norm's sigma = u . (W v)) -----------------------------------------


class SpectralNormDisc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torch.nn.utils.parametrizations import spectral_norm

        self.c = spectral_norm(nn.Conv2d(1, 3, 3, stride=2, padding=1))
        self.fc = spectral_norm(nn.Linear(3 * 2 * 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.leaky_relu(self.c(x), 0.2).flatten(1)).squeeze(-1)


class MatVec(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.u = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [torch.dot(self.u, torch.tanh(torch.mv(self.w, xi))) for xi in x]
        return torch.stack(rows) + torch.vdot(self.u, self.u)


def test_mv_dot_vdot_and_spectral_norm_eval() -> None:
    torch.manual_seed(0)
    check(MatVec(), torch.randn(3, 4), torch.randn(3), nn.MSELoss())
    m = SpectralNormDisc()
    m(torch.randn(2, 1, 4, 4))  # one power iteration in training mode, then frozen
    x, y = torch.randn(4, 1, 4, 4), torch.tensor([1.0, 0.0, 1.0, 0.0])
    check(m.eval(), x, y, nn.BCEWithLogitsLoss())
    check(m.train(), x, y, nn.BCEWithLogitsLoss())  # the power iteration's out= writes


# ---- im2col / col2im (nn.Unfold, nn.Fold) ------------------------------------------------------


class UnfoldFold(nn.Module):
    """Overlapping padded, dilated windows (``nn.Unfold``), a patch embedding, and ``nn.Fold``
    summing overlapping windows back into an image."""

    def __init__(self) -> None:
        super().__init__()
        self.unfold = nn.Unfold(kernel_size=(2, 3), dilation=(1, 2), padding=1, stride=(1, 2))
        self.embed = nn.Linear(2 * 6, 4)
        self.back = nn.Linear(4, 2 * 4)
        self.fold = nn.Fold(output_size=(5, 4), kernel_size=2, padding=(1, 0), stride=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = F.gelu(self.embed(self.unfold(x).transpose(1, 2)))  # (B, 6 x 2 windows, 4)
        return self.fold(self.back(p).transpose(1, 2))  # 6 x 2 windows of 2 x 2


def test_unfold_and_fold() -> None:
    torch.manual_seed(0)
    check(UnfoldFold(), torch.randn(2, 2, 5, 5), torch.randn(2, 2, 5, 4), nn.MSELoss())
    net = fpgrad.from_module(UnfoldFold(), torch.randn(2, 2, 5, 5), torch.randn(2, 2, 5, 4),
                             nn.MSELoss())  # fmt: skip
    fpgrad.compare(net, "float16,float16:emulated").render(max_rows=2)


def test_col2im_emulated_is_torch_kernel_bit_for_bit() -> None:
    """Every addition rounded, in the columns' order (torch's ``data_im += data_col``), in
    float16 and bfloat16 over 16 binades; im2col copies exactly."""
    from types import SimpleNamespace

    from fpgrad.arith.emulated import EmulatedArith
    from fpgrad.graph.ops import index as ix

    rng = np.random.default_rng(3)
    args = ([6, 7], [3, 3], [1, 2], [1, 1], [1, 1])  # output, kernel, dilation, padding, stride
    for fmt, dt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        v = fpgrad.round_to(rng.standard_normal((2, 2 * 9, 6 * 5)) *
                            np.exp2(rng.integers(-8, 8, (2, 18, 30))), fmt)  # fmt: skip
        cx = SimpleNamespace(ar=EmulatedArith(fmt, "fp32"), label=lambda: "test")
        want = torch.ops.aten.col2im(torch.from_numpy(v).to(dt), *args).double().numpy()
        got = np.asarray(ix.col2im(cx, v, *args), dtype=np.float64)
        assert np.array_equal(got.view(np.int64), want.view(np.int64))


def test_reading_a_value_as_a_number_is_refused_in_one_line() -> None:
    """``F.one_hot`` in a loss checks its classes with ``.item()``: one line naming the cause
    and the traceable form, not torch's advice to change make_fx's tracing mode."""

    def margin(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (F.one_hot(y, 3).to(out.dtype) * F.relu(0.9 - out) ** 2).sum(1).mean()

    m, x, y = nn.Linear(4, 3), torch.randn(2, 4), torch.tensor([0, 2])
    with pytest.raises(InputError) as err:
        fpgrad.from_module(m, x, y, margin)
    msg = str(err.value)
    assert "\n" not in msg and "F.one_hot" in msg and "tracing_mode" not in msg

    def scattered(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = torch.zeros_like(out).scatter(1, y[:, None], 1.0)
        return (t * F.relu(0.9 - out) ** 2).sum(1).mean()

    check(m, x, y, scattered)


def test_circular_padding_is_refused_with_a_rewrite() -> None:
    """``padding_mode='circular'`` is ``new_empty`` plus ``copy_`` into slices (and an
    as_strided backward): refused in one line that names the ``torch.cat`` form, which runs."""

    class CatCircular(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.head = nn.Linear(2 * 4 * 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.cat([x[..., -1:], x, x[..., :1]], -1)
            x = torch.cat([x[..., -1:, :], x, x[..., :1, :]], -2)
            return self.head(self.conv(x).flatten(1))

    torch.manual_seed(0)
    x, y = torch.randn(2, 1, 4, 4), torch.tensor([0, 1])
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), nn.Flatten(),
                      nn.Linear(2 * 4 * 4, 2))  # fmt: skip
    with pytest.raises(InputError) as err:
        fpgrad.from_module(m, x, y, nn.CrossEntropyLoss())
    assert "\n" not in str(err.value) and "torch.cat" in str(err.value)
    cat = CatCircular()
    with torch.no_grad():
        cat.conv.weight.copy_(m[0].weight)
        cat.conv.bias.copy_(m[0].bias)
        cat.head.weight.copy_(m[2].weight)
        cat.head.bias.copy_(m[2].bias)
    assert torch.equal(cat(x), m(x))
    check(cat, x, y, nn.CrossEntropyLoss())


# ---- nll_loss2d: cross-entropy per position ((N, C, H, W) and (N, C, L) logits) ----------------


def _seg_losses() -> list:
    w = torch.tensor([1.0, 2.0, 0.5])
    return [
        nn.CrossEntropyLoss(),
        nn.CrossEntropyLoss(weight=w, ignore_index=1),
        nn.CrossEntropyLoss(reduction="sum"),
        lambda out, y: (F.cross_entropy(out, y, weight=torch.tensor([1.0, 2.0, 0.5], dtype=out.dtype),
                                        reduction="none") ** 2).mean(),  # fmt: skip
        nn.CrossEntropyLoss(label_smoothing=0.1),
    ]


def test_cross_entropy_per_position() -> None:
    torch.manual_seed(0)
    seg = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    seq = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1))
    x2, y2 = torch.randn(2, 2, 3, 4), torch.randint(0, 3, (2, 3, 4))
    x1, y1 = torch.randn(2, 2, 5), torch.randint(0, 3, (2, 5))
    for loss in _seg_losses():
        check(seg, x2, y2, loss)
        check(seq, x1, y1, loss)
    net = fpgrad.from_module(seg, x2, y2, _seg_losses()[1])
    fpgrad.compare(net, "bfloat16,float16:emulated").render(max_rows=2)


def test_packed_sequences_and_gaussian_nll_are_refused_with_their_rewrites() -> None:
    """pack_padded_sequence reads its lengths and F.gaussian_nll_loss checks var < 0 as Python
    values: the one line names each and the traceable form (heldout3's packed LSTM, GNLL)."""

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([3, 2]), batch_first=True)
            return self.head(self.rnn(p)[1][0][-1])

    def gnll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.gaussian_nll_loss(out[:, 0], y, F.softplus(out[:, 1]))

    torch.manual_seed(0)
    for model, x, y, loss, name in (
        (Packed(), torch.randn(2, 3, 3), torch.randn(2, 2), nn.MSELoss(), "pack_padded_sequence"),
        (nn.Linear(3, 2), torch.randn(4, 3), torch.randn(4), gnll, "gaussian_nll_loss"),
    ):
        with pytest.raises(InputError) as err:
            fpgrad.from_module(model, x, y, loss)
        assert "\n" not in str(err.value) and name in str(err.value)

    def written(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        var = F.softplus(out[:, 1])
        return (0.5 * (torch.log(var) + (out[:, 0] - y) ** 2 / var)).mean()

    check(nn.Linear(3, 2), torch.randn(4, 3), torch.randn(4), written)
