"""AdamW with warmup + cosine or warmup-stable-decay, no decay on norms, global-norm clipping."""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "wsd", "constant")


@gin.configurable
def lr_schedule(total_steps: int, *, peak_lr: float = 3e-4, warmup_steps: int = 100, kind: str = "cosine",
                min_lr_ratio: float = 0.1, decay_fraction: float = 0.1) -> optax.Schedule:
    """Learning rate per step.

    cosine: linear warmup to peak, cosine to min_lr_ratio * peak at total_steps.
    wsd:    warmup, constant peak, then linear decay to min_lr_ratio * peak over the last
            `decay_fraction` of the steps (Qwen3 stage 2 uses a fast decay).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"lr_schedule.kind={kind!r} is not one of {SCHEDULES}")
    if total_steps <= 0:
        raise ValueError(f"lr_schedule total_steps must be > 0, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    end = peak_lr * min_lr_ratio
    warm = optax.linear_schedule(peak_lr / max(warmup_steps, 1), peak_lr, max(warmup_steps, 1))
    rest = total_steps - warmup_steps
    if kind == "constant":
        after = optax.constant_schedule(peak_lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(peak_lr, max(rest, 1), alpha=min_lr_ratio)
    else:
        decay = max(int(round(rest * decay_fraction)), 1)
        after = optax.join_schedules([optax.constant_schedule(peak_lr), optax.linear_schedule(peak_lr, end, decay)],
                                     [rest - decay])
    return optax.join_schedules([warm, after], [warmup_steps])


def decay_mask(params):
    """True for parameters that get weight decay: everything but norm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any("norm" in str(getattr(k, "key", k)) for k in path), params)


@gin.configurable
def make_optimizer(total_steps: int, *, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.1, clip_norm: float | None = 1.0):
    """(optax transformation, schedule). Moments are kept in fp32 like the master params."""
    schedule = lr_schedule(total_steps)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask,
                             mu_dtype=jnp.float32))
    return optax.chain(*parts), schedule
