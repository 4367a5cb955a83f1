"""The MoE balancing objective of a train step: load-balancing loss shares, router z-loss,
aux-loss-free routing bias updates, and the expert-load metrics.

Load balancing (arXiv 2501.11873, the recipe the Qwen3 report follows): per MoE layer l,
LBL_l = E · Σ_e f_le · p_le, then the mean (or sum, Megatron-LM) over layers
(`qwen3_jax.model.moe.load_balancing_loss`). The scope says which tokens f counts:
  global       the whole global batch (all data shards and micro-batches): the Qwen3 choice
  micro_batch  each micro-batch on its own (all data shards), averaged over micro-batches
  sequence     each sequence on its own, averaged
LBL is linear in p and f carries no gradient, so with f fixed the global loss splits exactly into
per-micro-batch shares E·Σ f_le·P^m_le / N (P^m the micro-batch's probability sums, N the global
batch's tokens): the shares sum to the global loss and their gradients to its gradient.
With micro_batches > 1, `aux_global_counts` says where the global f comes from:
  exact          a forward-only routing pass over all micro-batches before the first backward
                 (no LM head, no backward: ~+25% of a step with full remat); equals one big batch
  running        micro-batch m uses the counts of micro-batches 1..m (Megatron-LM's running form):
                 no extra pass; f is exact for the last micro-batch, noisier for the first
  previous_step  every micro-batch uses the previous step's global counts (the train state keeps
                 them); no extra pass; f lags the router by one update (step 0: running)
Within one micro-batch the statistics are global over the data shards already (jit sees the
whole global array).

Aux-loss-free balancing (DeepSeek-V3): a per-layer, per-expert bias added to the router
probabilities for top-k *selection* only (the combine weights stay the softmax's), moved after
every step by `bias_rate` toward balance: b_le += rate · sign(mean_e load_le - load_le). It lives
in the train state and the checkpoint, never in the parameters or the Hugging Face export.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen3_jax.config import ModelConfig
from qwen3_jax.model.moe import balance_loss_from_shares, load_balancing_loss, router_z_loss
from qwen3_jax.params import flatten, model_from_flat


def init_moe_state(cfg: ModelConfig) -> dict:
    """What the balancing objective carries between steps: the last step's global expert counts
    [L,E] and router tokens (for `previous_step`), and the aux-free routing bias [L,E]."""
    if not cfg.is_moe:
        return {}
    L, E = cfg.num_moe_layers, cfg.num_experts
    return {"counts": jnp.zeros((L, E), jnp.float32), "tokens": jnp.zeros((), jnp.float32),
            "bias": jnp.zeros((L, E), jnp.float32)}


def global_router_counts(cfg: ModelConfig, params, mbs: dict, router_bias=None):
    """Expert assignment counts [L,E] and non-padding tokens over the whole (global) batch, from a
    forward-only pass over the micro-batches `mbs` ([n, B/n, T] arrays, as the step splits them)."""
    params = jax.lax.stop_gradient(params)

    def body(acc, mb):
        model = model_from_flat(cfg, flatten(params))
        _, stats = model.hidden(mb["tokens"], mb.get("positions"), mb.get("segment_ids"), router_bias=router_bias)
        return (acc[0] + stats["counts"].sum(1), acc[1] + stats["tokens"].sum().astype(jnp.float32)), None

    zero = (jnp.zeros((cfg.num_moe_layers, cfg.num_experts), jnp.float32), jnp.zeros((), jnp.float32))
    return jax.lax.scan(body, zero, {k: mbs[k] for k in ("tokens", "positions", "segment_ids")})[0]


def aux_share(stats: dict, num_experts: int, *, scope: str, layer_reduce: str, micro_batches: int,
              router_tokens, prior_counts=None, prior_tokens=None, own_weight=0.0):
    """This micro-batch's share of the load-balancing loss (shares sum over micro-batches to the
    step's loss). Global scope: f from (prior_counts + own_weight · this micro-batch's counts) /
    (prior_tokens + own_weight · its tokens), p over `router_tokens` (the global batch's)."""
    if scope != "global":
        s = "sequence" if scope == "sequence" else "batch"
        return load_balancing_loss(stats["counts"], stats["prob_sum"], stats["tokens"], num_experts, scope=s,
                                   layer_reduce=layer_reduce) / micro_batches
    own_LE = stats["counts"].sum(1)
    own_tokens = stats["tokens"].sum().astype(jnp.float32)
    if prior_counts is None:
        f_counts, f_tokens = own_LE, own_tokens
    else:
        f_counts, f_tokens = prior_counts + own_weight * own_LE, prior_tokens + own_weight * own_tokens
    f_LE = jax.lax.stop_gradient(f_counts / jnp.maximum(f_tokens, 1.0))
    p_LE = stats["prob_sum"].sum(1) / jnp.maximum(router_tokens, 1.0)
    return balance_loss_from_shares(f_LE, p_LE, num_experts, layer_reduce)


def z_share(stats: dict, router_tokens):
    """This micro-batch's share of the router z-loss over the global batch's tokens."""
    return router_z_loss(stats["z_sum"], router_tokens)


def update_bias(bias_LE, counts_LE, rate: float):
    """One aux-loss-free bias update: overloaded experts down, underloaded up, by `rate`."""
    load_LE = counts_LE / jnp.maximum(counts_LE.sum(-1, keepdims=True), 1.0)
    return bias_LE + rate * jnp.sign(load_LE.mean(-1, keepdims=True) - load_LE)


def expert_load(counts_LE) -> dict:
    """Per MoE layer: max/min expert share × E (1 = uniform), coefficient of variation, routing
    entropy over experts / log E (1 = uniform), and dead experts (no token this step)."""
    c_LE = counts_LE.astype(jnp.float32)
    f_LE = c_LE / jnp.maximum(c_LE.sum(-1, keepdims=True), 1.0)
    E = c_LE.shape[-1]
    entropy_L = -jnp.sum(jnp.where(f_LE > 0, f_LE * jnp.log(jnp.maximum(f_LE, 1e-30)), 0.0), -1) / jnp.log(E)
    return {"expert_load_max": f_LE.max(-1) * E, "expert_load_min": f_LE.min(-1) * E,
            "expert_load_cv": f_LE.std(-1) / jnp.maximum(f_LE.mean(-1), 1e-9),
            "expert_load_entropy": entropy_L, "expert_dead": jnp.sum(c_LE == 0, -1).astype(jnp.float32),
            "expert_counts": c_LE}
