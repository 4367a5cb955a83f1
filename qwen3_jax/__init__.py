"""qwen3-jax: pretraining the Qwen3 family in JAX / Flax NNX.

The package's names (`get_config`, `create_model`, `load_hf`, ...) load on first use, so tools
that need only a light module (the data tools use `qwen3_jax.storage`) do not import jax.
"""

import importlib

_EXPORTS = {
    "PRESETS": "qwen3_jax.config", "ModelConfig": "qwen3_jax.config", "RopeScaling": "qwen3_jax.config",
    "get_config": "qwen3_jax.config", "Qwen3": "qwen3_jax.model", "abstract_model": "qwen3_jax.model",
    "create_model": "qwen3_jax.model",
}

__all__ = [*_EXPORTS, "load_hf", "save_hf"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen3_jax' has no attribute {name!r}")


def load_hf(path, dtype=None, **overrides):
    from qwen3_jax.hf import load_hf as _load
    return _load(path, dtype=dtype, **overrides)


def save_hf(model, path, tokenizer=None, **kwargs):
    from qwen3_jax.hf import save_hf as _save
    return _save(model, path, tokenizer=tokenizer, **kwargs)
