"""One training run per workdir: a lock object naming its holder (host, pid, start, heartbeat).

`WorkdirLock(workdir)` creates `<workdir>/train.lock` only if it does not exist: O_EXCL on a local
disk, a generation precondition (`ifGenerationMatch=0`) on a bucket (qwen3_jax.storage). A
second run on the same workdir fails with one line naming the holder. Only process 0 of a
multi-process job takes the lock (the other processes share its workdir).

While held, a thread rewrites the lock's `beat` time every `beat_s` seconds. A lock is stale, and
is taken over with a log line, when
  * its holder ran on this host and that pid no longer exists, or
  * its holder ran on another host and its heartbeat is older than `stale_after_s` (a preempted
    TPU VM does not come back; its replacement has another name), or
  * it is unreadable or empty (a crash while taking it).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

from qwen3_jax import storage
from qwen3_jax.errors import TrainingError

LOCK_NAME = "train.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("start", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {started}"


class WorkdirLock:
    def __init__(self, workdir: storage.PathLike, enabled: bool = True, *, beat_s: float = 60.0,
                 stale_after_s: float = 900.0):
        self.path = storage.path(workdir) / LOCK_NAME
        self.enabled = enabled
        self.held = False
        self.nested = False
        self.beat_s, self.stale_after_s = beat_s, stale_after_s
        now = time.time()
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start": now, "beat": now}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "WorkdirLock":
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(3):
            if storage.create_exclusive(self.path, json.dumps(self.me)):
                self.held = True
                self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
                self._thread.start()
                return
            self._take_over_if_stale()  # raises naming a live holder
            if self.nested:
                return
        raise TrainingError(f"could not take the workdir lock {self.path} (it keeps changing); is another run "
                            f"starting on this workdir?")

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            self.me["beat"] = time.time()
            try:
                storage.write_text(self.path, json.dumps(self.me))
            except OSError as e:  # the next beat tries again; a lock is only stale after many
                print(f"WARNING: refreshing the workdir lock {self.path} failed ({e})", file=sys.stderr, flush=True)

    def _take_over_if_stale(self) -> None:
        """Removes a stale lock (logging whose it was); raises naming a live holder."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            holder = json.loads(text)
            pid, host = int(holder["pid"]), str(holder["host"])
        except (ValueError, KeyError, TypeError):
            print(f"WARNING: taking over the unreadable workdir lock {self.path} ({text[:60]!r}), left by a run "
                  f"that died while taking it", file=sys.stderr, flush=True)
            self._remove()
            return
        if host == self.me["host"] and pid == self.me["pid"]:
            self.nested = True  # this process holds it already (launch/train.py, then train()): no-op
            return
        if host == self.me["host"] and not _alive(pid):
            print(f"WARNING: taking over the stale workdir lock {self.path} of {_describe(holder)} "
                  f"(that process no longer exists)", file=sys.stderr, flush=True)
            self._remove()
            return
        age = time.time() - float(holder.get("beat", holder.get("start", 0)))
        if host != self.me["host"] and age > self.stale_after_s:
            print(f"WARNING: taking over the stale workdir lock {self.path} of {_describe(holder)} (no heartbeat "
                  f"for {age:.0f} s > {self.stale_after_s:.0f} s)", file=sys.stderr, flush=True)
            self._remove()
            return
        where = ("" if host == self.me["host"] else
                 f"; its heartbeat is {age:.0f} s old: taken over after {self.stale_after_s:.0f} s without one, or "
                 f"remove {self.path} once that run is known to be dead")
        raise TrainingError(f"workdir {self.path.parent} is in use by another training run ({_describe(holder)}, "
                            f"lock {self.path}){where}")

    def _remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            holder = json.loads(self.path.read_text())
            if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
                self._remove()
        except (OSError, ValueError):
            pass
        self.held = False
