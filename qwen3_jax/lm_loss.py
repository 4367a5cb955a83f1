"""The language-model loss, in one place for training, evaluation and distillation: per token, the
log-sum-exp of the logits and the target's logit, made piece by piece so the [B, T, V] logits never
exist at once.

A batch is a dict of [B,T] arrays: tokens, targets (next token inside the same document),
loss_mask (0 on padding and document ends), segment_ids (0 = padding), positions.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from qwen3_jax.config import ModelConfig
from qwen3_jax.model.context_parallel import zigzag_batch
from qwen3_jax.params import flatten, model_from_flat


def token_lse_and_target(model, h_BTD, targets_BT, chunk: int | None = None):
    """log-sum-exp and target logit per token [B,T] (fp32).

    With `chunk`, the positions are cut into pieces of `chunk` (the last piece holds the remainder
    when T is not a multiple) and each piece's [B, chunk, V] logits are made, reduced and dropped
    (and remade in the backward pass): the full [B,T,V] logits — 18 GiB per chip at 32K tokens and a
    152K vocabulary — never exist at once. None: all positions in one piece.
    """
    B, T, D = h_BTD.shape

    def piece(h, t):
        logits = model.logits(h)
        return jax.nn.logsumexp(logits, axis=-1), jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]

    if not chunk or T <= chunk:
        return piece(h_BTD, targets_BT)
    n, rest = divmod(T, chunk)
    whole = n * chunk
    # piece i holds positions i, i+n, i+2n, ...: strided, so a sequence split over a context axis
    # (model/context_parallel.py) stays split inside every piece; each token's values are the same
    h_nBcD = jnp.moveaxis(h_BTD[:, :whole].reshape(B, chunk, n, D), 2, 0)
    t_nBc = jnp.moveaxis(targets_BT[:, :whole].reshape(B, chunk, n), 2, 0)
    lse, tgt = jax.lax.map(lambda a: jax.checkpoint(piece)(*a), (h_nBcD, t_nBc))
    lse_BT, tgt_BT = jnp.moveaxis(lse, 0, 2).reshape(B, whole), jnp.moveaxis(tgt, 0, 2).reshape(B, whole)
    if rest:  # the remainder: one piece of fewer than `chunk` positions
        lse_r, tgt_r = jax.checkpoint(piece)(h_BTD[:, whole:], targets_BT[:, whole:])
        lse_BT, tgt_BT = jnp.concatenate([lse_BT, lse_r], 1), jnp.concatenate([tgt_BT, tgt_r], 1)
    return lse_BT, tgt_BT


def make_eval_step(cfg: ModelConfig, loss_chunk: int | None = None) -> Callable:
    """eval(params, batch) -> {"nll_sum", "tokens"} (sums, so several batches can be pooled)."""
    def eval_step(params, batch):
        batch = zigzag_batch(batch)  # a context axis: the sequence in its zig-zag order (identity without)
        model = model_from_flat(cfg, flatten(params))
        h_BTD, _ = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"])
        lse_BT, target_BT = token_lse_and_target(model, h_BTD, batch["targets"], loss_chunk)
        mask_BT = batch["loss_mask"].astype(jnp.float32)
        return {"nll_sum": jnp.sum((lse_BT - target_BT) * mask_BT), "tokens": jnp.sum(mask_BT)}
    return eval_step
