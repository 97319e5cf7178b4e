"""Scratch directories that outlive a killed trial process only until the next trial on that machine starts.

A trial writes its adapter, its trainer's resume checkpoints and a resume checkpoint copied from storage to temporary
directories, which Python removes when the trial ends, but not when its process is killed: a lost node, the kernel's
OOM killer, a job scheduler's SIGKILL. So they are made inside a directory named after this host and process, and the
first scratch directory a process makes removes those of this host's processes that have ended. A process that ends
normally removes its own at exit.
"""

from __future__ import annotations

import atexit
import functools
import glob
import os
import shutil
import socket
import tempfile

PREFIX = "tune_lfm_scratch_"


def _owner_prefix() -> str:
    return os.path.join(tempfile.gettempdir(), f"{PREFIX}{socket.gethostname()}_")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_ended() -> None:
    """Remove the scratch directories of this host's processes that no longer run."""
    for path in glob.glob(f"{glob.escape(_owner_prefix())}*"):
        pid = path.rsplit("_", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@functools.cache
def _process_dir() -> str:
    _remove_ended()
    path = f"{_owner_prefix()}{os.getpid()}"
    os.makedirs(path, exist_ok=True)
    atexit.register(_remove_own, path, os.getpid())
    return path


def _remove_own(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked child that inherited the handler and exits through it
        shutil.rmtree(path, ignore_errors=True)


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary directory (removed on leaving the block) inside this process's scratch directory."""
    return tempfile.TemporaryDirectory(prefix=prefix, dir=_process_dir())


def make_scratch_dir(prefix: str) -> str:
    """A directory inside this process's scratch directory that the caller removes."""
    return tempfile.mkdtemp(prefix=prefix, dir=_process_dir())
