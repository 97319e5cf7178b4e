"""Memory planning: micro-batches that keep the run identical, the fused-head probe, trials per GPU.

The CPU has no CUDA memory to measure, so the search over micro-batches is driven here by a probe that reports the
peak a real GPU would (proportional to the tokens of the batch); everything around it is the real code.
"""

import pytest
import torch

from tune_lfm import memory
from tune_lfm.config import ConfigError, TrialConfig, config_from_dict
from tune_lfm.models import load_model, load_tokenizer, resolve_model
from tune_lfm.trial import attach_lora, prepare_data, run_trial

QUICK = dict(model="tiny-lfm2", dataset="alpaca", max_steps=4, batch_size=2, grad_accum=4, max_length=160,
             num_examples=32, eval_examples=8, learning_rate=2e-3, lora_targets="all_linear")


@pytest.fixture(scope="module")
def tiny():
    config = TrialConfig(**QUICK)
    ref = resolve_model(config.model)
    tokenizer = load_tokenizer(ref)
    model, _ = attach_lora(load_model(ref, torch.float32, "cpu"), config)
    return config, model, tokenizer, prepare_data(config, tokenizer)


def test_micro_batch_options_divide_the_effective_batch():
    assert memory.micro_batch_options(16) == [16, 8, 4, 2, 1]
    assert memory.micro_batch_options(12) == [12, 6, 4, 3, 2, 1]


def test_micro_batch_size_must_divide_the_effective_batch():
    assert config_from_dict({**QUICK, "micro_batch_size": 4}).micro_batch_size == 4
    with pytest.raises(ConfigError, match="micro_batch_size.*must divide.*= 8"):
        config_from_dict({**QUICK, "micro_batch_size": 3})


@pytest.mark.parametrize("packing", [True, False])
def test_worst_case_batch_takes_the_longest_conversations(tiny, packing):
    _, _, tokenizer, data = tiny
    lengths = sorted((len(e["input_ids"]) for e in data.train), reverse=True)
    batch = memory.worst_case_batch(data.train, 3, packing, tokenizer.pad_token_id)
    expected = (1, sum(lengths[:3])) if packing else (3, lengths[0])
    assert tuple(batch["input_ids"].shape) == expected


def test_probe_forward_is_the_trainers_fused_loss_and_is_removed_afterwards(tiny):
    _, model, tokenizer, data = tiny
    batch = memory.worst_case_batch(data.train, 2, False, tokenizer.pad_token_id)
    with torch.no_grad():
        plain = model(**batch, use_cache=False).loss
        with memory._fused_lm_head(model):
            fused = model(**batch, use_cache=False, fused_lm_head=True).loss
        after = model(**batch, use_cache=False)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert fused.grad_fn is None and after.logits is not None and "forward" not in vars(model.get_base_model())


def test_probe_trains_one_step_without_leaving_a_trace(tiny, monkeypatch):
    """The probe's bookkeeping, on CPU: CUDA's counters are stood in for, the forward and backward are real."""
    _, model, tokenizer, data = tiny
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    batch = memory.worst_case_batch(data.train, 2, False, tokenizer.pad_token_id)
    model.eval()
    rng = torch.get_rng_state()
    seen = []
    def record(module, args, output):  # and draw a random number, as dropout would
        seen.append(module.training)
        torch.rand(1)

    hook = model.register_forward_hook(record)
    try:
        assert memory.probe_peak_gb(model, batch, "cpu") == 3.0
    finally:
        hook.remove()
    assert seen == [True] and not model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters()) and "forward" not in vars(model.get_base_model())

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(model.get_base_model().model, "forward", out_of_memory)
    assert memory.probe_peak_gb(model, batch, "cpu") is None
    assert not model.training and "forward" not in vars(model.get_base_model())


def token_proportional_probe(gb_per_token: float, checkpointing_saves: float = 1.0):
    """A stand-in for CUDA's peak-memory counter: peak grows with the batch's tokens, less under checkpointing."""
    seen = []

    def probe(model, batch, device):
        checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        seen.append((int(batch["input_ids"].numel()), checkpointing))
        return batch["input_ids"].numel() * gb_per_token * (checkpointing_saves if checkpointing else 1.0)

    return probe, seen


def test_plan_takes_the_largest_micro_batch_that_fits(tiny, monkeypatch):
    config, model, tokenizer, data = tiny
    lengths = sorted((len(e["input_ids"]) for e in data.train), reverse=True)
    probe, seen = token_proportional_probe(0.001)
    monkeypatch.setattr(memory, "probe_peak_gb", probe)
    budget = sum(lengths[:2]) * 0.001 / memory.MEMORY_HEADROOM + 1e-9  # the two longest fit, four do not
    plan = memory.plan_micro_batch(model, data.train, config, True, tokenizer.pad_token_id, "cuda", budget)
    assert (plan.micro_batch, plan.grad_accum, plan.gradient_checkpointing) == (2, 4, False)
    assert [tokens for tokens, _ in seen] == [sum(lengths[:8]), sum(lengths[:4]), sum(lengths[:2])]


def test_plan_measured_at_the_configured_micro_batch_goes_no_larger(tiny, monkeypatch):
    """What the search driver measures: the configured micro-batch on a whole GPU, not the largest that fits."""
    config, model, tokenizer, data = tiny
    probe, seen = token_proportional_probe(0.001)
    monkeypatch.setattr(memory, "probe_peak_gb", probe)
    plan = memory.plan_micro_batch(model, data.train, config, True, tokenizer.pad_token_id, "cuda", 1e6,
                                   largest=config.batch_size)
    assert plan.micro_batch == config.batch_size == 2 and len(seen) == 1
    assert plan.probe_peak_gb == pytest.approx(seen[0][0] * 0.001)


def test_plan_turns_on_checkpointing_only_when_nothing_fits_without_it(tiny, monkeypatch):
    config, model, tokenizer, data = tiny
    longest = max(len(e["input_ids"]) for e in data.train)
    probe, seen = token_proportional_probe(0.001, checkpointing_saves=0.1)
    monkeypatch.setattr(memory, "probe_peak_gb", probe)
    budget = longest * 0.0005 / memory.MEMORY_HEADROOM  # one conversation needs twice this without checkpointing
    try:
        plan = memory.plan_micro_batch(model, data.train, config, True, tokenizer.pad_token_id, "cuda", budget)
        assert plan.gradient_checkpointing and plan.micro_batch >= 1
        assert [c for _, c in seen[:4]] == [False] * 4 and seen[-1][1]
        with pytest.raises(torch.OutOfMemoryError, match="not even one conversation"):
            memory.plan_micro_batch(model, data.train, config, True, tokenizer.pad_token_id, "cuda", 1e-9)
    finally:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()


def test_cpu_keeps_the_configured_batch_and_a_set_micro_batch_is_used_as_given(tiny):
    config, model, tokenizer, data = tiny
    plan = memory.plan_micro_batch(model, data.train, config, True, tokenizer.pad_token_id, "cpu", None)
    assert (plan.micro_batch, plan.grad_accum, plan.probe_peak_gb) == (2, 4, None)
    plan = memory.plan_micro_batch(model, data.train, config.replace(micro_batch_size=8), True,
                                   tokenizer.pad_token_id, "cuda", None)
    assert (plan.micro_batch, plan.grad_accum) == (8, 1)


@pytest.mark.parametrize("peak, total, cap, expected", [(10, 80, 4, 4), (25, 80, 4, 2), (100, 80, 4, 1),
                                                        (1, 80, 8, 8), (30, 141, 8, 3)])
def test_trials_per_gpu_keeps_each_trial_within_its_headroom(peak, total, cap, expected):
    per_gpu = memory.trials_per_gpu(peak, total, cap)
    assert per_gpu == expected
    share_gb = total / per_gpu * memory.SHARED_GPU_ALLOCATOR_FRACTION
    assert per_gpu == 1 or peak <= memory.MEMORY_HEADROOM * share_gb


@pytest.mark.slow
def test_one_big_micro_batch_trains_exactly_like_accumulated_small_ones():
    """Same conversations per optimizer step, loss divided by the step's tokens: the run does not change."""
    runs = [run_trial(TrialConfig(**QUICK, micro_batch_size=size), log=lambda _: None) for size in (2, 8)]
    assert [r["micro_batch_used"] for r in runs] == [2, 8]
    small, big = (torch.tensor([row["loss"] for row in r["history"]]) for r in runs)
    assert len(small) == 4 and runs[0]["tokens_trained"] == runs[1]["tokens_trained"]
    # step 1: same conversations, same weights, so the same loss up to summation order; later steps carry Adam's
    # amplification of that rounding (other conversations would differ by ~1e-1 at once)
    torch.testing.assert_close(big[0], small[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(big, small, rtol=2e-3, atol=0)


def test_patched_forwards_are_restored_including_ones_set_before():
    """The probe and the hub check patch `forward` on instances; a wrapper already there (accelerate's hooks live
    there) must come back, and a plain module must fall back to its class's forward."""
    from tune_lfm.forwards import restored_forwards

    plain, wrapped = torch.nn.Identity(), torch.nn.Identity()
    wrapper = lambda x: x + 1  # noqa: E731
    wrapped.forward = wrapper
    with pytest.raises(RuntimeError):
        with restored_forwards([plain, wrapped]):
            plain.forward = wrapped.forward = lambda x: x * 0
            raise RuntimeError("the block failed")
    assert "forward" not in vars(plain) and plain(torch.ones(1)).item() == 1
    assert wrapped.forward is wrapper and wrapped(torch.ones(1)).item() == 2
