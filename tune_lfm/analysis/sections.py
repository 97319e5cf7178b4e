"""What the report says, in order: inputs, definitions, what mattered most, presets, sweep tables, fronts,
the comparison with the published study, trials that did not count, loss curves and notes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .derive import describe_basis, varied_columns
from .formatting import format_value, setting_label
from .pareto import EXPERIMENT, front_name
from .presets import COMBINED
from .report import Block, Heading, Image, Paragraph, Table
from .tables import DIMENSION_NAMES, fixed_settings, what_mattered_most

if TYPE_CHECKING:
    from .pipeline import Analysis

SUMMARY_SETTINGS = ["dataset", "optimizer", "learning_rate", "lora_rank", "lora_alpha", "lora_targets", "max_steps",
                    "num_examples"]
ERROR_CHARS = 160

DEFINITIONS = (
    "improvement = reference_loss - train_loss (nats per token), where reference_loss is the trial's base_loss "
    "(the untuned model's loss on held-out rows of the same dataset) when it has one, else the worst train_loss "
    "among completed trials of its sweep. efficiency = improvement per million trainable parameters "
    "(improvement / (trainable_params / 1e6)). A trial is on a Pareto front when no other trial is at least as good "
    "in every objective and strictly better in one; ties and duplicates stay on the front together. Only completed "
    "trials with a train_loss count; the rest are listed at the end.")


def _inputs(analysis: Analysis) -> list[Block]:
    trials = analysis.data.trials
    statuses = ", ".join(f"{s} {n}" for s, n in trials["status"].value_counts().items())
    sweeps = ", ".join(f"{name} ({len(t)})" for name, t in analysis.done.groupby("sweep", sort=False))
    text = (f"Inputs: {', '.join(analysis.data.sources)}. {len(trials)} trials ({statuses}); completed trials per "
            f"sweep: {sweeps}.")
    if "model" in trials:
        text += f" Models: {', '.join(map(str, trials['model'].dropna().unique()))}."
    blocks: list[Block] = [Heading("tune_lfm analysis", 1), Paragraph(text)]
    if "scale" in trials and (trials["scale"] == "tiny").any():
        blocks.append(Paragraph("Some trials ran at tiny scale (embedded model and data): their numbers show the "
                                "sweep ran end to end; they do not describe LFM2.5-230M."))
    return blocks


def _definitions(analysis: Analysis) -> list[Block]:
    fronts = "; ".join(f"front {i}: {front_name(f)}" for i, f in enumerate(analysis.settings.fronts, start=1))
    return [Heading("Definitions"), Paragraph(DEFINITIONS), Paragraph(describe_basis(analysis.done)),
            Paragraph(f"Fronts (numbered in the sweep tables' pareto column): {fronts}.")]


def _image(analysis: Analysis, key: str, out: Path, alt: str) -> list[Block]:
    path = analysis.files.get(key)
    return [Image(path.relative_to(out).as_posix(), alt)] if path is not None else []


def _spreads(analysis: Analysis, out: Path) -> list[Block]:
    blocks: list[Block] = [Heading("What mattered most"), Paragraph(what_mattered_most(analysis.spreads))]
    if not analysis.spreads.empty:
        table = analysis.spreads.drop(columns="best_raw").assign(
            dimension=analysis.spreads["dimension"].map(DIMENSION_NAMES))
        blocks += [Table(table), Paragraph(
            "ratio = worst / best mean train_loss over the values of the setting; controlled: trials of one sweep "
            "that differ only in that setting (held_fixed shows the rest); marginal: mean per value over all trials, "
            "other settings varying too.")]
    return blocks + _image(analysis, "plot spreads", out, "loss spread per setting")


def _presets(analysis: Analysis) -> list[Block]:
    rows = []
    for preset in analysis.presets:
        trial = preset.trial if preset.trial is not None else pd.Series(dtype=object)
        rows.append({"preset": preset.name, "file": f"presets/{preset.name}.yaml" if preset.config else "",
                     "settings": setting_label(pd.Series(preset.config, dtype=object), SUMMARY_SETTINGS),
                     **{c: trial.get(c) for c in ("train_loss", "kl", "trainable_params", "efficiency")}})
    blocks: list[Block] = [Heading("Presets"), Table(pd.DataFrame(rows))]
    for preset in analysis.presets:
        marker = " (not yet run)" if preset.name == COMBINED else ""
        blocks.append(Paragraph(f"{preset.name}{marker}. Rule: {preset.rule}. Why: {preset.reason}."))
    blocks.append(Paragraph("Each YAML runs as is: python -m tune_lfm.trial --config presets/NAME.yaml"))
    return blocks


def _sweeps(analysis: Analysis) -> list[Block]:
    blocks: list[Block] = [Heading("Sweeps")]
    for name, table in analysis.sweep_tables.items():
        sweep = analysis.done[analysis.done["sweep"] == name]
        varied = ", ".join(DIMENSION_NAMES[c] for c in varied_columns(sweep)) or "nothing"
        blocks += [Heading(f"Sweep {name}: varies {varied}", 3), Paragraph(f"Held fixed: {fixed_settings(sweep)}.")]
        blocks.append(Table(table))
    return blocks


def _fronts(analysis: Analysis, out: Path) -> list[Block]:
    blocks: list[Block] = [Heading("Pareto fronts")]
    for number, front in enumerate(analysis.settings.fronts, start=1):
        name = front_name(front)
        members = analysis.pareto[analysis.pareto["front"] == name]
        objectives = [o.column for o in front]
        table = members.assign(scope=members["scope_name"].where(members["scope"] == EXPERIMENT,
                                                                 "sweep " + members["scope_name"]))
        blocks += [Heading(f"Front {number}: {name}", 3), *_image(analysis, f"plot {name}", out, name),
                   Table(table[["scope", "sweep", "label", *objectives]])]
    return blocks


def _comparison(analysis: Analysis) -> list[Block]:
    if analysis.comparison is None:
        return []
    comparison = analysis.comparison
    blocks: list[Block] = [Heading("Compared with the published study")]
    if comparison.empty:
        return blocks + [Paragraph("No completed trial matches a published configuration.")]
    mismatched = int((~comparison["params_match"]).sum())
    matched, completed = comparison["trial_id"].nunique(), analysis.done["trial_id"].nunique()
    blocks.append(Paragraph(
        f"{matched} of {completed} completed trials match a published configuration; "
        f"{analysis.unmatched_reference} published rows have no matching trial. Mean train_loss difference "
        f"{comparison['train_loss_delta'].mean():+.3g}, mean kl difference {comparison['kl_delta'].mean():+.3g}; "
        f"trainable params differ in {mismatched} matched trial(s). Published numbers are averaged where the study "
        "reports one configuration in several tables (n_published)."))
    return blocks + [Table(comparison)]


def _not_counted(analysis: Analysis) -> list[Block]:
    others = analysis.others
    if others.empty:
        return []
    settings = varied_columns(analysis.data.trials)
    table = pd.DataFrame({
        "trial_id": others["trial_id"], "sweep": others["sweep"], "status": others["status"],
        "settings": [setting_label(row, settings) for _, row in others.iterrows()],
        "error": [format_value("error", e)[:ERROR_CHARS] for e in others.get("error", [None] * len(others))],
    })
    return [Heading("Trials not counted"),
            Paragraph(f"{len(others)} trial(s) are not completed with a train_loss and are left out of fronts, "
                      "tables and presets."), Table(table)]


def report_blocks(analysis: Analysis, out: Path) -> list[Block]:
    blocks = [*_inputs(analysis), *_definitions(analysis), *_spreads(analysis, out), *_presets(analysis),
              *_sweeps(analysis), *_fronts(analysis, out), *_comparison(analysis), *_not_counted(analysis)]
    curves = _image(analysis, "plot loss curves", out, "loss curves")
    if curves:
        blocks += [Heading("Loss curves"), *curves]
    if analysis.data.notes:
        blocks += [Heading("Notes"), *(Paragraph(note) for note in analysis.data.notes)]
    return blocks
