"""From per-layer scores to hub layers: rank normalisation, the combined score, quota-aware top-k, and comparisons.

Pure functions on lists of floats (index = decoder layer), so selection can be checked without a model.
"""

from __future__ import annotations

import math

from ..config import ConfigError

DEFAULT_K = 4


def average_ranks(values: list[float]) -> list[float]:
    """0-based ascending ranks; tied values share the mean of the ranks they span (as Spearman needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2
        start = end + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation; nan when a side is constant (unless both rank identically) or not finite."""
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} scores against {len(b)}")
    if not all(math.isfinite(x) for x in [*a, *b]):
        return math.nan
    ra, rb = average_ranks(a), average_ranks(b)
    if ra == rb:
        return 1.0
    mean_a, mean_b = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(ra, rb))
    var_a = sum((x - mean_a) ** 2 for x in ra)
    var_b = sum((y - mean_b) ** 2 for y in rb)
    return cov / math.sqrt(var_a * var_b) if var_a > 0 and var_b > 0 else math.nan


def combine(scores: dict[str, list[float]]) -> list[float]:
    """Mean over methods of each layer's rank-normalised score: 0 = lowest layer of every method, 1 = highest.

    Ranks, not raw values, because the methods have different units (a cosine distance and nats); a non-finite score
    (a diverged model) makes the combined score nan.
    """
    layers = len(next(iter(scores.values())))
    if layers == 1:
        return [1.0]
    normalised = []
    for values in scores.values():
        if not all(math.isfinite(v) for v in values):
            return [math.nan] * layers
        normalised.append([rank / (layers - 1) for rank in average_ranks(values)])
    return [sum(column) / len(normalised) for column in zip(*normalised)]


def default_quota(model_type: str, k: int) -> dict[str, int]:
    """LFM2 models: half the hubs attention, half conv (2 + 2 at k=4, as the study's parameter counts imply)."""
    if model_type == "lfm2" and k >= 2:
        return {"conv": k // 2, "full_attention": k // 2}
    return {}


def parse_quota(text: str) -> dict[str, int]:
    """`conv=2,full_attention=2` -> {"conv": 2, "full_attention": 2}; `none` or an empty string -> no quota."""
    if text.strip().lower() in ("", "none"):
        return {}
    quota = {}
    for part in text.split(","):
        name, sep, count = part.partition("=")
        name = name.strip()
        if not sep or not name or not count.strip().isdigit():
            raise ConfigError(f"--quota {text!r}: expected layer_type=count pairs such as conv=2,full_attention=2, "
                              "or none")
        quota[name] = int(count)
    return quota


def check_selection(layer_types: list[str], k: int, quota: dict[str, int]) -> None:
    """Raise a ConfigError naming the problem if top-k with `quota` is impossible on these layers."""
    if not 1 <= k <= len(layer_types):
        raise ConfigError(f"k={k}: the model has {len(layer_types)} layers, so k must be 1-{len(layer_types)}")
    unknown = sorted(set(quota) - set(layer_types))
    if unknown:
        raise ConfigError(f"quota names layer type(s) {unknown}; this model has {sorted(set(layer_types))}")
    for kind, count in quota.items():
        available = layer_types.count(kind)
        if count > available:
            raise ConfigError(f"quota {kind}={count}: the model has only {available} {kind} layer(s)")
    if sum(quota.values()) > k:
        raise ConfigError(f"quota {quota} asks for {sum(quota.values())} layers, more than k={k}")


def select_hubs(combined: list[float], layer_types: list[str], k: int, quota: dict[str, int]) -> list[int]:
    """The k highest-scoring layers, taking exactly quota[type] of each quota'd type first, then the best of the rest.

    Ties go to the lower layer index, so the selection is deterministic. Returns sorted layer indices.
    """
    check_selection(layer_types, k, quota)
    best_first = sorted(range(len(combined)), key=lambda i: (-combined[i], i))
    chosen = [i for kind, count in quota.items() for i in [j for j in best_first if layer_types[j] == kind][:count]]
    rest = [i for i in best_first if i not in chosen]
    return sorted(chosen + rest[: k - len(chosen)])


def quota_forced(combined: list[float], hubs: list[int], k: int) -> list[int]:
    """Hubs that are there only because of the quota: outside the k best layers by combined score alone."""
    best = sorted(range(len(combined)), key=lambda i: (-combined[i], i))[:k]
    return [i for i in hubs if i not in best]


def jaccard(a: list[int], b: list[int]) -> float:
    union = set(a) | set(b)
    return len(set(a) & set(b)) / len(union) if union else 1.0
