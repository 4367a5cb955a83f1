"""The KV cache: per layer stack (`ModelConfig.layer_runs()`, the model's scanned stacks) one
pair (k, v) of [L, B, S, K, H] arrays — layers of the stack, batch, cache slots, KV heads (GQA:
the K kv heads, never the N query heads), head dim — in the compute dtype.

Its logical axes (`layers`, `batch`, `seq`, `kv_heads`, `head_dim`) go through the same rules as
the parameters and activations (`qwen3_jax.sharding`): batch over the data axes, kv heads over
`tensor` (replicated where the heads do not divide, as the k/v projections).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from qwen3_jax import sharding
from qwen3_jax.config import ModelConfig
from qwen3_jax.model.attention import CACHE_AXES

CACHE_AXES_L = ("layers",) + CACHE_AXES


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> tuple:
    """`jax.ShapeDtypeStruct`s of the cache: ((k, v) per layer stack)."""
    dtype = jnp.dtype(dtype or cfg.compute_dtype)
    return tuple(
        tuple(jax.ShapeDtypeStruct((n, batch, max_len, cfg.num_kv_heads, cfg.head_dim), dtype) for _ in "kv")
        for _, _, n in cfg.layer_runs())


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> tuple:
    """A zero cache; inside a jitted function under `sharding.use_rules` it is laid out by the rules."""
    return jax.tree.map(lambda s: sharding.constrain(jnp.zeros(s.shape, s.dtype), CACHE_AXES_L),
                        cache_shapes(cfg, batch, max_len, dtype))


def cache_shardings(cfg: ModelConfig, batch: int, max_len: int, mesh, rules=sharding.DEFAULT_RULES) -> tuple:
    return jax.tree.map(lambda s: NamedSharding(mesh, sharding.logical_to_spec(CACHE_AXES_L, rules, mesh, s.shape)),
                        cache_shapes(cfg, batch, max_len))


def cache_bytes(cache) -> int:
    """Bytes held by a cache (or by its `cache_shapes`)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))


def cache_bytes_formula(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> int:
    """2 · layers · B · S · K · H · bytes per element."""
    itemsize = jnp.dtype(dtype or cfg.compute_dtype).itemsize
    return 2 * cfg.num_layers * batch * max_len * cfg.num_kv_heads * cfg.head_dim * itemsize
