"""Expert-parallel MoE inside `jax.shard_map`: tokens travel to the experts' devices and back.

The router runs outside (GSPMD, global view, so its statistics cover the global batch). Inside
the shard_map each device holds N local tokens (the batch is split over data × fsdp × expert)
and E/X experts (X = size of the `expert` mesh axis; the expert weights' `embed` dim is
all-gathered over fsdp by GSPMD on the way in, their `expert_mlp` dim stays split over tensor
and the partial outputs are summed over tensor at the end).

Exchange strategies (`sharding.use_rules(..., moe_exchange=...)`):
  ragged  sort the N·k assignments by expert, `jax.lax.ragged_all_to_all` each device's slice to
          the device owning those experts, grouped matmul (`jax.lax.ragged_dot`) over the
          received rows, ragged_all_to_all back, un-sort, combine with the router weights.
          Communication and compute ∝ tokens·k. For TPU/GPU (XLA:CPU cannot run it). On TPU
          the grouped matmuls are megablox's (Pallas gmm/tgmm, which skip the buffer's empty
          tiles): XLA:TPU turns the weight gradient of `lax.ragged_dot` into a masked dense
          matmul over every local expert × every buffer row (20x the model's FLOPs at 30b-a3b).
  gather  all-gather the tokens of the expert axis, each device runs its own experts on the
          assignments that chose them, reduce-scatter the partial outputs back. Exact, runs on
          XLA:CPU: the reference for testing the same numerics on fake devices.
  auto    ragged on TPU/GPU, gather on CPU.

Dropless by default: the receive buffer holds the worst case (X·N·k rows: every token of the
expert group choosing this device), so no routing skew loses a token. With `capacity_factor=c`
each device sends at most ceil(c·N·k/E) assignments per expert (the rest are dropped, first
come first served in token order) and the buffers shrink to E·that.

Local grouped matmul (gather strategy) follows `ModelConfig.moe_impl`: `dense` = one batched
einsum over the local experts (fastest on CPU), `ragged` = sort + ragged_dot; with a capacity,
padded [E_loc, C, D] buffers and a batched einsum.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen3_jax import sharding

EXCHANGES = ("auto", "gather", "ragged")


def _exclusive_cumsum(x):
    return jnp.cumsum(x) - x


def _buffer(shape, dtype, like):
    """A zero receive buffer that varies over the same mesh axes as `like`, without a gradient
    path: left invariant, shard_map would insert a pvary whose transpose all-reduces the
    (whole, X·N·k-row) buffer's cotangent in the backward pass."""
    buf = jnp.zeros(shape, dtype)
    aval = jax.typeof(like)
    vma = getattr(aval, "vma", None) or getattr(getattr(aval, "manual_axis_type", None), "varying", ())
    vma = tuple(sorted(vma))
    if vma:
        buf = jax.lax.pcast(buf, vma, to="varying")
    return jax.lax.stop_gradient(buf)


def capacity_per_source(n_tokens: int, k: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """Assignments one device may send to one expert (None: dropless)."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * n_tokens * k / num_experts))


def apply_capacity(ids_Nk, weights_Nk, num_experts: int, cap: int | None):
    """Assignments beyond `cap` per expert (in token order) get id `num_experts` and weight 0."""
    if cap is None:
        return ids_Nk, weights_Nk
    flat = ids_Nk.reshape(-1)
    onehot_AE = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)
    rank = jnp.sum((jnp.cumsum(onehot_AE, axis=0) - 1) * onehot_AE, axis=-1)
    keep = (rank < cap).reshape(ids_Nk.shape)
    return jnp.where(keep, ids_Nk, num_experts), jnp.where(keep, weights_Nk, 0)


# -- local expert computation --------------------------------------------------------------------

def _tile(n: int, pref: int) -> int:
    t = min(pref, n)
    while n % t:
        t //= 2
    return max(t, 1)


def _gmm(x_RK, w_GKN, group_sizes, dt, interpret=False):
    """Megablox grouped matmul (Pallas, TPU): forward and both gradients visit only the tiles the
    groups cover, so the work follows the rows really received, not the buffer. (XLA:TPU lowers
    the weight gradient of `lax.ragged_dot` to a masked dense matmul over every local expert ×
    every buffer row: E_loc × the worst case.)"""
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    R, K = x_RK.shape
    N = w_GKN.shape[2]
    t = min(512, K, N)  # the backward swaps K and N under the same tiling: one size for both
    return gmm(x_RK, w_GKN.astype(dt), group_sizes, dt, (_tile(R, 512), t, t), None, None, False, interpret)


def megablox_ok(d_model: int, ffn_local: int) -> bool:
    """Megablox tiles need 128-multiples in both matmul dims (the tiny test presets are smaller)."""
    return d_model % 128 == 0 and ffn_local % 128 == 0


def _grouped(xs_RD, group_sizes, gate, up, down, kernel: str = "ragged_dot"):
    """Rows sorted by local expert, `group_sizes` [E_loc]; rows past their sum give 0.
    kernel: `ragged_dot` (jax.lax, any backend), `megablox` (TPU) or `megablox_interpret` (tests)."""
    dt = xs_RD.dtype
    if kernel.startswith("megablox"):
        interp = kernel.endswith("interpret")
        # gmm leaves the rows past the groups unwritten (garbage): zero them, so that neither
        # values nor (0 * NaN) gradients leak from the empty tail
        live_R1 = (jnp.arange(xs_RD.shape[0]) < jnp.sum(group_sizes))[:, None]
        g = _gmm(xs_RD, gate, group_sizes, dt, interp)
        u = _gmm(xs_RD, up, group_sizes, dt, interp)
        h = jnp.where(live_R1, jax.nn.silu(g) * u, 0)
        return jnp.where(live_R1, _gmm(h, down, group_sizes, dt, interp), 0)
    g = jax.lax.ragged_dot(xs_RD, gate.astype(dt), group_sizes)
    u = jax.lax.ragged_dot(xs_RD, up.astype(dt), group_sizes)
    return jax.lax.ragged_dot(jax.nn.silu(g) * u, down.astype(dt), group_sizes)


def local_experts(x_MD, w_Mk, local_Mk, gate, up, down, form: str, cap_rows: int | None):
    """sum_k w · expert_{local}(x) over the E_loc local experts; `local` = E_loc means none."""
    M, D = x_MD.shape
    k = local_Mk.shape[1]
    E_loc = gate.shape[0]
    dt = x_MD.dtype
    w_Mk = w_Mk.astype(dt)
    if cap_rows is not None:  # padded buffers [E_loc, C, D]: one batched einsum
        flat = local_Mk.reshape(-1)
        onehot_AE = jax.nn.one_hot(flat, E_loc, dtype=jnp.int32)
        slot = jnp.sum((jnp.cumsum(onehot_AE, axis=0) - 1) * onehot_AE, axis=-1)
        slot = jnp.where(flat < E_loc, slot, cap_rows)  # out of range: dropped by the scatter
        buf_ECD = jnp.zeros((E_loc, cap_rows, D), dt).at[flat, slot].set(
            jnp.repeat(x_MD, k, axis=0), mode="drop")
        h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf_ECD, gate.astype(dt))) * \
            jnp.einsum("ecd,edf->ecf", buf_ECD, up.astype(dt))
        out_ECD = jnp.einsum("ecf,efd->ecd", h, down.astype(dt))
        y_AD = out_ECD.at[flat, slot].get(mode="fill", fill_value=0)
        return jnp.einsum("mkd,mk->md", y_AD.reshape(M, k, D), w_Mk)
    if form == "dense":
        combine_ME = jnp.einsum("mk,mke->me", w_Mk, jax.nn.one_hot(local_Mk, E_loc, dtype=dt))
        g = jnp.einsum("md,edf->mef", x_MD, gate.astype(dt))
        u = jnp.einsum("md,edf->mef", x_MD, up.astype(dt))
        return jnp.einsum("mef,efd->md", jax.nn.silu(g) * u * combine_ME[..., None], down.astype(dt))
    flat = local_Mk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=E_loc).astype(jnp.int32)
    ys_AD = _grouped(jnp.take(x_MD, order // k, axis=0), sizes, gate, up, down)
    y_MkD = jnp.take(ys_AD, jnp.argsort(order), axis=0).reshape(M, k, D)
    return jnp.einsum("mkd,mk->md", y_MkD, w_Mk)


# -- per-device bodies ---------------------------------------------------------------------------

def _gather_body(x_ND, w_Nk, ids_Nk, gate, up, down, *, form, cap, tensor_axes):
    X = jax.lax.axis_size("expert")
    E_loc = gate.shape[0]
    x_MD = jax.lax.all_gather(x_ND, "expert", axis=0, tiled=True)
    w_Mk = jax.lax.all_gather(w_Nk, "expert", axis=0, tiled=True)
    ids_Mk = jax.lax.all_gather(ids_Nk, "expert", axis=0, tiled=True)
    local = ids_Mk - jax.lax.axis_index("expert") * E_loc
    valid = (local >= 0) & (local < E_loc)
    local, w_Mk = jnp.where(valid, local, E_loc), jnp.where(valid, w_Mk, 0)
    cap_rows = None if cap is None else X * cap
    y_MD = local_experts(x_MD, w_Mk, local, gate, up, down, form, cap_rows)
    y_ND = jax.lax.psum_scatter(y_MD, "expert", scatter_dimension=0, tiled=True)
    return jax.lax.psum(y_ND, tensor_axes) if tensor_axes else y_ND


def _ragged_body(x_ND, w_Nk, ids_Nk, gate, up, down, *, cap, tensor_axes, kernel="ragged_dot"):
    X = jax.lax.axis_size("expert")
    E_loc = gate.shape[0]
    E = X * E_loc
    N, D = x_ND.shape
    k = ids_Nk.shape[1]
    A = N * k
    dt = x_ND.dtype
    # 1. sort this device's assignments by expert (dropped ones, id E, go last and stay home)
    flat = ids_Nk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    xs_AD = jnp.take(x_ND, order // k, axis=0)
    sizes_XE = jnp.bincount(flat, length=E).astype(jnp.int32).reshape(X, E_loc)
    send = sizes_XE.sum(1)
    in_off = _exclusive_cumsum(send)
    # 2. sizes: recv_XE[s, e] = rows source s sends me for my local expert e
    recv_XE = jax.lax.all_to_all(sizes_XE, "expert", 0, 0, tiled=True)
    recv = recv_XE.sum(1)
    recv_off = _exclusive_cumsum(recv)  # where source s lands in my buffer
    out_off = jax.lax.all_to_all(recv_off, "expert", 0, 0, tiled=True)  # where I land in device j's
    rows = X * A if cap is None else E * cap
    buf_RD = jax.lax.ragged_all_to_all(xs_AD, _buffer((rows, D), dt, xs_AD), in_off, send, out_off, recv,
                                       axis_name="expert")
    # 3. the buffer is (source, local expert)-major: sort it by local expert, grouped matmul
    ends = jnp.cumsum(recv_XE.reshape(-1))
    seg = jnp.searchsorted(ends, jnp.arange(rows, dtype=ends.dtype), side="right")
    local = jnp.where(seg < X * E_loc, seg % E_loc, E_loc)
    order_r = jnp.argsort(local, stable=True)
    ys_RD = _grouped(jnp.take(buf_RD, order_r, axis=0), recv_XE.sum(0), gate, up, down, kernel)
    ys_RD = jnp.take(ys_RD, jnp.argsort(order_r), axis=0)
    # 4. back to the sources, into their sorted layout; un-sort and combine
    back_off = jax.lax.all_to_all(in_off, "expert", 0, 0, tiled=True)
    ys_AD = jax.lax.ragged_all_to_all(ys_RD, _buffer((A, D), dt, ys_RD), recv_off, recv, back_off, send,
                                      axis_name="expert")
    y_NkD = jnp.take(ys_AD, jnp.argsort(order), axis=0).reshape(N, k, D)
    y_ND = jnp.einsum("nkd,nk->nd", y_NkD, w_Nk.astype(dt))
    return jax.lax.psum(y_ND, tensor_axes) if tensor_axes else y_ND


# -- entry point -----------------------------------------------------------------------------------

def resolve_exchange(ctx: sharding.Context) -> str:
    if ctx.moe_exchange not in EXCHANGES:
        raise ValueError(f"moe_exchange={ctx.moe_exchange!r} is not one of {EXCHANGES}")
    if ctx.moe_exchange != "auto":
        return ctx.moe_exchange
    return "gather" if ctx.platform == "cpu" else "ragged"


def experts_parallel(x_BTD, weights_BTk, ids_BTk, gate_EDF, up_EDF, down_EFD, *,
                     ctx: sharding.Context, form: str = "ragged"):
    """The MoE expert computation with experts split over the `expert` mesh axis → [B,T,D]."""
    mesh, rules = ctx.mesh, ctx.rules
    B, T, D = x_BTD.shape
    E = gate_EDF.shape[0]
    X = mesh.shape["expert"]
    k = ids_BTk.shape[-1]
    batch_axes = sharding.mesh_axes_for("batch", rules, mesh)
    if "expert" not in batch_axes or sharding.mesh_axes_for("experts", rules, mesh) != ("expert",):
        raise ValueError("expert parallelism needs the rules to map `batch` onto (..., 'expert') and "
                         f"`experts` onto 'expert'; got batch->{batch_axes}")
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    if (B * T) % shards or E % X:
        raise ValueError(f"expert parallelism: {B}x{T} tokens over {shards} batch shards, {E} experts over "
                         f"expert={X}: not divisible")
    tensor_axes = tuple(a for a in sharding.mesh_axes_for("expert_mlp", rules, mesh) if a not in batch_axes)
    tp = tensor_axes if tensor_axes else None
    if tp is not None and len(tp) == 1:
        tp = tp[0]
    cap = capacity_per_source((B * T) // shards, k, E, ctx.capacity_factor)
    exchange = resolve_exchange(ctx)
    kernel = "ragged_dot"
    if exchange == "gather":
        body = lambda *a: _gather_body(*a, form=form, cap=cap, tensor_axes=tensor_axes)  # noqa: E731
    else:
        tp_size = math.prod(mesh.shape[a] for a in tensor_axes)
        if ctx.platform == "tpu" and megablox_ok(D, gate_EDF.shape[2] // tp_size):
            kernel = "megablox"
        body = lambda *a: _ragged_body(*a, cap=cap, tensor_axes=tensor_axes, kernel=kernel)  # noqa: E731

    def per_device(x_ND, w_Nk, ids_Nk, gate, up, down):
        ids_Nk, w_Nk = apply_capacity(ids_Nk, w_Nk, E, cap)
        return body(x_ND, w_Nk, ids_Nk, gate, up, down)

    tok = P(batch_axes, None)
    fn = jax.shard_map(per_device, mesh=mesh,
                       in_specs=(tok, tok, tok, P("expert", None, tp), P("expert", None, tp), P("expert", tp, None)),
                       out_specs=tok,
                       # Pallas outputs carry no varying-axes type; unchecked, shard_map's transpose
                       # still psums the weights' cotangents over the axes their specs omit
                       check_vma=kernel != "megablox")
    y_ND = fn(x_BTD.reshape(B * T, D), weights_BTk.reshape(B * T, k), ids_BTk.reshape(B * T, k),
              gate_EDF, up_EDF, down_EFD)
    return y_ND.reshape(B, T, D)
