"""Reading a running sweep the way the drills need to: from the result.json Ray's driver writes per trial, one line
per result, each carrying the reporting worker's pid."""

import json
from pathlib import Path


def resume_checkpoint_held(experiment: Path, pids: set[int] | None = None) -> bool:
    """A trial (run by one of `pids`, if given) has a resume checkpoint the driver holds: one with a result after it,
    so Ray keeps it for a retry."""
    for results in Path(experiment).glob("*/result.json"):
        lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        kinds = [line.get("kind") for line in lines]
        if (pids is None or any(line.get("pid") in pids for line in lines)) and "checkpoint" in kinds[:-1]:
            return True
    return False
