"""Hub atlas: which decoder layers of a model are its hubs, and whether a trained adapter keeps them.

Every layer is scored on the fixed probe set by two methods (`scores`), the scores are combined by mean rank and the
top k layers, with per-layer-type quotas, are the hubs (`ranking`). The result is cached per model, weights, probe and
settings (`store.ensure_atlas`), so a sweep computes it once; hub target sets take their layers from it, and every
trial compares its tuned scores with it (`preservation`).

    python -m tune_lfm.atlas --model tiny-lfm2 --plot atlas.png
"""

from .hubs import resolve_hub_layers
from .preservation import PRESERVATION_KEYS, compare, preservation, tuned_scores
from .ranking import DEFAULT_K, default_quota, parse_quota, select_hubs
from .scores import METHODS
from .store import Atlas, compute_atlas, ensure_atlas

__all__ = ["Atlas", "DEFAULT_K", "METHODS", "PRESERVATION_KEYS", "compare", "compute_atlas", "default_quota",
           "ensure_atlas", "parse_quota", "preservation", "resolve_hub_layers", "select_hubs", "tuned_scores"]
