"""Every number a trial ranks by, checked against an independent computation: whole-model logits, per conversation."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tune_lfm import metrics
from tune_lfm.atlas import compare, ensure_atlas, store, tuned_scores
from tune_lfm.atlas.scores import tokens_digest
from tune_lfm.config import TrialConfig
from tune_lfm.layers import decoder_layers
from tune_lfm.models import load_model, load_tokenizer, resolve_model
from tune_lfm.trial import attach_lora, prepare_data, probe_and_hub_measures

CONFIG = TrialConfig(model="tiny-lfm2", dataset="dolly", max_length=192, num_examples=16, eval_examples=12,
                     lora_targets="all_linear")


@pytest.fixture(scope="module")
def tuned():
    """A LoRA model whose adapter is far from zero (random B), the held-out rows and the probe set."""
    ref = resolve_model(CONFIG.model)
    tokenizer = load_tokenizer(ref)
    data = prepare_data(CONFIG, tokenizer)
    torch.manual_seed(0)  # LoRA's A matrices come from the global generator: the same adapter whatever ran before
    model, _ = attach_lora(load_model(ref, torch.float32, "cpu"), CONFIG)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval(), tokenizer.pad_token_id, data


def _reference(model, examples, adapter_on: bool):
    """Per conversation: log-probs at the positions that predict an assistant token, from a plain forward pass."""
    rows = []
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor(example["labels"][1:])
            if adapter_on:
                logits = model(input_ids=ids).logits[0, :-1]
            else:
                with model.disable_adapter():
                    logits = model(input_ids=ids).logits[0, :-1]
            keep = labels != -100
            rows.append((F.log_softmax(logits[keep].double(), -1), labels[keep]))
    return rows


def _ratio(sums, counts):
    """Token-weighted mean and the ratio estimator's standard error, written out with numpy."""
    sums, counts = np.asarray(sums, float), np.asarray(counts, float)
    mean = sums.sum() / counts.sum()
    k = len(sums)
    return mean, math.sqrt(k / (k - 1) * ((sums - mean * counts) ** 2).sum()) / counts.sum()


def test_held_out_losses_and_paired_improvement_match_a_plain_forward(tuned):
    model, pad, data = tuned
    got = metrics.heldout_measures(model, data.eval, 4, pad, "cpu")
    tuned_rows, base_rows = _reference(model, data.eval, True), _reference(model, data.eval, False)
    counts = [len(t) for _, t in tuned_rows]
    tuned_nll = [-lp.gather(-1, t[:, None]).sum().item() for lp, t in tuned_rows]
    base_nll = [-lp.gather(-1, t[:, None]).sum().item() for lp, t in base_rows]
    for key, sums in (("eval_loss", tuned_nll), ("base_loss", base_nll),
                      ("improvement", np.subtract(base_nll, tuned_nll))):
        mean, se = _ratio(sums, counts)
        assert got[key] == pytest.approx(mean, abs=1e-4), key
        assert got[f"{key}_se"] == pytest.approx(se, rel=1e-3, abs=1e-6), key
    assert got["eval_rows"] == len(data.eval) >= 8
    assert abs(got["eval_loss"] - got["base_loss"]) > 0.05  # the adapter really changes the model
    # pairing removes the rows' own difficulty: the difference is far better known than either loss
    assert got["improvement_se"] < 0.5 * min(got["eval_loss_se"], got["base_loss_se"])


def test_probe_kl_and_losses_match_a_plain_forward(tuned):
    model, pad, data = tuned
    probe = data.probe[:10]
    got = metrics.probe_measures(model, probe, 3, pad, "cpu")
    tuned_rows, base_rows = _reference(model, probe, True), _reference(model, probe, False)
    counts, kl_sums, kl_tokens, tuned_nll = [], [], [], []
    for (tuned_lp, targets), (base_lp, _) in zip(tuned_rows, base_rows):
        per_token = F.kl_div(tuned_lp, base_lp, log_target=True, reduction="none").sum(-1)
        counts.append(len(targets))
        kl_sums.append(per_token.sum().item())
        kl_tokens.extend(per_token.tolist())
        tuned_nll.append(-tuned_lp.gather(-1, targets[:, None]).sum().item())
    kl, kl_se = _ratio(kl_sums, counts)
    assert got["kl"] == pytest.approx(kl, rel=1e-3) and got["kl"] > 1e-3
    assert got["kl_se"] == pytest.approx(kl_se, rel=1e-2)
    assert got["kl_p95"] == pytest.approx(float(np.quantile(kl_tokens, 0.95)), rel=1e-3)
    assert got["probe_loss"] == pytest.approx(_ratio(tuned_nll, counts)[0], abs=1e-4)
    assert got["probe_improvement"] == pytest.approx(got["probe_base_loss"] - got["probe_loss"], abs=1e-9)


def test_probe_measures_taken_from_the_atlas_and_the_hub_checks_pass_equal_their_own(tuned, monkeypatch, tmp_path):
    """The probe is whole conversations whatever the trial's max_length (the atlas's tokens), so with the atlas's
    kl_batch_size a trial takes KL and the probe losses from passes that run anyway: adapter on from the hub check's
    pass with nothing skipped, adapter off from the base hidden states the atlas keeps. Two forwards per batch fewer,
    the same numbers; an atlas cached without those states costs the adapter-off pass again, for the same numbers."""
    model, pad, data = tuned
    config = CONFIG
    tokenizer = load_tokenizer(resolve_model(config.model))
    probe = data.probe  # prepared at max_length 192, which would cut 11 of the 48 probe conversations
    assert probe == prepare_data(dataclasses.replace(config, max_length=1024), tokenizer).probe
    alone = metrics.probe_measures(model, probe, config.kl_batch_size, pad, "cpu")
    atlas = ensure_atlas(config.model, model=model, tokenizer=tokenizer, log=lambda line: None)  # not counted below
    assert tokens_digest(probe) == atlas.probe_tokens
    hub_alone = compare(atlas, tuned_scores(model, atlas, tokenizer))
    assert atlas.base_hidden is not None and len(atlas.base_hidden) == atlas.scored_tokens
    passes = []
    counted = metrics.scored_hidden
    monkeypatch.setattr(metrics, "scored_hidden", lambda *args: passes.append(1) or counted(*args))
    batches = math.ceil(len(probe) / config.kl_batch_size)
    layers = len(decoder_layers(model))
    for base_hidden_kept, extra_passes in ((True, 0), (False, 1)):
        if not base_hidden_kept:
            monkeypatch.setattr(store, "_base_hidden_file", lambda atlas_file: tmp_path / "never-written")
        passes.clear()
        shared, hub = probe_and_hub_measures(model, tokenizer, probe, config, "cpu", log=lambda line: None)
        assert shared == alone and hub == hub_alone
        assert len(passes) == batches * (1 + layers + extra_passes)  # per batch: as is, one per skipped layer
    assert hub["hub_rank_corr"] > 0.5  # the hub check itself ran on those passes


def test_an_untrained_adapter_measures_as_the_base_model(tuned):
    _, pad, data = tuned
    fresh, _ = attach_lora(load_model(resolve_model(CONFIG.model), torch.float32, "cpu"), CONFIG)  # B starts at 0
    got = metrics.probe_measures(fresh.eval(), data.probe[:6], 3, pad, "cpu")
    assert got["kl"] < 1e-7 and got["probe_improvement"] == 0.0 and got["probe_improvement_se"] == 0.0


def test_standard_error_needs_two_conversations():
    mean, se = metrics.ratio_mean_se(torch.tensor([6.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64))
    assert mean == 2.0 and math.isnan(se)
