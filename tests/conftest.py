"""Tests run offline on the CPU: no hub access, the embedded model and data, and a cache of their own."""

import os
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ["TUNE_LFM_CACHE"] = tempfile.mkdtemp(prefix="tune_lfm_test_cache_")


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """The README's main job, `python -m tune_lfm.search datasets` (tiny scale: no GPU here), with MLflow and
    TensorBoard logging on; run once for every test that reads a finished sweep (test_search, test_artifacts).
    Returns the experiment directory and the finished process (its stdout and stderr)."""
    storage = tmp_path_factory.mktemp("quickstart")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
    out = subprocess.run([sys.executable, "-m", "tune_lfm.search", "datasets", "--storage", str(storage), "--name",
                          "exp", "--log", "mlflow", "--log", "tensorboard"], capture_output=True, text=True,
                         timeout=900, env={**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return storage / "exp", out
