"""The one module that knows Ray: it runs a `planning.Plan` as a Ray Tune experiment.

Each trial runs `tune_lfm.trial.run_trial` in a Ray worker (`trainable`), streams its step losses through
`tune.report` and reports its adapter as a checkpoint; a driver-side callback writes `trials.parquet` and
`history.parquet` after every trial (`results.ExperimentRecord`). Grid and random plans go to Tune as one grid of
concrete trials, longest first; Optuna samples as it goes (`OptunaSpace`). Ray is started on 127.0.0.1 for a local
run, or joined at the address given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .checkpoints import ArtifactSettings, prune_adapters
from .console import LiveTable, log, trial_line, varied_settings
from .determinism import start_trial
from .faults import fire, fire_after_step, injected_fault
from .interrupts import Interrupts
from .planning import Plan, heaviest, longest_first, with_hub_layers
from .results import ExperimentRecord, StorageError
from .scratch import scratch_dir
from .spaces import PlannedTrial, Sweep, config_id, scale_metadata, scaled_config
from .teardown import skip_collection_at_exit
from .trackers import tracker_callbacks


@dataclass
class Launch:
    """Where and how a plan runs: what the command line adds to the sweep file."""

    experiment_dir: str
    name: str
    storage: str
    cluster_gpus: float
    artifacts: ArtifactSettings
    resume: bool = False
    gpus_per_trial: float | None = None
    """None: the sweep's `resources.gpus_per_trial`."""
    max_concurrent: int | None = None
    """None: the sweep's `resources.max_concurrent`."""
    trackers: list[str] = field(default_factory=list)
    verbose: bool = False


# ---------------------------------------------------------------- before the trials: shared inputs, GPU share

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
    """Give cached CUDA blocks back, so the trials that share this GPU next can use them (if the driver used it)."""
    import gc

    import torch

    if torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def measured_gpus_per_trial(config, cap: int) -> float:
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
        measured = ray.get(probe.remote(config))
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


STEP_REPORT_EVERY_S = 1.0
"""How often a trial sends its step rows to the driver. Tune's function API pauses the training thread at every
report until the driver has handled the result: 6.5 ms a step for a lone tiny trial on an idle CPU, more when the
driver is busy with other trials' results, and a larger share of a GPU's far shorter steps. Rows travel a second's
worth at a time; a sweep with a scheduler reports every step, since the scheduler stops trials on them."""


class StepBatches:
    """The trial's step rows, sent to the driver as one `steps` result each `every_s` seconds (each row in it as
    logged; the last row's keys also at the top, where Tune and its scheduler read `step` and `loss`)."""

    def __init__(self, every_s: float):
        self.every_s, self.rows, self.sent = every_s, [], time.monotonic()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if time.monotonic() - self.sent >= self.every_s:
            self.send()

    def send(self) -> None:
        """Send what is held now: before a checkpoint or the final result, so the driver has every earlier step."""
        from ray import tune

        rows, self.rows = self.rows, []  # Tune may end the thread inside report (a stopped trial): never twice
        if rows:
            tune.report({"kind": "steps", **rows[-1], "steps": rows})
        self.sent = time.monotonic()


def trainable(params: dict[str, Any]) -> None:
    """Ray Tune function trainable: one trial, step metrics while it trains (`StepBatches`), then the full result."""
    skip_collection_at_exit()  # this worker process exits without collecting the stack it imported
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

    steps = StepBatches(float(params.get("_step_report_every_s", STEP_REPORT_EVERY_S)))

    def report_step(step: dict[str, Any]) -> None:
        steps.add(step)
        if fault:
            fire_after_step(fault, attempt)

    keep_adapter = params.get("_keep_adapters", "all") != "none"
    resume = trial_resume(params.get("_checkpoint_every"), before_report=steps.send)
    with scratch_dir("tune_lfm_adapter_") as adapter_dir:
        try:
            result = run_trial(config, reporter=report_step, log=lambda line: print(line, flush=True),
                               gpu_share=ray.get_runtime_context().get_assigned_resources().get("GPU"),
                               save_adapter=adapter_dir if keep_adapter else None, resume=resume)
        except Exception:  # the steps of a trial that raised are kept too (not when Tune stops it: SystemExit)
            steps.send()
            raise
        finally:  # the actor runs the next trial (reuse_actors)
            _release_gpu_memory()
            if resume and resume.start:
                shutil.rmtree(resume.start, ignore_errors=True)
        steps.send()  # the last rows go before the final result
        result.pop("history")
        final = {"kind": "final", **{k: _scalar(v) for k, v in result.items()}, "loss": result["train_loss"],
                 "started_at": started, "finished_at": datetime.now(timezone.utc).isoformat(), **_hardware()}
        if resume:
            final["resumed_from_step"] = resume.step
        if keep_adapter:
            final["adapter_bytes"] = describe_adapter(adapter_dir, params, result)
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(adapter_dir) if keep_adapter else None)


# ---------------------------------------------------------------- recording results in the driver

def results_callback(experiment_dir: str, meta: dict[str, Any], total: int, varied: list[str], live: LiveTable,
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
            self.live = live

        def on_trial_start(self, iteration, trials, trial, **info):
            params = trial_params(trial.config)
            trial_id, step = params["trial_id"], resumed_step(trial)
            if step is not None:
                log(f"{trial_id} resuming from the checkpoint of step {step}")
            self.record.drop_history(trial_id, after=step)
            self.live.start(trial_id, params["config"], "resuming" if step is not None else "starting")

        def on_trial_recover(self, iteration, trials, trial, **info):
            """Tune will run the trial again: its next actor gets the next attempt number in its config, and the
            failed attempt's steps are dropped."""
            params = trial_params(trial.config)
            log(f"{params['trial_id']} attempt {attempt_number(params)} failed, retrying: "
                f"{_error_message(trial)[:300]}")
            self.live.start(params["trial_id"], params["config"], "retrying")
            trial.set_config({**trial.config, "trial": {**params, "attempt": attempt_number(params) + 1}})
            self.record.drop_history(params["trial_id"], after=resumed_step(trial))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            params = trial_params(trial.config)
            if result.get("kind") == "steps":
                for row in result["steps"]:
                    self.record.add_step(params["trial_id"], row)
                self.live.step(params["trial_id"], params["config"], result["steps"][-1])
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
            self.live.finish(trial_id)
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


def _optuna_setup(plan: Plan, worker: dict[str, Any], experiment_dir: str):
    """OptunaSearch (TPE or NSGA-II, one or several objectives); its study lives in the experiment's optuna.db."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sweep, search = plan.sweep, plan.sweep.search
    sampler = (optuna.samplers.NSGAIISampler(seed=search.seed) if search.sampler == "nsga2"
               else optuna.samplers.TPESampler(seed=search.seed))
    storage = None
    if "://" not in experiment_dir:
        os.makedirs(experiment_dir, exist_ok=True)
        storage = optuna.storages.RDBStorage(f"sqlite:///{os.path.abspath(experiment_dir)}/optuna.db")
    metrics, modes = list(search.objectives), list(search.objectives.values())
    if storage is not None:  # the study OptunaSearch loads, with its objectives named (optuna-dashboard's axes)
        optuna.create_study(storage=storage, study_name=sweep.name, load_if_exists=True,
                            directions=["minimize" if m == "min" else "maximize" for m in modes]
                            ).set_metric_names(metrics)
    # Objectives always go as lists: OptunaSearch then ignores the per-step reports (which carry the step loss, not
    # the objectives) and tells Optuna the final values only.
    return OptunaSearch(space=OptunaSpace(sweep, plan.scale, plan.overrides, worker), metric=metrics, mode=modes,
                        sampler=sampler, storage=storage, study_name=sweep.name, seed=search.seed)


LOOPBACK = "127.0.0.1"


def connect_ray(address: str | None, verbose: bool = False):
    """Join the cluster at `address`, or start Ray on this machine reachable from this machine only.

    On Linux, Ray gives a node the machine's network address and its servers (GCS, raylet, workers, agents, the
    dashboard's metrics exporter) listen on every interface. Ray's single-machine mode, the one it uses on macOS and
    Windows, gives the node 127.0.0.1 and binds every server there; a local sweep needs nothing more.
    """
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
            # Ray would start an idle worker per CPU for the first driver; trial actors start their own workers and
            # never take those, which only cost a CPU-second at every start.
            # Ray's notice that it turned token authentication on, which is as it should be
            with contextlib.nullcontext() if verbose else _errors_only(AUTH_LOGGER):
                ray.init(_node_ip_address=LOOPBACK, include_dashboard=False, dashboard_host=LOOPBACK,
                         _system_config={"prestart_worker_first_driver": False}, **quiet)
        finally:  # the processes have started; the rest of this process is unchanged
            ray_constants.ENABLE_RAY_CLUSTER = True
            os.environ.pop(variable) if before is None else os.environ.update({variable: before})
    return ray.cluster_resources()


AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
"""Ray's logger that announces, at every local start, the token authentication it enables by default."""


@contextlib.contextmanager
def _errors_only(name: str):
    """Logger `name` passes errors only inside the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def refuse_local_storage_on_cluster(storage: str) -> None:
    """On a joined cluster of several nodes, storage must be shared (a Ray started here is a single node)."""
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


def _skip_callback_usage_tag() -> None:
    """Ray Tune's usage telemetry names the callbacks of every run, and to recognise them imports its MLflow, W&B
    and Comet integrations, which import mlflow wherever it is installed: about a CPU-second in every driver, for
    one tag. That tag is left out; Ray's other usage records are untouched."""
    from ray.air._internal import usage

    usage.tag_callbacks = lambda callbacks: False


def run_plan(plan: Plan, launch: Launch, interrupts: Interrupts) -> None:
    """Run the plan's trials not yet finished on Ray Tune (already connected), then prune adapters as asked."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    cpus = plan.sweep.resources.cpus(plan.scale)
    gpus = launch.gpus_per_trial if launch.gpus_per_trial is not None else plan.sweep.resources.gpus_per_trial
    if gpus == "auto" and (plan.scale == "tiny" or launch.cluster_gpus == 0):
        gpus = 0.0
    worker = {"_threads": max(1, int(cpus)), "_keep_adapters": launch.artifacts.keep_adapters,
              "_checkpoint_every": launch.artifacts.checkpoint_every_steps,
              "_step_report_every_s": 0.0 if plan.sweep.scheduler is not None else STEP_REPORT_EVERY_S}
    finished = ExperimentRecord(launch.experiment_dir).finished_ids() if launch.resume else set()
    if launch.resume:
        log(f"resuming {launch.experiment_dir}: {len(finished)} finished trials are kept and not run again")
    search = _tune_search(plan, launch, worker, finished, atlas_device="cpu" if gpus == 0 else None)
    if search is None:
        log("nothing left to run")
        return
    param_space, search_alg, num_samples, heaviest_config = search
    if gpus == "auto":
        from .memory import MAX_TRIALS_PER_GPU

        gpus = measured_gpus_per_trial(heaviest_config, plan.sweep.resources.max_trials_per_gpu or MAX_TRIALS_PER_GPU)
    max_concurrent = launch.max_concurrent or plan.sweep.resources.max_concurrent
    log(f"experiment: {launch.experiment_dir}; per trial {cpus} CPU, {gpus:g} GPU; max concurrent "
        f"{max_concurrent or 'as resources allow'}")
    varied = (varied_settings([t.config.to_dict() for t in plan.trials]) if plan.trials is not None
              else [key for key in plan.sweep.dimensions if key != "variants"])
    live = LiveTable(varied)
    callback = results_callback(launch.experiment_dir, {**scale_metadata(plan.scale), "gpus_per_trial": gpus},
                                plan.total, varied, live, stopping=lambda: interrupts.received is not None)
    trackers = tracker_callbacks(launch.trackers, launch.experiment_dir, launch.name, plan.sweep.name, log)
    storage_path = launch.storage if "://" in launch.storage else os.path.abspath(launch.storage)
    # Of Tune's own loggers only result.json (its record of each trial's reports): trials.parquet and history.parquet
    # hold what progress.csv would, and TensorBoard files come with --log tensorboard (Tune's automatic logger would
    # write them unasked and warn at every step batch, which it cannot draw).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    run_config = tune.RunConfig(name=launch.name, storage_path=storage_path, verbose=1 if launch.verbose else 0,
                                callbacks=[callback, JsonLoggerCallback(), *trackers],
                                failure_config=tune.FailureConfig(max_failures=plan.sweep.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
    _keep_credentials_out_of_trial_runtime_envs()
    _skip_callback_usage_tag()
    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": cpus, "gpu": gpus}), param_space=param_space,
                       run_config=run_config,
                       tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=_scheduler(plan.sweep),
                                                   num_samples=num_samples, max_concurrent_trials=max_concurrent,
                                                   trial_dirname_creator=trial_dirname, reuse_actors=True))
    with live:
        tuner.fit()
    if not interrupts.received:  # the fronts of a finished sweep decide which adapters stay
        prune_adapters(launch.experiment_dir, launch.artifacts.keep_adapters, log)


def _tune_search(plan: Plan, launch: Launch, worker: dict[str, Any], finished: set[str], atlas_device: str | None):
    """What Tune gets for the trials still to run: (param_space, search_alg, num_samples, heaviest config), with
    the atlases and data they share prepared; None when every trial has finished."""
    if plan.trials is None:
        from .config import config_from_dict

        num_samples = max(plan.sweep.search.num_samples - len(finished), 0)
        if num_samples == 0:
            return None
        # Step reports carry the running loss; the objectives arrive with the final report of each trial.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        # the sweep's fixed model; a model chosen per trial gets its atlas computed by its first trial
        fixed = scaled_config(config_from_dict({**plan.sweep.fixed, **plan.overrides}, where=plan.sweep.source),
                              plan.scale)
        prepare_atlases([fixed], atlas_device)
        return {}, _optuna_setup(plan, worker, launch.experiment_dir), num_samples, fixed
    todo = longest_first([t for t in plan.trials if t.trial_id not in finished])
    if not todo:
        return None
    prepare_atlases([t.config for t in todo], atlas_device)
    prepare_shared_inputs([t.config for t in todo])
    return _param_space_for_plan(todo, worker), None, 1, heaviest(todo)


def _scheduler(sweep: Sweep):
    if sweep.scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = sweep.scheduler
    return ASHAScheduler(metric=s.metric, mode=s.mode, time_attr="step", max_t=10**9, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)
