"""Qwen3 mixture-of-experts block: fp32 router, softmax over all experts, top-k, optional
renormalisation, weighted sum of SwiGLU experts. No shared expert. Dropless.

Two single-device expert computations, chosen by `ModelConfig.moe_impl`:
  ragged: sort the (token, slot) assignments by expert and run grouped matmuls
          (`jax.lax.ragged_dot`): compute proportional to top-k. The default.
  dense:  every expert on every token, weighted by the (mostly zero) combine matrix:
          E/k times the FLOPs, but plain einsums — the fastest form for tiny models on CPU.
Both give the same result. Expert parallelism across devices lives in `qwen3_jax.model.moe_ep`.

Besides the output the block returns additive router statistics per sequence, enough for
every load-balancing-loss scope (sequence, micro-batch, global batch):
  counts   [B,E]  top-k assignments per expert (padding excluded)
  prob_sum [B,E]  sum of router probabilities per expert (padding excluded)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax import sharding
from qwen3_jax.config import ModelConfig
from qwen3_jax.model import moe_ep
from qwen3_jax.model.layers import param


def route(x_BTD, router_DE, k: int, norm_topk_prob: bool):
    """Router in fp32. Returns probs [B,T,E] (fp32), top-k weights [B,T,k] (fp32), ids [B,T,k]."""
    logits_BTE = jnp.einsum("btd,de->bte", x_BTD.astype(jnp.float32), router_DE.astype(jnp.float32))
    probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    weights_BTk, ids_BTk = jax.lax.top_k(probs_BTE, k)
    if norm_topk_prob:
        weights_BTk = weights_BTk / jnp.sum(weights_BTk, axis=-1, keepdims=True)
    return probs_BTE, weights_BTk, ids_BTk


def router_stats(probs_BTE, ids_BTk, token_mask_BT):
    E = probs_BTE.shape[-1]
    m_BT = token_mask_BT.astype(jnp.float32)
    onehot_BTkE = jax.nn.one_hot(ids_BTk, E, dtype=jnp.float32)
    counts_BE = jnp.einsum("btke,bt->be", onehot_BTkE, m_BT)
    prob_sum_BE = jnp.einsum("bte,bt->be", probs_BTE, m_BT)
    return {"counts": counts_BE, "prob_sum": prob_sum_BE}


def experts_dense(x_BTD, weights_BTk, ids_BTk, gate_EDF, up_EDF, down_EFD):
    E = gate_EDF.shape[0]
    dt = x_BTD.dtype
    combine_BTE = jnp.einsum("btk,btke->bte", weights_BTk, jax.nn.one_hot(ids_BTk, E, dtype=weights_BTk.dtype))
    g_BTEF = jnp.einsum("btd,edf->btef", x_BTD, gate_EDF.astype(dt))
    u_BTEF = jnp.einsum("btd,edf->btef", x_BTD, up_EDF.astype(dt))
    h_BTEF = jax.nn.silu(g_BTEF) * u_BTEF * combine_BTE.astype(dt)[..., None]
    return jnp.einsum("btef,efd->btd", h_BTEF, down_EFD.astype(dt))


def experts_ragged(x_ND, weights_Nk, ids_Nk, gate_EDF, up_EDF, down_EFD):
    """Grouped matmul over tokens sorted by expert; x is [tokens, D]."""
    N, D = x_ND.shape
    k = ids_Nk.shape[1]
    E = gate_EDF.shape[0]
    dt = x_ND.dtype
    flat_ids = ids_Nk.reshape(-1)  # assignment a = token * k + slot
    order = jnp.argsort(flat_ids, stable=True)
    group_sizes = jnp.bincount(flat_ids, length=E).astype(jnp.int32)
    xs_AD = jnp.take(x_ND, order // k, axis=0)
    g_AF = jax.lax.ragged_dot(xs_AD, gate_EDF.astype(dt), group_sizes)
    u_AF = jax.lax.ragged_dot(xs_AD, up_EDF.astype(dt), group_sizes)
    ys_AD = jax.lax.ragged_dot(jax.nn.silu(g_AF) * u_AF, down_EFD.astype(dt), group_sizes)
    y_NkD = jnp.take(ys_AD, jnp.argsort(order), axis=0).reshape(N, k, D)
    return jnp.einsum("nkd,nk->nd", y_NkD, weights_Nk.astype(dt))


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, E, F = cfg.d_model, cfg.num_experts, cfg.moe_ffn_dim
        self.router = param(rngs, (D, E), ("embed", None), cfg)
        self.gate = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), cfg)
        self.up = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), cfg)
        self.down = param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), cfg)
        self.k, self.norm_topk_prob, self.impl = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.moe_impl

    def __call__(self, x_BTD, token_mask_BT):
        B, T, D = x_BTD.shape
        probs, weights, ids = route(x_BTD, self.router[...], self.k, self.norm_topk_prob)
        weights = weights.astype(x_BTD.dtype)
        params = (self.gate[...], self.up[...], self.down[...])
        ep = sharding.expert_parallel()
        if ep is not None:  # experts split over the `expert` mesh axis
            # cast before the shard_map: the weights' all-gather over fsdp and their gradients'
            # reduction then move compute-dtype bytes, as GSPMD does for the dense layers
            params = tuple(p.astype(x_BTD.dtype) for p in params)
            y_BTD = moe_ep.experts_parallel(x_BTD, weights, ids, *params, ctx=ep, form=self.impl)
        elif self.impl == "dense":
            y_BTD = experts_dense(x_BTD, weights, ids, *params)
        else:
            y_BTD = experts_ragged(x_BTD.reshape(B * T, D), weights.reshape(B * T, -1),
                                   ids.reshape(B * T, -1), *params).reshape(B, T, D)
        return y_BTD, router_stats(probs, ids, token_mask_BT)


def load_balancing_loss(counts_LBE, prob_sum_LBE, tokens_B, num_experts: int, scope: str = "batch"):
    """Switch-style auxiliary loss E * sum_e f_e * p_e from router statistics.

    counts/prob_sum are [L,B,E] (MoE layers, sequences, experts), tokens_B the non-padding
    tokens per sequence. f_e is the share of tokens routed to e (summing to top-k), p_e the mean
    router probability.
      scope="batch":    counts pooled over all sequences and layers, as transformers'
                        `load_balancing_loss_func` (global batch when called on the global
                        statistics, micro-batch when called per micro-batch).
      scope="sequence": the loss per sequence, averaged over sequences.
    """
    counts = counts_LBE.astype(jnp.float32)
    probs = prob_sum_LBE.astype(jnp.float32)
    L = counts.shape[0]
    if scope == "batch":
        rows = L * jnp.sum(tokens_B.astype(jnp.float32))
        f_E, p_E = counts.sum((0, 1)) / rows, probs.sum((0, 1)) / rows
        return num_experts * jnp.sum(f_E * p_E)
    if scope == "sequence":
        rows_B = L * jnp.maximum(tokens_B.astype(jnp.float32), 1.0)
        f_BE, p_BE = counts.sum(0) / rows_B[:, None], probs.sum(0) / rows_B[:, None]
        return num_experts * jnp.mean(jnp.sum(f_BE * p_BE, axis=-1))
    raise ValueError(f"load-balancing scope {scope!r} is not one of 'batch', 'sequence'")
