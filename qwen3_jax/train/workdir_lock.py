"""One training run per workdir: a lock file naming its holder (host, pid, start time).

`WorkdirLock(workdir)` creates `<workdir>/train.lock` atomically (O_CREAT | O_EXCL). A second
run on the same workdir fails with one line naming the holder. A lock whose holder is gone —
same host and the pid no longer exists, or an unreadable/empty file left by a crash mid-write —
is taken over with a log line. A lock held from another host is never taken over: the message
says to remove the file once that run is known to be dead. Only process 0 of a multi-process
job takes the lock (the other processes share its workdir).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from qwen3_jax.train.config import TrainingError

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
    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.path = Path(workdir) / LOCK_NAME
        self.enabled = enabled
        self.held = False
        self.nested = False
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time()}

    def __enter__(self) -> "WorkdirLock":
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()  # raises naming a live holder
                if self.nested:
                    return
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self.held = True
            return
        raise TrainingError(f"could not take the workdir lock {self.path} (it keeps changing); is another run "
                            f"starting on this workdir?")

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
            self.path.unlink(missing_ok=True)
            return
        if host == self.me["host"] and pid == self.me["pid"]:
            self.nested = True  # this process holds it already (launch/train.py, then train()): no-op
            return
        if host == self.me["host"] and not _alive(pid):
            print(f"WARNING: taking over the stale workdir lock {self.path} of {_describe(holder)} "
                  f"(that process no longer exists)", file=sys.stderr, flush=True)
            self.path.unlink(missing_ok=True)
            return
        where = "" if host == self.me["host"] else f"; if that run is dead, remove {self.path}"
        raise TrainingError(f"workdir {self.path.parent} is in use by another training run ({_describe(holder)}, "
                            f"lock {self.path}){where}")

    def release(self) -> None:
        if not self.held:
            return
        try:
            holder = json.loads(self.path.read_text())
            if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.held = False
