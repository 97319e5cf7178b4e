"""A lean LM head for TRL's SFTTrainer where TRL's Triton kernels do not run (CPU): same outputs, a fraction of the
work.

SFTTrainer computes its loss through TRL's fused LM head (`trl.trainer.add_fused_lm_head`), which projects hidden
states onto the vocabulary in tiles so that the (tokens x vocab) logits never exist at once. On CUDA, Triton kernels
fold each tile in one pass over the labelled positions only. Elsewhere TRL folds 4096 x 32768 tiles with plain torch
ops that allocate about a dozen tile-sized temporaries, and scores every position, prompt tokens (label -100)
included. With LFM2's 65,536-token vocabulary that was half of a tiny trial's training time on CPU.

`use_lean_lm_head` keeps TRL's contract (`model(..., fused_lm_head=True)` returns TRL's `FusedCausalLMOutput` with
the same loss, `log_probs`, `entropy`, `is_top1` and `label_mask`) and replaces only the arithmetic: labelled
positions only, in blocks of tokens whose logits stay in cache, in place; the backward pass reuses each block's
probabilities where they fit `KEPT_PROBABILITIES_BYTES` and otherwise recomputes the block's logits as TRL does.
`entropy` and `is_top1` are metrics here and carry no gradient. Models whose logits are scaled, soft-capped or
biased, half-precision heads, MoE models, and pre-shifted labels keep TRL's head.
"""

from __future__ import annotations

import functools
import types

import torch

from .frozen_linear import weight_product, weight_t_product

TOKENS_PER_BLOCK = 64
"""Tokens whose logits are held at once: 64 x 65,536 fp32 logits are 16 MiB, inside a server CPU's last-level cache."""

KEPT_PROBABILITIES_BYTES = 256 * 2**20
"""Up to this size (tokens x vocabulary fp32), the forward pass keeps each block's probabilities for the backward pass
instead of the backward recomputing the block's logits: a tiny trial's 2,048-token row holds 32 MiB; with LFM2.5's
65,536-token vocabulary, 1,024 labelled tokens already fill the budget and the logits are recomputed."""

SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


class LeanLogProbs(torch.autograd.Function):
    """log p(target) for each row of `hidden` [n, H] under the logits `hidden @ weight.T`, plus the entropy and
    whether the target is the first argmax; differentiable in `hidden` and `weight` through `log p` only."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        n = hidden.shape[0]
        log_probs = hidden.new_empty(n, dtype=torch.float32)
        entropy = torch.empty_like(log_probs)
        is_top1 = torch.empty(n, dtype=torch.bool, device=hidden.device)
        log_z = torch.empty_like(log_probs)
        keep = n * weight.shape[0] * 4 <= KEPT_PROBABILITIES_BYTES
        ctx.probabilities = []
        for start in range(0, n, TOKENS_PER_BLOCK):
            rows = slice(start, start + TOKENS_PER_BLOCK)
            z = weight_product(hidden[rows], weight).float()
            peak, first_argmax = z.max(-1)
            target = targets[rows].unsqueeze(-1)
            is_top1[rows] = first_argmax == targets[rows]
            z.sub_(peak.unsqueeze(-1))  # shifted logits: exp cannot overflow
            target_z = z.gather(-1, target).squeeze(-1)
            p = torch.exp(z)
            total = p.sum(-1)
            expected_z = torch.linalg.vecdot(p, z) / total  # entropy = log(total) - E_p[z], on shifted logits
            log_total = torch.log(total)
            log_probs[rows] = target_z - log_total
            entropy[rows] = log_total - expected_z
            log_z[rows] = peak + log_total
            if keep:
                ctx.probabilities.append(p.div_(total.unsqueeze(-1)))
        ctx.save_for_backward(hidden, weight, targets, log_z)
        ctx.mark_non_differentiable(entropy, is_top1)
        return log_probs, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, *_):
        hidden, weight, targets, log_z = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        for index, start in enumerate(range(0, hidden.shape[0], TOKENS_PER_BLOCK)):
            rows = slice(start, start + TOKENS_PER_BLOCK)
            block = hidden[rows]
            grad = grad_log_probs[rows].float().unsqueeze(-1)
            # d log p(target) / d z_j = 1[j = target] - p_j, times the incoming gradient
            if ctx.probabilities:
                dz = ctx.probabilities[index] * -grad
            else:
                dz = weight_product(block, weight).float().sub_(log_z[rows].unsqueeze(-1)).exp_().mul_(-grad)
            dz.scatter_add_(-1, targets[rows].unsqueeze(-1), grad)
            if needs_hidden:
                grad_hidden[rows] = weight_t_product(dz, weight.float())
            if needs_weight:
                grad_weight.addmm_(dz.t(), block.float())
        return (grad_hidden.to(hidden.dtype) if needs_hidden else None,
                grad_weight.to(weight.dtype) if needs_weight else None, None)


def lean_head_applies(model, device: torch.device) -> bool:
    """Whether `model` on `device` can use the lean head: no Triton there, plain logits (`hidden @ W.T`), and an fp32
    head (TRL accumulates half-precision logits in fp32; this head does not)."""
    from trl.kernels.chunked_logprob import _use_triton

    if _use_triton(device):
        return False
    text_config = model.config.get_text_config()
    scaled = any(getattr(text_config, name, None) not in (None, 1.0) for name in SCALED_LOGITS)
    head = model.get_output_embeddings()
    return not scaled and head is not None and getattr(head, "bias", None) is None \
        and head.weight.dtype == torch.float32 and not getattr(text_config, "output_router_logits", False)


def use_lean_lm_head(model, device: torch.device) -> bool:
    """Route `model(..., fused_lm_head=True)` through LeanLogProbs where it applies; says whether it does. `model` is
    the causal LM that TRL patched with its fused head (a PEFT model's base model); every other call still goes to
    TRL's forward."""
    from trl.trainer.utils import FusedCausalLMOutput

    if not lean_head_applies(model, device):
        return False
    trl_forward = model.forward

    @functools.wraps(type(model).forward)  # generate() checks its keyword arguments against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head or shift_labels is not None:
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        head = self.get_output_embeddings()
        log_probs, entropy, is_top1 = LeanLogProbs.apply(hidden[mask], head.weight, labels[mask])
        per_token = [torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(mask, x)
                     for x in (log_probs, entropy, is_top1)]
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-per_token[0].sum() / count, log_probs=per_token[0], entropy=per_token[1],
                                   is_top1=per_token[2], label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return True
