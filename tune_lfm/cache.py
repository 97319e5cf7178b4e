"""tune_lfm's on-disk caches: where they live, how an entry is named and how it is written.

Everything that is costly to compute and decided by its inputs is kept under `$TUNE_LFM_CACHE` (default
`~/.cache/tune_lfm`), one folder per kind: `atlas`, `datasets`, `prepared`, `layouts`. An entry's file name holds the
digest of everything that decides its content, so a changed input is a new entry, never a stale one. Entries are
written to a temporary name and renamed, so concurrent trials and drivers never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable


def cache_folder(kind: str) -> Path:
    root = os.environ.get("TUNE_LFM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "tune_lfm") / kind


def key_digest(key: dict[str, Any]) -> str:
    """A short content digest of a cache key (a JSON-able mapping; other values are taken as their str)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a temporary file beside `path`, which then replaces `path` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(partial)
    os.replace(partial, path)
