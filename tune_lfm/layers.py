"""A model's decoder-layer layout: the stack of layers and each layer's mixer type.

A leaf module: target resolution (`tune_lfm.targets`) and the hub atlas (`tune_lfm.atlas`) both need the layout, and
neither needs the other to find it.
"""

from __future__ import annotations

from .config import ConfigError


def decoder_layers(model) -> list:
    """The model's stack of decoder layers: the ModuleList whose length is config.num_hidden_layers."""
    import torch.nn as nn

    n_layers = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return list(module)
    raise ConfigError(f"cannot find the {n_layers} decoder layers of {type(model).__name__}")


def layer_types_of(config) -> list[str]:
    """Per-layer mixer type; models without `layer_types` are treated as all `full_attention`."""
    types = getattr(config, "layer_types", None)
    return list(types) if types else ["full_attention"] * config.num_hidden_layers
