"""Wall time of a sweep end to end (`python -m tune_lfm.search <space>`), with where the time went.

The sweep runs exactly as a user starts it, in a child process: Ray start, driver-side preparation (datasets, hub
layers, adapter sizes), the trials, result writing and shutdown. Afterwards trials.parquet and history.parquet are
read for the breakdown:

- study level (seconds of wall time): `startup_s` (launch to the first trial's start), `trials_span_s` (first trial
  start to last trial end), `shutdown_s` (last trial end to exit); `concurrency` = trial-seconds / trials_span_s.
- trial level (trial-seconds, summed over trials): `in_worker_s` (each trial's started_at to finished_at in its
  Ray worker), of which `worker_overhead_s` lies outside `run_trial` (imports, reporting) and `run_trial_wall_s`
  inside; that splits into `train_s` and, where the trial reports them, `prepare_s` (tokenizer and data), `load_s`
  (model and LoRA), `eval_s` (held-out loss and KL), `atlas_s`, with `other_s` the rest. `first_step_s` (from
  history.parquet) is the time to the first logged step, which holds one-off work such as kernel compilation.

Prints one JSON object; `--output` also writes it to a file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.json_report import emit  # noqa: E402
PHASES = ("prepare_s", "load_s", "train_s", "eval_s", "atlas_s")
"""Per-trial phase columns, each counted when trials.parquet has it."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="study", help="sweep name in search_spaces/ or a YAML path")
    parser.add_argument("--scale", choices=["tiny", "full", "auto"], default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="trial setting override passed to the search (repeatable)")
    parser.add_argument("--max-concurrent", type=int, help="passed to the search")
    parser.add_argument("--gpus-per-trial", type=float, help="passed to the search")
    parser.add_argument("--storage", help="experiment root (default: a temporary directory, removed afterwards)")
    parser.add_argument("--log", help="file for the search's own output (default: inside the experiment root)")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds before the search is stopped")
    parser.add_argument("--output", help="also write the JSON here")
    return parser.parse_args(argv)


def search_command(args, storage: str, name: str) -> list[str]:
    command = [sys.executable, "-m", "tune_lfm.search", args.space, "--scale", args.scale, "--storage", storage,
               "--name", name]
    for item in args.set:
        command += ["--set", item]
    if args.max_concurrent:
        command += ["--max-concurrent", str(args.max_concurrent)]
    if args.gpus_per_trial is not None:
        command += ["--gpus-per-trial", str(args.gpus_per_trial)]
    return command


def breakdown(trials, history, launched: float, exited: float) -> dict:
    """Study- and trial-level phases from the experiment's dataframes (see the module docstring)."""
    import pandas as pd

    started = pd.to_datetime(trials["started_at"], utc=True).map(lambda t: t.timestamp())
    finished = pd.to_datetime(trials["finished_at"], utc=True).map(lambda t: t.timestamp())
    span = finished.max() - started.min()
    in_worker = float((finished - started).sum())
    run_trial_wall = float(trials["wall_s"].sum())
    phases = {phase: float(trials[phase].sum()) for phase in PHASES if phase in trials and trials[phase].notna().any()}
    first_steps = history[history["step"] == history.groupby("trial_id")["step"].transform("min")]
    return {
        "study": {"startup_s": started.min() - launched, "trials_span_s": span, "shutdown_s": exited - finished.max(),
                  "concurrency": in_worker / span if span > 0 else None},
        "trial_seconds": {"in_worker_s": in_worker, "worker_overhead_s": in_worker - run_trial_wall,
                          "run_trial_wall_s": run_trial_wall, **phases,
                          "other_s": run_trial_wall - sum(phases.values()),
                          "first_step_s": float(first_steps["elapsed_s"].sum())},
        "trials": {"count": len(trials), **{k: int(v) for k, v in trials["status"].value_counts().items()},
                   "tokens_trained": int(trials["tokens_trained"].fillna(0).sum()),
                   "aggregate_tokens_per_s": float(trials["tokens_trained"].fillna(0).sum()) / span if span > 0
                   else None,
                   "mean_trial_tokens_per_s": float(trials["tokens_per_s"].mean()),
                   "devices": sorted(set(trials["device"].dropna())), "gpu_names": sorted(set(
                       trials["gpu_name"].dropna())), **execution(trials)},
    }


def execution(trials) -> dict:
    """How the trials ran (packing, micro-batch, checkpointing, GPU share), each value with its trial count."""
    columns = ("packing_used", "micro_batch_used", "gradient_checkpointing_used", "gpus_per_trial")
    return {column: {str(value): int(count) for value, count in trials[column].value_counts(dropna=False).items()}
            for column in columns if column in trials}


def main(argv=None) -> int:
    args = parse_args(argv)
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="tune_lfm_wall_") as scratch:
        storage = args.storage or scratch
        name = f"wall-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        command = search_command(args, storage, name)
        log_path = Path(args.log or os.path.join(storage, f"{name}.log"))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        launched = time.time()
        with open(log_path, "w") as log:
            code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=args.timeout).returncode
        exited = time.time()
        if code != 0:
            tail = log_path.read_text()[-3000:]
            raise SystemExit(f"the search exited with {code}; last output:\n{tail}")
        experiment = Path(storage) / name
        trials = pd.read_parquet(experiment / "trials.parquet")
        history = pd.read_parquet(experiment / "history.parquet")
        report = {"benchmark": "study_wall", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(command[1:]), "wall_s": exited - launched,
                  **breakdown(trials, history, launched, exited)}
    emit(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
