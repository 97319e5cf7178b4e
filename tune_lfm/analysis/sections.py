"""What the report says, in order: inputs, definitions, what mattered most, presets, sweep tables, fronts,
the comparison with the published study, trials that did not count, loss curves and notes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .basis import ranking_basis
from .critique import critique_blocks
from .derive import describe_basis, varied_columns
from .formatting import format_value, setting_label
from .pareto import EXPERIMENT, front_name
from .presets import COMBINED
from .report import Block, Heading, Image, Paragraph, Table
from .spreads import what_mattered_most
from .tables import DIMENSION_NAMES, fixed_settings

if TYPE_CHECKING:
    from .pipeline import Analysis

SUMMARY_SETTINGS = ["dataset", "optimizer", "learning_rate", "lora_rank", "lora_alpha", "lora_targets", "max_steps",
                    "num_examples"]
ERROR_CHARS = 160

DEFINITIONS = (
    "improvement = base_loss - eval_loss (nats per token): the same held-out rows of the trial's dataset scored with "
    "the adapter off and on, i.e. what training gained there; improvement_se is its paired standard error over the "
    "held-out conversations. Tables without held-out numbers fall back to the worst train_loss of the sweep minus "
    "the trial's own (relative within a sweep, on training rows). probe_improvement = probe_base_loss - probe_loss "
    "on the shared probe set, the same conversations for every trial. efficiency = improvement per million "
    "trainable parameters. Rankings use one basis, stated with each table: held-out improvement within one dataset; "
    "probe improvement when trials of different datasets are ranked against each other (own held-out improvement "
    "shown beside it); train_loss only where nothing held out was measured. Only completed trials with a "
    "train_loss count; the rest are listed at the end.")
TIE_RULE = (
    "Ties: two values a, b with standard errors sa, sb are tied when |a-b| <= {z:g} x sqrt(sa^2 + sb^2) "
    "(--noise-z). Quality is compared on improvement with its paired standard error, which leaves out how hard each "
    "held-out conversation is (shared by every trial of a dataset) and so is far tighter than eval_loss_se; eval_loss "
    "of trials on the same rows is judged the same way. Where a metric has no standard error the noise is unknown "
    "and no gap on it is called a win.")
FRONTS = (
    "A trial is on a Pareto front when no other trial dominates it (at least as good in every objective, better in "
    "one) by more than the noise in some objective; one dominated only within noise stays on the front, marked "
    "'=' in the sweep tables' pareto column and within_noise in the front tables. The objective `loss` is the "
    "scope's basis: eval_loss within one dataset, probe_loss across datasets, train_loss without held-out numbers.")


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
            Paragraph(TIE_RULE.format(z=analysis.settings.z)), Paragraph(FRONTS),
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
            "best_score / worst_score: mean score per value of the setting on the basis named (gains: higher is "
            "better; train_loss: lower); difference_se: standard error of their difference; verdict: the tie rule "
            "applied to it (next_verdict: to the best against the next value); ratio = worst / best train_loss, "
            "given on the train_loss basis only. controlled: trials of one sweep that differ only in that setting "
            "(held_fixed shows the rest); marginal: mean per value over all trials, other settings varying too.")]
    return blocks + _image(analysis, "plot spreads", out, "loss spread per setting")


def _listed(trial_ids: list[str], most: int = 4) -> str:
    more = len(trial_ids) - most
    return ", ".join(trial_ids[:most]) + (f" and {more} more" if more > 0 else "")


def _preset_status(preset) -> str:
    if preset.name != COMBINED:
        return ""
    return f" (already measured as trial {preset.trial['trial_id']})" if preset.measured else " (not yet run)"


def _presets(analysis: Analysis) -> list[Block]:
    rows = []
    for preset in analysis.presets:
        trial = preset.trial if preset.trial is not None else pd.Series(dtype=object)
        rows.append({"preset": preset.name, "file": f"presets/{preset.name}.yaml" if preset.config else "",
                     "trial_id": trial.get("trial_id"), "basis": preset.basis,
                     "settings": setting_label(pd.Series(preset.config, dtype=object), SUMMARY_SETTINGS),
                     **{c: trial.get(c) for c in ("improvement", "improvement_se", "probe_improvement",
                                                  "probe_improvement_se", "train_loss", "kl", "kl_se",
                                                  "trainable_params")},
                     "tied_with": _listed(preset.tied[1:])})
    table = pd.DataFrame(rows)
    table = table[[c for c in table.columns if table[c].notna().any() and (table[c] != "").any()]]
    blocks: list[Block] = [Heading("Presets"), Table(table)]
    for preset in analysis.presets:
        blocks.append(Paragraph(f"{preset.name}{_preset_status(preset)}. Rule: {preset.rule}. Why: {preset.reason}."))
    blocks.append(Paragraph("Each YAML holds the trial's full resolved configuration and reruns it as is: "
                            "python -m tune_lfm.trial --config presets/NAME.yaml"))
    return blocks


def _sweeps(analysis: Analysis) -> list[Block]:
    blocks: list[Block] = [Heading("Sweeps")]
    for name, table in analysis.sweep_tables.items():
        sweep = analysis.done[analysis.done["sweep"] == name]
        varied = ", ".join(DIMENSION_NAMES[c] for c in varied_columns(sweep)) or "nothing"
        basis = ranking_basis(sweep)
        caption = f"Held fixed: {fixed_settings(sweep)}. Ranked on {basis.name} (tied_with_best)."
        if basis.caveat:
            caption += f" Note: {basis.caveat}."
        if varied_columns(sweep) == ["dataset"] and "tier" not in table:
            caption += " No dataset tiers: raw losses of different datasets rank how predictable they are."
        blocks += [Heading(f"Sweep {name}: varies {varied}", 3), Paragraph(caption)]
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
        resolved = [part.split(":")[0] for spec in members["objectives"].unique() for part in spec.split(",")]
        shown = [c for c in dict.fromkeys(objectives + resolved) if c in table]
        unknown = sorted(members.loc[~members["noise_known"].astype(bool), "scope_name"].unique())
        note = [Paragraph(f"Noise unknown in: {', '.join(unknown)} (no standard errors; compared exactly).")] \
            if unknown else []
        blocks += [Heading(f"Front {number}: {name}", 3), *_image(analysis, f"plot {name}", out, name),
                   Table(table[["scope", "objectives", "sweep", "label", *shown, "within_noise"]]), *note]
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
              *_sweeps(analysis), *_fronts(analysis, out), *_comparison(analysis),
              *critique_blocks(analysis.done, analysis.spreads, analysis.presets, analysis.reference,
                               analysis.settings.z),
              *_not_counted(analysis)]
    curves = _image(analysis, "plot loss curves", out, "loss curves")
    if curves:
        blocks += [Heading("Loss curves"), *curves]
    if analysis.data.notes:
        blocks += [Heading("Notes"), *(Paragraph(note) for note in analysis.data.notes)]
    return blocks
