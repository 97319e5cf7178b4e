"""The three presets, each picked by a fixed rule from completed trials, and a combined recommendation.

Rules. "Gain" is the ranking basis of `basis.py` (held-out improvement within one dataset, probe improvement across
datasets, the worst-in-sweep train_loss fallback for tables without held-out numbers); ties follow `noise.py`:

- best_quality: the best score on the basis of all trials. Every trial tied with it within noise is listed, and the
  pick among them goes to lower kl, then fewer trainable params, then the better score, then trial_id.
- best_efficiency: among trials whose gain reaches `efficiency_fraction` of the best gain in their own sweep, the
  fewest trainable params (counts are exact: only equal counts tie); then higher gain, lower kl, trial_id.
- most_surgical: among the same kind of qualifying trials (`surgical_fraction`), the lowest kl; every trial tied with
  it on kl within noise is listed, and the pick goes to fewer trainable params, then higher gain, then trial_id.
- combined (not yet run): for every setting, the value that scored best in the comparison `spreads` found for it,
  put into the best_quality trial's configuration. When that equals a measured trial's configuration, the preset
  says which trial it is and carries its metrics.

Each preset is the chosen trial's full resolved configuration (`preset_config`), so `python -m tune_lfm.trial
--config FILE` reruns that trial; the rule, the reason, the ties and the measured metrics sit in comments above it.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .basis import Basis, best_position, ranking_basis
from .formatting import format_value, is_missing
from .noise import TIED, ties_with
from .preset_config import trial_config
from .schema import DEFAULT_MODEL

COMBINED = "combined_not_yet_run"
RULES = {
    "best_quality": "best score on the ranking basis among completed trials; trials tied with it within noise go "
                    "to lower kl, then fewer trainable params",
    "best_efficiency": "fewest trainable params among trials whose gain reaches {fraction:.0%} of the best gain in "
                       "their sweep; equal counts go to higher gain, then lower kl",
    "most_surgical": "lowest kl among trials whose gain reaches {fraction:.0%} of the best gain in their sweep; "
                     "trials tied with it on kl within noise go to fewer trainable params, then higher gain",
    COMBINED: "per setting, the value that scored best where that setting was compared, put into the best_quality "
              "trial's configuration",
}
EXPECTED = (("eval_loss", "eval_loss_se"), ("base_loss", "base_loss_se"), ("improvement", "improvement_se"),
            ("probe_loss", "probe_loss_se"), ("probe_improvement", "probe_improvement_se"), ("kl", "kl_se"),
            ("kl_p95", None), ("train_loss", None), ("trainable_params", None), ("efficiency", None))
RUN_CONTEXT = ("scale", "scale_rule", "lr_multiplier")


@dataclass(frozen=True)
class PresetRules:
    """Thresholds of the preset rules (fractions of the best gain in a trial's sweep) and the noise multiplier."""

    efficiency_fraction: float = 0.5
    surgical_fraction: float = 0.5
    z: float = 2.0


@dataclass
class Preset:
    name: str
    rule: str
    reason: str
    config: dict[str, Any] = field(default_factory=dict)
    """The YAML keys; empty when no trial qualified."""
    trial: pd.Series | None = None
    """The measured trial behind the preset; None for a combination never run or when none qualified."""
    tied: list[str] = field(default_factory=list)
    """trial_ids that tied for this preset (the chosen one first); empty when there was no tie."""
    basis: str = ""
    model_assumed: bool = False
    """True when the input named no model and the study's model was written in."""

    @property
    def measured(self) -> bool:
        return self.trial is not None


def _measured(name: str, rule: str, reason: str, trial: pd.Series, tied: pd.DataFrame, basis: str) -> Preset:
    others = [t for t in tied["trial_id"] if t != trial["trial_id"]]
    return Preset(name, rule, reason, trial_config(trial), trial, [trial["trial_id"], *others] if others else [],
                  basis, model_assumed=is_missing(trial.get("model")))


def _first(frame: pd.DataFrame, by: list[str], ascending: list[bool]) -> pd.Series:
    return frame.sort_values(by + ["trial_id"], ascending=ascending + [True], kind="mergesort",
                             na_position="last").iloc[0]


def _gain_column(basis: Basis) -> str:
    """A column where higher is better: the basis itself, or the worst-in-sweep improvement for train_loss."""
    return basis.column if basis.higher_is_better else "improvement"


def _describe(trial: pd.Series) -> str:
    return f"trial {trial['trial_id']} (sweep {trial['sweep']}: {trial['label']})"


def _value(trial: pd.Series, column: str) -> str:
    se = trial.get(f"{column}_se")
    return format_value(column, trial[column]) + ("" if is_missing(se) else f" ± {format_value(column, se)}")


def _tie_text(tied: pd.DataFrame, chosen: pd.Series, column: str, z: float, breakers: str) -> str:
    if len(tied) < 2:
        return ""
    listed = ", ".join(f"{_describe(t)} {_value(t, column)}" for _, t in tied.iterrows())
    return (f"; {len(tied)} trials tie on {column} within noise (|a-b| <= {z:g} x the standard error of the gap): "
            f"{listed}; {chosen['trial_id']} is picked by {breakers}")


def _tied_set(frame: pd.DataFrame, column: str, higher: bool, z: float) -> tuple[pd.DataFrame, bool]:
    """The best trial on `column` with every trial tied with it (exact equals when the noise is unknown), and
    whether the noise was known."""
    frame = frame.reset_index(drop=True)
    best = int(frame[column].idxmax() if higher else frame[column].idxmin())
    ties = ties_with(frame, column, best, z)
    known = not ties.isna().any()
    equal = frame[column] == frame.loc[best, column]
    return frame[ties.eq(True) | equal], known


def _unique(done: pd.DataFrame) -> pd.DataFrame:
    """Each trial once (a trial shared by several sweeps has a row per sweep)."""
    return done.drop_duplicates("trial_id").reset_index(drop=True)


def best_quality(done: pd.DataFrame, z: float) -> Preset:
    trials = _unique(done)
    basis = ranking_basis(trials)
    tied, known = _tied_set(trials, basis.column, basis.higher_is_better, z)
    trial = _first(tied, ["kl", "trainable_params", basis.column], [True, True, not basis.higher_is_better])
    top = tied.iloc[best_position(tied[basis.column], basis)]
    reason = f"{_describe(top)} has the best {basis.name}, {_value(top, basis.column)}, of {len(trials)} trials"
    if top["trial_id"] != trial["trial_id"]:  # picked from the trials tied with the top one
        reason += f"; {_describe(trial)}, at {_value(trial, basis.column)}, is tied with it within noise"
    rest = trials[~trials["trial_id"].isin(tied["trial_id"])]
    if not rest.empty:
        runner = rest.iloc[best_position(rest[basis.column], basis)]
        reason += f"; the best of the rest is {_describe(runner)} at {_value(runner, basis.column)}"
        reason += "" if known else " (noise unknown: without standard errors this gap cannot be called a win)"
    if basis.caveat:
        reason += f"; note: {basis.caveat}"
    reason += _tie_text(tied, trial, basis.column, z, "lower kl, then fewer trainable params")
    return _measured("best_quality", RULES["best_quality"], reason, trial, tied, basis.name)


def _qualifying(done: pd.DataFrame, fraction: float) -> pd.DataFrame:
    """Trials whose gain reaches `fraction` of their sweep's best gain (each sweep on its own basis)."""
    parts = []
    for _, sweep in done.groupby("sweep", sort=False):
        gain = sweep[_gain_column(ranking_basis(sweep))]
        best = gain.max()
        parts.append(sweep.assign(gain=gain, sweep_best_gain=best)[(best > 0) & (gain >= fraction * best)])
    return _unique(pd.concat(parts)) if parts else done.iloc[:0]


def _share(trial: pd.Series) -> str:
    return f"gain {trial['gain']:.3g} is {trial['gain'] / trial['sweep_best_gain']:.0%} of its sweep's best"


def best_efficiency(done: pd.DataFrame, fraction: float, z: float) -> Preset:
    rule = RULES["best_efficiency"].format(fraction=fraction)
    eligible = _qualifying(done.dropna(subset=["trainable_params"]), fraction)
    if eligible.empty:
        return Preset("best_efficiency", rule, "no trial improved on its sweep's reference")
    tied, _ = _tied_set(eligible, "trainable_params", False, z)
    trial = _first(tied, ["gain", "kl"], [False, True])
    params = format_value("trainable_params", trial["trainable_params"])
    reason = (f"{_describe(trial)} is the smallest qualifying adapter ({params} params): {_share(trial)}; "
              f"efficiency {trial['efficiency']:.3g} per M params; {len(eligible)} of {len(_unique(done))} trials "
              "qualified")
    if len(tied) > 1:
        reason += (f"; {len(tied)} qualifying trials have exactly this many params ("
                   + ", ".join(tied["trial_id"]) + f"), {trial['trial_id']} is picked by higher gain, then lower kl")
        if tied["sweep"].nunique() > 1:
            reason += (" (a weak tie-break: these gains come from different sweeps, each measured against its own "
                       "reference, so they do not rank the trials against each other)")
    return _measured("best_efficiency", rule, reason, trial, tied, ranking_basis(done).name)


def most_surgical(done: pd.DataFrame, fraction: float, z: float) -> Preset:
    rule = RULES["most_surgical"].format(fraction=fraction)
    eligible = _qualifying(done.dropna(subset=["kl"]), fraction)
    if eligible.empty:
        return Preset("most_surgical", rule, "no trial with a kl improved on its sweep's reference")
    tied, known = _tied_set(eligible, "kl", False, z)
    trial = _first(tied, ["trainable_params", "gain"], [True, False])
    reason = (f"{_describe(trial)} drifts least from the base model among qualifying trials: kl {_value(trial, 'kl')} "
              f"({_share(trial)}); {len(eligible)} of {len(_unique(done))} trials qualified")
    reason += "" if known else "; kl has no standard error here, so the noise is unknown"
    reason += _tie_text(tied, trial, "kl", z, "fewer trainable params, then higher gain")
    return _measured("most_surgical", rule, reason, trial, tied, ranking_basis(done).name)


def _same_configuration(done: pd.DataFrame, config: dict[str, Any]) -> pd.Series | None:
    for _, trial in _unique(done).iterrows():
        if trial_config(trial) == config:
            return trial
    return None


def combined_recommendation(done: pd.DataFrame, spreads: pd.DataFrame, quality: Preset) -> Preset:
    """Per-setting winners put together. Settings that moved in lockstep with a compared one (an alpha tied to the
    rank) are taken from the best trial that has the winning value, so the pair stays as it was measured."""
    config = dict(quality.config)
    evidence = []
    for spread in spreads[spreads["dimension"] != "seed"].itertuples():
        with_winner = _unique(done[done[spread.dimension] == spread.best_raw])
        basis = ranking_basis(with_winner)
        settings = trial_config(with_winner.iloc[best_position(with_winner[basis.column], basis)])
        for key in [spread.dimension, *filter(None, spread.moved_with_it.split(", "))]:
            if key in settings:
                config[key] = settings[key]
        doubt = " - within noise, so this choice is not supported by the data" if spread.verdict == TIED else ""
        evidence.append(f"{spread.dimension}={spread.best_value} ({spread.basis} {spread.best_score:.4g} vs "
                        f"{spread.worst_score:.4g} for {spread.worst_value}, {spread.verdict}{doubt}; {spread.method}, "
                        f"sweep {spread.sweep})")
    because = "; ".join(evidence) if evidence else "nothing varied"
    same = _same_configuration(done, config)
    if same is not None:
        reason = (f"ALREADY MEASURED: these settings are exactly those of {_describe(same)}, so its metrics below "
                  f"are what they give; per setting: {because}")
        return Preset(COMBINED, RULES[COMBINED], reason, config, same, basis=quality.basis,
                      model_assumed=quality.model_assumed)
    reason = f"NOT YET RUN: no trial measured this combination; per setting: {because}"
    return Preset(COMBINED, RULES[COMBINED], reason, config, basis=quality.basis, model_assumed=quality.model_assumed)


def choose_presets(done: pd.DataFrame, spreads: pd.DataFrame, rules: PresetRules = PresetRules()) -> list[Preset]:
    """The three measured presets and the combined recommendation, in that order."""
    quality = best_quality(done, rules.z)
    return [quality, best_efficiency(done, rules.efficiency_fraction, rules.z),
            most_surgical(done, rules.surgical_fraction, rules.z), combined_recommendation(done, spreads, quality)]


def _comment(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, 116)]


def expected_metrics(trial: pd.Series) -> str:
    """The trial's measurements with their standard errors, as one line of text."""
    parts = []
    for column, se in EXPECTED:
        if column in trial and not is_missing(trial[column]):
            error = trial.get(se) if se else None
            parts.append(f"{column} {format_value(column, trial[column])}"
                         + ("" if is_missing(error) else f" ± {format_value(column, error)}"))
    return ", ".join(parts)


def preset_yaml(preset: Preset) -> str:
    """The YAML text of a preset: comments (rule, reason, metrics, how to run) then the resolved trial config."""
    status = "" if preset.name != COMBINED else (
        f" (ALREADY MEASURED as trial {preset.trial['trial_id']})" if preset.measured else " (NOT YET RUN)")
    lines = _comment(f"tune_lfm preset {preset.name}{status}")
    lines += _comment(f"Rule: {preset.rule}. Ranking basis: {preset.basis or 'n/a'}.")
    lines += _comment(f"Why: {preset.reason}.")
    if preset.measured:
        trial = preset.trial
        context = ", ".join(f"{c} {format_value(c, trial[c])}" for c in RUN_CONTEXT
                            if c in trial and not is_missing(trial[c]))
        lines += _comment(f"trial_id: {trial['trial_id']} ({trial['source']}{'; ' + context if context else ''}).")
        lines += _comment(f"Expected (measured in that trial; ± one standard error): {expected_metrics(trial)}.")
        if not is_missing(trial.get("adapter_uri")):
            lines += [f"# Adapter: {trial['adapter_uri']}",
                      f"# Export: python -m tune_lfm.export <experiment> --preset {preset.name} --out DIR [--merge]"]
    else:
        lines += _comment("Expected: unknown until it is run; the per-setting evidence is above.")
    if preset.model_assumed:
        lines += _comment(f"The input has no model column: model {DEFAULT_MODEL} (the published study's) is assumed.")
    if preset.tied:
        lines += _comment(f"Tied for this preset: {', '.join(preset.tied)}.")
    lines += _comment("Holds every setting of the trial that differs from the TrialConfig defaults, so it reruns "
                      f"that trial: python -m tune_lfm.trial --config {preset.name}.yaml")
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
