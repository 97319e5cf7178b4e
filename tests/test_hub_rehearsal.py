"""`--scale full` against a Hugging Face Hub on 127.0.0.1 (olah serving git repositories built by
scripts/local_hub.py): the datasets sweep streams every study dataset with `datasets` and loads the model with
`from_pretrained` by id, and a second run asks the server for no file it already has."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from local_hub import PARQUET_CONVERSION, TINY_MODEL_ID, build_repos, requests_in, start_hub  # noqa: E402

pytestmark = pytest.mark.slow
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hub")
    commits = build_repos(workdir / "mirrors")
    server, endpoint, log = start_hub(workdir, workdir / "mirrors")
    env = {key: value for key, value in os.environ.items() if key not in OFFLINE_FLAGS}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(workdir / "hf-home"), TUNE_LFM_CACHE=str(workdir / "tune-lfm-cache"))
    yield {"env": env, "log": log, "commits": commits, "workdir": workdir}
    server.terminate()
    server.wait(timeout=30)


def pinned(hub) -> dict[str, str]:
    """The model pinned to its commit, and OpenHermes' parquet conversion pinned by commit (olah cannot route a
    revision containing '/'); every other dataset is read as registered."""
    model = f"{TINY_MODEL_ID}@{hub['commits'][TINY_MODEL_ID]['main']}"
    conversion = hub["commits"]["teknium/OpenHermes-2.5"][PARQUET_CONVERSION]
    return {"model": model, "user_datasets": json.dumps({"openhermes": {"revision": conversion}})}


def test_full_scale_sweep_streams_every_dataset_from_the_hub_and_a_rerun_asks_for_nothing_cached(hub, tmp_path):
    sizes = ["max_steps=2", "num_examples=8", "eval_examples=4", "batch_size=2", "grad_accum=1", "max_length=256"]
    settings = [f"{key}={value}" for key, value in pinned(hub).items()] + sizes
    space = yaml.safe_load((REPO / "search_spaces" / "datasets.yaml").read_text())
    space["resources"] = {"cpus_per_trial": 1}  # the shipped sweep, two trials at a time on a 2-core machine
    (tmp_path / "datasets.yaml").write_text(yaml.safe_dump(space))
    out = subprocess.run([sys.executable, "-m", "tune_lfm.search", tmp_path / "datasets.yaml", "--scale", "full",
                          "--storage", tmp_path, "--name", "hub", *[arg for s in settings for arg in ("--set", s)]],
                         capture_output=True, text=True, timeout=900, env=hub["env"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "scale: FULL" in out.stderr and "EMBEDDED" not in out.stderr + out.stdout
    trials = pd.read_parquet(tmp_path / "hub" / "trials.parquet").set_index("dataset")
    assert len(trials) == 10 and set(trials["status"]) == {"completed"}, trials[["status", "error"]]
    from tune_lfm.data.registry import DATASETS

    for name, spec in DATASETS.items():
        assert trials.loc[name, "data_source_used"] == f"hub:{spec.hub_id}"
        assert 1 <= trials.loc[name, "train_rows"] <= 8  # rows with no assistant token left at 256 tokens are dropped
    first = requests_in(hub["log"])
    paths = [path for _, path, _ in first]
    for spec in DATASETS.values():
        assert any(path.startswith(f"/datasets/{spec.hub_id}/resolve/") for path in paths), spec.hub_id
    assert not any("openhermes2_5.json" in path for path in paths), "the 1 GB JSON array must never be downloaded"
    assert any(path.endswith("/model.safetensors") for path in paths)

    config = tmp_path / "gsm8k.yaml"  # the sweep's gsm8k trial, run again on its own
    config.write_text(json.dumps({"dataset": "gsm8k", "lora_targets": "o_proj", "model": pinned(hub)["model"],
                                  **{key: int(value) for key, value in (s.split("=") for s in sizes)}}))
    rerun = subprocess.run([sys.executable, "-m", "tune_lfm.trial", "--config", config], capture_output=True,
                           text=True, timeout=600, env=hub["env"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["data_source_used"] == "hub:openai/gsm8k"
    again = requests_in(hub["log"])[len(first):]
    assert again, "the second run should still probe what the repository lacks (olah's 404 cannot be remembered)"
    fetched = [path for _, path, status in again if "/resolve/" in path and status != 404]
    assert not fetched, f"the second run asked again for files it has: {fetched[:10]}"
    assert not [path for _, path, _ in again if "/datasets/" in path], "the second run streamed a dataset again"
