"""Training throughput: plain TRL SFTTrainer defaults against the tune_lfm trial path, on the same examples.

Both arms train the same LoRA adapter (same initial weights, optimizer, learning-rate schedule) for the same number
of optimizer steps on the same examples in the same order, with the same effective batch; they differ only in how
the work is executed:

- `plain_trl`: what a user gets from SFTTrainer's defaults: right-padded batches, gradient checkpointing on.
- `tune_lfm`: what a trial runs: padding-free rows (`tune_lfm.packing.PADDING_FREE_ARGS`) with leak-free LFM2
  packing and variable-length attention, no gradient checkpointing, the lean LM head off CUDA
  (`tune_lfm.lm_head`), frozen linear layers through oneDNN on the CPU (`tune_lfm.frozen_linear`; not with
  `--compile`), and the micro-batch a trial plans
  (`tune_lfm.memory.plan_micro_batch`: on a GPU the largest that fits, measured; `--micro-batch N` fixes it), with
  accumulation adjusted so the effective batch is unchanged.

Real tokens are the non-pad tokens the trainer consumed (`num_input_tokens_seen`, "non_padding"); tokens/s and step
time are measured from the end of step `--warmup-steps` to the last step, so one-off start-up work is excluded.
`final_loss` is the mean logged loss over the last 10% of steps (at least one). The arms see identical batches, so
their losses differ only by floating-point noise (amplified by Adam on the first steps); `losses_agree` tests the
final losses against `--loss-tolerance` (relative).

`peak_mem_gb` is the CUDA high-water mark of allocated memory, reset per run; on the CPU it is the process's peak
resident set size, which only grows, so there it bounds the runs so far rather than measuring one arm.

`--concurrent N` runs N copies of the tune_lfm arm as separate processes at once (several trials sharing one GPU,
each held to 1/N of its memory as a trial is) and reports their aggregate throughput. Prints one JSON object; `--output` also writes it to a file.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.json_report import emit  # noqa: E402
from tune_lfm.teardown import skip_collection_at_exit  # noqa: E402

ARMS = ("plain_trl", "tune_lfm")
LENGTH_MEDIAN = 350
LENGTH_SIGMA = 0.6
"""Synthetic conversation lengths: lognormal with this median (tokens) and log-space sigma, clipped to
[MIN_LENGTH, --max-length]; sigma 0.6 puts about 4% of conversations at the 1024-token cap."""
MIN_LENGTH = 16
PROMPT_FRACTION = 0.3
"""Leading share of each synthetic conversation that is prompt (label -100), so loss is on the answer only."""
FINAL_LOSS_TAIL = 0.10


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-lfm2",
                        help="tiny-lfm2, a local model directory or a hub id; without local weights a hub id is "
                             "built from its config with random weights (same speed)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per arm")
    parser.add_argument("--batch-size", type=int, default=4, help="plain TRL's per-device batch")
    parser.add_argument("--grad-accum", type=int, default=4, help="plain TRL's accumulation steps")
    parser.add_argument("--micro-batch", type=int,
                        help="tune_lfm conversations per forward pass; must divide the effective batch "
                             "(default: planned as a trial plans it)")
    parser.add_argument("--gpu-share", type=float, help=argparse.SUPPRESS)  # set by --concurrent for its copies
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--examples", default="synthetic",
                        help="'synthetic' (lognormal lengths, median 350) or an embedded dataset name (alpaca, ...)")
    parser.add_argument("--targets", default="all_linear", help="LoRA target preset (tune_lfm.targets)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--attention", choices=["auto", "sdpa"], default="auto",
                        help="tune_lfm arm: auto = variable-length attention where available; sdpa = block mask")
    parser.add_argument("--compile", action="store_true", help="tune_lfm arm: SFTConfig(torch_compile=True)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--concurrent", type=int, default=1, help="run N tune_lfm processes at once and aggregate")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the timing (>= 1)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the arms this many times, alternating, and report each arm's median run")
    parser.add_argument("--loss-tolerance", type=float, default=0.02, help="relative final-loss difference allowed")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    args.arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown or not args.arms:
        parser.error(f"--arms: unknown {unknown or 'empty list'}; allowed: {', '.join(ARMS)}")
    effective = args.batch_size * args.grad_accum
    if args.micro_batch and effective % args.micro_batch:
        parser.error(f"--micro-batch {args.micro_batch} must divide the effective batch {effective} "
                     f"(--batch-size x --grad-accum)")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if not 1 <= args.warmup_steps < args.steps:
        parser.error(f"--warmup-steps {args.warmup_steps} must be at least 1 and below --steps {args.steps}")
    return args


def synthetic_examples(count: int, vocab_size: int, max_length: int, seed: int) -> list[dict]:
    """Random-token conversations of lognormal length; ids start at 1 so none is the pad token 0."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(count, generator=generator) * LENGTH_SIGMA).exp() * LENGTH_MEDIAN
    examples = []
    for length in lengths.round().long().clamp(MIN_LENGTH, max_length).tolist():
        ids = torch.randint(1, vocab_size, (length,), generator=generator).tolist()
        prompt = int(length * PROMPT_FRACTION)
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


def dataset_examples(name: str, count: int, max_length: int, seed: int) -> list[dict]:
    """Embedded rows of a registered dataset, tokenized with assistant-only labels as a trial does."""
    from tune_lfm.config import TrialConfig
    from tune_lfm.models import load_tokenizer, resolve_model
    from tune_lfm.trial import prepare_data

    config = TrialConfig(model="tiny-lfm2", dataset=name, data_source="embedded", num_examples=count,
                         max_length=max_length, seed=seed)
    examples = prepare_data(config, load_tokenizer(resolve_model(config.model))).train
    if not examples:
        raise SystemExit(f"--examples {name}: the embedded rows gave no training examples")
    return [examples[i % len(examples)] for i in range(count)]


def load_model_and_tokenizer(name: str, dtype, device):
    """The model (random weights from its config when none are stored locally) and a tokenizer with a pad token."""
    from transformers import AutoModelForCausalLM

    from tune_lfm.models import ModelNotFoundError, load_model, load_model_config, load_tokenizer, resolve_model

    ref = resolve_model(name)
    try:
        model, weights = load_model(ref, dtype, device), "pretrained"
    except ModelNotFoundError:
        model = AutoModelForCausalLM.from_config(load_model_config(ref), dtype=dtype).to(device)
        weights = "random (built from config)"
    try:
        tokenizer = load_tokenizer(ref)
    except ModelNotFoundError:
        tokenizer = load_tokenizer(resolve_model("tiny-lfm2"))  # only its pad token is used: examples are ids
    return model, tokenizer, weights


def _step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time and tokens seen at the end of every optimizer step (after the device finished it)."""

        def __init__(self):
            self.times: list[float] = []
            self.tokens: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.time())
            self.tokens.append(int(state.num_input_tokens_seen))

    return StepClock()


def run_arm(arm: str, args, examples: list[dict], device) -> dict:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from tune_lfm import metrics
    from tune_lfm.config import TrialConfig
    from tune_lfm.frozen_linear import linears_on_onednn
    from tune_lfm.lm_head import use_lean_lm_head
    from tune_lfm.memory import memory_budget_gb, plan_micro_batch
    from tune_lfm.optim import build_optimizer
    from tune_lfm.packing import PADDING_FREE_ARGS, enable_leak_free_packing, prepare_model_for_packing
    from tune_lfm.trial import attach_lora, checkpointing_arg

    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    effective = args.batch_size * args.grad_accum
    gc.collect()  # the previous run's trainer and model must not count towards this run's peak memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
    set_seed(args.seed)
    metrics.reset_peak_memory(device)
    model, tokenizer, weights = load_model_and_tokenizer(args.model, torch.bfloat16 if bf16 else torch.float32,
                                                         device)
    if arm == "tune_lfm":
        if args.attention == "auto":
            prepare_model_for_packing(model)
        else:
            enable_leak_free_packing()
    attention = model.config._attn_implementation
    set_seed(args.seed)  # identical LoRA initialisation in both arms
    trial = TrialConfig(model=args.model, lora_targets=args.targets, lora_rank=args.rank, batch_size=args.batch_size,
                        grad_accum=args.grad_accum, max_length=args.max_length, micro_batch_size=args.micro_batch)
    model, _ = attach_lora(model, trial)
    if arm == "plain_trl":
        micro_batch, execution = args.batch_size, {"max_length": args.max_length}  # TRL's own defaults otherwise
    else:
        plan = plan_micro_batch(model, examples, trial, True, tokenizer.pad_token_id, device,
                                memory_budget_gb(device, args.gpu_share))
        micro_batch = plan.micro_batch
        execution = {**PADDING_FREE_ARGS, **checkpointing_arg(plan.gradient_checkpointing),
                     "torch_compile": args.compile}
    optimizer = build_optimizer("adamw", model.parameters(), args.lr, 0.0)
    clock = _step_clock()
    with tempfile.TemporaryDirectory(prefix="tune_lfm_bench_") as output_dir:
        config = SFTConfig(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=micro_batch,
                           gradient_accumulation_steps=effective // micro_batch, learning_rate=args.lr,
                           bf16=bf16, seed=args.seed, data_seed=args.seed, logging_steps=1, save_strategy="no",
                           report_to="none", include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                           dataloader_num_workers=0, use_cpu=device.type == "cpu", **execution)
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(examples),
                             processing_class=tokenizer, optimizers=(optimizer, None), callbacks=[clock])
        trainer.remove_callback(PrinterCallback)
        lean_lm_head = arm == "tune_lfm" and use_lean_lm_head(model.get_base_model(), device)
        onednn = linears_on_onednn(model) if arm == "tune_lfm" and not args.compile else nullcontext(False)
        with onednn as frozen_linear_onednn:
            trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    t0, n0 = clock.times[args.warmup_steps - 1], clock.tokens[args.warmup_steps - 1]
    timed_steps = len(clock.times) - args.warmup_steps
    elapsed = clock.times[-1] - t0
    tail = max(1, round(len(losses) * FINAL_LOSS_TAIL))
    return {"tokens_per_s": (clock.tokens[-1] - n0) / elapsed, "step_s": elapsed / timed_steps,
            "timed_steps": timed_steps, "timed_window": [t0, clock.times[-1]], "timed_tokens": clock.tokens[-1] - n0,
            "tokens_seen": clock.tokens[-1], "peak_mem_gb": metrics.peak_memory_gb(device),
            "final_loss": sum(losses[-tail:]) / tail, "losses": losses, "micro_batch": micro_batch,
            "grad_accum": effective // micro_batch, "gradient_checkpointing": config.gradient_checkpointing,
            "padding_free": bool(config.padding_free), "attention": attention, "torch_compile": config.torch_compile,
            "weights": weights, "precision": "bf16" if bf16 else "fp32", "lean_lm_head": lean_lm_head,
            "frozen_linear_onednn": frozen_linear_onednn}


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s, plus every run's tokens/s (alternating repeats expose shared-machine noise)."""
    ordered = sorted(runs, key=lambda run: run["tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "tokens_per_s_runs": [run["tokens_per_s"] for run in runs]}


def compare(plain: dict, fast: dict, tolerance: float) -> dict:
    difference = abs(fast["final_loss"] - plain["final_loss"])
    relative = difference / abs(plain["final_loss"]) if plain["final_loss"] else math.inf
    steps = list(zip(plain["losses"], fast["losses"]))
    return {"speedup": fast["tokens_per_s"] / plain["tokens_per_s"],
            "final_loss_rel_diff": relative, "losses_agree": relative <= tolerance,
            "max_step_loss_diff": max(abs(a - b) for a, b in steps) if steps else math.nan,
            "same_tokens": plain["tokens_seen"] == fast["tokens_seen"]}


def run_concurrent(args, argv: list[str]) -> dict:
    """N child processes of this script, each running the tune_lfm arm alone, started together."""
    with tempfile.TemporaryDirectory(prefix="tune_lfm_bench_concurrent_") as folder:
        outputs = [os.path.join(folder, f"copy{i}.json") for i in range(args.concurrent)]
        base = _without_options(argv, ("--concurrent", "--output", "--arms", "--seed"))
        children = [subprocess.Popen([sys.executable, __file__, *base, "--arms", "tune_lfm", "--concurrent", "1",
                                      "--gpu-share", str(1 / args.concurrent), "--seed", str(args.seed + i),
                                      "--output", out], stdout=subprocess.DEVNULL)
                    for i, out in enumerate(outputs)]
        codes = [child.wait() for child in children]
        if any(codes):
            raise SystemExit(f"--concurrent: copies exited with {codes}")
        copies = [json.loads(Path(out).read_text())["arms"]["tune_lfm"] for out in outputs]
    start = min(copy["timed_window"][0] for copy in copies)
    end = max(copy["timed_window"][1] for copy in copies)
    return {"copies": args.concurrent, "aggregate_tokens_per_s": sum(c["timed_tokens"] for c in copies) / (end - start),
            "sum_of_copy_tokens_per_s": sum(c["tokens_per_s"] for c in copies),
            "per_copy_tokens_per_s": [c["tokens_per_s"] for c in copies],
            "per_copy_peak_mem_gb": [c["peak_mem_gb"] for c in copies]}


def _without_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in names:
            skip = True
        elif not item.startswith(tuple(f"{name}=" for name in names)):
            kept.append(item)
    return kept


def environment(device) -> dict:
    import torch
    import transformers
    import trl

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


def main(argv=None) -> int:
    skip_collection_at_exit()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    report = {"benchmark": "throughput", **environment(device), "model": args.model,
              "settings": {"steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                           "effective_batch": args.batch_size * args.grad_accum, "micro_batch": args.micro_batch or "planned",
                           "max_length": args.max_length, "targets": args.targets, "rank": args.rank, "lr": args.lr,
                           "warmup_steps": args.warmup_steps, "repeats": args.repeats, "attention": args.attention,
                           "compile": args.compile}}
    if args.concurrent > 1:
        report["concurrent"] = run_concurrent(args, argv)
    else:
        from tune_lfm.models import load_model_config, resolve_model

        count = args.steps * args.batch_size * args.grad_accum
        if args.examples == "synthetic":
            vocab = load_model_config(resolve_model(args.model)).vocab_size
            examples = synthetic_examples(count, vocab, args.max_length, args.seed)
        else:
            examples = dataset_examples(args.examples, count, args.max_length, args.seed)
        lengths = sorted(len(e["input_ids"]) for e in examples)
        report["examples"] = {"source": args.examples, "count": len(examples), "real_tokens": sum(lengths),
                              "median_length": lengths[len(lengths) // 2], "max_length": lengths[-1]}
        runs = {arm: [] for arm in args.arms}
        for _ in range(args.repeats):
            for arm in args.arms:
                runs[arm].append(run_arm(arm, args, examples, device))
        report["arms"] = {arm: median_run(arm_runs) for arm, arm_runs in runs.items()}
        if len(report["arms"]) == 2:
            report.update(compare(report["arms"]["plain_trl"], report["arms"]["tune_lfm"], args.loss_tolerance))
    emit(report, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
