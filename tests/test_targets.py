"""The study's target sets give its exact parameter counts on LFM2.5-230M, computed with no weights."""

import json
import subprocess
import sys

import pytest

from tune_lfm.config import ConfigError
from tune_lfm.targets import parse_spec, targets_for_model

LFM = "LiquidAI/LFM2.5-230M"
HUBS = [2, 3, 4, 5]

STUDY_COUNTS = {
    "hub_oproj": 65_536,
    "hub_all": 212_992,
    "in_proj": 262_144,
    "o_proj": 229_376,
    "attn": 475_136,
    "all_linear": 737_280,
    "attn_layers": 344_064,
    "all_linear_ffn": 1_941_504,
}


@pytest.mark.parametrize("name,count", STUDY_COUNTS.items())
def test_study_target_sets_have_exact_counts(name, count):
    assert targets_for_model(LFM, name, HUBS).trainable_params(8) == count


@pytest.mark.parametrize("rank,count", [(2, 53_248), (4, 106_496), (16, 425_984), (32, 851_968)])
def test_hub_all_counts_at_other_ranks(rank, count):
    assert targets_for_model(LFM, "hub_all", HUBS).trainable_params(rank) == count


def test_hub_all_hits_attention_and_conv_projections_of_hubs_only():
    resolved = targets_for_model(LFM, "hub_all", HUBS)
    assert resolved.layers == (2, 3, 4, 5)
    assert "model.layers.2.self_attn.q_proj" in resolved.module_names
    assert "model.layers.3.conv.in_proj" in resolved.module_names
    assert not any("feed_forward" in name or name.endswith("conv.conv") for name in resolved.module_names)


def test_custom_spec_with_layer_types_and_indices():
    spec = {"modules": ["out_proj"], "layers": [0, 1, 2], "layer_types": ["conv"]}
    resolved = targets_for_model(LFM, spec, None)
    assert resolved.module_names == ("model.layers.0.conv.out_proj", "model.layers.1.conv.out_proj")


@pytest.mark.parametrize("bad,message", [
    ("hub_everything", "unknown target set"),
    ({"modules": []}, "non-empty list"),
    ({"modules": ["q_proj"], "layers": "some"}, "'all', 'hub' or a list"),
    ({"modules": ["q_proj"], "color": 1}, "unknown key"),
])
def test_bad_specs_are_named(bad, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(bad)


def test_out_of_range_layers_and_unknown_model_hubs():
    with pytest.raises(ConfigError, match="out of range"):
        targets_for_model(LFM, {"modules": ["q_proj"], "layers": [99]}, None)
    with pytest.raises(ConfigError, match="no Linear module"):
        targets_for_model(LFM, {"modules": ["gate_proj"]}, None)


def test_cli_prints_count_and_modules_offline():
    out = subprocess.run([sys.executable, "-m", "tune_lfm.targets", "--model", LFM, "--targets", "hub_all",
                          "--rank", "8", "--hub-layers", "2,3,4,5", "--json"],
                         capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.stdout)
    assert result["trainable_params"] == 212_992
    assert len(result["modules"]) == 12


def test_layouts_come_from_the_cache_equal_to_the_model_and_keyed_by_its_config(monkeypatch, tmp_path):
    """Planning reads a model's module tree from the layout cache; an entry equals the loaded model's own tree, a
    cached one builds no model, a damaged one is built again, another config is another entry, and a cache that
    cannot be written costs a build, not the plan."""
    from transformers import AutoModelForCausalLM

    from tune_lfm import models
    from tune_lfm.layers import layout_of

    monkeypatch.setenv("TUNE_LFM_CACHE", str(tmp_path))
    built, build = [], models._meta_model
    monkeypatch.setattr(models, "_meta_model", lambda config: built.append(config.num_hidden_layers) or build(config))
    ref = models.resolve_model("tiny-lfm2")
    layout = models.model_layout(ref)
    assert layout == layout_of(AutoModelForCausalLM.from_pretrained(ref.source)) and built == [6]
    assert models.model_layout(ref) == layout and built == [6]
    [entry] = (tmp_path / "layouts").iterdir()
    entry.write_text(entry.read_text()[:40])
    assert models.model_layout(ref) == layout and built == [6, 6]

    config = json.loads((models.EMBEDDED_DIR / "config.json").read_text())
    config.update(num_hidden_layers=4, layer_types=config["layer_types"][:4])
    (tmp_path / "shallow").mkdir()
    (tmp_path / "shallow" / "config.json").write_text(json.dumps(config))
    shallow = models.model_layout(models.resolve_model(str(tmp_path / "shallow")))
    assert len(shallow.layers) == 4 and shallow.layers == layout.layers[:4] and built == [6, 6, 4]
    assert len(list((tmp_path / "layouts").iterdir())) == 2
    monkeypatch.setenv("TUNE_LFM_CACHE", str(entry))  # a file: nothing can be cached under it, planning still works
    assert models.model_layout(ref) == layout and built == [6, 6, 4, 6]
