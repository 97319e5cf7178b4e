"""Padding-free packing for LFM2 that keeps packed conversations apart, with no CUDA extension.

With padding-free batches (TRL's collator, `padding_free=True`) several conversations share one row, told apart by
`position_ids` (restarting at 0) and `seq_idx` (the conversation number of each token). Two LFM2 operators mix tokens:

- Attention: transformers derives a block-diagonal causal mask from restarting `position_ids` for `sdpa`, `eager`
  and `flex_attention` (`masking_utils.find_packed_sequence_indices`), so those stay per conversation as they are,
  provided the forward has no cache and no 2D attention mask (SFTTrainer passes `use_cache=False`; a forward with the
  model's default `use_cache=True` builds a cache and silently gets a plain causal mask over the whole row).
  `VARLEN_ATTENTION` skips the cross-conversation blocks instead of masking them: PyTorch's variable-length flash
  attention on CUDA, one causal SDPA per conversation elsewhere (on CPU a masked SDPA over a row of four 512-token
  conversations does four times the attention work; benchmarks/packed_attention_cost.py).
- The short convolution (`Lfm2ShortConv`, kernel `conv_L_cache` = 3) looks back two tokens. transformers honours
  `seq_idx` there only through the CUDA `causal_conv1d` package; without it 5.24 raises "can't keep packed sequences
  apart" and 5.17 silently drops `seq_idx`, so the first tokens of a conversation would see the previous one.

`enable_leak_free_packing()` rebinds `transformers.models.lfm2.modeling_lfm2.causal_conv1d_fn`, the module global that
`Lfm2ShortConv.forward` calls at run time, to a version that zeroes every tap crossing a `seq_idx` boundary and
otherwise defers to the function it replaced. It checks the result on a two-conversation input before returning,
so a transformers release that routes the call differently fails loudly instead of leaking.
"""

from __future__ import annotations

import functools
import inspect

import torch

VARLEN_ATTENTION = "tune_lfm_varlen"
"""Attention implementation name: per-conversation attention for padding-free rows (variable-length flash attention
on CUDA, one SDPA per conversation elsewhere); every other batch goes to transformers' SDPA."""

PADDING_FREE_ARGS = {"padding_free": True, "packing": False, "max_length": None}
"""SFTConfig settings for a packed trial: each micro-batch's conversations are concatenated into one row, no padding.

TRL's bfd packing is deliberately not used: it fills rows up to max_length, so an optimizer step would hold about
three times as many conversations as the unpacked trial (batch x accumulation conversations per step), which is a
different training run. `max_length` is None because tune_lfm.data.tokens already truncated every conversation and
TRL refuses `padding_free` with `max_length` unless it packs."""

_replaced_conv = None
"""The `causal_conv1d_fn` that `enable_leak_free_packing` replaced, restored by `disable_leak_free_packing`."""


def segmented_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            seq_idx: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv1d whose taps never cross from one packed sequence into another.

    x: (batch, channels, length); weight: (channels, kernel); seq_idx: (batch, length), equal within a sequence.
    Same result as `causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx)`: each sequence starts from zero history.
    The kernel is a few taps long, so the conv is a sum of shifted products, each masked where the token `shift`
    steps back belongs to another sequence; the loop runs over taps, not over sequences.
    """
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"segmented_causal_conv1d: expected x (batch, channels, length) and weight (channels, "
                         f"kernel), got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if seq_idx.dim() == 1:
        seq_idx = seq_idx.unsqueeze(0)
    if seq_idx.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"segmented_causal_conv1d: seq_idx must be (batch, length) = {(x.shape[0], x.shape[2])}, "
                         f"got {tuple(seq_idx.shape)} (a cached decode step cannot take seq_idx)")
    kernel, length = weight.shape[1], x.shape[2]
    seq_idx = seq_idx.to(x.device)
    out = x * weight[:, kernel - 1, None]
    for shift in range(1, min(kernel, length)):
        same_sequence = (seq_idx[:, shift:] == seq_idx[:, :-shift]).unsqueeze(1).to(x.dtype)
        out[..., shift:] += weight[:, kernel - 1 - shift, None] * (x[..., :-shift] * same_sequence)
    if bias is not None:
        out = out + bias[:, None]
    return out


def _leak_free_causal_conv1d_fn(hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                                activation: str | None = None, seq_idx: torch.Tensor | None = None, **_unused):
    """Drop-in for transformers' LFM2 `causal_conv1d_fn`; unpacked calls (`seq_idx` None) go to the original."""
    if seq_idx is None:
        return _replaced_conv(hidden_states, weight, bias, activation=activation)
    from transformers.activations import ACT2FN

    out = segmented_causal_conv1d(hidden_states.to(weight.dtype), weight, bias, seq_idx)
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(hidden_states.dtype)


def enable_leak_free_packing() -> None:
    """Make LFM2 keep padding-free packed sequences apart and register `VARLEN_ATTENTION`. Idempotent.

    Raises RuntimeError when the installed transformers does not route `seq_idx` to the rebound function.
    """
    global _replaced_conv
    from transformers.models.lfm2 import modeling_lfm2

    _register_varlen_attention()
    if modeling_lfm2.causal_conv1d_fn is _leak_free_causal_conv1d_fn:
        return
    _replaced_conv = modeling_lfm2.causal_conv1d_fn
    modeling_lfm2.causal_conv1d_fn = _leak_free_causal_conv1d_fn
    try:
        _check_short_conv_keeps_sequences_apart(modeling_lfm2)
    except Exception:
        disable_leak_free_packing()
        raise


def prepare_model_for_packing(model) -> bool:
    """Ready `model` for padding-free rows and check that it keeps them apart; call before attaching LoRA.

    Enables the LFM2 short-convolution fix and, for a model on SDPA, `VARLEN_ATTENTION`. Then any model, LFM2 or
    not, must pass `packing_keeps_sequences_apart`. Returns False (and restores the model's attention) when it does
    not, e.g. an architecture with another token-mixing operator that ignores `seq_idx`: the trial then trains
    unpacked, which is slower but the same training run.
    """
    try:
        enable_leak_free_packing()
    except RuntimeError:  # this transformers calls LFM2's conv differently; the model check below decides
        pass
    attention = model.config._attn_implementation
    if attention == "sdpa":
        model.set_attn_implementation(VARLEN_ATTENTION)
    if packing_keeps_sequences_apart(model):
        return True
    model.set_attn_implementation(attention)
    return False


PACKED_CHECK_LENGTHS = (6, 1, 9)
"""Conversations of the leak check's rows: a single token between two others, so every short-conv tap crosses."""


@torch.no_grad()
def packing_keeps_sequences_apart(model) -> bool:
    """Whether `model` keeps the conversations of a padding-free row apart, judged on two rows that differ only in
    their first conversation (same length, other tokens).

    - Leak: the later conversations' logits must be the same in both rows. The two rows have identical shapes, so the
      kernels do identical arithmetic on those positions: leak-free rows agree exactly, in bf16 too, where comparing
      against another shape would drown small leaks in rounding noise.
    - Positions: each conversation's logits must match it alone, to the dtype's tolerance (e.g. positions restart).
    The rows are built by TRL's own padding-free collator, so the check sees what training sees. A model that refuses
    the packed row (transformers raises for LFM2 without a `seq_idx`-aware conv) fails.
    """
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    first, *rest = [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in PACKED_CHECK_LENGTHS]
    other_first = torch.randint(1, vocab, (len(first),), generator=generator).tolist()
    tail = slice(len(first), None)
    was_training = model.training
    model.eval()
    try:
        packed = _packed_logits(model, [first, *rest])
        swapped = _packed_logits(model, [other_first, *rest])
        alone = torch.cat([model(input_ids=torch.tensor([c], device=model.device), use_cache=False).logits[0]
                           for c in [first, *rest]]).float()
    except (ValueError, RuntimeError, NotImplementedError):
        return False
    finally:
        model.train(was_training)
    scale = 1 + alone.abs().max()
    rounding = 1e-4 if model.dtype == torch.float32 else 3e-2
    no_leak = (packed[tail] - swapped[tail]).abs().max() <= 1e-3 * scale  # measured: 0 leak-free, 0.25 leaking
    return bool(no_leak and (packed - alone).abs().max() <= rounding * scale)


def _packed_logits(model, conversations: list[list[int]]) -> torch.Tensor:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    row = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": c} for c in conversations])
    row = {key: value.to(model.device) if torch.is_tensor(value) else value
           for key, value in row.items() if key != "labels"}
    return model(**row, use_cache=False).logits[0].float()


def disable_leak_free_packing() -> None:
    """Undo `enable_leak_free_packing`'s rebinding of the LFM2 short convolution (the attention name stays)."""
    global _replaced_conv
    from transformers.models.lfm2 import modeling_lfm2

    if _replaced_conv is not None:
        modeling_lfm2.causal_conv1d_fn = _replaced_conv
        _replaced_conv = None


def leak_free_packing_enabled() -> bool:
    from transformers.models.lfm2 import modeling_lfm2

    return modeling_lfm2.causal_conv1d_fn is _leak_free_causal_conv1d_fn


def _check_short_conv_keeps_sequences_apart(modeling_lfm2) -> None:
    """Run a one-layer Lfm2ShortConv on two packed sequences and compare with each run alone.

    It runs once per process, inside a trial: its random draws come from a forked generator, so they do not shift the
    trial's LoRA initialisation (a fresh worker and a reused one would otherwise train different adapters)."""
    import transformers

    config = modeling_lfm2.Lfm2Config(hidden_size=8, num_hidden_layers=1, layer_types=["conv"], vocab_size=16,
                                      intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        conv = modeling_lfm2.Lfm2ShortConv(config, layer_idx=0).eval()
        first, second = torch.randn(1, 3, 8), torch.randn(1, 4, 8)
        seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1]], dtype=torch.int32)
        packed = conv(torch.cat([first, second], dim=1), seq_idx=seq_idx)
        alone = torch.cat([conv(first), conv(second)], dim=1)
    if not torch.allclose(packed, alone, atol=1e-5):
        raise RuntimeError(
            f"transformers {transformers.__version__}: Lfm2ShortConv does not pass seq_idx to "
            "modeling_lfm2.causal_conv1d_fn, so tune_lfm.packing cannot keep packed sequences apart; "
            "train without packing (TrialConfig.packing=False) or install the CUDA `causal-conv1d` package")


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over padding-free rows, each conversation on its own, from the `cu_seq_lens_q` / `max_length_q`
    that TRL's padding-free collator emits: `torch.nn.attention.varlen.varlen_attn` (flash) on CUDA in fp16/bf16,
    else one causal SDPA per conversation. Every other call (padded batches, several rows, dropout) goes to
    transformers' SDPA with the mask transformers built for it.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None or query.shape[0] != 1 or (dropout and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    kernel = _varlen_kernel(query.shape[-1], scaling)
    if kernel is None or not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return _attention_per_conversation(module, query, key, value, cu_seq_lens, scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1).repeat_interleave(groups, dim=1)
    v = value[0].transpose(0, 1).repeat_interleave(groups, dim=1)
    cu_seq_lens = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    longest = int(kwargs.get("max_length_q") or cu_seq_lens.diff().max())
    return kernel(q, k, v, cu_seq_lens, cu_seq_lens, longest, longest).unsqueeze(0), None


def _attention_per_conversation(module, query, key, value, cu_seq_lens, scaling, **kwargs):
    """Causal SDPA on each conversation's slice of the row, outputs concatenated back in row order: what the
    block-diagonal mask computes, without the attention between conversations that the mask then discards."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    bounds = [int(b) for b in cu_seq_lens.tolist()]
    pieces = [sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                     None, scaling=scaling, is_causal=True, **kwargs)[0]
              for start, end in zip(bounds, bounds[1:]) if end > start]
    return torch.cat(pieces, dim=1), None


@functools.cache
def _varlen_kernel(head_dim: int, scaling: float | None):
    """PyTorch's causal varlen_attn as f(q, k, v, cu_q, cu_k, max_q, max_k), or None where it cannot apply.

    torch 2.10 takes `is_causal=True`, later releases `window_size=(-1, 0)`; releases without a `scale` argument
    apply 1/sqrt(head_dim), so another scaling cannot use them.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    options = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    if scaling is not None:
        if "scale" in parameters:
            options["scale"] = scaling
        elif abs(scaling - head_dim**-0.5) > 1e-9:
            return None
    return functools.partial(varlen_attn, **options)


def _register_varlen_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
