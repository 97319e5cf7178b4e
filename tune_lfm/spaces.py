"""Sweep YAML -> a validated `Sweep`: the trials to run (grid, random) or the space to search (Optuna).

A sweep file (see `search_spaces/`):

    name: datasets                 # optional; defaults to the file name
    description: one line
    include: [datasets, rank]      # compose other sweeps: their trials, identical configs run once
    fixed: {optimizer: adamw, lora_rank: 8, ...}        # TrialConfig fields shared by every trial
    sweep:                                               # dimensions, each one of:
      dataset: {grid: [alpaca, gsm8k]}                   #   every value
      learning_rate: {loguniform: [1.0e-4, 1.0e-3]}      #   sampled (random / optuna)
      lora_rank: {choice: [2, 4, 8]} | {randint: [2, 33]} | {uniform: [0.0, 0.1]}
      variants: {grid: [{max_steps: 100, num_examples: 640}, ...]}  # partial configs, for non-product sweeps
    search: {algorithm: grid | random | optuna, num_samples: 20, sampler: tpe | nsga2,
             objectives: {train_loss: min, kl: min}, seed: 0}
    scheduler: {type: asha, metric: train_loss, mode: min, grace_period: 20}    # optional
    resources: {gpus_per_trial: auto, max_trials_per_gpu: 4, cpus_per_trial: 1, max_concurrent: 4}  # optional
    max_failures: 1
    user_datasets: {name: {path | hub_id, format, ...}}
    artifacts: {keep_adapters: all | pareto | none, checkpoint_every_steps: 50}   # optional

What `search`, `scheduler` and `resources` may hold, with defaults, is `tune_lfm.sweep_settings`.

Scales: `full` runs the file as written; `tiny` (no GPU) swaps in the embedded model and the study datasets'
embedded rows (user datasets keep their declared path or hub id) and shrinks steps, rows and lengths (see
`TinyScale`) so a sweep runs on a laptop CPU in minutes.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from .checkpoints import ArtifactSettings, parse_artifacts
from .config import EMBEDDED_MODEL, FIELD_NAMES, ConfigError, TrialConfig, config_from_dict, expect
from .sweep_settings import ResourceSettings, SchedulerSettings, SearchSettings, parse_settings

SPACES_DIR = Path(__file__).resolve().parent / "search_spaces"
"""The shipped sweeps: the top-level search_spaces/, linked into the package so a wheel install has them too."""
TOP_KEYS = ("name", "description", "include", "fixed", "sweep", "search", "scheduler", "resources", "max_failures",
            "user_datasets", "artifacts")
DIMENSION_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")

@dataclass(frozen=True)
class TinyScale:
    """How a sweep shrinks to CPU size while staying a miniature of itself.

    Every trial's steps and rows are divided by the same numbers, so the ratios between the trials of a sweep (the
    duration sweep's 100 vs 1000 steps) stay as the YAML says. The learning rate is multiplied by the factor the steps
    are divided by: with Adam a step moves each weight by about the learning rate, so steps x rate, how far an adapter
    can travel from zero, stays what the YAML asks for. One factor for every trial keeps the learning-rate sweep's
    1e-4 : 1e-3 ratio.
    """

    steps_divisor: int = 5
    min_steps: int = 4
    examples_divisor: int = 20
    min_examples: int = 16
    max_length: int = 512
    grad_accum: int = 1
    eval_examples: int = 20

    @property
    def lr_multiplier(self) -> float:
        return float(self.steps_divisor)

    def describe(self) -> str:
        return (f"embedded model and data; steps/{self.steps_divisor} (min {self.min_steps}), rows/"
                f"{self.examples_divisor} (min {self.min_examples}), learning rate x{self.lr_multiplier:g}, "
                f"max_length <= {self.max_length}, grad_accum {self.grad_accum}, {self.eval_examples} held-out rows")


TINY_SCALE = TinyScale()


def scale_metadata(scale: str) -> dict[str, Any]:
    """What a scale did to the YAML's settings, stored in every row of trials.parquet."""
    if scale == "tiny":
        return {"scale": scale, "scale_rule": TINY_SCALE.describe(), "lr_multiplier": TINY_SCALE.lr_multiplier}
    return {"scale": scale, "scale_rule": "settings as written", "lr_multiplier": 1.0}


@dataclass
class Dimension:
    kind: str
    values: list[Any]


@dataclass
class Sweep:
    name: str
    source: str
    description: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)
    dimensions: dict[str, Dimension] = field(default_factory=dict)
    search: SearchSettings = field(default_factory=SearchSettings)
    scheduler: SchedulerSettings | None = None
    """None: every trial runs all its steps."""
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    max_failures: int = 1
    artifacts: ArtifactSettings = field(default_factory=ArtifactSettings)
    """Which adapters to keep and how often trials save resume checkpoints (see `tune_lfm.checkpoints`)."""
    members: list[Sweep] = field(default_factory=list)
    """Included sweeps; a composed sweep's trials are theirs, deduplicated."""


@dataclass
class PlannedTrial:
    """One concrete trial: its config, a stable id derived from the config, and the sweeps it belongs to."""

    config: TrialConfig
    sweeps: list[str]

    @property
    def trial_id(self) -> str:
        return config_id(self.config)


def config_id(config: TrialConfig) -> str:
    """Identical configs get the same id in every sweep and run, so duplicates and resumes can be recognised."""
    blob = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def find_space(name_or_path: str) -> Path:
    """A sweep name in search_spaces/ or a path to the user's own YAML."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"sweep file {path} does not exist")
        return path
    candidate = SPACES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown sweep '{name_or_path}'; known: {', '.join(known)} (or pass a path to a YAML file)")
    return candidate


def _parse_dimension(key: str, spec: Any, where: str) -> Dimension:
    expect(key in FIELD_NAMES or key == "variants", where,
           f"sweep key `{key}` is not a trial setting; allowed: variants, {', '.join(FIELD_NAMES)}")
    expect(isinstance(spec, dict) and len(spec) == 1, f"{where}.{key}",
           f"must be a mapping with one of {', '.join(DIMENSION_KINDS)}, e.g. {{grid: [...]}}; got {spec!r}")
    kind, values = next(iter(spec.items()))
    expect(kind in DIMENSION_KINDS, f"{where}.{key}", f"unknown kind `{kind}`; allowed: {', '.join(DIMENSION_KINDS)}")
    expect(isinstance(values, list) and values, f"{where}.{key}.{kind}", f"must be a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        expect(len(values) == 2 and all(isinstance(v, (int, float)) for v in values) and values[0] < values[1],
               f"{where}.{key}.{kind}", f"must be [low, high] numbers with low < high, got {values!r}")
        if kind == "loguniform":
            expect(values[0] > 0, f"{where}.{key}.{kind}", "bounds must be > 0")
    if key == "variants":
        expect(kind in ("grid", "choice") and all(isinstance(v, dict) for v in values), f"{where}.variants",
               "must be {grid: [mapping, ...]} of partial trial settings")
    return Dimension(kind, values)


def load_sweep(name_or_path: str, _seen: tuple[str, ...] = ()) -> Sweep:
    """Read and validate a sweep file (and the sweeps it includes); errors name the file and key."""
    path = find_space(name_or_path)
    where = str(path)
    expect(str(path.resolve()) not in _seen, where, "includes itself (cycle)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    expect(isinstance(raw, dict), where, f"must be a mapping at the top level, got {type(raw).__name__}")
    unknown = set(raw) - set(TOP_KEYS)
    expect(not unknown, where, f"unknown top-level key(s) {sorted(unknown)}; allowed: {', '.join(TOP_KEYS)}")

    sweep = Sweep(name=raw.get("name", path.stem), source=where, description=raw.get("description", ""))
    fixed = raw.get("fixed") or {}
    expect(isinstance(fixed, dict), f"{where}: fixed", "must be a mapping of trial settings")
    if raw.get("user_datasets") is not None:
        fixed = {**fixed, "user_datasets": raw["user_datasets"]}
    config_from_dict(fixed, where=f"{where}: fixed")  # type-check the shared settings up front
    sweep.fixed = fixed
    dims = raw.get("sweep") or {}
    expect(isinstance(dims, dict), f"{where}: sweep", "must be a mapping of setting -> {grid|choice|...: values}")
    sweep.dimensions = {key: _parse_dimension(key, spec, f"{where}: sweep") for key, spec in dims.items()}
    sweep.search = parse_settings(SearchSettings, raw.get("search"), f"{where}: search")
    if raw.get("scheduler") is not None:
        sweep.scheduler = parse_settings(SchedulerSettings, raw["scheduler"], f"{where}: scheduler")
    sweep.resources = parse_settings(ResourceSettings, raw.get("resources"), f"{where}: resources")
    sweep.max_failures = raw.get("max_failures", 1)
    expect(isinstance(sweep.max_failures, int) and sweep.max_failures >= 0, f"{where}: max_failures",
           "must be an int >= 0")
    sweep.artifacts = parse_artifacts(raw.get("artifacts"), f"{where}: artifacts")
    includes = raw.get("include") or []
    expect(isinstance(includes, list), f"{where}: include", "must be a list of sweep names or paths")
    sweep.members = [load_sweep(name, _seen + (str(path.resolve()),)) for name in includes]
    sampled = [k for k, d in sweep.dimensions.items() if d.kind not in ("grid",)]
    if sweep.search.algorithm == "grid":
        expect(not sampled, f"{where}: sweep", f"{sampled} are sampled dimensions; use search.algorithm random or "
                                                "optuna, or make them grid")
    expect(not (sweep.members and sweep.search.algorithm == "optuna"), where, "an optuna search cannot include sweeps")
    return sweep


def scaled_config(config: TrialConfig, scale: str) -> TrialConfig:
    """A trial at a scale: `full` as written; `tiny` shrunk by `TINY_SCALE`, keeping the sweep's ratios."""
    if scale == "full":
        return config
    from .data.registry import DATASETS

    t = TINY_SCALE
    own_data = config.dataset in DATASETS and not (config.user_datasets or {}).get(config.dataset)
    changes = {"model": EMBEDDED_MODEL, "data_source": "embedded" if own_data else "hub", "grad_accum": t.grad_accum,
               "hub_layers": None, "eval_examples": min(config.eval_examples, t.eval_examples),
               "max_length": min(config.max_length, t.max_length),
               "max_steps": max(t.min_steps, round(config.max_steps / t.steps_divisor)),
               "learning_rate": config.learning_rate * t.lr_multiplier}
    if config.num_examples is not None:
        changes["num_examples"] = max(t.min_examples, round(config.num_examples / t.examples_divisor))
    return config.replace(**changes)


def _dimension_values(dim: Dimension, rng: random.Random) -> Any:
    if dim.kind in ("grid", "choice"):
        return rng.choice(dim.values)
    low, high = dim.values
    if dim.kind == "uniform":
        return rng.uniform(low, high)
    if dim.kind == "loguniform":
        import math

        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.randrange(int(low), int(high))


def _combine(fixed: dict[str, Any], assignment: dict[str, Any]) -> dict[str, Any]:
    values = dict(fixed)
    for key, value in assignment.items():
        values.update(value if key == "variants" else {key: value})
    return values


def _own_assignments(sweep: Sweep) -> list[dict[str, Any]]:
    if sweep.search.algorithm == "grid":
        keys = list(sweep.dimensions)
        return [dict(zip(keys, combo)) for combo in product(*(sweep.dimensions[k].values for k in keys))]
    rng = random.Random(sweep.search.seed)
    return [{k: _dimension_values(d, rng) for k, d in sweep.dimensions.items()}
            for _ in range(sweep.search.num_samples)]


def plan_trials(sweep: Sweep, scale: str, overrides: dict[str, Any] | None = None) -> list[PlannedTrial]:
    """Concrete trials of a grid/random sweep (composed sweeps: union, identical configs once, in first-seen order)."""
    expect(sweep.search.algorithm != "optuna", sweep.source,
           "an optuna search has no fixed trial list; it samples as it goes")
    planned: dict[str, PlannedTrial] = {}
    sources = sweep.members or [sweep]
    for member in sources:
        for i, assignment in enumerate(_own_assignments(member)):
            values = {**_combine({**sweep.fixed, **member.fixed}, assignment), **(overrides or {})}
            config = scaled_config(config_from_dict(values, where=f"{member.source}: trial {i}"), scale)
            key = config_id(config)
            if key in planned:
                if member.name not in planned[key].sweeps:  # a trial another of this sweep's trials already is
                    planned[key].sweeps.append(member.name)
            else:
                planned[key] = PlannedTrial(config, [member.name])
    return list(planned.values())
