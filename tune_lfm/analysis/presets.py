"""The three presets, each picked by a fixed rule from completed trials, and a combined recommendation.

Rules (ties are broken in the order listed, finally by trial_id, so the choice is deterministic):

- best_quality: lowest train_loss; then lower kl, fewer trainable params.
- best_efficiency: among trials whose improvement reaches `efficiency_fraction` of the best improvement in their own
  sweep, the fewest trainable params; then higher efficiency, lower kl. ("Its own sweep" because, without base_loss,
  improvement is only defined relative to a sweep; see `derive`.)
- most_surgical: among trials whose improvement reaches `surgical_fraction` of the best improvement in their own
  sweep, the lowest kl; then lower train_loss, fewer trainable params.
- combined (not yet run): for every setting, the value with the lowest train_loss in the comparison that
  `tables.dimension_spreads` found for it; settings never varied come from the best_quality trial.

Each preset is written as a flat trial YAML that `python -m tune_lfm.trial --config FILE` runs as is; the rule, the
reason and the measured metrics sit in comments above the keys.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .formatting import format_value, is_missing
from .schema import CONFIG_COLUMNS, DEFAULT_MODEL, INTEGER_KEYS

COMBINED = "combined_not_yet_run"
RULES = {
    "best_quality": "lowest train_loss among completed trials; ties go to lower kl, then fewer trainable params",
    "best_efficiency": "fewest trainable params among trials whose improvement reaches {fraction:.0%} of the best "
                       "improvement in their sweep; ties go to higher efficiency, then lower kl",
    "most_surgical": "lowest kl among trials whose improvement reaches {fraction:.0%} of the best improvement in "
                     "their sweep; ties go to lower train_loss, then fewer trainable params",
    COMBINED: "per setting, the value with the lowest train_loss where that setting was compared; unvaried "
              "settings from the best_quality trial",
}
EXPECTED_COLUMNS = ("train_loss", "eval_loss", "kl", "trainable_params", "improvement", "efficiency")


@dataclass(frozen=True)
class PresetRules:
    """Thresholds of the preset rules (fractions of the best improvement in a trial's sweep)."""

    efficiency_fraction: float = 0.5
    surgical_fraction: float = 0.5


@dataclass
class Preset:
    name: str
    rule: str
    reason: str
    config: dict[str, Any] = field(default_factory=dict)
    """The YAML keys; empty when no trial qualified."""
    trial: pd.Series | None = None
    """The measured trial behind the preset; None for the combined recommendation or when none qualified."""
    model_assumed: bool = False
    """True when the input named no model and the study's model was written in."""

    @property
    def measured(self) -> bool:
        return self.trial is not None


def trial_config(trial: pd.Series) -> dict[str, Any]:
    """A trial's settings as plain YAML values; a JSON target spec becomes a mapping, empty cells are left out."""
    config = {}
    for key in CONFIG_COLUMNS:
        value = trial.get(key)
        if is_missing(value):
            continue
        if key in INTEGER_KEYS and float(value).is_integer():
            value = int(value)
        elif key == "learning_rate":
            value = float(value)
        elif key == "lora_targets" and isinstance(value, str) and value.lstrip().startswith(("{", "[")):
            value = json.loads(value)
        elif hasattr(value, "item"):
            value = value.item()
        config[key] = value
    config.setdefault("model", DEFAULT_MODEL)
    return {key: config[key] for key in CONFIG_COLUMNS if key in config}


def _measured(name: str, rule: str, reason: str, trial: pd.Series) -> Preset:
    return Preset(name, rule, reason, trial_config(trial), trial, model_assumed=is_missing(trial.get("model")))


def _first(frame: pd.DataFrame, by: list[str], ascending: list[bool]) -> pd.Series:
    return frame.sort_values(by + ["trial_id"], ascending=ascending + [True], kind="mergesort",
                             na_position="last").iloc[0]


def _qualifying(done: pd.DataFrame, fraction: float) -> pd.DataFrame:
    scored = done.assign(sweep_best_improvement=done.groupby("sweep")["improvement"].transform("max"))
    best = scored["sweep_best_improvement"]
    return scored[(best > 0) & (scored["improvement"] >= fraction * best)]


def _count(trials: pd.DataFrame) -> int:
    """Trials, not rows: a trial shared by several sweeps has a row in each."""
    return trials["trial_id"].nunique()


def _share_of_best(trial: pd.Series) -> str:
    return f"{trial['improvement'] / trial['sweep_best_improvement']:.0%}"


def _describe(trial: pd.Series) -> str:
    return f"trial {trial['trial_id']} (sweep {trial['sweep']}: {trial['label']})"


def best_quality(done: pd.DataFrame) -> Preset:
    trial = _first(done, ["train_loss", "kl", "trainable_params"], [True, True, True])
    rest = done[done["trial_id"] != trial["trial_id"]]
    reason = f"{_describe(trial)} has the lowest train_loss, {trial['train_loss']:.4g}, of {_count(done)} trials"
    if not rest.empty:
        reason += f"; next best {rest['train_loss'].min():.4g}"
    return _measured("best_quality", RULES["best_quality"], reason, trial)


def best_efficiency(done: pd.DataFrame, fraction: float) -> Preset:
    rule = RULES["best_efficiency"].format(fraction=fraction)
    eligible = _qualifying(done.dropna(subset=["trainable_params"]), fraction)
    if eligible.empty:
        return Preset("best_efficiency", rule, "no trial improved on its sweep's reference loss")
    trial = _first(eligible, ["trainable_params", "efficiency", "kl"], [True, False, True])
    params = format_value("trainable_params", trial["trainable_params"])
    reason = (f"{_describe(trial)} is the smallest qualifying adapter ({params} params): improvement "
              f"{trial['improvement']:.3g} is {_share_of_best(trial)} of its sweep's best "
              f"{trial['sweep_best_improvement']:.3g}; efficiency {trial['efficiency']:.3g} per M params; "
              f"{_count(eligible)} of {_count(done)} trials qualified")
    return _measured("best_efficiency", rule, reason, trial)


def most_surgical(done: pd.DataFrame, fraction: float) -> Preset:
    rule = RULES["most_surgical"].format(fraction=fraction)
    eligible = _qualifying(done.dropna(subset=["kl"]), fraction)
    if eligible.empty:
        return Preset("most_surgical", rule, "no trial with a kl improved on its sweep's reference loss")
    trial = _first(eligible, ["kl", "train_loss", "trainable_params"], [True, True, True])
    reason = (f"{_describe(trial)} drifts least from the base model among qualifying trials: kl {trial['kl']:.3g} "
              f"with improvement {trial['improvement']:.3g} ({_share_of_best(trial)} of its sweep's best); "
              f"{_count(eligible)} of {_count(done)} trials qualified")
    return _measured("most_surgical", rule, reason, trial)


def combined_recommendation(done: pd.DataFrame, spreads: pd.DataFrame, quality: Preset) -> Preset:
    """Per-setting winners put together: a configuration no trial has measured yet.

    Settings that moved in lockstep with a compared one (an alpha tied to the rank) are taken from the best trial
    that has the winning value, so the pair stays as it was measured.
    """
    config = dict(quality.config)
    evidence = []
    for spread in spreads[spreads["dimension"] != "seed"].itertuples():
        with_winner = done[done[spread.dimension] == spread.best_raw]
        settings = trial_config(_first(with_winner, ["train_loss"], [True]))
        for key in [spread.dimension, *filter(None, spread.moved_with_it.split(", "))]:
            if key in settings:
                config[key] = settings[key]
        evidence.append(f"{spread.dimension}={spread.best_value} (loss {spread.best_loss:.4g} vs "
                        f"{spread.worst_loss:.4g} for {spread.worst_value}, {spread.method}, sweep {spread.sweep})")
    reason = "NOT YET RUN: no trial measured this combination. " + (
        "; ".join(evidence) if evidence else "Nothing varied, so it equals best_quality")
    return Preset(COMBINED, RULES[COMBINED], reason, {k: config[k] for k in CONFIG_COLUMNS if k in config},
                  model_assumed=quality.model_assumed)


def choose_presets(done: pd.DataFrame, spreads: pd.DataFrame, rules: PresetRules = PresetRules()) -> list[Preset]:
    """The three measured presets and the combined recommendation, in that order."""
    quality = best_quality(done)
    return [quality, best_efficiency(done, rules.efficiency_fraction), most_surgical(done, rules.surgical_fraction),
            combined_recommendation(done, spreads, quality)]


def _comment(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, 116)]


def preset_yaml(preset: Preset) -> str:
    """The YAML text of a preset: comments (rule, reason, metrics, how to run) then the flat trial keys."""
    lines = _comment(f"tune_lfm preset {preset.name}" + ("" if preset.measured else " (NOT YET RUN)"))
    lines += _comment(f"Rule: {preset.rule}.") + _comment(f"Why: {preset.reason}.")
    if preset.measured:
        trial = preset.trial
        metrics = ", ".join(f"{c} {format_value(c, trial[c])}" for c in EXPECTED_COLUMNS
                            if c in trial and not is_missing(trial[c]))
        lines += _comment(f"Expected (measured in trial {trial['trial_id']}, {trial['source']}): {metrics}.")
        if not is_missing(trial.get("adapter_uri")):
            lines += [f"# Adapter: {trial['adapter_uri']}",
                      f"# Export: python -m tune_lfm.export <experiment> --preset {preset.name} --out DIR [--merge]"]
    else:
        lines += _comment("Expected: unknown until it is run; the per-setting evidence is above.")
    if preset.model_assumed:
        lines += _comment(f"The input has no model column: model {DEFAULT_MODEL} (the published study's) is assumed.")
    lines += _comment(f"Run: python -m tune_lfm.trial --config {preset.name}.yaml")
    return "\n".join(lines) + "\n" + yaml.safe_dump(preset.config, sort_keys=False, default_flow_style=False)


def write_presets(presets: list[Preset], directory: Path) -> list[Path]:
    """One YAML per preset that has a configuration; presets no trial qualified for are only in the report."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for preset in presets:
        if preset.config:
            path = directory / f"{preset.name}.yaml"
            path.write_text(preset_yaml(preset))
            written.append(path)
    return written
