"""The train step: a pure function (state, batch) -> (state, metrics).

A batch is a dict of [B,T] arrays (qwen3_jax.lm_loss has the keys and the LM loss pieces).
The LM loss is the mean over all loss tokens of the global batch; with `micro_batches > 1` the
batch is split into strided micro-batches whose gradients are summed, which gives the same
loss and gradients as one pass (up to float summation order). The MoE balancing terms (load
balancing per layer over the global batch, router z-loss, aux-free bias) are described in
`qwen3_jax.train.moe_balance`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from qwen3_jax.config import ModelConfig
from qwen3_jax.lm_loss import token_lse_and_target
from qwen3_jax.model import create_model
from qwen3_jax.model.context_parallel import zigzag_batch
from qwen3_jax.params import flat_params, flatten, model_from_flat, nest
from qwen3_jax.train import moe_balance, spike_guard
from qwen3_jax.train.config import LossConfig


@flax.struct.dataclass
class TrainState:
    params: Any  # nested dict of arrays (qwen3_jax.params.nest of the flat parameters)
    opt_state: Any
    step: jax.Array  # int32: optimizer updates applied or skipped so far
    nonfinite_total: jax.Array  # int32: steps skipped for a non-finite loss or gradient, over the run
    moe: Any  # MoE balancing state (moe_balance.init_moe_state): last global counts, routing bias; {} if dense
    guard: Any  # skipped-update guard (spike_guard.init_guard): recent good losses / grad norms, and the one
    # streak of skipped steps (non-finite or spike) the loop rolls back on, `bad_in_a_row`


def init_params(cfg: ModelConfig, seed: int = 0):
    return nest(flat_params(create_model(cfg, seed)))


def init_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, seed: int = 0, params=None,
               spike_window: int = 50) -> TrainState:
    params = init_params(cfg, seed) if params is None else params
    zero = jnp.zeros((), jnp.int32)
    return TrainState(params=params, opt_state=optimizer.init(params), step=zero, nonfinite_total=zero,
                      moe=moe_balance.init_moe_state(cfg), guard=spike_guard.init_guard(spike_window))


def split_micro_batches(batch: dict, n: int) -> dict:
    """[B,...] -> [n, B/n, ...] taking every n-th row, so each data shard holds all micro-batches."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by micro_batches={n}")
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def _loss_terms(cfg: ModelConfig, params, batch, total_tokens, *, z_loss: float,
                loss_chunk: int | None = None, router_bias=None, distill=None, teacher_params=None):
    """Sums over this (micro-)batch, normalised by the global token count; plus router stats
    (and with `distill`, stats["kd"] / stats["kd_agree"]: KD divergence and top-1 agreement)."""
    model = model_from_flat(cfg, flatten(params))
    h_BTD, stats = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"], router_bias=router_bias)
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    if distill is not None:  # --- distillation hook: teacher forward + KD terms (qwen3_jax.train.distill)
        terms = distill.token_terms(model, h_BTD, batch, teacher_params, loss_chunk)
        lse_BT, target_BT = terms["lse"], terms["target"]
        stats = dict(stats, kd=jnp.sum(terms["kd"] * mask_BT) / total_tokens,
                     kd_agree=jnp.sum(terms["agree"] * mask_BT) / total_tokens)
    else:
        lse_BT, target_BT = token_lse_and_target(model, h_BTD, batch["targets"], loss_chunk)
    lm = jnp.sum((lse_BT - target_BT) * mask_BT) / total_tokens
    zl = z_loss * jnp.sum(jnp.square(lse_BT) * mask_BT) / total_tokens
    return lm, zl, stats


def make_loss_fn(cfg: ModelConfig, loss_cfg: LossConfig = LossConfig(), *, micro_batches: int = 1,
                 distill=None) -> Callable:
    """loss(params, micro_batch, total_tokens, balance=None, teacher_params=None) -> (loss, (lm, z, aux,
    router_z, stats)). `distill` (qwen3_jax.train.distill.Distiller): LM mixed with KD (kd_loss.KDConfig.mix).

    `balance` (default: the batch on its own): {"router_tokens": the global batch's non-padding tokens,
    "bias": the aux-free routing bias or None, and for the global scope "prior_counts", "prior_tokens",
    "own_weight" (see moe_balance.aux_share)}. Each term is this micro-batch's share of the step's term."""
    loss_cfg.validate()
    coef = cfg.router_aux_loss_coef if loss_cfg.aux_loss_coef is None else loss_cfg.aux_loss_coef
    z_loss, router_z_loss = loss_cfg.z_loss, loss_cfg.router_z_loss

    def loss_fn(params, batch, total_tokens, balance=None, teacher_params=None):
        if balance is None:  # one batch on its own: f and p over its tokens, no routing bias
            balance = {"router_tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)}
        lm, zl, stats = _loss_terms(cfg, params, batch, total_tokens, z_loss=z_loss, loss_chunk=loss_cfg.loss_chunk,
                                    router_bias=balance.get("bias"), distill=distill, teacher_params=teacher_params)
        aux = rz = jnp.zeros((), jnp.float32)
        if cfg.is_moe and coef:
            aux = moe_balance.aux_share(stats, cfg.num_experts, scope=loss_cfg.aux_scope,
                                        layer_reduce=loss_cfg.aux_layer_reduce,
                                        micro_batches=micro_batches, router_tokens=balance["router_tokens"],
                                        prior_counts=balance.get("prior_counts"),
                                        prior_tokens=balance.get("prior_tokens"),
                                        own_weight=balance.get("own_weight", 0.0))
        if cfg.is_moe and router_z_loss:
            rz = moe_balance.z_share(stats, balance["router_tokens"])
        main = lm if distill is None else distill.kd.mix(lm, stats["kd"])
        return main + zl + coef * aux + router_z_loss * rz, (lm, zl, aux, rz, stats)

    return loss_fn


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, loss_cfg: LossConfig = LossConfig(), *,
                    micro_batches: int = 1, schedule: optax.Schedule | None = None,
                    spike_factor: float | None = None, distill=None) -> Callable:
    """step(state, batch) -> (state, metrics): the objective `loss_cfg` describes, its gradients summed over
    `micro_batches` strided micro-batches. Non-finite loss or gradients skip the update, and so does a
    loss spike (`spike_factor`: qwen3_jax.train.spike_guard; None = no spike check).
    With `distill` the step is step(state, batch, teacher_params) (qwen3_jax.train.distill)."""
    loss_fn = make_loss_fn(cfg, loss_cfg, micro_batches=micro_batches, distill=distill)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    coef = cfg.router_aux_loss_coef if loss_cfg.aux_loss_coef is None else loss_cfg.aux_loss_coef
    global_f = cfg.is_moe and coef and loss_cfg.aux_scope == "global" and micro_batches > 1
    aux_global_counts, router_bias_rate = loss_cfg.aux_global_counts, loss_cfg.router_bias_rate
    router_z_loss = loss_cfg.router_z_loss

    def step(state: TrainState, batch: dict, teacher_params=None):
        # a context axis: every [B,T] array in zig-zag order, the loss on it (model/context_parallel.py)
        batch = zigzag_batch(batch)
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        router_tokens = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
        bias = state.moe["bias"] if cfg.is_moe and router_bias_rate else None
        balance = {"router_tokens": router_tokens, "bias": bias}
        if micro_batches == 1:
            (loss, (lm, zl, aux, rz, stats)), grads = grad_fn(state.params, batch, total_tokens, balance, teacher_params)
            counts = stats["counts"].sum(1) if cfg.is_moe else None
        else:
            mbs = split_micro_batches(batch, micro_batches)
            if global_f and aux_global_counts == "exact":  # f over the global batch before any backward
                g_counts, g_tokens = moe_balance.global_router_counts(cfg, state.params, mbs, bias)

            def balance_for(sums):
                """Where this micro-batch's f comes from (moe_balance's aux_global_counts)."""
                if not global_f:
                    return balance
                if aux_global_counts == "exact":
                    return dict(balance, prior_counts=g_counts, prior_tokens=g_tokens, own_weight=0.0)
                if aux_global_counts == "running":  # micro-batches 1..m
                    return dict(balance, prior_counts=sums["counts"], prior_tokens=sums["router_tokens"],
                                own_weight=1.0)
                seen = state.moe["tokens"] > 0  # previous_step; step 0 has no previous step: running
                return dict(balance, prior_counts=jnp.where(seen, state.moe["counts"], sums["counts"]),
                            prior_tokens=jnp.where(seen, state.moe["tokens"], sums["router_tokens"]),
                            own_weight=jnp.where(seen, 0.0, 1.0))

            def body(carry, mb):
                g_acc, sums = carry
                (l, (lm_, zl_, aux_, rz_, st)), g = grad_fn(state.params, mb, total_tokens, balance_for(sums), teacher_params)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                new = {"loss": l, "lm": lm_, "z": zl_, "aux": aux_, "rz": rz_}
                if cfg.is_moe:
                    new["counts"] = st["counts"].sum(1)
                    new["router_tokens"] = st["tokens"].sum().astype(jnp.float32)
                if distill is not None:
                    new["kd"], new["kd_agree"] = st["kd"], st["kd_agree"]
                return (g_acc, jax.tree.map(jnp.add, sums, new)), None

            zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            zeros_s = {"loss": 0.0, "lm": 0.0, "z": 0.0, "aux": 0.0, "rz": 0.0}
            if cfg.is_moe:
                zeros_s["counts"] = jnp.zeros((cfg.num_moe_layers, cfg.num_experts), jnp.float32)
                zeros_s["router_tokens"] = 0.0
            if distill is not None:
                zeros_s["kd"] = zeros_s["kd_agree"] = 0.0
            zeros_s = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), zeros_s)
            (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), mbs)
            loss, lm, zl, aux, rz = sums["loss"], sums["lm"], sums["z"], sums["aux"], sums["rz"]
            counts = sums.get("counts")

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        spike = spike_guard.is_spike(state.guard, loss, grad_norm, spike_factor)
        ok = finite & ~spike
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        moe = state.moe
        if cfg.is_moe:
            moe = {"counts": counts, "tokens": router_tokens,
                   "bias": moe_balance.update_bias(moe["bias"], counts, router_bias_rate) if router_bias_rate
                   else moe["bias"]}
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        guard = spike_guard.update_guard(state.guard, loss, grad_norm, finite, spike)
        new_state = state.replace(
            params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state), step=state.step + 1,
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32), moe=keep(moe, state.moe),
            guard=guard)
        metrics = {"loss": loss, "lm_loss": lm, "z_loss": zl, "aux_loss": aux, "grad_norm": grad_norm,
                   "tokens": total_tokens, "finite": finite, "nonfinite_total": new_state.nonfinite_total,
                   "spike": spike, "skipped": ~ok, "bad_in_a_row": guard["bad_in_a_row"],
                   "spikes_total": guard["spikes_total"]}
        if cfg.is_moe and router_z_loss:
            metrics["router_z_loss"] = rz
        if distill is not None:  # KD divergence (at τ, before α·τ²) and teacher-student top-1 agreement
            kd_src = stats if micro_batches == 1 else sums
            metrics.update(kd_loss=kd_src["kd"], kd_top1_agree=kd_src["kd_agree"])
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        if counts is not None:
            metrics.update(moe_balance.expert_load(counts))
        return new_state, metrics

    return step
