"""The values a captured model is given, checked before tracing: every tensor dense, real and in
memory (not ``meta``), no NaN anywhere, and no inf in parameters, targets, normalisation
statistics or the loss's own tensors (a class weight). Inputs and other buffers may hold
+-inf: an attention mask (``-inf`` above the diagonal) is data."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fpgrad.errors import InputError


def _readable(what: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        raise InputError(f"{what} is a meta tensor (shape only, no values); give real values")
    if t.layout != torch.strided:
        raise InputError(
            f"{what} is a {str(t.layout).removeprefix('torch.')} tensor; give a dense one "
            "(.to_dense())"
        )
    if t.is_complex():
        raise InputError(f"{what} is complex ({t.dtype}); give real values")


def _finite(what: str, t: torch.Tensor, allow_inf: bool) -> None:
    if not (t.is_floating_point() and t.numel()):
        return
    with torch.no_grad():
        bad = torch.isnan(t)
        kind = "NaN"
        if not bool(bad.any()) and not allow_inf:
            bad, kind = torch.isinf(t), "inf"
        if bool(bad.any()):
            at = [int(i) for i in torch.nonzero(bad)[0].tolist()]
            verb = "hold" if what == "targets" else "holds"
            raise InputError(
                f"{what} {verb} {kind} (first at index {at}); give finite values: fpgrad "
                "diagnoses the rounding of finite numbers"
            )


def check_values(model: nn.Module, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor,
                 loss: Any) -> None:  # fmt: skip
    """Refuse (InputError) a tensor that cannot be read or a value fpgrad cannot diagnose."""
    norms = {
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.modules.batchnorm._NormBase)
    }
    tensors: list[tuple[str, torch.Tensor, bool]] = [
        *((f"input {i}", x, True) for i, x in enumerate(inputs)),
        ("targets", targets, False),
        *((f"parameter {n!r}", p, False) for n, p in model.named_parameters()),
        *(
            (f"buffer {n!r}", b, n.rpartition(".")[0] not in norms)
            for n, b in model.named_buffers()
        ),
    ]
    if isinstance(loss, nn.Module):
        tensors += [(f"the loss's buffer {n!r}", b, False) for n, b in loss.named_buffers()]
        tensors += [(f"the loss's parameter {n!r}", p, False) for n, p in loss.named_parameters()]
    for what, t, allow_inf in tensors:
        _readable(what, t)
        _finite(what, t, allow_inf)
