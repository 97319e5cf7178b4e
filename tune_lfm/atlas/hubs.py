"""Which layers a hub target set means for a model: given ones, the study's published hubs, or the model's atlas."""

from __future__ import annotations

from ..targets import published_hub_layers
from .store import ensure_atlas


def resolve_hub_layers(model_name: str, explicit: list[int] | None) -> list[int]:
    """Hub layers: the explicit list if given, else the published hubs, else the model's atlas (cached; computed
    from the weights on first use)."""
    if explicit is not None:
        return list(explicit)
    published = published_hub_layers(model_name)
    return published if published is not None else list(ensure_atlas(model_name).hubs)
