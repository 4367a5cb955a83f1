"""The train step: a pure function (state, batch) -> (state, metrics), and the eval step.

A batch is a dict of [B,T] arrays: tokens, targets (next token inside the same document),
loss_mask (0 on padding and document ends), segment_ids (0 = padding), positions.
The LM loss is the mean over all loss tokens of the global batch; with `micro_batches > 1` the
batch is split into strided micro-batches whose gradients are summed, which gives the same
loss and gradients as one pass (up to float summation order).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from qwen3_jax.config import ModelConfig
from qwen3_jax.model import create_model
from qwen3_jax.model.moe import load_balancing_loss
from qwen3_jax.params import flat_params, flatten, model_from_flat, nest
from qwen3_jax.train.config import AUX_SCOPES


@flax.struct.dataclass
class TrainState:
    params: Any  # nested dict of arrays (qwen3_jax.params.nest of the flat parameters)
    opt_state: Any
    step: jax.Array  # int32: optimizer updates applied or skipped so far
    rng: jax.Array  # uint32 [2]
    nonfinite_in_a_row: jax.Array  # int32
    nonfinite_total: jax.Array  # int32


def init_params(cfg: ModelConfig, seed: int = 0):
    return nest(flat_params(create_model(cfg, seed)))


def init_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int = 0, params=None) -> TrainState:
    params = init_params(cfg, seed) if params is None else params
    zero = jnp.zeros((), jnp.int32)
    return TrainState(params=params, opt_state=optimizer.init(params), step=zero,
                      rng=jax.random.key_data(jax.random.key(seed)), nonfinite_in_a_row=zero, nonfinite_total=zero)


def split_micro_batches(batch: dict, n: int) -> dict:
    """[B,...] -> [n, B/n, ...] taking every n-th row, so each data shard holds all micro-batches."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by micro_batches={n}")
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def expert_load(counts_LBE):
    """Per MoE layer: max/min expert share relative to uniform, and coefficient of variation."""
    c_LE = counts_LBE.sum(1)
    f_LE = c_LE / jnp.maximum(c_LE.sum(-1, keepdims=True), 1.0)
    E = c_LE.shape[-1]
    return {"expert_load_max": f_LE.max(-1) * E, "expert_load_min": f_LE.min(-1) * E,
            "expert_load_cv": f_LE.std(-1) / jnp.maximum(f_LE.mean(-1), 1e-9)}


# -- global-batch load balancing (arXiv 2501.11873) -------------------------------------------------
# The aux loss E·Σ_e f_e·p_e is linear in p and f carries no gradient, so with f_e known up front
# the global-batch loss splits exactly into per-micro-batch shares E·Σ_e f_e·P_e^mb / rows (P^mb
# the micro-batch's prob sums, rows = L·global tokens), whose sum over micro-batches is the
# global-batch loss and whose gradients sum to its gradient. Within one micro-batch the [L,B,E]
# statistics seen inside jit are global over all data shards already. Across micro-batches f
# must be known before the first backward: `global_router_counts` gets it with one forward-only
# routing pass over all micro-batches (no LM head, no backward: ≈ +25% of a step with full remat,
# paid only when micro_batches > 1).

def global_router_counts(cfg, params, batch: dict, micro_batches: int):
    """Expert assignment counts [L,E] and non-padding tokens over the whole (global) batch,
    from a forward-only pass over the strided micro-batches the train step uses."""
    params = jax.lax.stop_gradient(params)

    def counts(mb):
        model = model_from_flat(cfg, flatten(params))
        _, stats = model.hidden(mb["tokens"], mb.get("positions"), mb.get("segment_ids"))
        return stats["counts"].sum(1), stats["tokens"].sum().astype(jnp.float32)

    if micro_batches == 1:
        return counts(batch)
    mbs = split_micro_batches({k: batch[k] for k in ("tokens", "positions", "segment_ids") if k in batch},
                              micro_batches)

    def body(acc, mb):
        c, t = counts(mb)
        return (acc[0] + c, acc[1] + t), None

    zero = (jnp.zeros((cfg.num_moe_layers, cfg.num_experts), jnp.float32), jnp.zeros((), jnp.float32))
    return jax.lax.scan(body, zero, mbs)[0]


def token_lse_and_target(model, h_BTD, targets_BT, chunk: int | None = None):
    """log-sum-exp and target logit per token [B,T] (fp32).

    With `chunk`, the sequence is cut into pieces of `chunk` positions and each piece's [B,chunk,V]
    logits are made, reduced and dropped (and remade in the backward pass), so the full [B,T,V]
    logits — 18 GiB per chip at 32K tokens and a 152K vocabulary — never exist at once.
    """
    B, T, D = h_BTD.shape

    def piece(h, t):
        logits = model.logits(h)
        return jax.nn.logsumexp(logits, axis=-1), jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]

    if not chunk or T <= chunk or T % chunk:
        return piece(h_BTD, targets_BT)
    n = T // chunk
    h_nBcD = jnp.moveaxis(h_BTD.reshape(B, n, chunk, D), 1, 0)
    t_nBc = jnp.moveaxis(targets_BT.reshape(B, n, chunk), 1, 0)
    lse, tgt = jax.lax.map(lambda a: jax.checkpoint(piece)(*a), (h_nBcD, t_nBc))
    return jnp.moveaxis(lse, 0, 1).reshape(B, T), jnp.moveaxis(tgt, 0, 1).reshape(B, T)


def _loss_terms(cfg: ModelConfig, params, batch, total_tokens, *, z_loss: float,
                loss_chunk: int | None = None):
    """Sums over this (micro-)batch, normalised by the global token count; plus router stats."""
    model = model_from_flat(cfg, flatten(params))
    h_BTD, stats = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"])
    lse_BT, target_BT = token_lse_and_target(model, h_BTD, batch["targets"], loss_chunk)
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    lm = jnp.sum((lse_BT - target_BT) * mask_BT) / total_tokens
    zl = z_loss * jnp.sum(jnp.square(lse_BT) * mask_BT) / total_tokens
    return lm, zl, stats


def make_loss_fn(cfg: ModelConfig, *, z_loss: float = 0.0, aux_loss_coef: float | None = None,
                 loss_chunk: int | None = None,
                 aux_scope: str = "global", micro_batches: int = 1) -> Callable:
    """loss(params, micro_batch, total_tokens) -> (loss, (lm, z, aux, stats))."""
    if aux_scope not in AUX_SCOPES:
        raise ValueError(f"aux_scope={aux_scope!r} is not one of {AUX_SCOPES}")
    coef = cfg.router_aux_loss_coef if aux_loss_coef is None else aux_loss_coef

    def loss_fn(params, batch, total_tokens):
        lm, zl, stats = _loss_terms(cfg, params, batch, total_tokens, z_loss=z_loss, loss_chunk=loss_chunk)
        aux = jnp.zeros((), jnp.float32)
        if cfg.is_moe and coef:
            # One micro-batch's share; "global" uses the global-batch counts when they are given.
            if "global_counts" in batch:
                counts = jax.lax.stop_gradient(batch["global_counts"])[:, None]  # [L,1,E]
                aux = load_balancing_loss(counts, stats["prob_sum"].sum(1, keepdims=True),
                                          batch["global_tokens"][None], cfg.num_experts, scope="batch")
            else:
                scope = "sequence" if aux_scope == "sequence" else "batch"
                aux = load_balancing_loss(stats["counts"], stats["prob_sum"], stats["tokens"], cfg.num_experts,
                                          scope=scope) / micro_batches
            # (with global counts the shares of the micro-batches already sum to the global loss)
        return lm + zl + coef * aux, (lm, zl, aux, stats)

    return loss_fn


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, *, micro_batches: int = 1,
                    loss_chunk: int | None = None,
                    z_loss: float = 0.0, aux_loss_coef: float | None = None, aux_scope: str = "global",
                    schedule: optax.Schedule | None = None) -> Callable:
    """step(state, batch) -> (state, metrics). Non-finite loss or gradients skip the update."""
    loss_fn = make_loss_fn(cfg, z_loss=z_loss, aux_loss_coef=aux_loss_coef, aux_scope=aux_scope,
                           loss_chunk=loss_chunk, micro_batches=micro_batches)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict):
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        if micro_batches == 1:
            (loss, (lm, zl, aux, stats)), grads = grad_fn(state.params, batch, total_tokens)
            counts = stats.get("counts")
        else:
            mbs = split_micro_batches(batch, micro_batches)
            if cfg.is_moe and aux_scope == "global" and (cfg.router_aux_loss_coef if aux_loss_coef is None
                                                         else aux_loss_coef):
                # f_e over the whole global batch before any backward: a forward-only routing pass
                g_counts, g_tokens = global_router_counts(cfg, state.params, batch, micro_batches)
                mbs["global_counts"] = jnp.broadcast_to(g_counts, (micro_batches, *g_counts.shape))
                mbs["global_tokens"] = jnp.broadcast_to(g_tokens, (micro_batches,))

            def body(carry, mb):
                g_acc, sums = carry
                (l, (lm_, zl_, aux_, st)), g = grad_fn(state.params, mb, total_tokens)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                new = {"loss": l, "lm": lm_, "z": zl_, "aux": aux_}
                if "counts" in st:
                    new["counts"] = st["counts"].sum(1)
                return (g_acc, jax.tree.map(jnp.add, sums, new)), None

            zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            zeros_s = {"loss": 0.0, "lm": 0.0, "z": 0.0, "aux": 0.0}
            if cfg.is_moe:
                zeros_s["counts"] = jnp.zeros((cfg.num_moe_layers, cfg.num_experts), jnp.float32)
            zeros_s = jax.tree.map(jnp.asarray, zeros_s)
            (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), mbs)
            loss, lm, zl, aux = sums["loss"], sums["lm"], sums["z"], sums["aux"]
            counts = sums["counts"][:, None] if "counts" in sums else None

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = state.replace(
            params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state), step=state.step + 1,
            nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
        metrics = {"loss": loss, "lm_loss": lm, "z_loss": zl, "aux_loss": aux, "grad_norm": grad_norm,
                   "tokens": total_tokens, "finite": finite, "nonfinite_total": new_state.nonfinite_total}
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        if counts is not None:
            metrics.update(expert_load(counts))
        return new_state, metrics

    return step


def make_eval_step(cfg: ModelConfig, loss_chunk: int | None = None) -> Callable:
    """eval(params, batch) -> {"nll_sum", "tokens"} (sum, so several batches can be pooled)."""
    def eval_step(params, batch):
        lm, _, _ = _loss_terms(cfg, params, batch, 1.0, z_loss=0.0, loss_chunk=loss_chunk)
        return {"nll_sum": lm, "tokens": jnp.sum(batch["loss_mask"].astype(jnp.float32))}
    return eval_step
