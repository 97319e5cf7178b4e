"""The atlas record: computed once per model, weights, probe and settings, cached as JSON, reused by sweeps and trials.

Cache: `$TUNE_LFM_CACHE/atlas` (default `~/.cache/tune_lfm/atlas`), one file per key. The key holds everything that
decides the numbers: atlas version, model name, weights identity (hub revision, or sha256 of local weight files),
probe fingerprint, max_length, batch size, dtype and device type (base and tuned scores must come from the same
arithmetic for an untrained adapter to compare as identical), k and quota.

Beside the JSON, `<name>.base_hidden.safetensors` keeps the base model's final hidden states at the probe's scored
positions, from the atlas's pass with nothing skipped (tiny-lfm2: 6,592 x 128 floats, 3.4 MB). A trial whose probe
batches are the atlas's takes the base side of its probe KL from it instead of running the base model again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from ..cache import cache_folder, key_digest, write_atomically
from ..config import ConfigError
from ..data.probe import PROBE_MAX_LENGTH
from ..heap import keep_freed_memory
from ..metrics import adapter_disabled
from ..layers import layer_types_of
from .ranking import DEFAULT_K, check_selection, combine, default_quota, select_hubs, spearman
from .scores import METHODS, ProbeSums, measure, probe_examples, tokens_digest

ATLAS_VERSION = 2
"""Bump when what is cached changes, so older cached atlases are not reused (2: the base hidden states are kept)."""
DEFAULT_MAX_LENGTH = PROBE_MAX_LENGTH
"""Probe tokens per conversation: the trials' own (`data.probe.PROBE_MAX_LENGTH`)."""
DEFAULT_BATCH_SIZE = 8
"""Probe conversations per forward pass, as the trial's `kl_batch_size` default."""


@dataclass
class Atlas:
    """Per-layer hub scores of one model on the probe set, the selected hubs, and the noise floor of the scores."""

    model: str
    weights: str
    """`revision:<commit>` for a hub model, `sha256:<digest>` of the weight files of a local or embedded one."""
    probe_version: str
    probe_fingerprint: str
    probe_tokens: str
    """sha256 of the tokenized probe: tuned scores are compared only on identical tokens."""
    scored_tokens: int
    max_length: int
    batch_size: int
    dtype: str
    device: str
    layer_types: list[str]
    scores: dict[str, list[float]]
    """Per method (see `scores.METHODS`), one value per decoder layer; higher = more hub-like."""
    combined: list[float]
    """Mean rank-normalised score over methods, in [0, 1] (see `ranking.combine`)."""
    k: int
    quota: dict[str, int]
    hubs: list[int]
    noise: dict[str, dict[str, float]]
    """The scores on the even vs the odd probe conversations: `max_abs_diff` and `spearman` per method and for the
    combined score."""
    probe_loss: float
    """Base model's mean next-token loss on the probe (nats per assistant token)."""
    created: str
    compute_s: float
    version: int = ATLAS_VERSION
    base_hidden: torch.Tensor | None = dataclasses.field(default=None, repr=False, compare=False)
    """The base model's final hidden states at the probe's scored positions, batch after batch in `measure`'s order
    (on the CPU, in the model's dtype); None where the cache holds none. Kept beside the JSON, not in it."""

    def to_dict(self) -> dict:
        record = dataclasses.asdict(dataclasses.replace(self, base_hidden=None))
        del record["base_hidden"]
        return record

    @classmethod
    def from_dict(cls, data: dict) -> Atlas:
        return cls(**data)


@functools.lru_cache(maxsize=None)
def _files_sha256(stamps: tuple[tuple[str, int, int], ...]) -> str:
    """Content hash of files named by (path, size, mtime) stamps; memoised, so a sweep hashes each file once."""
    digest = hashlib.sha256()
    for path, _, _ in stamps:
        digest.update(Path(path).name.encode())
        with open(path, "rb") as data:
            for block in iter(lambda: data.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def _hub_revision(ref) -> str:
    """The commit of the hub snapshot that transformers loads (from the local cache when offline)."""
    from huggingface_hub import hf_hub_download

    from ..models import not_found_error

    try:
        return Path(hf_hub_download(ref.source, "config.json", revision=ref.revision)).parent.name
    except Exception as err:  # offline and not cached, unknown repo, network: all end in the same advice
        raise not_found_error(ref, err) from err


def weights_identity(ref) -> str:
    """What the weights are: the hub revision, or the sha256 of a local directory's weight files."""
    from ..models import ModelNotFoundError

    if ref.kind == "hub":
        return f"revision:{_hub_revision(ref)}"
    files = sorted(p for p in Path(ref.source).iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise ModelNotFoundError(f"model '{ref.name}': {ref.source} holds no weight files (*.safetensors, *.bin)")
    return f"sha256:{_files_sha256(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))}"


def cache_file(key: dict, cache_dir: str | Path | None = None) -> Path:
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", key["model"]).strip("_")[:60]  # readable; the digest is the key
    return Path(cache_dir or cache_folder("atlas")) / f"{label}-{key_digest(key)}.json"


def _base_hidden_file(atlas_file: Path) -> Path:
    return atlas_file.with_name(f"{atlas_file.stem}.base_hidden.safetensors")


def _save(atlas: Atlas, path: Path) -> None:
    """The tensor first: a JSON on disk means its atlas is complete."""
    from safetensors.torch import save_file

    if atlas.base_hidden is not None:
        write_atomically(_base_hidden_file(path), lambda file: save_file({"base_hidden": atlas.base_hidden}, file))
    write_atomically(path, lambda file: file.write_text(json.dumps(atlas.to_dict(), indent=1)))


def _load(path: Path) -> Atlas:
    """The cached atlas, with its base hidden states where they were kept and are readable (else without)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    atlas = Atlas.from_dict(json.loads(path.read_text()))
    try:
        atlas.base_hidden = load_file(_base_hidden_file(path))["base_hidden"]
    except (OSError, KeyError, SafetensorError):  # an atlas cached before they were kept, or a damaged file
        atlas.base_hidden = None
    return atlas


def noise_floor(sums: ProbeSums) -> dict[str, dict[str, float]]:
    """The scores on even vs odd probe conversations: how far two equally valid probes disagree."""
    even = list(range(0, len(sums.tokens), 2))
    odd = list(range(1, len(sums.tokens), 2))
    halves = sums.scores(even), sums.scores(odd)
    noise = {method: {"max_abs_diff": max(abs(a - b) for a, b in zip(halves[0][method], halves[1][method])),
                      "spearman": spearman(halves[0][method], halves[1][method])} for method in METHODS}
    combined = combine(halves[0]), combine(halves[1])
    noise["combined"] = {"max_abs_diff": max(abs(a - b) for a, b in zip(*combined)), "spearman": spearman(*combined)}
    return noise


def model_dtype(model) -> str:
    """The base weights' dtype ('float32', 'bfloat16'); the embedding, since PEFT may keep adapters in float32."""
    return str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")


def model_device(model):
    return model.get_input_embeddings().weight.device


def compute_atlas(model, tokenizer, model_name: str, weights: str, k: int, quota: dict[str, int], max_length: int,
                  batch_size: int, log: Callable[[str], None] | None = None) -> Atlas:
    """Score every layer of `model` (with any adapter disabled) and select its hubs; progress lines go to `log`."""
    from ..data.probe import PROBE_VERSION, probe_fingerprint

    started = time.perf_counter()
    keep_freed_memory()
    layer_types = layer_types_of(model.config)
    examples = probe_examples(tokenizer, max_length)
    base_hidden = []
    with adapter_disabled(model):
        progress = (lambda line: log(f"[tune_lfm] atlas of {model_name}: {line}")) if log else None
        sums = measure(model, examples, batch_size, tokenizer.pad_token_id, model_device(model), progress,
                       on_full_pass=lambda batch, hidden, targets: base_hidden.append(hidden.cpu()))
    scores = sums.scores()
    combined = combine(scores)
    return Atlas(model=model_name, weights=weights, probe_version=PROBE_VERSION, probe_fingerprint=probe_fingerprint(),
                 probe_tokens=tokens_digest(examples), scored_tokens=int(sums.tokens.sum().item()),
                 max_length=max_length, batch_size=batch_size, dtype=model_dtype(model),
                 device=model_device(model).type, layer_types=layer_types, scores=scores, combined=combined, k=k,
                 quota=dict(quota), hubs=select_hubs(combined, layer_types, k, quota), noise=noise_floor(sums),
                 probe_loss=sums.loss(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 compute_s=round(time.perf_counter() - started, 3), base_hidden=torch.cat(base_hidden))


def default_dtype_and_device(device):
    """Where no model is given: the trial's own `precision: auto` rule (bf16 on a bf16-capable GPU, else float32)."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return (torch.bfloat16 if bf16 else torch.float32), device


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def ensure_atlas(model_name: str, *, k: int = DEFAULT_K, quota: dict[str, int] | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = DEFAULT_BATCH_SIZE, model=None,
                 tokenizer=None, device=None, cache_dir: str | Path | None = None, recompute: bool = False,
                 log: Callable[[str], None] = _stderr) -> Atlas:
    """The model's atlas from the cache, or computed now and cached.

    `quota=None` is the model's default (`ranking.default_quota`). Pass an already loaded `model` (a PEFT model is
    scored with its adapter disabled) to avoid loading a second copy; its dtype and device then decide the key.
    Without one, the model is loaded only on a cache miss, in bf16 on a bf16-capable GPU and float32 elsewhere.
    """
    from ..data.probe import probe_fingerprint
    from ..models import load_model, load_model_config, load_tokenizer, resolve_model

    if max_length < 2 or batch_size < 1:
        raise ConfigError(f"atlas: max_length must be >= 2 and batch_size >= 1, got {max_length} and {batch_size}")
    ref = resolve_model(model_name)
    config = model.config if model is not None else load_model_config(ref)
    quota = default_quota(config.model_type, k) if quota is None else dict(quota)
    check_selection(layer_types_of(config), k, quota)
    if model is not None:
        dtype_name, device_type = model_dtype(model), model_device(model).type
    else:
        dtype, torch_device = default_dtype_and_device(device)
        dtype_name, device_type = str(dtype).removeprefix("torch."), torch_device.type
    weights = weights_identity(ref)
    key = {"version": ATLAS_VERSION, "model": ref.name, "weights": weights, "probe": probe_fingerprint(),
           "max_length": max_length, "batch_size": batch_size, "dtype": dtype_name, "device": device_type, "k": k,
           "quota": quota}
    path = cache_file(key, cache_dir)
    if path.is_file() and not recompute:
        return _load(path)

    log(f"[tune_lfm] computing the hub atlas of {ref.name} ({dtype_name} on {device_type}) -> {path}")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(ref)
    if model is None:
        model = load_model(ref, dtype, torch_device).eval()
    atlas = compute_atlas(model, tokenizer, ref.name, weights, k, quota, max_length, batch_size, log=log)
    _save(atlas, path)
    log(f"[tune_lfm] atlas of {ref.name}: hubs {atlas.hubs} in {atlas.compute_s:.1f} s")
    return atlas
