"""Distillation losses per token, computed in the LM loss's position chunks.

Convention (train.kd_alpha = α, train.kd_temperature = τ):

    loss = (1 - α) · LM + α · τ² · KD

LM is the usual next-token cross-entropy (mean over loss tokens, temperature 1); KD is the mean
over the same loss tokens of a divergence between the teacher's and the student's next-token
distributions at temperature τ, p^τ = softmax(logits / τ) over the whole vocabulary. τ² keeps the
KD gradient's scale independent of τ (Hinton et al. 2015); at τ = 1 it is 1. The divergences:

    forward  KL(teacher ‖ student) = Σ_v p_T (log p_T − log p_S)   off-policy KD (mass covering)
    reverse  KL(student ‖ teacher) = Σ_v p_S (log p_S − log p_T)   on-policy KD (mode seeking)
    jsd      ½ KL(p_T ‖ m) + ½ KL(p_S ‖ m), m = ½ (p_T + p_S)       (GKD's β = ½)

Top-k (`topk`, forward only): the teacher keeps its k most likely tokens, renormalised (p̃_T); the
student's log-probabilities at those ids come from its full softmax, so
KD = Σ_k p̃_T,k (log p̃_T,k − log p_S(id_k)) ≥ 0, and it is exactly the forward KL when k = V.

Memory: like `qwen3_jax.train.step.token_lse_and_target`, the positions are cut into pieces of
`chunk`; each piece makes the student's and the teacher's [B,chunk,V] logits, reduces them to
per-token numbers and drops them (`jax.checkpoint`: the backward pass remakes both, so the
teacher's output head runs twice per step), so neither [B,T,V] tensor exists. The teacher's side
is under `stop_gradient`: only the student's logits receive a gradient.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

DIVERGENCES = ("forward", "reverse", "jsd")


@dataclasses.dataclass(frozen=True)
class KDConfig:
    """alpha: weight of the KD term (1 = distillation only); temperature: τ; topk: None = the full
    vocabulary; divergence: one of DIVERGENCES."""

    alpha: float = 0.5
    temperature: float = 1.0
    topk: int | None = None
    divergence: str = "forward"

    def validate(self, vocab_size: int | None = None) -> None:
        """ValueError naming the train.* setting and its value."""
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"train.kd_alpha={self.alpha!r} must be in [0, 1]")
        if not self.temperature > 0:
            raise ValueError(f"train.kd_temperature={self.temperature!r} must be > 0")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"KD divergence {self.divergence!r} is not one of {DIVERGENCES}")
        if self.topk is not None:
            if not isinstance(self.topk, int) or isinstance(self.topk, bool) or self.topk <= 0:
                raise ValueError(f"train.kd_topk={self.topk!r} must be a positive integer or None")
            if vocab_size is not None and self.topk > vocab_size:
                raise ValueError(f"train.kd_topk={self.topk} exceeds the vocabulary ({vocab_size})")
            if self.divergence != "forward":
                raise ValueError(f"train.kd_topk={self.topk} needs the forward divergence, not "
                                 f"{self.divergence!r}")

    def mix(self, lm, kd):
        """(1 - α)·LM + α·τ²·KD."""
        return (1.0 - self.alpha) * lm + self.alpha * self.temperature ** 2 * kd


def divergence(s_logits_BcV, t_logits_BcV, kd: KDConfig):
    """Per-token divergence [B,c] between the teacher's and the student's logits at τ."""
    logp_s = jax.nn.log_softmax(s_logits_BcV / kd.temperature, axis=-1)
    if kd.topk is not None:
        t_vals_Bck, ids_Bck = jax.lax.top_k(t_logits_BcV, kd.topk)
        logp_t_Bck = jax.nn.log_softmax(t_vals_Bck / kd.temperature, axis=-1)
        logp_s_Bck = jnp.take_along_axis(logp_s, ids_Bck, axis=-1)
        return jnp.sum(jnp.exp(logp_t_Bck) * (logp_t_Bck - logp_s_Bck), axis=-1)
    logp_t = jax.nn.log_softmax(t_logits_BcV / kd.temperature, axis=-1)
    if kd.divergence == "forward":
        return jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
    if kd.divergence == "reverse":
        return jnp.sum(jnp.exp(logp_s) * (logp_s - logp_t), axis=-1)
    log_m = jnp.logaddexp(logp_t, logp_s) - math.log(2.0)
    return 0.5 * jnp.sum(jnp.exp(logp_t) * (logp_t - log_m) + jnp.exp(logp_s) * (logp_s - log_m), axis=-1)


def map_position_chunks(piece: Callable, chunk: int | None, *xs_BT):
    """`piece(*x)` over pieces of `chunk` positions of [B,T,...] arrays (rematerialised in the
    backward pass), outputs [B,T,...] again; all at once when chunk is None or does not divide T."""
    B, T = xs_BT[0].shape[:2]
    if not chunk or T <= chunk or T % chunk:
        return piece(*xs_BT)
    n = T // chunk
    split = lambda x: jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)  # noqa: E731
    join = lambda y: jnp.moveaxis(y, 0, 1).reshape(B, T, *y.shape[3:])  # noqa: E731
    out = jax.lax.map(lambda a: jax.checkpoint(piece)(*a), tuple(split(x) for x in xs_BT))
    return jax.tree.map(join, out)


def token_terms(student_logits: Callable, h_BTD, teacher_logits: Callable, ht_BTD, targets_BT, kd: KDConfig,
                chunk: int | None = None) -> dict:
    """Per token [B,T] (fp32): `lse` and `target` of the student's logits (the LM loss, as
    `token_lse_and_target`), `kd` (the divergence at τ) and `agree` (1 where the student's and the
    teacher's most likely tokens are the same). `student_logits` / `teacher_logits` map final
    hidden states [B,c,D] to logits [B,c,V]; `ht_BTD` are the teacher's final hidden states."""
    ht_BTD = jax.lax.stop_gradient(ht_BTD)

    def piece(h, ht, t):
        s = student_logits(h).astype(jnp.float32)
        tl = jax.lax.stop_gradient(teacher_logits(ht).astype(jnp.float32))
        lse = jax.nn.logsumexp(s, axis=-1)
        target = jnp.take_along_axis(s, t[..., None], axis=-1)[..., 0]
        agree = (jnp.argmax(s, axis=-1) == jnp.argmax(tl, axis=-1)).astype(jnp.float32)
        return {"lse": lse, "target": target, "kd": divergence(s, tl, kd), "agree": agree}

    return map_position_chunks(piece, chunk, h_BTD, ht_BTD, targets_BT)

