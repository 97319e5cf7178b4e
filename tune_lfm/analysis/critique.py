"""Reading a study that has only training losses (the published one) critically: which of its conclusions rest on
comparisons that cannot carry them, and how its presets relate to the trials it ran.

Three checks, all computed from the table:

- a ranking of datasets by raw training loss compares different rows: each dataset's loss says how predictable its
  text is as much as what training gained, so tiers and a "winner" built on it, and any ratio of that spread to the
  spread of a hyperparameter measured on one dataset, are confounded;
- every gap is measured once without a standard error, so a small gap between the best value of a setting and the
  next is not a win;
- each published preset is looked up in the table: whether its settings were ever run together, and which row its
  expected loss and KL come from.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .basis import HELD_OUT_IMPROVEMENT, TRAIN_LOSS
from .derive import add_derived
from .formatting import format_value, setting_label
from .load import expand_sweeps
from .noise import UNKNOWN
from .published import PUBLISHED_PRESETS, PublishedPreset
from .report import Block, Heading, Paragraph, Table
from .spreads import dimension_spreads
from .presets import Preset
from .tables import DIMENSION_NAMES

SMALL_GAP = 0.01
"""Relative gap (of the best value) below which a published "winner" is called out as indistinguishable."""
ROUNDING = 0.006
"""How close a row's numbers must be to a preset's stated ones (the report rounds to 2-3 digits)."""


def _dataset_blocks(spreads: pd.DataFrame) -> list[Block]:
    train = spreads[spreads["basis"] == TRAIN_LOSS.name]
    across = train[train["dimension"] == "dataset"]
    if across.empty:
        return []
    row = across.iloc[0]
    others = train[train["dimension"] != "dataset"]
    text = (f"Datasets are ranked by raw training loss: {row.best_value} {row.best_score:.4g} to {row.worst_value} "
            f"{row.worst_score:.4g} ({row.ratio:.2f}×, sweep {row.sweep}). Each dataset's loss is measured on its own "
            "rows, so it says how predictable that dataset's text is as much as what training gained; the table "
            "has no loss of the untuned model per dataset to subtract, nor a common test set. The dataset tiers and "
            "the 'winner' therefore rank datasets by difficulty as much as by the benefit of training on them, and "
            "this analysis does not rank datasets on it (no tiers are given).")
    if not others.empty:
        largest = others.sort_values("ratio", ascending=False).iloc[0]
        text += (f" A headline that the dataset matters several times more than any hyperparameter sets this "
                 f"{row.ratio:.2f}× ratio across different rows against ratios measured on one dataset's rows "
                 f"(largest here: {DIMENSION_NAMES[largest.dimension]} {largest.ratio:.2f}×): the two "
                 "are not the same kind of quantity, so the comparison does not show what it claims. A like-for-like "
                 "version needs each dataset's gain on its own held-out rows (base_loss - eval_loss) or every "
                 "trial's loss on one shared probe set, which tune_lfm trials record.")
    return [Paragraph(text)]


def _noise_blocks(spreads: pd.DataFrame) -> list[Block]:
    unknown = spreads[(spreads["next_verdict"] == UNKNOWN) & (spreads["n_values"] > 1)]
    if unknown.empty:
        return []
    rows = unknown.assign(relative_gap=unknown["gap_to_next"] / unknown["best_score"].abs())
    text = ("Noise unknown: each configuration has a single number, with no standard error and no repeated seed, so "
            "no gap in this table can be called a win on the numbers alone. The best value of each setting against "
            "the next:")
    rows = rows.assign(dimension=rows["dimension"].map(DIMENSION_NAMES))
    blocks: list[Block] = [Paragraph(text), Table(rows[["dimension", "basis", "best_value", "best_score", "next_value",
                                                        "next_score", "gap_to_next", "relative_gap",
                                                        "next_verdict"]])]
    for row in rows[rows["relative_gap"] < SMALL_GAP].itertuples():
        blocks.append(Paragraph(
            f"{row.dimension}: {row.best_value} {row.best_score:.4g} against {row.next_value} "
            f"{row.next_score:.4g} is a gap of {row.gap_to_next:.3g} ({row.relative_gap:.1%} of the loss). With "
            "standard errors unknown this is exactly the kind of difference that cannot be called a win; "
            "run with held-out standard errors (and repeated seeds), it would have to exceed twice the standard "
            "error of the gap."))
    return blocks


def _matches(table: pd.DataFrame, settings: dict) -> pd.Series:
    mask = pd.Series(True, index=table.index)
    for key, value in settings.items():
        if key not in table:
            continue
        column = table[key]
        mask &= np.isclose(column.astype(float), float(value), rtol=1e-6) if isinstance(value, (int, float)) \
            else column.astype(str) == str(value)
    return mask


def _describe_rows(rows: pd.DataFrame, columns: list[str]) -> str:
    return "; ".join(f"sweep {r['sweep']}: {setting_label(r, columns)} ({_losses(r)})" for _, r in rows.iterrows())


def _losses(trial: pd.Series) -> str:
    return f"train_loss {format_value('train_loss', trial['train_loss'])}, kl {format_value('kl', trial['kl'])}"


def _published_row(preset: PublishedPreset, study: pd.DataFrame, own) -> dict:
    settings = list(preset.settings)
    ran = study[_matches(study, preset.settings)]
    source = study[np.isclose(study["train_loss"], preset.expected_loss, atol=ROUNDING)
                   & np.isclose(study["kl"], preset.expected_kl, atol=ROUNDING)]
    if ran.empty:
        verdict = "never run together in this table"
    else:
        verdict = "run: " + _describe_rows(ran.drop_duplicates(settings), settings)
    mismatch = [k for k, v in preset.settings.items()
                if not source.empty and k in source and not _matches(source, {k: v}).all()]
    numbers_from = _describe_rows(source, settings) if not source.empty else "no row has these numbers"
    if mismatch:
        numbers_from += f" - differs from the preset in {', '.join(mismatch)}"
    return {"preset": preset.name, "published_settings": setting_label(pd.Series(preset.settings), settings),
            "published_expected": f"loss {preset.expected_loss:g}, kl {preset.expected_kl:g}",
            "settings_run_together": verdict, "expected_numbers_are_from": numbers_from,
            "this_analysis": own}


def _preset_blocks(presets: list[Preset], study: pd.DataFrame) -> list[Block]:
    own = {p.name: p for p in presets}
    rows = []
    for preset in (p for p in PUBLISHED_PRESETS if set(p.settings) <= set(study.columns)):
        mine = own.get(preset.name)
        text = "none qualified"
        if mine is not None and mine.measured:
            trial = mine.trial
            text = (f"{setting_label(pd.Series(mine.config), list(preset.settings))} (trial {trial['trial_id']}; "
                    f"{_losses(trial)}" + (f"; tied with {len(mine.tied) - 1} other(s)" if mine.tied else "") + ")")
        rows.append(_published_row(preset, study, text))
    if not rows:
        return []
    table = pd.DataFrame(rows)
    blocks: list[Block] = [Heading("Published presets beside this analysis's", 3), Table(table)]
    for row in table.itertuples():
        if row.settings_run_together.startswith("never") or " - differs" in row.expected_numbers_are_from:
            blocks.append(Paragraph(
                f"Published {row.preset} ({row.published_settings}) combines settings that were "
                f"{row.settings_run_together}; "
                f"its expected {row.published_expected} are the numbers of {row.expected_numbers_are_from}. "
                "They describe that other trial, not the recommended combination, which is unmeasured."))
    return blocks


def critique_blocks(done: pd.DataFrame, spreads: pd.DataFrame, presets: list[Preset],
                    reference: pd.DataFrame | None, z: float) -> list[Block]:
    """The section, for a study table that has only training losses (the reference, else the analysed trials)."""
    if reference is not None:  # read, not analysed by the pipeline: its spreads are computed here
        study = add_derived(expand_sweeps(reference))
        spreads = dimension_spreads(study, z)
    elif (done["improvement_basis"] != HELD_OUT_IMPROVEMENT).all():
        study = done
    else:
        return []
    if (study["improvement_basis"] == HELD_OUT_IMPROVEMENT).any():
        return []
    blocks: list[Block] = [Heading("Reading the published study critically"), Paragraph(
        f"{study['source'].iloc[0]} holds training losses and KL only (no held-out or base losses, no standard "
        "errors). What its conclusions can and cannot carry:")]
    return blocks + _dataset_blocks(spreads) + _noise_blocks(spreads) + _preset_blocks(presets, study)
