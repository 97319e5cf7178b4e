"""GPU memory planning for trials: each trial's budget, its micro-batch, and how many trials share one GPU.

The micro-batch is how many conversations one forward pass takes. It changes speed and memory, never the run: an
optimizer step always takes the same `batch_size x grad_accum` conversations in the same order, and the trainer
divides the loss by the assistant tokens of the whole step, so 16 x 1 and 4 x 4 give the same gradients (the CPU
benchmark matches their losses to 2e-6). On a GPU the largest micro-batch that fits runs fastest: fewer, larger
kernels. On a CPU it does not (benchmarks/RESULTS.md), so CPU trials keep the configured `batch_size`.

"Fits" is measured, not estimated: the trial's worst micro-batch (its longest conversations) runs forward and
backward through the same fused LM head the trainer uses, within the trial's share of the GPU. When even one
conversation does not fit, gradient checkpointing is switched on and the search repeats. The search driver measures
the sweep's heaviest trial the same way on a whole GPU, at its configured micro-batch (`batch_size`), and divides
the GPU by that (`trials_per_gpu`): as many trials as measured best share a GPU, and each then plans the largest
micro-batch that fits its share.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

import torch

from .config import TrialConfig
from .forwards import restored_forwards

MEMORY_HEADROOM = 0.85
"""A probe must peak below this fraction of the trial's memory budget: the optimizer state, the allocator's
fragmentation and batches the probe did not see (same tokens, other lengths) need the rest."""

SHARED_GPU_ALLOCATOR_FRACTION = 0.95
"""On a shared GPU a trial's allocator gets 95% of its share: each process's CUDA context lives outside the cap."""

MAX_TRIALS_PER_GPU = 4
"""Default cap on trials sharing one GPU (a sweep's `resources: {max_trials_per_gpu: N}` changes it). Measured for
LFM2.5-230M on one H200 (shared/reference/README.md): 4 trials at once ran 2.2x one trial's tokens/s; more trials
per GPU have not been measured yet."""


@dataclass(frozen=True)
class MicroBatchPlan:
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    probe_peak_gb: float | None
    """Peak memory of the chosen probe (GiB); None when nothing was probed (CPU, or a micro-batch set in the config)."""


def memory_budget_gb(device, gpu_share: float | None) -> float | None:
    """This trial's GiB of the GPU, enforced: with a share below 1 (several trials per GPU) the caching allocator is
    capped at it, so one trial's peak cannot push its neighbours out of memory. None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    share = min(gpu_share or 1.0, 1.0)
    if share < 1.0:
        share *= SHARED_GPU_ALLOCATOR_FRACTION
        torch.cuda.set_per_process_memory_fraction(share, device)
    return torch.cuda.get_device_properties(device).total_memory * share / 2**30


def trials_per_gpu(peak_gb: float, gpu_total_gb: float, cap: int = MAX_TRIALS_PER_GPU) -> int:
    """How many trials whose probe peaked at `peak_gb` fit one GPU, each within `MEMORY_HEADROOM` of its share."""
    usable = MEMORY_HEADROOM * SHARED_GPU_ALLOCATOR_FRACTION * gpu_total_gb
    return max(1, min(cap, int(usable // peak_gb)))


def micro_batch_options(effective_batch: int) -> list[int]:
    """Micro-batches that split the effective batch into whole accumulation steps, largest first."""
    return [size for size in range(effective_batch, 0, -1) if effective_batch % size == 0]


def worst_case_batch(examples: list[dict], micro_batch: int, packing: bool, pad_token_id: int) -> dict:
    """The `micro_batch` longest examples, collated exactly as the trainer collates them."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    longest = sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True)[:micro_batch]
    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=packing)(longest)


@contextlib.contextmanager
def _fused_lm_head(model):
    """TRL's fused LM head on the causal LM inside `model`, removed again on exit (SFTTrainer adds its own)."""
    from trl.trainer import add_fused_lm_head

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    with restored_forwards([causal_lm]):
        add_fused_lm_head(causal_lm, outputs=("log_probs", "entropy", "is_top1"))
        yield


def probe_peak_gb(model, batch: dict, device) -> float | None:
    """Peak GiB of one training forward and backward on `batch`, or None when it runs out of memory.

    Runs in train mode, as training will, with the random state restored afterwards, so how many probes a trial
    needs (which depends on its GPU share) cannot change its dropout masks.
    """
    inputs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
    was_training = model.training
    torch.cuda.reset_peak_memory_stats(device)
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        model.train()
        try:
            with _fused_lm_head(model):
                model(**inputs, use_cache=False, fused_lm_head=True).loss.backward()
            peak = torch.cuda.max_memory_allocated(device) / 2**30
        except torch.OutOfMemoryError:
            peak = None  # leaving the handler drops the traceback, and with it the half-built graph
        finally:
            model.train(was_training)
    model.zero_grad(set_to_none=True)
    del inputs
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def _enable_checkpointing(model) -> None:
    """transformers 5.18+ names it activation checkpointing; earlier 5.x releases only have the old name."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def plan_micro_batch(model, examples: list[dict], config: TrialConfig, packing: bool, pad_token_id: int, device,
                     budget_gb: float | None, largest: int | None = None) -> MicroBatchPlan:
    """The largest micro-batch (at most `largest`) whose worst case fits `budget_gb`; checkpointing only when
    nothing fits without it.

    A `micro_batch_size` in the config is used as given, and CPU trials keep `batch_size` (see the module doc).
    """
    effective = config.effective_batch
    fixed = config.micro_batch_size or (config.batch_size if torch.device(device).type != "cuda" else None)
    if fixed is not None:
        return MicroBatchPlan(fixed, effective // fixed, config.gradient_checkpointing, None)
    for checkpointing in dict.fromkeys([config.gradient_checkpointing, True]):
        if checkpointing:
            _enable_checkpointing(model)
        for size in [size for size in micro_batch_options(effective) if size <= (largest or effective)]:
            peak = probe_peak_gb(model, worst_case_batch(examples, size, packing, pad_token_id), device)
            if peak is not None and (budget_gb is None or peak <= MEMORY_HEADROOM * budget_gb):
                return MicroBatchPlan(size, effective // size, checkpointing, peak)
    budget = f"{budget_gb:.1f} GiB" if budget_gb is not None else "the whole GPU"
    raise torch.OutOfMemoryError(
        f"{config.model}: not even one conversation of max_length {config.max_length} fits in {budget} with gradient "
        "checkpointing; give the trial more of the GPU (--gpus-per-trial) or lower max_length")
