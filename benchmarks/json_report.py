"""The benchmarks' one output format: the report as JSON on stdout, and in `--output` when given."""

from __future__ import annotations

import json
from pathlib import Path


def emit(report: dict, output: str | None) -> None:
    text = json.dumps(report, indent=2, default=float)
    if output:
        Path(output).write_text(text)
    print(text)
