"""On-policy distillation: each step the student samples completions of a batch of prompts, the
frozen teacher scores the student's own tokens, and the step trains on them with the KD loss
(GKD-style; the Qwen3 report's on-policy stage of strong-to-weak distillation).

    rows of prompts  --rollout (student, no gradient)-->  prompt + sampled completion
                     --train step (qwen3_jax.train.step, unchanged)-->  KD on the completion

The rollout is one jitted function of (student params, prompt batch, step, eos id) that returns an
ordinary training batch, so the train step, its teacher hook (qwen3_jax.train.distill) and its
compiled program are exactly those of off-policy distillation; only the batch differs:

  * prompts: the first segment of each row of the prompt data (the usual data pipeline, made
    with SEQ_LEN = `train.onpolicy_prompt_len` = P), at most P tokens, left-padded;
  * completion: N = SEQ_LEN - P + 1 tokens sampled by the student (the inference engine's prefill
    and decode steps: `qwen3_jax.inference.engine`), so prompt + completion = SEQ_LEN + 1 tokens
    give SEQ_LEN inputs and SEQ_LEN targets;
  * loss_mask: 1 on the positions whose target is a sampled token, up to and including the first
    end-of-text id (`eos_id`; -1: none), 0 on the prompt, the padding and anything after the end.

The divergence is `train.kd_divergence` over the whole vocabulary at each of the student's
positions: 'reverse' KL(student‖teacher) is GKD's on-policy objective (mode seeking), 'forward'
and 'jsd' are its alternatives; the stage file (configs/distill_onpolicy.gin) sets it through the
macro ONPOLICY_KL and puts all weight on it (kd_alpha = 1: an LM loss on the student's own
samples would only reinforce them).

Determinism: the sampling key is fold_in(key(seed), step) and the prompts come from the data
iterator, whose position is checkpointed with the step; so a resumed run samples the same
completions from the same parameters, and ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from data_pipeline.pipeline import BATCH_DTYPES
from qwen3_jax.config import ModelConfig
from qwen3_jax.inference.engine import FREE, _decode_chunk, _prefill, _Static
from qwen3_jax.inference.sampling import SamplingConfig
from qwen3_jax.params import flatten

SAMPLING_SALT = 0x0B5A  # the sampling keys' own stream: fold_in(fold_in(key(seed), SALT), step)


@dataclasses.dataclass(frozen=True)
class Rollout:
    """prompt_len: P; completion_len: N (= SEQ_LEN - P + 1); sampling: the student's sampler."""

    prompt_len: int
    completion_len: int
    sampling: SamplingConfig

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.completion_len - 1


def left_aligned_prompts(tokens_BT, segment_ids_BT, prompt_len: int):
    """The first segment of each row (at most `prompt_len` tokens), moved to the right end of a
    [B,P] row: (prompt_BP, start_B) with start_B the first prompt slot (P when a row is empty)."""
    tokens_BP, seg_BP = tokens_BT[:, :prompt_len], segment_ids_BT[:, :prompt_len]
    first_B = seg_BP[:, 0]
    in_first_BP = (seg_BP == first_B[:, None]) & (seg_BP > 0)
    len_B = jnp.sum(jnp.cumprod(in_first_BP, axis=1), axis=1).astype(jnp.int32)  # the leading run
    start_B = prompt_len - len_B
    src_BP = jnp.arange(prompt_len, dtype=jnp.int32)[None] - start_B[:, None]
    prompt_BP = jnp.take_along_axis(tokens_BP, jnp.maximum(src_BP, 0), axis=1)
    return jnp.where(src_BP >= 0, prompt_BP, 0).astype(jnp.int32), start_B


def rollout_batch(cfg: ModelConfig, ro: Rollout, params, prompts: dict, key, eos_id) -> dict:
    """Samples N tokens after each row's prompt; returns the train step's batch [B, SEQ_LEN]."""
    P, N = ro.prompt_len, ro.completion_len
    flat = flatten(jax.lax.stop_gradient(params))
    prompt_BP, start_B = left_aligned_prompts(prompts["tokens"], prompts["segment_ids"], P)
    B = prompt_BP.shape[0]
    empty_B = start_B >= P  # a row without a prompt token generates nothing and is not trained on
    state = _prefill(cfg, 0, P + N, flat, prompt_BP, jnp.minimum(start_B, P - 1), jnp.full((B,), FREE, jnp.int32),
                     jnp.zeros((B,), bool), jnp.int32(N), jnp.int32(jnp.iinfo(jnp.int32).max), key)
    static = _Static(sampling=ro.sampling, eos_ids=(), stop_ids=(), open_id=-1, close_id=-1, steps=N, pad_id=0)
    _, out_BN, _ = _decode_chunk(cfg, static, flat, state)  # all N steps: no row stops early
    # the completion ends after its first end-of-text id; later tokens stay in the row, unscored
    is_eos_BN = out_BN == eos_id
    before_end_BN = jnp.cumsum(is_eos_BN, axis=1) - is_eos_BN == 0
    scored_BN = before_end_BN & ~empty_B[:, None]
    seq_BS = jnp.concatenate([prompt_BP, out_BN], axis=1)  # S = P + N = SEQ_LEN + 1
    slots_S = jnp.arange(P + N, dtype=jnp.int32)
    real_BS = slots_S[None] >= start_B[:, None]
    T = ro.seq_len
    loss_mask_BS = jnp.concatenate([jnp.zeros((B, P), bool), scored_BN], axis=1)
    batch = {"tokens": seq_BS[:, :T], "targets": seq_BS[:, 1:], "loss_mask": loss_mask_BS[:, 1:],
             "segment_ids": real_BS[:, :T], "positions": jnp.maximum(slots_S[None, :T] - start_B[:, None], 0)}
    return {k: v.astype(BATCH_DTYPES[k]) for k, v in batch.items()}


def sampling_key(seed: int, step):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), SAMPLING_SALT), step)


def make_rollout(cfg: ModelConfig, ro: Rollout, seed: int) -> Callable:
    """rollout(params, prompts, step, eos_id) -> batch; `step` is the step the batch trains (1-based)."""
    rollout_cfg = cfg.replace(remat="none")  # forward only

    def rollout(params, prompts, step, eos_id):
        return rollout_batch(rollout_cfg, ro, params, prompts, sampling_key(seed, step), eos_id)

    return rollout
