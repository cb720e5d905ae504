"""Findings of the held-out probe on realistic architectures (``scripts/heldout_models_g.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.errors import InputError
from fpgrad.reference import exact as exact_mod


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor, nn.Module]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return m, torch.randn(5, 4), torch.randint(0, 3, (5,)), nn.CrossEntropyLoss()


def test_uncertified_names_the_skipped_arb_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deep model (a ResNet-18 at batch 4: the fast balls keep 0.0 of their 45 digits, the
    Arb fallback is above its bound of multiply-adds) was told to raise --exact-max-bits,
    which changes nothing there; the message now says the fallback was not tried, and why."""
    net = fpgrad.from_module(*_mlp())
    monkeypatch.setattr(exact_mod, "REQUIRED_DIGITS", 60)  # above the fast balls' 45 digits
    monkeypatch.setattr(exact_mod, "ARB_MAX_MACS", 1)
    with pytest.raises(InputError) as info:
        fpgrad.compare(net, "float32")
    msg = str(info.value)
    assert "certifies only" in msg and "raise --exact-max-bits" not in msg
    assert "the certified Arb fallback was not tried" in msg and "multiply-adds" in msg
    assert "--allow-uncertified" in msg
    res = fpgrad.compare(net, "float32", allow_uncertified=True)
    assert res.certified_digits < 60


def test_uncertified_at_the_cap_still_says_raise_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    net = fpgrad.from_module(*_mlp())
    monkeypatch.setattr(exact_mod, "REQUIRED_DIGITS", 200)  # above Arb's 256 bits (77 digits)
    with pytest.raises(InputError, match="raise --exact-max-bits or pass --allow-uncertified"):
        fpgrad.compare(net, "float32", exact_max_bits=256)


def test_compare_walks_the_constants_once_per_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """compare's -inf mask scan read ``Graph.constants`` (a walk of the whole graph) once per
    node: quadratic in the graph; an LSTM language model unrolled over 20 steps (2 layers,
    0.33M parameters) spent 15.6 of its 20 s of compare there (428x torch float64)."""
    from fpgrad.graph import capture

    torch.manual_seed(0)
    lstm = nn.LSTM(4, 4, 1)
    head = nn.Linear(4, 3)

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.head = lstm, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(x)[0]).flatten(0, 1)

    net = fpgrad.from_module(LM(), torch.randn(12, 2, 4), torch.randint(0, 3, (24,)),
                             nn.CrossEntropyLoss())  # fmt: skip
    calls = []
    prop = capture.Graph.constants

    def counted(self: capture.Graph) -> set[str]:
        calls.append(1)
        return prop.fget(self)

    monkeypatch.setattr(capture.Graph, "constants", property(counted))
    nodes = len(net.graph.ops)
    fpgrad.compare(net, "float16,bfloat16,float32")
    assert nodes > 200 and len(calls) < 40
