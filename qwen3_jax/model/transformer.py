"""The Qwen3 decoder: embeddings, stacks of decoder layers under `jax.lax.scan`, final norm, head.

Layers of one kind (dense or MoE) that follow each other form a stack: their parameters carry a
leading `layers` axis and one scan applies them, so a 94-layer model traces one layer. Rematerial-
isation of each layer follows `ModelConfig.remat` (`remat_policy`: full, XLA's dot policies, or
named tensors kept in HBM or offloaded to host memory). remat='auto' is no policy: `train.build`
resolves it by compiling the candidates. A model built outside it with 'auto' runs forward as
any other (remat only acts under differentiation); differentiating it is an error that says so
(`unresolved_auto`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax import sharding
from qwen3_jax.config import REMAT_NAMES, ModelConfig
from qwen3_jax.model.attention import Attention
from qwen3_jax.model.layers import MLP, Embed, RMSNorm, param, rope_cos_sin
from qwen3_jax.model.moe import MoE


def unresolved_auto(prim, *_, **__):
    """The checkpoint policy of remat='auto' outside `train.build`. JAX consults a policy only
    when it differentiates the checkpointed layers (to choose what to save for the backward
    pass), so forward passes never call it: it stands for 'no policy was chosen' and raises."""
    raise ValueError("model_config.remat='auto' reached a differentiated model: 'auto' is resolved by "
                     "qwen3_jax.train.build, which compiles the candidate policies and picks one. Outside build "
                     "set ModelConfig.remat to a policy ('full', 'none', ...: qwen3_jax.config.REMAT_POLICIES)")


def remat_policy(name: str):
    """The `jax.checkpoint` policy of `ModelConfig.remat` (None for 'none': no checkpoint; the
    named tensors each policy keeps: qwen3_jax.config.REMAT_NAMES). Not for 'auto', which
    `train.build` resolves (`LayerStack` checkpoints it with `unresolved_auto`)."""
    if name == "none":
        return None
    if name in REMAT_NAMES:
        saved, offloaded = REMAT_NAMES[name]
        if not offloaded:
            return jax.checkpoint_policies.save_only_these_names(*saved)
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=list(saved), names_which_can_be_offloaded=list(offloaded),
            offload_src="device", offload_dst="pinned_host")
    table = {"full": jax.checkpoint_policies.nothing_saveable, "dots": jax.checkpoint_policies.dots_saveable,
             "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    if name not in table:
        raise ValueError(f"remat policy {name!r} is not one of {('none', *REMAT_NAMES, *table)}"
                         + (" ('auto' is resolved by qwen3_jax.train.build)" if name == "auto" else ""))
    return table[name]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, moe: bool, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.d_model, cfg)
        self.attn = Attention(cfg, rngs)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg)
        self.mlp = MoE(cfg, rngs) if moe else MLP(cfg, rngs)
        self.moe = moe

    def __call__(self, x_BTD, cos, sin, segment_ids_BT, token_mask_BT, router_bias_E=None):
        x_BTD = x_BTD + self.attn(self.input_norm(x_BTD), cos, sin, segment_ids_BT)
        h_BTD = self.post_attn_norm(x_BTD)
        stats = None
        if self.moe:
            y_BTD, stats = self.mlp(h_BTD, token_mask_BT, router_bias_E)
        else:
            y_BTD = self.mlp(h_BTD)
        x_BTD = sharding.constrain(x_BTD + y_BTD, ("batch", "seq", "embed"))
        return x_BTD, stats

    def extend(self, x_BTD, cos, sin, k_BSKH, v_BSKH, index, mask_BTS=None, segment_ids_BT=None):
        """`__call__` for T new tokens against this layer's KV cache (`Attention.extend`), the MoE
        block without router statistics. Returns x [B,T,D] and the updated k, v caches."""
        a_BTD, k_BSKH, v_BSKH = self.attn.extend(self.input_norm(x_BTD), cos, sin, k_BSKH, v_BSKH, index,
                                                 mask_BTS, segment_ids_BT)
        x_BTD = x_BTD + a_BTD
        h_BTD = self.post_attn_norm(x_BTD)
        y_BTD = self.mlp.output_only(h_BTD) if self.moe else self.mlp(h_BTD)
        return sharding.constrain(x_BTD + y_BTD, ("batch", "seq", "embed")), k_BSKH, v_BSKH


class LayerStack(nnx.Module):
    """`count` identical decoder layers with stacked parameters."""

    def __init__(self, cfg: ModelConfig, moe: bool, count: int, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=count)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return DecoderLayer(cfg, moe, r)

        self.layer = make(rngs)
        for _, var in nnx.iter_graph(self.layer):
            if isinstance(var, nnx.Variable) and "axes" in var.get_metadata():
                var.set_metadata("axes", ("layers",) + tuple(var.get_metadata()["axes"]))
        self.count, self.moe = count, moe
        self.remat, self.scan = cfg.remat, cfg.scan_layers

    def __call__(self, x_BTD, cos, sin, segment_ids_BT, token_mask_BT, router_bias_LE=None):
        graphdef, state = nnx.split(self.layer)

        def body(x, per_layer):
            layer_state, bias_E = per_layer
            layer = nnx.merge(graphdef, layer_state)
            x, stats = layer(x, cos, sin, segment_ids_BT, token_mask_BT, bias_E)
            return x, stats

        if self.remat != "none":
            policy = unresolved_auto if self.remat == "auto" else remat_policy(self.remat)
            body = jax.checkpoint(body, policy=policy, prevent_cse=not self.scan)
        if self.scan:
            return jax.lax.scan(body, x_BTD, (state, router_bias_LE))
        stats = []
        for i in range(self.count):
            x_BTD, s = body(x_BTD, jax.tree.map(lambda a: a[i], (state, router_bias_LE)))
            stats.append(s)
        return x_BTD, (None if not self.moe else jax.tree.map(lambda *a: jnp.stack(a), *stats))

    def extend(self, x_BTD, cos, sin, k_LBSKH, v_LBSKH, index, mask_BTS=None, segment_ids_BT=None):
        """`__call__` for T new tokens against this stack's KV cache [layers,B,S,K,H]
        (`DecoderLayer.extend`; no remat). Returns x and the updated k, v caches."""
        graphdef, state = nnx.split(self.layer)

        def body(x, per_layer):
            layer_state, k_BSKH, v_BSKH = per_layer
            layer = nnx.merge(graphdef, layer_state)
            x, k_BSKH, v_BSKH = layer.extend(x, cos, sin, k_BSKH, v_BSKH, index, mask_BTS, segment_ids_BT)
            return x, (k_BSKH, v_BSKH)

        if self.scan:
            x_BTD, (k_LBSKH, v_LBSKH) = jax.lax.scan(body, x_BTD, (state, k_LBSKH, v_LBSKH))
            return x_BTD, k_LBSKH, v_LBSKH
        ks, vs = [], []
        for i in range(self.count):
            x_BTD, (k_BSKH, v_BSKH) = body(x_BTD, jax.tree.map(lambda a: a[i], (state, k_LBSKH, v_LBSKH)))
            ks.append(k_BSKH)
            vs.append(v_BSKH)
        return x_BTD, jnp.stack(ks), jnp.stack(vs)


class Qwen3(nnx.Module):
    """Qwen3 causal LM (dense or MoE).

    `model(tokens)` → logits [B,T,V] (fp32). With `return_stats=True` → (logits, stats) where
    stats holds the MoE router statistics stacked over MoE layers ([L,B,E] `counts` and
    `prob_sum`, [L,B] `z_sum`; see qwen3_jax.model.moe) and `tokens` [B] (non-padding tokens per row); empty for dense models.
    Packed rows: `segment_ids` [B,T] (1, 2, ... per document, 0 = padding) keep attention inside
    each document, `positions` [B,T] restart per document.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs)
        self.stacks = nnx.List([LayerStack(cfg, moe, n, rngs) for moe, _, n in cfg.layer_runs()])
        self.final_norm = RMSNorm(cfg.d_model, cfg)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)

    def hidden(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, router_bias=None):
        """Final-norm hidden states [B,T,D] in the compute dtype, and router statistics.
        `router_bias` [MoE layers, E]: aux-loss-free balancing's selection bias (training only)."""
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        token_mask_BT = jnp.ones((B, T), bool) if segment_ids_BT is None else segment_ids_BT > 0
        cos, sin = rope_cos_sin(positions_BT, self.cfg)
        x_BTD = sharding.constrain(self.embed(tokens_BT), ("batch", "seq", "embed"))
        moe_stats, first = [], 0
        for stack in self.stacks:
            bias_LE = None
            if stack.moe and router_bias is not None:
                bias_LE, first = router_bias[first:first + stack.count], first + stack.count
            x_BTD, stats = stack(x_BTD, cos, sin, segment_ids_BT, token_mask_BT, bias_LE)
            if stats is not None:
                moe_stats.append(stats)
        stats = {"tokens": token_mask_BT.sum(-1)}
        if moe_stats:  # each [layers of the stack, B, ...] -> [MoE layers, B, ...]
            stats.update(jax.tree.map(lambda *a: jnp.concatenate(a, 0), *moe_stats))
        return self.final_norm(x_BTD), stats

    def logits(self, h_BTD):
        if self.cfg.tie_embeddings:
            return self.embed.attend(h_BTD)
        return jnp.einsum("btd,dv->btv", h_BTD, self.lm_head[...].astype(h_BTD.dtype),
                          preferred_element_type=jnp.float32)

    def extend(self, tokens_BT, positions_BT, cache, index, mask_BTS=None, segment_ids_BT=None):
        """T new tokens per row against a KV cache (inference; `qwen3_jax.inference`): final-norm
        hidden states [B,T,D] and the updated cache. `cache` holds one (k, v) pair of
        [layers,B,S,K,H] arrays per layer stack (`cfg.layer_runs()`); the new keys and values go to
        slots `index`..`index`+T-1. Prefill: `segment_ids_BT` (0 = padding), an empty cache and
        index 0. Decode: `mask_BTS`, the cache slots each new token sees. No router statistics."""
        cos, sin = rope_cos_sin(positions_BT, self.cfg)
        x_BTD = sharding.constrain(self.embed(tokens_BT), ("batch", "seq", "embed"))
        new_cache = []
        for stack, (k_LBSKH, v_LBSKH) in zip(self.stacks, cache):
            x_BTD, k_LBSKH, v_LBSKH = stack.extend(x_BTD, cos, sin, k_LBSKH, v_LBSKH, index, mask_BTS,
                                                   segment_ids_BT)
            new_cache.append((k_LBSKH, v_LBSKH))
        return self.final_norm(x_BTD), tuple(new_cache)

    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, return_stats: bool = False):
        h_BTD, stats = self.hidden(tokens_BT, positions_BT, segment_ids_BT)
        logits_BTV = self.logits(h_BTD)
        return (logits_BTV, stats) if return_stats else logits_BTV


def create_model(cfg: ModelConfig, seed: int = 0) -> Qwen3:
    return Qwen3(cfg, nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig) -> Qwen3:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes and axes, nothing allocated."""
    return nnx.eval_shape(lambda: Qwen3(cfg, nnx.Rngs(0)))
