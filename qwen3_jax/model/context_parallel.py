"""Context parallelism (CP): each sequence split over the `context` mesh axis, load-balanced.

Layout ("zig-zag", as MaxText's load-balanced CP and Megatron's): with CP shards a sequence of T
tokens is cut into 2·CP chunks of c = T / (2·CP) tokens, and shard r holds chunks r and
2·CP-1-r. Under a causal mask chunk j attends to j+1 chunks, so every shard does the same
attention work (r+1 + 2·CP-r = 2·CP+1 chunk pairs). On the global [B,T] arrays this is one
fixed permutation of the positions (`zigzag_order`): sharding the permuted sequence evenly over
`context` gives shard r its two chunks.

Where the permutation happens: the train and eval steps permute every [B,T] array of the batch
(tokens, targets, loss mask, segment ids, positions) once, on entry (`zigzag_batch`); the model
then runs on the permuted order and the loss is the masked sum over tokens on the permuted order
with the permuted targets, which is the same sum (as are the MoE router counts: sums over
tokens). The data pipeline never sees it. Everything in the model is per token except attention:
`attention` below all-gathers K/V (and the key segment ids) over `context` inside a shard_map,
and masks with each token's place in the original sequence, so it is exact with packed
documents (segment ids), GQA, QK-norm and RoPE/YaRN (both applied per token before, with the
positions that travelled with the tokens).

Kernels under CP: splash on TPU, with a causal mask whose query rows are in zig-zag order
(`q_seq_shards` = CP: each shard gets the block-sparsity of its own rows, and skips the blocks
its causal mask empties); elsewhere (CPU, GPU) a pure-JAX kernel over query blocks of `block`
rows against the gathered keys, each block rematerialised in the backward pass (memory
O(block · T); it computes the masked-out half too). Ring attention is not implemented.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwen3_jax import sharding
from qwen3_jax.model.attention_ops import DEFAULT_BLOCK, _fused_bwd_kv_block, masked_attention, resolve_impl

CONTEXT_AXIS = "context"


def context_size(ctx: sharding.Context | None = None) -> int:
    """The CP degree of the traced step: the `context` mesh axis (1 outside any mesh)."""
    ctx = ctx or sharding.active()
    return 1 if ctx is None else ctx.mesh.shape.get(CONTEXT_AXIS, 1)


def check_seq_len(seq_len: int, cp: int) -> None:
    """ValueError naming SEQ_LEN unless it splits into 2·CP equal chunks."""
    if cp > 1 and seq_len % (2 * cp):
        raise ValueError(f"SEQ_LEN={seq_len} is not divisible by 2 x context={2 * cp} (zig-zag chunks of "
                         f"context parallelism)")


@functools.lru_cache(maxsize=32)
def zigzag_order(seq_len: int, cp: int) -> np.ndarray:
    """int32 [T]: the original position of each token in zig-zag order (chunks 0, 2CP-1, 1, 2CP-2, ...)."""
    check_seq_len(seq_len, cp)
    c = seq_len // (2 * cp)
    chunks = [j for r in range(cp) for j in (r, 2 * cp - 1 - r)]
    return np.concatenate([np.arange(j * c, (j + 1) * c) for j in chunks]).astype(np.int32)


def to_zigzag(x, cp: int, axis: int = 1):
    """`x` with its sequence axis permuted into zig-zag order (identity for cp == 1)."""
    if cp == 1:
        return x
    return jnp.take(x, zigzag_order(x.shape[axis], cp), axis=axis)


def from_zigzag(x, cp: int, axis: int = 1):
    """The inverse of `to_zigzag`."""
    if cp == 1:
        return x
    return jnp.take(x, np.argsort(zigzag_order(x.shape[axis], cp)), axis=axis)


def zigzag_batch(batch: dict) -> dict:
    """Every [B,T,...] array of `batch` in zig-zag order when the traced step has a context axis > 1
    (the step's entry: train step, eval step; the loss is then taken on the permuted tokens)."""
    cp = context_size()
    if cp == 1:
        return batch
    out = {k: to_zigzag(v, cp) for k, v in batch.items()}
    sharding.mark_zigzag()
    return {k: sharding.constrain(v, ("batch", "seq") + (None,) * (v.ndim - 2)) for k, v in out.items()}


# -- attention ------------------------------------------------------------------------------------

def attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=None, *, impl: str = "auto", block: int | None = None,
              fused_bwd: bool = False, interpret: bool = False):
    """Causal self-attention within documents of the zig-zag-ordered sequences of a step traced with a
    context axis > 1 (`context_size()`); the same result, token for token, as `attention_ops.attention`
    on the sequences in their original order. `interpret`: splash in the Pallas interpreter (tests)."""
    ctx = sharding.active()
    cp = context_size(ctx)
    if not ctx.zigzag:  # a forward traced outside the train/eval step: its tokens are in their own order
        raise ValueError(f"attention under a context axis ({cp}) needs the batch in zig-zag order: run the model "
                         f"through the train or eval step, or permute the batch with "
                         f"context_parallel.zigzag_batch inside the same sharding.use_rules block")
    B, T, N, H = q_BTNH.shape
    check_seq_len(T, cp)
    kernel = resolve_impl(impl, T, q_BTNH.dtype, ctx.platform)
    seg_BT = (jnp.ones((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32))
    spec = functools.partial(sharding.logical_to_spec, rules=ctx.rules, mesh=ctx.mesh)
    q_spec = spec(("batch", "seq", "heads", "head_dim"))
    kv_spec = spec(("batch", "seq", "kv_heads", "head_dim"))
    if spec(("seq",)) != jax.sharding.PartitionSpec(CONTEXT_AXIS):
        raise ValueError(f"context parallelism needs the rules to map `seq` onto {CONTEXT_AXIS!r}; got {spec(('seq',))}")
    order = zigzag_order(T, cp)
    if kernel == "splash":
        return _splash(q_BTNH, k_BTKH, v_BTKH, seg_BT, ctx, cp, block or DEFAULT_BLOCK["splash"], fused_bwd,
                       (q_spec, kv_spec, spec(("batch", "seq"))), interpret)
    b = block or DEFAULT_BLOCK["chunked"]

    def local(q, k, v, seg):
        k_full, v_full, seg_k = (jax.lax.all_gather(a, CONTEXT_AXIS, axis=1, tiled=True) for a in (k, v, seg))
        Tl = q.shape[1]
        q_pos = jax.lax.dynamic_slice_in_dim(jnp.asarray(order), jax.lax.axis_index(CONTEXT_AXIS) * Tl, Tl)
        return blocked_attention(q, k_full, v_full, seg, seg_k, q_pos, jnp.asarray(order), b)

    fn = jax.shard_map(local, mesh=ctx.mesh, in_specs=(q_spec, kv_spec, kv_spec, spec(("batch", "seq"))),
                       out_specs=q_spec, check_vma=False)
    return fn(q_BTNH, k_BTKH, v_BTKH, seg_BT)


def blocked_attention(q_BTNH, k_BSKH, v_BSKH, seg_q_BT, seg_k_BS, pos_q_T, pos_k_S, block: int):
    """T queries against S keys at original positions `pos_q_T`, `pos_k_S`: query i sees key j iff
    pos_k[j] <= pos_q[i] and their segment ids are equal. Query blocks of `block` rows, one at a
    time, each rematerialised in the backward pass: memory O(block · S)."""
    B, T, N, H = q_BTNH.shape
    b = block if T % block == 0 else T
    nb = T // b

    @jax.checkpoint
    def one(args):
        q_BbNH, seg_Bb, pos_b = args
        mask_Bbs = (seg_Bb[:, :, None] == seg_k_BS[:, None, :]) & (pos_b[:, None] >= pos_k_S[None, :])[None]
        return masked_attention(q_BbNH, k_BSKH, v_BSKH, mask_Bbs)

    q_nBbNH = jnp.moveaxis(q_BTNH.reshape(B, nb, b, N, H), 1, 0)
    seg_nBb = jnp.moveaxis(seg_q_BT.reshape(B, nb, b), 1, 0)
    o_nBbNH = jax.lax.map(one, (q_nBbNH, seg_nBb, pos_q_T.reshape(nb, b)))
    return jnp.moveaxis(o_nBbNH, 0, 1).reshape(B, T, N, H)


def _splash(q_BTNH, k_BTKH, v_BTKH, seg_BT, ctx, cp, block, fused_bwd, specs, interpret):
    """Splash under CP: the local zig-zag queries against the gathered keys in original order,
    the kernel's mask rows in zig-zag order and sharded `q_seq_shards` = CP ways."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # optional: TPU kernel

    B, T, N, H = q_BTNH.shape
    if T % (2 * cp * block) and T % (2 * cp * 128):
        raise ValueError(f"SEQ_LEN={T}: splash under context={cp} needs chunks of T/(2·CP) tokens that are a "
                         f"multiple of 128")
    b = block if (T // (2 * cp)) % block == 0 else 128
    q_spec, kv_spec, seg_spec = specs
    n_local = N // _axes_size(ctx.mesh, q_spec[2])
    kernel = _splash_cp_kernel(n_local, T, cp, b, fused_bwd, interpret)
    kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec(None, CONTEXT_AXIS)))
    natural = np.argsort(zigzag_order(T, cp))
    q = q_BTNH * jnp.asarray(H ** -0.5, q_BTNH.dtype)  # the kernel does not scale

    def local(q, k, v, seg, kernel):
        k, v, seg_k = (jnp.take(jax.lax.all_gather(a, CONTEXT_AXIS, axis=1, tiled=True), natural, axis=1)
                       for a in (k, v, seg))

        def one_row(q_TNH, k_SKH, v_SKH, seg_q_T, seg_k_S):
            o_NTH = kernel(q_TNH.swapaxes(0, 1), k_SKH.swapaxes(0, 1), v_SKH.swapaxes(0, 1),
                           segment_ids=sk.SegmentIds(q=seg_q_T, kv=seg_k_S))
            return o_NTH.swapaxes(0, 1)

        return jax.vmap(one_row)(q, k, v, seg, seg_k)

    fn = jax.shard_map(local, mesh=ctx.mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, kernel_spec),
                       out_specs=q_spec, check_vma=False)
    return fn(q, k_BTKH, v_BTKH, seg_BT, kernel)


def _axes_size(mesh, entry) -> int:
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return int(np.prod([mesh.shape[a] for a in names])) if names else 1


def _splash_cp_kernel(num_heads, seq_len, cp, block, fused_bwd, interpret=False):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # optional: TPU kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # optional: TPU kernel

    mask = sm.CausalMask((seq_len, seq_len), shard_count=cp)
    mask.q_sequence = zigzag_order(seq_len, cp)  # rows: the original positions of the zig-zag order
    mask = sm.MultiHeadMask([mask] * num_heads)
    if fused_bwd:
        # the fused kernel leaves (kv length / its kv block) unreduced dQ copies of the local queries:
        # at most 16, as without CP (attention_ops._fused_bwd_kv_block)
        bwd = dict(block_q_dkv=block, block_kv_dkv=_fused_bwd_kv_block(seq_len, block), block_kv_dkv_compute=block,
                   use_fused_bwd_kernel=True)
    else:
        bwd = dict(block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                   block_kv_dq=block)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, **bwd)
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=cp,
                              residual_checkpoint_name="context", interpret=interpret)
