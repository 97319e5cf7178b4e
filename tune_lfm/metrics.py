"""Measurements a trial reports, each with one definition and unit.

- `eval_loss` / `base_loss`: mean cross-entropy in nats per assistant token of held-out rows, with the adapter on /
  off. Token-weighted, so long answers count by their length.
- `kl` / `kl_p95`: mean and 95th percentile over assistant tokens of the probe set of
  KL(P_base || P_tuned) = sum_v p_base(v) (log p_base(v) - log p_tuned(v)), in nats, where P is the next-token
  distribution at the position that predicts that token; base = the same model with the adapter disabled.
- `peak_mem_gb`: peak CUDA memory allocated by this process (GiB) on GPU; peak resident set size on CPU.

Logits over a 65,536-token vocabulary are large, so the LM head runs only on the positions that are scored, in chunks.
"""

from __future__ import annotations

import contextlib
import resource
import sys

import torch
import torch.nn.functional as F

from .data.tokens import IGNORE_INDEX

SCORED_CHUNK = 1024
"""Scored positions per LM-head call (bounds memory at chunk x vocab floats)."""


def batches(examples: list[dict], batch_size: int, pad_token_id: int):
    """Right-padded tensors {input_ids, attention_mask, labels}, in the given order."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, example in enumerate(chunk):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            mask[row, :n] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _causal_lm(model):
    """The transformers CausalLM inside a PEFT wrapper (LoRA layers are injected in place, so it runs them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def scored_hidden(model, batch, device):
    """Final hidden states at positions whose next token is scored, and those next tokens."""
    lm = _causal_lm(model)
    decoder = getattr(lm, lm.base_model_prefix)
    hidden = decoder(input_ids=batch["input_ids"].to(device),
                     attention_mask=batch["attention_mask"].to(device)).last_hidden_state
    targets = batch["labels"][:, 1:].to(device)
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def next_token_log_probs(model, hidden_chunk):
    """Next-token log-probabilities; the LM head is never a LoRA target, so it is shared by base and tuned."""
    head = _causal_lm(model).get_output_embeddings()
    return F.log_softmax(head(hidden_chunk).float(), dim=-1)


def adapter_disabled(model):
    """A context in which `model` runs as the base model (a no-op for a model without an adapter)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


@torch.no_grad()
def mean_token_loss(model, examples: list[dict], batch_size: int, pad_token_id: int, device,
                    adapter: bool = True) -> float:
    """Token-weighted cross-entropy (nats) over assistant tokens; `adapter=False` measures the base model."""
    total, count = 0.0, 0
    context = contextlib.nullcontext() if adapter else adapter_disabled(model)
    with context:
        for batch in batches(examples, batch_size, pad_token_id):
            hidden, targets = scored_hidden(model, batch, device)
            for start in range(0, len(targets), SCORED_CHUNK):
                log_probs = next_token_log_probs(model, hidden[start : start + SCORED_CHUNK])
                picked = log_probs.gather(-1, targets[start : start + SCORED_CHUNK, None])
                total -= picked.sum().item()
                count += picked.numel()
    return total / max(count, 1)


@torch.no_grad()
def per_token_kl(model, examples: list[dict], batch_size: int, pad_token_id: int, device) -> torch.Tensor:
    """KL(P_base || P_tuned) in nats at every scored probe position (1-D float tensor on CPU)."""
    values = []
    for batch in batches(examples, batch_size, pad_token_id):
        with adapter_disabled(model):
            base_hidden, _ = scored_hidden(model, batch, device)
        tuned_hidden, _ = scored_hidden(model, batch, device)
        for start in range(0, len(base_hidden), SCORED_CHUNK):
            base = next_token_log_probs(model, base_hidden[start : start + SCORED_CHUNK])
            tuned = next_token_log_probs(model, tuned_hidden[start : start + SCORED_CHUNK])
            kl = (base.exp() * (base - tuned)).sum(-1).clamp_min(0.0)
            values.append(kl.cpu())
    return torch.cat(values) if values else torch.zeros(0)


def kl_summary(per_token: torch.Tensor) -> dict[str, float]:
    if per_token.numel() == 0:
        return {"kl": float("nan"), "kl_p95": float("nan")}
    return {"kl": per_token.mean().item(), "kl_p95": torch.quantile(per_token.double(), 0.95).item()}


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
