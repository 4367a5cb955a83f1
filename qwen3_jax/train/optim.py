"""AdamW with warmup + cosine or warmup-stable-decay, no decay on norms, global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from qwen3_jax.train.config import SCHEDULES, OptimConfig, ScheduleConfig


def lr_schedule(cfg: ScheduleConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per step (the kinds: `ScheduleConfig`; Qwen3 stage 2 uses a fast decay)."""
    if cfg.kind not in SCHEDULES:
        raise ValueError(f"lr_schedule.kind={cfg.kind!r} is not one of {SCHEDULES}")
    if total_steps <= 0:
        raise ValueError(f"lr_schedule total_steps must be > 0, got {total_steps}")
    peak = cfg.peak_lr
    warmup_steps = min(cfg.warmup_steps, total_steps)
    warm = optax.linear_schedule(peak / max(warmup_steps, 1), peak, max(warmup_steps, 1))
    rest = total_steps - warmup_steps
    if cfg.kind == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.kind == "cosine":
        after = optax.cosine_decay_schedule(peak, max(rest, 1), alpha=cfg.min_lr_ratio)
    else:
        decay = max(int(round(rest * cfg.decay_fraction)), 1)
        after = optax.join_schedules([optax.constant_schedule(peak),
                                      optax.linear_schedule(peak, peak * cfg.min_lr_ratio, decay)], [rest - decay])
    return optax.join_schedules([warm, after], [warmup_steps])


def decay_mask(params):
    """True for parameters that get weight decay: everything but norm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any("norm" in str(getattr(k, "key", k)) for k in path), params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, schedule). Moments are kept in fp32 like the master params."""
    schedule = lr_schedule(cfg.schedule, total_steps)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask, mu_dtype=jnp.float32))
    return optax.chain(*parts), schedule
