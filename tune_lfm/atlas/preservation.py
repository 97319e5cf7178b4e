"""Did training keep the hub structure? The atlas's base scores against the same scores with the adapter enabled.

- hub_rank_corr: Spearman between base and tuned combined scores over all layers.
- hub_topk_jaccard: |base hubs & tuned hubs| / |union|, both selected with the atlas's k and quota.
- hub_preserved: hub_rank_corr >= min_rank_corr (0.9) and hub_topk_jaccard >= min_topk_jaccard (1.0: same set).
A diverged adapter (non-finite scores) gives nan for both and is not preserved. Compare hub_rank_corr with
hub_noise_corr, the atlas's own agreement between two halves of the probe, to tell drift from noise.
"""

from __future__ import annotations

import math
from typing import Callable

from .ranking import combine, jaccard, select_hubs, spearman
from .scores import METHODS, FullPassHook, measure, probe_examples, tokens_digest
from .store import Atlas, model_device, model_dtype

MIN_RANK_CORR = 0.9
MIN_TOPK_JACCARD = 1.0
PRESERVATION_KEYS = ("hub_rank_corr", "hub_topk_jaccard", "hub_preserved",
                     *(f"hub_rank_corr_{method}" for method in METHODS), "hub_noise_corr", "hub_layers_base",
                     "hub_layers_tuned")
"""The keys `compare` returns, i.e. the columns preservation adds to a trial's result."""


def tuned_scores(model, atlas: Atlas, tokenizer, log: Callable[[str], None] | None = None,
                 on_full_pass: FullPassHook | None = None) -> dict[str, list[float]]:
    """Per-method scores of `model` as it is (adapter enabled), measured exactly as the atlas measured the base
    (the same cost as computing the atlas; progress lines go to `log`; `on_full_pass` as in `measure`)."""
    device = model_device(model)
    if (model_dtype(model), device.type) != (atlas.dtype, atlas.device):
        raise ValueError(f"the atlas of {atlas.model} was computed in {atlas.dtype} on {atlas.device}, the model runs "
                         f"in {model_dtype(model)} on {device.type}; use ensure_atlas(..., model=model) for a "
                         "matching one")
    examples = probe_examples(tokenizer, atlas.max_length)
    if tokens_digest(examples) != atlas.probe_tokens:
        raise ValueError(f"the probe tokenizes differently from when the atlas of {atlas.model} was computed "
                         "(tokenizer or probe changed); recompute the atlas")
    progress = (lambda line: log(f"[tune_lfm] hub check of {atlas.model} with the adapter: {line}")) if log else None
    return measure(model, examples, atlas.batch_size, tokenizer.pad_token_id, device, progress,
                   on_full_pass).scores()


def compare(atlas: Atlas, tuned: dict[str, list[float]], min_rank_corr: float = MIN_RANK_CORR,
            min_topk_jaccard: float = MIN_TOPK_JACCARD) -> dict:
    """The preservation summary of tuned scores against the atlas (flat, ready for a trial result row)."""
    combined = combine(tuned)
    finite = all(math.isfinite(value) for value in combined)
    tuned_hubs = select_hubs(combined, atlas.layer_types, atlas.k, atlas.quota) if finite else []
    corr = spearman(atlas.combined, combined)
    overlap = jaccard(atlas.hubs, tuned_hubs) if finite else math.nan
    return {
        "hub_rank_corr": corr,
        "hub_topk_jaccard": overlap,
        "hub_preserved": bool(finite and corr >= min_rank_corr and overlap >= min_topk_jaccard),
        **{f"hub_rank_corr_{method}": spearman(atlas.scores[method], tuned[method]) for method in METHODS},
        "hub_noise_corr": atlas.noise["combined"]["spearman"],
        "hub_layers_base": list(atlas.hubs),
        "hub_layers_tuned": tuned_hubs,
    }


def preservation(model, atlas: Atlas, tokenizer, min_rank_corr: float = MIN_RANK_CORR,
                 min_topk_jaccard: float = MIN_TOPK_JACCARD, log: Callable[[str], None] | None = None) -> dict:
    """Recompute the per-layer scores with the adapter enabled and compare them with the atlas (see module doc)."""
    return compare(atlas, tuned_scores(model, atlas, tokenizer, log), min_rank_corr, min_topk_jaccard)
