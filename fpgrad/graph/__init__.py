"""Any torch model: its joint forward and backward captured as aten ops, run in every
precision (native torch, emulated formats) and exactly (certified balls)."""

from fpgrad.graph.network import GraphNetwork, from_module

__all__ = ["GraphNetwork", "from_module"]
