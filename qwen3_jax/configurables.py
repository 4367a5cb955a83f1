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

import argparse
import ast
import dataclasses
import inspect
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any

import gin
from gin import config as gin_config

from data_pipeline import pipeline
from qwen3_jax import errors
from qwen3_jax.config import ModelConfig, RopeScaling, get_config
from qwen3_jax.errors import TrainingError
from qwen3_jax.sharding import MeshConfig
from qwen3_jax.train import data
from qwen3_jax.train.config import RENAMED_FIELDS, OptimConfig, ScheduleConfig, TrainConfig

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


def _accepting_old_names(cls, name: str, renamed: dict[str, str]):
    """`cls` for gin under `name`, also taking the old names of renamed fields (warned once, mapped
    to the new name; both at once is an error naming them)."""
    def make(**fields: Any):
        for old, new in renamed.items():
            if old in fields:
                if new in fields:
                    raise TrainingError(f"{name}.{old} and {name}.{new} are both set: {old} is the old name of {new}")
                errors.renamed(name, old, new)
                fields[new] = fields.pop(old)
        return cls(**fields)

    params = list(inspect.signature(cls).parameters.values())
    params += [inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY, default=None) for old in renamed]
    make.__signature__ = inspect.Signature(params)
    make.__name__ = make.__qualname__ = cls.__name__
    make.__doc__ = cls.__doc__
    return make


_train_config = gin.external_configurable(_accepting_old_names(TrainConfig, "train", RENAMED_FIELDS), "train")
gin.external_configurable(OptimConfig, "make_optimizer")
gin.external_configurable(ScheduleConfig, "lr_schedule")
gin.external_configurable(MeshConfig, "MeshConfig")
gin.external_configurable(RopeScaling, "RopeScaling")  # YaRN: model_config.rope_scaling = @RopeScaling()
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
    """Parses the gin files (later ones and `bindings` win) on a clean slate, then checks them:
    every macro set is used and every macro used is set, and values have their field's type."""
    paths = [resolve_gin_file(f) for f in files]
    for b in bindings:
        _check_binding_syntax(b)
    gin.clear_config()
    gin.add_config_file_search_path(str(CONFIGS))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # gin logs every include it first tries relative to the cwd
    try:
        try:
            gin.parse_config_files_and_bindings(paths, bindings, finalize_config=False)
        except SyntaxError as e:
            raise TrainingError(_explain_syntax_error(e)) from None
    finally:
        root.setLevel(level)
    _check_macros(_macro_mentions(paths, bindings))
    _check_types()


def _explain_syntax_error(e: SyntaxError) -> str:
    msg = " ".join(str(e).split())
    token = re.search(r"Failed to parse token '([^']*)' \(([^)]*)\)", msg)
    if token:
        where = token.group(2)
        hint = (f"; a string value needs quotes: '{token.group(1)}'" if token.group(1).isidentifier() else "")
        return f"gin syntax ({where}): cannot read the value {token.group(1)!r}{hint}"
    return f"gin syntax: {msg}"


def _check_binding_syntax(binding: str) -> None:
    """One `--gin_param NAME=VALUE` on its own, so an error names the binding, not 'line 1'."""
    gin.clear_config()
    try:
        gin.parse_config(binding, skip_unknown=True)
    except SyntaxError:
        value = binding.split("=", 1)[1].strip() if "=" in binding else ""
        hint = ""
        if re.fullmatch(r"[\w./:-]+", value or "-") and not _is_literal(value):
            name = binding.split("=", 1)[0].strip()
            hint = f"; strings need quotes inside the shell's: --gin_param {name}=\"'{value}'\""
        raise TrainingError(f"--gin_param {binding!r}: cannot read the value {value!r}{hint}") from None
    finally:
        gin.clear_config()


def _is_literal(text: str) -> bool:
    try:
        ast.literal_eval(text)
        return True
    except (ValueError, SyntaxError):
        return False


def _macro_name(ref) -> str:
    return ref.scoped_selector.split("/")[0]


def _macro_mentions(paths: list[str], bindings: list[str]) -> set[str]:
    """Every `%NAME` written in the files (and the files they include) and the bindings, so a
    macro whose use a later binding overrides (`train.steps=5` over `%STEPS`) still counts."""
    seen, texts, todo = set(), list(bindings), list(paths)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        text = Path(path).read_text()
        texts.append(text)
        for inc in re.findall(r"^\s*include\s+['\"]([^'\"]+)['\"]", text, flags=re.M):
            try:
                todo.append(resolve_gin_file(inc))
            except FileNotFoundError:
                pass  # gin itself has already reported it
    return {m for t in texts for m in re.findall(r"%([A-Za-z_][\w.]*)", t)}


def _check_macros(mentioned: set[str]) -> None:
    """A misspelt macro (`STEPPS=5`) would otherwise be set and silently unused."""
    config = gin_config._CONFIG  # gin has no public listing of bound macros
    defined = {scope for scope, selector in config if selector == "gin.macro"}
    used: dict[str, str] = {"WORKDIR": "launch/train.py"}
    for (scope, selector), params in config.items():
        for param, value in params.items():
            for ref in _references(value):
                if ref.configurable.name == "macro":
                    name = _macro_name(ref)
                    who = scope if selector == "gin.macro" else f"{selector.rsplit('.', 1)[-1]}.{param}"
                    used.setdefault(name, who)
    for name, who in sorted(used.items()):
        if name not in defined:
            raise TrainingError(f"macro %{name} (used by {who}) is never set; the macros that are: "
                                f"{', '.join(sorted(defined))}")
    unused = sorted(defined - set(used) - mentioned)
    if unused:
        raise TrainingError(f"macro {unused[0]} is set but nothing uses it (misspelt?); the macros in use: "
                            f"{', '.join(sorted(used))}")


def _references(value):
    if isinstance(value, gin_config.ConfigurableReference):
        yield value
    elif isinstance(value, (list, tuple, set)):
        for v in value:
            yield from _references(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _references(v)


_TYPED = {"train": TrainConfig, "make_optimizer": OptimConfig, "lr_schedule": ScheduleConfig,
          "MeshConfig": MeshConfig, "model_config": ModelConfig}


def _check_types() -> None:
    """`lr_schedule.peak_lr = 'abc'` fails here, naming the binding, not in optax at step 0."""
    config = gin_config._CONFIG
    for (scope, selector), params in config.items():
        cls = _TYPED.get(selector.rsplit(".", 1)[-1])
        if cls is None:
            continue
        hints = typing.get_type_hints(cls)
        for param, value in params.items():
            items = value.items() if param == "overrides" and isinstance(value, dict) else [(param, value)]
            for field, v in items:
                v = _resolve_macros(v, config)
                if field in hints and not _fits(v, hints[field]):
                    name = f"{scope + '/' if scope else ''}{selector.rsplit('.', 1)[-1]}.{param}"
                    name += f"['{field}']" if field != param else ""
                    raise TrainingError(f"{name} = {v!r}: expected {_type_name(hints[field])}")


def _resolve_macros(value, config, depth: int = 0):
    while isinstance(value, gin_config.ConfigurableReference) and value.configurable.name == "macro" and depth < 20:
        value = config.get((_macro_name(value), "gin.macro"), {}).get("value")
        depth += 1
    return value


def _fits(value, hint) -> bool:
    """Whether a gin value can be a field of this type; references and unknown types pass."""
    if isinstance(value, gin_config.ConfigurableReference) or hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple or hint is tuple:
        return isinstance(value, (tuple, list))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return True


def _type_name(hint) -> str:
    text = getattr(hint, "__name__", None) if typing.get_origin(hint) is None else None
    return text if text else str(hint).replace("typing.", "")


def query(name: str, default: Any = None) -> Any:
    """A bound value (`'%WORKDIR'`, `'train.micro_batches'`), or `default` when unbound."""
    try:
        return gin.query_parameter(name)
    except ValueError:
        return default


def add_gin_flags(parser: argparse.ArgumentParser, files_help: str = "gin file (repeatable; later ones win)") -> None:
    """--gin FILE and --gin_param NAME=VALUE, as every tool that reads the training command's config takes them."""
    parser.add_argument("--gin", action="append", default=[], help=files_help)
    parser.add_argument("--gin_param", "--gin-param", action="append", default=[],
                        help="gin binding NAME=VALUE (repeatable)")


def read_run(files: list[str], bindings: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """`parse_gin` then `run_config`: the model and run the training command describes. Every way
    the files can be wrong (missing, syntax, unknown name, bad value) is a TrainingError naming it."""
    try:
        parse_gin(files, bindings)
        return run_config()
    except TrainingError:
        raise
    except FileNotFoundError as e:
        raise TrainingError(str(e)) from None
    except (ValueError, KeyError, TypeError, SyntaxError) as e:
        raise TrainingError("gin: " + " ".join(str(e).strip().splitlines()[:3])) from None


def run_config() -> tuple[ModelConfig, TrainConfig]:
    """The model and the run the parsed gin files describe (what launch/train.py trains)."""
    model = model_config()
    try:
        tc = _train_config()
    except TypeError as e:
        raise TrainingError(f"train: {e}") from None
    return model, tc
