"""`python -m tune_lfm.search NAME|PATH`: a sweep from YAML, scheduled by Ray Tune, saved as trial dataframes.

The module that drives Ray (`checkpoints` and `trackers` hold what trials leave on storage and where they are
logged). Grid and random sweeps are planned up front (so `--dry-run` shows exactly what will run and identical configs
run once); Optuna samples as it goes. Each trial runs `tune_lfm.trial.run_trial` in a Ray worker, streams its step
losses through `tune.report`, reports its adapter as a checkpoint, and a driver-side callback writes `trials.parquet`
and `history.parquet` into the experiment directory after every trial.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from datetime import datetime, timezone
from typing import Any

from .checkpoints import KEEP_ADAPTERS, ArtifactSettings, artifact_settings, prune_adapters
from .config import ConfigError
from .console import results_table, trial_line, varied_settings
from .determinism import start_trial
from .faults import fire, fire_after_step, injected_fault
from .interrupts import Interrupts, resume_command
from .lock import ExperimentLock, in_use_error, live_holder
from .models import ModelNotFoundError
from .results import ExperimentRecord, StorageError, check_writable, experiment_exists
from .spaces import PlannedTrial, Sweep, config_id, load_sweep, scale_metadata, scaled_config
from .targets import needs_hub_layers, parse_spec, targets_for_model
from .trackers import TRACKERS, check_trackers_installed, tracker_callbacks
from .validate import check_sweep

DEFAULT_STORAGE = "tune_lfm_results"
SCALES = ("auto", "tiny", "full")


def log(message: str) -> None:
    print(f"[tune_lfm] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- planning (no Ray)

def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs, each checked on its own as a trial setting."""
    from .config import config_from_dict, parse_set_pairs

    overrides = parse_set_pairs(pairs)
    # each value on its own (the divisibility of micro_batch_size is checked with the rest of each trial's config)
    config_from_dict({k: v for k, v in overrides.items() if k != "micro_batch_size"}, where="--set")
    return overrides


def with_hub_layers(trials: list[PlannedTrial]) -> list[PlannedTrial]:
    """Resolve each model's hub layers once, before any trial starts, and write them into every trial that uses them."""
    from .atlas import resolve_hub_layers

    hubs: dict[str, list[int]] = {}
    for trial in trials:
        config = trial.config
        if config.hub_layers is None and needs_hub_layers(parse_spec(config.lora_targets)):
            if config.model not in hubs:
                hubs[config.model] = resolve_hub_layers(config.model, None)
            trial.config = config.replace(hub_layers=hubs[config.model])
    return trials


def adapter_sizes(trials: list[PlannedTrial]) -> dict[str, int]:
    """Trainable parameters per trial id, computed on the meta device (no weights), each distinct shape once."""
    cache: dict[tuple, int] = {}
    sizes = {}
    for trial in trials:
        c = trial.config
        key = (c.model, c.targets_label(), c.lora_rank, tuple(c.hub_layers or ()))
        if key not in cache:
            cache[key] = targets_for_model(c.model, c.lora_targets, c.hub_layers).trainable_params(c.lora_rank)
        sizes[trial.trial_id] = cache[key]
    return sizes


def longest_first(trials: list[PlannedTrial]) -> list[PlannedTrial]:
    """Trials in the order to start them: most conversations to train first, so a long trial (the duration sweep's
    1000 steps) does not start last and run alone at the end while the other slots sit idle. Ties keep plan order."""
    return sorted(trials, key=lambda t: -t.config.max_steps * t.config.effective_batch)


def describe_plan(trials: list[PlannedTrial], as_json: bool, scale: str) -> str:
    """The planned trials as JSON or as a table headed by the scale they were resolved at; every sweep a trial
    belongs to is listed, however many."""
    sizes = adapter_sizes(trials)
    rows = [{"trial_id": t.trial_id, "sweeps": t.sweeps, "trainable_params": sizes[t.trial_id], **t.config.to_dict()}
            for t in trials]
    if as_json:
        return json.dumps(rows, indent=2, default=str)
    sweeps = max([len("sweeps")] + [len(",".join(row["sweeps"])) for row in rows])
    header = f"{'trial_id':12}  {'sweeps':{sweeps}} {'model':22} {'dataset':18} {'optim':19} {'lr':>8} {'r':>3} " \
             f"{'targets':11} {'steps':>5} {'rows':>5} {'params':>9}"
    lines = [f"scale: {scale.upper()} ({scale_metadata(scale)['scale_rule']})", header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['trial_id']:12}  {','.join(row['sweeps']):{sweeps}} {row['model'][:22]:22} "
                     f"{row['dataset'][:18]:18} {row['optimizer']:19} {row['learning_rate']:>8.1e} "
                     f"{row['lora_rank']:>3} {str(row['lora_targets'])[:11]:11} {row['max_steps']:>5} "
                     f"{str(row['num_examples']):>5} {row['trainable_params']:>9,}")
    lines.append(f"{len(rows)} trials")
    return "\n".join(lines)


def prepare_shared_inputs(configs: list) -> None:
    """Load each model's tokenizer and prepare each distinct dataset subset once, in the driver, before trials start.

    Trials then read the prepared subsets from the on-disk cache instead of streaming and tokenizing them again
    (on a multi-node cluster, each node's first trial fills that node's cache). A failure here is only reported:
    the trial that needs the data fails with the same error and is recorded, while the rest of the sweep runs.
    """
    from .models import load_tokenizer, resolve_model
    from .trial import prepare_data

    tokenizers: dict[str, Any] = {}
    seen: set[tuple] = set()
    for config in configs:
        key = (config.model, config.dataset, config.num_examples, config.eval_examples, config.seed,
               config.max_length, config.uses_embedded_data, json.dumps(config.user_datasets, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        try:
            if config.model not in tokenizers:
                tokenizers[config.model] = load_tokenizer(resolve_model(config.model))
            prepare_data(config, tokenizers[config.model])
        except Exception as err:  # recorded per trial when the trial runs; the sweep goes on
            log(f"warning: could not prepare {config.dataset} for {config.model}: {type(err).__name__}: {err}")
    log(f"prepared {len(seen)} dataset subset(s) for {len(tokenizers)} model(s)")


def prepare_atlases(configs: list, device: str | None) -> None:
    """Compute or load each model's hub atlas once, in the driver, before trials start: every trial compares its
    adapter with it. `device` should be where trials run (cpu for CPU-only trials), since the atlas is keyed by
    device and dtype; a trial that finds no matching atlas computes one and caches it."""
    from .atlas import ensure_atlas

    for model in sorted({config.model for config in configs}):
        try:
            log(f"hub atlas of {model}: hubs {ensure_atlas(model, device=device, log=log).hubs}")
        except Exception as err:  # the trial that needs it fails with the same error and is recorded
            log(f"warning: no hub atlas for {model}: {type(err).__name__}: {err}")
    _release_gpu_memory()


def _release_gpu_memory() -> None:
    """Give cached CUDA blocks back, so the trials that share this GPU next can use them."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def resolve_scale(requested: str, cluster_gpus: float) -> str:
    if requested != "auto":
        return requested
    return "full" if cluster_gpus > 0 else "tiny"


def measured_gpus_per_trial(heaviest, cap: int) -> float:
    """GPU fraction per trial from measured memory: the sweep's heaviest trial's worst micro-batch at its configured
    size on a whole GPU (see `tune_lfm.memory`), with as many trials per GPU as fit, at most `cap`.

    The measurement runs as a Ray task on a GPU node (the driver may have none), in a worker that exits afterwards so
    its CUDA context does not stay on the GPU. If it fails, each trial gets a whole GPU and the failure is logged;
    the trials themselves then fail with the real error, if there is one, and are recorded.
    """
    import ray

    from .memory import trials_per_gpu
    from .trial import measure_trial_memory

    probe = ray.remote(num_gpus=1, max_calls=1)(lambda config: measure_trial_memory(config, log=log))
    try:
        measured = ray.get(probe.remote(heaviest))
    except Exception as err:  # noqa: BLE001 - any failure here must not stop the sweep
        log(f"warning: could not measure trial memory ({type(err).__name__}: {err}); one trial per GPU")
        return 1.0
    per_gpu = trials_per_gpu(measured["peak_gb"], measured["gpu_total_gb"], cap)
    log(f"trial memory: {measured['peak_gb']:.1f} GiB at micro-batch {measured['micro_batch']} on "
        f"{measured['gpu_name']} ({measured['gpu_total_gb']:.0f} GiB) -> {per_gpu} trial(s) per GPU (cap {cap})")
    return 1 / per_gpu


# ---------------------------------------------------------------- running a trial inside Ray

def trial_params(params: dict[str, Any]) -> dict[str, Any]:
    """Our trial description inside Tune's config (every search puts it under the `trial` key)."""
    return params["trial"]


def trial_dirname(trial) -> str:
    """A trial's directory on storage (where its adapter checkpoint lies): our trial id, then Ray's."""
    return f"{trial_params(trial.config)['trial_id']}-{trial.trial_id}"


def _scalar(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def attempt_number(params: dict[str, Any]) -> int:
    """1 on a trial's first run, 2 on its first retry, ...: the driver counts Tune's retries (see `on_trial_recover`)
    and passes the count in the trial's config, so it survives the death of the worker process that ran the trial."""
    return int(params.get("attempt", 1))


def _hardware() -> dict[str, Any]:
    import ray
    import torch

    return {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
            "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def trainable(params: dict[str, Any]) -> None:
    """Ray Tune function trainable: one trial, step metrics while it trains, then the full result."""
    import ray
    from ray import tune

    from .checkpoints import describe_adapter, trial_resume
    from .config import config_from_dict
    from .trial import run_trial

    params = trial_params(params)
    config = config_from_dict(params["config"], where="trial config")
    start_trial(config.seed, int(params.get("_threads", 1)))
    started = datetime.now(timezone.utc).isoformat()
    attempt = attempt_number(params)
    fault = injected_fault(params["trial_id"])
    if fault:
        config = dataclasses.replace(config, **(fire(fault, attempt) or {}))  # a fault may break the config's rules

    def report_step(step: dict[str, Any]) -> None:
        tune.report({"kind": "step", **step})
        if fault:
            fire_after_step(fault, attempt)

    keep_adapter = params.get("_keep_adapters", "all") != "none"
    resume = trial_resume(params.get("_checkpoint_every"))
    with tempfile.TemporaryDirectory(prefix="tune_lfm_adapter_") as adapter_dir:
        try:
            result = run_trial(config, reporter=report_step, log=lambda line: print(line, flush=True),
                               gpu_share=ray.get_runtime_context().get_assigned_resources().get("GPU"),
                               save_adapter=adapter_dir if keep_adapter else None, resume=resume)
        finally:  # the actor runs the next trial (reuse_actors)
            _release_gpu_memory()
            if resume and resume.start:
                shutil.rmtree(resume.start, ignore_errors=True)
        result.pop("history")
        final = {"kind": "final", **{k: _scalar(v) for k, v in result.items()}, "loss": result["train_loss"],
                 "started_at": started, "finished_at": datetime.now(timezone.utc).isoformat(), **_hardware()}
        if resume:
            final["resumed_from_step"] = resume.step
        if keep_adapter:
            final["adapter_bytes"] = describe_adapter(adapter_dir, params, result)
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(adapter_dir) if keep_adapter else None)


# ---------------------------------------------------------------- recording results in the driver

def results_callback(experiment_dir: str, meta: dict[str, Any], total: int, varied: list[str],
                     stopping=lambda: False):
    """A Tune callback (driver side) that writes trials.parquet / history.parquet and prints a line per finished
    trial (named by the `varied` settings) and where the sweep stands.

    Once `stopping()` is true (the sweep was interrupted), trials that end with an error were stopped by us, not
    failed: no row is written for them, and they run again on resume."""
    from ray.tune import Callback

    from .checkpoints import adapter_uri, resumed_step

    class ResultsCallback(Callback):
        def setup(self, **info):
            self.record = ExperimentRecord(experiment_dir)  # rows of an interrupted run are loaded and kept
            self.started = time.time()
            self.finished_before = len(self.record.finished_ids())

        def on_trial_start(self, iteration, trials, trial, **info):
            trial_id, step = trial_params(trial.config)["trial_id"], resumed_step(trial)
            if step is not None:
                log(f"{trial_id} resuming from the checkpoint of step {step}")
            self.record.drop_history(trial_id, after=step)

        def on_trial_recover(self, iteration, trials, trial, **info):
            """Tune will run the trial again: its next actor gets the next attempt number in its config, and the
            failed attempt's steps are dropped."""
            params = trial_params(trial.config)
            log(f"{params['trial_id']} attempt {attempt_number(params)} failed, retrying: {_error_message(trial)[:300]}")
            trial.set_config({**trial.config, "trial": {**params, "attempt": attempt_number(params) + 1}})
            self.record.drop_history(params["trial_id"], after=resumed_step(trial))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            params = trial_params(trial.config)
            if result.get("kind") == "step":
                self.record.add_step(params["trial_id"], result)
            elif result.get("kind") == "final":
                fields = {k: v for k, v in result.items() if k in record_columns()}
                self.record.set_trial({**fields, **meta, **_identity(params), "attempts": attempt_number(params),
                                       "adapter_uri": adapter_uri(experiment_dir, trial, result)})
                self._summary(trials, params["trial_id"])

        def on_trial_error(self, iteration, trials, trial, **info):
            if stopping():
                return
            params = trial_params(trial.config)
            self.record.set_trial({**params["config"], **meta, **_identity(params), "status": "failed",
                                   "error": _error_message(trial)[:2000], "attempts": attempt_number(params)})
            self._summary(trials, params["trial_id"])

        def _summary(self, trials, trial_id: str) -> None:
            log(trial_line(self.record.rows[trial_id], varied))
            statuses = [row.get("status") for row in self.record.rows.values()]
            finished = self.record.finished_ids()
            done, failed = len(finished), statuses.count("failed")
            # a trial whose final result just arrived is still RUNNING in Tune's eyes until its actor stops
            running = sum(t.status == "RUNNING" and trial_params(t.config)["trial_id"] not in finished for t in trials)
            elapsed = time.time() - self.started
            settled_now = done + failed - self.finished_before
            eta = elapsed / max(settled_now, 1) * max(total - done - failed, 0)
            log(f"{done}/{total} done, {running} running, {failed} failed, "
                f"elapsed {elapsed / 60:.1f} min, ETA ~{eta / 60:.1f} min")

    return ResultsCallback()


def _identity(params: dict[str, Any]) -> dict[str, Any]:
    return {"trial_id": params["trial_id"], "sweep": params["sweeps"][0], "sweeps": ",".join(params["sweeps"])}


def _error_message(trial) -> str:
    """The exception line of the trial's last failure (Ray writes the full trace to the trial's error file)."""
    text = ""
    if trial.error_file and os.path.exists(trial.error_file):
        with open(trial.error_file) as handle:
            text = handle.read()
    text = text or str(trial.get_error() or "")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Failure #")]
    return lines[-1] if lines else "trial failed (no error text recorded by Ray)"


def record_columns() -> set[str]:
    from .atlas import PRESERVATION_KEYS
    from .config import FIELD_NAMES
    from .results import TRIAL_COLUMNS

    return (set(TRIAL_COLUMNS) | set(FIELD_NAMES) | set(PRESERVATION_KEYS)
            | {"target_modules", "target_layers", "model_kind"})


# ---------------------------------------------------------------- Ray wiring

def _param_space_for_plan(trials: list[PlannedTrial], worker: dict[str, Any]) -> dict[str, Any]:
    """`worker`: settings of how trials run that are not part of what they compute (threads, checkpoints)."""
    from ray import tune

    return {"trial": tune.grid_search([
        {"config": t.config.to_dict(), "trial_id": t.trial_id, "sweeps": t.sweeps, **worker}
        for t in trials])}


class OptunaSpace:
    """Define-by-run space for OptunaSearch: samples the sweep's dimensions into a full trial config.

    A class rather than a closure because Ray pickles the searcher (and so this) when it saves experiment state.
    """

    def __init__(self, sweep: Sweep, scale: str, overrides: dict[str, Any], worker: dict[str, Any]):
        self.sweep, self.scale, self.overrides, self.worker = sweep, scale, overrides, worker

    def __call__(self, trial) -> dict[str, Any]:
        from .config import config_from_dict

        values = dict(self.sweep.fixed)
        for key, dim in self.sweep.dimensions.items():
            if dim.kind in ("grid", "choice"):
                values[key] = trial.suggest_categorical(key, dim.values)
            elif dim.kind == "uniform":
                values[key] = trial.suggest_float(key, *dim.values)
            elif dim.kind == "loguniform":
                values[key] = trial.suggest_float(key, *dim.values, log=True)
            else:
                values[key] = trial.suggest_int(key, int(dim.values[0]), int(dim.values[1]) - 1)
        config = scaled_config(config_from_dict({**values, **self.overrides}, where=self.sweep.source), self.scale)
        config = with_hub_layers([PlannedTrial(config, [self.sweep.name])])[0].config
        # shown by optuna-dashboard beside the trial's values, to find its row, adapter and history
        trial.set_user_attr("trial_id", config_id(config))
        trial.set_user_attr("config", config.to_dict())
        return {"trial": {"config": config.to_dict(), "trial_id": config_id(config), "sweeps": [self.sweep.name],
                          **self.worker}}


def _optuna_setup(sweep: Sweep, scale: str, overrides: dict[str, Any], worker: dict[str, Any], experiment_dir: str):
    """OptunaSearch (TPE or NSGA-II, one or several objectives); its study lives in the experiment's optuna.db."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = (optuna.samplers.NSGAIISampler(seed=sweep.seed) if sweep.sampler == "nsga2"
               else optuna.samplers.TPESampler(seed=sweep.seed))
    storage = None
    if "://" not in experiment_dir:
        os.makedirs(experiment_dir, exist_ok=True)
        storage = optuna.storages.RDBStorage(f"sqlite:///{os.path.abspath(experiment_dir)}/optuna.db")
    metrics, modes = list(sweep.objectives), list(sweep.objectives.values())
    if storage is not None:  # the study OptunaSearch loads, with its objectives named (optuna-dashboard's axes)
        optuna.create_study(storage=storage, study_name=sweep.name, load_if_exists=True,
                            directions=["minimize" if m == "min" else "maximize" for m in modes]
                            ).set_metric_names(metrics)
    # Objectives always go as lists: OptunaSearch then ignores the per-step reports (which carry the step loss, not
    # the objectives) and tells Optuna the final values only.
    return OptunaSearch(space=OptunaSpace(sweep, scale, overrides, worker), metric=metrics, mode=modes,
                        sampler=sampler, storage=storage, study_name=sweep.name, seed=sweep.seed)


LOOPBACK = "127.0.0.1"


def _connect_ray(address: str | None, verbose: bool = False):
    """Join the cluster at `address`, or start Ray on this machine reachable from this machine only.

    On Linux, Ray gives a node the machine's network address and its servers (GCS, raylet, workers, agents, the
    dashboard's metrics exporter) listen on every interface. Ray's single-machine mode, the one it uses on macOS and
    Windows, gives the node 127.0.0.1 and binds every server there; a local sweep needs nothing more.
    """
    import logging

    import ray

    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if address:
        ray.init(address=address, **quiet)
    else:
        from ray._private import ray_constants

        variable = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
        before = os.environ.get(variable)
        os.environ[variable] = "0"  # for the processes Ray starts
        ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray was imported
        try:
            ray.init(_node_ip_address=LOOPBACK, include_dashboard=False, dashboard_host=LOOPBACK, **quiet)
        finally:  # the processes have started; the rest of this process is unchanged
            ray_constants.ENABLE_RAY_CLUSTER = True
            os.environ.pop(variable) if before is None else os.environ.update({variable: before})
    return ray.cluster_resources()


def _refuse_local_storage_on_cluster(storage: str) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and "://" not in storage:
        raise StorageError(
            f"--storage {storage} is a local path, but the Ray cluster has {len(nodes)} nodes: trials on other nodes "
            "could not write there. Use shared storage: s3://bucket/prefix, gs://bucket/prefix, or file:///path "
            "on an NFS mount that every node sees.")


def _keep_credentials_out_of_trial_runtime_envs() -> None:
    """Ray Tune copies AWS_* keys from the driver's environment into every trial's runtime_env, which Ray's
    runtime-env agent writes in plain text to its log on each node. Trials take credentials from their own node
    (instance profile, IRSA, the node's environment) instead."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = class_cache.ENV_VARS_TO_PROPAGATE - {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}


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
    """The experiment's name and directory; refuses to resume one that does not exist or to start over one that does
    (which would run its finished trials again)."""
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
    if not args.resume and exists:
        holder = live_holder(experiment_dir)
        if holder:
            raise in_use_error(experiment_dir, holder)
        raise ConfigError(f"--name {name}: experiment {experiment_dir} already exists; continue it with --resume, or "
                          "choose another --name")
    return name, experiment_dir


def run_search(args: argparse.Namespace) -> int:
    """Check everything, then run the sweep while holding the experiment's lock; returns the exit code."""
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
    resources = _connect_ray(address, args.verbose) if address else None
    cluster_gpus = resources.get("GPU", 0) if resources else local_gpu_count()
    scale = resolve_scale(args.scale, cluster_gpus)
    planned = check_sweep(sweep, scale, overrides)  # everything a trial can know before compute
    if args.dry_run:
        if planned is None:
            print(f"{sweep.name}: optuna ({sweep.sampler}) search, {sweep.num_samples} trials over "
                  f"{', '.join(sweep.dimensions)}; objectives {sweep.objectives}; scale {scale}")
        else:
            print(describe_plan(with_hub_layers(planned), args.json, scale))
        return 0
    name, experiment_dir = choose_experiment(args, sweep, scale)
    resources = resources or _connect_ray(None, args.verbose)
    what = "embedded tiny-lfm2 model and embedded data, shrunk for CPU" if scale == "tiny" else "real model and data"
    log(f"scale: {scale.upper()} ({what}); cluster: {resources.get('CPU', 0):.0f} CPUs, {cluster_gpus:g} GPUs")
    _refuse_local_storage_on_cluster(args.storage)
    check_writable(experiment_dir)
    argv = getattr(args, "argv", None) or sys.argv[1:]
    with ExperimentLock(experiment_dir, shlex.join(["python", "-m", "tune_lfm.search", *argv]), log=log), \
            Interrupts(log) as interrupts:
        try:
            total = run_sweep(args, sweep, scale, overrides, planned, experiment_dir, name, cluster_gpus, artifacts,
                              interrupts)
        except KeyboardInterrupt:
            interrupts.received = interrupts.received or signal.SIGINT
            total = len(planned) if planned is not None else sweep.num_samples
        record = ExperimentRecord(experiment_dir)
        if interrupts.received:
            log(f"interrupted: {len(record.finished_ids())} of {total} finished -> {record.trials_uri}")
            log(f"resume: {resume_command(argv, name)}")
            return interrupts.exit_code
    statuses = [row.get("status") for row in record.rows.values()]
    if record.rows:
        print(results_table(list(record.rows.values())), flush=True)
    log(f"finished: {statuses.count('completed')} completed, {statuses.count('diverged')} diverged, "
        f"{statuses.count('failed')} failed -> {record.trials_uri}")
    log(f"next: python -m tune_lfm.analysis {experiment_dir}")
    return 0


def run_sweep(args: argparse.Namespace, sweep: Sweep, scale: str, overrides: dict[str, Any],
              planned: list[PlannedTrial] | None, experiment_dir: str, name: str, cluster_gpus: float,
              artifacts: ArtifactSettings, interrupts: Interrupts) -> int:
    """Prepare shared inputs and run the trials not yet finished on Ray Tune; returns the number of planned trials."""
    from ray import tune

    storage_path = args.storage if "://" in args.storage else os.path.abspath(args.storage)
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else sweep.resources.get("gpus_per_trial", "auto")
    if gpus == "auto" and (scale == "tiny" or cluster_gpus == 0):
        gpus = 0.0
    cpus = sweep.resources.get("cpus_per_trial") or (1 if scale == "tiny" else 2)
    if cpus == "auto":
        cpus = 1
    worker = {"_threads": max(1, int(cpus)), "_keep_adapters": artifacts.keep_adapters,
              "_checkpoint_every": artifacts.checkpoint_every_steps}
    atlas_device = "cpu" if gpus == 0 else None
    finished = ExperimentRecord(experiment_dir).finished_ids() if args.resume else set()
    if args.resume:
        log(f"resuming {experiment_dir}: {len(finished)} finished trials are kept and not run again")
    if planned is None:
        # Step reports carry the running loss; the objectives arrive with the final report of each trial.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        from .config import config_from_dict

        # the sweep's fixed model; a model chosen per trial gets its atlas computed by its first trial
        heaviest = scaled_config(config_from_dict({**sweep.fixed, **overrides}, where=sweep.source), scale)
        prepare_atlases([heaviest], atlas_device)
        search_alg = _optuna_setup(sweep, scale, overrides, worker, experiment_dir)
        param_space, total = {}, sweep.num_samples
        num_samples = max(sweep.num_samples - len(finished), 0)
    else:
        planned = with_hub_layers(planned)
        sizes = adapter_sizes(planned)
        todo = longest_first([t for t in planned if t.trial_id not in finished])
        prepare_atlases([t.config for t in todo], atlas_device)
        prepare_shared_inputs([t.config for t in todo])
        heaviest = max(todo, default=planned[0], key=lambda t: (
            (t.config.micro_batch_size or t.config.batch_size) * t.config.max_length, sizes[t.trial_id])).config
        param_space, total, search_alg = _param_space_for_plan(todo, worker), len(planned), None
        num_samples = 1 if todo else 0
    if num_samples == 0:
        log("nothing left to run")
        return total
    if gpus == "auto":
        from .memory import MAX_TRIALS_PER_GPU

        gpus = measured_gpus_per_trial(heaviest, int(sweep.resources.get("max_trials_per_gpu") or MAX_TRIALS_PER_GPU))
    max_concurrent = args.max_concurrent or sweep.resources.get("max_concurrent")
    log(f"experiment: {experiment_dir}; per trial {cpus} CPU, {gpus:g} GPU; max concurrent "
        f"{max_concurrent or 'as resources allow'}")
    meta = {**scale_metadata(scale), "gpus_per_trial": gpus}
    scheduler = None
    if sweep.scheduler:
        from ray.tune.schedulers import ASHAScheduler

        s = sweep.scheduler
        scheduler = ASHAScheduler(metric=s["metric"], mode=s["mode"], time_attr="step", max_t=10**9,
                                  grace_period=s["grace_period"], reduction_factor=s["reduction_factor"])
    varied = varied_settings([t.config.to_dict() for t in planned]) if planned is not None else [
        key for key in sweep.dimensions if key != "variants"]
    callback = results_callback(experiment_dir, meta, total, varied,
                                stopping=lambda: interrupts.received is not None)
    trackers = tracker_callbacks(args.log, experiment_dir, name, sweep.name, log) if args.log else []
    run_config = tune.RunConfig(name=name, storage_path=storage_path, verbose=1 if args.verbose else 0,
                                callbacks=[callback, *trackers],
                                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
    if not args.verbose:  # Tune warns at every adapter checkpoint that snapshots came close together
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    _keep_credentials_out_of_trial_runtime_envs()
    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": cpus, "gpu": gpus}), param_space=param_space,
                       run_config=run_config,
                       tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
                                                   max_concurrent_trials=max_concurrent,
                                                   trial_dirname_creator=trial_dirname,
                                                   reuse_actors=True))
    tuner.fit()
    if not interrupts.received:  # the fronts of a finished sweep decide which adapters stay
        prune_adapters(experiment_dir, artifacts.keep_adapters, log)
    return total


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
