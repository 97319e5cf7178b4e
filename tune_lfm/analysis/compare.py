"""Put a user's trials beside the published study's numbers wherever the configurations match.

Matching: every setting present in both tables must be equal (learning rates within 1e-6 relative); a setting the
published row leaves empty (e.g. num_examples outside the duration table) matches anything. Among matching published
rows the most specific ones win (most settings stated), then those from a sweep of the same name; their numbers are
averaged, since the study reports its shared default once per table with slightly different values.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .formatting import is_missing
from .schema import CONFIG_COLUMNS

PUBLISHED = ("train_loss", "kl", "trainable_params")


def _matches(value: object, published: pd.Series) -> pd.Series:
    """Which published rows agree with one user value (published empty cells match everything)."""
    if is_missing(value):
        return published.isna()
    if pd.api.types.is_numeric_dtype(published):
        return published.isna() | pd.Series(np.isclose(published.to_numpy(dtype=float), float(value), rtol=1e-6),
                                            index=published.index)
    return published.isna() | (published.astype(str) == str(value))


def _best_matches(trial: pd.Series, reference: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    mask = pd.Series(True, index=reference.index)
    for key in keys:
        mask &= _matches(trial[key], reference[key])
    found = reference[mask]
    if found.empty:
        return found
    stated = found[keys].notna().sum(axis=1)
    found = found[stated == stated.max()]
    same_sweep = found[found["sweep"] == trial["sweep"]]
    return same_sweep if not same_sweep.empty else found


def compare_with_reference(done: pd.DataFrame, reference: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One row per matched user trial (its numbers, the published ones, the differences), and how many published
    rows no trial matched (configurations still to run)."""
    keys = [c for c in CONFIG_COLUMNS if c in done and c in reference]
    rows, matched = [], pd.Series(False, index=reference.index)
    for _, trial in done.iterrows():
        found = _best_matches(trial, reference, keys)
        if found.empty:
            continue
        matched |= reference.index.isin(found.index)
        published = found[list(PUBLISHED)].mean()
        rows.append({
            "sweep": trial["sweep"], "label": trial["label"], "trial_id": trial["trial_id"],
            "train_loss": trial["train_loss"], "published_train_loss": published["train_loss"],
            "train_loss_delta": trial["train_loss"] - published["train_loss"],
            "kl": trial["kl"], "published_kl": published["kl"], "kl_delta": trial["kl"] - published["kl"],
            "trainable_params": trial["trainable_params"], "published_params": published["trainable_params"],
            "params_match": bool(trial["trainable_params"] == published["trainable_params"]),
            "published_sweep": ", ".join(sorted(set(found["sweep"]))), "n_published": len(found),
        })
    return pd.DataFrame(rows), int((~matched).sum())
