"""Small networks for tests, built from dicts as a TOML file would give them."""

from __future__ import annotations

from typing import Any

from fpgrad.model.netfile import parse_network
from fpgrad.model.network import Network


def net_from(layers: list[dict[str, Any]], loss: str, x: Any, y: Any, seed: int = 0) -> Network:
    doc = {"seed": seed, "layer": layers, "loss": {"type": loss}, "data": {"x": x, "y": y}}
    return parse_network(doc, source="test")
