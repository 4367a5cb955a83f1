"""Expert-parallel MoE inside `jax.shard_map`: tokens travel to the experts' devices and back.

The router runs outside (GSPMD, global view, so its statistics cover the global batch). Inside
the shard_map each device holds N local tokens (the batch is split over data × fsdp × expert)
and E/X experts (X = size of the `expert` mesh axis; the expert weights' `embed` dim is
all-gathered over fsdp by GSPMD on the way in, their `expert_mlp` dim stays split over tensor
and the partial outputs are summed over tensor at the end).

Exchange strategies (`sharding.use_rules(..., moe_exchange=...)`; the old name 'ragged' of
ragged_all_to_all is still accepted, with a warning: `canonical_exchange`):
  ragged_all_to_all  sort the N·k assignments by expert, `jax.lax.ragged_all_to_all` each
          device's slice to the device owning those experts, the local experts over the
          received rows, ragged_all_to_all back, un-sort, combine with the router weights.
          Communication ∝ tokens·k. For TPU/GPU (XLA:CPU cannot run it).
  gather  all-gather the tokens of the expert axis, each device runs its own experts on the
          assignments that chose them, reduce-scatter the partial outputs back. Exact, runs on
          XLA:CPU: the reference for testing the same numerics on fake devices.
  auto    ragged_all_to_all on TPU/GPU, gather on CPU.

Dropless by default: the receive buffer holds the worst case (X·N·k rows: every token of the
expert group choosing this device), so no routing skew loses a token. Under a remat policy that
keeps the experts' gate/up outputs (`moe_wi`), its rows sorted by expert go through the experts
in two parts: the first ceil(ModelConfig.moe_saved_rows · N·k) (the blocked form: the blocks that
can hold them), whose outputs are named and kept (~1.25x what a device receives on average, not
the worst case), and the rest, there only when routing sends this device more, recomputed in
the backward pass. With `capacity_factor=c`
each device sends at most ceil(c·N·k/E) assignments per expert (the rest are dropped, first
come first served in token order) and the buffers shrink to E·that.

Local expert computation: both exchanges run `ModelConfig.moe_impl`'s form over the local
experts, resolved for the devices' platform as on one device (`moe_compute.resolve_impl`: auto =
megablox on TPU when the dims are 128-multiples, else ragged_dot; blocked on GPU and CPU, where
XLA expands ragged_dot into a masked copy of the rows per expert); an explicit form is honoured.
The gather exchange with a capacity uses padded [E_loc, C, D] buffers and a batched einsum. The
ragged_all_to_all exchange's received rows go through the grouped matmuls (ragged_dot, megablox:
sorted by local expert first) or the blocked/dense form (`local_rows`). Its sizes/offsets
(`send_plan`, `recv_plan`, `buffer_order`) are separate functions and its collectives an object
(`LaxCollectives`), so that tests run it through a numpy emulator of ragged_all_to_all. On TPU
the grouped matmuls are megablox's (Pallas gmm/tgmm, which skip the buffer's empty tiles):
XLA:TPU turns the weight gradient of `lax.ragged_dot` into a masked dense matmul over every
local expert × every buffer row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen3_jax import errors, sharding
from qwen3_jax.model import moe_compute
from qwen3_jax.model.moe_compute import (GROUPED, exclusive_cumsum, expert_ranks, grouped_swiglu_gathered,
                                         sort_by_expert, swiglu_blocks, unsort_combine)

EXCHANGES = ("auto", "gather", "ragged_all_to_all")
EXCHANGE_RENAMES = {"ragged": "ragged_all_to_all"}  # old value -> new (still accepted, with a warning)


def canonical_exchange(value: str, setting: str = "train.moe_exchange") -> str:
    """`value` with an old exchange name replaced by its new one (logged once per process as a
    renamed `setting`); any other value unchanged (`resolve_exchange` rejects unknown ones)."""
    new = EXCHANGE_RENAMES.get(value)
    if new is None:
        return value
    errors.renamed(setting, value, new)
    return new


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
    keep = (expert_ranks(ids_Nk.reshape(-1), num_experts) < cap).reshape(ids_Nk.shape)
    return jnp.where(keep, ids_Nk, num_experts), jnp.where(keep, weights_Nk, 0)


# -- local expert computation --------------------------------------------------------------------

def local_experts(x_MD, w_Mk, local_Mk, gate, up, down, form: str, cap_rows: int | None):
    """sum_k w · expert_{local}(x) over the E_loc local experts; `local` = E_loc means none."""
    M, D = x_MD.shape
    k = local_Mk.shape[1]
    E_loc = gate.shape[0]
    dt = x_MD.dtype
    w_Mk = w_Mk.astype(dt)
    if cap_rows is not None:  # padded buffers [E_loc, C, D]: one batched einsum
        flat = local_Mk.reshape(-1)
        slot = jnp.where(flat < E_loc, expert_ranks(flat, E_loc), cap_rows)  # out of range: dropped by the scatter
        buf_ECD = jnp.zeros((E_loc, cap_rows, D), dt).at[flat, slot].set(
            jnp.repeat(x_MD, k, axis=0), mode="drop")
        out_ECD = swiglu_blocks(buf_ECD, gate, up, down)  # one block of cap_rows rows per local expert
        y_AD = out_ECD.at[flat, slot].get(mode="fill", fill_value=0)
        return jnp.einsum("mkd,mk->md", y_AD.reshape(M, k, D), w_Mk)
    return moe_compute.experts(x_MD, w_Mk, local_Mk, gate, up, down, form)


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


class LaxCollectives:
    """The collectives of the ragged_all_to_all exchange over the `expert` mesh axis (inside shard_map).
    Tests substitute an emulator with the same methods (tests/test_ragged_exchange.py)."""

    def axis_size(self):
        return jax.lax.axis_size("expert")

    def all_to_all(self, x):
        return jax.lax.all_to_all(x, "expert", 0, 0, tiled=True)

    def ragged_all_to_all(self, operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                         axis_name="expert")


def send_plan(ids_Nk, X: int, E_loc: int):
    """This device's assignments sorted by expert (dropped ones, id E = X·E_loc, last: they stay
    home). Returns order_A (sorted position -> assignment token·k + slot), sizes_XE [X,E_loc]
    (rows for each device's each local expert), send_X (rows per destination) and in_off_X
    (where each destination's slice starts in the sorted rows)."""
    order_A, sizes_E = sort_by_expert(ids_Nk.reshape(-1), X * E_loc)
    sizes_XE = sizes_E.reshape(X, E_loc)
    send_X = sizes_XE.sum(1)
    return order_A, sizes_XE, send_X, exclusive_cumsum(send_X)


def recv_plan(recv_XE):
    """From recv_XE[s, e] (rows source s sends me for my local expert e): recv_X rows per
    source and recv_off_X, where each source's slice lands in my buffer (source-major)."""
    recv_X = recv_XE.sum(1)
    return recv_X, exclusive_cumsum(recv_X)


def buffer_experts(recv_XE, rows: int):
    """The received buffer is (source, local expert)-major: the local expert of each of its
    `rows` rows [R] (E_loc for the rows past the received ones: no expert)."""
    X, E_loc = recv_XE.shape
    ends = jnp.cumsum(recv_XE.reshape(-1))
    seg_R = jnp.searchsorted(ends, jnp.arange(rows, dtype=ends.dtype), side="right")
    return jnp.where(seg_R < X * E_loc, seg_R % E_loc, E_loc)


def buffer_order(recv_XE, rows: int):
    """order_R, the stable sort of the buffer's rows by local expert (the rows past the received
    ones last), and the group sizes [E_loc]."""
    return jnp.argsort(buffer_experts(recv_XE, rows), stable=True), recv_XE.sum(0)


def local_rows(buf_RD, recv_XE, gate, up, down, form: str, keep: int | None):
    """The local experts over the received buffer's rows [R,D] (each row one assignment, rows past
    the received ones give 0) in form `form`: the grouped matmuls over the rows sorted by local
    expert, or the blocked / dense form with the buffer as R one-assignment tokens. `keep`: the
    rows whose gate/up outputs are named `moe_wi` (None: all)."""
    R = buf_RD.shape[0]
    if form in GROUPED:
        order_R, group_sizes = buffer_order(recv_XE, R)
        return grouped_swiglu_gathered(buf_RD, order_R, group_sizes, gate, up, down, form, keep)
    ids_R1 = buffer_experts(recv_XE, R)[:, None]
    w_R1 = jnp.ones((R, 1), buf_RD.dtype)
    if form == "blocked":
        return moe_compute.experts_blocked(buf_RD, w_R1, ids_R1, gate, up, down, keep_rows=keep)
    return moe_compute.experts(buf_RD, w_R1, ids_R1, gate, up, down, form)


def saved_rows(n_tokens: int, k: int, factor: float | None) -> int | None:
    """Rows of the dropless receive buffer whose gate/up outputs are named `moe_wi`:
    ceil(factor · N·k), N·k being what a device receives on average (None: every row)."""
    return None if factor is None else math.ceil(factor * n_tokens * k)


def _ragged_body(x_ND, w_Nk, ids_Nk, gate, up, down, *, cap, tensor_axes, form="ragged_dot",
                 comm=LaxCollectives(), saved=None):
    X = comm.axis_size()
    E_loc = gate.shape[0]
    E = X * E_loc
    N, D = x_ND.shape
    k = ids_Nk.shape[1]
    A = N * k
    dt = x_ND.dtype
    # 1. sort this device's assignments by expert
    order_A, sizes_XE, send, in_off = send_plan(ids_Nk, X, E_loc)
    xs_AD = jnp.take(x_ND, order_A // k, axis=0)
    # 2. sizes: recv_XE[s, e] = rows source s sends me for my local expert e
    recv_XE = comm.all_to_all(sizes_XE)
    recv, recv_off = recv_plan(recv_XE)
    out_off = comm.all_to_all(recv_off)  # where I land in device j's buffer
    rows = X * A if cap is None else E * cap
    buf_RD = comm.ragged_all_to_all(xs_AD, _buffer((rows, D), dt, xs_AD), in_off, send, out_off, recv)
    # 3. the local experts over the received rows, in the buffer's order
    keep = saved_rows(N, k, saved) if cap is None else None  # a capacity bounds the buffer already
    ys_RD = local_rows(buf_RD, recv_XE, gate, up, down, form, keep)
    # 4. back to the sources, into their sorted layout; un-sort and combine
    back_off = comm.all_to_all(in_off)
    ys_AD = comm.ragged_all_to_all(ys_RD, _buffer((A, D), dt, ys_RD), recv_off, recv, back_off, send)
    y_ND = unsort_combine(ys_AD, order_A, w_Nk)
    return jax.lax.psum(y_ND, tensor_axes) if tensor_axes else y_ND


# -- entry point -----------------------------------------------------------------------------------

def resolve_exchange(exchange: str, platform: str) -> str:
    """The concrete exchange `exchange` (an old name is accepted) is on `platform`."""
    exchange = canonical_exchange(exchange, "moe_exchange")
    if exchange not in EXCHANGES:
        raise ValueError(f"moe_exchange={exchange!r} is not one of {EXCHANGES}")
    if exchange != "auto":
        return exchange
    return "gather" if platform == "cpu" else "ragged_all_to_all"


def plan(exchange: str, form: str, platform: str, d_model: int, ffn_local: int) -> tuple[str, str]:
    """(exchange, local expert form) that expert parallelism runs on `platform`: both resolved,
    the form as on one device (`moe_compute.resolve_impl`; each device runs its own experts, so a
    Pallas kernel is not split by GSPMD), whichever the exchange."""
    return resolve_exchange(exchange, platform), moe_compute.resolve_impl(form, platform, d_model, ffn_local)


def experts_parallel(x_BTD, weights_BTk, ids_BTk, gate_EDF, up_EDF, down_EFD, *,
                     ctx: sharding.Context, form: str = "auto", saved: float | None = None):
    """The MoE expert computation with experts split over the `expert` mesh axis → [B,T,D].
    `form`: ModelConfig.moe_impl, resolved here for the devices' platform and local ffn width
    (`plan`). `saved`: ModelConfig.moe_saved_rows (ragged_all_to_all exchange, dropless: the
    receive buffer's rows, × N·k, whose gate/up outputs the remat policies may keep; None: all)."""
    mesh, rules = ctx.mesh, ctx.rules
    B, T, D = x_BTD.shape
    E = gate_EDF.shape[0]
    X = mesh.shape["expert"]
    k = ids_BTk.shape[-1]
    batch_axes = sharding.mesh_axes_for("batch", rules, mesh)
    if "expert" not in batch_axes or sharding.mesh_axes_for("experts", rules, mesh) != ("expert",):
        raise ValueError("expert parallelism needs the rules to map `batch` onto (..., 'expert') and "
                         f"`experts` onto 'expert'; got batch->{batch_axes}")
    # tokens of a context-parallel shard route like any others: N = B·T split over batch × seq axes
    token_axes = batch_axes + tuple(a for a in sharding.mesh_axes_for("seq", rules, mesh) if a not in batch_axes)
    shards = math.prod(mesh.shape[a] for a in token_axes)
    if (B * T) % shards or E % X:
        raise ValueError(f"expert parallelism: {B}x{T} tokens over {shards} batch shards, {E} experts over "
                         f"expert={X}: not divisible")
    tensor_axes = tuple(a for a in sharding.mesh_axes_for("expert_mlp", rules, mesh) if a not in batch_axes)
    tp = tensor_axes if tensor_axes else None
    if tp is not None and len(tp) == 1:
        tp = tp[0]
    cap = capacity_per_source((B * T) // shards, k, E, ctx.capacity_factor)
    tp_size = math.prod(mesh.shape[a] for a in tensor_axes)
    exchange, form = plan(ctx.moe_exchange, form, ctx.platform, D, gate_EDF.shape[2] // tp_size)
    if exchange == "gather":
        body = lambda *a: _gather_body(*a, form=form, cap=cap, tensor_axes=tensor_axes)  # noqa: E731
    else:
        body = lambda *a: _ragged_body(*a, cap=cap, tensor_axes=tensor_axes, form=form, saved=saved)  # noqa: E731

    def per_device(x_ND, w_Nk, ids_Nk, gate, up, down):
        ids_Nk, w_Nk = apply_capacity(ids_Nk, w_Nk, E, cap)
        return body(x_ND, w_Nk, ids_Nk, gate, up, down)

    tok = P(token_axes, None)
    fn = jax.shard_map(per_device, mesh=mesh,
                       in_specs=(tok, tok, tok, P("expert", None, tp), P("expert", None, tp), P("expert", tp, None)),
                       out_specs=tok,
                       # Pallas outputs carry no varying-axes type (megablox; on TPU also ragged_dot's
                       # weight gradient under 8-bit training, qwen3_jax.quant's tgmm); unchecked,
                       # shard_map's transpose still psums the weights' cotangents over the axes their
                       # specs omit
                       check_vma=not (form.startswith("megablox") or (form == "ragged_dot" and ctx.platform == "tpu")))
    y_ND = fn(x_BTD.reshape(B * T, D), weights_BTk.reshape(B * T, k), ids_BTk.reshape(B * T, k),
              gate_EDF, up_EDF, down_EFD)
    return y_ND.reshape(B, T, D)
