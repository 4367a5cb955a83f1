"""Single-device forms of the MoE expert computation: Σ_k w · SwiGLU_{id_k}(x) per token.

Every form takes tokens flattened, x [N,D], top-k weights and expert ids [N,k], expert weights
gate/up [E,D,F] and down [E,F,D], and gives [N,D]; an id equal to E means "no expert" (an
assignment dropped by a capacity, or owned by another device) and adds nothing. All are dropless
and give the same values and gradients (fp32: up to the summation order).

  dense       every expert on every token, weighted by the (mostly zero) combine matrix [N,E]:
              E/k times the FLOPs of the others, but three plain einsums.
  ragged_dot  sort the N·k assignments by expert, grouped matmuls (`jax.lax.ragged_dot`):
              compute ∝ N·k on TPU. XLA:CPU runs ragged_dot many times slower than an einsum
              (benchmarks/bench_moe_impl.py),
              and XLA:GPU expands it into E masked copies of the rows: several times the blocked
              form's step time, and out of memory at training batch sizes (measured on an H200:
              benchmarks/gpu_reports/h200_moe_forms.json, `train.rows`, and bench_gpu.py).
  blocked     sort by expert, pad each expert's group to a multiple of C rows, gather the rows
              into G = N·k/C + E blocks [G,C,D] (the static bound: each expert wastes < C rows)
              and the experts' weights per block [G,D,F], one batched einsum, gather back and
              combine. Compute ∝ N·k + E·C. The fastest form on CPU and GPU.
  megablox    the sorted rows through Pallas gmm/tgmm (TPU), which skip the groups' empty tiles.
  auto        per backend (`resolve_impl`): megablox on TPU (ragged_dot when the dims are not
              128-multiples or the step is sharded without expert parallelism), blocked on GPU
              and CPU.

The pieces the expert-parallel path (`qwen3_jax.model.moe_ep`) shares live here too: the rank of
each assignment within its expert (`expert_ranks`), the sort by expert (`sort_by_expert`), the
un-sort and combine (`unsort_combine`) and the SwiGLU over padded blocks (`swiglu_blocks`).

Einsum letters: N tokens, k slots, A = N·k assignments, E experts, D model, F expert ffn,
G blocks, C rows per block, R = G·C buffer rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from qwen3_jax.config import MOE_IMPLS

IMPLS = MOE_IMPLS
GROUPED = ("ragged_dot", "megablox", "megablox_interpret")  # the forms over rows sorted by expert
# (megablox_interpret: the Pallas interpreter, tests)
BLOCK_ROWS = 128  # C of the blocked form (the fastest on CPU: benchmarks/bench_moe_impl.py); 4,096
# tokens x top-4 over 16 experts pad to at most 144 blocks


def resolve_impl(impl: str, platform: str, d_model: int, ffn_dim: int, sharded: bool = False) -> str:
    """The concrete form `auto` picks for `platform`. `sharded`: the experts run under a GSPMD
    mesh of more than one device (no expert axis), where a Pallas kernel would not be split."""
    if impl not in IMPLS:
        raise ValueError(f"moe_impl={impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    if platform == "tpu":
        return "megablox" if megablox_ok(d_model, ffn_dim) and not sharded else "ragged_dot"
    return "blocked"  # CPU and GPU


def experts(x_ND, w_Nk, ids_Nk, gate_EDF, up_EDF, down_EFD, impl: str):
    """The combined expert outputs [N,D] in form `impl` (not `auto`: resolve it first)."""
    if impl == "dense":
        return experts_dense(x_ND, w_Nk, ids_Nk, gate_EDF, up_EDF, down_EFD)
    if impl == "blocked":
        return experts_blocked(x_ND, w_Nk, ids_Nk, gate_EDF, up_EDF, down_EFD)
    if impl in GROUPED:
        return experts_sorted(x_ND, w_Nk, ids_Nk, gate_EDF, up_EDF, down_EFD, impl)
    raise ValueError(f"moe_impl={impl!r} is not one of {IMPLS[1:]}")


# -- shared pieces: ranks, sort, un-sort ---------------------------------------------------------

def exclusive_cumsum(x):
    """[a, b, c] -> [0, a, a + b]: where each group starts."""
    return jnp.cumsum(x) - x


def expert_ranks(ids_A, num_experts: int):
    """The rank of each assignment among the assignments to its expert, in assignment order
    (0 for the first); 0 for ids = num_experts (no expert). [A] int32."""
    onehot_AE = jax.nn.one_hot(ids_A, num_experts, dtype=jnp.int32)  # all-zero rows for no expert
    return jnp.sum((jnp.cumsum(onehot_AE, axis=0) - 1) * onehot_AE, axis=-1)


def sort_by_expert(ids_A, num_experts: int):
    """order_A (sorted position -> assignment; stable, ids = num_experts last) and the group
    sizes [num_experts] (int32)."""
    order_A = jnp.argsort(ids_A, stable=True)
    return order_A, jnp.bincount(ids_A, length=num_experts).astype(jnp.int32)


def unsort_combine(ys_AD, order_A, w_Nk):
    """Rows back from the experts in sorted order -> Σ_k w · y per token [N,D]."""
    N, k = w_Nk.shape
    y_NkD = jnp.take(ys_AD, jnp.argsort(order_A), axis=0).reshape(N, k, -1)
    return jnp.einsum("nkd,nk->nd", y_NkD, w_Nk.astype(ys_AD.dtype))


# -- dense -------------------------------------------------------------------------------------------

def experts_dense(x_ND, w_Nk, ids_Nk, gate_EDF, up_EDF, down_EFD):
    E = gate_EDF.shape[0]
    dt = x_ND.dtype
    combine_NE = _combine_matrix(w_Nk, ids_Nk, E, dt)
    x_ND = jnp.where(jnp.any(ids_Nk < E, axis=-1, keepdims=True), x_ND, 0)  # rows of no expert (an
    # expert-parallel buffer's padding): zero, so that no 8-bit scale (qwen3_jax.quant) sees them
    g_NEF = jnp.einsum("nd,edf->nef", x_ND, gate_EDF.astype(dt))
    u_NEF = jnp.einsum("nd,edf->nef", x_ND, up_EDF.astype(dt))
    h_NEF = jax.nn.silu(g_NEF) * u_NEF * combine_NE[..., None]
    return jnp.einsum("nef,efd->nd", h_NEF, down_EFD.astype(dt))


def _combine_matrix(w_Nk, ids_Nk, num_experts: int, dt):
    """[N,E]: each token's router weight per expert (0 for the experts it did not choose)."""
    return jnp.einsum("nk,nke->ne", w_Nk.astype(dt), jax.nn.one_hot(ids_Nk, num_experts, dtype=dt))


# -- sorted rows: ragged_dot / megablox ----------------------------------------------------------------

def _tile(n: int, pref: int) -> int:
    t = min(pref, n)
    while n % t:
        t //= 2
    return max(t, 1)


def _gmm(x_RK, w_GKN, group_sizes, dt, interpret=False):
    """Megablox grouped matmul (Pallas, TPU): forward and both gradients visit only the tiles the
    groups cover, so the work follows the rows really present, not the buffer. (XLA:TPU lowers
    the weight gradient of `lax.ragged_dot` to a masked dense matmul over every expert × every
    buffer row.)"""
    from jax.experimental.pallas.ops.tpu.megablox import gmm  # optional: TPU-only Pallas kernel

    R, K = x_RK.shape
    N = w_GKN.shape[2]
    t = min(512, K, N)  # the backward swaps K and N under the same tiling: one size for both
    return gmm(x_RK, w_GKN.astype(dt), group_sizes, dt, (_tile(R, 512), t, t), None, None, False, interpret)


def megablox_ok(d_model: int, ffn_local: int) -> bool:
    """Megablox tiles need 128-multiples in both matmul dims (the tiny test presets are smaller)."""
    return d_model % 128 == 0 and ffn_local % 128 == 0


def _namer(name: str | None):
    """t -> t named `name` for the remat policies (`checkpoint_name`), or t itself (None)."""
    return (lambda t: checkpoint_name(t, name)) if name else (lambda t: t)


OVERFLOW_SCOPE = "moe_overflow"  # names the expert matmuls over a dropless buffer's rows past the
# saved ones (HLO op_name): the AOT report counts its grouped matmuls at the rows expected there, none


def _swiglu_h(xs_RD, group_sizes_E, gate_EDF, up_EDF, kernel: str, name: str | None):
    """silu(x·gate) · (x·up) over sorted rows (0 past the groups); the two projections are
    named `name` for the remat policies (`moe_wi`), or left unnamed (None)."""
    dt = xs_RD.dtype
    tag = _namer(name)
    if kernel.startswith("megablox"):
        interp = kernel.endswith("interpret")
        g = tag(_gmm(xs_RD, gate_EDF, group_sizes_E, dt, interp))
        u = tag(_gmm(xs_RD, up_EDF, group_sizes_E, dt, interp))
        return jnp.where(_live(xs_RD, group_sizes_E), jax.nn.silu(g) * u, 0)
    live = _live(xs_RD, group_sizes_E)  # rows past the groups: zeroed in and out, so that no
    xs_RD = jnp.where(live, xs_RD, 0)  # absmax of 8-bit training (qwen3_jax.quant) sees them
    g = tag(jax.lax.ragged_dot(xs_RD, gate_EDF.astype(dt), group_sizes_E))
    u = tag(jax.lax.ragged_dot(xs_RD, up_EDF.astype(dt), group_sizes_E))
    return jnp.where(live, jax.nn.silu(g) * u, 0)


def _live(x_RD, group_sizes_E):
    """[R,1]: the rows inside the groups. gmm leaves the rows past them unwritten (garbage): they
    are zeroed, so that neither values nor (0 * NaN) gradients leak from the empty tail; for
    ragged_dot too, so that no 8-bit scale (qwen3_jax.quant) is taken over them."""
    return (jnp.arange(x_RD.shape[0]) < jnp.sum(group_sizes_E))[:, None]


def _down(h_RF, group_sizes_E, down_EFD, kernel: str):
    dt = h_RF.dtype
    if kernel.startswith("megablox"):
        y = _gmm(h_RF, down_EFD, group_sizes_E, dt, kernel.endswith("interpret"))
        return jnp.where(_live(h_RF, group_sizes_E), y, 0)
    return jnp.where(_live(h_RF, group_sizes_E), jax.lax.ragged_dot(h_RF, down_EFD.astype(dt), group_sizes_E), 0)


def grouped_swiglu(xs_RD, group_sizes_E, gate_EDF, up_EDF, down_EFD, kernel: str = "ragged_dot",
                   name: str | None = "moe_wi"):
    """SwiGLU experts over rows sorted by expert, `group_sizes_E` rows each; rows past their sum
    give 0. kernel: `ragged_dot` (jax.lax, any backend), `megablox` (TPU) or `megablox_interpret`
    (the Pallas interpreter, tests). The gate/up outputs are named `name` (remat)."""
    return _down(_swiglu_h(xs_RD, group_sizes_E, gate_EDF, up_EDF, kernel, name), group_sizes_E, down_EFD, kernel)


def split_groups(group_sizes_E, keep: int):
    """Group sizes of the first `keep` sorted rows and of the rows after them."""
    starts_E = exclusive_cumsum(group_sizes_E)
    keep_E = jnp.clip(starts_E + group_sizes_E, 0, keep) - jnp.clip(starts_E, 0, keep)
    return keep_E.astype(group_sizes_E.dtype), (group_sizes_E - keep_E).astype(group_sizes_E.dtype)


def grouped_swiglu_gathered(x_RD, order_R, group_sizes_E, gate_EDF, up_EDF, down_EFD, kernel: str = "ragged_dot",
                            keep_rows: int | None = None):
    """grouped_swiglu over the rows x_RD[order_R] (sorted by expert), returned in x's order.
    keep_rows (< R: a worst-case-sized buffer): the first keep_rows sorted rows and the rest are
    gathered and computed apart; only the first part's gate/up outputs are named `moe_wi` (what
    a remat policy keeps is then keep_rows rows, not the worst case), the rest's grouped
    matmuls run under OVERFLOW_SCOPE (rows there only when routing sends more than keep_rows)."""
    R = x_RD.shape[0]
    if keep_rows is None or keep_rows >= R:
        ys_RD = grouped_swiglu(jnp.take(x_RD, order_R, axis=0), group_sizes_E, gate_EDF, up_EDF, down_EFD, kernel)
    else:
        keep_E, rest_E = split_groups(group_sizes_E, keep_rows)
        y_keep = grouped_swiglu(jnp.take(x_RD, order_R[:keep_rows], axis=0), keep_E, gate_EDF, up_EDF, down_EFD,
                                kernel)
        with jax.named_scope(OVERFLOW_SCOPE):
            y_rest = grouped_swiglu(jnp.take(x_RD, order_R[keep_rows:], axis=0), rest_E, gate_EDF, up_EDF,
                                    down_EFD, kernel, name=None)
        ys_RD = jnp.concatenate([y_keep, y_rest], axis=0)
    return jnp.take(ys_RD, jnp.argsort(order_R), axis=0)


def experts_sorted(x_ND, w_Nk, ids_Nk, gate_EDF, up_EDF, down_EFD, kernel: str = "ragged_dot"):
    """Assignments sorted by expert (ids = E last, outside every group), grouped matmuls, un-sort."""
    k = ids_Nk.shape[1]
    order_A, sizes_E = sort_by_expert(ids_Nk.reshape(-1), gate_EDF.shape[0])  # assignment a = token * k + slot
    ys_AD = grouped_swiglu(jnp.take(x_ND, order_A // k, axis=0), sizes_E, gate_EDF, up_EDF, down_EFD, kernel)
    return unsort_combine(ys_AD, order_A, w_Nk)


# -- blocked -------------------------------------------------------------------------------------------

def block_layout(ids_A, num_experts: int, block: int):
    """Where each assignment goes in the blocked buffer. Returns
      pos_A   [A]  buffer row of each assignment (R = out of range for ids = E: no expert)
      src_R   [R]  the assignment in each buffer row (A for the padding rows)
      eid_G   [G]  the expert of each block (padding blocks past the last expert's: E - 1, all
                   their rows padding)
    with G = ceil(A/C) + E blocks of C rows, R = G·C. Expert e's assignments, in assignment
    order, fill ceil(n_e/C) consecutive blocks."""
    A = ids_A.shape[0]
    E, C = num_experts, block
    G = -(-A // C) + E
    R = G * C
    counts_E = jnp.bincount(ids_A, length=E)  # ids = E (no expert) not counted
    rank_A = expert_ranks(ids_A, E)
    blocks_E = -(-counts_E // C)
    block_end_E = jnp.cumsum(blocks_E)
    start_E = exclusive_cumsum(blocks_E) * C
    valid_A = ids_A < E
    pos_A = jnp.where(valid_A, jnp.take(start_E, jnp.minimum(ids_A, E - 1)) + rank_A, R)
    src_R = jnp.full((R,), A, jnp.int32).at[pos_A].set(jnp.arange(A, dtype=jnp.int32), mode="drop")
    eid_G = jnp.minimum(jnp.searchsorted(block_end_E, jnp.arange(G), side="right"), E - 1)
    return pos_A, src_R, eid_G, G


def block_rows(assignments: int, num_experts: int, block: int = BLOCK_ROWS) -> int:
    """C: `block`, or for few assignments (decoding) their fair share per expert, so that the
    E·C rows of padding stay near the dense form's N·E."""
    return max(1, min(block, -(-assignments // num_experts)))


def swiglu_blocks(x_GCD, gate_GDF, up_GDF, down_GFD, name: str | None = "moe_wi"):
    """SwiGLU of each block of C rows with that block's expert weights (three batched einsums);
    the gate/up outputs are named `name` for the remat policies, or left unnamed (None)."""
    dt = x_GCD.dtype
    tag = _namer(name)
    g_GCF = tag(jnp.einsum("gcd,gdf->gcf", x_GCD, gate_GDF.astype(dt)))
    h_GCF = jax.nn.silu(g_GCF) * tag(jnp.einsum("gcd,gdf->gcf", x_GCD, up_GDF.astype(dt)))
    return jnp.einsum("gcf,gfd->gcd", h_GCF, down_GFD.astype(dt))


def experts_blocked(x_ND, w_Nk, ids_Nk, gate_EDF, up_EDF, down_EFD, block: int = BLOCK_ROWS,
                    keep_rows: int | None = None):
    """keep_rows (expert parallelism over a worst-case-sized buffer, as in
    `grouped_swiglu_gathered`): only the blocks that can hold the first keep_rows assignments in
    expert order (ceil(keep_rows/C) + E of them) have their gate/up outputs named `moe_wi`; the
    blocks past them run under OVERFLOW_SCOPE, unnamed (recomputed by every remat policy)."""
    N, D = x_ND.shape
    k = ids_Nk.shape[1]
    E = gate_EDF.shape[0]
    dt = x_ND.dtype
    C = block_rows(N * k, E, block)
    pos_A, src_R, eid_G, G = block_layout(ids_Nk.reshape(-1), E, C)
    tok_R = src_R // k  # padding rows: A // k = N, out of range -> zeros
    x_GCD = jnp.take(x_ND, tok_R, axis=0, mode="fill", fill_value=0).reshape(G, C, D)
    # each block's expert weights: gate, up [G,D,F] and down [G,F,D]
    per_block = tuple(jnp.take(p.astype(dt), eid_G, axis=0) for p in (gate_EDF, up_EDF, down_EFD))
    keep_G = G if keep_rows is None else min(G, -(-keep_rows // C) + E)
    y_GCD = swiglu_blocks(x_GCD[:keep_G], *(p[:keep_G] for p in per_block))
    if keep_G < G:
        with jax.named_scope(OVERFLOW_SCOPE):
            y_rest = swiglu_blocks(x_GCD[keep_G:], *(p[keep_G:] for p in per_block), name=None)
        y_GCD = jnp.concatenate([y_GCD, y_rest], axis=0)
    y_NkD = jnp.take(y_GCD.reshape(G * C, D), pos_A, axis=0, mode="fill", fill_value=0).reshape(N, k, D)
    return jnp.einsum("nkd,nk->nd", y_NkD, w_Nk.astype(dt))
