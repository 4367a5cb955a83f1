"""Hosts that agree: what every process of a multi-controller job must decide the same way.

Process 0 decides and the others follow (`broadcast_*`), or every process reports and all take
the same verdict (`failed_processes`); both are JAX's own collectives
(`jax.experimental.multihost_utils`), so they run over the job's ICI/DCN links on a pod and over
gloo on a CPU cluster. With one process each call returns at once.

Preemption: `PreemptionSync` is JAX's preemption sync point. A SIGTERM (the notice a TPU VM gets
before maintenance) that reaches any one host is handled by JAX's preemption notifier, which
the coordination service spreads to every host; each host asks `reached(counter)` once per step
and all of them see True at the same step, save that step together and stop. A SIGINT on one
host is turned into a SIGTERM to itself, so it takes the same path.
"""

from __future__ import annotations

import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

_STR_BYTES = 1024


def multi() -> bool:
    return jax.process_count() > 1


def broadcast_int(value: int) -> int:
    """Process 0's `value` on every process."""
    if not multi():
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def broadcast_ints(values: list[int]) -> list[int]:
    """Process 0's list of ints on every process."""
    if not multi():
        return list(values)
    n = broadcast_int(len(values))
    buf = np.zeros(max(n, 1), np.int64)
    if jax.process_index() == 0:
        buf[:n] = values
    return [int(v) for v in multihost_utils.broadcast_one_to_all(buf)[:n]]


def broadcast_str(value: str) -> str:
    """Process 0's string (at most 1 KiB of UTF-8) on every process."""
    if not multi():
        return value
    buf = np.zeros(_STR_BYTES, np.uint8)
    if jax.process_index() == 0:
        raw = value.encode()[:_STR_BYTES]
        buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(out).rstrip(b"\0").decode()


def failed_processes(ok: bool) -> list[int]:
    """Every process says whether its part succeeded; returns the indices of those that did not
    (the same list on every process)."""
    if not multi():
        return [] if ok else [0]
    flags = np.asarray(multihost_utils.process_allgather(np.int32(bool(ok))))
    return [i for i, f in enumerate(flags.reshape(-1)) if not f]


def sync(name: str) -> None:
    if multi():
        multihost_utils.sync_global_devices(name)


class PreemptionSync:
    """All hosts stop at the same step when any of them is told to stop (see the module
    docstring). The service's contract: every host calls `reached(n)` once per step with the same
    growing counter; when a notice arrives, the stop point is (the largest counter any host has
    passed) + 1. We pass the data position in batches, which is the step number orbax passes from
    its own `save` (it asks the same service), and `register(start)` before the first step so a
    notice during compilation stops the job at its first step."""

    def __init__(self):
        self.enabled = multi() and bool(jax.config.jax_enable_preemption_service)

    def register(self, counter: int) -> None:
        if self.enabled:
            multihost_utils.reached_preemption_sync_point(counter)

    def reached(self, counter: int) -> bool:
        return self.enabled and multihost_utils.reached_preemption_sync_point(counter)

    @staticmethod
    def forward_sigint() -> None:
        """A SIGINT on this host becomes a preemption notice for the whole job."""
        os.kill(os.getpid(), signal.SIGTERM)
