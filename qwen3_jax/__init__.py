"""qwen3-jax: pretraining the Qwen3 family in JAX / Flax NNX.

The package's names (`get_config`, `create_model`, `load_hf`, ...) load on first use, so tools
that need only a light module (the data tools use `qwen3_jax.storage`) do not import jax.
"""

import importlib

_EXPORTS = {
    "PRESETS": "qwen3_jax.config", "ModelConfig": "qwen3_jax.config", "RopeScaling": "qwen3_jax.config",
    "get_config": "qwen3_jax.config", "Qwen3": "qwen3_jax.model", "abstract_model": "qwen3_jax.model",
    "create_model": "qwen3_jax.model", "load_hf": "qwen3_jax.hf", "save_hf": "qwen3_jax.hf",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen3_jax' has no attribute {name!r}")

