"""Fault injection for drills and tests: make chosen trials fail the way real ones do, without touching configs.

`TUNE_LFM_FAULTS="<trial_id>:<kind>,..."` in the environment of the Ray workers (kinds: `raise`, `oom`, `nan`). Kept
out of sweep YAML on purpose: nothing a config says is executed, and a production sweep cannot carry a fault by mistake.
A fault fires on a trial's first attempt only, so retries show recovery.
"""

from __future__ import annotations

import os

KINDS = ("raise", "oom", "nan")


def injected_fault(trial_id: str) -> str | None:
    for item in os.environ.get("TUNE_LFM_FAULTS", "").split(","):
        target, _, kind = item.strip().partition(":")
        if target == trial_id and kind in KINDS:
            return kind
    return None


def fire(kind: str, attempt: int) -> dict | None:
    """Raise for `raise` / `oom` on the first attempt; for `nan` return config changes that make the loss non-finite."""
    if attempt > 1:
        return None
    if kind == "raise":
        raise RuntimeError("injected fault: trial raised")
    if kind == "oom":
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected fault)")
    return {"learning_rate": float("inf")}
