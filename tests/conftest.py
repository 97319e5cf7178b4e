"""Tests run offline on the CPU: no hub access, the embedded model and data, and a cache of their own."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ["TUNE_LFM_CACHE"] = tempfile.mkdtemp(prefix="tune_lfm_test_cache_")
