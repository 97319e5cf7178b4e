"""What a trial leaves on the experiment's storage: its LoRA adapter, and the state it needs to go on after a crash.

Both travel as Ray Tune checkpoints (`tune.report(..., checkpoint=...)`), so Ray copies them to the experiment's
storage (a directory, s3://, gs://, file://) and hands the latest back to a retried trial (`tune.get_checkpoint()`).

- The **adapter checkpoint** of a finished trial (completed or diverged) is a PEFT adapter directory
  (`adapter_model.safetensors` + `adapter_config.json`, loadable by `PeftModel.from_pretrained`) plus
  `tune_lfm_trial.json`: the trial's config, metrics, status, base model id and weights revision. Its URI and size
  are the trial's `adapter_uri` and `adapter_bytes` columns.
- A **resume checkpoint**, every `checkpoint_every_steps` optimizer steps, is a transformers Trainer checkpoint
  (adapter, optimizer, scheduler, RNG states, trainer state with the step reached, so the data order goes on where
  it stopped) plus the logged step history so far. A retried trial continues from it.

Sweep setting `artifacts: {keep_adapters: all | pareto | none, checkpoint_every_steps: N}` (or `--keep-adapters`,
`--checkpoint-every`): `pareto` deletes, after the sweep, the adapters of trials on none of the analysis's default
Pareto fronts; `none` saves no adapter. Ray keeps one checkpoint per trial, so a finished trial's adapter replaces
its resume checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import ConfigError
from .scratch import make_scratch_dir

KEEP_ADAPTERS = ("all", "pareto", "none")
TRIAL_FILE = "tune_lfm_trial.json"
"""Beside the adapter: what the adapter is (config, metrics, base model and revision, the sweep it came from)."""
HISTORY_FILE = "tune_lfm_history.json"
"""In a resume checkpoint: the step rows logged up to it, so the resumed trial's history and train_loss are whole."""
RESUME_KIND = "checkpoint"
"""The `kind` of the result that carries a resume checkpoint (beside `steps` and `final`)."""


@dataclass(frozen=True)
class ArtifactSettings:
    keep_adapters: str = "all"
    checkpoint_every_steps: int | None = None
    """Optimizer steps between resume checkpoints; None = none (a retried trial starts from step 0)."""


def parse_artifacts(spec: Any, where: str) -> ArtifactSettings:
    """The sweep's `artifacts:` mapping; errors name the file, the key and what is allowed."""
    if spec is None:
        return ArtifactSettings()
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a mapping {{keep_adapters: ..., checkpoint_every_steps: N}}")
    unknown = sorted(set(spec) - {"keep_adapters", "checkpoint_every_steps"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: keep_adapters, checkpoint_every_steps")
    return artifact_settings(spec.get("keep_adapters", "all"), spec.get("checkpoint_every_steps"), where)


def artifact_settings(keep: Any, every: Any, where: str) -> ArtifactSettings:
    if keep not in KEEP_ADAPTERS:
        raise ConfigError(f"{where}: keep_adapters is {keep!r}; allowed: {', '.join(KEEP_ADAPTERS)}")
    if every is not None and not (isinstance(every, int) and not isinstance(every, bool) and every > 0):
        raise ConfigError(f"{where}: checkpoint_every_steps must be a positive int (or absent), got {every!r}")
    return ArtifactSettings(keep, every)


@dataclass
class Resume:
    """How `run_trial` checkpoints for resumption, and where it starts: no Ray in here, the callbacks carry it."""

    every: int
    """Optimizer steps between checkpoints."""
    save: Callable[[str, int, list[dict[str, Any]]], None]
    """Receives each Trainer checkpoint directory, its step and the history so far."""
    start: str | None = None
    """A Trainer checkpoint directory to continue from; None = step 0."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """The step rows logged before `start`."""

    @property
    def step(self) -> int | None:
        """The step `start` was saved at; None when the trial starts from step 0."""
        return self.history[-1]["step"] if self.start and self.history else None


# ---------------------------------------------------------------- inside the trial (Ray worker)

def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def describe_adapter(directory: str, params: dict[str, Any], result: dict[str, Any]) -> int:
    """Write TRIAL_FILE beside the adapter saved in `directory`; return the directory's size in bytes."""
    from .atlas.store import weights_identity
    from .config import config_from_dict
    from .models import ModelNotFoundError, resolve_model

    config = config_from_dict(params["config"], where="trial config")
    try:
        revision = weights_identity(resolve_model(config.model))
    except ModelNotFoundError:
        revision = None
    card = {"trial_id": params["trial_id"], "sweeps": params["sweeps"], "status": result["status"],
            "error": result.get("error"), "base_model": config.model, "base_model_revision": revision,
            "config": config.to_dict(),
            "metrics": {k: v for k, v in result.items() if k not in config.to_dict() and k != "history"}}
    with open(os.path.join(directory, TRIAL_FILE), "w") as handle:
        json.dump(card, handle, indent=2, default=str)
    return directory_bytes(directory)


def report_resume_checkpoint(trainer_checkpoint: str, step: int, history: list[dict[str, Any]]) -> None:
    """Hand a Trainer checkpoint (with the history so far) to Ray, which copies it to the experiment's storage."""
    from ray import tune

    with open(os.path.join(trainer_checkpoint, HISTORY_FILE), "w") as handle:
        json.dump(history, handle)
    last_loss = history[-1]["loss"] if history else float("nan")
    tune.report({"kind": RESUME_KIND, "step": step, "loss": last_loss},
                checkpoint=tune.Checkpoint.from_directory(trainer_checkpoint))


def trial_resume(every: int | None, before_report: Callable[[], None]) -> Resume | None:
    """Checkpointing every `every` steps, from the retried trial's last resume checkpoint (copied to a local
    directory) if it has one; None when the sweep does not checkpoint trials. `before_report` runs before each
    checkpoint goes to Ray (the trial's held step rows go first)."""
    from ray import tune

    if not every:
        return None

    def save(trainer_checkpoint: str, step: int, history: list[dict[str, Any]]) -> None:
        before_report()
        report_resume_checkpoint(trainer_checkpoint, step, history)

    resume = Resume(every, save)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        local = checkpoint.to_directory(make_scratch_dir("tune_lfm_resume_"))
        if os.path.isfile(os.path.join(local, HISTORY_FILE)):
            with open(os.path.join(local, HISTORY_FILE)) as handle:
                resume.start, resume.history = local, json.load(handle)
            print(f"[tune_lfm] resuming from the checkpoint of step {resume.step}", flush=True)
        else:  # an adapter checkpoint: the trial had finished; it runs again from step 0
            shutil.rmtree(local, ignore_errors=True)
    return resume


# ---------------------------------------------------------------- in the driver

def adapter_uri(experiment_dir: str, trial, result: dict[str, Any]) -> str | None:
    """Where Ray persisted the checkpoint reported with `result`, as a path or URI under the experiment directory."""
    name = result.get("checkpoint_dir_name")
    if not name:
        return None
    base = experiment_dir if "://" in experiment_dir else os.path.abspath(experiment_dir)
    return f"{base.rstrip('/')}/{trial.storage.trial_dir_name}/{name}"


def resumed_step(trial) -> int | None:
    """The step of the resume checkpoint a (re)starting trial will continue from; None when it starts afresh."""
    latest = trial.run_metadata.checkpoint_manager.latest_checkpoint_result
    if latest is None or latest.metrics.get("kind") != RESUME_KIND:
        return None
    return int(latest.metrics["step"])


def adapters_to_keep(experiment_dir: str, keep: str) -> set[str]:
    """Trial ids whose adapter `keep` retains: all, those on any default Pareto front of the analysis, or none."""
    from .results import ExperimentRecord

    if keep == "all":
        return set(ExperimentRecord(experiment_dir).rows)
    if keep == "none":
        return set()
    from .analysis.pipeline import analyse  # only fronts need it: it loads matplotlib
    from .analysis.schema import AnalysisError

    try:
        return set(analyse([experiment_dir]).pareto["trial_id"])
    except AnalysisError:  # no completed trial: no front to keep
        return set()


def prune_adapters(experiment_dir: str, keep: str, log) -> None:
    """Delete every trial checkpoint but the adapters of the trials `keep` retains; clear the others' adapter_uri."""
    try:
        _prune(experiment_dir, keep, log)
    except OSError as err:  # the trials are recorded; only the clean-up is left undone
        log(f"warning: could not prune checkpoints under {experiment_dir}: {err}")


def _prune(experiment_dir: str, keep: str, log) -> None:
    import pyarrow.fs as pafs

    from .results import ExperimentRecord, filesystem

    record = ExperimentRecord(experiment_dir)
    kept = adapters_to_keep(experiment_dir, keep)
    keep_paths = {relative_adapter_path(row["adapter_uri"]) for tid, row in record.rows.items()
                  if tid in kept and isinstance(row.get("adapter_uri"), str)}
    fs, root = filesystem(experiment_dir)
    removed = 0
    for trial_dir in fs.get_file_info(pafs.FileSelector(root)):
        if trial_dir.type != pafs.FileType.Directory:
            continue
        for entry in fs.get_file_info(pafs.FileSelector(trial_dir.path)):
            is_checkpoint = entry.type == pafs.FileType.Directory and entry.base_name.startswith("checkpoint_")
            if is_checkpoint and relative_adapter_path(entry.path) not in keep_paths:
                fs.delete_dir(entry.path)
                removed += 1
    record.update_trials({trial_id: {"adapter_uri": None, "adapter_bytes": None}
                          for trial_id, row in record.rows.items()
                          if trial_id not in kept and isinstance(row.get("adapter_uri"), str)})
    log(f"keep_adapters={keep}: kept {len(keep_paths)} adapter(s), removed {removed} checkpoint(s)")


def relative_adapter_path(uri: str) -> str:
    """`<trial dir>/<checkpoint dir>`: where an adapter lies within its experiment, wherever the experiment is now
    (a local copy of a bucket, a moved directory)."""
    return "/".join(uri.rstrip("/").split("/")[-2:])
