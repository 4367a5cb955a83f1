"""Parameters as a flat dict `'/'-joined path -> array`, and counts from the model's own shapes.

The flat dict is the exchange format between the model, checkpoints and Hugging Face
conversion: `flat_params(model)`, `model_from_flat(cfg, flat)`, `param_specs(cfg)`. The train
state and checkpoints hold the same parameters as a nested dict (`nest` / `flatten`), e.g.
params["stacks"]["0"]["layer"]["attn"]["q_proj"] for the flat key "stacks/0/layer/attn/q_proj".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
from flax import nnx

from qwen3_jax.config import ModelConfig
from qwen3_jax.model import Qwen3, abstract_model


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str | None, ...]


def path_str(path) -> str:
    return "/".join(str(p) for p in path)


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x} (the inverse of `nest`)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def _flat_vars(model: Qwen3):
    _, params, _ = nnx.split(model, nnx.Param, ...)
    return nnx.to_flat_state(params), params


@functools.lru_cache(maxsize=64)
def _specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    flat, _ = _flat_vars(abstract_model(cfg))
    return {path_str(p): ParamSpec(tuple(v.get_value().shape), v.get_value().dtype, tuple(v.get_metadata()["axes"]))
            for p, v in flat}


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Shape, dtype and logical axes of every parameter, from `nnx.eval_shape` (nothing allocated)."""
    return dict(_specs(cfg))


def flat_params(model: Qwen3) -> dict[str, jax.Array]:
    flat, _ = _flat_vars(model)
    return {path_str(p): v.get_value() for p, v in flat}


def model_from_flat(cfg: ModelConfig, flat: Mapping[str, Any]) -> Qwen3:
    """A model whose parameters are the arrays in `flat` (keys and shapes must match exactly)."""
    graphdef, params, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
    specs = _specs(cfg)
    missing, unexpected = sorted(set(specs) - set(flat)), sorted(set(flat) - set(specs))
    if missing or unexpected:
        raise ValueError(f"parameter keys differ from the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for path, var in nnx.to_flat_state(params):
        key = path_str(path)
        value = flat[key]
        if tuple(value.shape) != specs[key].shape:
            raise ValueError(f"parameter {key}: shape {tuple(value.shape)} != model shape {specs[key].shape}")
        var.set_value(jax.numpy.asarray(value))
    return nnx.merge(graphdef, params, rest)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """total, active (touched per token: top-k of the experts), and non-embedding counts."""
    total = active = embedding = 0
    for key, spec in _specs(cfg).items():
        n = math.prod(spec.shape)
        total += n
        if key in ("embed/embedding", "lm_head"):
            embedding += n
        if "experts" in spec.axes:
            active += n * cfg.num_experts_per_tok // cfg.num_experts
        else:
            active += n
    return {"total_params": total, "active_params": active, "non_embedding_params": total - embedding}
