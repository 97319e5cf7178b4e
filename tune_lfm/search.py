"""`python -m tune_lfm.search NAME|PATH`: a sweep from YAML, scheduled by Ray Tune, saved as trial dataframes.

This is the command line: it reads the sweep (`spaces`), plans and checks its trials without Ray (`planning`),
chooses the experiment on storage, holds its lock, and hands the plan to `runner`, the one module that knows Ray.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
from datetime import datetime

from .checkpoints import KEEP_ADAPTERS, artifact_settings
from .config import ConfigError
from .console import log, quiet_libraries, results_table
from .interrupts import Interrupts, resume_command
from .lock import ExperimentLock, in_use_error, live_holder
from .models import ModelNotFoundError
from .planning import SCALES, make_plan, parse_overrides, resolve_scale
from .results import ExperimentRecord, StorageError, check_writable, experiment_exists
from .spaces import Sweep, load_sweep
from .teardown import skip_collection_at_exit
from .trackers import TRACKERS, check_trackers_installed

DEFAULT_STORAGE = "tune_lfm_results"


def latest_experiment(storage: str, sweep_name: str) -> str | None:
    """The most recently written experiment of `sweep_name` under `storage` (a directory or a URI such as s3://).

    Object stores keep no directory times; there the time of the experiment's trials.parquet counts."""
    import pyarrow.fs as pafs

    from .results import filesystem

    fs, root = filesystem(storage)
    try:
        entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    dirs = {e.base_name: e.mtime for e in entries if e.type == pafs.FileType.Directory
            and (e.base_name == sweep_name or e.base_name.startswith(f"{sweep_name}-"))}
    undated = [name for name, mtime in dirs.items() if mtime is None]
    for info in fs.get_file_info([f"{root}/{name}/trials.parquet" for name in undated]):
        dirs[info.path.rsplit("/", 2)[-2]] = info.mtime
    dated = sorted((mtime.timestamp(), name) for name, mtime in dirs.items() if mtime is not None)
    return dated[-1][1] if dated else None


def choose_experiment(args: argparse.Namespace, sweep: Sweep, scale: str) -> tuple[str, str]:
    """The experiment's name and directory; refuses one that another live driver holds, to resume one that does not
    exist, or to start over one that does (which would run its finished trials again)."""
    storage = args.storage
    name = args.name or (latest_experiment(storage, sweep.name) if args.resume else None)
    if args.resume == "required" and not name:
        raise ConfigError(f"--resume: no experiment of sweep '{sweep.name}' under {storage}; pass --name")
    name = name or f"{sweep.name}-{scale}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    experiment_dir = f"{storage.rstrip('/')}/{name}"
    exists = experiment_exists(experiment_dir)
    if args.resume == "required" and not exists:
        raise ConfigError(f"--resume: there is no experiment {experiment_dir} to continue; check --storage and "
                          "--name, or leave out --resume to start it")
    holder = live_holder(experiment_dir) if exists else None
    if holder:  # said before Ray starts; the lock taken later is what guarantees one writer
        raise in_use_error(experiment_dir, holder)
    if not args.resume and exists:
        raise ConfigError(f"--name {name}: experiment {experiment_dir} already exists; continue it with --resume, or "
                          "choose another --name")
    return name, experiment_dir


def run_search(args: argparse.Namespace) -> int:
    """Check everything, then run the sweep while holding the experiment's lock; returns the exit code."""
    from . import runner

    if not args.verbose:
        quiet_libraries()
    sweep = load_sweep(args.space)
    overrides = parse_overrides(args.set)
    artifacts = artifact_settings(
        args.keep_adapters or sweep.artifacts.keep_adapters,
        args.checkpoint_every if args.checkpoint_every is not None else sweep.artifacts.checkpoint_every_steps,
        "--keep-adapters/--checkpoint-every")
    check_trackers_installed(args.log)
    # A cluster decides the scale (auto: full iff it has GPUs); a local run knows it without starting Ray. A job
    # submitted with `ray job submit` finds its cluster in RAY_ADDRESS.
    address = args.address or os.environ.get("RAY_ADDRESS")
    resources = runner.connect_ray(address, args.verbose) if address else None
    if resources and not args.dry_run:  # before the plan, which may load a model to compute its atlas
        runner.refuse_local_storage_on_cluster(args.storage)
    cluster_gpus = resources.get("GPU", 0) if resources else runner.local_gpu_count()
    scale = resolve_scale(args.scale, cluster_gpus)
    if not args.dry_run:  # a wrong --name/--resume is refused before the plan loads any weights
        name, experiment_dir = choose_experiment(args, sweep, scale)
    plan = make_plan(sweep, scale, overrides)  # all a trial can know before compute
    if args.dry_run:
        print(plan.describe(args.json))
        return 0
    resources = resources or runner.connect_ray(None, args.verbose)
    what = ("embedded tiny-lfm2 model and embedded data, shrunk for CPU" if plan.scale == "tiny"
            else "real model and data")
    log(f"scale: {plan.scale.upper()} ({what}); cluster: {resources.get('CPU', 0):.0f} CPUs, {cluster_gpus:g} GPUs")
    check_writable(experiment_dir)
    launch = runner.Launch(experiment_dir, name, args.storage, cluster_gpus, artifacts, resume=bool(args.resume),
                           gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent,
                           trackers=args.log, verbose=args.verbose)
    argv = getattr(args, "argv", None) or sys.argv[1:]
    with ExperimentLock(experiment_dir, shlex.join(["python", "-m", "tune_lfm.search", *argv]), log=log), \
            Interrupts(log) as interrupts:
        try:
            runner.run_plan(plan, launch, interrupts)
        except KeyboardInterrupt:
            interrupts.received = interrupts.received or signal.SIGINT
        record = ExperimentRecord(experiment_dir)
        if interrupts.received:
            log(f"interrupted: {len(record.finished_ids())} of {plan.total} finished -> {record.trials_uri}")
            log(f"resume: {resume_command(argv, name)}")
            return interrupts.exit_code
    statuses = [row.get("status") for row in record.rows.values()]
    if record.rows:
        print(results_table(list(record.rows.values())), flush=True)
    log(f"finished: {statuses.count('completed')} completed, {statuses.count('diverged')} diverged, "
        f"{statuses.count('failed')} failed -> {record.trials_uri}")
    log(f"next: python -m tune_lfm.analysis {experiment_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tune_lfm.search",
                                     description="Run a LoRA SFT sweep on Ray Tune and save trial dataframes.")
    parser.add_argument("space", help="sweep name in search_spaces/ (datasets, study, pareto, ...) or a YAML path")
    parser.add_argument("--scale", choices=SCALES, default="auto",
                        help="tiny: embedded model+data for CPU; full: real model+hub data; auto: full iff GPUs")
    parser.add_argument("--address", help="Ray cluster address (e.g. ray://head:10001 or auto); default: local Ray")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="experiment root: a directory, s3://, gs://")
    parser.add_argument("--name", help="experiment name (default: <sweep>-<scale>-<timestamp>)")
    parser.add_argument("--resume", action="store_const", const="required",
                        help="continue an interrupted experiment (latest or --name); it must exist")
    parser.add_argument("--resume-if-exists", dest="resume", action="store_const", const="if-exists",
                        help="continue --name if it exists, else start it (for jobs that are retried)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved trials and exit")
    parser.add_argument("--json", action="store_true", help="with --dry-run: JSON output")
    parser.add_argument("--max-concurrent", type=int, help="at most N trials at once")
    parser.add_argument("--gpus-per-trial", type=float, help="GPU fraction per trial (default from model size)")
    parser.add_argument("--keep-adapters", choices=KEEP_ADAPTERS,
                        help="trial adapters kept on storage: all (default), pareto (the analysis's fronts) or none")
    parser.add_argument("--checkpoint-every", type=int, metavar="N",
                        help="save a resume checkpoint every N steps; a retried trial continues from it")
    parser.add_argument("--log", action="append", default=[], choices=TRACKERS,
                        help="stream step losses and final metrics to a tracker (repeatable; see tune_lfm.trackers)")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's trial tables and every trial's own output (quiet by default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a trial setting in every trial, e.g. --set max_steps=50")
    return parser


def main(argv: list[str] | None = None) -> int:
    skip_collection_at_exit()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return run_search(args)
    except (ConfigError, StorageError, ModelNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
