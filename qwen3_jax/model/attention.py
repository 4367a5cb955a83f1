"""Grouped-query attention with per-head QK-RMSNorm before rotate-half RoPE (Qwen3)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from qwen3_jax import sharding
from qwen3_jax.config import ModelConfig
from qwen3_jax.model.attention_ops import attention
from qwen3_jax.model.layers import RMSNorm, apply_rope, param


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = param(rngs, (D, N, H), ("embed", "heads", "head_dim"), cfg)
        self.k_proj = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
        self.v_proj = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
        self.o_proj = param(rngs, (N, H, D), ("heads", "head_dim", "embed"), cfg)
        self.q_norm = RMSNorm(H, cfg, axis_name="head_dim")
        self.k_norm = RMSNorm(H, cfg, axis_name="head_dim")
        self.impl, self.block, self.fused_bwd = cfg.attention_impl, cfg.attention_block, cfg.splash_fused_bwd

    def __call__(self, x_BTD, cos, sin, segment_ids_BT=None):
        dt = x_BTD.dtype
        q_BTNH = jnp.einsum("btd,dnh->btnh", x_BTD, self.q_proj[...].astype(dt))
        k_BTKH = jnp.einsum("btd,dkh->btkh", x_BTD, self.k_proj[...].astype(dt))
        v_BTKH = jnp.einsum("btd,dkh->btkh", x_BTD, self.v_proj[...].astype(dt))
        q_BTNH = apply_rope(self.q_norm(q_BTNH), cos, sin)
        k_BTKH = apply_rope(self.k_norm(k_BTKH), cos, sin)
        q_BTNH = sharding.constrain(q_BTNH, ("batch", "seq", "heads", "head_dim"))
        k_BTKH = sharding.constrain(k_BTKH, ("batch", "seq", "kv_heads", "head_dim"))
        v_BTKH = sharding.constrain(v_BTKH, ("batch", "seq", "kv_heads", "head_dim"))
        o_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, impl=self.impl, block=self.block,
                           fused_bwd=self.fused_bwd)
        return jnp.einsum("btnh,nhd->btd", o_BTNH, self.o_proj[...].astype(dt))
