"""Where a model comes from: a hub id, a local directory, or `tiny-lfm2`, the model embedded in this package.

A hub id may pin a revision after `@` (`LiquidAI/LFM2.5-230M@<commit>`, a branch or a tag): every file then comes
from that revision, so a sweep reruns on the same weights even after the repository moves on.

LFM2.5-230M's config ships with the package so its architecture (and so every adapter size) is known offline; its
weights still come from the hub or the local Hugging Face cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_folder, key_digest, write_atomically
from ..config import EMBEDDED_MODEL
from ..layers import Layout, layout_of

PACKAGE_DIR = Path(__file__).parent
EMBEDDED_DIR = PACKAGE_DIR / "tiny_lfm2"
LAYOUT_VERSION = 1
"""Bump when `layers.Layout` changes, so cached layouts of the old form are not read."""
SHIPPED_CONFIGS = {
    "LiquidAI/LFM2.5-230M": PACKAGE_DIR / "lfm2_5_230m",
    "LiquidAI/LFM2.5-230M-Base": PACKAGE_DIR / "lfm2_5_230m",
}


class ModelNotFoundError(RuntimeError):
    """The model could not be found; the message lists where we looked and how to fix it."""


@dataclass(frozen=True)
class ModelRef:
    """A resolved `--model` value: `source` is what transformers loads (a directory or a hub id)."""

    name: str
    source: str
    kind: str  # "embedded" | "local" | "hub"
    revision: str | None = None  # hub revision pinned with `@` (None: the default branch)

    @property
    def embedded(self) -> bool:
        return self.kind == "embedded"


def resolve_model(name: str) -> ModelRef:
    if name == EMBEDDED_MODEL:
        return ModelRef(name, str(EMBEDDED_DIR), "embedded")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"--model {name}: the directory exists but has no config.json")
        return ModelRef(name, str(path.resolve()), "local")
    repo_id, at, revision = name.partition("@")
    if name.startswith((".", "/", "~")) or repo_id.count("/") != 1 or (at and not revision):
        raise ModelNotFoundError(
            f"--model {name}: not a directory, not a hub id of the form owner/name[@revision], and not "
            f"'{EMBEDDED_MODEL}'"
        )
    return ModelRef(name, repo_id, "hub", revision or None)


def not_found_error(ref: ModelRef, err: Exception) -> ModelNotFoundError:
    """The error for a model that could not be loaded: where we looked and the three ways to fix it."""
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    offline = os.environ.get("HF_HUB_OFFLINE", "0")
    return ModelNotFoundError(
        f"Could not load model '{ref.name}'. Looked in: the Hugging Face hub (HF_HUB_OFFLINE={offline}) and the "
        f"local cache {cache}; it is not a local directory nor the embedded '{EMBEDDED_MODEL}'. "
        f"Fix: run once with internet access (or `hf download {ref.source}`), pass --model /path/to/a/model/dir, "
        f"or use --model {EMBEDDED_MODEL} / --scale tiny to run offline. ({type(err).__name__}: {err})"
    )


def load_model_config(ref: ModelRef):
    """The model's transformers config without a network round trip when possible.

    Order: the local directory or Hugging Face cache, then the config shipped for known ids, then the hub.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref.source, revision=ref.revision, local_files_only=True)
    except OSError:
        pass
    shipped = SHIPPED_CONFIGS.get(ref.source)
    if shipped is not None:
        return AutoConfig.from_pretrained(str(shipped))
    try:
        return AutoConfig.from_pretrained(ref.source, revision=ref.revision)
    except OSError as err:
        raise not_found_error(ref, err) from err


def model_layout(ref: ModelRef) -> Layout:
    """The model's decoder layers and Linear modules (`layers.Layout`), from the cache or from its module tree built
    on the meta device (no weights) and cached. The config and the transformers version decide the tree, so they
    key the cache; a planning driver with a cached layout imports no model code."""
    import transformers

    config = load_model_config(ref)
    key = {"version": LAYOUT_VERSION, "config": config.to_dict(), "transformers": transformers.__version__}
    path = cache_folder("layouts") / f"{config.model_type}-{key_digest(key)}.json"
    try:
        return Layout.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):  # not cached yet, or a damaged entry: build it again
        pass
    layout = layout_of(_meta_model(config))
    try:
        write_atomically(path, lambda file: file.write_text(json.dumps(layout.to_dict())))
    except OSError:  # a read-only cache costs the next plan this build again, nothing else
        pass
    return layout


def _meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.source, revision=ref.revision)
    except OSError as err:
        raise not_found_error(ref, err) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelNotFoundError(
            f"model '{ref.name}' has no chat template; tune_lfm trains on chat conversations and needs one"
        )
    return tokenizer


def load_model(ref: ModelRef, dtype, device):
    """Weights onto `device` in `dtype`; a missing model raises ModelNotFoundError naming where we looked."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(ref.source, revision=ref.revision, dtype=dtype)
    except OSError as err:
        raise not_found_error(ref, err) from err
    return model.to(device)
