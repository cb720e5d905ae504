"""Bring your own model: a torch module (or a state dict and a list of modules) becomes a
fpgrad :class:`~fpgrad.model.network.Network`.

Two ways in:

* Python: :func:`network_from_module` (``module, x, y, loss``) walks an ``nn.Sequential``
  (nested Sequentials flattened) or a simple module whose ``forward`` is a chain of layers
  (traced with ``torch.fx``) and maps every layer to a fpgrad layer.
* Files: a *model file* (TOML) names the modules in order, the state dict saved with
  ``torch.save(model.state_dict(), PATH)`` and the data (:func:`load_model_file`)::

      name = "digits"
      state_dict = "mlp.pt"          # loaded with torch.load(weights_only=True), or .safetensors
      modules = ["Linear(64, 32)", "ReLU()", "Linear(32, 10)"]
      [loss]
      type = "cross_entropy"
      [data]
      x_file = "x.npy"
      y_file = "y.npy"

Mapping (torch -> fpgrad): Linear -> dense; ReLU, LeakyReLU(negative_slope), Sigmoid, Tanh ->
the activations; Softmax(dim=1 or -1) -> softmax; BatchNorm1d in training mode -> batch_norm
(batch statistics, biased variance; ``affine=False`` or ``bias=False`` become gamma = 1,
beta = 0, which change no value); BatchNorm1d in eval mode with running statistics ->
batch_norm_eval (its running_mean and running_var, not updated; no weight or bias where torch
has none); a final LogSoftmax with NLLLoss -> cross_entropy on
the logits (torch's cross_entropy *is* log_softmax followed by nll_loss); Flatten (first, on
[batch, ...] data), Identity and Dropout (p=0, or in eval mode; in a model file any p, noted)
are dropped. A model file's ``mode = "eval"`` puts its BatchNorm1d modules in eval mode.
Anything else is refused, by name and place. Weights and data are widened to float64 exactly.

Every imported network goes through :func:`fpgrad.model.netfile.parse_network` as the document that
``fpgrad import`` writes, so an imported model and its TOML file are the same network, checked
by the same rules. Files are never unpickled beyond tensors: ``torch.load(weights_only=True)``.

Modules: ``modules`` (torch modules to layer entries, fx-traced chains), ``network``
(entries and data to a :class:`~fpgrad.model.network.Network`), ``model_file`` (state dicts and model
files, read without unpickling), ``toml_out`` (the network file that ``fpgrad import`` writes).
"""

from fpgrad.model.from_torch.model_file import (
    entries_from_state_dict,
    is_model_doc,
    load_any,
    load_model_file,
    load_state_dict,
    parse_spec,
    read_toml,
)
from fpgrad.model.from_torch.modules import (
    LOSS_NAMES,
    MODEL_KEYS,
    MODES,
    SUPPORTED,
    SUPPORTED_TEXT,
    Imported,
    entries_from_module,
)
from fpgrad.model.from_torch.network import import_module, network_from_module
from fpgrad.model.from_torch.toml_out import network_toml, write_network

__all__ = ["Imported", "LOSS_NAMES", "MODEL_KEYS", "MODES", "SUPPORTED", "SUPPORTED_TEXT", "entries_from_module", "entries_from_state_dict", "import_module", "is_model_doc", "load_any", "load_model_file", "load_state_dict", "network_from_module", "network_toml", "parse_spec", "read_toml", "write_network"]
