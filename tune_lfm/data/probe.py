"""The fixed, versioned probe set on which every trial's KL divergence from the base model is measured.

The probe is identical for every trial, so a row that fails validation is an error here, never a silent skip: a
shorter probe would change every KL number without saying so. Edit the file only together with a new version.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tune_lfm.data.sources import SOURCE_FORMATS, MalformedRow

PROBE_VERSION = "v1"
PROBE_FILE = Path(__file__).parent / "embedded" / f"probe_{PROBE_VERSION}.jsonl"
PROBE_MAX_LENGTH = 1024
"""Probe tokens per conversation, whatever a trial's own max_length: it cuts no probe conversation (the longest is 307
tokens with tiny-lfm2's tokenizer), so every trial of a model is measured on the same tokens, and on the atlas's."""


def load_probe() -> list[list[dict]]:
    """Every probe conversation, in file order, validated with the ``messages`` adapter."""
    adapt = SOURCE_FORMATS["messages"]
    conversations = []
    with PROBE_FILE.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                conversations.append(adapt(json.loads(line)))
            except (json.JSONDecodeError, MalformedRow) as err:
                raise ValueError(f"probe set {PROBE_FILE}, line {number}: {err}") from err
    if not conversations:
        raise ValueError(f"probe set {PROBE_FILE} holds no conversations")
    return conversations


def probe_fingerprint() -> str:
    """sha256 of the probe file's bytes, recorded with each trial so KL values are known to share a probe."""
    return hashlib.sha256(PROBE_FILE.read_bytes()).hexdigest()
