"""Processes that end without garbage-collecting the training stack they imported.

When a Python process exits, CPython clears every module and runs the cyclic garbage collector over every object
still alive. With torch, transformers, TRL and Ray imported that is about 500,000 objects, and the teardown costs a
CLI or a Ray trial worker 1.5-2 CPU-seconds after its last line, every time (measured in benchmarks/RESULTS.md).
None of that work is needed: the process's memory goes back to the operating system as a whole. So at exit the live
objects are frozen (`gc.freeze`) into the permanent generation, which those collections skip. Exit handlers (Ray's
shutdown, trackers' flushes, temporary directories) run as before and objects still freed by reference counting as
before; only reference cycles left at exit go to the operating system instead of to the collector, whose finalizers
Python never promised to run at exit anyway.
"""

from __future__ import annotations

import atexit
import functools
import gc


@functools.cache
def skip_collection_at_exit() -> None:
    """Freeze this process's objects when it exits (registered once per process)."""
    atexit.register(gc.freeze)
