"""Trial configs are validated up front with errors that name where, which key and what is allowed."""

import pytest

from tune_lfm.config import ConfigError, TrialConfig, config_from_dict, load_config_file


def test_defaults_follow_the_study():
    config = TrialConfig()
    assert (config.batch_size, config.grad_accum, config.max_length, config.lora_rank) == (4, 4, 1024, 8)
    assert config.resolved_lora_alpha == 16 and config.effective_batch == 16


def test_yaml_numbers_and_ints_for_floats_are_accepted(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("model: tiny-lfm2\nlearning_rate: 1e-4\nmax_steps: 10\nlora_targets: {modules: [out_proj]}\n")
    config = load_config_file(path)
    assert config.learning_rate == 1e-4 and config.lora_targets == {"modules": ["out_proj"]}
    assert config_from_dict({"learning_rate": 1}).learning_rate == 1.0


@pytest.mark.parametrize("values,message", [
    ({"lora_rank": "eight"}, "`lora_rank` must be int"),
    ({"optimizer": "sgd"}, "allowed: adamw, adafactor"),
    ({"max_steps": 0}, "must be > 0"),
    ({"learnig_rate": 1e-4}, "unknown key"),
    ({"packing": "yes"}, "`packing` must be bool"),
])
def test_bad_values_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values, where="my.yaml")


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config_file(path)


def test_every_trial_setting_is_a_flag_named_after_it_with_its_docstring_as_help():
    from tune_lfm.config import FIELD_NAMES, field_docs
    from tune_lfm.trial import _cli_overrides, build_parser

    parser = build_parser()
    flags = {action.dest: action.option_strings for action in parser._actions}
    for name in FIELD_NAMES:
        assert f"--{name.replace('_', '-')}" in flags[name], name
    assert "Optimizer steps" in parser.format_help() and field_docs()["max_steps"] == "Optimizer steps."
    args = parser.parse_args(["--lora-targets", "{modules: [out_proj], layers: [1]}", "--hub-layers", "0,2",
                              "--steps", "7", "--set", "warmup_steps=3", "--set", "max_steps=9"])
    assert _cli_overrides(args) == {"lora_targets": {"modules": ["out_proj"], "layers": [1]}, "hub_layers": [0, 2],
                                    "max_steps": 9, "warmup_steps": 3}  # --set comes last and wins
