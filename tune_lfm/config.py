"""The trial configuration: the single definition of what one trial is.

Every sweep dimension, YAML key and CLI flag maps one-to-one onto a field of `TrialConfig`. A trial is a pure function
of this object, so a row of trials.parquet (its flattened config) is enough to run the trial again.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_MODEL = "LiquidAI/LFM2.5-230M"
EMBEDDED_MODEL = "tiny-lfm2"


class ConfigError(ValueError):
    """A configuration value is wrong; the message names where, which key and what is allowed."""


def expect(condition: bool, where: str, message: str) -> None:
    """Raise ConfigError("<where>: <message>") unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{where}: {message}")


@dataclass
class TrialConfig:
    """One LoRA SFT trial. Defaults follow the published study (batch 4 x accumulation 4, max_length 1024, r=8)."""

    # Model and data
    model: str = DEFAULT_MODEL
    """Hub id, local directory, or `tiny-lfm2` (the embedded model)."""
    dataset: str = "smol-magpie-ultra"
    """A registered dataset name (see `tune_lfm.data.registry`) or one declared under `user_datasets`."""
    data_source: str = "auto"
    """`embedded` (rows shipped in the package), `hub` (stream from the hub or the dataset's local path), or `auto`:
    embedded for the embedded model, hub otherwise. The resolved source is reported in the result."""
    num_examples: int | None = 2000
    """Training rows taken from the dataset (the study's "~2K examples"); None = one pass worth of rows,
    max_steps x effective batch."""
    eval_examples: int = 64
    """Held-out rows of the same dataset for eval_loss and base_loss."""
    user_datasets: dict[str, Any] | None = None
    """Datasets declared in YAML: {name: {hub_id | path, format, config?, split?, revision?}}."""

    # Optimisation
    optimizer: str = "adamw"
    """adamw | adafactor | schedule_free_adamw | lion (hyperparameters documented in `tune_lfm.optim`)."""
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    """transformers scheduler name; schedule_free_adamw always runs constant (it has its own averaging)."""
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_steps: int = 300
    """Optimizer steps."""
    batch_size: int = 4
    """Sequences per micro-batch per device."""
    grad_accum: int = 4
    """Micro-batches per optimizer step; effective batch = batch_size x grad_accum."""
    max_length: int = 1024
    """Tokens per training and held-out example; longer conversations are truncated at the end. The probe set is
    measured whole whatever this is (`data.probe.PROBE_MAX_LENGTH`)."""
    seed: int = 42

    # LoRA
    lora_rank: int = 8
    lora_alpha: int | None = None
    """LoRA scaling numerator; None = 2 x rank, so alpha/rank stays 2 across a rank sweep."""
    lora_dropout: float = 0.0
    lora_targets: str | dict[str, Any] | list[Any] = "hub_all"
    """A named target set (see `tune_lfm.targets.TARGET_PRESETS`) or a spec {modules, layers, layer_types}."""
    hub_layers: list[int] | None = None
    """Decoder-layer indices of the model's hub layers; None = the model's known hubs or its cached atlas."""

    # Execution
    packing: bool = True
    """Padding-free packing: each micro-batch's conversations share one row, none padded, none seeing another (see
    `tune_lfm.packing`). A model that fails the leak check trains unpacked; `packing_used` in the result says which."""
    micro_batch_size: int | None = None
    """Conversations per forward pass, a divisor of the effective batch; speed and memory only, the optimizer steps
    are the same. None = the largest that fits the trial's GPU share, measured (see `tune_lfm.memory`); batch_size
    on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass; switched on by itself when no micro-batch fits without it."""
    torch_compile: bool = False
    """torch.compile the model: the same run, compiled once per shape family (the first new row length recompiles,
    then shapes go dynamic). 9% faster on CPU for tiny-lfm2 (benchmarks/RESULTS.md); not yet measured on a GPU."""
    precision: str = "auto"
    """auto (bf16 where the GPU supports it, else fp32) | bf16 | fp32."""
    kl_batch_size: int = 8
    """Probe conversations per forward pass when measuring KL."""
    logging_steps: int = 1
    """Steps between logged losses (history.parquet rows)."""

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def resolved_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    @property
    def uses_embedded_data(self) -> bool:
        if self.data_source == "auto":
            return self.model == EMBEDDED_MODEL
        return self.data_source == "embedded"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrialConfig:
        return config_from_dict({**self.to_dict(), **changes}, where="overrides")

    def targets_label(self) -> str:
        """The target set as one string: its preset name, or the spec as compact JSON."""
        if isinstance(self.lora_targets, str):
            return self.lora_targets
        return json.dumps(self.lora_targets, sort_keys=True, separators=(",", ":"))


FIELD_TYPES = typing.get_type_hints(TrialConfig)
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrialConfig))
CHOICES = {
    "data_source": ("auto", "embedded", "hub"),
    "optimizer": ("adamw", "adafactor", "schedule_free_adamw", "lion"),
    "precision": ("auto", "bf16", "fp32"),
}
POSITIVE = ("num_examples", "eval_examples", "max_steps", "batch_size", "grad_accum", "max_length", "lora_rank",
            "kl_batch_size", "logging_steps", "learning_rate", "micro_batch_size", "lora_alpha")
NON_NEGATIVE = ("warmup_steps", "weight_decay", "seed")
"""Every float field must also be finite; `lora_dropout` is a probability in [0, 1); hub layer indices are >= 0."""


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotated type, accepting ints for floats and YAML's 1e-4-as-string quirk."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option, where)
            except ConfigError:
                continue
        allowed = " or ".join(type_name(o) for o in options)
        raise ConfigError(f"{where}: `{key}` must be {allowed}, got {value!r} ({type(value).__name__})")
    if origin in (list, dict):
        if not isinstance(value, origin):
            raise ConfigError(f"{where}: `{key}` must be a {origin.__name__}, got {value!r}")
        if origin is list:
            (item_tp,) = typing.get_args(tp) or (Any,)
            return [_coerce(key, item, item_tp, where) for item in value]
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: `{key}` must be {type_name(tp)}, got {value!r} ({type(value).__name__})")


def _check_ranges(checked: dict[str, Any], where: str) -> None:
    """The numeric ranges a trial can run with (types are already checked)."""
    for key, value in checked.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: `{key}` must be a finite number, got {value!r}")
    for key in POSITIVE:
        if checked.get(key) is not None and checked[key] <= 0:
            raise ConfigError(f"{where}: `{key}` must be > 0, got {checked[key]!r}")
    for key in NON_NEGATIVE:
        if checked.get(key) is not None and checked[key] < 0:
            raise ConfigError(f"{where}: `{key}` must be >= 0, got {checked[key]!r}")
    if not 0 <= checked.get("lora_dropout", 0.0) < 1:
        raise ConfigError(f"{where}: `lora_dropout` is a probability in [0, 1), got {checked['lora_dropout']!r}")
    if any(index < 0 for index in checked.get("hub_layers") or []):
        raise ConfigError(f"{where}: `hub_layers` are decoder-layer indices (>= 0), got {checked['hub_layers']!r}")


def config_from_dict(values: dict[str, Any], where: str = "config") -> TrialConfig:
    """Validate a mapping of field -> value into a TrialConfig; errors name `where`, the key and what is allowed."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of trial settings, got {type(values).__name__}")
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(FIELD_NAMES)}")
    checked = {key: _coerce(key, value, FIELD_TYPES[key], where) for key, value in values.items()}
    for key, allowed in CHOICES.items():
        if key in checked and checked[key] not in allowed:
            raise ConfigError(f"{where}: `{key}` is {checked[key]!r}; allowed: {', '.join(allowed)}")
    _check_ranges(checked, where)
    config = TrialConfig(**checked)
    if config.micro_batch_size is not None and config.effective_batch % config.micro_batch_size:
        raise ConfigError(f"{where}: `micro_batch_size` {config.micro_batch_size} must divide the effective batch "
                          f"batch_size x grad_accum = {config.effective_batch}")
    return config


def load_config_file(path: str | Path) -> TrialConfig:
    """Read a flat YAML mapping of trial settings (e.g. an analysis preset) with safe loading."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return config_from_dict(values or {}, where=str(path))



def field_docs(cls: type | None = None) -> dict[str, str]:
    """Each field's docstring (the string under it in the class body) of a settings dataclass, TrialConfig by
    default: the help of its CLI flag and its line in the docs."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls or TrialConfig))).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def parse_value(text: str, where: str) -> Any:
    """A setting's value as written on a command line: a YAML scalar or flow collection (1e-4, true, [2, 4])."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: the value is not valid YAML ({problem}); quote a string, or write a list as "
                          "[a, b]") from None


def parse_set_pairs(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs, each value parsed by `parse_value`."""
    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected key=value")
        values[key.strip()] = parse_value(text, f"--set {pair!r}")
    return values
