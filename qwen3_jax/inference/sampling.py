"""Next-token choice from fp32 logits: greedy, or temperature → top-k → top-p sampling.

The order is transformers' (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`):
top-p keeps the smallest set of the most likely tokens whose probabilities (after temperature
and top-k) reach `top_p`, and always at least the most likely one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy (argmax; top_k / top_p then do nothing); top_k 0 and top_p 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits_BV, key, cfg: SamplingConfig):
    """Token ids [B] from logits [B,V]; `key` is used only when sampling (one draw per row)."""
    if cfg.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / cfg.temperature
    V = logits_BV.shape[-1]
    if not cfg.top_k and cfg.top_p >= 1:
        return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
    # the candidates, most likely first: the top k (or the whole vocabulary, sorted, for top-p)
    k = min(cfg.top_k, V) if cfg.top_k else V
    vals_BK, ids_BK = jax.lax.top_k(logits_BV, k)
    if cfg.top_p < 1:
        probs_BK = jax.nn.softmax(vals_BK, axis=-1)
        before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK  # mass of the more likely candidates
        vals_BK = jnp.where(before_BK < cfg.top_p, vals_BK, -jnp.inf)
    choice_B = jax.random.categorical(key, vals_BK, axis=-1)
    return jnp.take_along_axis(ids_BK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
