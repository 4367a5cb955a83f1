"""The checkpoint layout, shared by training and the Hugging Face converter.

A training workdir holds `checkpoints/`, an orbax `CheckpointManager` root with one folder per
step. Each step folder holds these items:

  params        the model parameters as a nested dict (`qwen3_jax.params.nest` of the flat
                '/'-joined paths, e.g. params["stacks"]["0"]["layer"]["attn"]["q_proj"])
  model_config  JSON: `ModelConfig.to_dict()`
  meta          JSON: step, and whatever the writer adds (e.g. the source dtype of an import)
  opt_state, train_state, data   written by training only (optimizer, RNG/counters, data iterator)
  guard         written by training only: the loss-spike guard's window (qwen3_jax.train.spike_guard)

`convert_hf.py import` writes step 0 with params + model_config + meta; export reads params and
model_config from any checkpoint with this layout. Orbax writes each step under a temporary
name and finalises it atomically, so a crash never leaves a half-written step behind.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from qwen3_jax import storage
from qwen3_jax.config import ModelConfig
from qwen3_jax.params import flatten, nest, param_specs

# The items of one checkpoint step (see the module docstring); training writes all seven.
PARAMS, MODEL_CONFIG, META = "params", "model_config", "meta"
OPT_STATE, TRAIN_STATE, DATA, GUARD = "opt_state", "train_state", "data", "guard"


def checkpoint_root(path: str | os.PathLike) -> tuple[epath.Path, int | None]:
    """(manager root, step or None) for a workdir, a checkpoints root, or one step folder (local
    or on a bucket)."""
    path = storage.path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if (path / PARAMS).is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    if any(p.name.isdigit() for p in path.iterdir() if p.is_dir()):
        return path, None
    raise FileNotFoundError(f"{path}: neither a training workdir (with checkpoints/), a checkpoint root "
                            f"(with numbered step folders) nor a step folder (with {PARAMS}/)")


def manager(root: str | os.PathLike, *, max_to_keep: int | None = None, keep_period: int | None = None,
            enable_async: bool = False, create: bool = True) -> ocp.CheckpointManager:
    """An orbax CheckpointManager on `root` (a local folder or `gs://`). Orbax commits a step by
    renaming its temporary folder (local) or by writing `commit_success.txt` last (object stores)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_period, create=create,
                                           enable_async_checkpointing=enable_async)
    return ocp.CheckpointManager(storage.path(root), options=options)


def latest_step(root: str | os.PathLike) -> int | None:
    with manager(root, create=False) as mgr:
        return mgr.latest_step()


def save_params(root: str | os.PathLike, step: int, flat: Mapping[str, Any], cfg: ModelConfig,
                meta: Mapping[str, Any] | None = None) -> None:
    """Writes a params-only checkpoint (what `convert_hf.py import` produces)."""
    with manager(root) as mgr:
        mgr.save(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardSave(nest(flat)),
            MODEL_CONFIG: ocp.args.JsonSave(cfg.to_dict()),
            META: ocp.args.JsonSave({"step": step, **(meta or {})}),
        }))
        mgr.wait_until_finished()


def read_item(root: str | os.PathLike, step: int, item: str, args: ocp.args.CheckpointArgs) -> Any:
    """One item of a step, read by its orbax handler alone. Unlike a manager's restore this holds
    no cross-process barrier, so each host of a job can try a step, and the hosts then agree on
    the outcome (qwen3_jax.train.hosts) instead of one of them waiting for a host that failed."""
    handler = {ocp.args.JsonRestore: ocp.JsonCheckpointHandler,
               ocp.args.PyTreeRestore: ocp.PyTreeCheckpointHandler}.get(type(args), ocp.StandardCheckpointHandler)
    return handler().restore(storage.path(root) / str(step) / item, args=args)


def read_model_config(root: str | os.PathLike, step: int) -> ModelConfig:
    return ModelConfig.from_dict(read_item(root, step, MODEL_CONFIG, ocp.args.JsonRestore()))


def read_meta(root: str | os.PathLike, step: int) -> dict[str, Any]:
    if not (storage.path(root) / str(step) / META).exists():
        return {}
    return dict(read_item(root, step, META, ocp.args.JsonRestore()))


def restore_params_numpy(path: str | os.PathLike, step: int | None = None
                         ) -> tuple[ModelConfig, dict[str, np.ndarray], int, dict[str, Any]]:
    """(config, flat params as host numpy arrays, step, meta) from any checkpoint in our layout."""
    root, found = checkpoint_root(path)
    step = step if step is not None else found if found is not None else latest_step(root)
    if step is None:
        raise FileNotFoundError(f"{root}: no complete checkpoint")
    if not (root / str(step) / PARAMS).is_dir():
        raise FileNotFoundError(f"{root}: no checkpoint for step {step} (with {PARAMS}/)")
    cfg = read_model_config(root, step)
    specs = param_specs(cfg)
    restore_args = nest({k: ocp.RestoreArgs(restore_type=np.ndarray) for k in specs})
    with manager(root, create=False) as mgr:
        tree = mgr.restore(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.PyTreeRestore(restore_args=restore_args)}))[PARAMS]
    return cfg, flatten(tree), step, read_meta(root, step)
