"""Causal self-attention kernels with document (segment) masks.

All implementations share one signature and agree with `reference`:

    attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, impl, block) -> o_BTNH

Query i attends to key j iff j <= i and segment_ids[i] == segment_ids[j]. Segment id 0 marks
padding; padding attends only to padding, so no row is empty and nothing is NaN. The softmax
scale is head_dim ** -0.5. GQA: query head n uses kv head n // (N // K) (G = N // K query
heads share a kv head; no implementation repeats K/V in memory).

Implementations:
  reference  materialises the [B,K,G,T,S] fp32 scores: exact, O(T^2) memory, any backend
             (`masked_attention`: the same under any mask [B,T,S], the KV-cache decode's).
  chunked    pure-JAX flash attention (online softmax over `block`-sized tiles) with a
             blockwise custom VJP: O(T * block) memory forward and backward, any backend.
  splash     Pallas TPU splash attention (TPU only; compiles ahead of time from a CPU box).
  cudnn      cuDNN flash attention through `jax.nn.dot_product_attention` (GPU only).
  auto       splash on TPU, cudnn on GPU (bf16/fp16), else reference up to
             AUTO_REFERENCE_MAX_T tokens and chunked beyond.

`block` None is the kernel's own tile (DEFAULT_BLOCK): 512 for splash; 256 for chunked, which on
a CPU train step ran faster than 512-token tiles and than reference (benchmarks/bench_train.py
--tiles measures it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwen3_jax import sharding
from qwen3_jax.config import ATTENTION_IMPLS
AUTO_REFERENCE_MAX_T = 256  # up to one chunked tile, reference does the same work
DEFAULT_BLOCK = {"chunked": 256, "splash": 512}
# Masked scores: finite, so `s - max` never computes inf - inf; exp() of it underflows to 0.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def _mask(segment_ids_BT, T, S):
    causal_TS = jnp.arange(T)[:, None] >= jnp.arange(S)[None, :]
    if segment_ids_BT is None:
        return causal_TS[None]
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return same_BTS & causal_TS[None]


def reference_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None):
    """Causal self-attention within documents: `masked_attention` under the causal/segment mask."""
    return masked_attention(q_BTNH, k_BSKH, v_BSKH, _mask(segment_ids_BT, q_BTNH.shape[1], k_BSKH.shape[1]))


def masked_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    """T queries against S keys where `mask_BTS` ([B,T,S] or [1,T,S]) is True: the reference
    kernel, also the KV-cache decode's (`Attention.extend`). Materialises the [B,K,G,T,S] scores
    in fp32: simple, exact, O(T·S) memory; K/V are not repeated."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    s_BKGTS = s_BKGTS * (H ** -0.5)
    s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, jnp.finfo(jnp.float32).min)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKH.dtype)
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS, v_BSKH)
    return o_BTKGH.reshape(B, T, N, H)


# -- chunked: flash attention in pure JAX -----------------------------------------------------
#
# Layout: sequences are padded to nb * b tokens and cut into nb tiles of b; tiled arrays carry
# the tile index first ([nb, B, b, ...]) so scans and dynamic indexing run over axis 0.
# Tile pair (query tile i, key tile j) is visited only if j <= i (causal) and, with segment ids,
# if some row's [min, max] segment-id ranges of the two tiles overlap; with non-decreasing ids
# (packed documents) that skips every tile pair that crosses a document boundary completely.
# Disjoint ranges imply no equal ids whatever the order, so the skip is exact for any ids.
# Padding tokens (beyond T) sit after every real token, so causality hides them from real queries.

def _tiles(x, nb):
    """[B, nb*b, ...] -> [nb, B, b, ...]."""
    return jnp.moveaxis(x.reshape(x.shape[0], nb, -1, *x.shape[2:]), 1, 0)


def _untile(x):
    """[nb, B, b, ...] -> [B, nb*b, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _tile_scores(q_BqKGH, k_BsKH, seg_q_Bq, seg_k_Bs, use_segments, diagonal):
    """Masked fp32 scores [B,K,G,q,s] of a query tile against a key tile, and the mask (None
    when nothing is masked: a tile below the diagonal without segment ids)."""
    b, H = q_BqKGH.shape[1], q_BqKGH.shape[-1]
    s = jnp.einsum("bqkgh,bskh->bkgqs", q_BqKGH, k_BsKH, preferred_element_type=jnp.float32)
    s = s * (H ** -0.5)
    mask_Bqs = None
    if diagonal:  # same positions: causal within the tile
        mask_Bqs = (jnp.arange(b)[:, None] >= jnp.arange(b)[None, :])[None]
    if use_segments:
        same_Bqs = seg_q_Bq[:, :, None] == seg_k_Bs[:, None, :]
        mask_Bqs = same_Bqs if mask_Bqs is None else mask_Bqs & same_Bqs
    if mask_Bqs is None:
        return s, None
    mask = mask_Bqs[:, None, None]
    return jnp.where(mask, s, _MASKED), mask


def _overlap(lo_q, hi_q, lo_k, hi_k):
    """Whether any row's segment-id ranges of a query tile and a key tile intersect."""
    return jnp.any((lo_q <= hi_k) & (lo_k <= hi_q))


def _flash_forward(q, k, v, seg, b, use_segments):
    """Padded q [B,Tp,N,H], k/v [B,Tp,K,H], seg [B,Tp] -> o [B,Tp,N,H], tiled residuals."""
    B, Tp, N, H = q.shape
    K = k.shape[2]
    nb = Tp // b
    q_t = _tiles(q.reshape(B, Tp, K, N // K, H), nb)  # [nb,B,b,K,G,H]
    k_t, v_t, seg_t = _tiles(k, nb), _tiles(v, nb), _tiles(seg, nb)
    lo_t, hi_t = seg_t.min(-1), seg_t.max(-1)  # [nb,B]

    def query_tile(_, xs):
        i, q_i, seg_i, lo_i, hi_i = xs

        def visit(j, carry, diagonal=False):
            def update(carry):
                m, l, acc = carry
                s, mask = _tile_scores(q_i, k_t[j], seg_i, seg_t[j], use_segments, diagonal)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                if mask is not None:  # rows with no visible key yet have m_new == _MASKED
                    p = jnp.where(mask, p, 0.0)
                corr = jnp.exp(m - m_new)
                pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), v_t[j],
                                preferred_element_type=jnp.float32)
                return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

            if not use_segments:
                return update(carry)
            return jax.lax.cond(_overlap(lo_i, hi_i, lo_t[j], hi_t[j]), update, lambda c: c, carry)

        m0 = jnp.full((B, K, N // K, b), _MASKED, jnp.float32)
        init = (m0, jnp.zeros_like(m0), jnp.zeros((B, K, N // K, b, H), jnp.float32))
        carry = jax.lax.fori_loop(0, i, visit, init)  # causal: key tiles 0..i-1, then i
        m, l, acc = visit(i, carry, diagonal=True)
        o_BKGqH = acc / l[..., None]
        o_BqKGH = jnp.moveaxis(o_BKGqH, 3, 1).astype(q.dtype)
        return None, (o_BqKGH, m + jnp.log(l))

    xs = (jnp.arange(nb), q_t, seg_t, lo_t, hi_t)
    _, (o_t, lse_t) = jax.lax.scan(query_tile, None, xs)
    o = _untile(o_t).reshape(B, Tp, N, H)
    return o, (q_t, k_t, v_t, seg_t, o_t, lse_t)


def _flash_backward(b, use_segments, residuals, do):
    """FlashAttention-2 backward: one pass over key tiles, recomputing P from the saved lse.

    For key tile j, query tiles i >= j accumulate dK_j, dV_j in the loop carry and add
    their dQ_i contribution into a [nb,B,b,K,G,H] fp32 buffer carried through the loops.
    """
    q_t, k_t, v_t, seg_t, o_t, lse_t = residuals
    nb, B, _, K, G, H = q_t.shape
    lo_t, hi_t = seg_t.min(-1), seg_t.max(-1)
    do_t = _tiles(do.reshape(B, nb * b, K, G, H), nb)  # [nb,B,b,K,G,H]
    delta_t = jnp.einsum("nbqkgh,nbqkgh->nbkgq", do_t.astype(jnp.float32), o_t.astype(jnp.float32))
    scale = H ** -0.5

    def key_tile(dq_t, xs):
        j, k_j, v_j, seg_j, lo_j, hi_j = xs

        def visit(i, carry, diagonal=False):
            def update(carry):
                dk, dv, dq_t = carry
                q_i, do_i = q_t[i], do_t[i]
                s, _ = _tile_scores(q_i, k_j, seg_t[i], seg_j, use_segments, diagonal)
                p = jnp.exp(s - lse_t[i][..., None])  # masked entries: exp(-huge) = 0
                dv = dv + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(do_i.dtype), do_i,
                                     preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqkgh,bskh->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_t[i][..., None]) * scale).astype(q_i.dtype)
                dk = dk + jnp.einsum("bkgqs,bqkgh->bskh", ds, q_i, preferred_element_type=jnp.float32)
                dq_i = jnp.einsum("bkgqs,bskh->bqkgh", ds, k_j, preferred_element_type=jnp.float32)
                return dk, dv, dq_t.at[i].add(dq_i)

            if not use_segments:
                return update(carry)
            return jax.lax.cond(_overlap(lo_t[i], hi_t[i], lo_j, hi_j), update, lambda c: c, carry)

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        carry = visit(j, (zeros, zeros, dq_t), diagonal=True)  # causal: query tiles j, then > j
        dk, dv, dq_t = jax.lax.fori_loop(j + 1, nb, visit, carry)
        return dq_t, (dk.astype(k_j.dtype), dv.astype(v_j.dtype))

    dq0 = jnp.zeros(q_t.shape, jnp.float32)
    xs = (jnp.arange(nb), k_t, v_t, seg_t, lo_t, hi_t)
    dq_t, (dk_t, dv_t) = jax.lax.scan(key_tile, dq0, xs)
    dq = _untile(dq_t).reshape(B, nb * b, K * G, H).astype(q_t.dtype)
    return dq, _untile(dk_t), _untile(dv_t), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, seg, b, use_segments):
    return _flash_forward(q, k, v, seg, b, use_segments)[0]


def _flash_fwd(q, k, v, seg, b, use_segments):
    return _flash_forward(q, k, v, seg, b, use_segments)


_flash.defvjp(_flash_fwd, _flash_backward)


def _round_up(x, m):
    return -(-x // m) * m


def _pad_seq(x, Tp, value=0):
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, Tp - x.shape[1])
    return jnp.pad(x, pad, constant_values=value)


def _check_self_attention(q_BTNH, k_BSKH, v_BSKH):
    (_, T, N, _), (_, S, K, _) = q_BTNH.shape, k_BSKH.shape
    if S != T or v_BSKH.shape != k_BSKH.shape or N % K:
        raise ValueError(f"causal self-attention needs q [B,T,N,H], k/v [B,T,K,H] with N % K == 0; "
                         f"got q {q_BTNH.shape}, k {k_BSKH.shape}, v {v_BSKH.shape}")


def chunked_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None, *, block: int = 512):
    """Flash attention in pure JAX: tiles of `block` tokens (fewer when T is shorter).

    Memory is O(T * block) in the forward and the backward pass (a custom VJP recomputes the
    probabilities tile by tile from the saved log-sum-exp instead of storing them).
    """
    _check_self_attention(q_BTNH, k_BSKH, v_BSKH)
    T = q_BTNH.shape[1]
    b = min(block, _round_up(T, 8))
    Tp = _round_up(T, b)
    use_segments = segment_ids_BT is not None
    if use_segments:
        seg = _pad_seq(segment_ids_BT.astype(jnp.int32), Tp, value=-1)
    else:
        seg = jnp.zeros((q_BTNH.shape[0], Tp), jnp.int32)
    q, k, v = (_pad_seq(x, Tp) for x in (q_BTNH, k_BSKH, v_BSKH))
    return _flash(q, k, v, seg, b, use_segments)[:, :T]


# -- splash: Pallas TPU kernel -------------------------------------------------------------------

def _fused_bwd_kv_block(seq_len: int, block: int, max_partials: int = 16) -> int:
    """The kv block of the fused backward kernel: it leaves seq_len / that block unreduced dQ
    copies, so the smallest multiple of `block` dividing seq_len with at most `max_partials`."""
    n = seq_len // block
    return block * next(d for d in range(1, n + 1) if n % d == 0 and n // d <= max_partials)


def _splash_kernel(num_heads, seq_len, block, interpret, fused_bwd=False):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # optional: TPU kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # optional: TPU kernel

    mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len))] * num_heads)
    if fused_bwd:
        bwd = dict(block_q_dkv=block, block_kv_dkv=_fused_bwd_kv_block(seq_len, block),
                   block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    else:
        bwd = dict(block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                   block_q_dq=block, block_kv_dq=block)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, **bwd)
    # its output and log-sum-exp (the backward's residuals) carry the remat name of attention's
    # output: a policy that keeps "context" keeps both (qwen3_jax.config.REMAT_NAMES)
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              residual_checkpoint_name="context", interpret=interpret)


def _target_platform():
    """The platform attention is traced for: the active mesh's devices, else the default backend."""
    ctx = sharding.active()
    return ctx.platform if ctx is not None else jax.default_backend()


def splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None, *, block: int = 512,
                     interpret: bool = False, fused_bwd: bool = False):
    """Pallas splash attention (TPU). `interpret=True` runs the kernel in the Pallas interpreter
    on any backend (slow; for tests). `fused_bwd`: one backward kernel for dQ, dK and dV
    (ModelConfig.splash_fused_bwd). Under `sharding.use_rules` the kernel runs per device in a
    `shard_map` over the batch and head axes (the sequence must not be sharded)."""
    _check_self_attention(q_BTNH, k_BSKH, v_BSKH)
    platform = _target_platform()
    if platform != "tpu" and not interpret:
        raise RuntimeError(f"attention impl 'splash' is a TPU Pallas kernel; the target backend is "
                           f"{platform!r} (use 'chunked', or 'cudnn' on GPU)")
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # optional: TPU kernel

    B, T, N, H = q_BTNH.shape
    b = min(block, _round_up(T, 128))  # splash tiles are multiples of 128 lanes
    Tp = _round_up(T, b)
    seg = (jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32))
    q = _pad_seq(q_BTNH * jnp.asarray(H ** -0.5, q_BTNH.dtype), Tp)  # the kernel does not scale
    k, v, seg = _pad_seq(k_BSKH, Tp), _pad_seq(v_BSKH, Tp), _pad_seq(seg, Tp, value=-1)

    def local(q_BTNH, k_BSKH, v_BSKH, seg_BT):
        kernel = _splash_kernel(q_BTNH.shape[2], Tp, b, interpret, fused_bwd)

        def one_row(q_TNH, k_SKH, v_SKH, seg_T):
            o_NTH = kernel(q_TNH.swapaxes(0, 1), k_SKH.swapaxes(0, 1), v_SKH.swapaxes(0, 1),
                           segment_ids=sk.SegmentIds(q=seg_T, kv=seg_T))
            return o_NTH.swapaxes(0, 1)

        return jax.vmap(one_row)(q_BTNH, k_BSKH, v_BSKH, seg_BT)

    ctx = sharding.active()
    if ctx is not None:
        mesh = ctx.mesh
        spec = functools.partial(sharding.logical_to_spec, rules=ctx.rules, mesh=mesh)
        # the whole sequence on each device (a context axis is model/context_parallel.py's, not this)
        q_spec = spec(("batch", None, "heads", "head_dim"))
        kv_spec = spec(("batch", None, "kv_heads", "head_dim"))
        local = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, spec(("batch", None))),
                              out_specs=q_spec, check_vma=False)
    return local(q, k, v, seg)[:, :T]


# -- cudnn: cuDNN flash attention (GPU) ----------------------------------------------------------

def _segment_runs(segment_ids_BT, max_segments):
    """cuDNN packed-layout metadata for the runs of equal ids: start offsets [B,M+1] and lengths
    [B,M] (-1 fills unused slots), and whether each row has at most M runs."""
    B, T = segment_ids_BT.shape
    starts_BT = jnp.concatenate([jnp.ones((B, 1), bool),
                                 segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    n_runs_B = starts_BT.sum(-1)
    # Run starts in order (positions that start no run sort last as T); unused slots are -1.
    pos_BT = jnp.where(starts_BT, jnp.arange(T), T)
    starts_BM = jnp.pad(jnp.sort(pos_BT, axis=-1), ((0, 0), (0, max_segments + 1)), constant_values=T)
    starts_BM = starts_BM[:, :max_segments + 1]
    idx = jnp.arange(max_segments + 1)
    offsets = jnp.where(idx < n_runs_B[:, None], starts_BM, -1)
    ends_BM = jnp.where(idx[1:] < n_runs_B[:, None], starts_BM[:, 1:], T)
    lengths = jnp.where(idx[:-1] < n_runs_B[:, None], ends_BM - starts_BM[:, :-1], -1)
    fits = n_runs_B <= max_segments
    return offsets.astype(jnp.int32), lengths.astype(jnp.int32), fits


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None, *, max_segments: int | None = None):
    """cuDNN flash attention (bf16/fp16 on NVIDIA GPUs).

    Without segment ids this is `jax.nn.dot_product_attention(implementation="cudnn",
    is_causal=True)`. With segment ids each run of equal ids must be one document (what packing
    produces; ids need not be sorted but a document must be contiguous): the runs become cuDNN's
    packed-sequence offsets with a static bound of `max_segments` runs per row (default
    max(16, T // 128)); rows with more runs return NaN rather than a silently wrong result.
    """
    _check_self_attention(q_BTNH, k_BSKH, v_BSKH)
    platform = _target_platform()
    if platform not in ("gpu", "cuda"):
        raise RuntimeError(f"attention impl 'cudnn' needs an NVIDIA GPU; the target backend is "
                           f"{platform!r} (use 'chunked' or 'reference')")
    if segment_ids_BT is None:
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True,
                                            implementation="cudnn")
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # optional: GPU-only (cuDNN)

    T = q_BTNH.shape[1]
    M = max_segments or max(16, T // 128)
    offsets, lengths, fits = _segment_runs(segment_ids_BT, M)
    o = cudnn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, q_seqlen=lengths, kv_seqlen=lengths,
                                    q_offsets=offsets, kv_offsets=offsets, scale=q_BTNH.shape[-1] ** -0.5,
                                    mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    return jnp.where(fits[:, None, None, None], o, jnp.nan)


# -- dispatcher -----------------------------------------------------------------------------------

def resolve_impl(impl: str, seq_len: int, dtype, platform: str | None = None) -> str:
    """The concrete implementation `auto` picks for the target backend (default: the one the step
    is traced for), sequence length and compute dtype."""
    if impl != "auto":
        return impl
    platform = platform or _target_platform()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "reference" if seq_len <= AUTO_REFERENCE_MAX_T else "chunked"


def attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None, *, impl: str = "reference", block: int | None = None,
              fused_bwd: bool = False):
    impl = resolve_impl(impl, q_BTNH.shape[1], q_BTNH.dtype)
    block = block or DEFAULT_BLOCK.get(impl)
    if impl == "reference":
        return reference_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    if impl == "chunked":
        return chunked_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, block=block)
    if impl == "splash":
        return splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, block=block, fused_bwd=fused_bwd)
    if impl == "cudnn":
        return cudnn_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
    raise ValueError(f"unknown attention impl {impl!r}; known: {', '.join(ATTENTION_IMPLS)}")
