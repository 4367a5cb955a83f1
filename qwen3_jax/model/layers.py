"""Building blocks: parameters with logical axes, RMSNorm, embeddings, rotary positions, SwiGLU.

Einsum letters used across the model: B batch, T query length, S key length, N query heads,
K kv heads, G query heads per kv head, H head dim, D model dim, F ffn dim, E experts, V vocab.
Every parameter carries `axes`: one logical name per dimension (`qwen3_jax.sharding` maps them
to mesh axes); stacked layers get a leading `layers` axis.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3_jax.config import ModelConfig


def param(rngs: nnx.Rngs | None, shape, axes, cfg: ModelConfig, init: str = "normal") -> nnx.Param:
    """A parameter of `shape` with logical `axes`, in the config's parameter dtype."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and axes {axes} differ in rank")
    dtype = jnp.dtype(cfg.param_dtype)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (cfg.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=tuple(axes))


def cdtype(cfg: ModelConfig):
    return jnp.dtype(cfg.compute_dtype)


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale, normalised in fp32 (as transformers' Qwen3RMSNorm)."""

    def __init__(self, dim: int, cfg: ModelConfig, axis_name: str = "embed"):
        self.scale = param(None, (dim,), (axis_name,), cfg, init="ones")
        self.eps = cfg.rms_eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.scale[...].astype(x.dtype)


class Embed(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.embedding = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        self.dtype = cdtype(cfg)

    def __call__(self, tokens_BT):
        return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTD):
        """Tied output head: logits in fp32."""
        return jnp.einsum("btd,vd->btv", x_BTD, self.embedding[...].astype(x_BTD.dtype),
                          preferred_element_type=jnp.float32)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.ffn_dim
        self.gate = param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.up = param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.down = param(rngs, (f, d), ("mlp", "embed"), cfg)

    def __call__(self, x_BTD):
        dt = x_BTD.dtype
        g_BTF = jnp.einsum("btd,df->btf", x_BTD, self.gate[...].astype(dt))
        u_BTF = jnp.einsum("btd,df->btf", x_BTD, self.up[...].astype(dt))
        return jnp.einsum("btf,fd->btd", jax.nn.silu(g_BTF) * u_BTF, self.down[...].astype(dt))


# -- rotary position embeddings ------------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig, rope_theta: float | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies [H/2] and the cos/sin scale ("attention factor"), as transformers.

    Plain RoPE when `cfg.rope_scaling` is None; YaRN (NTK-by-parts interpolation with a ramp
    between beta_fast and beta_slow rotations, arXiv 2309.00071) otherwise.
    """
    base = float(cfg.rope_theta if rope_theta is None else rope_theta)
    dim = cfg.head_dim
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    ys = cfg.rope_scaling
    if ys is None:
        return inv_freq, 1.0

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = ys.factor
    attention_factor = ys.attention_factor
    if attention_factor is None:
        if ys.mscale and ys.mscale_all_dim:
            attention_factor = mscale(factor, ys.mscale) / mscale(factor, ys.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):
        return dim * math.log(ys.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(ys.beta_fast), correction_dim(ys.beta_slow)
    if ys.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = 1.0 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_interp = (1.0 / (factor * pos_freqs)).astype(np.float32)
    inv_freq = inv_interp * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(positions_BT, cfg: ModelConfig):
    """cos and sin [B,T,H/2] in fp32 for integer positions."""
    inv_freq, scale = rope_inv_freq(cfg)
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x_BTNH, cos_BTh, sin_BTh):
    """Rotate-half RoPE: the first and second halves of the head dim form the pairs."""
    dt = x_BTNH.dtype
    cos, sin = cos_BTh[:, :, None, :].astype(dt), sin_BTh[:, :, None, :].astype(dt)
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
