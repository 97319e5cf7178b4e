"""Tests run offline on the CPU: no hub access, the embedded model and data, and a cache of their own.

The suite runs on two pytest-xdist workers (pyproject addopts): the end-to-end tests mostly wait on Ray, subprocesses
and sockets, so one worker leaves a 2-core machine half idle. A file's tests stay on one worker (--dist loadfile), so
its module fixtures (a sweep, a cluster) run once, and the slow files are handed out first (HAND_OUT_ORDER), so no
worker is left with a long file at the end.
"""

import os
import shutil
import tempfile

from tune_lfm.teardown import skip_collection_at_exit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # two workers on two cores: more torch threads only oversubscribe
CACHE = tempfile.mkdtemp(prefix="tune_lfm_test_cache_")  # atlases and prepared data, this process's own
os.environ["TUNE_LFM_CACHE"] = CACHE
skip_collection_at_exit()  # the workers hold the training stack too; they end with the suite


HAND_OUT_ORDER = ("test_quickstart", "test_s3_storage", "test_recovery", "test_artifacts", "test_interrupts",
                  "test_hub_rehearsal", "test_cluster", "test_benchmarks", "test_trial", "test_analysis", "test_atlas",
                  "test_spaces", "test_metrics", "test_lock", "test_validation", "test_packing", "test_memory",
                  "test_search", "test_targets")
"""The order files are handed out in (times from `pytest --durations=0`): the slow ones, which start Ray or train
many trials, lead, and every other file takes a second or two, so the last ones handed out are short and both workers
finish together. The README's job (two trials at a time: both cores) goes to one worker while the other runs the
drills that train one trial at a time and wait on processes and sockets between steps (S3, faults, checkpoints,
interrupts); run beside each other, those drills often left a core idle (benchmarks/RESULTS.md)."""


def pytest_unconfigure(config):
    shutil.rmtree(CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(HAND_OUT_ORDER)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: each file keeps its own order
