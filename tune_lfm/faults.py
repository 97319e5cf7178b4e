"""Fault injection for drills and tests: make chosen trials fail the way real ones do, without touching configs.

`TUNE_LFM_FAULTS="<trial_id>:<kind>,..."` in the environment of the Ray workers. Kinds: `raise` and `oom` raise before
training; `nan` makes the loss non-finite; `kill` SIGKILLs the trial's own worker process right after its first step
(a real process death, as when the kernel's OOM killer or a segfault ends it); `fail` raises before
training on every attempt, a trial that cannot succeed. Kept out of sweep YAML on purpose: nothing a config says is
executed, and a production sweep cannot carry a fault by mistake.
Every other fault fires on a trial's first attempt only (the attempt number comes from Tune, see `tune_lfm.runner`),
so retries show recovery.
"""

from __future__ import annotations

import os
import signal

KINDS = ("raise", "oom", "nan", "kill", "fail")


def injected_fault(trial_id: str) -> str | None:
    for item in os.environ.get("TUNE_LFM_FAULTS", "").split(","):
        target, _, kind = item.strip().partition(":")
        if target == trial_id and kind in KINDS:
            return kind
    return None


def fire(kind: str, attempt: int) -> dict | None:
    """Before training: raise for `raise` / `oom` / `fail`, or return config changes that make the loss non-finite
    (`nan`)."""
    if kind == "fail":
        raise RuntimeError(f"injected fault: trial raised on attempt {attempt} (it fails on every attempt)")
    if attempt > 1:
        return None
    if kind == "raise":
        raise RuntimeError("injected fault: trial raised")
    if kind == "oom":
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected fault)")
    if kind == "nan":
        return {"learning_rate": float("inf")}
    return None


def fire_after_step(kind: str, attempt: int) -> None:
    """After a step: `kill` ends this worker process at once, with no cleanup, on the first attempt."""
    if kind == "kill" and attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)
