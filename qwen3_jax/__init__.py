"""qwen3-jax: pretraining the Qwen3 family in JAX / Flax NNX."""

from qwen3_jax.config import PRESETS, ModelConfig, RopeScaling, get_config  # noqa: F401
from qwen3_jax.model import Qwen3, abstract_model, create_model  # noqa: F401


def load_hf(path, dtype=None, **overrides):
    from qwen3_jax.hf import load_hf as _load
    return _load(path, dtype=dtype, **overrides)


def save_hf(model, path, tokenizer=None, **kwargs):
    from qwen3_jax.hf import save_hf as _save
    return _save(model, path, tokenizer=tokenizer, **kwargs)
