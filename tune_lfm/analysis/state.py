"""What an analysis holds once computed: its settings and results, read by the report sections and the writers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .load import TrialData
from .pareto import DEFAULT_FRONTS, Front
from .presets import Preset, PresetRules
from .tables import DEFAULT_TIER_THRESHOLDS


@dataclass(frozen=True)
class Settings:
    fronts: tuple[Front, ...] = DEFAULT_FRONTS
    rules: PresetRules = PresetRules()
    tier_thresholds: tuple[float, ...] = DEFAULT_TIER_THRESHOLDS

    @property
    def z(self) -> float:
        """The noise multiplier of the tie rule (`noise.py`), shared by tables, fronts, presets and spreads."""
        return self.rules.z


@dataclass
class Analysis:
    data: TrialData
    done: pd.DataFrame
    """Completed trials with derived columns (improvement, efficiency, label); a trial shared by several sweeps
    has one row per sweep (same trial_id)."""
    others: pd.DataFrame
    """Trials that do not count (failed, diverged, running, or without train_loss)."""
    settings: Settings
    pareto: pd.DataFrame
    sweep_tables: dict[str, pd.DataFrame]
    spreads: pd.DataFrame
    presets: list[Preset]
    reference: pd.DataFrame | None = None
    comparison: pd.DataFrame | None = None
    unmatched_reference: int = 0
    files: dict[str, Path] = field(default_factory=dict)
