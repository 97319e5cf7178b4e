"""The lean LM head (tune_lfm/lm_head.py) gives what TRL's fused head gives: the same loss, per-token outputs and
gradients, checked against plain full-logit arithmetic and against TRL's own head on the embedded model."""

import pytest
import torch

from tune_lfm import lm_head
from tune_lfm.lm_head import TOKENS_PER_BLOCK, LeanLogProbs, lean_head_applies, use_lean_lm_head


@pytest.mark.parametrize("kept_bytes", [lm_head.KEPT_PROBABILITIES_BYTES, 0], ids=["kept", "recomputed"])
def test_log_probs_entropy_top1_and_gradients_equal_full_logits(kept_bytes, monkeypatch):
    monkeypatch.setattr(lm_head, "KEPT_PROBABILITIES_BYTES", kept_bytes)
    torch.manual_seed(0)
    n, hidden_size, vocab = 3 * TOKENS_PER_BLOCK + 5, 16, 300  # a partial last block
    hidden = torch.randn(n, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(vocab, (n,))
    with torch.no_grad():  # some targets are the argmax; one ties with an earlier token, so is not the first argmax
        targets[:20] = (hidden[:20] @ weight.t()).argmax(-1)
        tied = int((targets[:20] > 0).nonzero()[0])
        weight[targets[tied] - 1] = weight[targets[tied]]
    upstream = torch.randn(n, dtype=torch.float64)

    log_probs, entropy, is_top1 = LeanLogProbs.apply(hidden, weight, targets)
    (log_probs * upstream).sum().backward()
    lean_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    reference = torch.log_softmax(hidden @ weight.t(), -1)
    expected = reference.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(log_probs.double(), expected.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(entropy.double(), -(reference.exp() * reference).sum(-1).detach(), rtol=1e-5,
                               atol=1e-5)
    assert torch.equal(is_top1, reference.argmax(-1) == targets) and is_top1.sum() >= 10 and not is_top1[tied]
    torch.testing.assert_close(lean_grads[0], hidden.grad, rtol=1e-4, atol=1e-5)  # the head computes in fp32
    torch.testing.assert_close(lean_grads[1], weight.grad, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_lora_and_batch():
    from peft import LoraConfig, get_peft_model
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tune_lfm.config import TrialConfig
    from tune_lfm.models import load_model, load_tokenizer, resolve_model
    from tune_lfm.packing import prepare_model_for_packing
    from tune_lfm.spaces import scaled_config
    from tune_lfm.trial import prepare_data

    ref = resolve_model("tiny-lfm2")
    tokenizer = load_tokenizer(ref)
    data = prepare_data(scaled_config(TrialConfig(dataset="magicoder"), "tiny"), tokenizer)  # long prompts: -100
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(data.train[:3])
    torch.manual_seed(0)
    base = load_model(ref, torch.float32, torch.device("cpu"))
    assert prepare_model_for_packing(base)  # the padding-free row below holds three conversations
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj", "in_proj", "w1"], init_lora_weights=False)
    model = get_peft_model(base, lora)
    return model, batch


def fused_pass(model, batch):
    model.zero_grad()
    out = model(**batch, fused_lm_head=True)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_on_the_embedded_model_it_gives_trls_loss_outputs_and_lora_gradients(tiny_lora_and_batch):
    from trl.trainer import add_fused_lm_head

    from tune_lfm.forwards import restored_forwards

    model, batch = tiny_lora_and_batch
    causal_lm = model.get_base_model()
    assert (batch["labels"] == -100).float().mean() > 0.2  # prompt tokens: the lean head skips them
    with restored_forwards([causal_lm]):
        add_fused_lm_head(causal_lm, outputs=("log_probs", "entropy", "is_top1"))
        trl, trl_grads = fused_pass(model, batch)
        assert use_lean_lm_head(causal_lm, torch.device("cpu"))
        lean, lean_grads = fused_pass(model, batch)
        plain = model(**batch, fused_lm_head=False)  # other calls still reach the model's own forward
    torch.testing.assert_close(lean.loss, trl.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain.loss, trl.loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(lean.label_mask, trl.label_mask) and torch.equal(lean.is_top1, trl.is_top1)
    for field in ("log_probs", "entropy"):
        torch.testing.assert_close(getattr(lean, field), getattr(trl, field), rtol=1e-5, atol=1e-5)
    assert lean_grads.keys() == trl_grads.keys() and len(lean_grads) > 10
    for name, grad in trl_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_scaled_logits_or_a_half_precision_head_keep_trls_head(tiny_lora_and_batch):
    from tune_lfm.models import load_model, resolve_model

    bf16 = load_model(resolve_model("tiny-lfm2"), torch.bfloat16, torch.device("cpu"))
    assert not lean_head_applies(bf16, torch.device("cpu"))
    model, _ = tiny_lora_and_batch
    causal_lm = model.get_base_model()
    assert lean_head_applies(causal_lm, torch.device("cpu"))
    text_config = causal_lm.config.get_text_config()
    text_config.final_logit_softcapping = 30.0
    try:
        assert not lean_head_applies(causal_lm, torch.device("cpu"))
    finally:
        text_config.final_logit_softcapping = None


def test_inside_a_onednn_block_the_trial_pass_runs_there_with_the_same_loss_and_lora_gradients(tiny_lora_and_batch):
    from torch.profiler import profile
    from trl.trainer import add_fused_lm_head

    from tune_lfm.forwards import restored_forwards
    from tune_lfm.frozen_linear import linears_on_onednn

    def onednn_products(pass_):
        with profile() as recorded:
            result = pass_()
        return result, sum(event.count for event in recorded.key_averages() if "_linear_pointwise" in event.key)

    model, batch = tiny_lora_and_batch
    causal_lm = model.get_base_model()
    with restored_forwards([causal_lm]):
        add_fused_lm_head(causal_lm, outputs=("log_probs", "entropy", "is_top1"))
        assert use_lean_lm_head(causal_lm, torch.device("cpu"))
        (torch_out, torch_grads), outside = onednn_products(lambda: fused_pass(model, batch))
        with linears_on_onednn(model) as on_onednn:
            (onednn_out, onednn_grads), inside = onednn_products(lambda: fused_pass(model, batch))
    frozen = [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    assert on_onednn and outside == 0
    assert inside >= 2 * len(frozen)  # every frozen layer forward and backward, and the LM head's blocks
    assert not any("forward" in vars(m) for m in frozen)  # every layer put back
    torch.testing.assert_close(onednn_out.loss, torch_out.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(onednn_out.log_probs, torch_out.log_probs, rtol=1e-5, atol=1e-5)
    assert onednn_grads.keys() == torch_grads.keys()
    for name, grad in torch_grads.items():
        torch.testing.assert_close(onednn_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
