"""A model's decoder-layer layout: the stack of layers, each layer's mixer type and its Linear modules.

A leaf module: target resolution (`tune_lfm.targets`) and the hub atlas (`tune_lfm.atlas`) both need the layout, and
neither needs the other to find it. `Layout` is the part of a module tree that target resolution reads, as plain
data: `tune_lfm.models.model_layout` caches it, so planning a sweep needs neither weights nor the model's code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import ConfigError


@dataclass(frozen=True)
class LayerLayout:
    name: str  # module path, e.g. "model.layers.3"
    type: str  # mixer type, as in config.layer_types
    linears: tuple[tuple[str, int, int], ...]  # every nn.Linear inside: (path within the layer, in, out features)


@dataclass(frozen=True)
class Layout:
    model_class: str
    layers: tuple[LayerLayout, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        layers = (LayerLayout(layer["name"], layer["type"], tuple(
            (str(name), int(fan_in), int(fan_out)) for name, fan_in, fan_out in layer["linears"]))
            for layer in data["layers"])
        return cls(data["model_class"], tuple(layers))


def layout_of(model) -> Layout:
    """The layout of a model's module tree (real weights or the meta device)."""
    import torch.nn as nn

    layers = decoder_layers(model)
    types = layer_types_of(model.config)
    names = {id(module): name for name, module in model.named_modules()}
    return Layout(type(model).__name__, tuple(
        LayerLayout(names[id(layer)], types[index], tuple(
            (name, module.in_features, module.out_features) for name, module in layer.named_modules()
            if isinstance(module, nn.Linear)))
        for index, layer in enumerate(layers)))


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
