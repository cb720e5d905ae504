"""The single network definition: layers, loss, parameters and data, all float64.

Every number here is a float64 and is the truth the user wrote: each is an exact dyadic
rational, and every number system (torch dtypes, emulated formats, the exact reference)
starts from these values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fpgrad.errors import InputError

ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "softmax")
LAYER_TYPES = ("dense", "batch_norm", "batch_norm_eval", *ACTIVATIONS)
#: the policy op class of a layer kind where it is not the kind itself
OP_CLASS = {"batch_norm_eval": "batch_norm"}
LOSSES = ("mse", "cross_entropy", "bce")
INIT_SCHEMES = (
    "zeros",
    "constant",
    "uniform",
    "normal",
    "xavier_uniform",
    "xavier_normal",
    "he_uniform",
    "he_normal",
)


@dataclass(frozen=True)
class Layer:
    """One layer. ``params`` maps a parameter name ("weight", "bias", ...) to float64 arrays.

    dense: weight [out, in] (as torch.nn.Linear), optional bias [out].
    batch_norm: weight (gamma) and bias (beta) [features]; training-mode batch statistics
    (biased variance), ``eps`` added to the variance.
    batch_norm_eval: eval-mode batch norm, (x - running_mean) / sqrt(running_var + eps) *
    weight + bias with the constants ``stats["running_mean"]``, ``stats["running_var"]``
    [features] (never updated); weight and bias optional (torch's affine=False, bias=False).
    leaky_relu: ``slope`` for negative inputs. softmax: over the feature axis.
    """

    name: str
    kind: str
    params: dict[str, np.ndarray] = field(default_factory=dict)
    slope: float = 0.01
    eps: float = 1e-5
    #: constants of the layer that are not parameters (no gradient, never trained), float64
    stats: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def is_activation(self) -> bool:
        return self.kind in ACTIVATIONS

    @property
    def op_class(self) -> str:
        """The policy op class of the layer (:data:`fpgrad.model.policy.OP_CLASSES`)."""
        return OP_CLASS.get(self.kind, self.kind)


@dataclass(frozen=True)
class Loss:
    """Loss on the last layer's output, mean reduction.

    mse: mean over all elements of (y - t)**2. cross_entropy: from logits; targets are class
    indices [batch] or probabilities [batch, classes]. bce: binary cross-entropy from logits.
    """

    kind: str


@dataclass(frozen=True)
class Network:
    """Layers, loss and one batch of data (inputs [batch, features], targets)."""

    layers: tuple[Layer, ...]
    loss: Loss
    x: np.ndarray
    y: np.ndarray
    name: str = "network"
    #: user precision policies of the network file, by name (:class:`fpgrad.model.policy.Policy`)
    policies: dict[str, Any] = field(default_factory=dict, compare=False)
    #: how an imported model was read (a Dropout taken as the identity, ...); compare shows them
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def params(self) -> dict[str, np.ndarray]:
        """All parameters in layer order, named ``layer.param``."""
        return {f"{ly.name}.{p}": v for ly in self.layers for p, v in ly.params.items()}

    @property
    def class_targets(self) -> bool:
        """True when cross-entropy targets are class indices."""
        return self.loss.kind == "cross_entropy" and self.y.ndim == 1

    def with_params(self, params: dict[str, np.ndarray]) -> Network:
        """The same network with some parameters replaced (by ``layer.param`` name)."""
        layers = []
        for ly in self.layers:
            new = {p: params.get(f"{ly.name}.{p}", v) for p, v in ly.params.items()}
            layers.append(replace(ly, params=new))
        return replace(self, layers=tuple(layers))

    def map_stats(self, fn) -> Network:  # type: ignore[no-untyped-def]
        """Apply ``fn`` to every layer constant (running statistics)."""
        layers = tuple(
            replace(ly, stats={k: fn(v) for k, v in ly.stats.items()}) if ly.stats else ly
            for ly in self.layers
        )
        return replace(self, layers=layers)

    def with_data(self, x: np.ndarray, y: np.ndarray) -> Network:
        return replace(self, x=x, y=y)

    def map_values(self, fn) -> Network:  # type: ignore[no-untyped-def]
        """Apply ``fn`` to every parameter array, every layer constant (running statistics)
        and to the inputs (and float targets)."""
        net = self.with_params({k: fn(v) for k, v in self.params.items()}).map_stats(fn)
        y = self.y if self.class_targets else fn(self.y)
        return net.with_data(fn(self.x), y)

    def n_outputs(self) -> int:
        width = self.x.shape[1]
        for ly in self.layers:
            if ly.kind == "dense":
                width = ly.params["weight"].shape[0]
        return width


# ---- initialisation ----------------------------------------------------------------------


def init_array(
    scheme: str,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    fan_in: int,
    fan_out: int,
    *,
    value: float = 0.0,
    low: float = -1.0,
    high: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
    gain: float = 1.0,
) -> np.ndarray:
    """Draw a float64 array by ``scheme`` (torch.nn.init's formulas, numpy's PCG64 stream).

    xavier: bound sqrt(6/(fan_in+fan_out))*gain, std sqrt(2/(fan_in+fan_out))*gain.
    he (kaiming, ReLU gain sqrt 2, fan_in mode): bound sqrt(6/fan_in), std sqrt(2/fan_in).
    """
    if scheme == "zeros":
        return np.zeros(shape)
    if scheme == "constant":
        return np.full(shape, float(value))
    if scheme == "uniform":
        return rng.uniform(low, high, size=shape)
    if scheme == "normal":
        return rng.normal(mean, std, size=shape)
    if scheme == "xavier_uniform":
        bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, size=shape)
    if scheme == "xavier_normal":
        return rng.normal(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), size=shape)
    if scheme == "he_uniform":
        bound = math.sqrt(6.0 / fan_in)
        return rng.uniform(-bound, bound, size=shape)
    if scheme == "he_normal":
        return rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape)
    raise InputError(f"unknown init scheme {scheme!r}; known schemes: {', '.join(INIT_SCHEMES)}")


def layer_seed(seed: int, index: int) -> np.random.Generator:
    """The generator for layer ``index``: independent streams from one network seed."""
    return np.random.default_rng([seed, index])


def double_softmax_warning(net: Network) -> str | None:
    """The warning for a last ``softmax`` layer under a ``cross_entropy`` loss, else None.

    cross_entropy takes logits and applies softmax itself, so the layer's softmax is applied
    twice (almost always a bug).
    """
    if net.loss.kind != "cross_entropy" or not net.layers or net.layers[-1].kind != "softmax":
        return None
    return (
        f"layer {net.layers[-1].name!r}: a softmax before cross_entropy applies softmax twice "
        "(cross_entropy takes logits and applies its own); remove the softmax layer"
    )
