"""Column names of the trial dataframe as the analysis reads them, and the one error type it raises.

Kept apart so every module agrees on which columns are configuration (what a trial was told to do) and which are
measurements (what it reported), without importing the training side of the package.
"""

from __future__ import annotations

DEFAULT_MODEL = "LiquidAI/LFM2.5-230M"
"""The study's model, written into presets when the input has no `model` column (the published table)."""

CONFIG_COLUMNS = (
    "model", "dataset", "optimizer", "learning_rate", "lora_rank", "lora_alpha", "lora_targets",
    "max_steps", "num_examples", "seed",
)
"""Settings that name a trial in labels, tables and comparisons (a preset holds these and every other TrialConfig field
that differs from its default, see `preset_config`)."""

REQUIRED_COLUMNS = ("train_loss", "kl", "trainable_params")
"""Without these there is no front, no preset and no table to make."""

NUMERIC_COLUMNS = (
    "learning_rate", "lora_rank", "lora_alpha", "max_steps", "num_examples", "seed", "trainable_params",
    "total_params", "train_loss", "eval_loss", "base_loss", "kl", "kl_p95", "hub_rank_corr", "hub_topk_jaccard",
    "tokens_trained", "tokens_per_s", "wall_s", "peak_mem_gb", "rows_skipped",
    "eval_loss_se", "base_loss_se", "eval_rows", "improvement", "improvement_se", "kl_se", "probe_loss",
    "probe_base_loss", "probe_improvement", "probe_improvement_se", "probe_loss_se", "lr_multiplier",
)
"""Columns that must hold numbers (or be empty) wherever they appear."""

HISTORY_COLUMNS = ("trial_id", "step", "loss")
"""What history.parquet must hold for the loss-curve plot."""

COMPLETED = "completed"


class AnalysisError(ValueError):
    """Input the analysis cannot use; the message names the file or option, what is wrong and what is allowed."""
