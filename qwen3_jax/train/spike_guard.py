"""Loss-spike guard: skip an update whose loss or gradient norm is far above recent good steps.

Runs on device inside the train step (no host sync). The guard state (`TrainState.guard`,
checkpoint item `guard`) keeps the loss and global gradient norm (before clipping) of the last
`window` good steps in a ring buffer. Once the buffer is full, a step is a *spike* when

    loss > factor · median(recent losses)   or   grad_norm > factor · median(recent grad norms)

and its update is skipped like a non-finite one (parameters, optimizer and MoE state unchanged).
Skipped steps (spikes and non-finite) count in `bad_in_a_row`; only good steps enter the window,
so one spike cannot raise the bar for the next. After `train.max_bad_in_a_row` bad steps in a row
the loop rolls back to the last checkpoint written before the first bad one (train.spike_rollback)
or stops naming it (qwen3_jax.train.loop).
"""

from __future__ import annotations

import jax.numpy as jnp


def init_guard(window: int) -> dict:
    """Empty guard state for a window of `window` good steps."""
    z = jnp.zeros((), jnp.int32)
    return {"loss": jnp.zeros((window,), jnp.float32), "grad_norm": jnp.zeros((window,), jnp.float32),
            "count": z, "next": z, "bad_in_a_row": z, "spikes_total": z}


def is_spike(guard: dict, loss, grad_norm, factor: float | None):
    """True when the window is full and loss or grad norm exceeds `factor` × its recent median."""
    if not factor:
        return jnp.zeros((), bool)
    full = guard["count"] >= guard["loss"].shape[0]
    over = (loss > factor * jnp.median(guard["loss"])) | (grad_norm > factor * jnp.median(guard["grad_norm"]))
    return full & over


def update_guard(guard: dict, loss, grad_norm, finite, spike) -> dict:
    """The guard after one step: a good step (finite, no spike) enters the window."""
    ok = finite & ~spike
    window = guard["loss"].shape[0]
    i = guard["next"]

    def put(buf, x):
        return jnp.where(ok, buf.at[i].set(jnp.asarray(x, jnp.float32)), buf)

    return {"loss": put(guard["loss"], loss), "grad_norm": put(guard["grad_norm"], grad_norm),
            "count": jnp.minimum(guard["count"] + ok, window).astype(jnp.int32),
            "next": jnp.where(ok, (i + 1) % window, i).astype(jnp.int32),
            "bad_in_a_row": jnp.where(ok, 0, guard["bad_in_a_row"] + 1).astype(jnp.int32),
            "spikes_total": (guard["spikes_total"] + (spike & finite)).astype(jnp.int32)}
