"""The presets the published study recommends, as it states them (reference/seed_report.txt, "Three presets").

They are compared with the study's own table (`critique.py`) to see which trial each rests on: the published table
(`analysis/reference/seed_tables.csv`) holds the measurements, this module only what the report claims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PublishedPreset:
    name: str
    settings: dict[str, Any]
    expected_loss: float
    expected_kl: float


def _study(dataset: str, optimizer: str, targets: str) -> dict[str, Any]:
    return {"dataset": dataset, "optimizer": optimizer, "learning_rate": 2e-4, "lora_rank": 8,
            "lora_targets": targets, "max_steps": 300}


PUBLISHED_PRESETS = (
    PublishedPreset("best_quality", _study("smol-magpie-ultra", "adafactor", "hub_all"), 1.27, 0.11),
    PublishedPreset("best_efficiency", _study("smol-magpie-ultra", "adafactor", "hub_oproj"), 6.30, 0.039),
    PublishedPreset("most_surgical", _study("gsm8k", "adamw", "hub_all"), 4.95, 0.09),
)
