"""LoRA target specs: which Linear modules of which decoder layers get an adapter, and exactly how many parameters.

A spec is `{modules: [...], layers: all | hub | [indices], layer_types: [...]}`: in every selected layer, each Linear
whose own name is in `modules` is targeted. `lora_targets` is a preset name, one spec, or a list of specs (union).
LoRA adds rank x (in_features + out_features) parameters per targeted Linear, so counts need only the module shapes:
they are computed from the model's layout, with no weights.

    python -m tune_lfm.targets --model LiquidAI/LFM2.5-230M --targets hub_all --rank 8 --hub-layers 2,3,4,5
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

import yaml

from .config import ConfigError
from .layers import Layout
from .teardown import skip_collection_at_exit

MIXER = ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj"]
"""LFM2's token-mixer projections: attention q/k/v/out and the short convolution's in/out (conv.conv is a Conv1d)."""
FFN = ["w1", "w2", "w3"]

TARGET_PRESETS: dict[str, dict[str, Any]] = {
    # The study's six sets; each reproduces its published parameter count on LFM2.5-230M (r=8, hubs 2,3,4,5).
    "hub_oproj": {"modules": ["out_proj"], "layers": "hub"},
    "hub_all": {"modules": MIXER, "layers": "hub"},
    "in_proj": {"modules": ["in_proj"], "layers": "all"},
    "o_proj": {"modules": ["out_proj"], "layers": "all"},
    "attn": {"modules": ["q_proj", "k_proj", "v_proj", "out_proj"], "layers": "all"},
    "all_linear": {"modules": MIXER, "layers": "all"},
    # Precise variants of what the study's names suggest.
    "attn_layers": {"modules": ["q_proj", "k_proj", "v_proj", "out_proj"], "layer_types": ["full_attention"]},
    "all_linear_ffn": {"modules": MIXER + FFN, "layers": "all"},
}
"""Named target sets. The study's `attn` is PEFT's suffix match on [q,k,v,out]_proj, so it also hits the conv layers'
out_proj; `attn_layers` is attention layers only. The study's `all_linear` leaves out the FFN; `all_linear_ffn` not."""

PUBLISHED_HUB_LAYERS = {
    "LiquidAI/LFM2.5-230M": [2, 3, 4, 5],
    "LiquidAI/LFM2.5-230M-Base": [2, 3, 4, 5],
}
"""The study's published hub layers of LFM2.5-230M (two attention + two conv layers, as its parameter counts imply).
Every other model gets its hubs from its atlas (`tune_lfm.atlas.resolve_hub_layers`), unless `hub_layers` /
`--hub-layers` say them."""


def published_hub_layers(model_name: str) -> list[int] | None:
    """The published hubs of a known model (a pinned revision `id@rev` keeps them), else None."""
    hubs = PUBLISHED_HUB_LAYERS.get(model_name.partition("@")[0])
    return list(hubs) if hubs is not None else None


@dataclass(frozen=True)
class TargetSpec:
    modules: tuple[str, ...]
    layers: str | tuple[int, ...] = "all"
    layer_types: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ResolvedTargets:
    """The concrete modules a target set hits on one model, with the exact LoRA parameter count at `rank`."""

    module_names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    layers: tuple[int, ...]

    def trainable_params(self, rank: int) -> int:
        return sum(rank * (fan_in + fan_out) for fan_in, fan_out in self.shapes)


def parse_spec(value: Any, where: str = "lora_targets") -> list[TargetSpec]:
    """A preset name, a spec mapping, or a list of them -> specs; errors name the key and the allowed values."""
    if isinstance(value, str):
        if value not in TARGET_PRESETS:
            raise ConfigError(f"{where}: unknown target set '{value}'; presets: {', '.join(TARGET_PRESETS)} "
                              "(or a mapping {modules: [...], layers: all|hub|[indices], layer_types: [...]})")
        return parse_spec(TARGET_PRESETS[value], where=f"{where} ({value})")
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where}: an empty list targets nothing")
        return [spec for i, item in enumerate(value) for spec in parse_spec(item, f"{where}[{i}]")]
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a preset name, a mapping or a list, got {type(value).__name__}")
    unknown = set(value) - {"modules", "layers", "layer_types"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: modules, layers, layer_types")
    modules = value.get("modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
        raise ConfigError(f"{where}.modules: must be a non-empty list of module names, got {modules!r}")
    layers = value.get("layers", "all")
    if isinstance(layers, list):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ConfigError(f"{where}.layers: a list must hold layer indices (ints), got {layers!r}")
        layers = tuple(layers)
    elif layers not in ("all", "hub"):
        raise ConfigError(f"{where}.layers: must be 'all', 'hub' or a list of indices, got {layers!r}")
    layer_types = value.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            raise ConfigError(f"{where}.layer_types: must be a list of layer type names, got {layer_types!r}")
        layer_types = tuple(layer_types)
    return [TargetSpec(tuple(modules), layers, layer_types)]


def resolve_targets(layout: Layout, specs: list[TargetSpec], hub_layers: list[int] | None) -> ResolvedTargets:
    """Apply specs to a model's layout (`layers.layout_of`, `models.model_layout`) and list the targeted Linear
    modules in layer order."""
    types = [layer.type for layer in layout.layers]
    chosen: dict[str, tuple[int, int, int]] = {}
    for spec in specs:
        if spec.layers == "hub":
            if hub_layers is None:
                raise ConfigError("target spec uses layers: hub, but no hub layers are known for this model")
            indices = list(hub_layers)
        elif spec.layers == "all":
            indices = list(range(len(types)))
        else:
            indices = list(spec.layers)
        bad = [i for i in indices if not 0 <= i < len(types)]
        if bad:
            raise ConfigError(f"layer indices {bad} out of range: the model has {len(types)} layers "
                              f"(0-{len(types) - 1})")
        if spec.layer_types is not None:
            unknown = set(spec.layer_types) - set(types)
            if unknown:
                raise ConfigError(f"layer_types {sorted(unknown)} not in this model; it has {sorted(set(types))}")
            indices = [i for i in indices if types[i] in spec.layer_types]
        for i in indices:
            layer = layout.layers[i]
            for name, fan_in, fan_out in layer.linears:
                if name.rsplit(".", 1)[-1] in spec.modules:
                    chosen[f"{layer.name}.{name}"] = (i, fan_in, fan_out)
    if not chosen:
        raise ConfigError(f"target specs {specs} match no Linear module of {layout.model_class}")
    ordered = sorted(chosen.items(), key=lambda item: (item[1][0], item[0]))
    return ResolvedTargets(
        module_names=tuple(name for name, _ in ordered),
        shapes=tuple((fan_in, fan_out) for _, (_, fan_in, fan_out) in ordered),
        layers=tuple(sorted({layer for _, (layer, _, _) in ordered})),
    )


def needs_hub_layers(specs: list[TargetSpec]) -> bool:
    return any(spec.layers == "hub" for spec in specs)


def targets_for_model(model_name: str, lora_targets: Any, hub_layers: list[int] | None) -> ResolvedTargets:
    """Resolve a target set against a model's architecture with no weights (its cached layout); hub layers are the
    given ones or the model's published ones (an atlas needs weights: `tune_lfm.atlas.resolve_hub_layers`)."""
    from .models import model_layout, resolve_model

    specs = parse_spec(lora_targets)
    hubs = hub_layers if hub_layers is not None else published_hub_layers(model_name)
    if hubs is None and needs_hub_layers(specs):
        raise ConfigError(f"{model_name} has no published hub layers: give them (--hub-layers, hub_layers) or take "
                          f"them from its atlas (python -m tune_lfm.atlas --model {model_name})")
    return resolve_targets(model_layout(resolve_model(model_name)), specs, hubs)


def parse_targets_arg(text: str) -> Any:
    """`hub_all`, or an inline YAML/JSON spec such as `{modules: [out_proj], layers: [2, 4]}`."""
    if text in TARGET_PRESETS:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--targets {text!r}: not a preset ({', '.join(TARGET_PRESETS)}) and not valid YAML "
                          f"({problem}); e.g. --targets '{{modules: [out_proj], layers: [2, 4]}}'") from None


def parse_layers_arg(text: str, flag: str = "--hub-layers") -> list[int]:
    """`2,3,4,5` -> [2, 3, 4, 5]; anything else is an error naming the flag."""
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated decoder-layer indices, e.g. {flag} 2,3,4,5") \
            from None


def main(argv: list[str] | None = None) -> int:
    skip_collection_at_exit()
    parser = argparse.ArgumentParser(prog="python -m tune_lfm.targets", description="How big is this LoRA adapter?")
    parser.add_argument("--model", default="LiquidAI/LFM2.5-230M")
    parser.add_argument("--targets", default="hub_all", help=f"preset ({', '.join(TARGET_PRESETS)}) or inline spec")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--hub-layers", help="comma-separated decoder-layer indices, e.g. 2,3,4,5")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        hub_layers = parse_layers_arg(args.hub_layers) if args.hub_layers else None
        resolved = targets_for_model(args.model, parse_targets_arg(args.targets), hub_layers)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    params = resolved.trainable_params(args.rank)
    if args.json:
        print(json.dumps({"model": args.model, "targets": args.targets, "rank": args.rank, "trainable_params": params,
                          "layers": list(resolved.layers), "modules": list(resolved.module_names)}))
        return 0
    print(f"{args.model}  targets={args.targets}  rank={args.rank}")
    print(f"trainable params: {params:,} across {len(resolved.module_names)} modules in layers {list(resolved.layers)}")
    for name, (fan_in, fan_out) in zip(resolved.module_names, resolved.shapes):
        print(f"  {name:48s} {fan_in}->{fan_out}  +{args.rank * (fan_in + fan_out):,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
