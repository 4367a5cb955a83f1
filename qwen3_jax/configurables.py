"""Gin at the edge: the one module that registers the library's configs for the gin files.

The library takes plain dataclasses (`ModelConfig`, `TrainConfig`, `OptimConfig`, ...); this
module gives them the names the stage files bind, and turns parsed gin files into them:

  model_config.preset / .overrides / .<any ModelConfig field>   -> ModelConfig
  train.*  (steps, seq_len, batch_size, micro_batches, mesh, optim, make_data, ...) -> TrainConfig
  make_optimizer.* -> OptimConfig,  lr_schedule.* -> ScheduleConfig,  MeshConfig.* -> MeshConfig
  make_dataset, Mixture, LengthBuckets, DatasetSpec, stage_mixture, long_context_mix: the data

`launch/train.py` and `launch/aot_compile.py` both call `parse_gin` then `run_config`, so the AOT
tool reads exactly the model and settings the training command would.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gin

from data_pipeline import pipeline
from qwen3_jax.config import ModelConfig, get_config
from qwen3_jax.sharding import MeshConfig
from qwen3_jax.train import data
from qwen3_jax.train.config import OptimConfig, ScheduleConfig, TrainConfig, TrainingError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGE_MACROS = ("STEPS", "SEQ_LEN", "BATCH_SIZE", "CHECKPOINT_EVERY", "WORKDIR", "DATA_ROOT")


@gin.configurable
def model_config(preset: str = gin.REQUIRED, overrides: dict[str, Any] | None = None, **fields: Any) -> ModelConfig:
    """A preset with field overrides: `model_config.overrides = {...}` (model files) and single
    fields (`model_config.rope_theta = 1e6` in stage files, `model_config.remat = 'full'`)."""
    kw = {**(overrides or {}), **fields}
    try:
        return get_config(preset, **kw)
    except KeyError as e:
        raise TrainingError(f"model_config.preset: {e.args[0]}") from None
    except TypeError as e:
        raise TrainingError(f"model_config: {e} (ModelConfig has no such field)") from None
    except ValueError as e:
        raise TrainingError(f"model_config: {e}") from None


_train_config = gin.external_configurable(TrainConfig, "train")
gin.external_configurable(OptimConfig, "make_optimizer")
gin.external_configurable(ScheduleConfig, "lr_schedule")
gin.external_configurable(MeshConfig, "MeshConfig")
gin.external_configurable(pipeline.make_dataset, "make_dataset")
gin.external_configurable(pipeline.Mixture, "Mixture")
gin.external_configurable(pipeline.LengthBuckets, "LengthBuckets")
gin.external_configurable(pipeline.DatasetSpec, "DatasetSpec")
gin.external_configurable(data.stage_mixture, "stage_mixture")
gin.external_configurable(data.long_context_mix, "long_context_mix")


def resolve_gin_file(name: str) -> str:
    """A path as given, else the name (with or without .gin) under configs/."""
    p = Path(name)
    if p.exists():
        return str(p)
    for cand in (CONFIGS / name, CONFIGS / f"{name}.gin"):
        if cand.exists():
            return str(cand)
    raise FileNotFoundError(f"gin file {name!r} not found (looked in . and {CONFIGS})")


def parse_gin(files: list[str], bindings: list[str]) -> None:
    """Parses the gin files (later ones and `bindings` win) on a clean slate."""
    gin.clear_config()
    gin.add_config_file_search_path(str(CONFIGS))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # gin logs every include it first tries relative to the cwd
    try:
        gin.parse_config_files_and_bindings([resolve_gin_file(f) for f in files], bindings, finalize_config=False)
    finally:
        root.setLevel(level)


def query(name: str, default: Any = None) -> Any:
    """A bound value (`'%WORKDIR'`, `'train.micro_batches'`), or `default` when unbound."""
    try:
        return gin.query_parameter(name)
    except ValueError:
        return default


def run_config() -> tuple[ModelConfig, TrainConfig]:
    """The model and the run the parsed gin files describe (what launch/train.py trains)."""
    model = model_config()
    try:
        tc = _train_config()
    except TypeError as e:
        raise TrainingError(f"train: {e}") from None
    return model, tc
