"""tiny-lfm2, the embedded model: LFM2.5's layout, LFM2's tokens and template, a real base distribution, a few MB."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Lfm2ForCausalLM

import tune_lfm

MODEL_DIR = Path(tune_lfm.__file__).parent / "models" / "tiny_lfm2"
LFM2_SPECIAL_TOKENS = [
    "<|pad|>",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|fim_pre|>",
    "<|fim_mid|>",
    "<|fim_suf|>",
    "<|im_start|>",
    "<|im_end|>",
]
CONVERSATION = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "What does shutil.copytree do?"},
    {"role": "assistant", "content": "It copies a whole directory tree to a new location."},
    {"role": "user", "content": "\n  And if the target exists?"},
    {"role": "assistant", "content": "  It raises FileExistsError unless dirs_exist_ok is true.\n"},
]
# Written for this test, in the style of a standard-library docstring; not part of the pretraining corpus.
HELDOUT_TEXT = (
    "Parse the configuration file at *path* and return a dictionary of its sections.\n\n"
    "If the file does not exist, raise FileNotFoundError. Keys are converted to lower case, and values are "
    "returned as strings unless *convert* is true, in which case integers and floats are converted to the "
    "corresponding type. The optional *encoding* argument is passed to open()."
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True).eval()


@pytest.fixture(scope="module")
def build_info():
    return json.loads((MODEL_DIR / "BUILD_INFO.json").read_text())


def test_config_has_the_lfm25_layer_pattern():
    config = AutoConfig.from_pretrained(MODEL_DIR, local_files_only=True)
    assert config.model_type == "lfm2"
    assert config.layer_types == ["conv", "conv", "full_attention", "conv", "full_attention", "conv"]
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.block_auto_adjust_ff_dim is False
    assert config.tie_word_embeddings is True
    assert config.max_position_embeddings == 2048
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 7, 0)


def test_model_loads_as_transformers_lfm2(model):
    assert type(model) is Lfm2ForCausalLM
    layers = model.model.layers
    assert [i for i, layer in enumerate(layers) if hasattr(layer, "self_attn")] == [2, 4]
    assert [i for i, layer in enumerate(layers) if hasattr(layer, "conv")] == [0, 1, 3, 5]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[0].feed_forward.w1.out_features == model.config.intermediate_size


def test_special_tokens_sit_at_lfm2_ids(tokenizer):
    assert tokenizer.is_fast
    assert tokenizer.convert_ids_to_tokens(list(range(8))) == LFM2_SPECIAL_TOKENS
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 7, 0)
    assert tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).input_ids[0] == 6
    assert tokenizer("hello").input_ids[0] == 1, "plain text starts with bos, as LFM2's tokenizer does"


def test_offsets_cover_the_text(tokenizer):
    text = "Return the value of `x`, or None.\n"
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert encoded.offset_mapping[0][0] == 0 and encoded.offset_mapping[-1][1] == len(text)
    assert tokenizer.decode(encoded.input_ids) == text


def test_chat_template_renders_lfm2_chatml(tokenizer):
    rendered = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert rendered == (
        "<|startoftext|><|im_start|>system\nYou answer in one sentence.<|im_end|>\n"
        "<|im_start|>user\nWhat does shutil.copytree do?<|im_end|>\n"
        "<|im_start|>assistant\nIt copies a whole directory tree to a new location.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|startoftext|><|im_start|>user\nWhat does shutil.copytree do?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_is_prefix_stable(tokenizer):
    """The prompt up to each assistant turn is a string prefix of the conversation including that turn.

    In tokens it is a prefix too unless the reply starts with whitespace: byte-level BPE then joins the newline after
    "assistant" with that whitespace into one token, which straddles the boundary (LFM2's own tokenizer does the same).
    """
    for k, message in enumerate(CONVERSATION):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(CONVERSATION[:k], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(CONVERSATION[: k + 1], tokenize=False)
        assert full.startswith(prompt)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        full_ids = tokenizer(full, add_special_tokens=False).input_ids
        assert (full_ids[: len(prompt_ids)] == prompt_ids) is not message["content"][0].isspace()


def test_system_message_only_first(tokenizer):
    with pytest.raises(Exception, match="system message may only come first"):
        tokenizer.apply_chat_template([CONVERSATION[1], CONVERSATION[0]], tokenize=False)


def _loss(model, ids: list[int]) -> float:
    batch = torch.tensor([ids])
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.item()


def test_base_distribution_is_real(model, tokenizer):
    ids = tokenizer(HELDOUT_TEXT).input_ids
    uniform = math.log(len(tokenizer))
    loss = _loss(model, ids)
    assert loss < uniform - 2.5, f"held-out loss {loss:.2f} is not far below uniform {uniform:.2f}"
    shuffled = [ids[0]] + [ids[i] for i in torch.randperm(len(ids) - 1, generator=torch.Generator().manual_seed(0)) + 1]
    assert _loss(model, shuffled) > loss + 1.0, "the model should use word order, not just token frequencies"


def test_the_base_model_knows_chats_but_not_the_study_rows(model, tokenizer, build_info):
    """Measured now, not read from BUILD_INFO: a chat about a docstring it never saw is well predicted, while the study
    datasets' held-out rows are new to it, so a trial on any of them has something to learn."""
    import hashlib

    from tune_lfm.data.loading import embedded_conversations
    from tune_lfm.data.registry import DATASETS

    def chat_loss(conversation):
        ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"][:256]
        return _loss(model, ids)

    uniform = math.log(len(tokenizer))
    known = chat_loss([{"role": "user", "content": "What does configfile.parse do?"},
                       {"role": "assistant", "content": HELDOUT_TEXT}])
    unseen = sum(chat_loss(embedded_conversations(name, "eval")[0]) for name in DATASETS) / len(DATASETS)
    assert known < uniform - 3.0 and known + 1.0 < unseen < uniform - 0.5, (known, unseen, uniform)
    weights = (MODEL_DIR / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == build_info["files"]["model.safetensors"]["sha256"]
    assert build_info["corpus"]["chat_rows_use"].startswith("tokenizer only")


def test_corpus_covers_every_study_dataset(build_info):
    from tune_lfm.data.registry import DATASETS

    rows = build_info["corpus"]["chat_rows_per_dataset"]
    assert set(rows) == set(DATASETS)
    assert all(count > 0 for count in rows.values())
    assert build_info["corpus"]["chat_part"] == "train"


def test_files_are_small():
    sizes = {path.name: path.stat().st_size for path in MODEL_DIR.iterdir() if path.is_file()}
    expected = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "BUILD_INFO.json"}
    assert expected <= set(sizes)
    assert sum(sizes.values()) <= 10 * 1024 * 1024
