"""Held-out models, round 5 (``scripts/heldout_models_h.py``: selective scans, linear and
banded attention, point clouds, detection losses, self-supervised losses, survival, ranking,
...): a representative subset checked as the probe does, and each fix of the round.

Native float32/float64 (and float16/bfloat16 where named) bit for bit against the model's own
eager autograd; the certified exact reference holds torch float64's loss and gradients."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.errors import InputError
from fpgrad.graph.capture import copy_model
from tests.oracle.native_exact import _bits, check

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import heldout_models_h as H  # noqa: E402

# ---- the probe on a subset: every family group once ---------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "linear_attention_elu", "retnet_retention", "transformer_xl_relshift",
        "performer_favor", "tabnet_sparsemax", "ssd_giou_loss", "yolo_head",
        "stylegan2_modconv", "schnet_rbf_cutoff", "clip_learned_temperature",
        "two_tower_inbatch", "cox_partial_likelihood", "wgan_gp_penalty",
        "mixture_of_softmaxes", "gmlp_sgu",
    ],
)  # fmt: skip
def test_heldout5_model_native_and_exact(name: str) -> None:
    torch.manual_seed(0)
    m, x, y, loss = getattr(H, name)()
    check(m, x, y, loss, native=("float32", "float64", "float16", "bfloat16"))


def test_item_tower_bias_is_a_proven_zero_under_in_batch_softmax() -> None:
    """The item tower's last bias adds ``u . b`` to a whole row of the in-batch logits, which
    softmax ignores: exact gradient 0, proven (torch float64 gives 2e-16)."""
    torch.manual_seed(0)
    ex = check(*H.two_tower_inbatch())
    assert np.asarray(ex.zero("grads/it.2.bias")).all()


# ---- fix 1: a number beyond a dtype's range in the model's own code: one line ---------------


def test_model_failing_in_float16_under_torch_is_one_line() -> None:
    """RWKV's running maximum starts at ``new_full(.., -1e38)``: torch itself cannot run the
    model in float16 ("value cannot be converted to type c10::Half without overflow"); compare
    and train raised that RuntimeError as a traceback."""
    torch.manual_seed(0)
    net = fpgrad.from_module(*H.rwkv_time_mix())
    with pytest.raises(InputError, match=r"the model itself fails in float16 under torch .*"
                       r"torch.finfo\(x.dtype\).min"):  # fmt: skip
        fpgrad.compare(net, "float16")
    with pytest.raises(InputError, match="the model itself fails in float16"):
        fpgrad.train(net, steps=1, runs="float16")
    assert fpgrad.compare(net, "bfloat16").counts("bfloat16")["nan"] == 0  # in range there


# ---- fix 2: real autocast on CPU and the model's own casts of masks -------------------------


def _autocast_grads(m: nn.Module, x: tuple, y: torch.Tensor, loss, dt: torch.dtype) -> dict:  # noqa: ANN001
    mm = copy_model(m).float()
    xs = [t.float() if t.is_floating_point() else t for t in x]
    with torch.autocast("cpu", dtype=dt):
        out = loss(mm(*xs), y.float() if y.is_floating_point() else y)
    out.backward()
    return {n: p.grad for n, p in mm.named_parameters()}


@pytest.mark.parametrize("name", ["coral_ordinal", "tft_grn_quantiles", "centernet_focal_heatmap"])
def test_autocast_cpu_pairs_the_models_own_casts(name: str) -> None:
    """``(y > k).to(logits.dtype)`` is a ``_to_copy`` to float64 in the trace and to float32
    under autocast; ``torch.tensor(.., dtype=)`` is ``lift_fresh_copy`` traced and
    ``lift_fresh`` run. The policy run refused both as "the model's forward depends on its
    dtype"; it now pairs them and equals the user's own autocast code bit for bit."""
    torch.manual_seed(0)
    m, x, y, loss = getattr(H, name)()
    x = x if isinstance(x, tuple) else (x,)
    net = fpgrad.from_module(m, x, y, loss)
    for prec, dt in (("autocast_cpu", torch.float16), ("autocast_cpu_bf16", torch.bfloat16)):
        got = fpgrad.compare(net, prec).values(prec)
        for k, g in _autocast_grads(m, x, y, loss, dt).items():
            _bits(got[k], g)


def test_autocast_cpu_backward_order_names_the_cast_policy() -> None:
    """SchNet's node features feed a residual and, through autocast's float16 cast, a linear:
    real autocast adds their gradients in another order than the float64 trace. The refusal
    said only "the model's forward depends on its dtype"; it now names the cause and the
    policy that runs (the same casts, below autograd)."""
    torch.manual_seed(0)
    case = H.schnet_rbf_cutoff()
    net = fpgrad.from_module(*case)
    with pytest.raises(InputError, match=r'ordered the backward.*extends = "autocast_cpu"'):
        fpgrad.compare(net, "autocast_cpu")
    torch.manual_seed(0)
    net = fpgrad.from_module(*H.schnet_rbf_cutoff(), policies={"ac": {"extends": "autocast_cpu"}})
    assert fpgrad.compare(net, "ac").counts("ac")["nan"] == 0


# ---- hint: cross-entropy over a -inf masked similarity matrix --------------------------------


def test_log_softmax_of_a_neg_inf_mask_names_finfo_min() -> None:
    torch.manual_seed(0)
    with pytest.raises(InputError, match=r"torch.finfo\(x.dtype\).min instead"):
        fpgrad.from_module(*H.simclr_ntxent_inf())
    torch.manual_seed(0)
    check(*H.simclr_ntxent_finfo_min())
