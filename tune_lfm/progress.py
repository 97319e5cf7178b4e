"""A single trial's progress on the console: step, loss, tokens/s and time left, so a long trial is never silent."""

from __future__ import annotations

import sys
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class StepProgress:
    """A trial reporter (see `tune_lfm.trial.Reporter`) that draws one status line.

    On a terminal the line is redrawn in place at every step; into a file or pipe it is written about ten times per
    trial, so logs stay short.
    """

    def __init__(self, total_steps: int, stream: TextIO | None = None):
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.every = max(1, total_steps // 10)

    def __call__(self, step: dict[str, Any]) -> None:
        done = step["step"]
        elapsed = step["elapsed_s"]
        left = elapsed / done * (self.total - done) if done else float("nan")
        line = (f"step {done}/{self.total}  loss {step['loss']:.4f}  {step['tokens_per_s']:,.0f} tok/s  "
                f"elapsed {format_duration(elapsed)}  ETA {format_duration(left) if done else '?'}")
        last = done >= self.total
        if self.live:
            self.stream.write(f"\r{line}" + ("\n" if last else ""))
        elif last or done % self.every == 0:
            self.stream.write(f"{line}\n")
        self.stream.flush()
