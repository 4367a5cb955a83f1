"""Qwen3 mixture-of-experts block: fp32 router, softmax over all experts, top-k, optional
renormalisation, weighted sum of SwiGLU experts. No shared expert. Dropless.

The expert computation has several exact, dropless forms (`ModelConfig.moe_impl`: dense,
ragged_dot, blocked, megablox, or auto = per backend); they live in `qwen3_jax.model.moe_compute`.
Expert parallelism across devices lives in `qwen3_jax.model.moe_ep`.

Called (training), the block returns besides the output additive router statistics per
sequence, enough for every load-balancing-loss scope (sequence, micro-batch, global batch);
`MoE.output_only` (inference) returns the output alone:
  counts   [B,E]  top-k assignments per expert (padding excluded)
  prob_sum [B,E]  sum of router probabilities per expert (padding excluded)
  z_sum    [B]    sum of logsumexp(router logits)² (router z-loss)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax import sharding
from qwen3_jax.config import ModelConfig, remat_keeps
from qwen3_jax.model import moe_compute, moe_ep
from qwen3_jax.model.layers import param


def router_logits(x_BTD, router_DE):
    """Router logits in fp32 [B,T,E]."""
    return jnp.einsum("btd,de->bte", x_BTD.astype(jnp.float32), router_DE.astype(jnp.float32))


def select_experts(logits_BTE, k: int, norm_topk_prob: bool, bias_E=None):
    """Softmax over all experts, top-k, optional renormalisation. Returns probs [B,T,E] (fp32),
    top-k weights [B,T,k] (fp32), ids [B,T,k]. `bias_E` (aux-loss-free balancing) shifts which
    experts are selected, not their weights."""
    probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
    if bias_E is None:
        weights_BTk, ids_BTk = jax.lax.top_k(probs_BTE, k)
    else:
        _, ids_BTk = jax.lax.top_k(probs_BTE + jax.lax.stop_gradient(bias_E).astype(jnp.float32), k)
        weights_BTk = jnp.take_along_axis(probs_BTE, ids_BTk, axis=-1)
    if norm_topk_prob:
        weights_BTk = weights_BTk / jnp.sum(weights_BTk, axis=-1, keepdims=True)
    return probs_BTE, weights_BTk, ids_BTk


def route(x_BTD, router_DE, k: int, norm_topk_prob: bool):
    """Router in fp32. Returns probs [B,T,E] (fp32), top-k weights [B,T,k] (fp32), ids [B,T,k]."""
    return select_experts(router_logits(x_BTD, router_DE), k, norm_topk_prob)


def router_stats(probs_BTE, ids_BTk, token_mask_BT, logits_BTE=None):
    """Additive per-sequence statistics: counts [B,E], prob_sum [B,E] and, with the logits,
    z_sum [B] = Σ_t logsumexp(logits)² (ST-MoE's router z-loss), padding excluded."""
    E = probs_BTE.shape[-1]
    m_BT = token_mask_BT.astype(jnp.float32)
    onehot_BTkE = jax.nn.one_hot(ids_BTk, E, dtype=jnp.float32)
    counts_BE = jnp.einsum("btke,bt->be", onehot_BTkE, m_BT)
    prob_sum_BE = jnp.einsum("bte,bt->be", probs_BTE, m_BT)
    out = {"counts": counts_BE, "prob_sum": prob_sum_BE}
    if logits_BTE is not None:
        out["z_sum"] = jnp.sum(jnp.square(jax.nn.logsumexp(logits_BTE, axis=-1)) * m_BT, axis=-1)
    return out


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, E, F = cfg.d_model, cfg.num_experts, cfg.moe_ffn_dim
        self.router = param(rngs, (D, E), ("embed", None), cfg)
        self.gate = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), cfg)
        self.up = param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), cfg)
        self.down = param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), cfg)
        self.k, self.norm_topk_prob, self.impl = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.moe_impl
        # the part of expert parallelism's worst-case buffer whose gate/up outputs the policy keeps
        self.saved_rows = cfg.moe_saved_rows if remat_keeps(cfg.remat, "moe_wi") else None

    def __call__(self, x_BTD, token_mask_BT, bias_E=None):
        """Output [B,T,D] and the router statistics (training)."""
        logits = router_logits(x_BTD, self.router[...])
        probs, weights, ids = select_experts(logits, self.k, self.norm_topk_prob, bias_E)
        return self.experts(x_BTD, weights, ids), router_stats(probs, ids, token_mask_BT, logits)

    def output_only(self, x_BTD):
        """The output [B,T,D] of `__call__` without the router statistics (inference: the KV-cache
        path, `DecoderLayer.extend`); the same routing and experts."""
        _, weights, ids = route(x_BTD, self.router[...], self.k, self.norm_topk_prob)
        return self.experts(x_BTD, weights, ids)

    def experts(self, x_BTD, weights_BTk, ids_BTk):
        """The chosen experts' SwiGLU outputs, combined: single-device or expert-parallel."""
        B, T, D = x_BTD.shape
        weights = weights_BTk.astype(x_BTD.dtype)
        params = (self.gate[...], self.up[...], self.down[...])
        ep = sharding.expert_parallel()
        if ep is not None:  # experts split over the `expert` mesh axis
            # cast before the shard_map: the weights' all-gather over fsdp and their gradients'
            # reduction then move compute-dtype bytes, as GSPMD does for the dense layers
            params = tuple(p.astype(x_BTD.dtype) for p in params)
            return moe_ep.experts_parallel(x_BTD, weights, ids_BTk, *params, ctx=ep, form=self.impl,
                                           saved=self.saved_rows)
        ctx = sharding.active()  # auto: the backend the step is traced for (AOT: the target's)
        platform = ctx.platform if ctx is not None else jax.default_backend()
        sharded = ctx is not None and ctx.mesh.size > 1
        impl = moe_compute.resolve_impl(self.impl, platform, D, params[0].shape[2], sharded)
        y_ND = moe_compute.experts(x_BTD.reshape(B * T, D), weights.reshape(B * T, -1),
                                   ids_BTk.reshape(B * T, -1), *params, impl)
        return y_ND.reshape(B, T, D)


AUX_LAYER_REDUCE = ("mean", "sum")


def load_balancing_loss(counts_LBE, prob_sum_LBE, tokens_B, num_experts: int, scope: str = "batch",
                        layer_reduce: str = "mean"):
    """Switch-style auxiliary loss, per MoE layer, from router statistics (arXiv 2501.11873).

    counts/prob_sum are [L,B,E] (MoE layers, sequences, experts), tokens_B the non-padding tokens
    per sequence. For each layer l: LBL_l = E · Σ_e f_le · p_le with f_le the share of the scope's
    tokens routed to e (summing to top-k over e) and p_le their mean router probability; then the
    mean (or, as Megatron-LM, the sum) over layers. Balanced routing gives top-k per layer
    (transformers' scale, so `router_aux_loss_coef` means what it does in the HF config; Megatron
    divides by top-k). Taken per layer, a layer that collapses onto one expert costs even when
    another layer collapses onto a different one; transformers' `load_balancing_loss_func` pools
    all layers into one f and p, which does not see that.
      scope="batch":    f and p over all sequences given (the global batch when called on the
                        global statistics, a micro-batch when called per micro-batch).
      scope="sequence": the loss per sequence, averaged over sequences.
    """
    counts = counts_LBE.astype(jnp.float32)
    probs = prob_sum_LBE.astype(jnp.float32)
    if scope == "batch":
        tokens = jnp.maximum(jnp.sum(tokens_B.astype(jnp.float32)), 1.0)
        return balance_loss_from_shares(counts.sum(1) / tokens, probs.sum(1) / tokens, num_experts, layer_reduce)
    if scope == "sequence":
        tokens_1B1 = jnp.maximum(tokens_B.astype(jnp.float32), 1.0)[None, :, None]
        per_seq_B = jax.vmap(lambda f, p: balance_loss_from_shares(f, p, num_experts, layer_reduce), in_axes=1)(
            counts / tokens_1B1, probs / tokens_1B1)
        return jnp.mean(per_seq_B)
    raise ValueError(f"load-balancing scope {scope!r} is not one of 'batch', 'sequence'")


def balance_loss_from_shares(f_LE, p_LE, num_experts: int, layer_reduce: str = "mean"):
    """E · Σ_e f_le · p_le per layer, reduced over layers ("mean" or "sum")."""
    if layer_reduce not in AUX_LAYER_REDUCE:
        raise ValueError(f"aux layer_reduce {layer_reduce!r} is not one of {AUX_LAYER_REDUCE}")
    per_layer_L = num_experts * jnp.sum(f_LE * p_LE, axis=-1)
    return per_layer_L.mean() if layer_reduce == "mean" else per_layer_L.sum()


def router_z_loss(z_sum_LB, tokens):
    """ST-MoE's router z-loss: the mean over MoE layers and tokens of logsumexp(router logits)²,
    from `router_stats`' z_sum; `tokens` = the tokens the mean is over (e.g. the global batch's,
    so per-micro-batch shares add up)."""
    return jnp.sum(z_sum_LB.astype(jnp.float32)) / (z_sum_LB.shape[0] * jnp.maximum(tokens, 1.0))
