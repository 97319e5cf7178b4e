"""Per-layer scores of a causal LM on the probe set, from n_layers + 1 forward passes.

- influence: 1 - mean cosine similarity between a decoder layer's input and output hidden state (how much the layer
  turns the residual stream).
- ablation: the rise in probe loss (nats per token) when the layer is skipped, i.e. returns its input unchanged, so
  its whole residual contribution (mixer and FFN) is removed.

Both are measured at the positions whose next token is an assistant token of the probe, the positions at which the
trial's loss and KL are measured, and accumulated in float32/float64 whatever the model's dtype. Sums are kept per
conversation so any subset of the probe (the two halves of the noise floor) is scored without another pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import metrics
from ..forwards import restored_forwards
from ..frozen_linear import measured_on_onednn
from ..data.tokens import IGNORE_INDEX
from ..layers import decoder_layers

METHODS = ("influence", "ablation")


def probe_examples(tokenizer, max_length: int) -> list[dict]:
    """The probe conversations tokenized with assistant-only labels, cut at `max_length` tokens."""
    from ..data.probe import load_probe
    from ..data.tokens import tokenize_conversations

    return tokenize_conversations(tokenizer, load_probe(), max_length).examples


def tokens_digest(examples: list[dict]) -> str:
    """sha256 of the token ids and labels: base and tuned scores are comparable only on identical tokens."""
    payload = json.dumps([[e["input_ids"], e["labels"]] for e in examples], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class ProbeSums:
    """Per-conversation sums over scored positions (float64, CPU); C conversations, L layers."""

    cosine: torch.Tensor
    """(C, L): sum of cos(layer input, layer output)."""
    base_nll: torch.Tensor
    """(C,): sum of next-token negative log-likelihood, nothing skipped."""
    skipped_nll: torch.Tensor
    """(C, L): the same with layer l skipped."""
    tokens: torch.Tensor
    """(C,): scored positions."""

    @classmethod
    def zeros(cls, conversations: int, layers: int) -> ProbeSums:
        return cls(*(torch.zeros(shape, dtype=torch.float64)
                     for shape in [(conversations, layers), conversations, (conversations, layers), conversations]))

    def scores(self, rows: list[int] | None = None) -> dict[str, list[float]]:
        """Token-weighted scores over the conversations `rows` (all by default)."""
        pick = slice(None) if rows is None else torch.tensor(rows, dtype=torch.long)
        count = self.tokens[pick].sum()
        base_loss = self.base_nll[pick].sum() / count
        return {"influence": (1 - self.cosine[pick].sum(0) / count).tolist(),
                "ablation": (self.skipped_nll[pick].sum(0) / count - base_loss).tolist()}

    def loss(self) -> float:
        return (self.base_nll.sum() / self.tokens.sum()).item()


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _output_recorder(into: list, index: int):
    """Forward hook keeping a layer's output, so later passes can replay it instead of recomputing the layer."""

    def hook(module, args, kwargs, output):
        into[index] = output

    return hook


@contextlib.contextmanager
def _replayed(layers: list, outputs: list, skipped: int):
    """Layers before `skipped` return their recorded outputs without computing (their inputs are unchanged in
    this pass, so their outputs are too); layer `skipped` returns its input, as if it were not there."""

    def skip(*args, **kwargs):
        hidden = _layer_input(args, kwargs)
        recorded = outputs[skipped]
        return (hidden, *recorded[1:]) if isinstance(recorded, tuple) else hidden

    with restored_forwards(layers[: skipped + 1]):
        for index, layer in enumerate(layers[:skipped]):
            layer.forward = lambda *args, _output=outputs[index], **kwargs: _output
        layers[skipped].forward = skip
        yield


def _cosine_recorder(keep: torch.Tensor, rows: torch.Tensor, into: torch.Tensor):
    """Forward hook adding, per batch row, the summed cos(layer input, layer output) at scored positions to `into`."""

    def hook(module, args, kwargs, output):
        hidden_in = _layer_input(args, kwargs)[:, :-1][keep].float()
        hidden_out = _layer_output(output)[:, :-1][keep].float()
        into.index_add_(0, rows, F.cosine_similarity(hidden_in, hidden_out, dim=-1).double().cpu())

    return hook


@contextlib.contextmanager
def _hooked(pairs):
    """Forward hooks (with kwargs) on (module, hook) pairs for the duration of the block."""
    handles = [module.register_forward_hook(hook, with_kwargs=True) for module, hook in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _row_nll(model, hidden: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Per-row sum of next-token NLL at scored positions, from `metrics.scored_hidden`'s hidden states and targets
    (the LM head runs on those positions only)."""
    nll = [-metrics.next_token_log_probs(model, hidden[start : start + metrics.SCORED_CHUNK])
           .gather(-1, targets[start : start + metrics.SCORED_CHUNK, None]).squeeze(-1)
           for start in range(0, len(targets), metrics.SCORED_CHUNK)]
    return metrics.per_row_sum(torch.cat(nll), rows, num_rows)


def _padded_work(examples: list[dict], order: list[int], batch_size: int) -> list[int]:
    """Padded tokens of each batch: what a batch costs, for the progress estimate."""
    lengths = [len(examples[i]["input_ids"]) for i in order]
    return [len(lengths[s:s + batch_size]) * max(lengths[s:s + batch_size]) for s in range(0, len(lengths), batch_size)]


FullPassHook = Callable[[dict, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
"""Called with (batch, hidden, targets) of each batch's pass with nothing skipped (`metrics.scored_hidden`'s). A hook
that computes that pass's next-token NLL at every scored position anyway returns it (in `targets`' order), and
`measure` takes it instead of running the LM head a second time."""


@torch.no_grad()
@measured_on_onednn
def measure(model, examples: list[dict], batch_size: int, pad_token_id: int, device,
            progress: Callable[[str], None] | None = None, on_full_pass: FullPassHook | None = None) -> ProbeSums:
    """Run the probe once as is (recording every layer's input/output cosine and output) and once per skipped layer.

    A pass that skips layer l replays the recorded outputs of layers 0..l-1 and computes only the layers after l,
    which halves the work of the ablation passes and gives the same numbers. Conversations are batched shortest
    first, which cuts padding by about a quarter; sums stay in probe order. `progress` receives a line before the
    first batch (the work ahead) and after each (done, elapsed, time left extrapolated by padded tokens);
    `on_full_pass` lets a caller that needs the model's own pass over the same batches (a trial's probe KL) use it
    instead of running it again.
    """
    layers = decoder_layers(model)
    sums = ProbeSums.zeros(len(examples), len(layers))
    order = metrics.shortest_first(examples)
    work = _padded_work(examples, order, batch_size)
    if progress:
        progress(f"{len(examples)} probe conversations in {len(work)} batches ({sum(work):,} padded tokens), "
                 f"{len(layers) + 1} passes each (the {len(layers)} skip passes replay earlier layers: about "
                 f"{1 + (len(layers) + 1) / 2:.0f} full forwards of work)")
    started, done = time.perf_counter(), 0
    batched = metrics.batches([examples[i] for i in order], batch_size, pad_token_id)
    for batch_index, (start, batch) in enumerate(zip(range(0, len(order), batch_size), batched)):
        probe_rows = torch.tensor(order[start : start + batch_size])
        keep = batch["labels"][:, 1:] != IGNORE_INDEX
        rows = keep.nonzero(as_tuple=True)[0]
        keep_on_device = keep.to(device)
        cosine = torch.zeros(len(keep), len(layers), dtype=torch.float64)
        outputs: list = [None] * len(layers)
        hooks = [(layer, hook) for i, layer in enumerate(layers)
                 for hook in (_cosine_recorder(keep_on_device, rows, cosine[:, i]), _output_recorder(outputs, i))]
        with _hooked(hooks):
            hidden, targets = metrics.scored_hidden(model, batch, device)
        nll = on_full_pass(batch, hidden, targets) if on_full_pass is not None else None
        sums.base_nll[probe_rows] = (_row_nll(model, hidden, targets, rows, len(keep)) if nll is None
                                     else metrics.per_row_sum(nll, rows, len(keep)))
        sums.cosine[probe_rows] = cosine
        for index in range(len(layers)):
            with _replayed(layers, outputs, index):
                skipped_hidden, _ = metrics.scored_hidden(model, batch, device)
            sums.skipped_nll[probe_rows, index] = _row_nll(model, skipped_hidden, targets, rows, len(keep))
        sums.tokens[probe_rows] = keep.sum(1).double()
        done += work[batch_index]
        if progress:
            elapsed = time.perf_counter() - started
            progress(f"{min(start + batch_size, len(order))}/{len(order)} probe conversations, {elapsed:.0f} s, "
                     f"~{elapsed / done * (sum(work) - done):.0f} s left")
    return sums
