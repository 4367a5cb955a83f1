"""A training run's checkpoints: save (failures recorded, never fatal mid-run), restore of the
newest complete and readable step (older ones as fallback), cleanup of interrupted saves.

The items of a step are named in `qwen3_jax.checkpoint`. `RunCheckpoints` wraps one orbax
`CheckpointManager` (async or not):
  * `save` writes a step; a failure (disk full, storage error; with async checkpoints it shows up
    at the next save or at `wait`) is printed as one line and kept in `failures`, so the loop goes
    on training and exits non-zero at the end naming the steps that were not saved.
  * `restore_latest` validates the newest step (every item present, data position parseable,
    arrays readable) and falls back to older ones, printing one line per skipped step with the
    reason; a skipped step is moved to `<workdir>/skipped_checkpoints/` (kept, never deleted), so
    the run can write that step again.
  * `clean_unfinished` removes the saves that never committed: `*.orbax-checkpoint-tmp-*` folders
    on a local disk, step folders without `commit_success.txt` on a bucket (orbax decides which).

Every path goes through qwen3_jax.storage, so the run folder may be local or `gs://`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src.path import temporary_paths

from data_pipeline.data_state import DataRestore, DataSave, DataStateHandler
from qwen3_jax import checkpoint as ckpt
from qwen3_jax import hosts, storage
from qwen3_jax.config import ModelConfig
from qwen3_jax.errors import TrainingError
from qwen3_jax.train import faults, spike_guard
from qwen3_jax.train.step import TrainState

REQUIRED = (ckpt.PARAMS, ckpt.OPT_STATE, ckpt.TRAIN_STATE, ckpt.DATA, ckpt.MODEL_CONFIG, ckpt.META)
COMMIT_FILE = "commit_success.txt"  # orbax's completion marker of a step on an object store


def _one_line(e: BaseException, limit: int = 240) -> str:
    """The root cause of `e` (orbax wraps TensorStore's errors) on one line."""
    seen = []
    while e is not None and len(seen) < 8:
        seen.append(e)
        e = e.__cause__ or e.__context__
    e = next((c for c in reversed(seen) if str(c).strip()), seen[0])
    text = " ".join(str(e).split()).split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"


class _NoOrbaxErrors(logging.Filter):
    """Orbax logs a failed (async) save with its traceback, also from its background threads; the
    failure reaches us as an exception and is reported in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _abandoned_read(exc: BaseException | None, tb, obj=None) -> bool:
    """True for the echo of a failed orbax restore: when one array read fails, orbax closes its event
    loop while the other reads are still in flight in TensorStore; as those finish they hit the
    closed loop ('Event loop is closed') or leave an exception never retrieved. The failure itself
    has already been reported in one line."""
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    code = getattr(obj, "cr_code", None)
    return any("orbax" in f for f in frames) or (code is not None and "orbax" in code.co_filename)


class _NoAbandonedReads(logging.Filter):
    """asyncio's 'exception was never retrieved' for the abandoned reads (orbax is the only asyncio
    user in a training process; TensorStore's own futures carry no Python traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "asyncio" and "never retrieved" in str(record.msg))


def _quiet_abandoned_reads() -> Callable[[], None]:
    """Drops the asynchronous echoes of a failed restore (they arrive from TensorStore threads as
    tracebacks, possibly before the failure reaches us, whose reason is printed in one line). Only
    those; every other report is kept. Returns `undo`, for when the restore succeeded."""
    previous = sys.unraisablehook

    def hook(u):
        if not _abandoned_read(u.exc_value, u.exc_traceback, u.object):
            previous(u)

    log_filter = _NoAbandonedReads()
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(log_filter)

    def undo() -> None:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous
        logging.getLogger("asyncio").removeFilter(log_filter)

    return undo


def counters(state: TrainState) -> dict:
    """The train_state item: the step, the non-finite count and the MoE balancing state (counts, routing
    bias). Checkpoints written before Dec 2026 also hold `rng` and `nonfinite_in_a_row` (never read:
    the one streak of skipped steps lives in the guard); restoring leaves them out."""
    out = {"step": state.step, "nonfinite_total": state.nonfinite_total}
    if state.moe:
        out["moe"] = state.moe
    return out


def clean_unfinished(root: epath.Path) -> list[str]:
    """Removes the saves that never committed (as orbax recognises them: a temporary folder name
    locally, no commit file on a bucket); returns their names."""
    if not root.is_dir():
        return []
    unfinished = asyncio.run(temporary_paths.all_temporary_paths(root))
    gone = []
    for tmp in sorted((t.get() for t in unfinished), key=str):
        storage.remove_tree(tmp)
        print(f"removed {tmp} (a checkpoint save interrupted before its commit)", flush=True)
        gone.append(tmp.name)
    return gone


def _problem(step_dir: epath.Path) -> str | None:
    """Why a committed step folder cannot be resumed from (cheap checks), or None."""
    missing = [i for i in REQUIRED if not (step_dir / i).is_dir()]
    if missing:
        return f"missing {', '.join(missing)}"
    for f in sorted((step_dir / ckpt.DATA).glob("*.json")):
        try:
            json.loads(f.read_text())
        except (OSError, ValueError) as e:
            return f"data position {f.name} unreadable ({_one_line(e, 80)})"
    return None


class RunCheckpoints:
    def __init__(self, root: epath.Path, *, keep_last: int | None, keep_every: int | None, enable_async: bool):
        self.root = root
        self.mgr = ckpt.manager(root, max_to_keep=keep_last, keep_period=keep_every, enable_async=enable_async)
        absl_logger = logging.getLogger("absl")  # for the process: orbax's threads may log after close()
        if not any(isinstance(f, _NoOrbaxErrors) for f in absl_logger.filters):
            absl_logger.addFilter(_NoOrbaxErrors())
        self.failures: list[tuple[int, str]] = []
        self._pending: int | None = None  # an async save not yet known to have committed

    # --- saving ------------------------------------------------------------------------
    def save(self, step: int, state: TrainState, data_pos, cfg: ModelConfig, meta: dict) -> None:
        self.wait()
        try:
            self.mgr.save(step, args=ocp.args.Composite(**{
                ckpt.PARAMS: ocp.args.StandardSave(state.params),
                ckpt.OPT_STATE: ocp.args.StandardSave(state.opt_state),
                ckpt.TRAIN_STATE: ocp.args.StandardSave(counters(state)),
                ckpt.GUARD: ocp.args.StandardSave(state.guard),
                ckpt.DATA: DataSave(data_pos),  # one small JSON file per data shard
                ckpt.MODEL_CONFIG: ocp.args.JsonSave(cfg.to_dict()),
                ckpt.META: ocp.args.JsonSave({"step": step, **meta}),
            }), force=True)
            self._pending = step
        except Exception as e:  # noqa: BLE001 - any storage failure: report, keep training
            self._failed(step, e)

    def wait(self) -> None:
        """Waits for an async save to commit; a failed commit is recorded like a failed save."""
        try:
            self.mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._failed(self._pending if self._pending is not None else -1, e)
        self._pending = None

    def _failed(self, step: int, e: BaseException) -> None:
        self.failures.append((step, _one_line(e)))
        print(f"WARNING: checkpoint save at step {step} failed ({_one_line(e)}); the last complete checkpoint "
              f"is step {self.latest()}; training goes on and the run will exit non-zero", file=sys.stderr,
              flush=True)

    def latest(self) -> int | None:
        self.mgr.reload()
        return self.mgr.latest_step()

    def steps(self) -> list[int]:
        self.mgr.reload()
        return sorted(self.mgr.all_steps())

    def failure_message(self) -> str | None:
        if not self.failures:
            return None
        steps = ", ".join(str(s) for s, _ in self.failures)
        return (f"checkpoint save failed at step(s) {steps} ({self.failures[0][1]}); the last complete checkpoint "
                f"is step {self.latest()} in {self.root}. Fix the storage (free space) and rerun the same command "
                f"to resume from it")

    def close(self) -> None:
        """Waits for the last save and closes the manager; never raises (failures are recorded)."""
        self.wait()
        try:
            self.mgr.close()
        except Exception as e:  # noqa: BLE001 - e.g. a full disk while orbax cleans up
            print(f"WARNING: closing the checkpoint manager failed ({_one_line(e)})", file=sys.stderr, flush=True)

    # --- restoring ---------------------------------------------------------------------
    def restore(self, step: int, abstract: TrainState, window: int) -> TrainState:
        """Step `step` onto `abstract`'s shardings, read item by item without cross-process
        barriers (`ckpt.read_item`): the caller makes the hosts agree on the outcome."""
        faults.check_readable(step)
        read = lambda item, tree: ckpt.read_item(self.root, step, item, ocp.args.StandardRestore(tree))  # noqa: E731
        wanted = counters(abstract)  # partial: older checkpoints hold two more counters
        t = ckpt.read_item(self.root, step, ckpt.TRAIN_STATE, ocp.args.PyTreeRestore(
            wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted), partial_restore=True))
        return TrainState(params=read(ckpt.PARAMS, abstract.params), opt_state=read(ckpt.OPT_STATE, abstract.opt_state),
                          step=t["step"], nonfinite_total=t["nonfinite_total"], moe=t.get("moe", {}),
                          guard=self._restore_guard(step, abstract.guard, window))

    def _restore_guard(self, step: int, abstract_guard, window: int):
        """The spike guard's window; an empty one for checkpoints without it or another window size."""
        why = "written before the guard existed"
        if (self.root / str(step) / ckpt.GUARD).is_dir():
            try:
                return ckpt.read_item(self.root, step, ckpt.GUARD, ocp.args.StandardRestore(abstract_guard))
            except Exception as e:  # noqa: BLE001 - e.g. train.spike_window changed
                why = f"not restorable onto train.spike_window={window}: {_one_line(e, 80)}"
        print(f"checkpoint step {step}: spike guard starts with an empty window ({why})", flush=True)
        return jax.device_put(spike_guard.init_guard(window), jax.tree.map(lambda a: a.sharding, abstract_guard))

    def restore_data(self, step: int, data_it, on_mismatch: str, remake: Callable[[int], Any]):
        """The data iterator at the checkpoint's position; see `TrainConfig.data_state_mismatch`.
        Each host restores its own data shards; if any host cannot, all take the same decision."""
        error = None
        try:
            DataStateHandler().restore(self.root / str(step) / ckpt.DATA, DataRestore(data_it))
        except (ValueError, KeyError, FileNotFoundError) as e:
            error = str(e)
        failed = hosts.failed_processes(error is None)
        if not failed:
            return data_it
        error = error or f"not restorable on process(es) {', '.join(map(str, failed))}"
        if on_mismatch != "restart":
            raise TrainingError(f"the data position saved at step {step} does not fit this data pipeline ({error}). "
                                f"If the data, batch size or make_dataset.data_shards changed on purpose, set "
                                f"train.data_state_mismatch='restart' to continue with freshly shuffled data")
        print(f"WARNING: data position of step {step} not restorable ({error}); continuing with data reshuffled "
              f"(seed offset {step})", file=sys.stderr, flush=True)
        return remake(step)

    def restore_latest(self, abstract: TrainState, window: int, check: Callable[[ModelConfig, str], None],
                       below: int | None = None) -> tuple[int, TrainState] | None:
        """(step, state) of the newest complete, readable step (< `below` when given); None when
        there is no checkpoint. Unusable newer steps are reported and moved aside. `check` raises
        TrainingError for a checkpoint of another architecture (a configuration error, no fallback)."""
        steps = hosts.broadcast_ints([s for s in reversed(self.steps()) if below is None or s < below])
        bad: list[tuple[int, str]] = []
        for step in steps:
            problem = _problem(self.root / str(step))
            if problem is None:
                try:
                    saved_cfg = ckpt.read_model_config(self.root, step)
                except Exception as e:  # noqa: BLE001
                    problem = f"model_config unreadable ({_one_line(e, 120)})"
                else:
                    check(saved_cfg, f"checkpoint {self.root / str(step)}")
            if problem is None:
                undo_quiet = _quiet_abandoned_reads()
                try:
                    state = self.restore(step, abstract, window)
                except Exception as e:  # noqa: BLE001 - truncated/removed array files, corrupt metadata
                    problem = f"unreadable ({_one_line(e)})"  # its echoes stay quiet for the run
                else:
                    undo_quiet()
            failed = hosts.failed_processes(problem is None)  # a step any host cannot read is skipped by all
            if failed and problem is None:
                problem = f"unreadable on process(es) {', '.join(map(str, failed))}"
            if problem is not None:
                print(f"WARNING: skipping checkpoint step {step} in {self.root}: {problem}", file=sys.stderr,
                      flush=True)
                bad.append((step, problem))
                continue
            for s, _ in bad:
                self.move_aside(s, "skipped on resume")
            return step, state
        if bad:
            raise TrainingError(f"no readable checkpoint in {self.root} (steps {', '.join(str(s) for s, _ in bad)}: "
                                f"{bad[0][1]}). Move the folder away to start from scratch, or restore a copy")
        return None

    def move_aside(self, step: int, why: str) -> None:
        """Moves step `step` out of the manager's folder (kept, so the run can write that step again);
        process 0 moves it, the others wait for it. On a bucket the objects are copied and the
        originals deleted, the commit file first: an interrupted move leaves an unfinished step
        (cleaned at the next start) and a whole copy."""
        self.wait()
        if jax.process_index() == 0:
            dest = self.root.parent / "skipped_checkpoints" / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
            storage.move_tree(self.root / str(step), dest, last=COMMIT_FILE)
            print(f"moved checkpoint step {step} to {dest} ({why})", flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"moved checkpoint step {step} aside")
        storage.forget_listings(self.root)
        self.mgr.reload()


def params_from(path: str, cfg: ModelConfig, abstract_params, check: Callable[[ModelConfig, str], None]) -> Any:
    """Parameters of another run's latest checkpoint (stage handoff), onto this run's shardings."""
    root, step = ckpt.checkpoint_root(path)
    step = step if step is not None else ckpt.latest_step(root)
    prev = ckpt.read_model_config(root, step)
    check(prev, f"init_from checkpoint {root}/{step}")
    with ckpt.manager(root, create=False) as mgr:
        params = mgr.restore(step, args=ocp.args.Composite(**{
            ckpt.PARAMS: ocp.args.StandardRestore(abstract_params)}))[ckpt.PARAMS]
    print(f"initialised parameters from {root}/{step} ({prev.name}, rope_theta {prev.rope_theta:g} -> "
          f"{cfg.rope_theta:g})", flush=True)
    return params
