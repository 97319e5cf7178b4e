"""tune_lfm's command lines as the tests run them: offline, without tracker settings from the caller's shell."""

import os
import subprocess
import sys

ENV = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "WANDB_"))}
ENV.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RAY_DEDUP_LOGS="0")


def run_module(module, *args, timeout=900, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, **kwargs)


def warnings_on(stderr: str) -> list[str]:
    """The WARNING lines of a quiet console, less Tune's notice that a callback was slow: the console shows its first
    one by design (console.show_first_slow_warning_only), and a busy machine can earn it any run."""
    lines = [line for line in stderr.splitlines() if "WARNING" in line]
    slow = [line for line in lines if "may be a performance bottleneck" in line]
    assert len(slow) <= 1, slow
    return [line for line in lines if line not in slow]
