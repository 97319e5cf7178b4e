"""Hub atlas on the embedded model: deterministic scores, cache reuse, quotas, preservation, and the CLI end to end.

Assertions are about properties (equalities, ranks, thresholds), never about score values, so they hold for any
rebuild of tiny-lfm2's weights.
"""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tune_lfm.atlas import (PRESERVATION_KEYS, Atlas, compare, default_quota, ensure_atlas, parse_quota, preservation,
                            select_hubs, tuned_scores)
from tune_lfm.atlas import __main__ as atlas_cli
from tune_lfm.atlas import store
from tune_lfm.atlas.ranking import combine, jaccard, quota_forced, spearman
from tune_lfm.config import ConfigError
from tune_lfm.models import load_model, load_tokenizer, resolve_model

TINY = resolve_model("tiny-lfm2")
MIXER = ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
"""The probe passes are small; on shared cores a second OpenMP thread mostly spin-waits (about 5 s against 90 s per
atlas measured under load), so this file runs torch on one thread, in process and in its subprocesses."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def with_untrained_lora(model):
    """PEFT's default init leaves LoRA B at zero: the adapter changes nothing until it is trained."""
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=MIXER)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("atlas")


@pytest.fixture(scope="module")
def adapted():
    return with_untrained_lora(load_model(TINY, torch.float32, "cpu"))


@pytest.fixture(scope="module")
def atlas(adapted, tokenizer, cache_dir):
    """Computed from the PEFT model, so with its adapter disabled."""
    return ensure_atlas("tiny-lfm2", model=adapted, tokenizer=tokenizer, cache_dir=cache_dir, log=lambda _: None)


def test_atlas_record_holds_scores_hubs_and_noise_floor(atlas):
    layers = len(atlas.layer_types)
    assert layers == 6 and set(atlas.scores) == {"influence", "ablation"}
    assert all(len(values) == layers and all(map(math.isfinite, values)) for values in atlas.scores.values())
    assert all(0 <= value <= 2 for value in atlas.scores["influence"])  # 1 - cosine
    assert all(0 <= value <= 1 for value in atlas.combined)
    assert set(atlas.noise) == {"influence", "ablation", "combined"}
    assert all(-1 <= v["spearman"] <= 1 and v["max_abs_diff"] >= 0 for v in atlas.noise.values())
    assert atlas.weights.startswith("sha256:") and atlas.probe_version == "v1" and atlas.scored_tokens > 1000
    assert (atlas.dtype, atlas.device, atlas.max_length) == ("float32", "cpu", 1024)
    best = max(range(layers), key=lambda i: atlas.combined[i])
    assert best in atlas.hubs
    assert Atlas.from_dict(json.loads(json.dumps(atlas.to_dict()))) == atlas


def test_cache_is_reused_and_keyed_by_settings_and_weights(atlas, adapted, tokenizer, cache_dir, monkeypatch,
                                                           tmp_path):
    calls = []

    def counting(model, tokenizer, name, weights, k, quota, max_length, batch_size, log=None):
        calls.append(k)
        return dataclasses.replace(atlas, k=k, quota=quota, hubs=select_hubs(atlas.combined, atlas.layer_types, k,
                                                                            quota))

    monkeypatch.setattr(store, "compute_atlas", counting)
    assert ensure_atlas("tiny-lfm2", model=adapted, tokenizer=tokenizer, cache_dir=cache_dir) == atlas
    assert ensure_atlas("tiny-lfm2", device="cpu", cache_dir=cache_dir) == atlas  # found without loading a model
    assert calls == []
    other = ensure_atlas("tiny-lfm2", k=3, model=adapted, tokenizer=tokenizer, cache_dir=cache_dir)
    assert calls == [3] and other.k == 3 and len(other.hubs) == 3
    ensure_atlas("tiny-lfm2", k=3, model=adapted, tokenizer=tokenizer, cache_dir=cache_dir)
    assert calls == [3]
    assert len(list(cache_dir.glob("tiny-lfm2-*.json"))) == 2 and not list(cache_dir.glob("*.tmp"))

    copy = tmp_path / "tiny"
    shutil.copytree(TINY.source, copy)
    assert store.weights_identity(resolve_model(str(copy))) == atlas.weights
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert store.weights_identity(resolve_model(str(copy))) != atlas.weights


def test_quotas_are_honoured():
    types = ["conv", "conv", "full_attention", "conv", "full_attention", "conv"]
    combined = [0.9, 0.8, 0.1, 0.7, 0.2, 0.6]
    assert default_quota("lfm2", 4) == {"conv": 2, "full_attention": 2}
    assert default_quota("llama", 4) == {}
    assert select_hubs(combined, types, 4, {"conv": 2, "full_attention": 2}) == [0, 1, 2, 4]
    assert select_hubs(combined, types, 4, {}) == [0, 1, 3, 5]
    assert select_hubs(combined, types, 3, {"full_attention": 1}) == [0, 1, 4]
    # the quota brought in the two attention layers, whose scores are the lowest: the plot's legend says so
    assert quota_forced(combined, [0, 1, 2, 4], 4) == [2, 4] and quota_forced(combined, [0, 1, 3, 5], 4) == []
    assert parse_quota("conv=3, full_attention=1") == {"conv": 3, "full_attention": 1} and parse_quota("none") == {}
    for k, quota, message in [(4, {"mamba": 1}, "this model has"), (4, {"full_attention": 3}, "only 2"),
                              (2, {"conv": 2, "full_attention": 1}, "more than k=2"), (7, {}, "k must be 1-6")]:
        with pytest.raises(ConfigError, match=message):
            select_hubs(combined, types, k, quota)
    with pytest.raises(ConfigError, match="layer_type=count"):
        parse_quota("conv:2")


def test_default_lfm2_atlas_takes_two_conv_and_two_attention_hubs(atlas):
    kinds = [atlas.layer_types[i] for i in atlas.hubs]
    assert atlas.quota == {"conv": 2, "full_attention": 2}
    assert kinds.count("conv") == 2 and kinds.count("full_attention") == 2


def test_rank_helpers():
    assert spearman([1, 2, 3], [10, 20, 30]) == 1.0 and spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2, 3], [1, math.nan, 3]))
    assert combine({"a": [1.0, 2.0, 3.0], "b": [3.0, 2.0, 1.0]}) == [0.5, 0.5, 0.5]
    assert combine({"a": [0.0, 5.0, 5.0]}) == [0.0, 0.75, 0.75]
    assert jaccard([0, 1], [1, 2]) == pytest.approx(1 / 3)


def test_untrained_adapter_preserves_hubs_perfectly(adapted, atlas, tokenizer):
    result = preservation(adapted, atlas, tokenizer)
    assert tuple(result) == PRESERVATION_KEYS
    assert result["hub_rank_corr"] == 1.0 and result["hub_topk_jaccard"] == 1.0 and result["hub_preserved"] is True
    assert result["hub_layers_tuned"] == atlas.hubs


def test_destructive_adapter_on_a_hub_breaks_preservation(atlas, tokenizer):
    model = with_untrained_lora(load_model(TINY, torch.float32, "cpu"))
    top_hub = max(atlas.hubs, key=lambda i: atlas.combined[i])
    generator = torch.Generator().manual_seed(0)
    broken = [p for name, p in model.named_parameters() if f"layers.{top_hub}." in name and "out_proj.lora_B" in name]
    assert broken
    with torch.no_grad():
        for weight in broken:
            weight.copy_(30 * torch.randn(weight.shape, generator=generator))
    tuned = tuned_scores(model, atlas, tokenizer)
    result = compare(atlas, tuned)
    assert result["hub_preserved"] is False
    assert result["hub_rank_corr"] < 0.9 < atlas.noise["combined"]["spearman"]
    assert tuned["influence"][top_hub] > atlas.scores["influence"][top_hub]  # noise added to its output turns it more
    assert compare(atlas, tuned, min_rank_corr=-1.0, min_topk_jaccard=0.0)["hub_preserved"] is True


def test_preservation_refuses_an_atlas_measured_differently(adapted, atlas, tokenizer):
    with pytest.raises(ValueError, match="bfloat16 on cpu"):
        tuned_scores(adapted, dataclasses.replace(atlas, dtype="bfloat16"), tokenizer)
    with pytest.raises(ValueError, match="tokenizes differently"):
        tuned_scores(adapted, dataclasses.replace(atlas, max_length=32), tokenizer)


def test_diverged_adapter_is_not_preserved(atlas):
    nan_scores = {method: [math.nan] * len(atlas.layer_types) for method in atlas.scores}
    result = compare(atlas, nan_scores)
    assert result["hub_preserved"] is False and math.isnan(result["hub_rank_corr"])
    assert math.isnan(result["hub_topk_jaccard"]) and result["hub_layers_tuned"] == []


def test_cli_rejects_an_impossible_quota(capsys, tmp_path):
    assert atlas_cli.main(["--model", "tiny-lfm2", "--quota", "full_attention=3", "--cache-dir", str(tmp_path)]) == 2
    assert "full_attention=3" in capsys.readouterr().err


def test_cli_end_to_end_writes_json_and_plot_and_reuses_the_cache(adapted, atlas, tmp_path):
    """The CLI computes the atlas in a fresh process: its scores equal the in-process ones (determinism)."""
    adapter, cache, plot = tmp_path / "adapter", tmp_path / "cache", tmp_path / "atlas.png"
    adapted.save_pretrained(adapter)
    first = subprocess.run([sys.executable, "-m", "tune_lfm.atlas", "--model", "tiny-lfm2", "--adapter", str(adapter),
                            "--plot", str(plot), "--cache-dir", str(cache), "--device", "cpu", "--json"],
                           capture_output=True, text=True, timeout=120, env=ONE_THREAD)
    assert first.returncode == 0, first.stderr[-2000:]
    printed = json.loads(first.stdout)
    cached = [json.loads(path.read_text()) for path in cache.glob("*.json")]
    assert len(cached) == 1
    assert cached[0]["scores"] == printed["scores"] == atlas.scores and cached[0]["noise"] == atlas.noise
    assert printed["combined"] == atlas.combined and printed["hubs"] == atlas.hubs
    assert printed["preservation"]["hub_preserved"] is True and printed["preservation"]["hub_rank_corr"] == 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "computing the hub atlas" in first.stderr and "EMBEDDED" in first.stderr

    second = subprocess.run([sys.executable, "-m", "tune_lfm.atlas", "--model", "tiny-lfm2", "--cache-dir", str(cache),
                             "--device", "cpu"],
                            capture_output=True, text=True, timeout=120, env=ONE_THREAD)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "computing" not in second.stderr
    assert f"hubs {printed['hubs']}" in second.stdout and "noise floor" in second.stdout


def test_replayed_ablation_equals_skipping_the_layer_in_a_full_pass(tokenizer):
    """measure() replays the layers before the skipped one; computing every layer with the skipped one's output
    replaced by its input (the definition of ablation) must give the same losses, and no layer stays patched."""
    from tune_lfm import metrics
    from tune_lfm.atlas.scores import measure, probe_examples
    from tune_lfm.layers import decoder_layers

    model = load_model(TINY, torch.float32, "cpu").eval()
    examples = probe_examples(tokenizer, 96)[:3]
    sums = measure(model, examples, 3, tokenizer.pad_token_id, "cpu")
    layers = decoder_layers(model)
    assert not any("forward" in vars(layer) for layer in layers)
    batch = next(metrics.batches(examples, 3, tokenizer.pad_token_id))

    def skip(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    for index in (0, len(layers) // 2, len(layers) - 1):
        handle = layers[index].register_forward_hook(skip, with_kwargs=True)
        try:
            with torch.no_grad():
                hidden, targets = metrics.scored_hidden(model, batch, "cpu")
                nll = -metrics.next_token_log_probs(model, hidden).gather(-1, targets[:, None]).sum()
        finally:
            handle.remove()
        torch.testing.assert_close(sums.skipped_nll[:, index].sum(), nll.double(), rtol=1e-6, atol=1e-6)
