"""How a sweep runs, as written under `search:`, `scheduler:` and `resources:` in its YAML: typed, with defaults and
help in one place.

Each block is a frozen dataclass; the string under a field is its documentation (`config.field_docs` reads it;
`settings_table` renders the README's table, and a test holds the README to it). `parse_settings` turns a YAML
mapping into one and names the file, the key and what is allowed for anything wrong. What a trial computes is
`config.TrialConfig`; these say only how trials are chosen, stopped and placed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config import expect

ALGORITHMS = ("grid", "random", "optuna")
SAMPLERS = ("tpe", "nsga2")
OBJECTIVE_METRICS = ("train_loss", "eval_loss", "kl", "kl_p95", "trainable_params", "wall_s", "peak_mem_gb")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class SearchSettings:
    """`search:` which trials run."""

    algorithm: str = "grid"
    """grid: every combination of the sweep's values; random: `num_samples` draws; optuna: samples as results come."""
    num_samples: int = 1
    """Trials drawn by random or optuna (a grid runs every combination once)."""
    sampler: str = "tpe"
    """Optuna's sampler: tpe, or nsga2 for a Pareto front of several objectives."""
    objectives: dict[str, str] = field(default_factory=dict)
    """Metric to min or max, what Optuna optimises; an optuna search without any minimises train_loss."""
    seed: int = 0
    """Seed of the random draws and of Optuna's sampler."""

    def check(self, where: str) -> SearchSettings:
        expect(self.algorithm in ALGORITHMS, f"{where}.algorithm", f"`{self.algorithm}` is not one of "
               f"{', '.join(ALGORITHMS)}")
        expect(_positive_int(self.num_samples), f"{where}.num_samples",
               f"must be a positive int, got {self.num_samples!r}")
        expect(self.sampler in SAMPLERS, f"{where}.sampler", f"`{self.sampler}` is not one of {', '.join(SAMPLERS)}")
        expect(isinstance(self.seed, int) and not isinstance(self.seed, bool), f"{where}.seed",
               f"must be an int, got {self.seed!r}")
        expect(isinstance(self.objectives, dict), f"{where}.objectives", "must map metric -> min | max")
        for metric, mode in self.objectives.items():
            expect(metric in OBJECTIVE_METRICS, f"{where}.objectives",
                   f"`{metric}` is not a reported metric; allowed: {', '.join(OBJECTIVE_METRICS)}")
            expect(mode in ("min", "max"), f"{where}.objectives.{metric}", f"must be min or max, got {mode!r}")
        if self.algorithm == "optuna" and not self.objectives:
            return dataclasses.replace(self, objectives={"train_loss": "min"})
        return self


@dataclass(frozen=True)
class SchedulerSettings:
    """`scheduler:` early stopping of trials that fall behind (Ray Tune's ASHA)."""

    type: str = "asha"
    """The scheduler; asha is the one supported."""
    metric: str = "loss"
    """What ranks running trials: loss (the step loss) or a reported metric."""
    mode: str = "min"
    """min or max of `metric`."""
    grace_period: int = 10
    """Steps every trial runs before it can be stopped."""
    reduction_factor: int = 3
    """At each rung only the best 1/reduction_factor of trials go on."""

    def check(self, where: str) -> SchedulerSettings:
        expect(self.type == "asha", f"{where}.type", f"`{self.type}` is not supported; use asha")
        expect(self.metric in ("loss",) + OBJECTIVE_METRICS, f"{where}.metric",
               "must be loss (the step loss) or a reported metric")
        expect(self.mode in ("min", "max"), f"{where}.mode", "must be min or max")
        expect(_positive_int(self.grace_period), f"{where}.grace_period", "must be a positive int")
        expect(_positive_int(self.reduction_factor) and self.reduction_factor > 1, f"{where}.reduction_factor",
               "must be an int > 1")
        return self


@dataclass(frozen=True)
class ResourceSettings:
    """`resources:` what each trial gets and how many run at once."""

    gpus_per_trial: float | str = "auto"
    """GPU fraction per trial; auto: as many trials per GPU as their measured memory allows (0 on CPU)."""
    cpus_per_trial: float | str | None = None
    """CPUs (and torch threads) per trial; default 1 at tiny scale, 2 at full."""
    max_concurrent: int | None = None
    """At most this many trials at once; default: as many as the resources allow."""
    max_trials_per_gpu: int | None = None
    """Cap on trials sharing one GPU under gpus_per_trial: auto (default `memory.MAX_TRIALS_PER_GPU`)."""

    def check(self, where: str) -> ResourceSettings:
        for key in ("gpus_per_trial", "cpus_per_trial"):
            value = getattr(self, key)
            expect(value is None or value == "auto" or _positive_number(value), f"{where}.{key}",
                   f"must be a positive number or auto, got {value!r}")
        for key in ("max_concurrent", "max_trials_per_gpu"):
            value = getattr(self, key)
            expect(value is None or _positive_int(value), f"{where}.{key}", f"must be a positive int, got {value!r}")
        return self

    def cpus(self, scale: str) -> float:
        if self.cpus_per_trial in (None, "auto"):
            return 1 if scale == "tiny" or self.cpus_per_trial == "auto" else 2
        return self.cpus_per_trial


BLOCKS = {"search": SearchSettings, "scheduler": SchedulerSettings, "resources": ResourceSettings}


def settings_table() -> str:
    """The markdown table of every key of every block, its default and its docstring (README.md holds it)."""
    from .config import field_docs

    lines = ["| key | default | meaning |", "|---|---|---|"]
    for block, cls in BLOCKS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = "unset" if default is None else f"`{default}`"
            lines.append(f"| `{block}.{f.name}` | {shown} | {docs[f.name]} |")
    return "\n".join(lines)


def parse_settings(cls: type, spec: Any, where: str):
    """`spec` (a YAML mapping, or None for the defaults) as a checked `cls`."""
    if spec is None:
        return cls()
    names = [f.name for f in dataclasses.fields(cls)]
    expect(isinstance(spec, dict), where, f"must be a mapping of {', '.join(names)}; got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(names))
    expect(not unknown, where, f"unknown key(s) {unknown}; allowed: {', '.join(names)}")
    return cls(**spec).check(where)
