"""Recurrent layers written from their definitions (torch.nn.RNN/LSTM/GRU documentation), in
mpmath object arrays: independent of torch's kernels and of fpgrad's graph.

RNN:  h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)
LSTM: (i, f, g, o) = chunks of x W_ih^T + b_ih + h W_hh^T + b_hh; c' = s(f) c + s(i) tanh(g),
      h' = s(o) tanh(c')
GRU:  r = s(x W_ir^T + b_ir + h W_hr^T + b_hr), z = s(... z ...),
      n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn)), h' = (1 - z) n + z h
with zero initial states; a layer's input is the previous layer's output (forward and
reverse directions concatenated); the reverse direction reads the sequence backwards.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.oracle.graph_reference import ZERO, gt0, linear, sigmoid, tanh


def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(shape, dtype=object)
    out.fill(ZERO)
    return out


def cell(kind: str, p: dict[str, np.ndarray], sfx: str, x: np.ndarray, h: np.ndarray,
         c: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """One step of ``kind`` (rnn_tanh, rnn_relu, lstm, gru) with the parameters
    ``weight_ih{sfx}``... of ``p``: (h', c')."""
    gi = linear(x, p[f"weight_ih{sfx}"], p.get(f"bias_ih{sfx}"))
    gh = linear(h, p[f"weight_hh{sfx}"], p.get(f"bias_hh{sfx}"))
    hs = h.shape[-1]
    if kind == "rnn_tanh":
        return tanh(gi + gh), None
    if kind == "rnn_relu":
        a = gi + gh
        return np.where(gt0(a), a, ZERO), None
    if kind == "lstm":
        g = gi + gh
        i, f, gg, o = (g[:, k * hs:(k + 1) * hs] for k in range(4))
        c2 = sigmoid(f) * c + sigmoid(i) * tanh(gg)
        return sigmoid(o) * tanh(c2), c2
    r = sigmoid(gi[:, :hs] + gh[:, :hs])
    z = sigmoid(gi[:, hs:2 * hs] + gh[:, hs:2 * hs])
    n = tanh(gi[:, 2 * hs:] + r * gh[:, 2 * hs:])
    return (1 - z) * n + z * h, None


def layers(kind: str, p: dict[str, np.ndarray], x: np.ndarray, hidden: int, num_layers: int = 1,
           bidirectional: bool = False, batch_first: bool = False) -> np.ndarray:  # fmt: skip
    """The output sequence of a stacked (bi)directional layer, as torch lays it out."""
    seq = np.swapaxes(x, 0, 1) if batch_first else x  # (T, B, F)
    for layer in range(num_layers):
        outs = []
        for sfx, order in ((f"_l{layer}", range(len(seq))),
                           (f"_l{layer}_reverse", range(len(seq) - 1, -1, -1))):  # fmt: skip
            if sfx.endswith("reverse") and not bidirectional:
                continue
            h = _zeros((seq.shape[1], hidden))
            c = _zeros((seq.shape[1], hidden)) if kind == "lstm" else None
            out: list[Any] = [None] * len(seq)
            for t in order:
                h, c = cell(kind, p, sfx, seq[t], h, c)
                out[t] = h
            outs.append(np.stack(out))
        seq = np.concatenate(outs, axis=-1)
    return np.swapaxes(seq, 0, 1) if batch_first else seq
