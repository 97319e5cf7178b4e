"""Measurements a trial reports, each with one definition and unit.

- `eval_loss` / `base_loss`: mean cross-entropy in nats per assistant token of held-out rows, with the adapter on /
  off. Token-weighted, so long answers count by their length.
- `improvement` = base_loss - eval_loss: what training gained on rows it never saw.
- `kl` / `kl_p95`: mean and 95th percentile over assistant tokens of the probe set of
  KL(P_base || P_tuned) = sum_v p_base(v) (log p_base(v) - log p_tuned(v)), in nats, where P is the next-token
  distribution at the position that predicts that token; base = the same model with the adapter disabled.
- `probe_loss` / `probe_base_loss` / `probe_improvement`: the same losses on the probe set, which every trial of a
  model shares (whole conversations, whatever the trial's max_length), so trials trained on different datasets or
  lengths can be ranked on one set of tokens.
- `*_se`: standard error of each mean over conversations (see `ratio_mean_se`).
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
from .frozen_linear import measured_on_onednn

SCORED_CHUNK = 256
"""Scored positions per LM-head call: bounds memory at chunk x vocab floats (64 MiB with a 65,536-token vocabulary),
and on CPU keeps a chunk's logits close to cache (the tiny model's probe pass: 50 ms at 256, 66 ms at 1,024)."""


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
    keep = (batch["labels"][:, 1:] != IGNORE_INDEX).to(device)
    return hidden[:, :-1][keep], scored_targets(batch, device)


def scored_targets(batch, device) -> torch.Tensor:
    """The next tokens `scored_hidden` returns, without the forward pass."""
    targets = batch["labels"][:, 1:].to(device)
    return targets[targets != IGNORE_INDEX]


def next_token_log_probs(model, hidden_chunk):
    """Next-token log-probabilities; the LM head is never a LoRA target, so it is shared by base and tuned."""
    head = _causal_lm(model).get_output_embeddings()
    return F.log_softmax(head(hidden_chunk).float(), dim=-1)


def adapter_disabled(model):
    """A context in which `model` runs as the base model (a no-op for a model without an adapter)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def _scored_rows(batch) -> torch.Tensor:
    """The conversation (row of `batch`) of every scored position, in `scored_hidden`'s order."""
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    return keep.nonzero()[:, 0]


def per_row_sum(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    return torch.zeros(num_rows, dtype=torch.float64).index_add_(0, rows, values.detach().double().cpu())


def ratio_mean_se(sums: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
    """Token-weighted mean sum(s_i) / sum(n_i) over conversations i and its standard error.

    Conversations, not tokens, are the independent draws (tokens of one answer share its difficulty), so the error is
    the ratio estimator's: sqrt(k / (k - 1) * sum((s_i - mean * n_i)^2)) / sum(n_i) over k conversations. NaN with
    fewer than two conversations.
    """
    total = counts.sum().item()
    if total == 0:
        return float("nan"), float("nan")
    mean = sums.sum().item() / total
    k = counts.numel()
    if k < 2:
        return mean, float("nan")
    residual = sums - mean * counts
    return mean, (k / (k - 1) * (residual**2).sum().item()) ** 0.5 / total


def _summary(prefix: str, sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    mean, se = ratio_mean_se(sums, counts)
    return {prefix: mean, f"{prefix}_se": se}


class ConversationSums:
    """Per conversation, a batch at a time: scored tokens `n`, summed loss with the adapter on (`tuned`) and off
    (`base`), and with `with_kl` the summed KL(P_base || P_tuned), plus every token's KL (`kl_tokens`). Every measure
    built on these is a total over conversations, so the order of the batches does not matter."""

    def __init__(self, with_kl: bool):
        self.with_kl = with_kl
        self.parts: dict[str, list[torch.Tensor]] = {"n": [], "tuned": [], "base": [], "kl": [], "kl_tokens": []}

    @torch.no_grad()
    def add(self, model, batch: dict, device, tuned_hidden: torch.Tensor | None = None,
            base_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """One batch; `tuned_hidden` / `base_hidden`: `scored_hidden` of this batch with the adapter on / off, when
        the caller has them. Returns the tuned NLL at each scored position."""
        rows, num_rows = _scored_rows(batch), batch["input_ids"].shape[0]
        targets = scored_targets(batch, device)
        if base_hidden is None:
            with adapter_disabled(model):
                base_hidden, _ = scored_hidden(model, batch, device)
        if tuned_hidden is None:
            tuned_hidden, _ = scored_hidden(model, batch, device)
        base_nll, tuned_nll, kl = [], [], []
        for start in range(0, len(targets), SCORED_CHUNK):
            chunk = slice(start, start + SCORED_CHUNK)
            base = next_token_log_probs(model, base_hidden[chunk])
            tuned = next_token_log_probs(model, tuned_hidden[chunk])
            base_nll.append(-base.gather(-1, targets[chunk, None]).squeeze(-1))
            tuned_nll.append(-tuned.gather(-1, targets[chunk, None]).squeeze(-1))
            if self.with_kl:
                kl.append((base.exp() * (base - tuned)).sum(-1).clamp_min(0.0))
        self.parts["n"].append(per_row_sum(torch.ones(len(rows)), rows, num_rows))
        self.parts["base"].append(per_row_sum(torch.cat(base_nll), rows, num_rows))
        self.parts["tuned"].append(per_row_sum(torch.cat(tuned_nll), rows, num_rows))
        if self.with_kl:
            self.parts["kl"].append(per_row_sum(torch.cat(kl), rows, num_rows))
            self.parts["kl_tokens"].append(torch.cat(kl).cpu())
        return torch.cat(tuned_nll)

    def totals(self) -> dict[str, torch.Tensor]:
        return {key: torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
                for key, values in self.parts.items()}


def shortest_first(examples: list[dict]) -> list[int]:
    """Indices of `examples`, shortest first: batched in this order, a batch pads to a length close to its rows' own
    (the probe set: 9,280 padded tokens instead of 13,000 in file order, 8,675 real)."""
    return sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))


def _conversation_sums(model, examples: list[dict], batch_size: int, pad_token_id: int, device,
                       with_kl: bool) -> dict[str, torch.Tensor]:
    sums = ConversationSums(with_kl)
    for batch in batches([examples[i] for i in shortest_first(examples)], batch_size, pad_token_id):
        sums.add(model, batch, device)
    return sums.totals()


@measured_on_onednn
def heldout_measures(model, examples: list[dict], batch_size: int, pad_token_id: int, device) -> dict[str, float]:
    """eval_loss (adapter on) and base_loss (adapter off) on the held-out rows, their difference `improvement`, and
    standard errors over conversations; improvement's is paired (the same rows both ways), so it is far smaller
    than either loss's own."""
    sums = _conversation_sums(model, examples, batch_size, pad_token_id, device, with_kl=False)
    n = sums["n"]
    return {**_summary("eval_loss", sums["tuned"], n), **_summary("base_loss", sums["base"], n),
            **_summary("improvement", sums["base"] - sums["tuned"], n), "eval_rows": int((n > 0).sum().item())}


@measured_on_onednn
def probe_measures(model, examples: list[dict], batch_size: int, pad_token_id: int, device) -> dict[str, float]:
    """On the probe set, the same for every trial of a model: KL from the base model (mean, 95th percentile of
    tokens, standard error over conversations) and the tuned and base losses there, a common basis for comparing
    trials trained on different datasets."""
    return probe_summary(_conversation_sums(model, examples, batch_size, pad_token_id, device, with_kl=True))


def probe_summary(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """`probe_measures` from `ConversationSums(with_kl=True).totals()` of the probe set."""
    n, tokens = sums["n"], sums["kl_tokens"]
    p95 = torch.quantile(tokens.double(), 0.95).item() if tokens.numel() else float("nan")
    return {**_summary("kl", sums["kl"], n), "kl_p95": p95, **_summary("probe_loss", sums["tuned"], n),
            **_summary("probe_base_loss", sums["base"], n),
            **_summary("probe_improvement", sums["base"] - sums["tuned"], n)}


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
