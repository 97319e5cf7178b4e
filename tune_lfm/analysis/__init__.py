"""Turn saved trial dataframes into the answer a sweep is run for: which settings are worth it.

Runs on a laptop: pandas, pyarrow, matplotlib (Agg) and PyYAML only; it never imports torch or ray.

Command::

    python -m tune_lfm.analysis PATH... [--out DIR] [--reference CSV] [--objectives SPEC]...
                                [--efficiency-fraction F] [--surgical-fraction F] [--quiet]

PATH is an experiment directory (its ``trials.parquet``, and ``history.parquet`` when present), a trials
``.parquet`` file or a ``.csv`` with the same columns; several paths are combined. A table without a ``status``
column (the published study) counts every row as completed; one without ``sweep`` is one sweep named after the file.
A PATH may also be a URI (``s3://``, ``gs://``, ``file://``: a cluster sweep's ``--storage``), read file by file in
one read each. The output directory defaults to ``<experiment dir>/analysis`` or ``<file stem>_analysis`` beside a
local file, and to a local ``./analysis-<name>`` for a URI.

Outputs:

- ``report.md`` and ``report.html`` (also printed): inputs, definitions, what mattered most, presets, one table per
  sweep, Pareto fronts, the comparison with published numbers, and the trials that did not count with their status.
- ``plots/front_<objectives>.png``: one per front, a panel per sweep plus one for all sweeps; every completed trial
  drawn, the front highlighted and labelled by the settings that vary in its sweep. ``plots/what_mattered.png``;
  ``plots/loss_curves.png`` when history.parquet exists.
- ``pareto.parquet``: one row per (front, scope, member trial) with columns ``front``, ``scope`` (sweep or
  experiment), ``scope_name`` and the trial's columns.
- ``presets/best_quality.yaml``, ``best_efficiency.yaml``, ``most_surgical.yaml`` and ``combined_not_yet_run.yaml``:
  flat trial configs that ``python -m tune_lfm.trial --config FILE`` runs as is; rule, reason and the measured
  metrics are comments at the top.

Objectives: ``--objectives train_loss:min,kl:min`` defines one front over any numeric columns, each ``min`` or
``max``; repeat the flag for several fronts. Default: train_loss vs kl, train_loss vs trainable_params, and all three.
Fronts are computed per sweep and, with several sweeps, over the whole experiment. A trial is on a front when no
other trial is at least as good in every objective and strictly better in one, so ties and duplicates stay together.
Only trials with status ``completed`` and a train_loss count.

Definitions:

- improvement = reference_loss - train_loss. reference_loss is the trial's ``base_loss`` (the untuned model on
  held-out rows of the same dataset); where a trial has none, the worst train_loss among completed trials of its
  sweep (improvement is then relative within a sweep, and the sweep's worst trial scores 0). The report says which.
- efficiency = improvement per million trainable parameters.
- best_quality: lowest train_loss (ties: lower kl, fewer params).
  best_efficiency: fewest trainable params among trials whose improvement reaches ``--efficiency-fraction``
  (default 0.5) of the best improvement in their sweep (ties: higher efficiency, lower kl).
  most_surgical: lowest kl among trials whose improvement reaches ``--surgical-fraction`` (default 0.5) of their
  sweep's best (ties: lower train_loss, fewer params).
  combined_not_yet_run: per setting, the value with the lowest loss where it was compared; no trial measured it.
- What mattered most: per setting, the worst/best train_loss ratio and difference among trials of one sweep that
  differ only in that setting (or, failing that, the mean per value over all trials, marked "marginal").
- ``--reference CSV`` (e.g. ``analysis/reference/seed_tables.csv``) puts the published train_loss, kl and
  trainable_params beside each trial whose settings match; empty published cells match anything.

Modules: ``load`` (inputs), ``derive`` (improvement, efficiency, labels), ``pareto``, ``tables``, ``presets``,
``compare``, ``plots``, ``report`` and ``sections`` (rendering and content), ``pipeline`` (``analyse`` and
``write_outputs``), ``__main__`` (the command).
"""
