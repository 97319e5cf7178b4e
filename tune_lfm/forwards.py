"""Temporary replacement of modules' `forward`, undone exactly, whatever was there before.

The memory probe (TRL's fused LM head) and the hub check (replayed layers) patch `forward` on module instances for
one block of code. Restoring means putting back the previous instance attribute when there was one (accelerate's
device hooks, for one, live there), and otherwise removing ours so the class's `forward` shows through again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator


@contextlib.contextmanager
def restored_forwards(modules: Iterable) -> Iterator[None]:
    """On exit, every module's `forward` is what it was on entry."""
    saved = [(module, vars(module).get("forward")) for module in modules]
    try:
        yield
    finally:
        for module, previous in saved:
            if previous is not None:
                module.forward = previous
            else:
                vars(module).pop("forward", None)
