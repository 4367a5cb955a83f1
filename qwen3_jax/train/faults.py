"""Test-only fault injection, switched on by environment variables (tests/test_faults_train.py).

Nothing here runs unless one of these is set:

  QWEN3_FAULT_COMMIT_SLEEP_S=S      sleep S seconds inside every checkpoint commit, after the data
                                    is written into the temporary folder and before it is renamed
                                    to the step folder (with async checkpoints: in orbax's
                                    background thread), printing "[fault] commit of step N: sleeping"
  QWEN3_FAULT_ENOSPC_FROM_STEP=N    the commit of every checkpoint of step >= N fails with
                                    OSError(ENOSPC) as a full disk does, leaving its temporary folder
  QWEN3_FAULT_UNREADABLE=STEP:PROC  process PROC (jax.process_index()) cannot read checkpoint step
                                    STEP (its restore raises OSError, as a lost shard file would);
                                    the other processes read it fine
  QWEN3_FAULT_SCALE_AT=STEP:FACTOR  before running step STEP (once per process), multiply the final
                                    norm's scale by FACTOR (e.g. 1e4: a loss spike; nan: non-finite)
"""

from __future__ import annotations

import asyncio
import errno
import os

import jax
from orbax.checkpoint._src.path import atomicity

COMMIT_SLEEP = "QWEN3_FAULT_COMMIT_SLEEP_S"
ENOSPC_FROM = "QWEN3_FAULT_ENOSPC_FROM_STEP"
SCALE_AT = "QWEN3_FAULT_SCALE_AT"
UNREADABLE = "QWEN3_FAULT_UNREADABLE"

_installed = False


def install() -> None:
    """Wraps orbax's commit of a step folder (the rename of its temporary folder) when a
    checkpoint fault is requested (idempotent)."""
    global _installed
    sleep_s, enospc = os.environ.get(COMMIT_SLEEP), os.environ.get(ENOSPC_FROM)
    if _installed or not (sleep_s or enospc):
        return


    def wrap(original):  # local disks commit by rename, buckets by a commit file
        async def finalize(self, *args, **kwargs):
            name = self._final_path.name
            if name.isdigit():  # a step folder (not an item inside one)
                if sleep_s:
                    print(f"[fault] commit of step {name}: sleeping {sleep_s} s", flush=True)
                    await asyncio.sleep(float(sleep_s))
                if enospc and int(name) >= int(enospc):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._tmp_path))
            return await original(self, *args, **kwargs)
        return finalize

    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        cls.finalize = wrap(cls.finalize)
    _installed = True


def check_readable(step: int) -> None:
    """Raises OSError when QWEN3_FAULT_UNREADABLE names `step` and this process."""
    spec = os.environ.get(UNREADABLE)
    if not spec:
        return
    at, proc = (int(x) for x in spec.split(":"))

    if at == step and proc == jax.process_index():
        print(f"[fault] process {proc}: checkpoint step {step} unreadable", flush=True)
        raise OSError(errno.EIO, f"[fault] step {step} unreadable on process {proc}")


_scaled: set[int] = set()


def perturb(state, step: int):
    """`state` with the QWEN3_FAULT_SCALE_AT perturbation applied when `step` is its step."""
    spec = os.environ.get(SCALE_AT)
    if not spec:
        return state
    at, factor = spec.split(":")
    if int(at) != step or step in _scaled:
        return state
    _scaled.add(step)
    print(f"[fault] step {step}: final norm scale x {factor}", flush=True)
    params = dict(state.params)
    params["final_norm"] = {k: v * float(factor) for k, v in params["final_norm"].items()}
    return state.replace(params=params)
