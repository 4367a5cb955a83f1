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
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from qwen3_jax import sharding
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
        return embed_lookup(self.embedding[...], tokens_BT, self.dtype)

    def attend(self, x_BTD):
        """Tied output head: logits in fp32."""
        return jnp.einsum("btd,vd->btv", x_BTD, self.embedding[...].astype(x_BTD.dtype),
                          preferred_element_type=jnp.float32)


def embed_lookup(table_VD, tokens_BT, dtype):
    """table[tokens] cast to `dtype`: [B,T,D], batch-sharded like the tokens under sharding rules.

    Without rules a plain `jnp.take`. With rules the table is sharded (vocab, embed) and the tokens
    (batch, seq); when a mesh axis splits both the table's D and the batch (FSDP: `embed` and
    `batch` both on fsdp), GSPMD cannot move the gathered rows (or their cotangent, in the
    backward) between the two layouts and replicates them in full ("involuntary full
    rematerialization"), or builds a full-size [V,D] table gradient and all-reduces it. Here each
    device instead gathers the tokens of the devices that share its table shard (int32, small),
    looks them up in its own [V/v, D/d] shard, and an all-to-all hands every device its own rows
    with the whole D; vocab shards are masked and summed (one non-zero term: exact). The backward
    is the transpose: all-to-all back and a scatter-add into the local shard. Same values as
    `jnp.take`: the rows are cast after the gather, as before.
    """
    ctx = sharding.active()
    if ctx is None:
        return jnp.take(table_VD, tokens_BT, axis=0).astype(dtype)
    mesh, rules = ctx.mesh, ctx.rules
    t_spec = sharding.logical_to_spec(("vocab", "embed"), rules, mesh, table_VD.shape)
    x_spec = sharding.logical_to_spec(("batch", "seq"), rules, mesh, tokens_BT.shape)
    axes = lambda entry: () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)  # noqa: E731
    v_axes, d_axes = axes(t_spec[0]), axes(t_spec[1])
    b_axes, s_axes = axes(x_spec[0]), axes(x_spec[1])  # s_axes: context parallelism's sequence split
    if not v_axes and not d_axes:
        return jnp.take(table_VD, tokens_BT, axis=0).astype(dtype)
    token_dim = {**{a: 0 for a in b_axes}, **{a: 1 for a in s_axes}}
    gather_axes = tuple(a for a in mesh.axis_names if a in token_dim and a in v_axes + d_axes)  # mesh order
    d_gathered = tuple(a for a in gather_axes if a in d_axes)
    if d_gathered != d_axes[len(d_axes) - len(d_gathered):]:
        # The all-to-alls below hand back whole D blocks only when the gathered D axes are the
        # minor ones of the table's D sharding, in the same order (e.g. D over (fsdp, expert)
        # with a batch too small to split over expert); otherwise let GSPMD do the gather.
        return jnp.take(table_VD, tokens_BT, axis=0).astype(dtype)
    V_loc = table_VD.shape[0] // math.prod(mesh.shape[a] for a in v_axes)

    def local(table_vd, tok_bt):
        for a in gather_axes:  # after the loop dim 0 is [last axis][...][first axis][own rows]
            tok_bt = jax.lax.all_gather(tok_bt, a, axis=token_dim[a], tiled=True)
        if v_axes:
            shard = 0
            for a in v_axes:  # the table's vocab shard index (major axis first, as the spec)
                shard = shard * mesh.shape[a] + jax.lax.axis_index(a)
            idx = tok_bt - shard * V_loc
            hit = (idx >= 0) & (idx < V_loc)
            rows = jnp.take(table_vd, jnp.where(hit, idx, 0), axis=0)
            rows = jnp.where(hit[..., None], rows, jnp.zeros((), rows.dtype)).astype(dtype)
        else:
            rows = jnp.take(table_vd, tok_bt, axis=0).astype(dtype)
        for a in reversed(gather_axes):  # undo the gathers, major axis first
            if a in d_axes:  # rows of device j go back to j, which gets every D slice of them
                rows = jax.lax.all_to_all(rows, a, token_dim[a], 2, tiled=True)
            else:  # a vocab axis: sum the masked lookups, each device keeping its own rows
                rows = jax.lax.psum_scatter(rows, a, scatter_dimension=token_dim[a], tiled=True)
        rest_v = tuple(a for a in v_axes if a not in gather_axes)
        return jax.lax.psum(rows, rest_v) if rest_v else rows

    d_rest = tuple(a for a in d_axes if a not in gather_axes)
    out_spec = P(x_spec[0], x_spec[1], None if not d_rest else d_rest[0] if len(d_rest) == 1 else d_rest)
    return jax.shard_map(local, mesh=mesh, in_specs=(t_spec, x_spec), out_specs=out_spec)(table_VD, tokens_BT)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.ffn_dim
        self.gate = param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.up = param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.down = param(rngs, (f, d), ("mlp", "embed"), cfg)

    def __call__(self, x_BTD):
        dt = x_BTD.dtype
        g_BTF = checkpoint_name(jnp.einsum("btd,df->btf", x_BTD, self.gate[...].astype(dt)), "mlp_wi")
        u_BTF = checkpoint_name(jnp.einsum("btd,df->btf", x_BTD, self.up[...].astype(dt)), "mlp_wi")
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
