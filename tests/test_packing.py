"""Padding-free packing on LFM2 must give every conversation exactly what it gets alone, in logits and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tune_lfm import packing
from tune_lfm.config import TrialConfig
from tune_lfm.models import EMBEDDED_DIR
from tune_lfm.trial import run_trial

LENGTHS = (37, 5, 64, 1, 20)
"""Conversation lengths packed into one row: shorter and longer than the conv kernel, one a single token."""


@pytest.fixture
def leak_free():
    packing.enable_leak_free_packing()
    yield
    packing.disable_leak_free_packing()


@pytest.fixture(scope="module")
def conversations():
    vocab_size = AutoConfig.from_pretrained(str(EMBEDDED_DIR)).vocab_size
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(1, vocab_size, (n,), generator=generator).tolist() for n in LENGTHS]


def packed_batch(conversations):
    """One padding-free row exactly as TRL's SFTTrainer collates it (position_ids, cu_seq_lens, seq_idx)."""
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collator([{"input_ids": ids} for ids in conversations])
    assert batch["seq_idx"].shape == batch["input_ids"].shape and "attention_mask" not in batch
    return batch


def tiny_model(attention: str = "sdpa"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(EMBEDDED_DIR), dtype=torch.float32, attn_implementation=attention)


def packed_logits(model, batch):
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return model(**inputs, use_cache=False).logits[0]  # use_cache=False, as in training (SFTTrainer sets it)


def unpacked_logits(model, conversations):
    return torch.cat([model(input_ids=torch.tensor([ids]), use_cache=False).logits[0] for ids in conversations])


def reference_conv(x, weight, bias, seq_idx):
    """One sequence at a time through a zero-padded depthwise conv1d: the definition of no leakage."""
    rows = []
    for row in range(x.shape[0]):
        pieces = []
        for value in seq_idx[row].unique_consecutive():
            part = x[row : row + 1, :, seq_idx[row] == value]
            out = F.conv1d(part, weight.unsqueeze(1), bias, padding=weight.shape[1] - 1, groups=x.shape[1])
            pieces.append(out[..., : part.shape[-1]])
        rows.append(torch.cat(pieces, dim=-1))
    return torch.cat(rows)


@pytest.mark.parametrize("kernel", [2, 3, 4])
def test_segmented_conv_matches_one_sequence_at_a_time(kernel):
    torch.manual_seed(kernel)
    seq_idx = torch.tensor([[0] * 7 + [1] + [2] * 2 + [3] * 10, [0] * 3 + [1] * 17], dtype=torch.int32)
    x = torch.randn(2, 6, 20, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    out = packing.segmented_causal_conv1d(x, weight, bias, seq_idx)
    torch.testing.assert_close(out, reference_conv(x, weight, bias, seq_idx))
    assert torch.autograd.gradcheck(lambda *t: packing.segmented_causal_conv1d(*t, seq_idx), (x, weight, bias))


def test_segmented_conv_rejects_misshaped_seq_idx():
    with pytest.raises(ValueError, match="seq_idx must be"):
        packing.segmented_causal_conv1d(torch.randn(1, 4, 9), torch.randn(4, 3), None, torch.zeros(1, 8))


@pytest.mark.parametrize("attention", ["sdpa", "eager", packing.VARLEN_ATTENTION])
def test_packed_logits_equal_each_conversation_alone(leak_free, conversations, attention):
    model = tiny_model(attention).eval()
    with torch.no_grad():
        packed = packed_logits(model, packed_batch(conversations))
        alone = unpacked_logits(model, conversations)
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


def test_without_the_fix_packing_raises_or_leaks(conversations):
    """The check above can fail: transformers' own conv either refuses seq_idx or, ignoring it, mixes conversations."""
    assert not packing.leak_free_packing_enabled()
    model = tiny_model().eval()
    batch = packed_batch(conversations)
    with torch.no_grad():
        alone = unpacked_logits(model, conversations)
        try:
            leaked = packed_logits(model, batch)
        except ValueError as err:
            assert "packed sequences" in str(err)
        else:
            assert (leaked - alone).abs().max() > 1e-2
        without_seq_idx = packed_logits(model, {k: v for k, v in batch.items() if k != "seq_idx"})
    assert (without_seq_idx - alone).abs().max() > 1e-2


def test_unpacked_forward_is_bit_identical_with_the_fix(conversations):
    model = tiny_model().eval()
    ids = torch.tensor([conversations[0]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        packing.enable_leak_free_packing()
        try:
            after = model(input_ids=ids).logits
        finally:
            packing.disable_leak_free_packing()
    assert torch.equal(before, after)


def test_packed_gradient_equals_sum_of_per_conversation_gradients(leak_free, conversations):
    model = tiny_model()
    batch = packed_batch(conversations)

    def summed_loss(logits, labels):
        return F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")

    summed_loss(packed_logits(model, batch), batch["labels"][0]).backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    for ids in conversations:
        summed_loss(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0], torch.tensor(ids)).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_enable_is_idempotent_and_disable_restores():
    from transformers.models.lfm2 import modeling_lfm2

    original = modeling_lfm2.causal_conv1d_fn
    packing.enable_leak_free_packing()
    packing.enable_leak_free_packing()
    assert packing.leak_free_packing_enabled()
    packing.disable_leak_free_packing()
    assert modeling_lfm2.causal_conv1d_fn is original


def test_prepare_model_for_packing_attends_per_conversation(leak_free):
    model = tiny_model()
    assert packing.prepare_model_for_packing(model)
    assert packing.leak_free_packing_enabled() and model.config._attn_implementation == packing.VARLEN_ATTENTION


def test_attention_per_conversation_trains_like_the_block_diagonal_mask(leak_free, conversations):
    """Off CUDA the packed row's attention runs conversation by conversation instead of masked over the whole row:
    the same loss and the same gradients."""
    batch = packed_batch(conversations)
    grads = {}
    for attention in ("sdpa", packing.VARLEN_ATTENTION):
        model = tiny_model(attention)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        grads[attention] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    (masked_loss, masked), (split_loss, split) = grads["sdpa"], grads[packing.VARLEN_ATTENTION]
    torch.testing.assert_close(split_loss, masked_loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(split, masked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def leaky_conv(x, weight, bias=None, activation=None, seq_idx=None, **_):
    """What transformers 5.17 does without `causal_conv1d`: drops seq_idx and convolves straight across."""
    return packing._replaced_conv(x, weight, bias, activation=activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_check_tells_leak_free_from_leaking_lfm2(leak_free, monkeypatch, dtype):
    from transformers.models.lfm2 import modeling_lfm2

    model = tiny_model().to(dtype)
    assert packing.packing_keeps_sequences_apart(model)
    monkeypatch.setattr(modeling_lfm2, "causal_conv1d_fn", leaky_conv)
    assert not packing.packing_keeps_sequences_apart(model)


def test_model_check_fails_lfm2_without_the_fix():
    assert not packing.leak_free_packing_enabled()
    assert not packing.packing_keeps_sequences_apart(tiny_model())  # transformers refuses seq_idx: unpacked


def test_model_check_covers_other_architectures():
    """Attention-only models pack as they are; a state-space mixer that ignores seq_idx is caught, not trusted."""
    from transformers import LlamaConfig, MambaConfig

    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2,
                                                         vocab_size=300))
    mamba = AutoModelForCausalLM.from_config(MambaConfig(hidden_size=64, state_size=8, num_hidden_layers=2,
                                                         vocab_size=300))
    assert packing.packing_keeps_sequences_apart(llama)
    assert not packing.packing_keeps_sequences_apart(mamba)


@pytest.mark.slow
def test_trial_with_packing_trains_and_measures(leak_free):
    config = TrialConfig(model="tiny-lfm2", dataset="alpaca", packing=True, max_steps=4, batch_size=4, grad_accum=2,
                         max_length=192, num_examples=32, eval_examples=8, learning_rate=2e-3)
    result = run_trial(config, log=lambda _: None)
    assert result["status"] == "completed" and result["steps_completed"] == 4 and result["packing_used"]
    assert result["lm_head_used"] == "lean" and result["frozen_linear_used"] == "onednn"  # on the CPU
    assert all(math.isfinite(result[key]) for key in ("train_loss", "eval_loss", "base_loss", "kl", "tokens_per_s"))
    assert result["tokens_trained"] > 0


@pytest.mark.slow
def test_trial_trains_unpacked_when_the_fix_cannot_apply(monkeypatch):
    """A transformers release that routes LFM2's conv elsewhere: the fix refuses, the check fails, no leak trains."""
    packing.disable_leak_free_packing()

    def refuse():
        raise RuntimeError("Lfm2ShortConv does not pass seq_idx")

    monkeypatch.setattr(packing, "enable_leak_free_packing", refuse)
    lines = []
    result = run_trial(TrialConfig(model="tiny-lfm2", dataset="alpaca", max_steps=2, batch_size=2, grad_accum=1,
                                   max_length=128, num_examples=8, eval_examples=4), log=lines.append)
    assert result["status"] == "completed" and result["packing"] and not result["packing_used"]
    assert any("training unpacked" in line for line in lines)


def test_enabling_packing_leaves_the_trials_random_state_alone():
    """The once-per-process conv check draws from a forked generator: a trial seeded before it initialises its
    adapter the same in a fresh Ray worker (where the check runs) as in a reused one (where it does not)."""
    packing.disable_leak_free_packing()
    try:
        torch.manual_seed(1234)
        state = torch.get_rng_state()
        packing.enable_leak_free_packing()  # runs the check
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        packing.disable_leak_free_packing()
