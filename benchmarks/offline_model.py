"""Put a randomly initialised copy of a model into a scratch Hugging Face cache under its hub id.

The GPU machine cannot reach the hub, yet `python -m tune_lfm.search study --scale full` loads
`LiquidAI/LFM2.5-230M` by id. With `HF_HUB_CACHE=<dir> HF_HUB_OFFLINE=1` and the copy written here, the study runs
unchanged at the real model's size and speed: the architecture comes from tune_lfm's shipped config, the weights are
random, and the tokenizer is tiny-lfm2's (4,096 of the 65,536 ids in use), so only timings mean anything.
`--cache-dir` is required and must not be the default Hugging Face cache, so a real download is never shadowed.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def save_random_model(hub_id: str, directory: Path, dtype_name: str = "bfloat16") -> Path:
    """Write `hub_id`'s architecture with random weights, tiny-lfm2's tokenizer and a note saying so into `directory`."""
    import torch
    from transformers import AutoModelForCausalLM

    from tune_lfm.models import EMBEDDED_DIR, load_model_config, resolve_model

    config = load_model_config(resolve_model(hub_id))
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype_name))
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(EMBEDDED_DIR / name, directory / name)
    (directory / "RANDOM_WEIGHTS.txt").write_text(f"{hub_id} built from its config with random weights by "
                                                  "tune_lfm benchmarks/offline_model.py; timings only.\n")
    return directory


def write_random_model(hub_id: str, cache_dir: Path, dtype_name: str = "bfloat16") -> Path:
    """The snapshot directory that now holds config, random weights and tokenizer for `hub_id`."""
    from huggingface_hub import constants

    if cache_dir.resolve() == Path(constants.default_cache_path).resolve():
        raise SystemExit(f"--cache-dir {cache_dir} is the default Hugging Face cache; use a scratch directory")
    commit = hashlib.sha1(f"tune_lfm random weights {hub_id}".encode()).hexdigest()
    repo = cache_dir / f"models--{hub_id.replace('/', '--')}"
    snapshot = save_random_model(hub_id, repo / "snapshots" / commit, dtype_name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="LiquidAI/LFM2.5-230M", help="hub id with a config tune_lfm knows")
    parser.add_argument("--cache-dir", required=True, type=Path, help="scratch HF_HUB_CACHE to write into")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)
    print(write_random_model(args.model, args.cache_dir, args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
