"""One writer per experiment: a lock file in the experiment directory, held by the driver for the whole run.

The lock (`driver.lock`, JSON) names its holder: host, pid, command, start time and a heartbeat the driver refreshes
every `HEARTBEAT_S` seconds. A second driver on the same experiment is refused with that name and how to proceed.
A lock whose holder is gone is taken over: on the holder's own host when its process no longer exists, anywhere when
its heartbeat is older than `STALE_AFTER_S`.

- Local directories and `file://`: the file is `flock`ed while held, so the kernel frees it the moment the holder
  dies and a takeover cannot race with another one. On a shared file system the locks must work across machines
  (NFSv4, or NFSv3 with lockd; EFS does), as they do for any program that flocks there.
- Object stores (`s3://`, `gs://`, ...) have no exclusive create through pyarrow: a driver writes its lock, waits
  `SETTLE_S` and reads it back; of drivers that start together only the last writer finds its own token and runs.
  Each heartbeat checks the token again. Row writes merge with storage (`tune_lfm.results`), so even then no rows
  are lost.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

import pyarrow.fs as pafs

from .results import StorageError, filesystem

LOCK_NAME = "driver.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0
SETTLE_S = 2.0


class ExperimentLocked(StorageError):
    """Another driver holds the experiment; the message names it and says how to proceed."""


def _now() -> float:
    return time.time()


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _process_started(pid: int) -> float | None:
    """The start time of process `pid` on this host, or None if there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def holder_is_gone(holder: dict[str, Any], stale_after_s: float, now: float | None = None) -> bool:
    """Whether a lock's holder can no longer be writing: its process is gone (same host), or it stopped beating."""
    now = _now() if now is None else now
    if now - float(holder.get("heartbeat", 0)) > stale_after_s:
        return True
    if holder.get("host") == socket.gethostname():
        started = _process_started(int(holder.get("pid", -1)))
        return started is None or abs(started - float(holder.get("pid_started") or started)) > 1  # pid reused
    return False


def describe_holder(holder: dict[str, Any], now: float | None = None) -> str:
    now = _now() if now is None else now
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started {_iso(float(holder.get('started', 0)))}, "
            f"last heartbeat {now - float(holder.get('heartbeat', 0)):.0f} s ago, command: {holder.get('command')}")


def in_use_error(directory: str, holder: dict[str, Any], stale_after_s: float = STALE_AFTER_S) -> ExperimentLocked:
    return ExperimentLocked(
        f"experiment {directory} is in use by another driver ({describe_holder(holder)}). Wait for it to finish, "
        f"stop it (pid {holder.get('pid')} on {holder.get('host')}; it then says how to resume), or choose another "
        f"--name. A lock whose holder is gone (its process ended, or no heartbeat for {stale_after_s:.0f} s) is "
        f"taken over by the next driver; the lock file is {directory}/{LOCK_NAME}.")


def live_holder(directory: str) -> dict[str, Any] | None:
    """The driver that holds `directory`'s lock now, if any (read only; for a clearer refusal before locking)."""
    lock = ExperimentLock(directory, "")
    holder = lock._read()
    return holder if holder and not holder_is_gone(holder, lock.stale_after_s) else None


class ExperimentLock:
    """Held with `with ExperimentLock(dir, command):`; raises ExperimentLocked when another live driver holds it."""

    def __init__(self, experiment_dir: str, command: str, log: Callable[[str], None] = print,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S, settle_s: float = SETTLE_S):
        self.directory = experiment_dir.rstrip("/")
        self.uri = f"{self.directory}/{LOCK_NAME}"
        self.fs, self.path = filesystem(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.log, self.heartbeat_s, self.stale_after_s, self.settle_s = log, heartbeat_s, stale_after_s, settle_s
        now = _now()
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _process_started(os.getpid()),
                       "command": command, "started": now, "heartbeat": now, "token": uuid.uuid4().hex}
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ------------------------------------------------------------ acquire / release

    def __enter__(self) -> ExperimentLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
            self._acquire_local() if self.local else self._acquire_remote()
        except OSError as err:
            raise StorageError(f"cannot take the experiment lock {self.uri}: {err}") from err
        self._beat = threading.Thread(target=self._heartbeat, name="tune_lfm-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            if self.local and self._fd is not None:
                os.unlink(self.path)  # while still flocked: a waiting driver then finds no file, or a new one
                os.close(self._fd)
                self._fd = None
            elif not self.local and (self._read() or {}).get("token") == self.holder["token"]:
                self.fs.delete_file(self.path)
        except OSError as err:
            self.log(f"warning: could not remove the experiment lock {self.uri}: {err}")

    def _refuse(self, holder: dict[str, Any]) -> ExperimentLocked:
        return in_use_error(self.directory, holder, self.stale_after_s)

    def _acquire_local(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_fd(fd)
                os.close(fd)
                raise self._refuse(holder or {"command": "(starting)"}) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the previous holder removed the file between our open and our flock
                os.close(fd)
                continue
            previous = self._read_fd(fd)  # a holder that died: the kernel (or the NFS server) freed its lock
            if previous:
                self.log(f"taking over the experiment lock of a driver that is gone ({describe_holder(previous)})")
            self._fd = fd
            self._write_fd()
            return

    def _acquire_remote(self) -> None:
        previous = self._read()
        if previous and not holder_is_gone(previous, self.stale_after_s):
            raise self._refuse(previous)
        if previous:
            self.log(f"taking over the experiment lock of a driver that is gone ({describe_holder(previous)})")
        self._write_remote()
        time.sleep(self.settle_s)
        current = self._read()
        if (current or {}).get("token") != self.holder["token"]:
            raise self._refuse(current or {"command": "(unknown)"})

    # ------------------------------------------------------------ reading and writing the holder

    def _read_fd(self, fd: int) -> dict[str, Any] | None:
        os.lseek(fd, 0, os.SEEK_SET)
        return _parse(os.read(fd, 1 << 16))

    def _write_fd(self) -> None:
        data = json.dumps(self.holder).encode()
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, data)
        os.fsync(self._fd)

    def _read(self) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(self.path) as stream:
                return _parse(stream.read())
        except FileNotFoundError:
            return None
        except OSError as err:
            if "not found" in str(err).lower() or "does not exist" in str(err).lower():
                return None
            raise

    def _write_remote(self) -> None:
        with self.fs.open_output_stream(self.path) as stream:
            stream.write(json.dumps(self.holder).encode())

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.holder["heartbeat"] = _now()
            try:
                if self.local:
                    self._write_fd()
                    continue
                current = self._read()
                if (current or {}).get("token") != self.holder["token"]:
                    self.log(f"warning: another driver took the experiment lock {self.uri}: "
                             f"{describe_holder(current) if current else 'the lock was removed'}")
                    return
                self._write_remote()
            except OSError as err:  # storage hiccup: try again at the next beat
                self.log(f"warning: could not refresh the experiment lock {self.uri}: {err}")


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        holder = json.loads(data.decode() or "null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None
