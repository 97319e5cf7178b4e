"""Turn saved trial dataframes into the answer a sweep is run for: which settings are worth it.

Runs on a laptop: pandas, pyarrow, matplotlib (Agg) and PyYAML only; it never imports torch or ray.

Command::

    python -m tune_lfm.analysis PATH... [--out DIR] [--reference CSV] [--objectives SPEC]...
                                [--efficiency-fraction F] [--surgical-fraction F] [--noise-z Z] [--quiet]

PATH is an experiment directory (its ``trials.parquet``, and ``history.parquet`` when present), a trials
``.parquet`` file or a ``.csv`` with the same columns; several paths are combined. A table without a ``status``
column (the published study) counts every row as completed; one without ``sweep`` is one sweep named after the file.
A PATH may also be a URI (``s3://``, ``gs://``, ``file://``: a cluster sweep's ``--storage``), read file by file in
one read each. The output directory defaults to ``<experiment dir>/analysis`` or ``<file stem>_analysis`` beside a
local file, and to a local ``./analysis-<name>`` for a URI.

Outputs:

- ``report.md`` and ``report.html`` (also printed): inputs, definitions, what mattered most, presets, one table per
  sweep, Pareto fronts, the comparison with published numbers, a critical reading of a table that has training
  losses only, and the trials that did not count with their status.
- ``plots/front_<objectives>.png``: one per front, a panel per sweep plus one for all sweeps; every completed trial
  drawn, the front highlighted (hollow: on it only within noise) and labelled by the settings that vary in its
  sweep. ``plots/what_mattered.png``; ``plots/loss_curves.png`` when history.parquet exists.
- ``pareto.parquet``: one row per (front, scope, member trial) with columns ``front``, ``scope`` (sweep or
  experiment), ``scope_name``, ``objectives`` (as resolved in that scope), ``within_noise``, ``noise_known`` and the
  trial's columns.
- ``presets/best_quality.yaml``, ``best_efficiency.yaml``, ``most_surgical.yaml`` and ``combined_not_yet_run.yaml``:
  the chosen trial's full resolved configuration, which ``python -m tune_lfm.trial --config FILE`` reruns; rule,
  reason, ties, trial_id and the measured metrics with standard errors are comments at the top.

Definitions (details in the modules named):

- improvement = base_loss - eval_loss on the same held-out rows, adapter off vs on (``derive``); without held-out
  numbers, the worst train_loss of the sweep minus the trial's own. efficiency = improvement per million trainable
  parameters.
- Ranking basis (``basis``): held-out improvement within one dataset, probe improvement on the shared probe set when
  trials of different datasets are ranked against each other, train_loss when nothing held out was measured.
- Ties (``noise``): a, b with standard errors sa, sb tie when |a-b| <= Z*sqrt(sa^2+sb^2), Z = ``--noise-z`` (2);
  quality uses improvement's paired standard error; without a standard error the noise is unknown.
- Fronts (``pareto``): ``--objectives COLUMN:min|max,...`` per front, repeatable; ``loss`` is the scope's basis
  (eval_loss, probe_loss or train_loss). Default: loss vs kl, loss vs trainable_params, and all three, per sweep and
  over the whole experiment. A trial leaves a front only when another dominates it by more than the noise.
- Presets (``presets``, ``preset_config``) and what mattered most (``spreads``): see those modules.
- ``--reference CSV`` (e.g. ``analysis/reference/seed_tables.csv``) puts the published train_loss, kl and
  trainable_params beside each trial whose settings match (``compare``), and reads that table critically
  (``critique``, with the published presets in ``published``).

Modules: ``load`` (inputs), ``derive`` (improvement, efficiency, labels), ``basis``, ``noise``, ``pareto``,
``tables``, ``spreads``, ``presets`` and ``preset_config``, ``compare``, ``critique`` and ``published``, ``plots``,
``report`` and ``sections`` (rendering and content), ``pipeline`` (``analyse`` and ``write_outputs``), ``__main__``
(the command).
"""
