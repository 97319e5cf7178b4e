"""tune_lfm's command lines as the tests run them: offline, without tracker settings from the caller's shell."""

import os
import subprocess
import sys

ENV = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
ENV.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RAY_DEDUP_LOGS="0")


def run_module(module, *args, timeout=900, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, **kwargs)
