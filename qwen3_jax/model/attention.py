"""Grouped-query attention with per-head QK-RMSNorm before rotate-half RoPE (Qwen3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qwen3_jax import sharding
from qwen3_jax.config import ModelConfig
from qwen3_jax.model import context_parallel
from qwen3_jax.model.attention_ops import attention, masked_attention, resolve_impl
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
        q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, cos, sin)
        # a context axis: the sequence is in zig-zag order, split over it (model/context_parallel.py)
        cp_attention = context_parallel.context_size() > 1
        o_BTNH = (context_parallel.attention if cp_attention else attention)(
            q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, impl=self.impl, block=self.block, fused_bwd=self.fused_bwd)
        if resolve_impl(self.impl, q_BTNH.shape[1], q_BTNH.dtype) != "splash":  # splash names its own
            o_BTNH = checkpoint_name(o_BTNH, "context")  # output and log-sum-exp (its residuals)
        return checkpoint_name(self.out(o_BTNH), "out_proj")

    def qkv(self, x_BTD, cos, sin):
        """Projected queries [B,T,N,H] and keys, values [B,T,K,H]: QK-norm, then RoPE on q and k."""
        dt = x_BTD.dtype
        q_BTNH = checkpoint_name(jnp.einsum("btd,dnh->btnh", x_BTD, self.q_proj[...].astype(dt)), "qkv_proj")
        k_BTKH = checkpoint_name(jnp.einsum("btd,dkh->btkh", x_BTD, self.k_proj[...].astype(dt)), "qkv_proj")
        v_BTKH = checkpoint_name(jnp.einsum("btd,dkh->btkh", x_BTD, self.v_proj[...].astype(dt)), "qkv_proj")
        q_BTNH = apply_rope(self.q_norm(q_BTNH), cos, sin)
        k_BTKH = apply_rope(self.k_norm(k_BTKH), cos, sin)
        q_BTNH = sharding.constrain(q_BTNH, ("batch", "seq", "heads", "head_dim"))
        k_BTKH = sharding.constrain(k_BTKH, ("batch", "seq", "kv_heads", "head_dim"))
        v_BTKH = sharding.constrain(v_BTKH, ("batch", "seq", "kv_heads", "head_dim"))
        return q_BTNH, k_BTKH, v_BTKH

    def out(self, o_BTNH):
        return jnp.einsum("btnh,nhd->btd", o_BTNH, self.o_proj[...].astype(o_BTNH.dtype))

    def extend(self, x_BTD, cos, sin, k_BSKH, v_BSKH, index, mask_BTS=None, segment_ids_BT=None):
        """Attention for T new tokens whose keys and values go into a KV cache at slots
        `index`..`index`+T-1. The cache holds the K kv heads (GQA: never the N query heads).

        Prefill (`segment_ids_BT` given; the cache is empty and `index` is 0): the new tokens attend
        among themselves through the training kernel (`ModelConfig.attention_impl`). Decode
        (`mask_BTS` [B,T,S] given): each query attends to the cache slots its mask row allows.
        Returns the output [B,T,D] and the updated caches."""
        q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, cos, sin)
        k_BSKH = jax.lax.dynamic_update_slice_in_dim(k_BSKH, k_BTKH.astype(k_BSKH.dtype), index, axis=1)
        v_BSKH = jax.lax.dynamic_update_slice_in_dim(v_BSKH, v_BTKH.astype(v_BSKH.dtype), index, axis=1)
        k_BSKH = sharding.constrain(k_BSKH, CACHE_AXES)
        v_BSKH = sharding.constrain(v_BSKH, CACHE_AXES)
        if segment_ids_BT is not None:
            o_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, impl=self.impl, block=self.block,
                               fused_bwd=self.fused_bwd)
        else:
            o_BTNH = masked_attention(q_BTNH, k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype), mask_BTS)
        return self.out(o_BTNH), k_BSKH, v_BSKH


# Logical axes of one layer's KV cache [B,S,K,H] (the stacked cache adds a leading "layers").
CACHE_AXES = ("batch", "seq", "kv_heads", "head_dim")

