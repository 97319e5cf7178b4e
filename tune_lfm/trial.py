"""One trial: a TRL SFTTrainer run of a PEFT LoRA adapter, measured the same way every time. No Ray in here.

The recipe reads top to bottom: load model and tokenizer, prepare the dataset subset and the probe set, attach LoRA to
the resolved target modules, train with the chosen optimizer, then measure held-out loss with the adapter on and off,
KL from the base model on the probe set, and speed. `run_trial(config)` returns one flat result dict;
`python -m tune_lfm.trial ...` prints it as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .config import (FIELD_NAMES, FIELD_TYPES, ConfigError, TrialConfig, config_from_dict, field_docs,
                     load_config_file, parse_set_pairs, parse_value, type_name)
from .progress import StepProgress
from .scratch import scratch_dir
from .spaces import scale_metadata, scaled_config
from .targets import ResolvedTargets, parse_layers_arg, parse_targets_arg
from .teardown import skip_collection_at_exit
from .validate import check_output_dir, check_trial

if TYPE_CHECKING:
    from .checkpoints import Resume
    from .memory import MicroBatchPlan

Reporter = Callable[[dict[str, Any]], None]
"""Receives one dict per logged step: step, loss, learning_rate, grad_norm, tokens_seen, tokens_per_s, elapsed_s."""

PREPARED_VERSION = 2
"""Bump when tokenization or row selection changes what a cached prepared subset holds."""

TRAIN_LOSS_TAIL = 0.10
"""train_loss is the mean logged loss over the last 10% of steps (at least one), smoothing step-to-step noise."""


@dataclass
class PreparedData:
    """A trial's tokenized inputs; identical configs share one (see `prepare_data`)."""

    train: list[dict]
    eval: list[dict]
    probe: list[dict]
    rows_skipped: int
    rows_dropped: int
    source: str


def select_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_bf16(config: TrialConfig, device) -> bool:
    import torch

    if config.precision == "fp32":
        return False
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if config.precision == "bf16" and not supported:
        raise ConfigError(f"precision: bf16 was asked for but {device} does not support it; use auto or fp32")
    return supported


def prepare_data(config: TrialConfig, tokenizer) -> PreparedData:
    """Dataset subset -> chat messages -> tokens with assistant-only labels, plus the fixed probe set.

    The result is cached on disk (`$TUNE_LFM_CACHE/prepared`, keyed by everything that decides its content), so the
    trials of a sweep that share a dataset subset and tokenizer prepare it once.
    """
    from .cache import cache_folder, key_digest, write_atomically
    from .data.loading import load_dataset_split
    from .data.probe import PROBE_MAX_LENGTH, load_probe, probe_fingerprint
    from .data.registry import resolve_dataset
    from .data.tokens import tokenize_conversations

    spec = resolve_dataset(config.dataset, config.user_datasets)
    num_train = config.num_examples or config.max_steps * config.effective_batch
    key = {"spec": dataclasses.asdict(spec), "num_train": num_train, "num_eval": config.eval_examples,
           "seed": config.seed, "max_length": config.max_length, "embedded": config.uses_embedded_data,
           "tokenizer": tokenizer.name_or_path, "vocab": len(tokenizer), "template": tokenizer.chat_template,
           "probe": probe_fingerprint(), "rows": _source_fingerprint(spec, config.uses_embedded_data),
           "version": PREPARED_VERSION}
    cache_file = cache_folder("prepared") / f"{config.dataset}-{key_digest(key)}.json"
    if cache_file.is_file():
        return PreparedData(**json.loads(cache_file.read_text()))

    loaded = load_dataset_split(spec, num_train, config.eval_examples, embedded=config.uses_embedded_data,
                                seed=config.seed)
    if not loaded.train:
        raise ValueError(f"dataset '{config.dataset}' gave no valid training rows ({loaded.rows_skipped} malformed)")
    train = tokenize_conversations(tokenizer, loaded.train, config.max_length)
    held_out = tokenize_conversations(tokenizer, loaded.eval, config.max_length)
    probe = tokenize_conversations(tokenizer, load_probe(), PROBE_MAX_LENGTH)
    data = PreparedData(train.examples, held_out.examples, probe.examples, loaded.rows_skipped,
                        train.dropped + held_out.dropped, loaded.source)
    # vars, not asdict, which deep-copies every token list first
    write_atomically(cache_file, lambda file: file.write_text(json.dumps(vars(data))))
    return data


def _source_fingerprint(spec, embedded: bool) -> str | None:
    """Content identity of local row files (embedded or user path), so editing them invalidates the cache."""
    from .data.loading import EMBEDDED_DIR

    path = EMBEDDED_DIR / spec.embedded if embedded and spec.embedded else (Path(spec.path) if spec.path else None)
    if path is None or not path.is_file():
        return None
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def attach_lora(model, config: TrialConfig) -> tuple[Any, ResolvedTargets]:
    from peft import LoraConfig, get_peft_model

    from .atlas import resolve_hub_layers
    from .layers import layout_of
    from .targets import needs_hub_layers, parse_spec, resolve_targets

    specs = parse_spec(config.lora_targets)
    hubs = resolve_hub_layers(config.model, config.hub_layers) if needs_hub_layers(specs) else config.hub_layers
    resolved = resolve_targets(layout_of(model), specs, hubs)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.resolved_lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(resolved.module_names), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), resolved


def probe_and_hub_measures(model, tokenizer, probe: list[dict], config: TrialConfig, device,
                           log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """KL and losses on the probe set (`metrics.probe_measures`), and the hub scores with the adapter enabled against
    the model's atlas, which the driver computed before the sweep (a missing one is computed here once from this
    model with its adapter disabled, and cached for the next trials).

    When the trial's probe tokens and batch size are the atlas's (kl_batch_size is the atlas's: the probe is
    tokenized alike for both), the probe measures come from passes the atlas and the hub check run anyway, for
    the same numbers: the adapter-on pass is the hub check's pass with nothing skipped, and the adapter-off pass is
    the atlas's, whose hidden states it keeps (`Atlas.base_hidden`)."""
    from . import metrics
    from .atlas import compare, ensure_atlas, tuned_scores
    from .atlas.scores import tokens_digest

    atlas = ensure_atlas(config.model, model=model, tokenizer=tokenizer, log=log)
    if tokens_digest(probe) != atlas.probe_tokens or config.kl_batch_size != atlas.batch_size:
        probe_result = metrics.probe_measures(model, probe, config.kl_batch_size, tokenizer.pad_token_id, device)
        return probe_result, compare(atlas, tuned_scores(model, atlas, tokenizer, log))
    sums = metrics.ConversationSums(with_kl=True)
    base_hidden = atlas.base_hidden if atlas.base_hidden is not None and \
        len(atlas.base_hidden) == atlas.scored_tokens else None
    taken = 0

    def on_full_pass(batch, hidden, targets):
        nonlocal taken
        base = None if base_hidden is None else base_hidden[taken : taken + len(targets)].to(hidden.device)
        taken += len(targets)
        return sums.add(model, batch, device, tuned_hidden=hidden, base_hidden=base)

    tuned = tuned_scores(model, atlas, tokenizer, log, on_full_pass=on_full_pass)
    return metrics.probe_summary(sums.totals()), compare(atlas, tuned)


def _step_recorder(reporter: Reporter | None, earlier: list[dict[str, Any]]):
    """A TrainerCallback that logs every step, stops on a non-finite loss, and forwards steps to `reporter`.

    `earlier` are the rows of the steps before a resume checkpoint; the clock goes on from their last elapsed time.
    """
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.history: list[dict[str, Any]] = list(earlier)
            self.diverged_at: int | None = None
            self.started = self.finished = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter() - (self.history[-1]["elapsed_s"] if self.history else 0.0)

        def on_train_end(self, args, state, control, **kwargs):
            self.finished = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            elapsed = time.perf_counter() - self.started
            row = {"step": state.global_step, "loss": float(logs["loss"]),
                   "learning_rate": float(logs.get("learning_rate", math.nan)),
                   "grad_norm": float(logs.get("grad_norm", math.nan)),
                   "tokens_seen": int(state.num_input_tokens_seen), "elapsed_s": elapsed,
                   "tokens_per_s": state.num_input_tokens_seen / elapsed if elapsed > 0 else math.nan}
            self.history.append(row)
            if not math.isfinite(row["loss"]):
                self.diverged_at = state.global_step
                control.should_training_stop = True
            if reporter is not None:
                reporter(row)

    return StepRecorder()


def _checkpoint_forwarder(resume: Resume, recorder):
    """A TrainerCallback that hands each Trainer checkpoint (adapter, optimizer, scheduler, RNG, step) and the
    history so far to `resume.save`; the one saved at the last step is not needed, the finished trial reports."""
    from transformers import TrainerCallback

    class CheckpointForwarder(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step < state.max_steps and recorder.diverged_at is None:
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                resume.save(folder, state.global_step, recorder.history)

    return CheckpointForwarder()


def checkpointing_arg(enabled: bool) -> dict[str, bool]:
    """Activation checkpointing on or off, under the name this transformers takes: `activation_checkpointing` where
    it exists (the old name then warns at every trial), `gradient_checkpointing` before it did."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def _sft_config(config: TrialConfig, plan: MicroBatchPlan, packing: bool, output_dir: str, bf16: bool,
                save_every: int | None = None):
    from trl import SFTConfig

    from .optim import uses_own_schedule
    from .packing import PADDING_FREE_ARGS

    layout = PADDING_FREE_ARGS if packing else {"max_length": config.max_length}
    return SFTConfig(
        output_dir=output_dir, max_steps=config.max_steps, per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum, learning_rate=config.learning_rate,
        lr_scheduler_type="constant" if uses_own_schedule(config.optimizer) else config.lr_scheduler,
        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay, **layout,
        **checkpointing_arg(plan.gradient_checkpointing), torch_compile=config.torch_compile, bf16=bf16, fp16=False,
        seed=config.seed, data_seed=config.seed, logging_steps=config.logging_steps, logging_nan_inf_filter=False,
        include_num_input_tokens_seen="non_padding", eval_strategy="no", report_to="none",
        **({"save_strategy": "steps", "save_steps": save_every, "save_total_limit": 1} if save_every
           else {"save_strategy": "no"}),
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=not _cuda_available(),
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _train_loss(history: list[dict]) -> float:
    losses = [row["loss"] for row in history]
    if not losses:
        return math.nan
    tail = max(1, round(len(losses) * TRAIN_LOSS_TAIL))
    return sum(losses[-tail:]) / tail


def _trainable_model(config: TrialConfig, ref, device, bf16: bool, log: Callable[[str], None]):
    """The model on `device` with its LoRA adapter, and whether it can train packed (see `tune_lfm.packing`)."""
    import torch

    from .models import load_model
    from .packing import prepare_model_for_packing

    model = load_model(ref, torch.bfloat16 if bf16 else torch.float32, device)
    packing = config.packing and prepare_model_for_packing(model)
    if config.packing and not packing:
        log(f"[tune_lfm] {config.model} mixes tokens across packed conversations here; training unpacked (same run, "
            "slower)")
    model, targets = attach_lora(model, config)
    return model, targets, packing


def measure_trial_memory(config: TrialConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Peak GPU memory of `config`'s worst micro-batch at its configured size (`micro_batch_size`, else
    `batch_size`) on a whole GPU (CUDA only); with gradient checkpointing only if it does not fit without.

    The search driver divides a GPU by this to decide how many trials share it. Measuring at the configured size,
    not the largest, lets the measured-best number of trials share a GPU; each trial then plans the largest
    micro-batch that fits its share.
    """
    import torch

    from .memory import memory_budget_gb, plan_micro_batch
    from .models import load_tokenizer, resolve_model

    device = select_device()
    if device.type != "cuda":
        raise RuntimeError("measure_trial_memory needs a CUDA GPU")
    ref = resolve_model(config.model)
    tokenizer = load_tokenizer(ref)
    data = prepare_data(config, tokenizer)
    model, _, packing = _trainable_model(config, ref, device, use_bf16(config, device), log)
    plan = plan_micro_batch(model, data.train, config.replace(micro_batch_size=None), packing,
                            tokenizer.pad_token_id, device, memory_budget_gb(device, None),
                            largest=config.micro_batch_size or config.batch_size)
    return {"peak_gb": plan.probe_peak_gb, "micro_batch": plan.micro_batch, "packing": packing,
            "gradient_checkpointing": plan.gradient_checkpointing, "gpu_name": torch.cuda.get_device_name(device),
            "gpu_total_gb": torch.cuda.get_device_properties(device).total_memory / 2**30}


def run_trial(config: TrialConfig, reporter: Reporter | None = None, save_adapter: str | None = None,
              log: Callable[[str], None] = print,
              gpu_share: float | None = None, resume: Resume | None = None) -> dict[str, Any]:
    """Train one adapter and measure it. Raises on bad input; a NaN/inf loss returns status `diverged`.

    `gpu_share` is the fraction of the GPU this trial may use when trials share one (Ray's fractional GPUs).
    `resume` checkpoints every N steps and may continue from an earlier attempt's checkpoint (see
    `tune_lfm.checkpoints`); the result is the same run's.
    """
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer

    from . import metrics
    from .frozen_linear import linears_on_onednn
    from .heap import keep_freed_memory
    from .lm_head import use_lean_lm_head
    from .memory import memory_budget_gb, plan_micro_batch
    from .models import load_tokenizer, resolve_model
    from .optim import build_optimizer, prepare_for_eval

    wall_start = time.perf_counter()
    keep_freed_memory()
    set_seed(config.seed)
    device = select_device()
    bf16 = use_bf16(config, device)
    ref = resolve_model(config.model)
    embedded = [f"model {ref.name}"] * ref.embedded + [f"data (rows of {config.dataset})"] * config.uses_embedded_data
    if embedded:
        log(f"[tune_lfm] running on the EMBEDDED {' and '.join(embedded)} — for tests and CPU runs, not real results")
    metrics.reset_peak_memory(device)

    tokenizer = load_tokenizer(ref)
    data = prepare_data(config, tokenizer)
    prepared = time.perf_counter()
    model, targets, packing = _trainable_model(config, ref, device, bf16, log)
    plan = plan_micro_batch(model, data.train, config, packing, tokenizer.pad_token_id, device,
                            memory_budget_gb(device, gpu_share))
    loaded = time.perf_counter()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    recorder = _step_recorder(reporter, resume.history if resume else [])
    callbacks = [recorder, _checkpoint_forwarder(resume, recorder)] if resume else [recorder]
    optimizer = build_optimizer(config.optimizer, model.parameters(), config.learning_rate, config.weight_decay)
    onednn = contextlib.nullcontext(False) if config.torch_compile else linears_on_onednn(model)
    with onednn as on_onednn, scratch_dir("tune_lfm_trial_") as output_dir:
        trainer = SFTTrainer(model=model, args=_sft_config(config, plan, packing, output_dir, bf16,
                                                           resume.every if resume else None),
                             train_dataset=Dataset.from_list(data.train), processing_class=tokenizer,
                             optimizers=(optimizer, None), callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # it prints log dicts to stdout, where our JSON goes
        lm_head = "lean" if use_lean_lm_head(model.get_base_model(), device) else "trl"
        trainer.train(resume_from_checkpoint=resume.start if resume else None)
    prepare_for_eval(optimizer)
    model.eval()
    eval_start = time.perf_counter()
    log(f"[tune_lfm] trained {trainer.state.global_step} steps in {recorder.finished - recorder.started:.0f} s; "
        f"measuring held-out loss on {len(data.eval)} conversations (adapter on and off), KL on the "
        f"{len(data.probe)} probe conversations, then the hub check")

    pad = tokenizer.pad_token_id
    heldout = metrics.heldout_measures(model, data.eval, config.kl_batch_size, pad, device)
    probe, hub = probe_and_hub_measures(model, tokenizer, data.probe, config, device, log)
    eval_s = time.perf_counter() - eval_start
    adapter_error = None
    if save_adapter:
        try:
            model.save_pretrained(save_adapter)
        except OSError as err:  # the measurements stand; the caller reports the adapter that could not be saved
            adapter_error = f"could not save the adapter to {save_adapter}: {err}"

    train_s = recorder.finished - recorder.started
    tokens = int(trainer.state.num_input_tokens_seen)
    result = {
        **{name: getattr(config, name) for name in FIELD_NAMES},
        "lora_alpha": config.resolved_lora_alpha, "lora_targets": config.targets_label(),
        "status": "diverged" if recorder.diverged_at is not None else "completed",
        "error": f"non-finite loss at step {recorder.diverged_at}" if recorder.diverged_at is not None else None,
        "train_loss": _train_loss(recorder.history), **heldout, **probe, **hub,
        "trainable_params": trainable, "total_params": total, "target_modules": len(targets.module_names),
        "target_layers": list(targets.layers), "steps_completed": int(trainer.state.global_step),
        "tokens_trained": tokens, "train_s": train_s, "tokens_per_s": tokens / train_s if train_s > 0 else math.nan,
        "prepare_s": prepared - wall_start, "load_s": loaded - prepared, "eval_s": eval_s,
        "wall_s": time.perf_counter() - wall_start, "peak_mem_gb": metrics.peak_memory_gb(device),
        "rows_skipped": data.rows_skipped, "rows_dropped": data.rows_dropped, "train_rows": len(data.train),
        "data_source_used": data.source, "model_kind": ref.kind, "device": str(device), "packing_used": packing,
        "micro_batch_used": plan.micro_batch, "gradient_checkpointing_used": plan.gradient_checkpointing,
        "lm_head_used": lm_head, "frozen_linear_used": "onednn" if on_onednn else "torch",
        "precision_used": "bf16" if bf16 else "fp32", "history": recorder.history,
    }
    if save_adapter:
        result["adapter_error"] = adapter_error
    return result


SHORT_FLAGS = {"learning_rate": ["--lr"], "lora_rank": ["--rank"], "lora_targets": ["--targets"],
               "max_steps": ["--steps"]}
"""Short aliases kept beside the flags named after the settings."""


def _flag_value(name: str, text: str, flag: str) -> Any:
    """A setting given as a flag: target specs and layer lists have their own short forms, the rest is YAML."""
    if name == "lora_targets":
        return parse_targets_arg(text)
    if name == "hub_layers":
        return parse_layers_arg(text, flag)
    return parse_value(text, flag)


def _cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, then those given with --set (the later wins)."""
    flags = {name: _flag_value(name, getattr(args, name), f"--{name.replace('_', '-')}")
             for name in FIELD_NAMES if getattr(args, name) is not None}
    return {**flags, **parse_set_pairs(args.set)}


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrialConfig field, named after it and helped by its docstring, so YAML keys, flags and --help
    cannot drift apart."""
    parser = argparse.ArgumentParser(prog="python -m tune_lfm.trial",
                                     description="Run one LoRA SFT trial and print its result as JSON.")
    parser.add_argument("--config", help="YAML file of trial settings (e.g. an analysis preset); flags override it")
    settings = parser.add_argument_group("trial settings (the YAML keys of tune_lfm.config.TrialConfig)")
    docs, defaults = field_docs(), TrialConfig()
    for name in FIELD_NAMES:
        flags = [f"--{name.replace('_', '-')}", *SHORT_FLAGS.get(name, [])]
        default = getattr(defaults, name)
        kind = type_name(FIELD_TYPES[name]).replace(" | None", "")
        settings.add_argument(*flags, dest=name, metavar=kind.upper() if kind.isalpha() else "YAML",
                              help=f"{docs.get(name, '')} (default: {default})".strip().replace("%", "%%"))
    settings.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="any setting as key=value (YAML value), e.g. --set warmup_steps=10")
    parser.add_argument("--scale", choices=["tiny", "full"], default="full",
                        help="full: the settings as given; tiny: shrink them exactly as a tiny-scale sweep does "
                             "(embedded model and data, see README 'Tiny scale'). A preset written by the analysis "
                             "already holds the settings as run: give it without --scale")
    parser.add_argument("--save-adapter", metavar="DIR")
    parser.add_argument("--history", action="store_true", help="include the per-step history in the JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    skip_collection_at_exit()
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        base = load_config_file(args.config).to_dict() if args.config else {}
        overrides = _cli_overrides(args)
        config = scaled_config(config_from_dict({**base, **overrides}, where=args.config or "command line"),
                               args.scale)
        check_trial(config, args.config or "command line")
        if args.save_adapter:
            check_output_dir(args.save_adapter, "--save-adapter")
        result = run_trial(config, reporter=StepProgress(config.max_steps), save_adapter=args.save_adapter,
                           log=lambda line: print(line, file=sys.stderr))
        if args.scale == "tiny":
            result.update(scale_metadata(args.scale))
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.history:
        result.pop("history")
    print(json.dumps(result, indent=2, default=str))
    if result.get("adapter_error"):
        print(f"error: {result['adapter_error']}", file=sys.stderr)
        return 1
    return 0 if result["status"] == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
